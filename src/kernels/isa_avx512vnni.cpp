// AVX-512 VNNI kernels: int8 weights times int8 activations. Compiled with the AVX-512 flags plus
// -mavx512vnni; reached only through avx512vnni_kernels() after a CPU check (kernels.cpp).
//
// The activations of a skinny product are quantized once per call (quantize_q8), in blocks of 32
// along K with one float scale per block (as llama.cpp's Q8_0: d = max|x| / 127, q = round(x / d)).
// Each 64 weights of a row then cost one VPDPBUSD per input row instead of widening 64 weights to
// float and four FMAs: the two blocks' integer dot products land in lanes 0-7 and 8-15, become
// float once, and are scaled by their blocks' d (a vector of 8 + 8 copies prepared with the
// activations). VPDPBUSD multiplies unsigned by signed bytes, so the weight enters as |w| and the
// activation takes w's sign (exact: |w| <= 127, |q| <= 127).
#include <immintrin.h>

#include "isa_kernels.h"

namespace victor::kernels {
namespace {

// No standard headers here: their inline code would be compiled with this file's flags.
constexpr int64_t kPrefetchRows = 8;
inline int rows_left(int64_t M, int64_t m0) { return M - m0 < 4 ? int(M - m0) : 4; }

// x [M,K] float -> xq [M,Kp] int8 (zero beyond K) and xs [M,Kp/4] float: for each 64-wide chunk
// c of a row, 16 floats, the first 8 block 2c's scale d and the last 8 block 2c+1's.
void quantize(const float* x, int64_t M, int64_t K, int8_t* xq, float* xs) {
  const int64_t Kp = q8_padded(K);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* q = xq + m * Kp;
    float* s = xs + m * (Kp / 4);
    for (int64_t b = 0; b < Kp / 32; ++b) {
      const int64_t k0 = b * 32;
      const int64_t n = K - k0 >= 32 ? 32 : (K - k0 > 0 ? K - k0 : 0);
      const __mmask16 m0 = __mmask16(n >= 16 ? 0xffffu : (1u << n) - 1);
      const __mmask16 m1 = __mmask16(n >= 32 ? 0xffffu : (n > 16 ? (1u << (n - 16)) - 1 : 0u));
      const __m512 v0 = _mm512_maskz_loadu_ps(m0, xr + k0);
      const __m512 v1 = _mm512_maskz_loadu_ps(m1, xr + k0 + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = amax / 127.0f;
      const float id = d > 0 ? 1.0f / d : 0.0f;
      const __m512 vid = _mm512_set1_ps(id);
      // Round to nearest even (the default rounding mode), saturate to int8.
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, vid))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0 + 16),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, vid))));
      for (int i = 0; i < 8; ++i) s[(b / 2) * 16 + (b % 2) * 8 + i] = d;
    }
  }
}

template <int RW, int MX>
inline void tile(const int8_t* xq, const float* xs, int64_t K, int64_t Kp, const int8_t* w,
                 const float* scale, int64_t o, float* y, int64_t ldy) {
  __m512 acc[RW][MX];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm512_setzero_ps();
  const int8_t* rows[RW];
  for (int r = 0; r < RW; ++r) rows[r] = w + (o + r) * K;
  const int64_t ahead = kPrefetchRows * K;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
    __m512i aw[RW];
    __mmask64 neg[RW];
    for (int r = 0; r < RW; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + ahead + k), _MM_HINT_T1);
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, rows[r] + k);
      aw[r] = _mm512_abs_epi8(wv);
      neg[r] = _mm512_movepi8_mask(wv);
    }
    for (int m = 0; m < MX; ++m) {
      const __m512i xv = _mm512_loadu_si512(xq + m * Kp + k);
      const __m512 sv = _mm512_loadu_ps(xs + m * (Kp / 4) + k / 4);
      for (int r = 0; r < RW; ++r) {
        const __m512i sx = _mm512_mask_sub_epi8(xv, neg[r], zero, xv);  // x carries w's sign
        const __m512i dp = _mm512_dpbusd_epi32(zero, aw[r], sx);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), sv, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) y[m * ldy + o + r] = _mm512_reduce_add_ps(acc[r][m]) * scale[o + r];
}

template <int RW>
inline void tile_rows(int mx, const int8_t* xq, const float* xs, int64_t K, int64_t Kp, const int8_t* w,
                      const float* scale, int64_t o, float* y, int64_t ldy) {
  switch (mx) {
    case 1: tile<RW, 1>(xq, xs, K, Kp, w, scale, o, y, ldy); break;
    case 2: tile<RW, 2>(xq, xs, K, Kp, w, scale, o, y, ldy); break;
    case 3: tile<RW, 3>(xq, xs, K, Kp, w, scale, o, y, ldy); break;
    default: tile<RW, 4>(xq, xs, K, Kp, w, scale, o, y, ldy); break;
  }
}

void int8_q8(const int8_t* xq, const float* xs, int64_t M, int64_t K, const int8_t* w, const float* scale,
             int64_t o0, int64_t o1, float* y, int64_t ldy) {
  const int64_t Kp = q8_padded(K);
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4)
    for (int64_t m0 = 0; m0 < M; m0 += 4)
      tile_rows<4>(rows_left(M, m0), xq + m0 * Kp, xs + m0 * (Kp / 4), K, Kp, w, scale, o, y + m0 * ldy, ldy);
  for (; o < o1; ++o)
    for (int64_t m0 = 0; m0 < M; m0 += 4)
      tile_rows<1>(rows_left(M, m0), xq + m0 * Kp, xs + m0 * (Kp / 4), K, Kp, w, scale, o, y + m0 * ldy, ldy);
}

}  // namespace

const KernelSet& avx512vnni_kernels() {
  static const KernelSet set = [] {
    KernelSet s = avx512_kernels();
    s.quantize_q8 = quantize;
    s.matmul_int8_q8 = int8_q8;
    return s;
  }();
  return set;
}

}  // namespace victor::kernels
