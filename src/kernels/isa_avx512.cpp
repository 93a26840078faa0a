// AVX-512 (F/BW/VL) kernels. Compiled with -mavx512f -mavx512bw -mavx512vl -mfma; reached only
// through avx512_kernels() after a CPU check (kernels.cpp).
#include <immintrin.h>

#include <cstring>

#include "isa_kernels.h"
#include "simd_loops.h"

namespace victor::kernels {
namespace {

// No standard headers here: their inline code would be compiled with this file's flags.

inline int rows_left(int64_t M, int64_t m0) { return M - m0 < 4 ? int(M - m0) : 4; }
inline __mmask16 lanes_mask(int n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// simd_loops.h's vector traits: 16 floats a vector (masked loads for the first n); product tiles of
// up to 4 x 4 accumulators. A weight row is one or two 4 KiB pages, where hardware prefetchers
// stop: every load also prefetches the same place 8 rows further on, so the weights keep
// streaming from memory.
struct Avx512 {
  using vec = __m512;
  static constexpr int lanes = 16, max_rows = 4;
  static constexpr int64_t weight_ahead = 8;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec set1(float f) { return _mm512_set1_ps(f); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec part(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes_mask(n), p); }
  using Mask = __mmask16;
  static constexpr bool mask_registers = true;
  static Mask mask(int n) { return lanes_mask(n); }
  static void store_masked(float* p, Mask m, vec v) { _mm512_mask_storeu_ps(p, m, v); }
  static vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static float sum(vec v) { return _mm512_reduce_add_ps(v); }
  static void prefetch_l1(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
};

// Loaders (simd_loops.h's L): 16 weights or cache values widened to floats, whole or the first n.
struct F32Load {
  using T = float;
  static __m512 full(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 part(const float* p, int n) { return Avx512::part(p, n); }
  static __m512 masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};
struct Bf16Load {
  using T = uint16_t;
  static __m512 widen(__m256i r) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16)); }
  static __m512 full(const uint16_t* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 part(const uint16_t* p, int n) { return masked(p, lanes_mask(n)); }
  static __m512 masked(const uint16_t* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
};
struct Int8Load {
  using T = int8_t;
  static __m512 widen(__m128i r) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(r)); }
  static __m512 full(const int8_t* p) { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static __m512 part(const int8_t* p, int n) { return masked(p, lanes_mask(n)); }
  static __m512 masked(const int8_t* p, __mmask16 m) { return widen(_mm_maskz_loadu_epi8(m, p)); }
};

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
  const int64_t ahead = Avx512::weight_ahead * K;
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
  matmul<Avx512, F32Load>(x, M, K, w, nullptr, o0, o1, y, ldy);
}
void int8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t o0,
          int64_t o1, float* y, int64_t ldy) {
  matmul<Avx512, Int8Load>(x, M, K, w, scale, o0, o1, y, ldy);
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
      _mm256_mask_storeu_epi16(dst + k, lanes_mask(int(K - k)), to_bf16(_mm512_mul_ps(Int8Load::part(src + k, int(K - k)), s)));
    }
  }
}

// Rows [o0,o1) of an int4 W as bf16 bits, each group's 32 values widened, scaled (exact in float:
// a 4-bit value times a float16) and rounded as LibTorch rounds float32 to bfloat16. Reads every
// layout, the 16-row tiles too (the prefill of a model loaded on AVX-512 VNNI).
void dequant_int4(const uint8_t* w, int64_t il, const uint16_t* scale, int64_t K, int64_t o0, int64_t o1,
                  uint16_t* out) {
  const int64_t G = int4_groups(K);
  const __m128i low = _mm_set1_epi8(0x0f);
  const __m512i eight = _mm512_set1_epi32(8);
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t g = 0; g < G; ++g) {
      __m128i b;
      uint16_t sh;
      if (il == 16) {  // the row's 4 chunks of 4 bytes, 64 apart; scales [O/16][G][16]
        const uint8_t* p = w + int4_tile16_offset(K, o, g, 0);
        int32_t c[4];
        for (int j = 0; j < 4; ++j) std::memcpy(&c[j], p + 64 * j, 4);
        b = _mm_setr_epi32(c[0], c[1], c[2], c[3]);
        sh = scale[int4_tile16_scale_index(G, o, g)];
      } else {
        b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(int4_group(w, K, il, o, g)));
        sh = scale[o * G + g];
      }
      const __m512 s = _mm512_set1_ps(_cvtsh_ss(sh));
      const __m128i halves[2] = {_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low)};
      for (int h = 0; h < 2; ++h) {
        const int64_t k = g * kInt4GroupK + 16 * h;
        if (k >= K) break;
        const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(halves[h]), eight));
        _mm256_mask_storeu_epi16(out + o * K + k, lanes_mask(int(K - k)), to_bf16(_mm512_mul_ps(v, s)));
      }
    }
}

void attend_regs_f32(const float* q, int64_t G, int64_t hd, const float* k, const float* v, int64_t S,
                     const uint8_t* allowed, float scale, float* scratch, float* out) {
  attend_regs<Avx512, F32Load>(q, G, hd, k, v, S, allowed, scale, scratch, out);
}
void attend_regs_bf16(const float* q, int64_t G, int64_t hd, const uint16_t* k, const uint16_t* v, int64_t S,
                      const uint8_t* allowed, float scale, float* scratch, float* out) {
  attend_regs<Avx512, Bf16Load>(q, G, hd, k, v, S, allowed, scale, scratch, out);
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
    s.dequant_int4_bf16 = dequant_int4;
    return s;
  }();
  return set;
}

}  // namespace victor::kernels
