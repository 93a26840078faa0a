// AVX2 + FMA kernels (8 floats a vector, 16 registers). Compiled with -mavx2 -mfma; reached only
// through avx2_kernels() after a CPU check (kernels.cpp). No standard headers: their inline code
// would be compiled with this file's flags.
#include <immintrin.h>

#include "isa_kernels.h"
#include "simd_loops.h"

namespace victor::kernels {
namespace {

inline int rows_left(int64_t M, int64_t m0) { return M - m0 < 2 ? int(M - m0) : 2; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// simd_loops.h's vector traits: 8 floats a vector; product tiles of up to 4 x 2 accumulators (8
// of the 16 registers); no software prefetch of weights (measured no faster here).
struct Avx2 {
  using vec = __m256;
  static constexpr int lanes = 8, max_rows = 2;
  static constexpr int64_t weight_ahead = 0;
  static __m256i first(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static vec zero() { return _mm256_setzero_ps(); }
  static vec set1(float f) { return _mm256_set1_ps(f); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static vec part(const float* p, int n) { return _mm256_maskload_ps(p, first(n)); }
  using Mask = int;  // a count: AVX2 has no mask registers
  static constexpr bool mask_registers = false;
  static Mask mask(int n) { return n; }
  static void store_masked(float* p, Mask n, vec v) {
    if (n == lanes) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, first(n), v);
  }
  static vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static float sum(vec v) { return hsum(v); }
  static void prefetch_l1(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
};

// Loaders (simd_loops.h's L): 8 weights or cache values widened to floats, whole or the first n.
struct F32Load {
  using T = float;
  static __m256 full(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 part(const float* p, int n) { return Avx2::part(p, n); }
  static __m256 masked(const float* p, int n) { return n == 8 ? full(p) : part(p, n); }
};
struct Bf16Load {
  using T = uint16_t;
  static __m256 full(const uint16_t* p) {
    const __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r), 16));
  }
  static __m256 part(const uint16_t* p, int n) {
    uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n; ++i) t[i] = p[i];
    return full(t);
  }
  static __m256 masked(const uint16_t* p, int n) { return n == 8 ? full(p) : part(p, n); }
};
struct Int8Load {
  using T = int8_t;
  static __m256 full(const int8_t* p) {
    const __m128i r = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(r));
  }
  static __m256 part(const int8_t* p, int n) {
    int8_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n; ++i) t[i] = p[i];
    return full(t);
  }
  static __m256 masked(const int8_t* p, int n) { return n == 8 ? full(p) : part(p, n); }
};

void f32(const float* x, int64_t M, int64_t K, const float* w, int64_t o0, int64_t o1, float* y,
         int64_t ldy) {
  matmul<Avx2, F32Load>(x, M, K, w, nullptr, o0, o1, y, ldy);
}
void bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t o0, int64_t o1,
          float* y, int64_t ldy) {
  matmul<Avx2, Bf16Load>(x, M, K, w, nullptr, o0, o1, y, ldy);
}
void int8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t o0,
          int64_t o1, float* y, int64_t ldy) {
  matmul<Avx2, Int8Load>(x, M, K, w, scale, o0, o1, y, ldy);
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

void attend_regs_f32(const float* q, int64_t G, int64_t hd, const float* k, const float* v, int64_t S,
                     const uint8_t* allowed, float scale, float* scratch, float* out) {
  attend_regs<Avx2, F32Load>(q, G, hd, k, v, S, allowed, scale, scratch, out);
}
void attend_regs_bf16(const float* q, int64_t G, int64_t hd, const uint16_t* k, const uint16_t* v, int64_t S,
                      const uint8_t* allowed, float scale, float* scratch, float* out) {
  attend_regs<Avx2, Bf16Load>(q, G, hd, k, v, S, allowed, scale, scratch, out);
}

// int4 weights (isa_kernels.h's layout) against 32-block int8 activations, two groups at a time:
// one 32-byte load holds a pair of groups' weights; its low nibbles meet the pair's first 16
// activations of each group, its high nibbles the last 16 (quantize_q8_32 lays them out so), two
// VPMADDUBSW (unsigned nibbles times signed activations: pairs of products fit int16, 2 * 15 * 127,
// and so do two of them added) and one VPMADDWD leave group 2p in lanes 0-3 and 2p+1 in lanes 4-7,
// and one FMA scales each half by its weight scale times its activation scale (taken from a vector
// of 8 groups' products by one permute). The nibbles' +8 offset comes off at the end:
// sum_g scale[o,g] * xc[m,g].
inline __m256i nibbles(const uint8_t* p) {  // one group's 32 values in order
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low = _mm_set1_epi8(0x0f);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// sum_g half(s[g]) * c[g] over G groups.
inline float scale_dot(const uint16_t* s, const float* c, int64_t G) {
  __m256 a = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8)
    a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + g))),
                        _mm256_loadu_ps(c + g), a);
  float r = hsum(a);
  for (; g < G; ++g) r += half_to_float(s[g]) * c[g];
  return r;
}

