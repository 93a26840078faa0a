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

#include <algorithm>
#include <cstring>

#include "isa_kernels.h"

namespace victor::kernels {
namespace {

// No standard headers here: their inline code would be compiled with this file's flags.
constexpr int64_t kPrefetchRows = 8;
// Tiles of 4 weight rows x 3 input rows, walked chunk by chunk: 12 independent integer sums in
// flight and 12 float accumulators, 29 vector registers (2 x 8 with the weights held for the whole
// block, 2 x 6 and 3 x 4 measured slower; notebook@f64a969 item 17).
constexpr int kQ8Rows = 4;  // weight rows per tile
constexpr int kChunks = int(kQ8BlockK / 64);  // 64-byte chunks per block
constexpr int kQ8Inputs = 3;  // input rows per tile
// K is walked in panels of this many blocks (4096 values), each over all of a call's weight rows,
// so a tile's 3 activation rows of a panel (12 KB) stay in L1 while the weights stream past; each
// panel's sums are added to y. K = 11008 (the 7B down projection) ran 1.06x faster in panels of 4096
// than whole, 2048 and 1024 slower (notebook@f64a969 item 17).
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

// --- int4 weights (isa_kernels.h's layout) against 32-block int8 activations (quantize_q8_32) ---
// The stored nibbles (0..15) are exactly VPDPBUSD's unsigned operand and the activations its
// signed one. One 64-byte vector holds a pair of groups of two weight rows a and b (32 bytes each);
// its low nibbles meet the pair's activations [g0 0..15][g1 0..15] (the same 32 bytes in both
// halves), its high nibbles [g0 16..31][g1 16..31]. Two VPDPBUSD leave row a's group 2p in lanes
// 0-3 and 2p+1 in 4-7, row b's in 8-11 and 12-15, exact integers; one convert and one FMA by the
// lanes' weight scale times activation scale. Per 128 weights and activation row: 2 VPDPBUSD, a
// convert and an FMA, where AVX2 spends 2 VPMADDUBSW, an add, a VPMADDWD, a convert and an FMA per
// 64. The nibbles' +8 offset comes off at the end: sum_g scale[o,g] * xc[m,g]. Each row's lanes
// and its final sum are computed alike in either half: a row's result does not depend on its
// partner, so the file layout and the 4-row tiles give the same bits.
constexpr int kI4Inputs = 4;  // activation rows per tile (2 x 4 accumulators, 2 x 4 activation vectors)
constexpr int64_t kI4Ahead = 1024;  // bytes of each weight stream prefetched ahead

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum_g half(s[g]) * c[g] over G groups.
inline float scale_dot(const uint16_t* s, const float* c, int64_t G) {
  __m512 a = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= G; g += 16)
    a = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + g))),
                        _mm512_loadu_ps(c + g), a);
  float r = _mm512_reduce_add_ps(a);
  for (; g < G; ++g) r += half_to_float(s[g]) * c[g];
  return r;
}

inline __m512i join(const uint8_t* a, const uint8_t* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}

inline __m512i broadcast32(const int8_t* p) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m256i nibbles_in_order(const uint8_t* p) {  // one group's 32 values
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low = _mm_set1_epi8(0x0f);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(b, low)),
                                 _mm_and_si128(_mm_srli_epi16(b, 4), low), 1);
}

