// Average pooling (a baseline): the projected p x p neighbourhoods of the patch grid become one
// token each (576 -> 36 at p = 4); trained with the model.
#include <sstream>

#include "reduce/kinds.h"
#include "victor/config.h"

#ifndef VICTOR_SPEC_ONLY
#include <torch/torch.h>
#endif

namespace victor {

namespace {
class PoolOps final : public ReducerOps {
 public:
  explicit PoolOps(PoolParams p) : p_(p) {}
  std::string kind() const override { return "pool"; }
  std::string spec() const override { return "pool:" + std::to_string(p_.factor); }
  std::string name() const override { return "pool " + std::to_string(p_.factor) + "x" + std::to_string(p_.factor); }
  bool trained() const override { return true; }
  void validate(const ModelConfig& c) const override {
    const int side = c.vision.image_size / c.vision.patch_size;
    require_reducer(p_.factor >= 2 && side % p_.factor == 0, spec(),
                    "visual_pool must be >= 2 and divide the " + std::to_string(side) + " patches per side");
    require_reducer(c.vision_feature_select_strategy == "default", spec(),
                    "pooling needs vision_feature_select_strategy 'default' (no class token)");
  }
  int visual_rows(const ModelConfig& c) const override { return c.vision.num_patches() / (p_.factor * p_.factor); }
  std::optional<int> grid_side(const ModelConfig& c) const override {
    return c.vision.image_size / c.vision.patch_size / p_.factor;
  }
  void to_json(nlohmann::json& j) const override { j["visual_pool"] = p_.factor; }
#ifndef VICTOR_SPEC_ONLY
  torch::Tensor after_projector(const ModelConfig& c, const ReducerWeights&, const torch::Tensor& x) const override {
    const int p = p_.factor;
    const int64_t n = x.size(0), d = x.size(2), side = c.vision.image_size / c.vision.patch_size;
    auto grid = x.view({n, side, side, d}).permute({0, 3, 1, 2});
    auto pooled = torch::avg_pool2d(grid, {p, p}, {p, p});  // [n,d,side/p,side/p]
    return pooled.flatten(2).transpose(1, 2).contiguous();
  }
#endif

 private:
  PoolParams p_;
};
}  // namespace

Reducer Reducer::pool(PoolParams p) { return Reducer(std::make_shared<const PoolOps>(p)); }

ReducerKindEntry pool_reducer_kind() {
  return {"pool", "pool:P", [](ReducerArgs& a) {
            PoolParams q;
            q.factor = a.integer(a.has("") ? "" : "p", "the pool factor p (pool:4)", 2, 64);
            return Reducer::pool(q);
          }};
}

}  // namespace victor