constexpr int64_t kInt4Ahead = 1024;  // bytes of each weight row prefetched ahead (256-1024: same speed)

template <int RW, int MX>
inline void tile_int4(const int8_t* xq, const float* xd, const float* xc, int64_t Kp, int64_t G, const uint8_t* w,
                      int64_t K, int64_t il, const uint16_t* scale, int64_t o, float* y, int64_t ldy) {
  const int64_t ps = il == 1 ? 2 * (kInt4GroupK / 2) : 4 * kInt4GroupK;  // bytes from a row's pair to its next
  __m256 acc[RW][MX];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const uint8_t* rows[RW];
  const uint16_t* sc[RW];
  for (int r = 0; r < RW; ++r) {
    rows[r] = int4_group(w, K, il, o + r, 0);
    sc[r] = scale + (o + r) * G;
  }
  // One pair `pp` of groups, scales in `sd` (lanes 0-3 and 4-7 as the products' halves).
  auto pair = [&](int64_t pp, const __m256* sd) {
    __m256i xa[MX], xb[MX];
    for (int m = 0; m < MX; ++m) {
      xa[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + pp * 64));
      xb[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + pp * 64 + 32));
    }
    for (int r = 0; r < RW; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + pp * ps) + kInt4Ahead, _MM_HINT_T0);
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + pp * ps));
      const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
      for (int m = 0; m < MX; ++m) {
        const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa[m]), _mm256_maddubs_epi16(hi, xb[m]));
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones)), sd[r * MX + m], acc[r][m]);
      }
    }
  };
  const int64_t pairs = G / 2, blocks = pairs / 4;
  for (int64_t bk = 0; bk < blocks; ++bk) {  // 8 groups: their scale products once
    const int64_t g8 = bk * 8;
    __m256 s8[RW * MX];
    for (int r = 0; r < RW; ++r) {
      const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc[r] + g8)));
      for (int m = 0; m < MX; ++m) s8[r * MX + m] = _mm256_mul_ps(ws, _mm256_loadu_ps(xd + m * G + g8));
    }
    for (int k = 0; k < 4; ++k) {
      const __m256i idx = _mm256_setr_epi32(2 * k, 2 * k, 2 * k, 2 * k, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1);
      __m256 sd[RW * MX];
      for (int i = 0; i < RW * MX; ++i) sd[i] = _mm256_permutevar8x32_ps(s8[i], idx);
      pair(bk * 4 + k, sd);
    }
  }
  for (int64_t pp = blocks * 4; pp < pairs; ++pp) {  // the last pairs, scales from scalars
    __m256 sd[RW * MX];
    for (int r = 0; r < RW; ++r)
      for (int m = 0; m < MX; ++m) {
        const float a = half_to_float(sc[r][2 * pp]) * xd[m * G + 2 * pp];
        const float b = half_to_float(sc[r][2 * pp + 1]) * xd[m * G + 2 * pp + 1];
        sd[r * MX + m] = _mm256_set_m128(_mm_set1_ps(b), _mm_set1_ps(a));
      }
    pair(pp, sd);
  }
  if (G % 2) {  // an odd last group, its activations in order
    const int64_t g = G - 1;
    for (int r = 0; r < RW; ++r) {
      const __m256i wv = nibbles(int4_group(w, K, il, o + r, g));
      for (int m = 0; m < MX; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + g * kInt4GroupK));
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(half_to_float(sc[r][g]) * xd[m * G + g]),
                                    acc[r][m]);
      }
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) y[m * ldy + o + r] = hsum(acc[r][m]) - scale_dot(sc[r], xc + m * G, G);
}

