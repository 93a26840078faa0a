#pragma once
#include <torch/torch.h>

#include <string>

namespace victor {
// Writes a float32 tensor as NumPy .npy (format 1.0), atomically.
void save_npy(const std::string& path, const torch::Tensor& t);
torch::Tensor load_npy(const std::string& path);
}  // namespace victor
