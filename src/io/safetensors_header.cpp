// safetensors header and index parsing (no LibTorch: the fuzz build links this file alone).
#include "victor/safetensors_header.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "victor/error.h"

using json = nlohmann::json;

namespace victor {

size_t safetensors_dtype_size(const std::string& dtype) {
  if (dtype == "F32" || dtype == "I32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16") return 2;
  if (dtype == "F64" || dtype == "I64") return 8;
  if (dtype == "U8" || dtype == "I8" || dtype == "BOOL") return 1;
  return 0;
}

SafetensorsHeader parse_safetensors_header(const uint8_t* bytes, size_t size, const std::string& path) {
  if (size < 8)
    throw Error(path + ": truncated safetensors file (" + std::to_string(size) + " bytes, no header)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > size - 8)
    throw Error(path + ": corrupt or truncated safetensors file (header length " +
                std::to_string(header_len) + " exceeds file size " + std::to_string(size) + ")");
  SafetensorsHeader h;
  h.data_offset = 8 + size_t(header_len);
  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(bytes + 8),
                         reinterpret_cast<const char*>(bytes + 8 + header_len));
  } catch (const json::exception& e) {
    throw Error(path + ": corrupt safetensors header (not JSON): " + e.what());
  }
  if (!header.is_object()) throw Error(path + ": corrupt safetensors header (not an object)");
  const size_t data_size = size - h.data_offset;
  for (auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      if (v.is_object())
        for (auto& [mk, mv] : v.items())
          if (mv.is_string()) h.metadata[mk] = mv.get<std::string>();
      continue;
    }
    const std::string where = path + ": tensor '" + name + "': ";
    if (!v.is_object()) throw Error(where + "malformed header entry (not an object)");
    TensorInfo info;
    auto dtype = v.find("dtype");
    auto shape = v.find("shape");
    auto off = v.find("data_offsets");
    if (dtype == v.end() || !dtype->is_string()) throw Error(where + "malformed header entry ('dtype' must be a string)");
    if (shape == v.end() || !shape->is_array()) throw Error(where + "malformed header entry ('shape' must be a list)");
    if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      throw Error(where + "malformed header entry ('data_offsets' must be 2 non-negative integers)");
    info.dtype = dtype->get<std::string>();
    const size_t es = safetensors_dtype_size(info.dtype);
    if (es == 0) throw Error(where + "unsupported dtype " + info.dtype);
    if (shape->size() > 8) throw Error(where + "more than 8 dimensions");
    size_t numel = 1;
    for (const json& d : *shape) {
      if (!d.is_number_integer()) throw Error(where + "malformed header entry (a dimension is not an integer)");
      if (d.get<int64_t>() < 0) throw Error(where + "negative dimension");
      info.shape.push_back(d.get<int64_t>());
      if (__builtin_mul_overflow(numel, size_t(d.get<int64_t>()), &numel))
        throw Error(where + "shape too large (its element count overflows)");
    }
    size_t nbytes = 0;
    if (__builtin_mul_overflow(numel, es, &nbytes)) throw Error(where + "shape too large (its byte size overflows)");
    info.begin = (*off)[0].get<uint64_t>();
    info.end = (*off)[1].get<uint64_t>();
    if (info.end < info.begin || info.end - info.begin != nbytes)
      throw Error(where + "byte range does not match shape and dtype");
    if (info.end > data_size) throw Error(where + "data lies beyond the end of the file (truncated file?)");
    h.tensors[name] = std::move(info);
  }
  // Two tensors over the same bytes: a writer bug or a crafted file; either way not weights.
  std::vector<std::pair<size_t, size_t>> ranges;
  for (auto& [n, i] : h.tensors)
    if (i.end > i.begin) ranges.emplace_back(i.begin, i.end);
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second)
      throw Error(path + ": corrupt safetensors header (tensors' byte ranges overlap)");
  return h;
}

std::map<std::string, std::string> parse_safetensors_index(const std::string& text, const std::string& path) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(path + ": malformed JSON: " + e.what());
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    throw Error(path + ": missing object 'weight_map'");
  std::map<std::string, std::string> out;
  for (auto& [t, f] : j["weight_map"].items()) {
    if (!f.is_string()) throw Error(path + ": weight_map['" + t + "'] must be a shard file name");
    const std::string s = f.get<std::string>();
    const bool plain = !s.empty() && s.find('/') == std::string::npos && s.find('\\') == std::string::npos &&
                       s != "." && s != ".." && s.find('\0') == std::string::npos;
    const std::string ext = ".safetensors";
    if (!plain || s.size() <= ext.size() || s.compare(s.size() - ext.size(), ext.size(), ext) != 0)
      throw Error(path + ": weight_map['" + t + "'] = '" + s +
                  "' is not a *.safetensors file name in the model folder");
    out[t] = s;
  }
  if (out.empty()) throw Error(path + ": 'weight_map' lists no tensors");
  return out;
}

}  // namespace victor