void matmul_int4(const int8_t* xq, const float* xd, const float* xc, int64_t M, int64_t K, const uint8_t* w,
                 int64_t il, const uint16_t* scale, int64_t o0, int64_t o1, float* y, int64_t ldy) {
  const int64_t G = int4_groups(K), Kp = int4_padded(K);
  auto rows = [&](int64_t m0, int64_t o, int rw) {
    const int mx = rows_left(M, m0);
    const int8_t* xm = xq + m0 * Kp;
    const float *dm = xd + m0 * G, *cm = xc + m0 * G;
    float* ym = y + m0 * ldy;
    if (rw == 4 && mx == 1) tile_int4<4, 1>(xm, dm, cm, Kp, G, w, K, il, scale, o, ym, ldy);
    else if (rw == 4) tile_int4<4, 2>(xm, dm, cm, Kp, G, w, K, il, scale, o, ym, ldy);
    else if (mx == 1) tile_int4<1, 1>(xm, dm, cm, Kp, G, w, K, il, scale, o, ym, ldy);
    else tile_int4<1, 2>(xm, dm, cm, Kp, G, w, K, il, scale, o, ym, ldy);
  };
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4)
    for (int64_t m0 = 0; m0 < M; m0 += 2) rows(m0, o, 4);
  for (; o < o1; ++o)
    for (int64_t m0 = 0; m0 < M; m0 += 2) rows(m0, o, 1);
}

// 32-blocks of int8 activations (isa_kernels.h's quantize_q8_32): the same values as the scalar
// set's (max|x| / 127, round half to even), laid out by xq_pos.
inline __m256i quantize_block(const float* xs, int64_t n, float* d_out, int* sum_out) {
  float buf[kInt4GroupK];
  if (n < kInt4GroupK) {  // the last, partial block: zeros beyond K
    for (int64_t i = 0; i < kInt4GroupK; ++i) buf[i] = i < n ? xs[i] : 0.f;
    xs = buf;
  }
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(xs + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float d = _mm_cvtss_f32(h) / 127.f, id = d > 0.f ? 1.f / d : 0.f;
  const __m256 idv = _mm256_set1_ps(id);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], idv));  // nearest even
  const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
  *d_out = d;
  *sum_out = _mm_cvtsi128_si32(s4);
  // int32 -> int8 in order: the packs interleave 128-bit lanes, the permute puts them back.
  const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

void quantize_q8_32(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, float* xc) {
  const int64_t G = int4_groups(K), Kp = int4_padded(K);
  for (int64_t m = 0; m < M; ++m) {
    int8_t* row = xq + m * Kp;
    for (int64_t g = 0; g < G;) {
      const int64_t k0 = g * kInt4GroupK;
      float d0, d1;
      int s0, s1;
      const __m256i v0 = quantize_block(x + m * K + k0, K - k0, &d0, &s0);
      xd[m * G + g] = d0;
      xc[m * G + g] = 8.f * d0 * float(s0);
      if (g + 1 >= G) {  // an odd last block stays in order
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k0), v0);
        g += 1;
        continue;
      }
      const __m256i v1 = quantize_block(x + m * K + k0 + kInt4GroupK, K - k0 - kInt4GroupK, &d1, &s1);
      xd[m * G + g + 1] = d1;
      xc[m * G + g + 1] = 8.f * d1 * float(s1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k0), _mm256_permute2x128_si256(v0, v1, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k0 + 32), _mm256_permute2x128_si256(v0, v1, 0x31));
      g += 2;
    }
  }
}

void dequant_int4_f32(const uint8_t* w, int64_t il, const uint16_t* scale, int64_t K, int64_t o0, int64_t o1,
                      float* out) {
  const int64_t G = int4_groups(K);
  const __m256i eight = _mm256_set1_epi32(8);
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t g = 0; g < G; ++g) {
      const __m256i n = nibbles(int4_group(w, K, il, o, g));
      const __m256 s = _mm256_set1_ps(half_to_float(scale[o * G + g]));
      float buf[kInt4GroupK];
      const int64_t k0 = g * kInt4GroupK, cnt = K - k0 < kInt4GroupK ? K - k0 : kInt4GroupK;
      float* dst = cnt == kInt4GroupK ? out + (o - o0) * K + k0 : buf;
      alignas(32) uint8_t bytes[32];
      _mm256_store_si256(reinterpret_cast<__m256i*>(bytes), n);
      for (int i = 0; i < 4; ++i) {
        const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * i))), eight);
        _mm256_storeu_ps(dst + 8 * i, _mm256_mul_ps(_mm256_cvtepi32_ps(v), s));
      }
      if (dst == buf)
        for (int64_t i = 0; i < cnt; ++i) out[(o - o0) * K + k0 + i] = buf[i];
    }
}

}  // namespace

const KernelSet& avx2_kernels() {
  static const KernelSet set = [] {
    KernelSet s{f32, bf16, int8, dequant};
    s.attend_f32 = attend_regs_f32;
    s.attend_bf16 = attend_regs_bf16;
    s.softmax_bf16 = softmax_bf16;
    s.quantize_q8_32 = quantize_q8_32;
    s.matmul_int4 = matmul_int4;
    s.dequant_int4_f32 = dequant_int4_f32;
    return s;
  }();
  return set;
}

}  // namespace victor::kernels
