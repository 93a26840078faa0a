// AVX-512 VNNI kernels: int8 weights times int8 activations. Compiled with the AVX-512 flags plus
// -mavx512vnni; reached only through avx512vnni_kernels() after a CPU check (kernels.cpp).
//
// The activations of a skinny product are quantized once per call (quantize_q8), in blocks of
// kQ8BlockK = 256 along K with one float scale per block (as llama.cpp's Q8_K: d = max|x| / 127,
// q = round(x / d)), stored as signed bytes. VPDPBUSD multiplies unsigned by signed bytes, so the
// weights' sign bits are flipped as they are loaded (u = w + 128, one XOR per 64 weights, shared by
// every input row): sum u*q = sum w*q + 128 * sum q. The error term 128 * sum q belongs to the input
// row alone, so quantize_q8 stores it per block (e = 128 * d * sum q) and a tile subtracts the sum
// of its blocks' e once per output, after the loop. A block's integers become float once and are
// scaled by its d: per 256 weights and input row four VPDPBUSD, a convert and an FMA.

#include <immintrin.h>

#include "isa_kernels.h"

namespace victor::kernels {
namespace {

// No standard headers here: their inline code would be compiled with this file's flags.
constexpr int64_t kPrefetchRows = 8;
// Tiles of 4 weight rows x 3 input rows, walked chunk by chunk: 12 independent integer sums in
// flight and 12 float accumulators, 29 vector registers (2 x 8 with the weights held for the whole
// block, 2 x 6 and 3 x 4 measured slower; docs/notebook.md item 17).
constexpr int kQ8Rows = 4;  // weight rows per tile
constexpr int kChunks = int(kQ8BlockK / 64);  // 64-byte chunks per block
constexpr int kQ8Inputs = 3;  // input rows per tile
// K is walked in panels of this many blocks (4096 values), each over all of a call's weight rows,
// so a tile's 3 activation rows of a panel (12 KB) stay in L1 while the weights stream past; each
// panel's sums are added to y. K = 11008 (the 7B down projection) ran 1.06x faster in panels of 4096
// than whole, 2048 and 1024 slower (docs/notebook.md item 17).
constexpr int64_t kPanelBlocks = 4096 / kQ8BlockK;
inline int rows_left(int64_t M, int64_t m0) { return M - m0 < kQ8Inputs ? int(M - m0) : kQ8Inputs; }

// x [M,K] float -> xq [M,Kp] (q as signed bytes; 0 beyond K) and xs [M, 2 q8_blocks(K)]: each row's
// block scales d, then its blocks' error terms e = 128 * d * sum q.
void quantize(const float* x, int64_t M, int64_t K, uint8_t* xq, float* xs) {
  const int64_t Kp = q8_padded(K), nb = q8_blocks(K), ns = q8_scales(K);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    uint8_t* q = xq + m * Kp;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * kQ8BlockK, k1 = K - k0 < kQ8BlockK ? K : k0 + kQ8BlockK;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t k = k0; k < k1; k += 16) {
        const __mmask16 mk = __mmask16(k1 - k >= 16 ? 0xffffu : (1u << (k1 - k)) - 1);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, xr + k)));
      }
      const float d = _mm512_reduce_max_ps(amax) / 127.0f;
      const float id = d > 0 ? 1.0f / d : 0.0f;
      const __m512 vid = _mm512_set1_ps(id);
      __m512i qsum = _mm512_setzero_si512();
      for (int64_t k = k0; k < k0 + kQ8BlockK && k < Kp; k += 64) {
        __m128i part[4];
        for (int g = 0; g < 4; ++g) {
          const int64_t kg = k + 16 * g;
          const __mmask16 mk = __mmask16(k1 - kg >= 16 ? 0xffffu : (k1 > kg ? (1u << (k1 - kg)) - 1 : 0u));
          const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + kg), vid));
          qsum = _mm512_add_epi32(qsum, qi);
          part[g] = _mm512_cvtsepi32_epi8(qi);
        }
        __m512i v = _mm512_castsi128_si512(part[0]);
        v = _mm512_inserti32x4(v, part[1], 1);
        v = _mm512_inserti32x4(v, part[2], 2);
        v = _mm512_inserti32x4(v, part[3], 3);
        _mm512_storeu_si512(q + k, v);
      }
      xs[m * ns + b] = d;
      xs[m * ns + nb + b] = 128.0f * d * float(_mm512_reduce_add_epi32(qsum));
    }
  }
}

