// AVX-512 (F/BW/VL) kernels. Compiled with -mavx512f -mavx512bw -mavx512vl -mfma; reached only
// through avx512_kernels() after a CPU check (kernels.cpp).
#include <immintrin.h>

#include "attend_impl.h"
#include "isa_kernels.h"

namespace victor::kernels {
namespace {

// No standard headers here: their inline code would be compiled with this file's flags.
inline int rows_left(int64_t M, int64_t m0) { return M - m0 < 4 ? int(M - m0) : 4; }

// A weight row is one or two 4 KiB pages, where hardware prefetchers stop: every load also
// prefetches the same place this many rows further on, so the weights keep streaming from memory.
constexpr int64_t kPrefetchRows = 8;

// Loading 16 weights as floats, whole or the first n of them (masked).
struct F32Load {
  using T = float;
  static __m512 full(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 part(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};
struct Int8Load {
  using T = int8_t;
  static __m512 widen(__m128i r) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(r)); }
  static __m512 full(const int8_t* p) {
    return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m512 part(const int8_t* p, __mmask16 m) { return widen(_mm_maskz_loadu_epi8(m, p)); }
};

// RW weight rows against MX input rows: RW*MX accumulators stay in registers while the weight
// rows stream once.
template <int RW, int MX, class L>
inline void tile(const float* x, int64_t K, const typename L::T* w, const float* scale, int64_t o,
                 float* y, int64_t ldy) {
  __m512 acc[RW][MX];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm512_setzero_ps();
  const typename L::T* rows[RW];
  for (int r = 0; r < RW; ++r) rows[r] = w + (o + r) * K;
  const int64_t ahead = kPrefetchRows * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[RW];
    for (int r = 0; r < RW; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + ahead + k), _MM_HINT_T1);
      wv[r] = L::full(rows[r] + k);
    }
    for (int m = 0; m < MX; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < RW; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  if (k < K) {
    const __mmask16 mask = __mmask16((1u << (K - k)) - 1);
    __m512 wv[RW];
    for (int r = 0; r < RW; ++r) wv[r] = L::part(rows[r] + k, mask);
    for (int m = 0; m < MX; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int r = 0; r < RW; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) {
      const float s = _mm512_reduce_add_ps(acc[r][m]);
      y[m * ldy + o + r] = scale ? s * scale[o + r] : s;
    }
}

template <int RW, class L>
inline void tile_rows(int mx, const float* x, int64_t K, const typename L::T* w,
                      const float* scale, int64_t o, float* y, int64_t ldy) {
  switch (mx) {
    case 1: tile<RW, 1, L>(x, K, w, scale, o, y, ldy); break;
    case 2: tile<RW, 2, L>(x, K, w, scale, o, y, ldy); break;
    case 3: tile<RW, 3, L>(x, K, w, scale, o, y, ldy); break;
    default: tile<RW, 4, L>(x, K, w, scale, o, y, ldy); break;
  }
}

// Output rows in tiles of 4; for each tile, every group of up to 4 input rows reuses the tile's
// weights from L1, so the weights leave memory once whatever M is.
template <class L>
void matmul(const float* x, int64_t M, int64_t K, const typename L::T* w, const float* scale,
            int64_t o0, int64_t o1, float* y, int64_t ldy) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4)
    for (int64_t m0 = 0; m0 < M; m0 += 4)
      tile_rows<4, L>(rows_left(M, m0), x + m0 * K, K, w, scale, o, y + m0 * ldy, ldy);
  for (; o < o1; ++o)
    for (int64_t m0 = 0; m0 < M; m0 += 4)
      tile_rows<1, L>(rows_left(M, m0), x + m0 * K, K, w, scale, o, y + m0 * ldy, ldy);
}

// bf16 weights against pair-split x: 32 weights a load; even elements are the low halves of each
// 32-bit pair (shift left), odd ones the high halves (mask), matched by x's two halves.
template <int RW, int MX>
inline void tile_bf16_pairs(const float* xs, int64_t K, const uint16_t* w, int64_t o, float* y,
                            int64_t ldy) {
  const int64_t half = (K + 1) / 2;
  __m512 acc[RW][MX];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm512_setzero_ps();
  const uint16_t* rows[RW];
  for (int r = 0; r < RW; ++r) rows[r] = w + (o + r) * K;
  const __m512i high = _mm512_set1_epi32(int(0xffff0000u));
  const int64_t ahead = kPrefetchRows * K;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512 lo[RW], hi[RW];
    for (int r = 0; r < RW; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + ahead + k), _MM_HINT_T1);
      const __m512i v = _mm512_loadu_si512(rows[r] + k);
      lo[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      hi[r] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
    }
    const int64_t j = k / 2;
    for (int m = 0; m < MX; ++m) {
      const __m512 xe = _mm512_loadu_ps(xs + m * 2 * half + j);
      const __m512 xo = _mm512_loadu_ps(xs + m * 2 * half + half + j);
      for (int r = 0; r < RW; ++r) acc[r][m] = _mm512_fmadd_ps(hi[r], xo, _mm512_fmadd_ps(lo[r], xe, acc[r][m]));
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) {
      float s = _mm512_reduce_add_ps(acc[r][m]);
      const float* xm = xs + m * 2 * half;
      for (int64_t t = k; t < K; ++t) s += xm[(t & 1) * half + t / 2] * bf16_bits_to_float(rows[r][t]);
      y[m * ldy + o + r] = s;
    }
}

