// AVX-512 BF16 kernels: bf16 weights times bf16 activations with VDPBF16PS. Compiled with the
// AVX-512 flags plus -mavx512bf16; reached only through avx512bf16_kernels() after a CPU check
// (kernels.cpp).
//
// VDPBF16PS multiplies 32 bf16 pairs and adds them to 16 float sums in one instruction, where the
// plain AVX-512 path widens 32 weights to float (a shift and a mask) and needs two dependent FMAs:
// the single-stream decode product ran about 1.25x faster with it (notebook@f64a969). bf16
// activations alone would round x to 8 significant bits; instead each activation is split into
// hi = bf16(x) and lo = bf16(x - hi), and each weight vector is multiplied by both: 16 significant
// bits (x is off by at most 2^-16 of itself, 256 times finer than the weights' own bf16 rounding;
// the products of two bf16 are exact in float and summed in float).
#include <immintrin.h>

#include "isa_kernels.h"

namespace victor::kernels {
namespace {

// No standard headers here: their inline code would be compiled with this file's flags.
constexpr int64_t kPrefetchRows = 8;  // as the other paths: a bf16 row of 2048 is one 4 KiB page
inline int rows_left(int64_t M, int64_t m0) { return M - m0 < 4 ? int(M - m0) : 4; }

inline __m512 widen(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

// x [M,K] float -> out [M, 2, Kp]: row m's hi halves, then its lo halves, zero beyond K.
void prepare(const float* x, int64_t M, int64_t K, uint16_t* out) {
  const int64_t Kp = bf16_hilo_padded(K);
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    uint16_t* hi = out + m * 2 * Kp;
    uint16_t* lo = hi + Kp;
    for (int64_t k = 0; k < Kp; k += 16) {
      const int64_t n = K - k >= 16 ? 16 : (K - k > 0 ? K - k : 0);
      const __mmask16 mask = __mmask16(n == 16 ? 0xffffu : (1u << n) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(mask, xr + k);
      const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
      const __m512 hf = widen(h);
      // x - hi is exact in float; where hi is infinite or NaN the rest is 0 (inf - inf is no value).
      const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(hf), inf, _CMP_LT_OQ);
      const __m256i l = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_sub_ps(finite, v, hf)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + k), h);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + k), l);
    }
  }
}

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// RW weight rows against MX input rows (RW * MX <= 8: 16 sums in registers). hi and lo products
// go to separate sums, so consecutive VDPBF16PS do not wait on each other's result (one row alone
// would otherwise be bound by their latency), and every output is the same sum in the same order
// whatever tile computed it: a product grouped with others equals the product alone.
template <int RW, int MX>
inline void tile(const uint16_t* xhl, int64_t K, int64_t Kp, const uint16_t* w, int64_t o, float* y,
                 int64_t ldy) {
  static_assert(RW * MX <= 8, "16 sums at most");
  __m512 ah[RW][MX], al[RW][MX];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) ah[r][m] = al[r][m] = _mm512_setzero_ps();
  const uint16_t* rows[RW];
  for (int r = 0; r < RW; ++r) rows[r] = w + (o + r) * K;
  const int64_t ahead = kPrefetchRows * K;
  auto step = [&](const __m512bh (&wv)[RW], int64_t k) {
    for (int m = 0; m < MX; ++m) {
      const __m512bh xh = as_bh(_mm512_loadu_si512(xhl + m * 2 * Kp + k));
      const __m512bh xl = as_bh(_mm512_loadu_si512(xhl + m * 2 * Kp + Kp + k));
      for (int r = 0; r < RW; ++r) {
        ah[r][m] = _mm512_dpbf16_ps(ah[r][m], wv[r], xh);
        al[r][m] = _mm512_dpbf16_ps(al[r][m], wv[r], xl);
      }
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[RW];
    for (int r = 0; r < RW; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + ahead + k), _MM_HINT_T1);
      wv[r] = as_bh(_mm512_loadu_si512(rows[r] + k));
    }
    step(wv, k);
  }
  if (k < K) {  // the activations are zero-padded to Kp; the weights are read masked
    const __mmask32 mask = __mmask32((1u << (K - k)) - 1);
    __m512bh wv[RW];
    for (int r = 0; r < RW; ++r) wv[r] = as_bh(_mm512_maskz_loadu_epi16(mask, rows[r] + k));
    step(wv, k);
  }
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) y[m * ldy + o + r] = _mm512_reduce_add_ps(_mm512_add_ps(ah[r][m], al[r][m]));
}

inline void one_row(int mx, const uint16_t* xhl, int64_t K, int64_t Kp, const uint16_t* w, int64_t o,
                    float* y, int64_t ldy) {
  switch (mx) {
    case 1: tile<1, 1>(xhl, K, Kp, w, o, y, ldy); break;
    case 2: tile<1, 2>(xhl, K, Kp, w, o, y, ldy); break;
    case 3: tile<1, 3>(xhl, K, Kp, w, o, y, ldy); break;
    default: tile<1, 4>(xhl, K, Kp, w, o, y, ldy); break;
  }
}

void bf16_hilo(const uint16_t* xhl, int64_t M, int64_t K, const uint16_t* w, int64_t o0, int64_t o1,
               float* y, int64_t ldy) {
  const int64_t Kp = bf16_hilo_padded(K);
  // As the plain AVX-512 path: one weight row at a time (one stream through memory) below 4 input
  // rows; from 4, tiles of 4 weight rows against 2 input rows at a time reuse each weight vector
  // from L1.
  int64_t o = o0;
  for (; o + 4 <= o1 && M >= 4; o += 4)
    for (int64_t m0 = 0; m0 < M; m0 += 2) {
      const uint16_t* xm = xhl + m0 * 2 * Kp;
      if (M - m0 >= 2)
        tile<4, 2>(xm, K, Kp, w, o, y + m0 * ldy, ldy);
      else
        tile<4, 1>(xm, K, Kp, w, o, y + m0 * ldy, ldy);
    }
  for (; o < o1; ++o)
    for (int64_t m0 = 0; m0 < M; m0 += 4)
      one_row(rows_left(M, m0), xhl + m0 * 2 * Kp, K, Kp, w, o, y + m0 * ldy, ldy);
}

}  // namespace

const KernelSet& avx512bf16_kernels() {
  static const KernelSet set = [] {
    KernelSet s = avx512_kernels();
    s.prepare_bf16_hilo = prepare;
    s.matmul_bf16_hilo = bf16_hilo;
    return s;
  }();
  return set;
}

}  // namespace victor::kernels
