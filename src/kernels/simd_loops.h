// The per-ISA vector loops written once: the weight-streaming product tiles and the decode
// attention with cache rows in registers, as templates over a vector-traits type V that each
// isa_*.cpp defines with its own intrinsics (8 lanes for AVX2, 16 for AVX-512) and instantiates
// under its own compile flags. Include after <immintrin.h> and the file's traits. Same rules as
// isa_kernels.h: no standard headers, plain pointers; everything has internal linkage.
//
// V (a vector of `lanes` floats):
//   using vec; static constexpr int lanes;
//   static constexpr int max_rows;         input rows one product tile holds (its accumulators)
//   static constexpr int64_t weight_ahead; weight rows prefetched ahead of a tile (0: none)
//   zero(), set1(f), load(const float*), part(const float*, n) (the first n lanes, the rest 0),
//   fmadd(a, b, c) = a * b + c, add(a, b), sum(vec) (all lanes added), prefetch_l1(p), prefetch_l2(p);
//   Mask and mask(n) (the first n lanes), store_masked(float*, Mask, vec); mask_registers: a
//   masked load costs what a full one does (AVX-512), so loops load every vector masked.
// L (loads `lanes` weights or cache values as floats): using T; full(const T*), part(const T*, n),
//   masked(const T*, V::Mask).
#pragma once
#include "attend_impl.h"