template <int RW>
inline void tile_bf16_rows(int mx, const float* xs, int64_t K, const uint16_t* w, int64_t o, float* y,
                           int64_t ldy) {
  switch (mx) {
    case 1: tile_bf16_pairs<RW, 1>(xs, K, w, o, y, ldy); break;
    case 2: tile_bf16_pairs<RW, 2>(xs, K, w, o, y, ldy); break;
    case 3: tile_bf16_pairs<RW, 3>(xs, K, w, o, y, ldy); break;
    default: tile_bf16_pairs<RW, 4>(xs, K, w, o, y, ldy); break;
  }
}

void bf16_pairs(const float* xs, int64_t M, int64_t K, const uint16_t* w, int64_t o0, int64_t o1,
                float* y, int64_t ldy) {
  const int64_t row = 2 * ((K + 1) / 2);
  // One row at a time is one stream through memory (measured fastest for bf16 decode); tiles of
  // 4 rows reuse each input vector when there are several input rows.
  int64_t o = o0;
  for (; o + 4 <= o1 && M >= 4; o += 4)
    for (int64_t m0 = 0; m0 < M; m0 += 4)
      tile_bf16_rows<4>(rows_left(M, m0), xs + m0 * row, K, w, o, y + m0 * ldy, ldy);
  for (; o < o1; ++o)
    for (int64_t m0 = 0; m0 < M; m0 += 4)
      tile_bf16_rows<1>(rows_left(M, m0), xs + m0 * row, K, w, o, y + m0 * ldy, ldy);
}

void f32(const float* x, int64_t M, int64_t K, const float* w, int64_t o0, int64_t o1, float* y,
         int64_t ldy) {
  matmul<F32Load>(x, M, K, w, nullptr, o0, o1, y, ldy);
}
void int8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t o0,
          int64_t o1, float* y, int64_t ldy) {
  matmul<Int8Load>(x, M, K, w, scale, o0, o1, y, ldy);
}

// float -> bf16 with round-to-nearest-even (inputs here are finite).
inline __m256i to_bf16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

void dequant(const int8_t* w, const float* scale, int64_t K, int64_t o0, int64_t o1,
             uint16_t* out) {
  for (int64_t o = o0; o < o1; ++o) {
    const __m512 s = _mm512_set1_ps(scale[o]);
    const int8_t* src = w + o * K;
    uint16_t* dst = out + o * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                          to_bf16(_mm512_mul_ps(Int8Load::full(src + k), s)));
    if (k < K) {
      const __mmask16 mask = __mmask16((1u << (K - k)) - 1);
      _mm256_mask_storeu_epi16(dst + k, mask, to_bf16(_mm512_mul_ps(Int8Load::part(src + k, mask), s)));
    }
  }
}

// Decode attention (attend_impl.h's contract) with the cache rows loaded straight into registers
// and software prefetch. BM_AttendDecode7b (16 rows, 32 heads of 128, one query head per KV head,
// bf16 cache): the generic loops read the cache at ~27 GB/s, with or without prefetching, spending
// their time copying each row to a float buffer and on one FMA chain per key; these loops without
// prefetch ~22 GB/s (waiting on memory: a (row, head) slab is only S x 256 bytes, read once); with
// both ~45 GB/s. Every 16 values are loaded and widened in one step, each key's dot product runs
// in two chains, the weighted values (up to 128 dims) stay in registers across all keys, and the
// value rows are prefetched during the pass over the keys.
struct KvF32 {
  static __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};
