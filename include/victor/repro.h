// `victor repro`: GridVQA -> train plain and Victor models with identical budgets -> evaluate ->
// benchmark -> a Markdown report with the paper's table and plots. The implementation is in
// src/repro/ (options, stages, report, and run_repro, the orchestrator).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace victor {

class Communicator;

// One shared curriculum stage (stage C): projector + language model trained on GridVQA with
// `grid` x `grid` images, only `families` asked, the visual tokens average-pooled by `pool`.
// Few visual tokens make the question-keyed lookup learnable (one in N tokens carries the
// answer, so its gradient signal is ~1/N); later stages carry it to more cells and tokens.
// A stage runs up to `repeats` schedules of `steps` (each a fresh warm-up and cosine decay, a warm
// restart, with its own data order) and stops early once its held-out accuracy reaches `target`:
// where a from-scratch model leaves the lookup's plateau moves with rounding (notebook@f64a969,
// item 10), so a fixed step count breaks it on one machine and not on another.
struct CurriculumStage {
  int grid = 4;
  std::vector<std::string> families;  // empty = all
  int pool = 1;
  int steps = 0;
  int repeats = 1;      // at most this many schedules of `steps`
  double target = -1;   // stop once the stage's test accuracy >= target (fraction; < 0 = run all)
  double empty_rate = -1;  // the stage's share of empty cells (< 0 = the GridVQA default, 0.3)
  // Per family (parallel to `families`, or empty): that family's own share of empty cells
  // (< 0 = the stage's). Families with different shares are asked on different GridVQA sets,
  // trained together in one stage (notebook@f64a969, item 20: exist learns on sparse grids,
  // identify on dense ones).
  std::vector<double> family_empty{};
  // families[j]'s own share of empty cells, or < 0 when it has none.
  double family_rate(size_t j) const { return j < family_empty.size() ? family_empty[j] : -1; }
};

// Parses "GRID:FAMILIES:POOL:STEPS[xREPEATS][@TARGET%][:EMPTY%][,...]", FAMILIES = "all" or names
// joined by '+', each optionally NAME/EMPTY%, e.g. "2:identify:8:1000x6@70,4:identify:4:2500": up to six 1,000-step schedules on
// 2x2 until 70% of the stage's test questions are right, then one of 2,500 on 4x4;
// "4:count+exist:4:1250:75" asks about 4x4 grids with 75% of the cells empty;
// "4:identify+exist/75:4:1250" asks identify on the default grids and exist on 75%-empty ones, mixed
// in one stage. "" or "none" = no curriculum. Throws Error naming the bad field.
std::vector<CurriculumStage> parse_curriculum(const std::string& spec);
std::string format_curriculum(const std::vector<CurriculumStage>& stages);

