// `victor repro`'s options: the quick preset, the curriculum spec, and every check made before
// any work is done.
#include <algorithm>
#include <cmath>
#include <sstream>

#include "repro/internal.h"
#include "victor/error.h"

namespace victor {

ReproOptions ReproOptions::quick() {
  ReproOptions o;
  o.out = "runs/repro-quick";
  o.train_images = 400;
  o.test_images = 50;
  o.steps = 60;
  o.vision_steps = 40;
  o.vision_images = 0;
  o.bench_repeats = 1;
  o.timing_rounds = 2;
  o.timing_steps = 4;
  o.bench_gen = {2, 32};
  o.registers = {8};
  o.summary_layers = {2};
  o.curriculum = {{4, {"identify"}, 4, 150}};
  o.curriculum_images = 600;
  o.lr = 1e-3;
  return o;
}

std::vector<CurriculumStage> parse_curriculum(const std::string& spec) {
  std::vector<CurriculumStage> out;
  if (spec.empty() || spec == "none") return out;
  std::stringstream all(spec);
  std::string item;
  while (std::getline(all, item, ',')) {
    std::vector<std::string> f;
    std::stringstream ss(item);
    for (std::string x; std::getline(ss, x, ':');) f.push_back(x);
    const std::string where = "--curriculum stage '" + item + "'";
    if (f.size() != 4 && f.size() != 5)
      throw Error(where + ": expected GRID:FAMILIES:POOL:STEPS[xREPEATS][@TARGET][:EMPTY], e.g. 2:identify:8:1000x6@70");
    auto integer = [&](const std::string& v, const char* name, int lo, int hi) {
      size_t used = 0;
      int x = 0;
      try {
        x = std::stoi(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != v.size() || v.empty() || x < lo || x > hi)
        throw Error(where + ": " + name + " must be an integer in [" + std::to_string(lo) + ", " +
                    std::to_string(hi) + "], got '" + v + "'");
      return x;
    };
    // "70" or "70%" -> 0.70
    auto percent = [&](std::string v, const char* name, int hi) {
      if (!v.empty() && v.back() == '%') v.pop_back();
      return integer(v, name, 0, hi) / 100.0;
    };
    CurriculumStage c;
    c.grid = integer(f[0], "GRID", 1, 8);
    if (f[1] != "all") {
      std::stringstream fs_(f[1]);
      std::vector<double> rates;
      for (std::string fam; std::getline(fs_, fam, '+');) {
        double rate = -1;
        if (auto slash = fam.find('/'); slash != std::string::npos) {  // NAME/EMPTY
          rate = percent(fam.substr(slash + 1), "a family's EMPTY (after /, percent of empty cells)", 99);
          fam.resize(slash);
        }
        if (std::find(kQuestionFamilies.begin(), kQuestionFamilies.end(), fam) == kQuestionFamilies.end())
          throw Error(where + ": unknown question family '" + fam + "' (all, or identify, count, exist, locate joined by +)");
        if (std::find(c.families.begin(), c.families.end(), fam) != c.families.end())
          throw Error(where + ": question family '" + fam + "' given twice");
        c.families.push_back(fam);
        rates.push_back(rate);
      }
      if (c.families.empty()) throw Error(where + ": FAMILIES is empty");
      if (std::any_of(rates.begin(), rates.end(), [](double r) { return r >= 0; })) c.family_empty = rates;
    }
    c.pool = integer(f[2], "POOL", 1, 64);
    std::string steps = f[3], repeats, target;
    if (auto at = steps.find('@'); at != std::string::npos) {
      target = steps.substr(at + 1);
      steps.resize(at);
    }
    if (auto x = steps.find('x'); x != std::string::npos) {
      repeats = steps.substr(x + 1);
      steps.resize(x);
    }
    c.steps = integer(steps, "STEPS", 1, 10000000);
    if (f[3].find('x') != std::string::npos) c.repeats = integer(repeats, "REPEATS (after x)", 1, 1000);
    if (f[3].find('@') != std::string::npos) c.target = percent(target, "TARGET (after @, percent)", 100);
    if (f.size() == 5) c.empty_rate = percent(f[4], "EMPTY (percent of empty cells)", 99);
    out.push_back(c);
  }
  return out;
}

std::string format_curriculum(const std::vector<CurriculumStage>& stages) {
  std::string s;
  for (const auto& c : stages) {
    if (!s.empty()) s += ",";
    std::string fams;
    for (size_t j = 0; j < c.families.size(); ++j) {
      fams += (fams.empty() ? "" : "+") + c.families[j];
      if (c.family_rate(j) >= 0) fams += "/" + repro::whole_percent(c.family_rate(j));
    }
    s += std::to_string(c.grid) + ":" + (fams.empty() ? "all" : fams) + ":" + std::to_string(c.pool) + ":" +
         std::to_string(c.steps);
    if (c.repeats != 1) s += "x" + std::to_string(c.repeats);
    if (c.target >= 0) s += "@" + repro::whole_percent(c.target);
    if (c.empty_rate >= 0) s += ":" + repro::whole_percent(c.empty_rate);
  }
  return s.empty() ? "none" : s;
}

namespace repro {

// 0.75 -> "75", as --curriculum writes a percent (parse_curriculum's `percent` reads it back).
std::string whole_percent(double fraction) { return std::to_string(int(std::lround(fraction * 100))); }

void check_options(const ReproOptions& o, int world) {
  {  // a curriculum the model cannot pool, or a k it does not have
    const ModelConfig preset = preset_config(o.preset);
    auto has_layer = [&](int k) { return k >= 1 && k < preset.num_layers(); };  // a k the preset can drop after
    if (o.curriculum_summary_layers != -1 && !has_layer(o.curriculum_summary_layers))
      throw Error("--curriculum-summary-layers " + std::to_string(o.curriculum_summary_layers) +
                  ": must be -1 (every layer) or between 1 and " + std::to_string(preset.num_layers() - 1));
    if (o.ground_weight > 0) {  // as stage C will train: its drop, if any
      ModelConfig stage_c = preset;
      if (o.curriculum_summary_layers >= 0)
        stage_c.reducer = Reducer::victor({0, o.curriculum_summary_layers, RegisterMask::Causal});
      try {
        check_grounding(stage_c, o.ground_layer, o.ground_heads);
      } catch (const Error& e) {
        throw Error(std::string(e.what()) + (o.curriculum_summary_layers > 0 ? " in stage C (--curriculum-summary-layers)" : ""));
      }
    }
    training_free_reducers(o, preset);  // refuses a bad --training-free spec up front
    for (int n : o.resamplers)
      if (n > 0) Reducer::resampler({n}).validate(preset);
    if (o.curriculum_summary_layers >= 0)
      for (auto& c : o.curriculum)
        if (c.pool > 1)
          throw Error("--curriculum-summary-layers with a pooled stage C stage (POOL " + std::to_string(c.pool) +
                      "): a model has one token reducer, pooling or Victor's drop; use POOL 1 stages with it");
    for (int k : o.summary_layers)
      if (!has_layer(k))
        throw Error("--summary-layers " + std::to_string(k) + ": Victor k must be between 1 and " +
                    std::to_string(preset.num_layers() - 1) + " (the preset has " +
                    std::to_string(preset.num_layers()) + " decoder layers)");
    const VisionConfig v = preset.vision;
    const int side = v.image_size / v.patch_size;
    for (const auto& c : o.curriculum)
      if (side % c.pool != 0)
        throw Error("--curriculum stage '" + format_curriculum({c}) + "': POOL " + std::to_string(c.pool) +
                    " does not divide the preset's " + std::to_string(side) + "x" + std::to_string(side) +
                    " patch grid");
  }
  if (o.timing_rounds < 0 || o.timing_rounds > 100)
    throw Error("--timing-rounds " + std::to_string(o.timing_rounds) + ": must be between 0 (off) and 100");
  if (o.timing_rounds > 0 && o.timing_steps < 2)
    throw Error("--timing-steps " + std::to_string(o.timing_steps) + ": must be at least 2");
  if (world > 1) {  // a batch the ranks cannot share
    auto split = [world](int global_batch, const std::string& what) { rank_share(global_batch, world, what); };
    split(o.batch_size, "--batch-size");
    if (o.text_steps > 0) split(o.text_batch, "stage L's batch");
    for (const auto& c : o.curriculum)
      split(o.curriculum_single_turn && c.pool > 1 ? o.curriculum_batch * o.questions : o.curriculum_batch,
            "stage C's batch (" + format_curriculum({c}) + ")");
  }
}

// The training-free reducers the run applies to its plain model: as asked, or FastV (k = 2) and
// VisionZip at the first pooling baseline's budget of visual tokens per image.
std::vector<Reducer> training_free_reducers(const ReproOptions& o, const ModelConfig& preset) {
  std::vector<Reducer> out;
  if (o.training_free.size() == 1 && o.training_free[0] == "none") return out;
  for (auto& s : o.training_free) out.push_back(Reducer::parse(s));
  if (o.training_free.empty()) {
    const int N = preset.vision.num_patches(), pool = o.pools.empty() ? 4 : o.pools.front();
    const int budget = std::max(1, N / (pool * pool));
    out.push_back(Reducer::fastv({std::min(2, preset.num_layers() - 1), double(budget) / N}));
    const int contextual = budget / 5;
    out.push_back(Reducer::visionzip({budget - contextual, contextual}));
  }
  for (auto& r : out) {
    if (r.trained()) throw Error("--training-free " + r.spec() + ": a trained reducer (train it with --registers/--pool)");
    r.validate(preset);
  }
  return out;
}

// A file-name form of a reducer's display name ("fastv k=2 keep=0.25" -> "fastv-k2-keep0.25").
std::string slug(const std::string& name) {
  std::string s;
  for (char c : name) s += c == ' ' ? '-' : c == '=' ? '\0' : c;
  s.erase(std::remove(s.begin(), s.end(), '\0'), s.end());
  return s;
}

}  // namespace repro
}  // namespace victor
