// The small numeric building blocks, each tested against a reference computation.
#pragma once
#include <torch/torch.h>

namespace victor {

// A weight matrix [out,in] in its storage dtype (f32, bf16, or int8 with `scale` [out]) and an
// optional float32 bias.
struct LinearW {
  torch::Tensor weight, bias, scale;
};

// y = x W^T (+ b) for any storage: float32 weights take the paths below (and autograd);
// bf16/int8 weights run victor's kernels (kernels.h).
torch::Tensor dense(const torch::Tensor& x, const LinearW& w);
// activation(dense(x, w), act), the bias and activation fused into a bf16/int8 weight's GEMM
// where it takes them (matmul_weight_fused).
torch::Tensor dense_act(const torch::Tensor& x, const LinearW& w, const std::string& act);

// dense(x, w) for each w of `ws` (same input features, same storage): bf16/int8 weights with
// decode-shaped x run as one pass over all their rows (kernels.h matmul_weights); float32
// weights (and autograd) one dense each.
std::vector<torch::Tensor> dense_many(const torch::Tensor& x, const std::vector<const LinearW*>& ws);

// y = x W^T (+ b). One-row inputs without autograd go through mv: at::linear streams
// weights at a fraction of the bandwidth for decode-shaped products.
torch::Tensor dense(const torch::Tensor& x, const torch::Tensor& w,
                    const torch::Tensor& b = torch::Tensor());
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps);
// The same RMSNorm on raw float32 rows (a decode step, without per-op dispatch): out = x *
// rsqrt(mean(x^2) + eps) * w per row of d (tests hold it to rms_norm).
void rms_norm_rows(const float* x, const float* w, int64_t rows, int64_t d, double eps, float* out);
torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                         double eps);
torch::Tensor activation(const torch::Tensor& x, const std::string& name);
// Hugging Face rotate-half RoPE. x [B,H,T,hd], pos [B,T] int64.
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& pos, double theta);
// The cos/sin tables for positions pos ([B,1,T,hd] each), computed once and shared by layers.
struct RopeTables {
  torch::Tensor cos, sin;
};
RopeTables rope_tables(const torch::Tensor& pos, int64_t head_dim, double theta);
torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& t);
// The same rotation in place on raw rows x [B,heads,hd] with row b's first-half tables cos/sin
// [B,hd/2] (rope_tables' values; tests hold it to apply_rope).
void rope_rows(float* x, int64_t B, int64_t heads, int64_t hd, const float* cos, const float* sin);
// Grouped-query attention. q [B,H,T,hd], k/v [B,Hkv,S,hd], allowed [B,T,S] bool.
// Returns [B,H,T,hd]; probs (optional out) [B,H,T,S].
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& allowed, torch::Tensor* probs = nullptr);
// Without probs or autograd, a long prefill's queries run in blocks of this many rows, so its
// scores ([H, block, S] floats, three copies: scores, masked, softmax) stay near 64 MiB instead of
// growing with T x S (3.5 GB at 7B shapes and 3,000 rows). Rows are independent: same result.
int64_t attention_query_block(int64_t heads, int64_t keys);

}  // namespace victor
