// FastV (training-free): at the input of layer K each image keeps the share `keep` of its visual
// rows that the query row (the last prompt token) attends to most in layer K-1, averaged over heads.
#include <algorithm>
#include <cmath>
#include <map>
#include <sstream>

#include "reduce/kinds.h"
#include "victor/config.h"

#ifndef VICTOR_SPEC_ONLY
#include "victor/model.h"
#endif

namespace victor {

namespace {
std::string num(double x) {
  std::ostringstream o;
  o << x;
  return o.str();
}

class FastVOps final : public ReducerOps {
 public:
  explicit FastVOps(FastVParams p) : p_(p) {}
  std::string kind() const override { return "fastv"; }
  std::string spec() const override { return "fastv:k=" + std::to_string(p_.layer) + ",keep=" + num(p_.keep); }
  std::string name() const override { return "fastv k=" + std::to_string(p_.layer) + " keep=" + num(p_.keep); }
  void validate(const ModelConfig& c) const override {
    const int L = c.num_layers();
    require_reducer(p_.layer >= 1 && p_.layer < L, spec(),
                    "k must be between 1 and " + std::to_string(L - 1) + " (the model has " + std::to_string(L) +
                        " decoder layers; layer k-1 ranks the tokens)");
    require_reducer(p_.keep > 0 && p_.keep <= 1, spec(), "keep must be in (0, 1]");
  }
  std::optional<int> reduce_layer(const ModelConfig&) const override { return p_.layer; }
  int kept_visual(int n) const override {
    if (n == 0) return n;
    return std::max(1, std::min(n, int(std::lround(p_.keep * n))));
  }
#ifndef VICTOR_SPEC_ONLY
  bool needs_scores() const override { return true; }
  // Rows that are neither visual nor padding stay; of each image's visual rows (per batch row and
  // image group) the kept_visual(n) with the highest scores stay, in their original order.
  torch::Tensor keep_rows(const TokenMeta& meta, const torch::Tensor& scores) const override {
    const auto visual = int64_t(TokenKind::Visual), pad = int64_t(TokenKind::Pad);
    auto keep = meta.kind.ne(visual) & meta.kind.ne(pad);
    if (!scores.defined()) return keep;  // no visual rows to rank
    auto kind = meta.kind.accessor<int64_t, 2>();
    auto group = meta.group.accessor<int64_t, 2>();
    auto sc = scores.to(torch::kFloat).contiguous();
    auto s = sc.accessor<float, 2>();
    auto kp = keep.accessor<bool, 2>();
    const int64_t B = meta.rows(), T = meta.length();
    for (int64_t b = 0; b < B; ++b) {
      std::map<int64_t, std::vector<int64_t>> by_image;
      for (int64_t t = 0; t < T; ++t)
        if (kind[b][t] == visual) by_image[group[b][t]].push_back(t);
      for (auto& [g, rows] : by_image) {
        const size_t kept = size_t(kept_visual(int(rows.size())));
        std::stable_sort(rows.begin(), rows.end(), [&](int64_t x, int64_t y) { return s[b][x] > s[b][y]; });
        for (size_t i = 0; i < kept; ++i) kp[b][rows[i]] = true;
      }
    }
    return keep;
  }
#endif

 private:
  FastVParams p_;
};
}  // namespace

Reducer Reducer::fastv(FastVParams p) { return Reducer(std::make_shared<const FastVOps>(p)); }

ReducerKindEntry fastv_reducer_kind() {
  return {"fastv", "fastv:k=K,keep=S", [](ReducerArgs& a) {
            FastVParams f;
            f.layer = a.integer("k", "k (the layer whose input is pruned, >= 1)", 1, kBigSpecInt);
            f.keep = a.real("keep", "keep (share of visual tokens kept)", 0.0, 1.0);
            return Reducer::fastv(f);
          }};
}

}  // namespace victor
