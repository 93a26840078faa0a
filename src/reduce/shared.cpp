// What every reducer row shares that reads the model's config: the formulas written once for every
// kind (each row supplies its rows, layer and parameters: KV rows, prefill FLOPs, the drop layer),
// the rows' default hooks, and the compute defaults. Above config.h; reducer.cpp (the table) is
// below it.
#include <algorithm>
#include <vector>

#include "victor/config.h"
#include "victor/error.h"
#include "victor/reducer.h"

#ifndef VICTOR_SPEC_ONLY
#include "model/internal.h"
#include "victor/model.h"
#endif

namespace victor {

int full_visual_rows(const ModelConfig& c) {
  return c.vision.num_patches() + (c.vision_feature_select_strategy == "full" ? 1 : 0);
}

// ---- Row defaults ----

void ReducerOps::validate(const ModelConfig&) const {}
int ReducerOps::visual_rows(const ModelConfig& c) const { return full_visual_rows(c); }
std::optional<int> ReducerOps::grid_side(const ModelConfig& c) const { return c.vision.image_size / c.vision.patch_size; }

// ---- What every kind shares ----

int Reducer::drop_layer(const ModelConfig& c) const {
  const int L = c.num_layers();
  const auto r = reduce_layer(c);
  return r && kept_visual(visual_rows(c)) == 0 ? std::min(*r, L) : L;
}

int64_t Reducer::rows_past_reduction(const ModelConfig& c, int64_t n) const {
  const auto r = reduce_layer(c);
  const bool reduced = r && *r < c.num_layers();
  return inserted_rows() + (reduced ? kept_visual(int(n)) : n);
}

int64_t Reducer::kv_rows(const ModelConfig& c, int64_t text, int64_t images, int64_t generated) const {
  return kv_rows(c, text, std::vector<int64_t>(size_t(std::max<int64_t>(images, 0)), visual_rows(c)), generated);
}

double Reducer::prefill_flops(const ModelConfig& c, int64_t text, int64_t images) const {
  return prefill_flops(c, text, std::vector<int64_t>(size_t(std::max<int64_t>(images, 0)), visual_rows(c)), images);
}

// Layers before the reduction hold every visual row (the causal mask keeps their keys; Victor's
// registers_only frees them after the prefill, as no later token may read them), the layers from
// it on the kept ones; inserted rows and text are in every layer.
int64_t Reducer::kv_rows(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual,
                         int64_t generated) const {
  const int64_t L = c.num_layers(), base = text + generated, images = int64_t(visual.size());
  const int64_t r = std::min<int64_t>(reduce_layer(c).value_or(int(L)), L), m = inserted_rows();
  int64_t N = 0, kept = 0;
  for (int64_t n : visual) N += n, kept += kept_visual(int(n));
  const int64_t late = base + images * m + kept;
  const int64_t early = base + images * m + (mask() == RegisterMask::Causal ? N : 0);
  return r * early + (L - r) * late;
}

double Reducer::prefill_flops(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual,
                              int64_t views) const {
  const auto& t = c.text;
  const double d = t.hidden_size, H = t.num_attention_heads, Hkv = t.num_key_value_heads;
  const double hd = t.head_dim(), F = t.intermediate_size;
  auto layer = [&](double T) {
    return 2 * T * (d * H * hd + 2 * d * Hkv * hd + H * hd * d + 3 * d * F) + 2 * T * T * H * hd;
  };
  const auto& v = c.vision;
  const double Tv = v.num_patches() + 1, D = v.hidden_size, I = v.intermediate_size;
  const int64_t images = int64_t(visual.size());
  // The tower runs on every patch of every view; the projector on every selected feature (a
  // reducer's own compute after it, per image, on top).
  double vision = views * (c.vision_layers_needed() * (2 * Tv * (4 * D * D + 2 * D * I) + 4 * Tv * Tv * D) +
                           2.0 * full_visual_rows(c) * (D * d + d * d));
  if (const double own = ops().vision_flops(c); own != 0) vision += images * own;
  const int64_t L = c.num_layers(), r = std::min<int64_t>(reduce_layer(c).value_or(int(L)), L), m = inserted_rows();
  int64_t N = 0, kept = 0;
  for (int64_t n : visual) N += n, kept += kept_visual(int(n));
  return vision + r * layer(double(text + N + images * m)) + (L - r) * layer(double(text + kept + images * m));
}

#ifndef VICTOR_SPEC_ONLY
// ---- Compute defaults ----

torch::Tensor ReducerOps::keep_rows(const TokenMeta& meta, const torch::Tensor&) const {
  return meta.kind.eq(int64_t(TokenKind::Text)) | meta.kind.eq(int64_t(TokenKind::Register));
}

torch::Tensor ReducerOps::select_features(const ModelConfig& c, const torch::Tensor& hidden, const VisionLastBlock&,
                                          torch::Tensor*) const {
  return c.vision_feature_select_strategy == "default" ? hidden.narrow(1, 1, hidden.size(1) - 1) : hidden;
}

torch::Tensor ReducerOps::after_projector(const ModelConfig&, const ReducerWeights&, const torch::Tensor& x) const {
  return x;
}

torch::Tensor ReducerOps::inserted(const ReducerWeights&) const {
  throw Error("token reducer '" + spec() + "' inserts no rows");
}

torch::Tensor ReducerOps::pack_views(const ModelConfig&, const torch::Tensor&, const ImageLayout&,
                                     const torch::Tensor&) const {
  throw Error("token reducer '" + spec() + "': its tokens are not on the patch grid and it packs no LLaVA-NeXT views");
}
#endif

}  // namespace victor
