// The language tower: the LLaMA decoder layer (prefill, rows over their own caches, the decode fast path).
#include <algorithm>
#include <cmath>

#include "internal.h"
#include "victor/error.h"
#include "victor/kernels.h"
#include "victor/ops.h"

namespace victor {

namespace {

struct Qkv {
  torch::Tensor q, k, v;  // [B,H,T,hd], [B,Hkv,T,hd] x2, RoPE applied to q and k
};

Qkv project_qkv(const LlamaLayerW& w, const TextConfig& c, const torch::Tensor& x,
                const RopeTables& rope) {
  const int64_t B = x.size(0), T = x.size(1);
  const int64_t H = c.num_attention_heads, Hkv = c.num_key_value_heads, hd = c.head_dim();
  auto h = rms_norm(x, w.input_norm, c.rms_norm_eps);
  auto qkv = dense_many(h, {&w.q, &w.k, &w.v});
  auto q = qkv[0].view({B, T, H, hd}).transpose(1, 2);
  auto k = qkv[1].view({B, T, Hkv, hd}).transpose(1, 2);
  auto v = qkv[2].view({B, T, Hkv, hd}).transpose(1, 2);
  return {apply_rope(q, rope), apply_rope(k, rope), v};
}

// Appends to the cache and returns every key and value it holds, in the queries' dtype (a bf16
// cache: attention computes in float32 on a copy).
void cached_keys(LayerCache& cache, const Qkv& p, const TokenMeta& meta, torch::Tensor& keys,
                 torch::Tensor& values, TokenMeta& key_meta) {
  cache.append(p.k, p.v, meta);
  keys = cache.keys();
  values = cache.values();
  key_meta = cache.key_meta();
  if (keys.scalar_type() != p.q.scalar_type()) {
    keys = keys.to(p.q.scalar_type());
    values = values.to(p.q.scalar_type());
  }
}

// Attention output a [B,H,T,hd] -> the layer's output: residual, post-norm, SwiGLU MLP.
torch::Tensor finish_layer(const LlamaLayerW& w, const TextConfig& c, const torch::Tensor& x,
                           const torch::Tensor& a) {
  const int64_t B = x.size(0), T = x.size(1);
  auto y = x + dense(a.transpose(1, 2).reshape({B, T, -1}), w.o);
  auto h = rms_norm(y, w.post_norm, c.rms_norm_eps);
  auto gate_up = dense_many(h, {&w.gate, &w.up});
  h = dense(torch::silu(gate_up[0]) * gate_up[1], w.down);  // SwiGLU
  return y + h;
}

}  // namespace

torch::Tensor llama_layer(const LlamaLayerW& w, const TextConfig& c, RegisterMask mode, int layer,
                          const torch::Tensor& x, const TokenMeta& meta, const RopeTables& rope,
                          torch::Tensor& allowed, LayerCache* cache, ForwardTrace* trace,
                          RankRequest* rank) {
  const int64_t B = x.size(0);
  const int64_t H = c.num_attention_heads, Hkv = c.num_key_value_heads, hd = c.head_dim();
  Qkv p = project_qkv(w, c, x, rope);
  torch::Tensor keys = p.k, values = p.v;
  TokenMeta key_meta = meta;
  if (cache) cached_keys(*cache, p, meta, keys, values, key_meta);
  if (!allowed.defined()) allowed = attention_allowed(meta, key_meta, mode);
  const bool probe = trace && trace->probe;
  torch::Tensor probs;
  // A bf16 or int8 model's prefill multiplies in bf16 (as its GEMMs do); float32 models, decode
  // and probes keep the float32 path.
  const bool bf16 = !probe && takes_bf16_gemm(w.q.weight, p.q.size(2));
  auto a = bf16 ? attention_bf16(p.q, keys, values, allowed)
                : attention(p.q, keys, values, allowed, probe ? &probs : nullptr);
  if (probe) trace->probe(layer, probs, meta, key_meta);
  if (rank) {
    // FastV: only the query token's attention row, over every key, averaged over the H heads.
    const int64_t S = keys.size(2), G = H / Hkv;
    auto qi = rank->query.view({B, 1, 1, 1}).expand({B, H, 1, hd});
    auto qq = p.q.gather(2, qi).reshape({B, Hkv, G, hd});
    auto scores = torch::matmul(qq, keys.transpose(-1, -2)) / std::sqrt(double(hd));  // [B,Hkv,G,S]
    auto row = allowed.gather(1, rank->query.view({B, 1, 1}).expand({B, 1, S}));     // [B,1,S]
    scores = scores.masked_fill(row.view({B, 1, 1, S}).logical_not(), -1e30);
    rank->scores = torch::softmax(scores, -1).mean(std::vector<int64_t>{1, 2});  // [B,S]
  }
  return finish_layer(w, c, x, a);
}

torch::Tensor llama_layer_rows(const LlamaLayerW& w, const TextConfig& c, RegisterMask mode,
                               const torch::Tensor& x, const std::vector<TokenMeta>& metas,
                               const RopeTables& rope, const std::vector<LayerCache*>& caches) {
  Qkv p = project_qkv(w, c, x, rope);
  std::vector<torch::Tensor> out;
  out.reserve(caches.size());
  for (size_t b = 0; b < caches.size(); ++b) {
    const auto r = int64_t(b);
    Qkv row{p.q.narrow(0, r, 1), p.k.narrow(0, r, 1), p.v.narrow(0, r, 1)};
    torch::Tensor keys, values;
    TokenMeta key_meta;
    cached_keys(*caches[b], row, metas[b], keys, values, key_meta);
    out.push_back(attention(row.q, keys, values, attention_allowed(metas[b], key_meta, mode)));
  }
  return finish_layer(w, c, x, torch::cat(out, 0));
}

DecodeRope decode_rope(const std::vector<int64_t>& pos, int64_t hd, double theta) {
  // As rope_tables: inv_freq = 1 / theta^(2i/hd) and pos * inv_freq in float32, then cos and sin.
  const int64_t half = hd / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) inv[size_t(i)] = 1.f / std::pow(float(theta), float(2 * i) / float(hd));
  DecodeRope r;
  r.cos.resize(pos.size() * size_t(half));
  r.sin.resize(r.cos.size());
  for (size_t b = 0; b < pos.size(); ++b)
    for (int64_t i = 0; i < half; ++i) {
      const float f = float(pos[b]) * inv[size_t(i)];
      r.cos[b * size_t(half) + size_t(i)] = std::cos(f);
      r.sin[b * size_t(half) + size_t(i)] = std::sin(f);
    }
  return r;
}

