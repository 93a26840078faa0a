// Victor (arXiv 2410.14072): m learned registers after each image's visual rows; the visual rows
// leave at the input of layer k (with the padding), the registers carry the image onward.
#include "reduce/kinds.h"
#include "victor/config.h"

#ifndef VICTOR_SPEC_ONLY
#include "victor/model.h"
#endif

namespace victor {

namespace {
class VictorOps final : public ReducerOps {
 public:
  explicit VictorOps(VictorParams p) : p_(p) {}
  const VictorParams& args() const { return p_; }

  std::string kind() const override { return "victor"; }
  std::string spec() const override {
    std::string s = "victor:m=" + std::to_string(p_.registers);
    if (p_.summary_layers) s += ",k=" + std::to_string(*p_.summary_layers);
    if (p_.mask != RegisterMask::Causal) s += ",mask=" + to_string(p_.mask);
    return s;
  }
  std::string name() const override {
    std::string s = "victor m=" + std::to_string(p_.registers);
    s += " k=" + (p_.summary_layers ? std::to_string(*p_.summary_layers) : std::string("L"));
    if (p_.mask != RegisterMask::Causal) s += " " + to_string(p_.mask);
    return s;
  }
  bool trained() const override { return true; }
  void validate(const ModelConfig& c) const override {
    const int L = c.num_layers();
    require_reducer(p_.registers >= 0, spec(), "num_registers must be >= 0");
    require_reducer(!p_.summary_layers || (*p_.summary_layers >= 0 && *p_.summary_layers <= L), spec(),
                    "summary_layers k must be between 0 and the " + std::to_string(L) + " decoder layers");
  }
  int inserted_rows() const override { return p_.registers; }
  std::optional<int> reduce_layer(const ModelConfig& c) const override {
    if (!p_.summary_layers) return std::nullopt;
    return std::min(*p_.summary_layers, c.num_layers());
  }
  int kept_visual(int) const override { return 0; }
  RegisterMask mask() const override { return p_.mask; }
  std::vector<ReducerParam> params(const ModelConfig& c) const override {
    if (p_.registers == 0) return {};
    ReducerParam p;
    p.name = "victor.registers";
    p.shape = {p_.registers, c.text.hidden_size};
    p.counted = "registers";
    return {p};
  }
  void to_json(nlohmann::json& j) const override {
    j["num_registers"] = p_.registers;
    j["summary_layers"] = p_.summary_layers ? *p_.summary_layers : -1;
    j["register_mask"] = to_string(p_.mask);
  }
#ifndef VICTOR_SPEC_ONLY
  torch::Tensor inserted(const ReducerWeights& w) const override { return w.tensor("victor.registers"); }
#endif

 private:
  VictorParams p_;
};
}  // namespace

Reducer Reducer::victor(VictorParams p) { return Reducer(std::make_shared<const VictorOps>(p)); }

const VictorParams* Reducer::victor_params() const {
  const auto* v = dynamic_cast<const VictorOps*>(ops_.get());
  return v ? &v->args() : nullptr;
}

ReducerKindEntry victor_reducer_kind() {
  return {"victor", "victor:m=M,k=K[,mask=causal|registers_only]", [](ReducerArgs& a) {
            VictorParams v;
            v.registers = a.integer("m", "m (registers per image)", 0, kMaxLearnedRows);
            v.summary_layers = a.integer("k", "k (summary layers)", 0, kBigSpecInt);
            if (a.has("mask")) {
              std::string m = a.take("mask", "mask");
              if (m != "causal" && m != "registers_only") a.fail("mask '" + m + "' is not causal or registers_only");
              v.mask = register_mask_from_string(m);
            }
            return Reducer::victor(v);
          }};
}

}  // namespace victor
