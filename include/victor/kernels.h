// Weight storage (f32, bf16, int8) and the matrix products over it, with runtime CPU dispatch.
// Decode-shaped products (a few rows) run our own kernels that stream the weights once at memory
// bandwidth; longer ones (prefill, the vision tower) run a bf16 GEMM (oneDNN, inside LibTorch).
#pragma once
#include <torch/torch.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace victor {

namespace kernels {

// Avx512Bf16: the AVX-512 set, but bf16 weights multiply the activations with VDPBF16PS, each
// activation split into two bf16 halves (hi + lo: 16 significant bits, 256 times finer than
// the weights' own rounding); the default where the CPU has it (Zen 4/5, Sapphire Rapids and later).
// Avx512Vnni: the AVX-512 set (with the bf16 products above where the CPU has them), but int8 weights multiply int8 activations (quantized per call in
// blocks of kQ8Block along K, as llama.cpp's Q8_K) with VPDPBUSD instead of widening the weights
// to float, from kQ8MinRows rows up; the default where the CPU has AVX512_VNNI (VICTOR_ISA=avx512bf16 keeps float32 activations).
enum class Isa { Scalar, Avx2, Avx512, Avx512Bf16, Avx512Vnni };
inline constexpr int64_t kQ8MinRows = 8;  // Avx512Vnni quantizes the activations from this many rows
inline constexpr int64_t kQ8Block = 256;  // ... in blocks of this many along K, one scale each
const char* isa_name(Isa isa);
std::vector<Isa> supported_isas();  // on this CPU, most capable last
Isa active_isa();
// Forces a kernel set (tests run every path the machine supports); throws if the CPU lacks it.
void use_isa(Isa isa);

}  // namespace kernels

// Products with at most this many rows (default 16) use the streaming kernels, which accumulate
// in float32 over the exact stored weights (int8 weights of kQ8MinRows+ rows on Avx512Vnni: against
// 256-block int8 activations); more rows use the bf16 GEMM. Tests raise it to check the cache
// logic of each storage without the GEMM's bf16 rounding.
int64_t skinny_rows_limit();
void set_skinny_rows_limit(int64_t rows);

// Per-output-row symmetric int8: w[o,k] ~ q[o,k] * scale[o], scale = max|w[o,:]| / 127.
struct Int8Matrix {
  torch::Tensor q;      // [O,K] int8
  torch::Tensor scale;  // [O] float32
};
Int8Matrix quantize_int8(const torch::Tensor& w);
torch::Tensor dequantize_int8(const torch::Tensor& q, const torch::Tensor& scale,
                              torch::ScalarType out = torch::kFloat32);

// Group-wise symmetric int4 (as ggml's Q4_0): groups of kInt4Group values along K, each with a
// float16 scale d = m / -8 (m the group's value of largest magnitude, so it maps to -8 exactly),
// q = clamp(round(w / d), -8, 7). Stored as q uint8 [O, ceil(K/32) * 16] (two values a byte: byte j
// of group g holds value 32g + j in its low nibble and 32g + 16 + j in its high one, each as q + 8;
// K padded with zeros to whole groups) and scale float16 [O, ceil(K/32)].
inline constexpr int64_t kInt4Group = 32;
inline int64_t int4_row_bytes(int64_t K) { return (K + kInt4Group - 1) / kInt4Group * (kInt4Group / 2); }
inline int64_t int4_groups(int64_t K) { return (K + kInt4Group - 1) / kInt4Group; }
struct Int4Matrix {
  torch::Tensor q;      // [O, int4_row_bytes(K)] uint8
  torch::Tensor scale;  // [O, int4_groups(K)] float16
};
Int4Matrix quantize_int4(const torch::Tensor& w);
// In memory, victor holds int4 matrices whose rows are a multiple of 4 and whose groups are even
// in number interleaved: [O/4, G/2, 4, 32] bytes, a tile of 4 rows' group pairs side by side, so
// a decode product reads one stream instead of four (the file layout stays [O, G * 16]; every
// function here takes either). int4_interleave returns other shapes as they are.
torch::Tensor int4_interleave(const torch::Tensor& q, int64_t K);
// On AVX-512 VNNI a model's int4 matrices whose rows are a multiple of 16 are tiled by 16 rows
// instead (q [O/16, G, 4, 64], scale [O/16, G, 16]: 16 rows times 4 values per VPDPBUSD; see
// isa_kernels.h). int4_tile16 tiles a file-layout matrix so (false, unchanged, for other shapes);
// int4_tile_for_kernels picks the tiles the active kernels read fastest (16, else 4, else none).
bool int4_tile16(torch::Tensor& q, torch::Tensor& scale, int64_t K);
void int4_tile_for_kernels(torch::Tensor& q, torch::Tensor& scale, int64_t K);
// Back to the file layout: q [O, G * 16] (from tiles of 4 or 16) and scale [O, G] (from tiles of
// 16); anything else is returned as is.
torch::Tensor int4_file_layout(const torch::Tensor& q);
torch::Tensor int4_scale_file_layout(const torch::Tensor& scale);
// The stored values as [O,K] `out` (exactly q * float(scale) in float32 before any cast).
torch::Tensor dequantize_int4(const torch::Tensor& q, const torch::Tensor& scale, int64_t K,
                              torch::ScalarType out = torch::kFloat32);