struct KvBf16 {
  static __m512 load(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
};

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// out[i0, i0 + 16 N) (clipped at hd) = sum over allowed keys of p[s] * v[s, i0 + ...]: N vectors
// held in registers for the whole walk over the keys.
template <int N, class L, class KV>
inline void weigh_values(const float* p, const KV* v, int64_t S, int64_t hd, int64_t i0,
                         const uint8_t* allowed, float* out) {
  __m512 acc[N];
  __mmask16 m[N];
  for (int j = 0; j < N; ++j) {
    acc[j] = _mm512_setzero_ps();
    m[j] = lanes(hd - i0 - 16 * j);
  }
  for (int64_t s = 0; s < S; ++s) {
    if (!allowed[s]) continue;
    const __m512 w = _mm512_set1_ps(p[s]);
    const KV* vs = v + s * hd + i0;
    for (int j = 0; j < N; ++j) acc[j] = _mm512_fmadd_ps(w, L::load(vs + 16 * j, m[j]), acc[j]);
  }
  for (int j = 0; j < N; ++j) _mm512_mask_storeu_ps(out + i0 + 16 * j, m[j], acc[j]);
}

// A (row, head) slab of the cache is S * hd values, read row after row; hardware prefetchers stop
// at each 4 KiB page, so each row's lines are asked for this many rows ahead.
constexpr int64_t kKvAhead = 16;
template <class KV>
inline void prefetch_kv_row(const KV* r, int64_t hd) {
  const char* c = reinterpret_cast<const char*>(r);
  for (int64_t i = 0; i < hd * int64_t(sizeof(KV)); i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

template <class L, class KV>
void attend_regs(const float* q, int64_t G, int64_t hd, const KV* k, const KV* v, int64_t S,
                 const uint8_t* allowed, float scale, float* scratch, float* out) {
  float* p = scratch;  // [G,S]
  for (int64_t s = 0; s < kKvAhead && s < S; ++s) {
    prefetch_kv_row(k + s * hd, hd);
    prefetch_kv_row(v + s * hd, hd);
  }
  for (int64_t s = 0; s < S; ++s) {
    if (s + kKvAhead < S) {
      prefetch_kv_row(k + (s + kKvAhead) * hd, hd);
      prefetch_kv_row(v + (s + kKvAhead) * hd, hd);
    }
    if (!allowed[s]) {
      for (int64_t g = 0; g < G; ++g) p[g * S + s] = -1e30f;
      continue;
    }
    const KV* ks = k + s * hd;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * hd;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 32 <= hd; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + i), L::load(ks + i, 0xffff), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + i + 16), L::load(ks + i + 16, 0xffff), a1);
      }
      for (; i < hd; i += 16) {
        const __mmask16 m = lanes(hd - i);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qg + i), L::load(ks + i, m), a0);
      }
      p[g * S + s] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale;
    }
  }
  softmax_scores(p, G, S, allowed);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i0 = 0; i0 < hd; i0 += 128) {
      const float* pg = p + g * S;
      float* og = out + g * hd;
      switch ((hd - i0 + 15) / 16) {
        case 1: weigh_values<1, L>(pg, v, S, hd, i0, allowed, og); break;
        case 2: weigh_values<2, L>(pg, v, S, hd, i0, allowed, og); break;
        case 3: weigh_values<3, L>(pg, v, S, hd, i0, allowed, og); break;
        case 4: weigh_values<4, L>(pg, v, S, hd, i0, allowed, og); break;
        case 5: weigh_values<5, L>(pg, v, S, hd, i0, allowed, og); break;
        case 6: weigh_values<6, L>(pg, v, S, hd, i0, allowed, og); break;
        case 7: weigh_values<7, L>(pg, v, S, hd, i0, allowed, og); break;
        default: weigh_values<8, L>(pg, v, S, hd, i0, allowed, og); break;
      }
    }
}

void attend_regs_f32(const float* q, int64_t G, int64_t hd, const float* k, const float* v, int64_t S,
                     const uint8_t* allowed, float scale, float* scratch, float* out) {
  attend_regs<KvF32>(q, G, hd, k, v, S, allowed, scale, scratch, out);
}
void attend_regs_bf16(const float* q, int64_t G, int64_t hd, const uint16_t* k, const uint16_t* v, int64_t S,
                      const uint8_t* allowed, float scale, float* scratch, float* out) {
  attend_regs<KvBf16>(q, G, hd, k, v, S, allowed, scale, scratch, out);
}

}  // namespace

const KernelSet& avx512_kernels() {
  static const KernelSet set = [] {
    KernelSet s{f32, bf16_pairs, int8, dequant, /*bf16_pair_split=*/true};
    s.attend_f32 = attend_regs_f32;
    s.attend_bf16 = attend_regs_bf16;
    s.softmax_bf16 = softmax_bf16;
    // int4: AVX2's kernels (every AVX-512 CPU has AVX2, FMA and F16C); an AVX-512 version is not written yet.
    s.quantize_q8_32 = avx2_kernels().quantize_q8_32;
    s.matmul_int4 = avx2_kernels().matmul_int4;
    s.dequant_int4_f32 = avx2_kernels().dequant_int4_f32;
    return s;
  }();
  return set;
}

}  // namespace victor::kernels
