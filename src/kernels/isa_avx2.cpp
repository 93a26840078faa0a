// AVX2 + FMA kernels (8 floats a vector, 16 registers). Compiled with -mavx2 -mfma; reached only
// through avx2_kernels() after a CPU check (kernels.cpp). No standard headers: their inline code
// would be compiled with this file's flags.
#include <immintrin.h>

#include "attend_impl.h"
#include "isa_kernels.h"

namespace victor::kernels {
namespace {

inline int rows_left(int64_t M, int64_t m0) { return M - m0 < 2 ? int(M - m0) : 2; }

struct F32Load {
  using T = float;
  static __m256 full(const float* p) { return _mm256_loadu_ps(p); }
  static float one(float v) { return v; }
};
struct Bf16Load {
  using T = uint16_t;
  static __m256 full(const uint16_t* p) {
    const __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r), 16));
  }
  static float one(uint16_t v) { return bf16_bits_to_float(v); }
};
struct Int8Load {
  using T = int8_t;
  static __m256 full(const int8_t* p) {
    const __m128i r = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(r));
  }
  static float one(int8_t v) { return float(v); }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// RW weight rows against MX input rows (RW*MX <= 8 accumulators of the 16 registers).
template <int RW, int MX, class L>
inline void tile(const float* x, int64_t K, const typename L::T* w, const float* scale, int64_t o,
                 float* y, int64_t ldy) {
  __m256 acc[RW][MX];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm256_setzero_ps();
  const typename L::T* rows[RW];
  for (int r = 0; r < RW; ++r) rows[r] = w + (o + r) * K;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[RW];
    for (int r = 0; r < RW; ++r) wv[r] = L::full(rows[r] + k);
    for (int m = 0; m < MX; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < RW; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) {
      float s = hsum(acc[r][m]);
      for (int64_t t = k; t < K; ++t) s += x[m * K + t] * L::one(rows[r][t]);
      y[m * ldy + o + r] = scale ? s * scale[o + r] : s;
    }
}

template <int RW, class L>
inline void tile_rows(int mx, const float* x, int64_t K, const typename L::T* w,
                      const float* scale, int64_t o, float* y, int64_t ldy) {
  if (mx == 1) tile<RW, 1, L>(x, K, w, scale, o, y, ldy);
  else tile<RW, 2, L>(x, K, w, scale, o, y, ldy);
}

template <class L>
void matmul(const float* x, int64_t M, int64_t K, const typename L::T* w, const float* scale,
            int64_t o0, int64_t o1, float* y, int64_t ldy) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4)
    for (int64_t m0 = 0; m0 < M; m0 += 2)
      tile_rows<4, L>(rows_left(M, m0), x + m0 * K, K, w, scale, o, y + m0 * ldy, ldy);
  for (; o < o1; ++o)
    for (int64_t m0 = 0; m0 < M; m0 += 2)
      tile_rows<1, L>(rows_left(M, m0), x + m0 * K, K, w, scale, o, y + m0 * ldy, ldy);
}

void f32(const float* x, int64_t M, int64_t K, const float* w, int64_t o0, int64_t o1, float* y,
         int64_t ldy) {
  matmul<F32Load>(x, M, K, w, nullptr, o0, o1, y, ldy);
}
void bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t o0, int64_t o1,
          float* y, int64_t ldy) {
  matmul<Bf16Load>(x, M, K, w, nullptr, o0, o1, y, ldy);
}
void int8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t o0,
          int64_t o1, float* y, int64_t ldy) {
  matmul<Int8Load>(x, M, K, w, scale, o0, o1, y, ldy);
}

inline __m128i to_bf16(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  // Pack 8 x u32 (each < 65536) to 8 x u16.
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

void dequant(const int8_t* w, const float* scale, int64_t K, int64_t o0, int64_t o1,
             uint16_t* out) {
  for (int64_t o = o0; o < o1; ++o) {
    const __m256 s = _mm256_set1_ps(scale[o]);
    const int8_t* src = w + o * K;
    uint16_t* dst = out + o * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), to_bf16(_mm256_mul_ps(Int8Load::full(src + k), s)));
    for (; k < K; ++k) dst[k] = float_to_bf16_bits(float(src[k]) * scale[o]);
  }
}

}  // namespace

const KernelSet& avx2_kernels() {
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