// Any stored weight (float32, bf16, int8 + scale, int4 + scale) as float32 [O,K].
torch::Tensor weight_as_float(const torch::Tensor& w, const torch::Tensor& scale, int64_t K);

// y = x W^T, x [...,K] float32, W [O,K] float32 / bfloat16 / int8 (then `scale` [O]) / int4 (W uint8
// and `scale` float16 as Int4Matrix: few rows multiply 32-block int8 activations, as llama.cpp's
// Q4_0 x Q8_0; more rows widen W for the GEMM); y float32.
torch::Tensor matmul_weight(const torch::Tensor& x, const torch::Tensor& w,
                            const torch::Tensor& scale = torch::Tensor());
// Whether the bf16 products below run through oneDNN (its optimized bf16 matmul exists for this
// CPU: AVX-512 core or later). Without it, matmul_weight keeps LibTorch's bf16 GEMM,
// matmul_weight_fused declines and the models keep float32 attention. Tests force it off.
bool bf16_gemm_available();
void force_bf16_gemm_off(bool off);
// The one rule for "this product of `rows` rows runs in bf16 through oneDNN": W bf16 or int8,
// more rows than skinny_rows_limit(), and bf16_gemm_available(). matmul_weight, matmul_weight_fused
// and the models' prefill attention (attention_bf16 beside such products) all ask it. Products
// with bf16/int8 weights never record autograd (those models refuse training).
bool takes_bf16_gemm(const torch::Tensor& w, int64_t rows);

// act(x W^T + bias) in one oneDNN bf16 GEMM with float32 output, the bias and the activation
// applied to the float32 result inside it, for bf16/int8 W and more rows than
// skinny_rows_limit() (the rows matmul_weight gives the GEMM). act: "" or an activation name of
// ops.h's activation(). Returns an undefined tensor where that path does not apply (float32 W,
// few rows, another activation), so the caller computes it unfused.
torch::Tensor matmul_weight_fused(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                                  const torch::Tensor& bias, const std::string& act);
// Several products of the same x (the q, k, v projections; the MLP's gate and up): for skinny x
// one pass over all their rows (the activations prepared and the threads started once), else one
// matmul_weight each. Every W has x's K and one storage; `scales` as matmul_weight's (int8 only).
std::vector<torch::Tensor> matmul_weights(const torch::Tensor& x, const std::vector<torch::Tensor>& ws,
                                          const std::vector<torch::Tensor>& scales);
// A copy of `t` in memory advised for transparent huge pages (2 MiB-aligned chunks shared by the
// tensors copied one after another). Streaming gigabytes of weights through 4 KiB pages costs a
// TLB miss every page: decode ran 1.6-2.5x slower from a memory-mapped file or plain malloc'd
// memory (notebook@f64a969). Small tensors come back as is.
torch::Tensor in_huge_pages(const torch::Tensor& t);
// The packing behind in_huge_pages (one process-wide arena); an arena of its own for tests.
class HugePageArena {
 public:
  torch::Tensor copy(const torch::Tensor& t);

 private:
  struct Chunk;
  std::mutex mutex_;
  std::shared_ptr<Chunk> current_;  // the chunk being filled
};

// Decode attention: one new query token per row b of q [B,H,hd] (float32, contiguous), with
// H / Hkv query heads per KV head (Hugging Face's repeat_kv). rows[b] says where that row's keys
// and values are: head h of them at k + h * head_stride (elements), `len` rows of hd each, in
// float32 or bf16 storage; allowed [len] bytes (0 = the key weighs exactly 0). out [B,H,hd]
// float32. Threads over (row, KV head); on every kernel set it computes
// softmax(q k^T / sqrt(hd)) v in float32 without building the score tensors of LibTorch's path.
struct DecodeKv {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t head_stride = 0;
  int64_t len = 0;
  const uint8_t* allowed = nullptr;
};
void attend_decode(const float* q, int64_t B, int64_t H, int64_t Hkv, int64_t hd, bool bf16_kv,
                   const DecodeKv* rows, float* out);

// Prefill attention with bf16 products, what a bf16 or int8 model's other products already do:
// q [B,H,T,hd], k/v [B,Hkv,S,hd] float32 (any strides), allowed [B,T,S] bool or undefined (every
// key). q, k, v and the probabilities are rounded to bf16 and multiplied by oneDNN with float32
// accumulation and outputs; the softmax runs in float32 (keys not allowed weigh exactly 0, a row
// with none gives zeros). Query rows run in blocks so the scores stay within ~48 MiB. Returns
// [B,H,T,hd] float32. The float32 path is attention() (ops.h).
torch::Tensor attention_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& allowed);
// The block of query rows attention_bf16 uses (0 = its default from the memory budget); tests
// shrink it to check the blocks join up.
void set_attention_block_rows(int64_t rows);

// Rows `ids` of an embedding table stored like a weight, as float32 [...,K]; K is the table's
// width (needed for int4 tables, whose packed rows do not say it).
torch::Tensor embedding_rows(const torch::Tensor& table, const torch::Tensor& scale,
                             const torch::Tensor& ids, int64_t K);

}  // namespace victor
