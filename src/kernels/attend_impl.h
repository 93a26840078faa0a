// Decode attention for one KV head, written once as plain loops and compiled into every isa_*.cpp
// with that file's flags (the compiler vectorizes them per instruction set). Same rules as
// isa_kernels.h: no standard headers, plain pointers; everything has internal linkage.
#pragma once
#include "isa_kernels.h"

namespace victor::kernels {
namespace {

inline float kv_load(float v) { return v; }
inline float kv_load(uint16_t b) { return bf16_bits_to_float(b); }

// e^x for x <= 0 (a softmax after its maximum is subtracted): Cephes' expf (range reduction by
// ln 2 in two parts, degree-6 polynomial; within 2 ulp), exactly 0 below -87 where float would
// go denormal. Branch-free, so a loop over it vectorizes.
inline float exp_nonpositive(float x) {
  const float big = 12582912.f;  // 1.5 * 2^23: adding then subtracting rounds to an integer
  const float xc = x < -87.f ? -87.f : x;
  const float n = (xc * 1.44269504088896341f + big) - big;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  __builtin_memcpy(&two_n, &bits, 4);
  return x < -87.f ? 0.f : e * two_n;
}

// Sum of a[i] * b[i] in 16 independent lanes (the compiler keeps them in vector registers).
inline float dot_lanes(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int w = 8; w > 0; w >>= 1)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0] + tail;
}

inline float sum_lanes(const float* a, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j];
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i];
  for (int w = 8; w > 0; w >>= 1)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0] + tail;
}

// Each of G rows of S scores (p[g*S + s]) becomes its softmax over the allowed keys, in place; keys
// not allowed weigh exactly 0 and a row with none allowed becomes zeros.
inline void softmax_scores(float* p, int64_t G, int64_t S, const uint8_t* allowed) {
  for (int64_t g = 0; g < G; ++g) {
    float* pg = p + g * S;
    float mx = -1e30f;
    for (int64_t s = 0; s < S; ++s) mx = pg[s] > mx ? pg[s] : mx;
    for (int64_t s = 0; s < S; ++s) pg[s] = allowed[s] ? exp_nonpositive(pg[s] - mx) : 0.f;
    const float sum = sum_lanes(pg, S);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int64_t s = 0; s < S; ++s) pg[s] *= inv;
  }
}

// out[g,:] = sum_s softmax_s(scale * q[g,:] . k[s,:] over allowed s) v[s,:] for the G query heads
// of one KV head; k and v rows hd apart; keys with allowed[s] == 0 weigh exactly 0 (a row with no
// allowed key gives zeros). scratch holds G * S + hd floats.
template <class KV>
void attend_impl(const float* q, int64_t G, int64_t hd, const KV* k, const KV* v, int64_t S,
                 const uint8_t* allowed, float scale, float* scratch, float* out) {
  float* p = scratch;          // [G,S]
  float* row = scratch + G * S;  // one key or value row as float
  for (int64_t s = 0; s < S; ++s) {
    if (!allowed[s]) {
      for (int64_t g = 0; g < G; ++g) p[g * S + s] = -1e30f;
      continue;
    }
    const KV* ks = k + s * hd;
    for (int64_t i = 0; i < hd; ++i) row[i] = kv_load(ks[i]);
    for (int64_t g = 0; g < G; ++g) p[g * S + s] = dot_lanes(q + g * hd, row, hd) * scale;
  }
  softmax_scores(p, G, S, allowed);
  for (int64_t i = 0; i < G * hd; ++i) out[i] = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    if (!allowed[s]) continue;
    const KV* vs = v + s * hd;
    for (int64_t i = 0; i < hd; ++i) row[i] = kv_load(vs[i]);
    for (int64_t g = 0; g < G; ++g) {
      const float w = p[g * S + s];
      float* og = out + g * hd;
      for (int64_t i = 0; i < hd; ++i) og[i] += w * row[i];
    }
  }
}

// Softmax of one row of scores over its allowed entries (allowed null: every entry), written as
// bf16 bits (round to nearest even) for a bf16 product with the values; s is overwritten. A row
// with nothing allowed gives zeros. Branch-free loops, so they vectorize per instruction set.
void softmax_bf16(float* s, const uint8_t* allowed, int64_t S, uint16_t* out) {
  if (allowed)
    for (int64_t i = 0; i < S; ++i) s[i] = allowed[i] ? s[i] : -1e30f;
  float mx = -1e30f;
  for (int64_t i = 0; i < S; ++i) mx = s[i] > mx ? s[i] : mx;
  for (int64_t i = 0; i < S; ++i) s[i] = s[i] > -1e29f ? exp_nonpositive(s[i] - mx) : 0.f;
  const float sum = sum_lanes(s, S);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int64_t i = 0; i < S; ++i) out[i] = float_to_bf16_bits(s[i] * inv);
}

[[maybe_unused]] void attend_f32(const float* q, int64_t G, int64_t hd, const float* k, const float* v, int64_t S,
                const uint8_t* allowed, float scale, float* scratch, float* out) {
  attend_impl(q, G, hd, k, v, S, allowed, scale, scratch, out);
}
[[maybe_unused]] void attend_bf16(const float* q, int64_t G, int64_t hd, const uint16_t* k, const uint16_t* v,
                 int64_t S, const uint8_t* allowed, float scale, float* scratch, float* out) {
  attend_impl(q, G, hd, k, v, S, allowed, scale, scratch, out);
}

}  // namespace
}  // namespace victor::kernels
