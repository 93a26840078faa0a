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

float abs_f(float v) { return v < 0 ? -v : v; }

void quantize_q8_32(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, float* xc) {
  const int64_t G = int4_groups(K), Kp = int4_padded(K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * kInt4GroupK, n = K - k0 < kInt4GroupK ? K - k0 : kInt4GroupK;
      const float* xs = x + m * K + k0;
      float amax = 0.f;
      for (int64_t i = 0; i < n; ++i) amax = abs_f(xs[i]) > amax ? abs_f(xs[i]) : amax;
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      int8_t* q = xq + m * Kp;
      for (int64_t i = 0; i < kInt4GroupK; ++i) {
        const int v = i < n ? int(__builtin_rintf(xs[i] * id)) : 0;
        q[xq_pos(G, g, i)] = int8_t(v);
        sum += v;
      }
      xd[m * G + g] = d;
      xc[m * G + g] = 8.f * d * float(sum);
    }
}

void matmul_int4(const int8_t* xq, const float* xd, const float* xc, int64_t M, int64_t K, const uint8_t* w,
                 int64_t il, const uint16_t* scale, int64_t o0, int64_t o1, float* y, int64_t ldy) {
  const int64_t G = int4_groups(K), Kp = int4_padded(K);
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f, corr = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* b = int4_group(w, K, il, o, g);
        const int8_t* q = xq + m * Kp;
        int dot = 0;
        for (int64_t j = 0; j < kInt4GroupK / 2; ++j)
          dot += (b[j] & 15) * q[xq_pos(G, g, j)] + (b[j] >> 4) * q[xq_pos(G, g, j + 16)];
        const float s = half_bits_to_float(scale[o * G + g]);
        acc += s * xd[m * G + g] * float(dot);
        corr += s * xc[m * G + g];
      }
      y[m * ldy + o] = acc - corr;
    }
}

void dequant_int4_f32(const uint8_t* w, int64_t il, const uint16_t* scale, int64_t K, int64_t o0, int64_t o1,
                      float* out) {
  const int64_t G = int4_groups(K);
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = k / kInt4GroupK, j = k % kInt4GroupK;
      const uint8_t b = int4_group(w, K, il, o, g)[j % 16];
      const int n = j < 16 ? (b & 15) : (b >> 4);
      out[(o - o0) * K + k] = float(n - 8) * half_bits_to_float(scale[o * G + g]);
    }
}

}  // namespace

const KernelSet& scalar_kernels() {
  static const KernelSet set = [] {
    KernelSet s{f32, bf16, int8, dequant};
    s.attend_f32 = attend_f32;
    s.attend_bf16 = attend_bf16;
    s.softmax_bf16 = softmax_bf16;
    s.quantize_q8_32 = quantize_q8_32;
    s.matmul_int4 = matmul_int4;
    s.dequant_int4_f32 = dequant_int4_f32;
    return s;
  }();
  return set;
}

}  // namespace victor::kernels
