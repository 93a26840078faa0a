// The safetensors header and the sharded-checkpoint index, parsed without LibTorch (the fuzz
// build links this alone). Every size is checked against the file before anything is allocated.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace victor {

struct TensorInfo {
  std::string dtype;  // "F32", "F16", "BF16", ...
  std::vector<int64_t> shape;
  size_t begin = 0, end = 0;  // byte offsets into the data section
};

struct SafetensorsHeader {
  size_t data_offset = 0;  // where the data section starts (8 + header length)
  std::map<std::string, TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
};

// Bytes per element of a safetensors dtype name; 0 when victor does not read it.
size_t safetensors_dtype_size(const std::string& dtype);

// `bytes` is the whole file (`size` bytes). Throws victor::Error naming `path` (and the tensor)
// for a truncated file, a header that is not JSON or not an object, a malformed entry, an
// unsupported dtype, a shape whose byte size overflows, a byte range that does not match its
// shape or lies past the end of the file, and tensors whose byte ranges overlap.
SafetensorsHeader parse_safetensors_header(const uint8_t* bytes, size_t size, const std::string& path);

// model.safetensors.index.json: tensor name -> shard file. Every shard must be a plain
// `*.safetensors` file name inside the model folder (no folders, no "..", not absolute).
std::map<std::string, std::string> parse_safetensors_index(const std::string& text, const std::string& path);

}  // namespace victor
