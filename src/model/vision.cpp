// The vision tower: CLIP-style ViT (class token, learned positions, pre-LN blocks).
#include <cmath>

#include "internal.h"
#include "victor/kernels.h"
#include "victor/ops.h"

namespace victor {

namespace {

torch::Tensor vision_block(const VisionLayerW& w, const VisionConfig& c, torch::Tensor x,
                           VisionLastBlock* last) {
  const int64_t n = x.size(0), T = x.size(1), D = x.size(2);
  const int64_t H = c.num_attention_heads, hd = D / H;
  auto h = layer_norm(x, w.ln1.weight, w.ln1.bias, c.layer_norm_eps);
  auto split = [&](const torch::Tensor& t) { return t.view({n, T, H, hd}).transpose(1, 2); };
  auto q = split(dense(h, w.q));
  auto k = split(dense(h, w.k));
  auto v = split(dense(h, w.v));
  torch::Tensor a;  // [n,H,T,hd]
  if (!last && takes_bf16_gemm(w.q.weight, T)) {
    a = attention_bf16(q, k, v, torch::Tensor());  // bf16 products, as the weights' own
  } else {
    auto p = torch::softmax(torch::matmul(q * (1.0 / std::sqrt(double(hd))), k.transpose(-1, -2)), -1);  // [n,H,T,T]
    if (last) {
      last->cls_attention = p.select(2, 0).mean(1);  // [n,T]
      last->keys = k.mean(1);                        // [n,T,hd]
    }
    a = torch::matmul(p, v);
  }
  a = a.transpose(1, 2).reshape({n, T, D});
  x = x + dense(a, w.out);
  h = layer_norm(x, w.ln2.weight, w.ln2.bias, c.layer_norm_eps);
  h = dense(dense_act(h, w.fc1, c.hidden_act), w.fc2);
  return x + h;
}

}  // namespace

torch::Tensor vision_forward(const VisionW& w, const VisionConfig& c, const torch::Tensor& pixels,
                             int layers, VisionLastBlock* last) {
  const int64_t n = pixels.size(0), D = c.hidden_size;
  auto patches = torch::conv2d(pixels, w.patch_embedding, {}, c.patch_size);  // [n,D,g,g]
  patches = patches.flatten(2).transpose(1, 2);                               // [n,N,D]
  auto cls = w.class_embedding.view({1, 1, D}).expand({n, 1, D});
  auto x = torch::cat({cls, patches}, 1) + w.position_embedding.unsqueeze(0);  // [n,1+N,D]
  x = layer_norm(x, w.pre_ln.weight, w.pre_ln.bias, c.layer_norm_eps);       // hidden_states[0]
  for (int i = 0; i < layers; ++i) x = vision_block(w.layers[i], c, x, i == layers - 1 ? last : nullptr);
  return x;
}

torch::Tensor visionzip_select(const torch::Tensor& hidden, const VisionLastBlock& last, int dominant,
                               int contextual, torch::Tensor* dominant_idx) {
  const int64_t n = hidden.size(0), N = hidden.size(1) - 1, D = hidden.size(2);
  auto patches = hidden.narrow(1, 1, N);
  // Dominant: the top class-token attention over the patches, kept in patch order.
  auto top = std::get<1>(last.cls_attention.narrow(1, 1, N).topk(dominant, 1));
  auto idx = std::get<0>(top.sort(1));  // [n,dominant]
  if (dominant_idx) *dominant_idx = idx;
  auto dom = patches.gather(1, idx.unsqueeze(-1).expand({n, dominant, D}));
  if (contextual == 0) return dom;
  // The rest, in patch order: M = N - dominant patches per image.
  auto is_dom = torch::zeros({n, N}, torch::kBool).scatter_(1, idx, true);
  const int64_t M = N - dominant;
  auto rest_idx = std::get<1>(is_dom.to(torch::kInt64).sort(1, /*descending=*/false)).narrow(1, 0, M);
  rest_idx = std::get<0>(rest_idx.sort(1));
  auto rest = patches.gather(1, rest_idx.unsqueeze(-1).expand({n, M, D}));
  const int64_t hd = last.keys.size(2);
  auto keys = last.keys.narrow(1, 1, N).gather(1, rest_idx.unsqueeze(-1).expand({n, M, hd}));
  keys = keys / keys.norm(2, -1, true);
  // Targets: every step-th of the rest (the first `contextual`); each other patch joins the target
  // whose key is most similar, and a contextual token is its target plus the mean of its joiners.
  const int64_t step = std::max<int64_t>(1, M / contextual);
  auto target_pos = torch::arange(0, M, step, torch::kInt64).narrow(0, 0, contextual);
  auto is_target = torch::zeros({M}, torch::kBool).index_fill_(0, target_pos, true);
  auto other_pos = torch::nonzero(is_target.logical_not()).squeeze(1);
  auto sim = torch::matmul(keys.index_select(1, other_pos), keys.index_select(1, target_pos).transpose(1, 2));
  auto assign = torch::zeros({n, other_pos.size(0), int64_t(contextual)}, hidden.options())
                    .scatter_(2, sim.argmax(2, true), 1.0);  // [n,others,contextual]
  auto counts = assign.sum(1).clamp_min(1).unsqueeze(-1);    // [n,contextual,1]
  auto merged = torch::matmul(assign.transpose(1, 2), rest.index_select(1, other_pos)) / counts;
  return torch::cat({dom, rest.index_select(1, target_pos) + merged}, 1);
}

}  // namespace victor
