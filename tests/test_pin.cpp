// Pinned outputs of every token reducer and weight format on the tiny LLaVA-1.5 and LLaVA-NeXT
// shapes: logits of a full forward, a batched prefill with decode steps on one cache, and prefills
// of single rows decoded together over their own caches (the server's path), plus the KV-row and
// FLOP formulas. tests/fixtures/reducer_pins.json was written before the reducer table replaced
// the per-kind switches; a move of code that changes the math fails here. The formulas are
// compared exactly, float32 logits within a bound that allows another ISA's summation order.
// int8 logits depend on the machine class: its int8 products (ours and oneDNN's) quantize
// activations differently on AVX2, AVX-512 VNNI and AMX CPUs, by a few percent of a logit on these
// tiny models (enough to flip FastV's and VisionZip's choice of tokens). So the file holds one set
// of pins per machine class (the CPU's most capable victor ISA, "+amx" where the CPU has AMX);
// VICTOR_WRITE_PINS=1 writes this class's set and leaves the others. float32 logits and the
// formulas are held to the avx2 set on every class; int8 logits to this class's set, or, on a
// class with no set of its own, to whichever set they match (a note says when none does: then
// only float32 and the formulas are checked there).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "helpers.h"
#include "victor/generate.h"
#include "victor/image.h"
#include "victor/kernels.h"

using namespace victor;
using namespace victor::test;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {


PromptInput pin_prompt(const ModelConfig& c, const std::vector<Image>& images, std::vector<int64_t> text) {
  PromptInput p;
  p.ids = {1, 5, 6};
  for (auto& img : images) {
    p.ids.push_back(c.image_token_index);
    add_image(p, img, c);
  }
  p.ids.insert(p.ids.end(), text.begin(), text.end());
  return p;
}

// A logits tensor as six numbers: its sum, its absolute sum, two fixed random projections and its
// first and last element (any change of the math moves them; the file stays small).
std::vector<double> values(const torch::Tensor& t) {
  auto f = t.to(torch::kDouble).contiguous().flatten();
  auto gen = at::detail::createCPUGenerator(1234);
  auto w1 = at::randn({f.numel()}, gen, torch::kDouble), w2 = at::randn({f.numel()}, gen, torch::kDouble);
  return {f.sum().item<double>(), f.abs().sum().item<double>(), (f * w1).sum().item<double>(),
          (f * w2).sum().item<double>(), f[0].item<double>(), f[-1].item<double>()};
}

// Everything pinned for one model.
json outputs(const Vlm& m) {
  torch::NoGradGuard ng;
  const ModelConfig& c = m.config();
  const auto a = pin_prompt(c, {random_image(37, 23, 3)}, {7, 8, 9, 10});
  const auto b = pin_prompt(c, {random_image(20, 31, 4), random_image(28, 28, 5)}, {11, 12});
  json j;
  // A full forward (training's path), the last row of each prompt.
  auto batch = m.assemble({a, b}, false);
  auto out = m.forward(batch);
  auto valid = out.meta.kind.ne(int64_t(TokenKind::Pad)).to(torch::kInt64);
  auto last = (valid * torch::arange(valid.size(1), torch::kInt64)).argmax(1);
  j["forward"] = values(m.logits(out.hidden.index({torch::arange(out.hidden.size(0)), last})));
  // A left-padded batch through prefill and three decode steps on one cache.
  auto [cache, first] = m.prefill(m.assemble({a, b}, true), torch::kFloat32, 4);
  json steps = json::array({values(first)});
  for (int64_t s = 0; s < 3; ++s) steps.push_back(values(m.decode_step(torch::tensor({20 + s, 30 + s}), cache)));
  j["batch"] = steps;
  // Each row prefilled alone, then decoded together over the two caches.
  auto [ca, fa] = m.prefill(m.assemble({a}, true), torch::kFloat32, 4);
  auto [cb, fb] = m.prefill(m.assemble({b}, true), torch::kFloat32, 4);
  json rows = json::array({values(torch::cat({fa, fb}, 0))});
  for (int64_t s = 0; s < 3; ++s) rows.push_back(values(m.decode_step(torch::tensor({20 + s, 30 + s}), {&ca, &cb})));
  j["rows"] = rows;
  // The formulas.
  const auto& r = c.reducer;
  j["kv_rows"] = r.kv_rows(c, 7, 2, 5);
  j["kv_rows_next"] = r.kv_rows(c, 7, std::vector<int64_t>{17, 29}, 5);
  j["flops"] = r.prefill_flops(c, 7, 2);
  j["flops_next"] = r.prefill_flops(c, 7, std::vector<int64_t>{17, 29}, 7);
  j["rows_past"] = r.rows_past_reduction(c);
  j["visual_rows"] = r.visual_rows(c);
  return j;
}

struct Case {
  std::string name;
  ModelConfig config;
  WeightDType dtype;
};

std::vector<Case> cases() {
  std::vector<Case> out;
  const std::vector<std::string> specs = {"none",      "victor:m=3,k=2",  "victor:m=3,k=2,mask=registers_only",
                                          "victor:m=2", "victor:m=2,k=0", "pool:2",
                                          "fastv:k=2,keep=0.5", "visionzip:dominant=6,contextual=3",
                                          "resampler:latents=5"};
  for (const std::string shape : {"llava", "next"}) {
    for (const auto& spec : specs) {
      ModelConfig c = tiny_config();
      if (shape == "next") {
        c.image_grid_pinpoints = preset_config("llava-next-tiny").image_grid_pinpoints;
        c.preprocess.pad_to_square = false;
        if (spec.rfind("resampler", 0) == 0) continue;  // not on NeXT (refused by validate)
      }
      // "victor:m=2" (registers, visual rows never dropped) has no spec of its own.
      c.reducer = spec == "victor:m=2" ? Reducer::victor({2, std::nullopt, RegisterMask::Causal}) : Reducer::parse(spec);
      c.validate();
      for (auto [dn, d] : {std::pair{"f32", WeightDType::F32}, {"int8", WeightDType::Int8}})
        out.push_back({shape + " " + spec + " " + dn, c, d});
    }
  }
  return out;
}

void expect_close(const json& got, const json& want, double tol, const std::string& where) {
  if (want.is_array()) {
    ASSERT_TRUE(got.is_array() && got.size() == want.size()) << where << ": shape differs";
    for (size_t i = 0; i < want.size(); ++i) expect_close(got[i], want[i], tol, where + "[" + std::to_string(i) + "]");
    return;
  }
  const double g = got.get<double>(), w = want.get<double>();
  ASSERT_LE(std::abs(g - w), tol * (1 + std::abs(w))) << where << ": " << g << " against the pinned " << w;
}

}  // namespace

