// Plain C++ kernels: the reference every vector path is tested against, and the fallback.
#include "attend_impl.h"
#include "isa_kernels.h"

namespace victor::kernels {
namespace {

template <class W, class Load>
void matmul_generic(const float* x, int64_t M, int64_t K, const W* w, const float* scale,
                    int64_t o0, int64_t o1, float* y, int64_t ldy, Load load) {
  for (int64_t o = o0; o < o1; ++o) {
    const W* row = w + o * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += xr[k] * load(row[k]);
      y[m * ldy + o] = scale ? acc * scale[o] : acc;
    }
  }
}

void f32(const float* x, int64_t M, int64_t K, const float* w, int64_t o0, int64_t o1, float* y,
         int64_t ldy) {
  matmul_generic(x, M, K, w, nullptr, o0, o1, y, ldy, [](float v) { return v; });
}
void bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t o0, int64_t o1,
          float* y, int64_t ldy) {
  matmul_generic(x, M, K, w, nullptr, o0, o1, y, ldy, bf16_bits_to_float);
}
void int8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t o0,
          int64_t o1, float* y, int64_t ldy) {
  matmul_generic(x, M, K, w, scale, o0, o1, y, ldy, [](int8_t v) { return float(v); });
}
void dequant(const int8_t* w, const float* scale, int64_t K, int64_t o0, int64_t o1,
             uint16_t* out) {
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t k = 0; k < K; ++k) out[o * K + k] = float_to_bf16_bits(float(w[o * K + k]) * scale[o]);
}

}  // namespace

const KernelSet& scalar_kernels() {
  static const KernelSet set = [] {
    KernelSet s{f32, bf16, int8, dequant};
    s.attend_f32 = attend_f32;
    s.attend_bf16 = attend_bf16;
    s.softmax_bf16 = softmax_bf16;
    return s;
  }();
  return set;
}

}  // namespace victor::kernels
