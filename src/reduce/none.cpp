// No reduction: every visual token in every layer (the plain model). Every default of the table.
#include "reduce/kinds.h"

namespace victor {

namespace {
class NoneOps final : public ReducerOps {
 public:
  std::string kind() const override { return "none"; }
  std::string spec() const override { return "none"; }
  std::string name() const override { return "plain"; }
  void to_json(nlohmann::json&) const override {}
};
}  // namespace

Reducer::Reducer() : ops_(std::make_shared<const NoneOps>()) {}

ReducerKindEntry none_reducer_kind() {
  return {"none", "none", [](ReducerArgs&) { return Reducer::none(); }};
}

}  // namespace victor
