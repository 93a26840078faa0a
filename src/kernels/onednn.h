// Batched bf16 matrix products with float32 outputs through oneDNN's matmul primitive (Debian's
// libdnnl, the same library LibTorch's bf16 GEMM runs on; LibTorch 1.13 can only return bf16
// from bf16 inputs, which would round attention scores to 8 significant bits).
#pragma once
#include <cstdint>
#include <vector>

namespace victor::onednn {

// A strided view: element (i0, i1, ...) at data + sum_k i_k * strides[k] (elements, not bytes).
struct View {
  std::vector<int64_t> dims, strides;
};

// True when oneDNN has an optimized bf16 matmul for this CPU (AVX-512 core or later). Elsewhere it
// would run its reference code, far slower than LibTorch's own path: checked once by creating a
// small primitive and reading which implementation it chose.
bool bf16_fast();

// An elementwise function applied to the float32 result inside the product (a oneDNN post-op).
enum class Act { None, QuickGelu, Gelu, GeluTanh, Silu, Relu };

// c = act(alpha * a b + bias) over the leading (batch) dims: a [..., M, K] and b [..., K, N] bf16
// bits, c [..., M, N] float32, bias (optional) N floats. b's batch dims may be 1 where a's are not
// (broadcast). Primitives are cached by shape; calls are serialized (one product already uses
// every thread).
void matmul_bf16_f32(const View& a, const uint16_t* ad, const View& b, const uint16_t* bd,
                     const View& c, float* cd, float alpha, const float* bias = nullptr,
                     Act act = Act::None);

}  // namespace victor::onednn
