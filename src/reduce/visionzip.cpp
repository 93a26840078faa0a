// VisionZip (training-free): in the vision tower's selected layer keep the `dominant` patches the
// class token attends to most, and merge the others by key similarity into `contextual` tokens.
// On LLaVA-NeXT it runs per view (as its paper does): the base view's tokens, then every crop's
// dominant tokens at their place in the whole crop grid (raster order), then the crops' merged ones.
#include "reduce/kinds.h"
#include "victor/config.h"
#include "victor/error.h"

#ifndef VICTOR_SPEC_ONLY
#include "victor/model.h"
#endif

namespace victor {

namespace {

#ifndef VICTOR_SPEC_ONLY
// VisionZip on hidden states [n,1+N,D] (class token first): the `dominant` patches with the most
// class-token attention (kept in patch order), then `contextual` tokens: uniformly spaced targets
// among the other patches, each plus the mean of the patches whose normalised key is most similar
// to its own. Returns [n,dominant+contextual,D]; `dominant_idx` gets the kept patch indices.
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
#endif

class VisionZipOps final : public ReducerOps {
 public:
  explicit VisionZipOps(VisionZipParams p) : p_(p) {}
  std::string kind() const override { return "visionzip"; }
  std::string spec() const override {
    return "visionzip:dominant=" + std::to_string(p_.dominant) + ",contextual=" + std::to_string(p_.contextual);
  }
  std::string name() const override {
    return "visionzip " + std::to_string(p_.dominant) + "+" + std::to_string(p_.contextual);
  }
  void validate(const ModelConfig& c) const override {
    const int N = c.vision.num_patches();
    require_reducer(c.vision_feature_select_strategy == "default", spec(),
                    "needs vision_feature_select_strategy 'default' (the class token ranks the patches)");
    require_reducer(p_.dominant >= 1 && p_.contextual >= 0 && p_.dominant + p_.contextual <= N, spec(),
                    "dominant + contextual must be at most the " + std::to_string(N) + " patches (and dominant >= 1)");
    require_reducer(p_.contextual == 0 || p_.dominant + p_.contextual < N, spec(),
                    "contextual tokens need patches left to merge");
  }
  int visual_rows(const ModelConfig&) const override { return p_.dominant + p_.contextual; }
  std::optional<int> grid_side(const ModelConfig&) const override { return std::nullopt; }
#ifndef VICTOR_SPEC_ONLY
  bool needs_last_block() const override { return true; }
  torch::Tensor select_features(const ModelConfig& c, const torch::Tensor& hidden, const VisionLastBlock& last,
                                torch::Tensor* index) const override {
    if (c.vision_layers_needed() < 1)
      throw Error("visionzip: vision_feature_layer selects the embeddings; no attention to rank by");
    return visionzip_select(hidden, last, p_.dominant, p_.contextual, index);
  }
  torch::Tensor pack_views(const ModelConfig& c, const torch::Tensor& views, const ImageLayout& l,
                           const torch::Tensor& dominant) const override {
    if (!dominant.defined() || dominant.size(0) != l.views())
      throw Error("pack_image: VisionZip needs each view's dominant patch indices");
    if (l.grid_rows == 0) return views[0];
    const int64_t n = views.size(1), d = views.size(2);
    const int64_t side = c.vision.image_size / c.vision.patch_size, nd = dominant.size(1);
    const int64_t W = int64_t(l.grid_cols) * side;
    // Each crop's dominant tokens at their place in the whole grid, read in raster order.
    auto crops = dominant.narrow(0, 1, l.views() - 1).to(torch::kInt64);  // [c,nd]
    auto crop = torch::arange(l.views() - 1, torch::kInt64).unsqueeze(1);
    auto row = crop.div(l.grid_cols, "floor") * side + crops.div(side, "floor");
    auto col = crop.remainder(l.grid_cols) * side + crops.remainder(side);
    auto order = std::get<1>((row * W + col).flatten().sort());
    auto dom = views.narrow(0, 1, l.views() - 1).narrow(1, 0, nd).reshape({-1, d}).index_select(0, order);
    auto ctx = views.narrow(0, 1, l.views() - 1).narrow(1, nd, n - nd).reshape({-1, d});
    return torch::cat({views[0], dom, ctx}, 0);
  }
#endif

 private:
  VisionZipParams p_;
};
}  // namespace

Reducer Reducer::visionzip(VisionZipParams p) { return Reducer(std::make_shared<const VisionZipOps>(p)); }

ReducerKindEntry visionzip_reducer_kind() {
  return {"visionzip", "visionzip:dominant=D,contextual=C", [](ReducerArgs& a) {
            VisionZipParams z;
            z.dominant = a.integer("dominant", "dominant (patches kept)", 1, kBigSpecInt);
            z.contextual = a.integer("contextual", "contextual (merged tokens)", 0, kBigSpecInt);
            return Reducer::visionzip(z);
          }};
}

}  // namespace victor
