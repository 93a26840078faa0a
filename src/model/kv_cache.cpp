// The KV cache: per-layer keys and values with their tokens' bookkeeping, compaction when rows
// leave, and the key-visibility rule as a mask.
#include <ATen/Parallel.h>

#include <algorithm>

#include "victor/kv_cache.h"

namespace victor {

TokenMeta TokenMeta::gather(const torch::Tensor& index) const {
  return {order.gather(1, index), pos.gather(1, index), kind.gather(1, index),
          group.gather(1, index)};
}

TokenMeta TokenMeta::cat(const TokenMeta& o) const {
  return {torch::cat({order, o.order}, 1), torch::cat({pos, o.pos}, 1),
          torch::cat({kind, o.kind}, 1), torch::cat({group, o.group}, 1)};
}

TokenMeta TokenMeta::narrow(int64_t start, int64_t len) const {
  return {order.narrow(1, start, len), pos.narrow(1, start, len), kind.narrow(1, start, len),
          group.narrow(1, start, len)};
}

torch::Tensor compaction_index(const torch::Tensor& keep) {
  const int64_t B = keep.size(0), T = keep.size(1);
  auto ar = torch::arange(T, torch::kInt64).expand({B, T});
  auto key = torch::where(keep, ar, ar + T);
  auto sorted = std::get<0>(key.sort(1));
  auto counts = keep.sum(1);
  int64_t kept = B == 0 ? 0 : counts.max().item<int64_t>();
  auto idx = sorted.narrow(1, 0, kept);
  auto col = torch::arange(kept, torch::kInt64).expand({B, kept});
  return torch::where(col.lt(counts.unsqueeze(1)), idx, torch::full_like(idx, T));
}

namespace {

TokenMeta pad_meta(int64_t B, int64_t n) {
  auto z = torch::zeros({B, n}, torch::kInt64);
  return {z, z.clone(), torch::full({B, n}, static_cast<int64_t>(TokenKind::Pad)),
          torch::full({B, n}, int64_t(-1))};
}

void copy_meta(TokenMeta& dst, int64_t at, const TokenMeta& src) {
  const int64_t t = src.length();
  dst.order.narrow(1, at, t).copy_(src.order);
  dst.pos.narrow(1, at, t).copy_(src.pos);
  dst.kind.narrow(1, at, t).copy_(src.kind);
  dst.group.narrow(1, at, t).copy_(src.group);
}

}  // namespace

void LayerCache::append(const torch::Tensor& k_new, const torch::Tensor& v_new,
                        const TokenMeta& m) {
  const int64_t t = k_new.size(2);
  if (!k.defined()) {
    auto shape = k_new.sizes().vec();
    shape[2] = 0;
    k = torch::zeros(shape, k_new.options().dtype(dtype));
    v = torch::zeros(shape, v_new.options().dtype(dtype));
    meta = pad_meta(k_new.size(0), 0);
  }
  if (len + t > k.size(2)) grow(std::max(len + t, 2 * k.size(2)));
  k.narrow(2, len, t).copy_(k_new);
  v.narrow(2, len, t).copy_(v_new);
  copy_meta(meta, len, m);
  len += t;
}

void LayerCache::keep_only(const torch::Tensor& keep) {
  if (keep.all().item<bool>()) return;
  auto idx = compaction_index(keep);  // [B,T'] into len+1 rows (last = padding)
  const int64_t B = k.size(0), Hkv = k.size(1), hd = k.size(3), T2 = idx.size(1);
  auto pad = torch::zeros({B, Hkv, 1, hd}, k.options());
  auto gidx = idx.view({B, 1, T2, 1}).expand({B, Hkv, T2, hd});
  auto k2 = torch::cat({keys(), pad}, 2).gather(2, gidx);
  auto v2 = torch::cat({values(), pad}, 2).gather(2, gidx);
  TokenMeta m2 = key_meta().cat(pad_meta(B, 1)).gather(idx);
  k = k2;
  v = v2;
  meta = m2;
  len = T2;
}

int64_t LayerCache::bytes() const {
  if (!k.defined()) return 0;
  return 2 * k.size(0) * k.size(1) * len * k.size(3) * int64_t(k.element_size());
}

int64_t KvCache::bytes() const {
  int64_t b = 0;
  for (auto& l : layers) b += l.bytes();
  return b;
}

void LayerCache::grow(int64_t capacity) {
  if (capacity <= k.size(2)) return;
  auto shape = k.sizes().vec();
  shape[2] = capacity;
  auto k2 = torch::zeros(shape, k.options()), v2 = torch::zeros(shape, v.options());
  TokenMeta m2 = pad_meta(k.size(0), capacity);
  if (len > 0) {
    k2.narrow(2, 0, len).copy_(keys());
    v2.narrow(2, 0, len).copy_(values());
    copy_meta(m2, 0, key_meta());
  }
  k = k2;
  v = v2;
  meta = m2;
}

void KvCache::reserve(int64_t extra) {
  for (auto& l : layers)
    if (l.k.defined()) l.grow(l.len + extra);
}

torch::Tensor attention_allowed(const TokenMeta& qm, const TokenMeta& km, RegisterMask mode) {
  const int64_t B = qm.rows(), Tq = qm.length(), S = km.length();
  auto q_order = qm.order.contiguous(), q_kind = qm.kind.contiguous(), q_group = qm.group.contiguous();
  auto k_order = km.order.contiguous(), k_kind = km.kind.contiguous(), k_group = km.group.contiguous();
  auto out = torch::empty({B, Tq, S}, torch::kBool);
  const int64_t *qo = q_order.data_ptr<int64_t>(), *qk = q_kind.data_ptr<int64_t>(), *qg = q_group.data_ptr<int64_t>();
  const int64_t *ko = k_order.data_ptr<int64_t>(), *kk = k_kind.data_ptr<int64_t>(), *kg = k_group.data_ptr<int64_t>();
  bool* o = out.data_ptr<bool>();
  at::parallel_for(0, B * Tq, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Tq;
      const int64_t* kob = ko + b * S;
      const int64_t* kkb = kk + b * S;
      const int64_t* kgb = kg + b * S;
      bool* row = o + i * S;
      for (int64_t s = 0; s < S; ++s) row[s] = key_visible(qo[i], qk[i], qg[i], kob[s], kkb[s], kgb[s], mode);
    }
  });
  return out;  // [B,Tq,S]
}

}  // namespace victor