// Weight rows o .. o + n - 1 (n <= 2 RP) in RP pairs, times MX activation rows. `Joined`: each
// pair's bytes lie side by side (the 4-row tiles, the pair starting at an even row): one load.
// A pair with one row (n odd) pairs the row with itself and writes it once.
template <int RP, int MX, bool Joined>
void tile_int4(const int8_t* xq, const float* xd, const float* xc, int64_t Kp, int64_t G, const uint8_t* w,
               int64_t K, int64_t il, const uint16_t* scale, int64_t o, int64_t n, float* y, int64_t ldy) {
  const int64_t ps = il == 1 ? kInt4GroupK : 4 * kInt4GroupK;  // bytes from a row's pair of groups to its next
  const uint8_t *pa[RP], *pb[RP];
  const uint16_t *sa[RP], *sb[RP];
  int64_t ra[RP], rb[RP];
  for (int i = 0; i < RP; ++i) {
    ra[i] = o + 2 * i;
    rb[i] = 2 * i + 1 < n ? ra[i] + 1 : ra[i];
    pa[i] = int4_group(w, K, il, ra[i], 0);
    pb[i] = int4_group(w, K, il, rb[i], 0);
    sa[i] = scale + ra[i] * G;
    sb[i] = scale + rb[i] * G;
  }
  __m512 acc[RP][MX];
  for (int i = 0; i < RP; ++i)
    for (int m = 0; m < MX; ++m) acc[i][m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0f);
  auto pair = [&](int64_t pp, const __m512* sd) {
    __m512i xa[MX], xb[MX];
    for (int m = 0; m < MX; ++m) {
      xa[m] = broadcast32(xq + m * Kp + pp * 64);
      xb[m] = broadcast32(xq + m * Kp + pp * 64 + 32);
    }
    for (int i = 0; i < RP; ++i) {
      const uint8_t* a = pa[i] + pp * ps;
      _mm_prefetch(reinterpret_cast<const char*>(a) + kI4Ahead, _MM_HINT_T0);
      if (!Joined) _mm_prefetch(reinterpret_cast<const char*>(pb[i] + pp * ps) + kI4Ahead, _MM_HINT_T0);
      const __m512i b = Joined ? _mm512_loadu_si512(a) : join(a, pb[i] + pp * ps);
      const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
      for (int m = 0; m < MX; ++m) {
        const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xa[m]), hi, xb[m]);
        acc[i][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sd[i * MX + m], acc[i][m]);
      }
    }
  };
  const int64_t pairs = G / 2, blocks = pairs / 4;
  for (int64_t bk = 0; bk < blocks; ++bk) {  // 8 groups: their scale products once
    const int64_t g8 = bk * 8;
    __m512 s16[RP * MX];
    for (int i = 0; i < RP; ++i) {
      const __m512 ws = _mm512_cvtph_ps(
          _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sa[i] + g8))),
                                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(sb[i] + g8)), 1));
      for (int m = 0; m < MX; ++m)
        s16[i * MX + m] =
            _mm512_mul_ps(ws, _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(xd + m * G + g8)))));
    }
    for (int k = 0; k < 4; ++k) {
      const __m512i idx = _mm512_setr_epi32(2 * k, 2 * k, 2 * k, 2 * k, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1,
                                            8 + 2 * k, 8 + 2 * k, 8 + 2 * k, 8 + 2 * k, 9 + 2 * k, 9 + 2 * k, 9 + 2 * k,
                                            9 + 2 * k);
      __m512 sd[RP * MX];
      for (int j = 0; j < RP * MX; ++j) sd[j] = _mm512_permutexvar_ps(idx, s16[j]);
      pair(bk * 4 + k, sd);
    }
  }
  for (int64_t pp = blocks * 4; pp < pairs; ++pp) {  // the last pairs, scales from scalars
    __m512 sd[RP * MX];
    for (int i = 0; i < RP; ++i)
      for (int m = 0; m < MX; ++m) {
        const float x0 = xd[m * G + 2 * pp], x1 = xd[m * G + 2 * pp + 1];
        const float a0 = half_to_float(sa[i][2 * pp]) * x0, a1 = half_to_float(sa[i][2 * pp + 1]) * x1;
        const float b0 = half_to_float(sb[i][2 * pp]) * x0, b1 = half_to_float(sb[i][2 * pp + 1]) * x1;
        sd[i * MX + m] = _mm512_setr_ps(a0, a0, a0, a0, a1, a1, a1, a1, b0, b0, b0, b0, b1, b1, b1, b1);
      }
    pair(pp, sd);
  }
  if (G % 2) {  // an odd last group (the file layout only), its activations in order
    const int64_t g = G - 1;
    for (int i = 0; i < RP; ++i) {
      const __m512i nv = _mm512_inserti64x4(_mm512_castsi256_si512(nibbles_in_order(int4_group(w, K, il, ra[i], g))),
                                            nibbles_in_order(int4_group(w, K, il, rb[i], g)), 1);
      for (int m = 0; m < MX; ++m) {
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), nv, broadcast32(xq + m * Kp + g * kInt4GroupK));
        const float x0 = xd[m * G + g];
        const __m512 sd = _mm512_castps256_ps512(_mm256_set1_ps(half_to_float(sa[i][g]) * x0));
        acc[i][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p),
                                    _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(sd), _mm256_castps_pd(_mm256_set1_ps(half_to_float(sb[i][g]) * x0)), 1)), acc[i][m]);
      }
    }
  }
  for (int i = 0; i < RP; ++i)
    for (int m = 0; m < MX; ++m) {
      y[m * ldy + ra[i]] = hsum8(_mm512_castps512_ps256(acc[i][m])) - scale_dot(sa[i], xc + m * G, G);
      if (rb[i] != ra[i])
        y[m * ldy + rb[i]] = hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i][m]), 1))) - scale_dot(sb[i], xc + m * G, G);
    }
}