// Every option of `victor repro`; the defaults are the README's main job. Why each default is what
// it is was measured and is recorded in notebook@f64a969 (the items named below), not here.
struct ReproOptions {
  std::string out = "runs/repro";
  std::string preset = "small";
  // Every (m, k) pair is a Victor model. k = 1 of 6 layers stays at the answer prior on GridVQA
  // (every run up to 2026-12-02, notebook@f64a969); `--summary-layers 1,2` runs it again.
  std::vector<int> registers{2, 8};
  std::vector<int> summary_layers{2};
  std::string register_mask = "causal";
  int train_images = 2000, test_images = 1900, questions = 4;  // 7,600 test questions: +-1 point
  // Stage 0, shared: the vision tower on cell classes, on a GridVQA set of its own (items 15, 21).
  int vision_steps = 600, vision_batch = 32;
  int vision_images = 8000;                   // 0 = the main training set
  std::string vision_targets = "patch";       // "patch" (every patch names its cell) or "cell" (cell means)
  bool vision_counts = false;                 // also each class's count in the image
  // Stage L, shared: the language model on grids written as text (text.json); 0 steps = skipped.
  int text_steps = 0, text_batch = 8;
  double text_lr = 3e-4;
  // Stage C, shared: the curriculum, projector + language model (items 10-12, 20, 22).
  std::vector<CurriculumStage> curriculum{
      {4, {"identify"}, 4, 1000, 2, 0.70}, {4, {}, 4, 1250}, {4, {}, 1, 300}};
  int curriculum_images = 8000, curriculum_batch = 8;
  double curriculum_lr = 3e-4;
  bool curriculum_shuffle = true;             // --shuffle-visual in stage C (item 11)
  // Pooled stage-C stages train one question per sample, curriculum_batch * questions samples per
  // step (item 12); full-resolution stages keep the conversations.
  bool curriculum_single_turn = true;
  // Stage C drops the visual tokens after this layer (no registers); -1 = every layer (item 21).
  int curriculum_summary_layers = -1;
  // Grounded attention (TrainOptions::ground_weight) in stage C and in stage 2 of every model whose
  // visual tokens reach ground_layer (item 22).
  double ground_weight = 1;
  int ground_layer = 1, ground_heads = 1;
  int pretrain_steps = 0;                     // stage 1: row-by-row descriptions (0 = skipped)
  int steps = 450, batch_size = 8;            // stage 2: the questions, identical for every model
  std::string train_parts = "finetune";       // LLaVA: the vision tower stays frozen
  std::vector<int> pools{4};                  // average-pooling baselines
  std::vector<int> resamplers{16};            // Perceiver-style resamplers by latent count (0 = none)
  // Training-free reducers on the trained plain model (specs). Empty: FastV (k = 2) and VisionZip
  // at the first pooling baseline's visual-token budget; {"none"}: none.
  std::vector<std::string> training_free;
  double lr = 3e-4;
  int bench_repeats = 3, bench_batch = 16;
  // Training time measured again in interleaved segments after stage 2: `timing_rounds` rounds,
  // each training every trained model for `timing_steps` (at most `steps`) stage-2 steps from the shared start
  // (thrown away), the order reversed each round, with the share of first-seen images the full
  // run had. Gives each time reduction a range instead of one run's figure (0 rounds = off).
  int timing_rounds = 3, timing_steps = 30;
  int timing_segment_steps() const { return timing_steps < steps ? timing_steps : steps; }
  std::vector<int> bench_gen{2, 128};
  int eval_limit = 0;                         // 0 = every test question
  uint64_t seed = 0;
  bool progress = true;
  // Data-parallel training stages (`--nproc`, torchrun variables): the group, or null to join the
  // one the environment names (RANK, WORLD_SIZE, ...) within dist_timeout_seconds.
  Communicator* comm = nullptr;
  int dist_timeout_seconds = 300;
  static ReproOptions quick();
};

// One option of `victor repro`, declared once: the CLI turns every row into a flag (its name, help
// and check), and ReproOptions::quick() sets every row's `quick` value. Integer lists are typed
// comma-separated, string lists by repeating the flag.
struct ReproOption {
  using Field = std::variant<int ReproOptions::*, double ReproOptions::*, bool ReproOptions::*, uint64_t ReproOptions::*,
                             std::string ReproOptions::*, std::vector<int> ReproOptions::*,
                             std::vector<std::string> ReproOptions::*, std::vector<CurriculumStage> ReproOptions::*>;
  std::string flag;
  Field field;
  std::string help;
  double lo = 0, hi = 0;              // numbers (each element of a list) must lie in [lo, hi]; lo == hi: any
  bool positive = false;              // a real number > 0
  std::vector<std::string> choices;   // a string must be one of these (empty: any)
  std::string quick;                  // the value under --quick, as typed on the command line ("": the default)
  ReproOption(std::string flag_, Field field_, std::string help_, double lo_ = 0, double hi_ = 0,
              bool positive_ = false, std::vector<std::string> choices_ = {}, std::string quick_ = {})
      : flag(std::move(flag_)), field(field_), help(std::move(help_)), lo(lo_), hi(hi_), positive(positive_),
        choices(std::move(choices_)), quick(std::move(quick_)) {}
};
const std::vector<ReproOption>& repro_options();
// Sets a row's field from its command-line text (checked as the CLI checks it); throws Error naming the flag.
void set_repro_option(ReproOptions& o, const ReproOption& row, const std::string& text);

// Runs everything and returns the report's path.
std::string run_repro(const ReproOptions& o);

}  // namespace victor
