// The language tower: the LLaMA decoder layer (prefill, rows over their own caches, the decode fast path).
#include <algorithm>
#include <cmath>

#include "internal.h"
#include "victor/error.h"
#include "victor/kernels.h"
#include "victor/ops.h"

namespace victor {

namespace {

// ---- One decoder-layer recipe ----
// Pre-norm attention and a SwiGLU MLP, each with its residual. Prefill (and training), requests
// decoding over their own caches, and the decode fast path all run this one function; they differ
// only in their Steps: how attention reads and extends the cache (Steps::attend: RoPE, the cache
// append, the key-visibility rule, attention -> [.., H*hd]), and whether the elementwise steps
// run as LibTorch ops (autograd, any dtype) or on raw float rows (a decode step, without
// LibTorch's per-op dispatch). The weight products are the same dense/dense_many everywhere.
template <class Steps>
torch::Tensor decoder_layer(const LlamaLayerW& w, const TextConfig& c, const torch::Tensor& x, Steps& s) {
  auto h = s.norm(x, w.input_norm, c.rms_norm_eps);
  auto qkv = dense_many(h, {&w.q, &w.k, &w.v});
  auto a = s.attend(qkv[0], qkv[1], qkv[2]);
  auto y = s.add(x, dense(a, w.o));
  h = s.norm(y, w.post_norm, c.rms_norm_eps);
  auto gate_up = dense_many(h, {&w.gate, &w.up});
  return s.add(y, dense(s.swiglu(gate_up[0], gate_up[1]), w.down));
}

// The elementwise steps as LibTorch ops.
struct TorchSteps {
  torch::Tensor norm(const torch::Tensor& x, const torch::Tensor& w, double eps) const { return rms_norm(x, w, eps); }
  torch::Tensor add(const torch::Tensor& x, const torch::Tensor& y) const { return x + y; }
  torch::Tensor swiglu(const torch::Tensor& g, const torch::Tensor& u) const { return torch::silu(g) * u; }
};

struct Qkv {
  torch::Tensor q, k, v;  // [B,H,T,hd], [B,Hkv,T,hd] x2, RoPE applied to q and k
};

// Projections [B,T,*] -> heads, with RoPE on q and k.
Qkv split_heads(const TextConfig& c, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                const RopeTables& rope) {
  const int64_t B = q.size(0), T = q.size(1);
  const int64_t H = c.num_attention_heads, Hkv = c.num_key_value_heads, hd = c.head_dim();
  return {apply_rope(q.view({B, T, H, hd}).transpose(1, 2), rope),
          apply_rope(k.view({B, T, Hkv, hd}).transpose(1, 2), rope), v.view({B, T, Hkv, hd}).transpose(1, 2)};
}

// Heads [B,H,T,hd] -> [B,T,H*hd].
torch::Tensor merge_heads(const torch::Tensor& a) {
  return a.transpose(1, 2).reshape({a.size(0), a.size(2), -1});
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

// A batch of sequences (prefill, training, the LibTorch decode): every row's keys in one cache
// (or none), the visibility mask shared by the layers on one side of a reduction, probes and
// FastV's ranking.
struct SequenceSteps : TorchSteps {
  const LlamaLayerW& w;
  const TextConfig& c;
  RegisterMask mode;
  int layer;
  const TokenMeta& meta;
  const RopeTables& rope;
  torch::Tensor& allowed;
  LayerCache* cache;
  ForwardTrace* trace;
  RankRequest* rank;

  torch::Tensor attend(const torch::Tensor& q_in, const torch::Tensor& k_in, const torch::Tensor& v_in) {
    const int64_t B = q_in.size(0);
    const int64_t H = c.num_attention_heads, Hkv = c.num_key_value_heads, hd = c.head_dim();
    Qkv p = split_heads(c, q_in, k_in, v_in, rope);
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
    return merge_heads(a);
  }
};

// One new token per row, each row with its own cache (requests of different lengths decoding
// together): attention per row over its own keys.
struct RowsSteps : TorchSteps {
  const TextConfig& c;
  RegisterMask mode;
  const std::vector<TokenMeta>& metas;
  const RopeTables& rope;
  const std::vector<LayerCache*>& caches;

  torch::Tensor attend(const torch::Tensor& q_in, const torch::Tensor& k_in, const torch::Tensor& v_in) {
    Qkv p = split_heads(c, q_in, k_in, v_in, rope);
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
    return merge_heads(torch::cat(out, 0));
  }
};

// The decode fast path: one new token per row as [B,d] float32 rows, the elementwise steps and
// the cache append on raw buffers (rms_norm_rows, rope_rows), attention by kernels::attend_decode.
struct DecodeSteps {
  const TextConfig& c;
  RegisterMask mode;
  const DecodeRope& rope;
  const std::vector<DecodeRow>& rows;

  torch::Tensor norm(const torch::Tensor& x, const torch::Tensor& w, double eps) const {
    auto out = torch::empty_like(x);
    rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), x.size(0), x.size(1), eps, out.data_ptr<float>());
    return out;
  }
  torch::Tensor add(const torch::Tensor& x, const torch::Tensor& y_in) const {
    auto y = y_in.contiguous();
    float* yp = y.data_ptr<float>();
    const float* xp = x.data_ptr<float>();
    for (int64_t i = 0; i < y.numel(); ++i) yp[i] = xp[i] + yp[i];
    return y;
  }
  torch::Tensor swiglu(const torch::Tensor& g_in, const torch::Tensor& u_in) const {
    auto g = g_in.contiguous(), u = u_in.contiguous();
    float* gp = g.data_ptr<float>();
    const float* up = u.data_ptr<float>();
    for (int64_t i = 0; i < g.numel(); ++i) gp[i] = gp[i] / (1.f + std::exp(-gp[i])) * up[i];
    return g;
  }