// This machine's class: its best victor ISA, "+amx" with AMX tiles (oneDNN's products differ).
std::string machine_class() {
  std::string c = kernels::isa_name(kernels::supported_isas().back());
  std::ifstream cpu("/proc/cpuinfo");
  for (std::string line; std::getline(cpu, line);)
    if (line.rfind("flags", 0) == 0) {
      if (line.find(" amx_int8") != std::string::npos) c += "+amx";
      break;
    }
  return c;
}

// Largest |got - want| / (1 + |want|) over the logits of one case.
double worst(const json& got, const json& want) {
  if (want.is_array()) {
    double w = got.is_array() && got.size() == want.size() ? 0 : 1e9;
    for (size_t i = 0; i < want.size() && w < 1e9; ++i) w = std::max(w, worst(got[i], want[i]));
    return w;
  }
  return std::abs(got.get<double>() - want.get<double>()) / (1 + std::abs(want.get<double>()));
}

TEST(Pins, EveryReducerAndWeightFormatComputesWhatWasPinned) {
  const fs::path file = fs::path(VICTOR_SOURCE_DIR) / "tests/fixtures/reducer_pins.json";
  const std::string machine = machine_class();
  json got;
  for (const auto& c : cases()) got[c.name] = outputs(Vlm::random(c.config, 11, WeightFormat::all(c.dtype)));
  json all = json::object();
  if (std::ifstream in(file); in) all = json::parse(in);
  if (std::getenv("VICTOR_WRITE_PINS")) {
    all[machine] = got;
    std::ofstream(file) << all.dump(1) << "\n";
    GTEST_SKIP() << "wrote the " << machine << " pins into " << file;
  }
  ASSERT_TRUE(all.contains("avx2")) << file << " is missing or has no avx2 pins";
  // int8: this class's set, else the first set every int8 case matches.
  std::string int8_set = all.contains(machine) ? machine : "";
  for (auto it = all.begin(); int8_set.empty() && it != all.end(); ++it) {
    bool all_match = true;
    for (auto& [name, w] : it.value().items())
      if (name.find("int8") != std::string::npos && got.contains(name))
        for (const char* key : {"forward", "batch", "rows"}) all_match = all_match && worst(got[name][key], w[key]) <= 1e-2;
    if (all_match) int8_set = it.key();
  }
  std::printf("[ pins     ] machine class %s; int8 logits against %s\n", machine.c_str(),
              int8_set.empty() ? "no set (none matches: unchecked here)" : (int8_set + " pins").c_str());
  const json& ref = all["avx2"];
  ASSERT_EQ(ref.size(), got.size()) << "the pinned cases and the cases run differ";
  for (auto& [name, w] : ref.items()) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(got.contains(name)) << name << " is pinned but not run";
    const bool int8 = name.find("int8") != std::string::npos;
    for (const char* key : {"kv_rows", "kv_rows_next", "rows_past", "visual_rows"}) EXPECT_EQ(got[name][key], w[key]) << key;
    for (const char* key : {"flops", "flops_next"}) expect_close(got[name][key], w[key], 1e-12, key);
    if (int8 && int8_set.empty()) continue;
    const json& want = int8 ? all[int8_set][name] : w;
    // float32: another ISA sums in another order (~1e-6); int8 on its own machine class: another
    // thread count can still move one element across a rounding step.
    for (const char* key : {"forward", "batch", "rows"}) expect_close(got[name][key], want[key], int8 ? 1e-2 : 1e-4, key);
  }
}