bool decode_fast_path_ok(const LayerCache& c) {
  auto ok_meta = [&](const torch::Tensor& t) {
    return t.defined() && t.dim() == 2 && t.is_contiguous() && t.scalar_type() == torch::kInt64 &&
           t.size(1) == c.k.size(2);
  };
  return c.k.defined() && c.k.dim() == 4 && c.k.is_contiguous() && c.v.is_contiguous() &&
         c.v.sizes() == c.k.sizes() && c.v.scalar_type() == c.k.scalar_type() &&
         (c.k.scalar_type() == torch::kFloat32 || c.k.scalar_type() == torch::kBFloat16) &&
         ok_meta(c.meta.order) && ok_meta(c.meta.pos) && ok_meta(c.meta.kind) && ok_meta(c.meta.group);
}

namespace {

// out = x * rsqrt(mean(x^2) + eps) * w per row of d, as rms_norm.
void rms_norm_rows(const float* x, const float* w, int64_t B, int64_t d, double eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * d;
    float* ob = out + b * d;
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(xb[i]) * xb[i];
    const float r = 1.f / std::sqrt(float(ss / double(d)) + float(eps));
    for (int64_t i = 0; i < d; ++i) ob[i] = xb[i] * r * w[i];
  }
}

// Rotate-half RoPE in place on x [B,heads,hd] with row b's tables.
void rope_rows(float* x, int64_t B, int64_t heads, int64_t hd, const DecodeRope& r) {
  const int64_t half = hd / 2;
  for (int64_t b = 0; b < B; ++b) {
    const float* cs = r.cos.data() + b * half;
    const float* sn = r.sin.data() + b * half;
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

}  // namespace

torch::Tensor llama_layer_decode(const LlamaLayerW& w, const TextConfig& c, RegisterMask mode,
                                 const torch::Tensor& x_in, const DecodeRope& rope,
                                 const std::vector<DecodeRow>& rows) {
  const int64_t B = x_in.size(0), d = x_in.size(2);
  const int64_t H = c.num_attention_heads, Hkv = c.num_key_value_heads, hd = c.head_dim();
  if (int64_t(rows.size()) != B || x_in.size(1) != 1)
    throw Error("decode: one new token and one cache row per batch row");
  auto x = x_in.contiguous();
  auto h = torch::empty({B, d}, torch::kFloat32);
  rms_norm_rows(x.data_ptr<float>(), w.input_norm.data_ptr<float>(), B, d, c.rms_norm_eps, h.data_ptr<float>());
  auto qkv = dense_many(h, {&w.q, &w.k, &w.v});
  auto q = qkv[0].contiguous(), kn = qkv[1].contiguous(), vn = qkv[2].contiguous();
  rope_rows(q.data_ptr<float>(), B, H, hd, rope);
  rope_rows(kn.data_ptr<float>(), B, Hkv, hd, rope);

  // Append the new keys and values at each cache's length (room made first).
  std::vector<LayerCache*> caches;
  for (const auto& r : rows)
    if (std::find(caches.begin(), caches.end(), r.cache) == caches.end()) caches.push_back(r.cache);
  for (LayerCache* lc : caches)
    if (lc->len + 1 > lc->k.size(2)) lc->grow(std::max(lc->len + 1, 2 * lc->k.size(2)));
  const bool bf16 = rows[0].cache->k.scalar_type() == torch::kBFloat16;
  const float* kp = kn.data_ptr<float>();
  const float* vp = vn.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const DecodeRow& r = rows[size_t(b)];
    LayerCache& lc = *r.cache;
    const int64_t cap = lc.k.size(2), at = lc.len;
    for (int64_t kh = 0; kh < Hkv; ++kh) {
      const int64_t dst = ((r.row * Hkv + kh) * cap + at) * hd, src = (b * Hkv + kh) * hd;
      if (bf16) {
        auto* kd = reinterpret_cast<uint16_t*>(lc.k.data_ptr<at::BFloat16>()) + dst;
        auto* vd = reinterpret_cast<uint16_t*>(lc.v.data_ptr<at::BFloat16>()) + dst;
        for (int64_t i = 0; i < hd; ++i) {
          kd[i] = c10::BFloat16(kp[src + i]).x;  // round to nearest even, as Tensor::to
          vd[i] = c10::BFloat16(vp[src + i]).x;
        }
      } else {
        std::copy(kp + src, kp + src + hd, lc.k.data_ptr<float>() + dst);
        std::copy(vp + src, vp + src + hd, lc.v.data_ptr<float>() + dst);
      }
    }
    const int64_t m = r.row * cap + at;
    lc.meta.order.data_ptr<int64_t>()[m] = r.order;
    lc.meta.pos.data_ptr<int64_t>()[m] = r.pos;
    lc.meta.kind.data_ptr<int64_t>()[m] = int64_t(TokenKind::Text);
    lc.meta.group.data_ptr<int64_t>()[m] = -1;
  }
  for (LayerCache* lc : caches) lc->len += 1;

  // Which keys each new token (a text query) may see: the one rule.
  std::vector<std::vector<uint8_t>> allowed(static_cast<size_t>(B));
  std::vector<DecodeKv> kv(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const DecodeRow& r = rows[size_t(b)];
    const LayerCache& lc = *r.cache;
    const int64_t cap = lc.k.size(2), S = lc.len;
    const int64_t* ord = lc.meta.order.data_ptr<int64_t>() + r.row * cap;
    const int64_t* kind = lc.meta.kind.data_ptr<int64_t>() + r.row * cap;
    const int64_t* group = lc.meta.group.data_ptr<int64_t>() + r.row * cap;
    auto& al = allowed[size_t(b)];
    al.resize(size_t(S));
    for (int64_t s = 0; s < S; ++s)
      al[size_t(s)] = key_visible(r.order, int64_t(TokenKind::Text), -1, ord[s], kind[s], group[s], mode);
    const int64_t base = r.row * Hkv * cap * hd * int64_t(lc.k.element_size());  // in bytes
    kv[size_t(b)] = {static_cast<const char*>(lc.k.data_ptr()) + base,
                     static_cast<const char*>(lc.v.data_ptr()) + base, cap * hd, S, al.data()};
  }
  auto a = torch::empty({B, H * hd}, torch::kFloat32);
  attend_decode(q.data_ptr<float>(), B, H, Hkv, hd, bf16, kv.data(), a.data_ptr<float>());

  // Residual, post-norm, SwiGLU MLP, residual: finish_layer on raw buffers.
  auto y = dense(a, w.o).contiguous();
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < B * d; ++i) yp[i] = xp[i] + yp[i];
  rms_norm_rows(yp, w.post_norm.data_ptr<float>(), B, d, c.rms_norm_eps, h.data_ptr<float>());
  auto gate_up = dense_many(h, {&w.gate, &w.up});
  auto g = gate_up[0].contiguous(), u = gate_up[1].contiguous();
  float* gp = g.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  for (int64_t i = 0; i < g.numel(); ++i) gp[i] = gp[i] / (1.f + std::exp(-gp[i])) * up[i];
  auto out = dense(g, w.down).contiguous();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < B * d; ++i) op[i] = yp[i] + op[i];
  return out.view({B, 1, d});
}

}  // namespace victor