namespace victor::kernels {
namespace {

// ---- Weight-streaming products: y[m, o] = sum_k x[m, k] * W[o, k] (* scale[o]) ---------------

// RW weight rows against MX input rows: RW * MX accumulators stay in registers while the weight
// rows stream once.
template <class V, int RW, int MX, class L>
inline void tile(const float* x, int64_t K, const typename L::T* w, const float* scale, int64_t o, float* y,
                 int64_t ldy) {
  using vec = typename V::vec;
  vec acc[RW][MX];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = V::zero();
  const typename L::T* rows[RW];
  for (int r = 0; r < RW; ++r) rows[r] = w + (o + r) * K;
  const int64_t ahead = V::weight_ahead * K;
  int64_t k = 0;
  for (; k + V::lanes <= K; k += V::lanes) {
    vec wv[RW];
    for (int r = 0; r < RW; ++r) {
      if constexpr (V::weight_ahead > 0) V::prefetch_l2(rows[r] + ahead + k);
      wv[r] = L::full(rows[r] + k);
    }
    for (int m = 0; m < MX; ++m) {
      const vec xv = V::load(x + m * K + k);
      for (int r = 0; r < RW; ++r) acc[r][m] = V::fmadd(wv[r], xv, acc[r][m]);
    }
  }
  if (k < K) {
    const int n = int(K - k);
    vec wv[RW];
    for (int r = 0; r < RW; ++r) wv[r] = L::part(rows[r] + k, n);
    for (int m = 0; m < MX; ++m) {
      const vec xv = V::part(x + m * K + k, n);
      for (int r = 0; r < RW; ++r) acc[r][m] = V::fmadd(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MX; ++m) {
      const float s = V::sum(acc[r][m]);
      y[m * ldy + o + r] = scale ? s * scale[o + r] : s;
    }
}

template <class V, int RW, class L>
inline void tile_rows(int mx, const float* x, int64_t K, const typename L::T* w, const float* scale, int64_t o,
                      float* y, int64_t ldy) {
  if (mx <= 1) return tile<V, RW, 1, L>(x, K, w, scale, o, y, ldy);
  if constexpr (V::max_rows >= 4) {
    if (mx == 3) return tile<V, RW, 3, L>(x, K, w, scale, o, y, ldy);
    if (mx >= 4) return tile<V, RW, 4, L>(x, K, w, scale, o, y, ldy);
  }
  tile<V, RW, 2, L>(x, K, w, scale, o, y, ldy);
}

// Output rows in tiles of 4; for each tile, every group of up to V::max_rows input rows reuses the
// tile's weights from L1, so the weights leave memory once whatever M is.
template <class V, class L>
void matmul(const float* x, int64_t M, int64_t K, const typename L::T* w, const float* scale, int64_t o0,
            int64_t o1, float* y, int64_t ldy) {
  auto rows_left = [M](int64_t m0) { return M - m0 < V::max_rows ? int(M - m0) : V::max_rows; };
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4)
    for (int64_t m0 = 0; m0 < M; m0 += V::max_rows)
      tile_rows<V, 4, L>(rows_left(m0), x + m0 * K, K, w, scale, o, y + m0 * ldy, ldy);
  for (; o < o1; ++o)
    for (int64_t m0 = 0; m0 < M; m0 += V::max_rows)
      tile_rows<V, 1, L>(rows_left(m0), x + m0 * K, K, w, scale, o, y + m0 * ldy, ldy);
}

// ---- Decode attention (attend_impl.h's contract) with the cache rows loaded straight into
// registers: every `lanes` values loaded and widened in one step, each key's dot product in two
// chains, the weighted values (up to 8 vectors of dims) in registers across all keys, and key and
// value rows prefetched kKvAhead rows ahead (hardware prefetchers stop at each 4 KiB page, and a
// (row, head) slab of the cache is only S x hd values, read once). BM_AttendDecode7b (AVX-512,
// bf16 cache): the generic loops of attend_impl.h ~27 GB/s, these ~45 GB/s.

constexpr int64_t kKvAhead = 16;

template <class V, class KV>
inline void prefetch_kv_row(const KV* r, int64_t hd) {
  const char* c = reinterpret_cast<const char*>(r);
  for (int64_t i = 0; i < hd * int64_t(sizeof(KV)); i += 64) V::prefetch_l1(c + i);
}

// out[i0, i0 + lanes * N) (clipped at hd) = sum over allowed keys of p[s] * v[s, i0 + ...]; the
// caller picks N so that every vector holds at least one dim.
template <class V, int N, class L, class KV>
inline void weigh_values(const float* p, const KV* v, int64_t S, int64_t hd, int64_t i0, const uint8_t* allowed,
                         float* out) {
  using vec = typename V::vec;
  const int64_t n = hd - i0 < int64_t(V::lanes) * N ? hd - i0 : int64_t(V::lanes) * N;  // dims of this pass
  const int whole = int(n / V::lanes), rest = int(n % V::lanes);
  const typename V::Mask last = V::mask(rest);
  vec acc[N];
  for (int j = 0; j < N; ++j) acc[j] = V::zero();
  if constexpr (V::mask_registers) {
    // Every vector a masked load (a full mask costs nothing): no branch in the walk over the keys.
    typename V::Mask m[N];
    for (int j = 0; j < N; ++j) m[j] = j < whole ? V::mask(V::lanes) : j == whole ? last : V::mask(0);
    for (int64_t s = 0; s < S; ++s) {
      if (!allowed[s]) continue;
      const vec w = V::set1(p[s]);
      const KV* vs = v + s * hd + i0;
      for (int j = 0; j < N; ++j) acc[j] = V::fmadd(w, L::masked(vs + V::lanes * j, m[j]), acc[j]);
    }
  } else {
    for (int64_t s = 0; s < S; ++s) {
      if (!allowed[s]) continue;
      const vec w = V::set1(p[s]);
      const KV* vs = v + s * hd + i0;
      for (int j = 0; j < N; ++j) {
        if (j < whole) acc[j] = V::fmadd(w, L::full(vs + V::lanes * j), acc[j]);
        else if (j == whole && rest) acc[j] = V::fmadd(w, L::masked(vs + V::lanes * j, last), acc[j]);
      }
    }
  }
  for (int j = 0; j < N; ++j) {
    if (j < whole) V::store_masked(out + i0 + V::lanes * j, V::mask(V::lanes), acc[j]);
    else if (j == whole && rest) V::store_masked(out + i0 + V::lanes * j, last, acc[j]);
  }
}

template <class V, class L, class KV>
void attend_regs(const float* q, int64_t G, int64_t hd, const KV* k, const KV* v, int64_t S, const uint8_t* allowed,
                 float scale, float* scratch, float* out) {
  using vec = typename V::vec;
  constexpr int W = V::lanes;
  float* p = scratch;  // [G,S]
  for (int64_t s = 0; s < kKvAhead && s < S; ++s) {
    prefetch_kv_row<V>(k + s * hd, hd);
    prefetch_kv_row<V>(v + s * hd, hd);
  }
  for (int64_t s = 0; s < S; ++s) {
    if (s + kKvAhead < S) {
      prefetch_kv_row<V>(k + (s + kKvAhead) * hd, hd);
      prefetch_kv_row<V>(v + (s + kKvAhead) * hd, hd);
    }
    if (!allowed[s]) {
      for (int64_t g = 0; g < G; ++g) p[g * S + s] = -1e30f;
      continue;
    }
    const KV* ks = k + s * hd;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * hd;
      vec a0 = V::zero(), a1 = V::zero();
      int64_t i = 0;
      for (; i + 2 * W <= hd; i += 2 * W) {
        a0 = V::fmadd(V::load(qg + i), L::full(ks + i), a0);
        a1 = V::fmadd(V::load(qg + i + W), L::full(ks + i + W), a1);
      }
      for (; i < hd; i += W) {
        if (i + W <= hd) {
          a0 = V::fmadd(V::load(qg + i), L::full(ks + i), a0);
        } else {
          const int n = int(hd - i);
          a1 = V::fmadd(V::part(qg + i, n), L::part(ks + i, n), a1);
        }
      }
      p[g * S + s] = V::sum(V::add(a0, a1)) * scale;
    }
  }
  softmax_scores(p, G, S, allowed);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i0 = 0; i0 < hd; i0 += 8 * W) {
      const float* pg = p + g * S;
      float* og = out + g * hd;
      switch ((hd - i0 + W - 1) / W) {
        case 1: weigh_values<V, 1, L>(pg, v, S, hd, i0, allowed, og); break;
        case 2: weigh_values<V, 2, L>(pg, v, S, hd, i0, allowed, og); break;
        case 3: weigh_values<V, 3, L>(pg, v, S, hd, i0, allowed, og); break;
        case 4: weigh_values<V, 4, L>(pg, v, S, hd, i0, allowed, og); break;
        case 5: weigh_values<V, 5, L>(pg, v, S, hd, i0, allowed, og); break;
        case 6: weigh_values<V, 6, L>(pg, v, S, hd, i0, allowed, og); break;
        case 7: weigh_values<V, 7, L>(pg, v, S, hd, i0, allowed, og); break;
        default: weigh_values<V, 8, L>(pg, v, S, hd, i0, allowed, og); break;
      }
    }
}

}  // namespace
}  // namespace victor::kernels
