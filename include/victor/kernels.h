// Weight storage (f32, bf16, int8) and the matrix products over it, with runtime CPU dispatch.
// Decode-shaped products (a few rows) run our own kernels that stream the weights once at memory
// bandwidth; longer ones (prefill, the vision tower) run a bf16 GEMM (oneDNN, inside LibTorch).
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

namespace victor {

namespace kernels {

enum class Isa { Scalar, Avx2, Avx512 };
const char* isa_name(Isa isa);
std::vector<Isa> supported_isas();  // on this CPU, best last
Isa active_isa();
// Forces a kernel set (tests run every path the machine supports); throws if the CPU lacks it.
void use_isa(Isa isa);

}  // namespace kernels

// Products with at most this many rows (default 16) use the streaming kernels, which accumulate
// in float32 over the exact stored weights; more rows use the bf16 GEMM. Tests raise it to check
// the cache logic of each storage without the GEMM's bf16 rounding.
int64_t skinny_rows_limit();
void set_skinny_rows_limit(int64_t rows);

// Per-output-row symmetric int8: w[o,k] ~ q[o,k] * scale[o], scale = max|w[o,:]| / 127.
struct Int8Matrix {
  torch::Tensor q;      // [O,K] int8
  torch::Tensor scale;  // [O] float32
};
Int8Matrix quantize_int8(const torch::Tensor& w);
torch::Tensor dequantize_int8(const torch::Tensor& q, const torch::Tensor& scale,
                              torch::ScalarType out = torch::kFloat32);

// y = x W^T, x [...,K] float32, W [O,K] float32 / bfloat16 / int8 (then `scale` [O]); y float32.
torch::Tensor matmul_weight(const torch::Tensor& x, const torch::Tensor& w,
                            const torch::Tensor& scale = torch::Tensor());
// A copy of `t` in 2 MiB-aligned memory advised for transparent huge pages. Streaming gigabytes
// of weights through 4 KiB pages costs a TLB miss every page: decode ran 1.6-2.5x slower from a
// memory-mapped file or plain malloc'd memory (docs/benchmarks.md). Small tensors come back as is.
torch::Tensor in_huge_pages(const torch::Tensor& t);

// Rows `ids` of an embedding table stored like a weight, as float32 [...,K].
torch::Tensor embedding_rows(const torch::Tensor& table, const torch::Tensor& scale,
                             const torch::Tensor& ids);

}  // namespace victor
