// The KV cache and the bookkeeping every token carries into it: its order, RoPE position, kind and
// image; the rule for which keys a query may see (attention_rule.h) applied to whole tensors.
#pragma once
#include <torch/torch.h>

#include <vector>

#include "victor/attention_rule.h"

namespace victor {

// Per-token bookkeeping that travels with the hidden states, through the drop and into the cache.
struct TokenMeta {
  torch::Tensor order;  // [B,T] int64: causal order (index in the full padded sequence)
  torch::Tensor pos;    // [B,T] int64: RoPE position (kept through the drop)
  torch::Tensor kind;   // [B,T] int64 TokenKind
  torch::Tensor group;  // [B,T] int64: image index in the row for visual/registers, else -1
  TokenMeta gather(const torch::Tensor& index) const;  // index [B,T']
  TokenMeta cat(const TokenMeta& other) const;         // along T
  TokenMeta narrow(int64_t start, int64_t len) const;
  int64_t rows() const { return order.size(0); }
  int64_t length() const { return order.size(1); }
};

// One layer's keys and values, with their own length: layers < k hold visual rows (causal),
// layers >= k never do.
struct LayerCache {
  torch::Tensor k, v;  // [B,Hkv,capacity,hd], in `dtype`
  torch::ScalarType dtype = torch::kFloat32;
  TokenMeta meta;      // [B,capacity]
  int64_t len = 0;
  torch::Tensor keys() const { return k.narrow(2, 0, len); }
  torch::Tensor values() const { return v.narrow(2, 0, len); }
  TokenMeta key_meta() const { return meta.narrow(0, len); }
  void append(const torch::Tensor& k_new, const torch::Tensor& v_new, const TokenMeta& m);
  void keep_only(const torch::Tensor& keep);  // keep [B,len] bool; compacts rows
  void grow(int64_t capacity);                // room for `capacity` rows (k defined), rows kept
  int64_t bytes() const;                      // bytes of the len used rows (K and V)
};

struct KvCache {
  std::vector<LayerCache> layers;
  int64_t next_order = 0;
  torch::Tensor next_pos;  // [B] int64
  int64_t bytes() const;
  void reserve(int64_t extra);  // grow capacity so `extra` more tokens append without copies
};

// Keeps rows where keep[b,t]; pads shorter rows on the right. Returns gather index [B,T'] into
// a sequence of length T+1 whose last row is padding.
torch::Tensor compaction_index(const torch::Tensor& keep);

// key_visible for queries (qm) over keys (km) -> [B,Tq,S] bool.
torch::Tensor attention_allowed(const TokenMeta& qm, const TokenMeta& km, RegisterMask mode);

}  // namespace victor
