#include "victor/ops.h"

#include <algorithm>
#include <cmath>

#include "victor/error.h"
#include "victor/kernels.h"

namespace victor {

torch::Tensor dense(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  const bool grad = torch::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad());
  if (!grad && x.numel() == x.size(-1)) {
    // One row: matrix-vector product streams the weights at full bandwidth.
    auto y = at::mv(w, x.reshape({-1}));
    if (b.defined()) y.add_(b);
    auto shape = x.sizes().vec();
    shape.back() = w.size(0);
    return y.reshape(shape);
  }
  auto x2 = x.reshape({-1, x.size(-1)});
  auto y = b.defined() ? at::addmm(b, x2, w.t()) : at::mm(x2, w.t());
  auto shape = x.sizes().vec();
  shape.back() = w.size(0);
  return y.reshape(shape);
}

torch::Tensor dense(const torch::Tensor& x, const LinearW& w) {
  if (w.weight.scalar_type() == torch::kFloat32) return dense(x, w.weight, w.bias);
  if (w.bias.defined()) {
    auto y = matmul_weight_fused(x, w.weight, w.scale, w.bias, "");
    if (y.defined()) return y;
  }
  auto y = matmul_weight(x, w.weight, w.scale);
  if (w.bias.defined()) y.add_(w.bias);
  return y;
}

torch::Tensor dense_act(const torch::Tensor& x, const LinearW& w, const std::string& act) {
  if (w.weight.scalar_type() != torch::kFloat32) {  // (matmul_weight_fused decides when it applies)
    auto y = matmul_weight_fused(x, w.weight, w.scale, w.bias, act);
    if (y.defined()) return y;
  }
  return activation(dense(x, w), act);
}

std::vector<torch::Tensor> dense_many(const torch::Tensor& x, const std::vector<const LinearW*>& ws) {
  std::vector<torch::Tensor> ys;
  bool same = !ws.empty() && ws[0]->weight.scalar_type() != torch::kFloat32;
  for (const LinearW* w : ws) same = same && w->weight.scalar_type() == ws[0]->weight.scalar_type();
  if (!same) {
    for (const LinearW* w : ws) ys.push_back(dense(x, *w));
    return ys;
  }
  std::vector<torch::Tensor> weights, scales;
  for (const LinearW* w : ws) {
    weights.push_back(w->weight);
    scales.push_back(w->scale);
  }
  ys = matmul_weights(x, weights, scales);
  for (size_t i = 0; i < ws.size(); ++i)
    if (ws[i]->bias.defined()) ys[i].add_(ws[i]->bias);
  return ys;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  auto var = x.pow(2).mean(-1, /*keepdim=*/true);
  return x * torch::rsqrt(var + eps) * w;
}

void rms_norm_rows(const float* x, const float* w, int64_t rows, int64_t d, double eps, float* out) {
  for (int64_t b = 0; b < rows; ++b) {
    const float* xb = x + b * d;
    float* ob = out + b * d;
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(xb[i]) * xb[i];
    const float r = 1.f / std::sqrt(float(ss / double(d)) + float(eps));
    for (int64_t i = 0; i < d; ++i) ob[i] = xb[i] * r * w[i];
  }
}

torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                         double eps) {
  return torch::layer_norm(x, {x.size(-1)}, w, b, eps);
}

torch::Tensor activation(const torch::Tensor& x, const std::string& name) {
  if (name == "gelu") return torch::gelu(x);
  if (name == "gelu_pytorch_tanh") return torch::gelu(x, "tanh");
  if (name == "quick_gelu") return x * torch::sigmoid(1.702 * x);
  if (name == "silu") return torch::silu(x);
  if (name == "relu") return torch::relu(x);
  throw Error("unknown activation '" + name + "'");
}

