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

}  // namespace victor
