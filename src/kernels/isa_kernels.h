// Raw CPU kernels, one copy per instruction set (isa_avx512.cpp, isa_avx2.cpp, isa_scalar.cpp).
// These translation units are compiled with their own -m flags and must not include torch or any
// other header with inline code shared with the rest of the program (one definition rule): plain
// pointers in, plain pointers out. Threading happens in the caller (kernels.cpp), over row ranges.
#pragma once
#include <cstdint>

namespace victor::kernels {

// Weight storage of a [O,K] matrix: bf16 bits, or int8 with one float scale per output row.
struct KernelSet {
  // y[m*ldy + o] = sum_k x[m*K + k] * W[o,k] for m < M, o in [o0,o1).
  void (*matmul_f32)(const float* x, int64_t M, int64_t K, const float* w, int64_t o0, int64_t o1,
                     float* y, int64_t ldy);
  // x in "pair-split" layout when bf16_pair_split: row m holds [x(0) x(2) x(4) ...] then
  // [x(1) x(3) ...], each half `(K + 1) / 2` long (zero-padded), so a vector of bf16 pairs widens
  // with one shift and one mask instead of a shuffle. Otherwise x is plain [M,K].
  void (*matmul_bf16)(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t o0,
                      int64_t o1, float* y, int64_t ldy);
  void (*matmul_int8)(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale,
                      int64_t o0, int64_t o1, float* y, int64_t ldy);
  // Rows [o0,o1) of W dequantized to bf16 bits: out[o*K + k] = bf16(W[o,k] * scale[o]).
  void (*dequant_int8_bf16)(const int8_t* w, const float* scale, int64_t K, int64_t o0, int64_t o1,
                            uint16_t* out);
  bool bf16_pair_split = false;
  // int8 x int8 (AVX-512 VNNI only; null elsewhere). quantize_q8: x [M,K] -> xq [M, q8_padded(K)]
  // signed bytes q = round(x / d) in blocks of kQ8BlockK along K, d = max|x| / 127 per block
  // (q = 0 beyond K), and xs [M, q8_scales(K)]: the blocks' d, then their 128 * d * sum q.
  // matmul_int8_q8: as matmul_int8 on the quantized activations.
  void (*quantize_q8)(const float* x, int64_t M, int64_t K, uint8_t* xq, float* xs) = nullptr;
  void (*matmul_int8_q8)(const uint8_t* xq, const float* xs, int64_t M, int64_t K, const int8_t* w,
                         const float* scale, int64_t o0, int64_t o1, float* y, int64_t ldy) = nullptr;
  // bf16 x bf16 (AVX-512 BF16 only; null elsewhere; used instead of matmul_bf16 where set).
  // prepare_bf16_hilo: x [M,K] -> out [M, 2, bf16_hilo_padded(K)] bf16 bits, each row's
  // hi = bf16(x) then lo = bf16(x - hi), zero beyond K: 16 significant bits of every activation.
  // matmul_bf16_hilo: as matmul_bf16 on them, W times hi plus W times lo.
  void (*prepare_bf16_hilo)(const float* x, int64_t M, int64_t K, uint16_t* out) = nullptr;
  void (*matmul_bf16_hilo)(const uint16_t* xhl, int64_t M, int64_t K, const uint16_t* w, int64_t o0,
                           int64_t o1, float* y, int64_t ldy) = nullptr;
  // Decode attention of one KV head (attend_impl.h; every set has them): q [G,hd] against S cached
  // keys and values (rows hd apart, float32 or bf16 bits), keys with allowed[s] == 0 excluded;
  // out [G,hd]; scratch G * S + hd floats.
  void (*attend_f32)(const float* q, int64_t G, int64_t hd, const float* k, const float* v, int64_t S,
                     const uint8_t* allowed, float scale, float* scratch, float* out) = nullptr;
  void (*attend_bf16)(const float* q, int64_t G, int64_t hd, const uint16_t* k, const uint16_t* v,
                      int64_t S, const uint8_t* allowed, float scale, float* scratch, float* out) = nullptr;
  // One row of prefill attention's softmax (attend_impl.h): scores s [S] (overwritten) over the
  // entries with allowed[i] != 0 (allowed null: all) -> probabilities as bf16 bits.
  void (*softmax_bf16)(float* s, const uint8_t* allowed, int64_t S, uint16_t* out) = nullptr;
  // int4 weights (every set has them; AVX-512 VNNI has its own matmul_int4, the other AVX-512
  // sets take AVX2's). W [O,K] is stored as int4_row_bytes(K) bytes a row and int4_groups(K)
  // float16 scales a row (int4 layout below).
  // quantize_q8_32: x [M,K] -> xq [M, int4_padded(K)] int8 in 32-blocks along K (q = round(x / d),
  // d = max|x| / 127, 0 beyond K; value j of block g at xq_pos(G, g, j), so a 32-byte load of two
  // groups' packed weights meets its activations), xd [M, G] the blocks' d and xc [M, G] =
  // 8 * d * sum(q) (the weights' +8 offset, taken out once per block instead of once per product).
  // matmul_int4: y[m*ldy + o] = sum over groups g of scale[o,g] * xd[m,g] * sum_j n[o,g,j] * xq[m,g,j]
  // minus sum_g scale[o,g] * xc[m,g], n the stored nibbles (0..15): the quantized activations
  // times the int4 weights, exactly in integers within a group.
  void (*quantize_q8_32)(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, float* xc) = nullptr;
  // `il`: the weight's row interleave (1: the file layout; 4: int4_group's tiles; 16: the 16-row
  // tiles below, only where int4_tiles16 is set; kernels.cpp hands other sets those rows untiled).
  void (*matmul_int4)(const int8_t* xq, const float* xd, const float* xc, int64_t M, int64_t K, const uint8_t* w,
                      int64_t il, const uint16_t* scale, int64_t o0, int64_t o1, float* y, int64_t ldy) = nullptr;
  // Rows [o0,o1) of an int4 W as float32: out[(o - o0)*K + k] = (n - 8) * scale[o, k / 32].
  void (*dequant_int4_f32)(const uint8_t* w, int64_t il, const uint16_t* scale, int64_t K, int64_t o0, int64_t o1,
                           float* out) = nullptr;
  // Rows [o0,o1) of an int4 W as bf16 bits (the AVX-512 sets; null elsewhere): out[o*K + k] =
  // bf16((n - 8) * scale[o, k / 32]), rounded to nearest even. Reads il = 16 as well.
  void (*dequant_int4_bf16)(const uint8_t* w, int64_t il, const uint16_t* scale, int64_t K, int64_t o0, int64_t o1,
                            uint16_t* out) = nullptr;
  // matmul_int4 reads il = 16 itself (AVX-512 VNNI): models loaded on this set keep their int4
  // matrices in 16-row tiles (int4_tile16_offset).
  bool int4_tiles16 = false;
};

// int4 layout (kernels::kInt4Group in victor/kernels.h): groups of 32 values along K, each stored
// as 16 bytes, byte j holding value 32g + j in its low nibble and 32g + 16 + j in its high one,
// as n = q + 8 (q in -8..7), with one float16 scale per group: w = q * scale. K is padded to
// whole groups with zeros (n = 8). The same bits as ggml's Q4_0 blocks, scales kept apart.
inline constexpr int64_t kInt4GroupK = 32;
inline int64_t int4_groups(int64_t K) { return (K + kInt4GroupK - 1) / kInt4GroupK; }
inline int64_t int4_padded(int64_t K) { return int4_groups(K) * kInt4GroupK; }
inline int64_t int4_row_bytes(int64_t K) { return int4_groups(K) * (kInt4GroupK / 2); }
// Group g's 16 bytes of row o. il = 1: the file layout, rows one after another. il = 4 (victor's
// in-memory layout where O is a multiple of 4 and G even): tiles of 4 rows, [O/4][G/2][4][32], the
// 32 bytes of a pair of groups of each of the tile's rows side by side, so a 4-row product reads
// one contiguous stream (llama.cpp's AVX2 path interleaves Q4_0 rows for the same reason).
inline const uint8_t* int4_group(const uint8_t* w, int64_t K, int64_t il, int64_t o, int64_t g) {
  const int64_t rb = int4_row_bytes(K);
  if (il == 1) return w + o * rb + g * (kInt4GroupK / 2);
  return w + (o / 4) * 4 * rb + (g / 2) * 4 * kInt4GroupK + (o % 4) * kInt4GroupK + (g % 2) * (kInt4GroupK / 2);
}

// il = 16 (where O is a multiple of 16 and the set has int4_tiles16): [O/16][G][4][16][4] bytes and
// scales [O/16][G][16]. For each tile of 16 rows and each group, chunk j (of 4) holds bytes
// 4j..4j+3 of the 16 rows' 16 group bytes, row by row: its low nibbles are values 4j..4j+3 of the
// rows, its high ones 16+4j..19+4j, the four bytes a VPDPBUSD lane sums, so one instruction
// multiplies 16 rows by 4 activations with no horizontal sums; the 16 rows' scales of the group
// lie side by side, one float16 vector. Byte b of row o's group g:
inline int64_t int4_tile16_offset(int64_t K, int64_t o, int64_t g, int64_t b) {
  return (o / 16) * 16 * int4_row_bytes(K) + g * 256 + (b / 4) * 64 + (o % 16) * 4 + b % 4;
}
// Row o's scale of group g (of G) beside such tiles: [O/16][G][16].
inline int64_t int4_tile16_scale_index(int64_t G, int64_t o, int64_t g) { return (o / 16) * 16 * G + g * 16 + o % 16; }

// Where quantize_q8_32 puts value j of activation block g (of G): blocks go in pairs of 64 bytes,
// [g0 0..15][g1 0..15][g0 16..31][g1 16..31], matching the low nibbles then the high ones of the
// pair's 32 weight bytes; an odd last block stays in order.
inline int64_t xq_pos(int64_t G, int64_t g, int64_t j) {
  if ((g | 1) >= G) return g * kInt4GroupK + j;
  return (g / 2) * 2 * kInt4GroupK + (j < 16 ? 0 : 32) + (g % 2) * 16 + (j % 16);
}

// K rounded up to the 32 bf16 values a VDPBF16PS reads.
inline int64_t bf16_hilo_padded(int64_t K) { return (K + 31) / 32 * 32; }

// The int8 x int8 path's activation block along K (kernels::kQ8Block in victor/kernels.h), K
// rounded up to the 64-byte chunks its kernels read, and the number of blocks.
inline constexpr int64_t kQ8BlockK = 256;
inline int64_t q8_padded(int64_t K) { return (K + 63) / 64 * 64; }
inline int64_t q8_blocks(int64_t K) { return (K + kQ8BlockK - 1) / kQ8BlockK; }
// Floats per row of quantize_q8's xs: a scale and an error term per block.
inline int64_t q8_scales(int64_t K) { return 2 * q8_blocks(K); }

const KernelSet& scalar_kernels();
const KernelSet& avx2_kernels();    // needs AVX2 + FMA + F16C
const KernelSet& avx512_kernels();  // needs AVX-512 F/BW/VL
const KernelSet& avx512bf16_kernels();  // AVX-512 plus bf16 x bf16: needs AVX-512 BF16 too
const KernelSet& avx512vnni_kernels();  // AVX-512 plus int8 x int8: needs AVX-512 VNNI too

// Round-to-nearest-even float -> bf16 bits (NaN kept quiet), shared by every kernel set.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
// IEEE half bits -> float (subnormals, infinities and NaN included), for the scalar paths.
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: man * 2^-24
    float f = float(man) * (1.0f / 16777216.0f);
    __builtin_memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

}  // namespace victor::kernels
