// libFuzzer: the safetensors header (the first byte 0) and model.safetensors.index.json (1) on
// arbitrary bytes. A parse or a victor::Error naming the file; what a parse returns is consistent.
#include <cstdlib>
#include <string>
#include <vector>

#include "victor/error.h"
#include "victor/safetensors_header.h"

using namespace victor;

#define CHECK(c) \
  if (!(c)) abort()

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0] & 1;
  ++data, --size;
  if (mode == 0) {
    std::vector<uint8_t> file(data, data + size);  // exactly the file: ASan sees any read past it
    try {
      SafetensorsHeader h = parse_safetensors_header(file.data(), file.size(), "fuzz.safetensors");
      CHECK(h.data_offset >= 8 && h.data_offset <= file.size());
      size_t prev_end = 0;
      std::vector<std::pair<size_t, size_t>> ranges;
      for (auto& [name, t] : h.tensors) {
        size_t numel = 1;
        for (auto d : t.shape) {
          CHECK(d >= 0);
          numel *= size_t(d);
        }
        CHECK(t.begin <= t.end && t.end <= file.size() - h.data_offset);
        CHECK(t.end - t.begin == numel * safetensors_dtype_size(t.dtype));
        // The bytes a load would read are inside the buffer.
        if (t.end > t.begin) prev_end += file[h.data_offset + t.end - 1];
      }
      (void)prev_end;
    } catch (const Error& e) {
      CHECK(std::string(e.what()).rfind("fuzz.safetensors", 0) == 0);
    }
  } else {
    try {
      auto map = parse_safetensors_index(std::string(reinterpret_cast<const char*>(data), size), "index.json");
      CHECK(!map.empty());
      for (auto& [t, f] : map) {
        CHECK(f.find('/') == std::string::npos && f.find('\\') == std::string::npos);
        CHECK(f != "." && f != ".." && f.size() > 12);
        CHECK(f.compare(f.size() - 12, 12, ".safetensors") == 0);
      }
    } catch (const Error& e) {
      CHECK(std::string(e.what()).rfind("index.json", 0) == 0);
    }
  }
  return 0;
}