template <int RP, int MX>
void tile_int4_rows(const int8_t* xq, const float* xd, const float* xc, int64_t Kp, int64_t G, const uint8_t* w,
                    int64_t K, int64_t il, const uint16_t* scale, int64_t o, int64_t n, float* y, int64_t ldy) {
  if (il == 4 && o % 2 == 0 && n % 2 == 0) tile_int4<RP, MX, true>(xq, xd, xc, Kp, G, w, K, il, scale, o, n, y, ldy);
  else tile_int4<RP, MX, false>(xq, xd, xc, Kp, G, w, K, il, scale, o, n, y, ldy);
}

template <int RP>
void tile_int4_inputs(int mx, const int8_t* xq, const float* xd, const float* xc, int64_t Kp, int64_t G,
                      const uint8_t* w, int64_t K, int64_t il, const uint16_t* scale, int64_t o, int64_t n, float* y,
                      int64_t ldy) {
  switch (mx) {
    case 1: tile_int4_rows<RP, 1>(xq, xd, xc, Kp, G, w, K, il, scale, o, n, y, ldy); break;
    case 2: tile_int4_rows<RP, 2>(xq, xd, xc, Kp, G, w, K, il, scale, o, n, y, ldy); break;
    case 3: tile_int4_rows<RP, 3>(xq, xd, xc, Kp, G, w, K, il, scale, o, n, y, ldy); break;
    default: tile_int4_rows<RP, 4>(xq, xd, xc, Kp, G, w, K, il, scale, o, n, y, ldy); break;
  }
}