RopeTables rope_tables(const torch::Tensor& pos, int64_t hd, double theta) {
  auto idx = torch::arange(0, hd, 2, torch::kFloat32) / float(hd);
  auto inv_freq = 1.0 / torch::pow(torch::tensor(float(theta)), idx);  // [hd/2]
  auto freqs = pos.to(torch::kFloat32).unsqueeze(-1) * inv_freq;        // [B,T,hd/2]
  auto emb = torch::cat({freqs, freqs}, -1).unsqueeze(1);               // [B,1,T,hd]
  return {emb.cos(), emb.sin()};
}

torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& t) {
  const int64_t hd = x.size(-1);
  auto x1 = x.narrow(-1, 0, hd / 2), x2 = x.narrow(-1, hd / 2, hd / 2);
  return x * t.cos + torch::cat({-x2, x1}, -1) * t.sin;  // rotate-half
}

void rope_rows(float* x, int64_t B, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t b = 0; b < B; ++b) {
    const float* cs = cos + b * half;
    const float* sn = sin + b * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* xh = x + (b * heads + h) * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = xh[i], c = xh[i + half];
        xh[i] = a * cs[i] - c * sn[i];
        xh[i + half] = c * cs[i] + a * sn[i];
      }
    }
  }
}

torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& pos, double theta) {
  return apply_rope(x, rope_tables(pos, x.size(-1), theta));
}

int64_t attention_query_block(int64_t heads, int64_t keys) {
  return std::max<int64_t>(16, (int64_t(64) << 20) / std::max<int64_t>(1, heads * keys * 4));
}

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& allowed, torch::Tensor* probs) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = H / Hkv;
  const double scale = 1.0 / std::sqrt(double(hd));
  // A finite floor: disallowed keys get exactly zero probability, and a row with no allowed key
  // (padding) stays finite instead of NaN.
  auto mask = allowed.view({B, 1, 1, T, S}).logical_not();
  if (T == 1) {
    // Decode: the G query heads of a KV head are the rows of one product [G,hd] x [hd,S], so the
    // cache is read once, never broadcast into G copies (which cost more than the weights over a
    // 640-token cache).
    auto scores = torch::matmul(q.reshape({B, Hkv, G, hd}), k.transpose(-1, -2)) * scale;
    auto p = torch::softmax(scores.view({B, Hkv, G, 1, S}).masked_fill(mask, -1e30), -1);
    if (probs) *probs = p.reshape({B, H, T, S});
    return torch::matmul(p.view({B, Hkv, G, S}), v).reshape({B, H, T, hd});
  }
  // A batched prefill's scores ([B,H,T,S] floats, a few times over: scores, mask, softmax) would
  // cost more than its KV cache at 7B shapes (batch 16 x 640 tokens: 0.8 GB each); without
  // autograd, rows of the batch run one at a time, each exactly as the batched product would.
  const bool grad = torch::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  if (B > 1 && !probs && !grad && B * H * T * S * 4 > (int64_t(256) << 20)) {
    std::vector<torch::Tensor> rows;
    for (int64_t b = 0; b < B; ++b)
      rows.push_back(attention(q.narrow(0, b, 1), k.narrow(0, b, 1), v.narrow(0, b, 1), allowed.narrow(0, b, 1), nullptr));
    return torch::cat(rows, 0);
  }
  const int64_t tb = attention_query_block(H, S);
  if (B == 1 && !probs && !grad && T > tb) {
    std::vector<torch::Tensor> blocks;
    for (int64_t t0 = 0; t0 < T; t0 += tb) {
      const int64_t n = std::min(tb, T - t0);
      blocks.push_back(attention(q.narrow(2, t0, n), k, v, allowed.narrow(1, t0, n), nullptr));
    }
    return torch::cat(blocks, 2);
  }
  // Query head h uses key/value head h / G (Hugging Face's repeat_kv), without copying K/V.
  auto qg = q.reshape({B, Hkv, G, T, hd});
  auto scores = torch::matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale;
  scores = scores.masked_fill(mask, -1e30);
  auto p = torch::softmax(scores, -1);
  if (probs) *probs = p.reshape({B, H, T, S});
  auto out = torch::matmul(p, v.unsqueeze(2));  // [B,Hkv,G,T,hd]
  return out.reshape({B, H, T, hd});
}

}  // namespace victor