// RW weight rows against MX input rows over block b of K. FULL: every chunk of the block lies
// inside K (plain loads); otherwise the weights are masked at K (read as zero, so u = 128, against
// q = 0 beyond K: nothing added).
template <int RW, int MX, bool FULL>
inline void block(const uint8_t* const* xr, const float* const* xs, int64_t b, const int8_t* const* rows,
                  int64_t k0, int64_t K, __m512 (&acc)[RW][MX]) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  int nck = kChunks;
  if (!FULL) nck = int((K - k0 + 63) / 64);
  __m512i s[RW][MX];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) s[r][m] = _mm512_setzero_si512();
  for (int ch = 0; ch < kChunks; ++ch) {
    if (!FULL && ch >= nck) break;
    const int64_t k = k0 + 64 * ch;
    __m512i wv[RW];
    for (int r = 0; r < RW; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + kPrefetchRows * K + k), _MM_HINT_T1);
      if (FULL) {
        wv[r] = _mm512_xor_si512(_mm512_loadu_si512(rows[r] + k), flip);
      } else {
        const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
        wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, rows[r] + k), flip);
      }
    }
    for (int m = 0; m < MX; ++m) {
      const __m512i xv = _mm512_loadu_si512(xr[m] + k);
      for (int r = 0; r < RW; ++r) s[r][m] = _mm512_dpbusd_epi32(s[r][m], wv[r], xv);
    }
  }
  for (int m = 0; m < MX; ++m) {
    const __m512 d = _mm512_set1_ps(xs[m][b]);
    for (int r = 0; r < RW; ++r) acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][m]), d, acc[r][m]);
  }
}

// RW weight rows from o against MX input rows over the blocks [b0, b1) of K: y = the sums for the
// first panel (b0 = 0), y += for the others.
template <int RW, int MX>
inline void tile(const uint8_t* xq, const float* xs, int64_t K, int64_t Kp, const int8_t* w, const float* scale,
                 int64_t o, float* y, int64_t ldy, int64_t b0, int64_t b1) {
  const int64_t nb = q8_blocks(K);
  __m512 acc[RW][MX];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm512_setzero_ps();
  const int8_t* rows[RW];
  for (int r = 0; r < RW; ++r) rows[r] = w + (o + r) * K;
  const uint8_t* xr[MX];
  const float* xsr[MX];
  float corr[MX];
  for (int m = 0; m < MX; ++m) {
    xr[m] = xq + m * Kp;
    xsr[m] = xs + m * q8_scales(K);
    float c = 0;
    for (int64_t b = b0; b < b1; ++b) c += xsr[m][nb + b];
    corr[m] = c;
  }
  const int64_t full = K / kQ8BlockK < b1 ? K / kQ8BlockK : b1;
  for (int64_t b = b0; b < full; ++b) block<RW, MX, true>(xr, xsr, b, rows, b * kQ8BlockK, K, acc);
  if (full < b1) block<RW, MX, false>(xr, xsr, full, rows, full * kQ8BlockK, K, acc);
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) {
      const float v = (_mm512_reduce_add_ps(acc[r][m]) - corr[m]) * scale[o + r];
      float& out = y[m * ldy + o + r];
      out = b0 == 0 ? v : out + v;
    }
}

// mx (1..MX) input rows: the tile instantiated for exactly that many.
template <int RW, int MX>
inline void tile_rows(int mx, const uint8_t* xq, const float* xs, int64_t K, int64_t Kp, const int8_t* w,
                      const float* scale, int64_t o, float* y, int64_t ldy, int64_t b0, int64_t b1) {
  if constexpr (MX > 1) {
    if (mx < MX) return tile_rows<RW, MX - 1>(mx, xq, xs, K, Kp, w, scale, o, y, ldy, b0, b1);
  }
  tile<RW, MX>(xq, xs, K, Kp, w, scale, o, y, ldy, b0, b1);
}

void int8_q8(const uint8_t* xq, const float* xs, int64_t M, int64_t K, const int8_t* w, const float* scale,
             int64_t o0, int64_t o1, float* y, int64_t ldy) {
  const int64_t Kp = q8_padded(K), nb = q8_blocks(K), ns = q8_scales(K);
  for (int64_t b0 = 0; b0 < nb; b0 += kPanelBlocks) {
    const int64_t b1 = b0 + kPanelBlocks < nb ? b0 + kPanelBlocks : nb;
    int64_t o = o0;
    for (; o + kQ8Rows <= o1; o += kQ8Rows)
      for (int64_t m0 = 0; m0 < M; m0 += kQ8Inputs)
        tile_rows<kQ8Rows, kQ8Inputs>(rows_left(M, m0), xq + m0 * Kp, xs + m0 * ns, K, Kp, w, scale, o, y + m0 * ldy, ldy, b0, b1);
    for (; o < o1; ++o)
      for (int64_t m0 = 0; m0 < M; m0 += kQ8Inputs)
        tile_rows<1, kQ8Inputs>(rows_left(M, m0), xq + m0 * Kp, xs + m0 * ns, K, Kp, w, scale, o, y + m0 * ldy, ldy, b0, b1);
  }
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