// --- int4 in 16-row tiles (il = 16, isa_kernels.h) ---
// Per group and activation row: 8 VPDPBUSD (16 rows x 4 values each, the 4 activations broadcast),
// a convert, and (dot * xd - xc) * scale as one FMSUB and one FMA into the row's 16 outputs: the
// +8 offset comes off per group and no lane is ever summed across. The tile's 256 bytes of a group
// are unpacked once for up to 8 activation rows. A row's result depends on neither the other rows
// nor where its tile sits in [o0, o1).
constexpr int kT16Inputs = 8;
constexpr int64_t kT16Ahead = 1024;  // bytes of the tile stream prefetched ahead

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <int MX>
void tile16_int4(const int8_t* xq, const float* xd, const float* xc, int64_t Kp, int64_t G, const uint8_t* t,
                 const uint16_t* st, float* y, int64_t ldy) {
  __m512 acc[MX];
  for (int m = 0; m < MX; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = t + g * 256;
    for (int c = 0; c < 4; ++c) _mm_prefetch(reinterpret_cast<const char*>(p) + kT16Ahead + 64 * c, _MM_HINT_T0);
    __m512i lo[4], hi[4];
    for (int j = 0; j < 4; ++j) {
      const __m512i b = _mm512_loadu_si512(p + 64 * j);
      lo[j] = _mm512_and_si512(b, low);
      hi[j] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
    }
    const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + g * 16)));
    const int64_t pl = xq_pos(G, g, 0), ph = xq_pos(G, g, 16);
    for (int m = 0; m < MX; ++m) {
      const int8_t* xl = xq + m * Kp + pl;
      const int8_t* xh = xq + m * Kp + ph;
      __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[0], bcast4(xl));
      d = _mm512_dpbusd_epi32(d, hi[0], bcast4(xh));
      for (int j = 1; j < 4; ++j) {
        d = _mm512_dpbusd_epi32(d, lo[j], bcast4(xl + 4 * j));
        d = _mm512_dpbusd_epi32(d, hi[j], bcast4(xh + 4 * j));
      }
      const __m512 v = _mm512_fmsub_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(xd[m * G + g]), _mm512_set1_ps(xc[m * G + g]));
      acc[m] = _mm512_fmadd_ps(ws, v, acc[m]);
    }
  }
  for (int m = 0; m < MX; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

void tile16_int4_inputs(int mx, const int8_t* xq, const float* xd, const float* xc, int64_t Kp, int64_t G,
                        const uint8_t* t, const uint16_t* st, float* y, int64_t ldy) {
  switch (mx) {
    case 1: tile16_int4<1>(xq, xd, xc, Kp, G, t, st, y, ldy); break;
    case 2: tile16_int4<2>(xq, xd, xc, Kp, G, t, st, y, ldy); break;
    case 3: tile16_int4<3>(xq, xd, xc, Kp, G, t, st, y, ldy); break;
    case 4: tile16_int4<4>(xq, xd, xc, Kp, G, t, st, y, ldy); break;
    case 5: tile16_int4<5>(xq, xd, xc, Kp, G, t, st, y, ldy); break;
    case 6: tile16_int4<6>(xq, xd, xc, Kp, G, t, st, y, ldy); break;
    case 7: tile16_int4<7>(xq, xd, xc, Kp, G, t, st, y, ldy); break;
    default: tile16_int4<8>(xq, xd, xc, Kp, G, t, st, y, ldy); break;
  }
}

// Rows [o0, o1) of a 16-row-tiled int4 W; a tile only partly inside the range is computed whole
// into a scratch and its rows in range copied.
void int4_tiles16(const int8_t* xq, const float* xd, const float* xc, int64_t M, int64_t K, const uint8_t* w,
                  const uint16_t* scale, int64_t o0, int64_t o1, float* y, int64_t ldy) {
  const int64_t G = int4_groups(K), Kp = int4_padded(K), rb = int4_row_bytes(K);
  for (int64_t ob = o0 / 16; ob * 16 < o1; ++ob) {
    const uint8_t* t = w + ob * 16 * rb;
    const uint16_t* st = scale + ob * 16 * G;
    const int64_t lo = std::max(o0, ob * 16), hi = std::min(o1, ob * 16 + 16);
    for (int64_t m0 = 0; m0 < M; m0 += kT16Inputs) {
      const int mx = M - m0 < kT16Inputs ? int(M - m0) : kT16Inputs;
      const int8_t* xm = xq + m0 * Kp;
      const float *dm = xd + m0 * G, *cm = xc + m0 * G;
      if (hi - lo == 16) {
        tile16_int4_inputs(mx, xm, dm, cm, Kp, G, t, st, y + m0 * ldy + ob * 16, ldy);
      } else {
        alignas(64) float part[kT16Inputs * 16];
        tile16_int4_inputs(mx, xm, dm, cm, Kp, G, t, st, part, 16);
        for (int m = 0; m < mx; ++m)
          for (int64_t o = lo; o < hi; ++o) y[(m0 + m) * ldy + o] = part[m * 16 + (o - ob * 16)];
      }
    }
  }
}

void int4(const int8_t* xq, const float* xd, const float* xc, int64_t M, int64_t K, const uint8_t* w, int64_t il,
          const uint16_t* scale, int64_t o0, int64_t o1, float* y, int64_t ldy) {
  if (il == 16) return int4_tiles16(xq, xd, xc, M, K, w, scale, o0, o1, y, ldy);
  const int64_t G = int4_groups(K), Kp = int4_padded(K);
  for (int64_t o = o0; o < o1; o += 4) {
    const int64_t n = o1 - o < 4 ? o1 - o : 4;
    for (int64_t m0 = 0; m0 < M; m0 += kI4Inputs) {
      const int mx = M - m0 < kI4Inputs ? int(M - m0) : kI4Inputs;
      const int8_t* xm = xq + m0 * Kp;
      const float *dm = xd + m0 * G, *cm = xc + m0 * G;
      float* ym = y + m0 * ldy;
      if (n > 2) tile_int4_inputs<2>(mx, xm, dm, cm, Kp, G, w, K, il, scale, o, n, ym, ldy);
      else tile_int4_inputs<1>(mx, xm, dm, cm, Kp, G, w, K, il, scale, o, n, ym, ldy);
    }
  }
}
}  // namespace

const KernelSet& avx512vnni_kernels() {
  static const KernelSet set = [] {
    KernelSet s = avx512_kernels();
    s.quantize_q8 = quantize;
    s.matmul_int8_q8 = int8_q8;
    s.matmul_int4 = int4;
    s.int4_tiles16 = true;
    return s;
  }();
  return set;
}

}  // namespace victor::kernels
