// The resampler (a trained baseline): a Perceiver-style block whose `latents` learned queries
// cross-attend (pre-norm, the text tower's heads) to the projected visual tokens, then a 4x MLP,
// both with residuals on the latents; its outputs replace the image's visual tokens.
#include "reduce/kinds.h"
#include "victor/config.h"

#ifndef VICTOR_SPEC_ONLY
#include <cmath>

#include "victor/model.h"
#include "victor/ops.h"
#endif

namespace victor {

namespace {
const std::string kPrefix = "resampler.";

class ResamplerOps final : public ReducerOps {
 public:
  explicit ResamplerOps(ResamplerParams p) : p_(p) {}
  std::string kind() const override { return "resampler"; }
  std::string spec() const override { return "resampler:latents=" + std::to_string(p_.latents); }
  std::string name() const override { return "resampler " + std::to_string(p_.latents); }
  bool trained() const override { return true; }
  void validate(const ModelConfig& c) const override {
    require_reducer(!c.is_next(), spec(), "is not implemented on LLaVA-NeXT yet (none, victor, fastv, pool and visionzip are)");
    require_reducer(p_.latents >= 1, spec(), "latents must be >= 1");
    require_reducer(c.text.hidden_size % c.text.num_attention_heads == 0, spec(),
                    "needs text_config.hidden_size divisible by its attention heads");
  }
  int visual_rows(const ModelConfig&) const override { return p_.latents; }
  std::optional<int> grid_side(const ModelConfig&) const override { return std::nullopt; }
  // q, o and the 4d MLP on the latents; k, v on the tokens.
  double vision_flops(const ModelConfig& c) const override {
    const double d = c.text.hidden_size, Q = p_.latents, Nf = full_visual_rows(c);
    return 2 * Q * (2 * d * d + 8 * d * d) + 2 * Nf * 2 * d * d + 4 * Q * Nf * d;
  }
  std::vector<ReducerParam> params(const ModelConfig& c) const override {
    const int64_t d = c.text.hidden_size;
    std::vector<ReducerParam> ps;
    auto tensor = [&](const std::string& n, std::vector<int64_t> shape, const std::string& bias_of = "") {
      ReducerParam p;
      p.name = kPrefix + n;
      p.shape = std::move(shape);
      p.bias_of = bias_of.empty() ? "" : kPrefix + bias_of;
      ps.push_back(p);
    };
    auto matrix = [&](const std::string& n, int64_t out, int64_t in) {
      tensor(n, {out, in});
      ps.back().matrix = true;
    };
    tensor("latents", {p_.latents, d});
    ps.back().counted = "resampler latents";
    for (const char* n : {"ln_q", "ln_kv", "ln_ff"}) {
      tensor(std::string(n) + ".weight", {d});
      tensor(std::string(n) + ".bias", {d});
    }
    for (const char* n : {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"}) matrix(std::string(n) + ".weight", d, d);
    matrix("mlp.fc1.weight", 4 * d, d);
    tensor("mlp.fc1.bias", {4 * d}, "mlp.fc1.weight");
    matrix("mlp.fc2.weight", d, 4 * d);
    tensor("mlp.fc2.bias", {d}, "mlp.fc2.weight");
    return ps;
  }
#ifndef VICTOR_SPEC_ONLY
  // Projected visual tokens x [n,N,d] -> [n,latents,d].
  torch::Tensor after_projector(const ModelConfig& c, const ReducerWeights& w, const torch::Tensor& x) const override {
    auto t = [&](const std::string& n) { return w.tensor(kPrefix + n); };
    auto m = [&](const std::string& n) -> const LinearW& { return w.matrix(kPrefix + n + ".weight"); };
    const int64_t heads = c.text.num_attention_heads;
    const auto& latents = t("latents");
    const int64_t n = x.size(0), N = x.size(1), d = x.size(2), Q = latents.size(0), hd = d / heads;
    auto lat = latents.unsqueeze(0).expand({n, Q, d});
    auto q_in = layer_norm(lat, t("ln_q.weight"), t("ln_q.bias"), 1e-5);
    auto kv_in = layer_norm(x, t("ln_kv.weight"), t("ln_kv.bias"), 1e-5);
    auto split = [&](const torch::Tensor& v, int64_t T) { return v.reshape({n, T, heads, hd}).transpose(1, 2); };
    auto q = split(dense(q_in, m("attn.q_proj")), Q), k = split(dense(kv_in, m("attn.k_proj")), N),
         v = split(dense(kv_in, m("attn.v_proj")), N);
    auto p = torch::softmax(torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(double(hd)), -1);
    auto a = torch::matmul(p, v).transpose(1, 2).reshape({n, Q, d});
    auto h = lat + dense(a, m("attn.o_proj"));
    auto ff = dense(torch::gelu(dense(layer_norm(h, t("ln_ff.weight"), t("ln_ff.bias"), 1e-5), m("mlp.fc1"))), m("mlp.fc2"));
    return h + ff;
  }
#endif

 private:
  ResamplerParams p_;
};
}  // namespace

Reducer Reducer::resampler(ResamplerParams p) { return Reducer(std::make_shared<const ResamplerOps>(p)); }

ReducerKindEntry resampler_reducer_kind() {
  return {"resampler", "resampler:latents=N", [](ReducerArgs& a) {
            ResamplerParams q;
            q.latents = a.integer(a.has("") ? "" : "latents", "latents (learned queries)", 1, kMaxLearnedRows);
            return Reducer::resampler(q);
          }};
}

}  // namespace victor