  torch::Tensor attend(const torch::Tensor& q_in, const torch::Tensor& k_in, const torch::Tensor& v_in) {
    const int64_t B = q_in.size(0);
    const int64_t H = c.num_attention_heads, Hkv = c.num_key_value_heads, hd = c.head_dim();
    auto q = q_in.contiguous(), kn = k_in.contiguous(), vn = v_in.contiguous();
    rope_rows(q.data_ptr<float>(), B, H, hd, rope.cos.data(), rope.sin.data());
    rope_rows(kn.data_ptr<float>(), B, Hkv, hd, rope.cos.data(), rope.sin.data());

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
    return a;
  }
};

}  // namespace

torch::Tensor llama_layer(const LlamaLayerW& w, const TextConfig& c, RegisterMask mode, int layer,
                          const torch::Tensor& x, const TokenMeta& meta, const RopeTables& rope,
                          torch::Tensor& allowed, LayerCache* cache, ForwardTrace* trace,
                          RankRequest* rank) {
  SequenceSteps s{{}, w, c, mode, layer, meta, rope, allowed, cache, trace, rank};
  return decoder_layer(w, c, x, s);
}

torch::Tensor llama_layer_rows(const LlamaLayerW& w, const TextConfig& c, RegisterMask mode,
                               const torch::Tensor& x, const std::vector<TokenMeta>& metas,
                               const RopeTables& rope, const std::vector<LayerCache*>& caches) {
  RowsSteps s{{}, c, mode, metas, rope, caches};
  return decoder_layer(w, c, x, s);
}

DecodeRope decode_rope(const std::vector<int64_t>& pos, int64_t hd, double theta) {
  // rope_tables' own values (its cos/sin repeat over the two halves: the first half is kept).
  const int64_t B = int64_t(pos.size()), half = hd / 2;
  RopeTables t = rope_tables(torch::tensor(pos, torch::kInt64).view({B, 1}), hd, theta);  // [B,1,1,hd]
  auto cos = t.cos.reshape({B, hd}).narrow(1, 0, half).contiguous();
  auto sin = t.sin.reshape({B, hd}).narrow(1, 0, half).contiguous();
  DecodeRope r;
  r.cos.assign(cos.data_ptr<float>(), cos.data_ptr<float>() + B * half);
  r.sin.assign(sin.data_ptr<float>(), sin.data_ptr<float>() + B * half);
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

torch::Tensor llama_layer_decode(const LlamaLayerW& w, const TextConfig& c, RegisterMask mode,
                                 const torch::Tensor& x_in, const DecodeRope& rope,
                                 const std::vector<DecodeRow>& rows) {
  const int64_t B = x_in.size(0), d = x_in.size(2);
  if (int64_t(rows.size()) != B || x_in.size(1) != 1)
    throw Error("decode: one new token and one cache row per batch row");
  DecodeSteps s{c, mode, rope, rows};
  return decoder_layer(w, c, x_in.contiguous().view({B, d}), s).view({B, 1, d});
}

}  // namespace victor
