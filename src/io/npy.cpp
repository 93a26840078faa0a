#include "victor/npy.h"

#include <cstring>

#include "victor/error.h"
#include "victor/files.h"

namespace victor {

void save_npy(const std::string& path, const torch::Tensor& t) {
  auto c = t.detach().to(torch::kCPU, torch::kFloat32).contiguous();
  std::string shape = "(";
  for (int64_t i = 0; i < c.dim(); ++i) shape += std::to_string(c.size(i)) + (c.dim() == 1 ? "," : i + 1 < c.dim() ? ", " : "");
  shape += ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::string out("\x93NUMPY\x01\x00", 8);
  uint16_t hl = static_cast<uint16_t>(header.size());
  out.push_back(static_cast<char>(hl & 0xff));
  out.push_back(static_cast<char>(hl >> 8));
  out += header;
  out.append(static_cast<const char*>(c.data_ptr()), c.numel() * 4);
  write_file_atomic(path, out);
}

torch::Tensor load_npy(const std::string& path) {
  std::string b = read_file(path, FileKind::Array);
  if (b.size() < 10 || b.compare(0, 6, "\x93NUMPY") != 0) throw Error(path + ": not a .npy file");
  size_t hl = static_cast<uint8_t>(b[8]) | (static_cast<uint8_t>(b[9]) << 8);
  if (10 + hl > b.size()) throw Error(path + ": truncated .npy header");
  std::string header = b.substr(10, hl);
  if (header.find("'<f4'") == std::string::npos) throw Error(path + ": only float32 .npy supported");
  auto s = header.find("'shape': (");
  if (s == std::string::npos) throw Error(path + ": .npy header without shape");
  std::vector<int64_t> shape;
  size_t i = s + 10;
  while (i < header.size() && header[i] != ')') {
    if (isdigit(header[i])) {
      size_t j = i;
      while (j < header.size() && isdigit(header[j])) ++j;
      // Each dimension, and their product, checked against the file before anything is allocated.
      if (j - i > 12) throw Error(path + ": .npy dimension too large");
      shape.push_back(std::stoll(header.substr(i, j - i)));
      i = j;
    } else {
      ++i;
    }
  }
  const size_t data_bytes = b.size() - 10 - hl;
  size_t n = 1;
  for (auto d : shape)
    if (__builtin_mul_overflow(n, size_t(d), &n) || n > data_bytes) throw Error(path + ": .npy data size does not match shape");
  if (10 + hl + n * 4 != b.size()) throw Error(path + ": .npy data size does not match shape");
  auto t = torch::empty(shape, torch::kFloat32);
  std::memcpy(t.data_ptr(), b.data() + 10 + hl, n * 4);
  return t;
}

}  // namespace victor
