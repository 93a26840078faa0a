// `victor repro`'s options: their table (flags and the quick preset), the curriculum spec, and
// every check made before any work is done.
#include <algorithm>
#include <cmath>
#include <sstream>
#include <type_traits>

#include "repro/internal.h"
#include "victor/error.h"

namespace victor {

const std::vector<ReproOption>& repro_options() {
  using O = ReproOptions;
  static const std::vector<ReproOption> rows = {
      {"--out", &O::out, "Output folder (default runs/repro, or runs/repro-quick)", 0, 0, false, {}, "runs/repro-quick"},
      {"--preset", &O::preset, "Model shape trained from scratch", 0, 0, false, {"tiny", "small"}},
      {"--registers", &O::registers, "Victor register counts to train (comma list)", 0, 1024, false, {}, "8"},
      {"--summary-layers", &O::summary_layers, "Victor k values to train (comma list; every m with every k)", 0, 64,
       false, {}, "2"},
      {"--training-free", &O::training_free,
       "Training-free reducers run on the trained plain model (repeat; 'none' for none; default: FastV k=2 and "
       "VisionZip at the pooling baseline's visual-token budget)"},
      {"--register-mask", &O::register_mask, "causal | registers_only", 0, 0, false, {"causal", "registers_only"}},
      {"--train-images", &O::train_images, "GridVQA training images", 1, 1000000, false, {}, "400"},
      {"--test-images", &O::test_images, "GridVQA test images", 1, 100000, false, {}, "50"},
      {"--steps", &O::steps, "Stage 2 steps per model: questions (identical budgets)", 1, 10000000, false, {}, "60"},
      {"--pretrain-steps", &O::pretrain_steps, "Stage 1 steps: row-by-row descriptions (0 = skip)", 0, 10000000},
      {"--pool", &O::pools, "Average-pooling baselines to train (e.g. 4; 1 = none)", 1, 64},
      {"--resampler", &O::resamplers, "Perceiver-style resamplers to train, by latent count (e.g. 16; 0 = none)", 0,
       4096},
      {"--vision-steps", &O::vision_steps, "Stage 0 steps: vision tower on cell classes (0 = skip)", 0, 10000000, false,
       {}, "40"},
      {"--vision-images", &O::vision_images, "Stage 0's own GridVQA training images (0 = the main training set)", 0,
       1000000, false, {}, "0"},
      {"--vision-targets", &O::vision_targets,
       "Stage 0 targets: cell (each cell's mean patch names its class and place) or patch (every patch does)", 0, 0,
       false, {"cell", "patch"}},
      {"--vision-counts", &O::vision_counts,
       "Stage 0 also teaches how many cells hold each class, the image's summary (true/false)"},
      {"--text-steps", &O::text_steps,
       "Stage L steps: the language model on grids written as text, shared (0 = skip)", 0, 10000000},
      {"--text-lr", &O::text_lr, "Stage L peak learning rate", 0, 0, true},
      {"--curriculum", &O::curriculum,
       "Stage C, shared: GRID:FAMILIES:POOL:STEPS[xREPEATS][@TARGET][:EMPTY] stages, comma-separated (FAMILIES = "
       "all or e.g. count+exist; POOL pools the visual tokens; xREPEATS@TARGET repeats the STEPS schedule up to "
       "REPEATS times until the stage's test accuracy reaches TARGET percent; EMPTY = percent of empty cells, "
       "default 30; a family written NAME/EMPTY, e.g. identify+exist/75, is asked on its own grids with that share "
       "of empty cells, its own GridVQA set mixed into the stage's); none = skip",
       0, 0, false, {}, "4:identify:4:150"},
      {"--curriculum-images", &O::curriculum_images, "Stage C training images per stage", 1, 1000000, false, {}, "600"},
      {"--curriculum-lr", &O::curriculum_lr, "Stage C peak learning rate", 0, 0, true},
      {"--curriculum-shuffle", &O::curriculum_shuffle,
       "Stage C: each image's visual tokens in a random order every step (true/false)"},
      {"--curriculum-single-turn", &O::curriculum_single_turn,
       "Stage C: pooled stages train one question per sample, the same answers per step (true/false)"},
      {"--ground-weight", &O::ground_weight,
       "Grounded attention in stages C and 2: weight of the loss that teaches heads of --ground-layer to look at "
       "the cells each answer rests on (0 = off); stage 2 grounds only models whose k > layer", 0, 1e3},
      {"--ground-layer", &O::ground_layer, "Grounded attention: the decoder layer (0-based)", 0, 1024},
      {"--ground-heads", &O::ground_heads, "Grounded attention: how many heads (the first ones)", 1, 1024},
      {"--curriculum-summary-layers", &O::curriculum_summary_layers,
       "Stage C: drop the visual tokens after this layer (no registers), so lookups are learned where Victor "
       "twins with k >= K still see them; -1 = every layer", -1, 1024},
      {"--train", &O::train_parts,
       "Parts trained in stages 1-2 (finetune = projector + registers + llm, vision frozen)"},
      {"--batch-size", &O::batch_size, "Conversations per step", 1, 1024},
      {"--lr", &O::lr, "Peak learning rate", 0, 0, true, {}, "1e-3"},
      {"--bench-repeats", &O::bench_repeats, "Benchmark repeats", 1, 100, false, {}, "1"},
      {"--timing-rounds", &O::timing_rounds,
       "Training time measured again: rounds of interleaved stage-2 segments, every trained model in each, giving "
       "each time reduction a range (0 = off)", 0, 100, false, {}, "2"},
      {"--timing-steps", &O::timing_steps, "Stage-2 steps per model in each timing round (at most --steps)", 2,
       10000000, false, {}, "4"},
      {"--bench-batch", &O::bench_batch, "Large batch for throughput (paper: 16)", 1, 256},
      {"--bench-gen", &O::bench_gen, "Generated tokens (paper: 2,128)", 1, 4096, false, {}, "2,32"},
      {"--eval-limit", &O::eval_limit, "Evaluate only the first N test questions", 0, 10000000},
      {"--seed", &O::seed, "Seed"},
  };
  return rows;
}

void set_repro_option(ReproOptions& o, const ReproOption& row, const std::string& text) {
  auto fail = [&](const std::string& why) -> Error { return Error(row.flag + " " + text + ": " + why); };
  auto number = [&](const std::string& t) {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(t, &used);
    } catch (const std::exception&) {
      throw fail("not a number");
    }
    if (used != t.size() || !std::isfinite(v)) throw fail("not a finite number");
    if (row.lo < row.hi && (v < row.lo || v > row.hi))
      throw fail("must lie between " + std::to_string(row.lo) + " and " + std::to_string(row.hi));
    if (row.positive && !(v > 0)) throw fail("must be positive");
    return v;
  };
  auto integer = [&](const std::string& t) {
    const double v = number(t);
    if (v != std::floor(v)) throw fail("not an integer");
    return v;
  };
  std::visit(
      [&](auto field) {
        using T = std::decay_t<decltype(o.*field)>;
        if constexpr (std::is_same_v<T, int>) {
          o.*field = int(integer(text));
        } else if constexpr (std::is_same_v<T, uint64_t>) {
          o.*field = uint64_t(integer(text));
        } else if constexpr (std::is_same_v<T, double>) {
          o.*field = number(text);
        } else if constexpr (std::is_same_v<T, bool>) {
          if (text != "true" && text != "false") throw fail("must be true or false");
          o.*field = text == "true";
        } else if constexpr (std::is_same_v<T, std::string>) {
          if (!row.choices.empty() && std::find(row.choices.begin(), row.choices.end(), text) == row.choices.end())
            throw fail("not one of the choices");
          o.*field = text;
        } else if constexpr (std::is_same_v<T, std::vector<int>>) {
          std::vector<int> v;
          std::stringstream ss(text);
          for (std::string x; std::getline(ss, x, ',');) v.push_back(int(integer(x)));
          o.*field = v;
        } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
          o.*field = {text};
        } else {
          o.*field = parse_curriculum(text);
        }
      },
      row.field);
}

// The quick preset: every row's `quick` value over the defaults.
ReproOptions ReproOptions::quick() {
  ReproOptions o;
  for (const auto& row : repro_options())
    if (!row.quick.empty()) set_repro_option(o, row, row.quick);
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
