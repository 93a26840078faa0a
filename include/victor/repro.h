// `victor repro`: GridVQA -> train plain and Victor models with identical budgets -> evaluate ->
// benchmark -> a Markdown report with the paper's table and plots.
#pragma once
#include <string>
#include <vector>

namespace victor {

class Communicator;

// One shared curriculum stage (stage C): projector + language model trained on GridVQA with
// `grid` x `grid` images, only `families` asked, the visual tokens average-pooled by `pool`.
// Few visual tokens make the question-keyed lookup learnable (one in N tokens carries the
// answer, so its gradient signal is ~1/N); later stages carry it to more cells and tokens.
// A stage runs up to `repeats` schedules of `steps` (each a fresh warm-up and cosine decay, a warm
// restart, with its own data order) and stops early once its held-out accuracy reaches `target`:
// where a from-scratch model leaves the lookup's plateau moves with rounding (docs/benchmarks.md,
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
  // trained together in one stage (docs/benchmarks.md, item 20: exist learns on sparse grids,
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

struct ReproOptions {
  std::string out = "runs/repro";
  std::string preset = "small";
  // Every (m, k) pair is a Victor model. Measured (docs/benchmarks.md, item 13): at k = 1 of 6 layers the
  // question cannot both form its lookup and read the visual tokens before they leave, so the Victor
  // models fall to the answer prior; at k = 2 m = 8 kept the plain model's accuracy (43.0% vs 43.2%).
  std::vector<int> registers{2, 8};
  std::vector<int> summary_layers{1, 2};
  std::string register_mask = "causal";
  int train_images = 2000, test_images = 300, questions = 4;
  // Stage 0, shared by every model. Measured (docs/benchmarks.md, item 21): 150 steps on the 2,000
  // training images left the tower at 70.1% cell / 45.9% single-patch accuracy, and identify in every
  // later stage sat at that cell accuracy; 600 steps on 8,000 images of its own reach 85.6% / 85.4%.
  int vision_steps = 600, vision_batch = 32;
  // Stage 0's own GridVQA set (the main grid size), so the tower sees more items than stage 2's
  // training images; 0 = use the main training set.
  int vision_images = 8000;
  std::string vision_targets = "patch";      // stage 0: "patch" (every patch names its cell) or "cell" (cell means)
  // Stage 0 also teaches each class's count in the whole image (VisionPretrainOptions::counts).
  bool vision_counts = false;
  int text_steps = 0, text_batch = 8;         // stage L, shared: the language model on text.json
  double text_lr = 3e-4;
  // Stage C (shared, after 0 and L): the curriculum; projector + language model.
  // Measured (docs/benchmarks.md, item 22): with grounded attention, 4x4 identify at one token per
  // cell learns straight from stage 0 (83.7% in 1,000 steps, where without it the loss stayed flat
  // and a 2x2 curriculum was needed: items 10-12), then all four families at one token per cell
  // (exist and count learn there), then all of them at full resolution (256 tokens).
  std::vector<CurriculumStage> curriculum{
      {4, {"identify"}, 4, 1000, 2, 0.70}, {4, {}, 4, 1250}, {4, {}, 1, 300}};
  int curriculum_images = 8000, curriculum_batch = 8;
  double curriculum_lr = 3e-4;
  // Stage C: --shuffle-visual. Measured on 2x2 identify (item 11): 2 of 3 shuffled chains broke
  // within 2,000 steps, 1 of 4 ordered ones; the stuck ones learned the row and not the column.
  bool curriculum_shuffle = true;
  // Stage C: the pooled stages (where the lookup is learned) train one question per sample, with
  // curriculum_batch * questions samples per step (the same answers per step): in a conversation
  // about one image, a row-only lookup answers the row's second question by elimination, and
  // 2x2 identify stalls there (item 12). Full-resolution stages keep the conversations: one
  // image per question would cost 3x more per answer at 256 visual tokens.
  bool curriculum_single_turn = true;
  // Stage C: the visual tokens leave after this layer (no registers), so the lookups are learned in
  // the first K layers, where a Victor twin with k >= K still has the visual tokens; -1 = every layer.
  // Item 21: the plain stage C of one default run put the lookup past layer 2 and the k = 2 twins lost it.
  int curriculum_summary_layers = -1;
  // Grounded attention (TrainOptions::ground_weight) in stage C and stage 2: the first ground_heads
  // heads of decoder layer ground_layer learn to look at the cells each answer rests on (GridVQA's
  // boxes). Stage 2 grounds a model only where that layer still sees the visual tokens (k > layer).
  // Measured (item 22): on 4x4 grids from stage 0, identify 27% -> 84%, exist 49% -> 86%.
  double ground_weight = 1;
  int ground_layer = 1, ground_heads = 1;
  int pretrain_steps = 0;                     // stage 1: row-by-row descriptions (optional)
  int steps = 450, batch_size = 8;            // stage 2: the questions
  std::string train_parts = "finetune";       // LLaVA: the vision tower stays frozen
  std::vector<int> pools{4};                  // average-pooling baselines trained alongside
  // Perceiver-style resamplers trained alongside, by latent count (0 = none); 16 matches pool 4's
  // budget on the small preset.
  std::vector<int> resamplers{16};
  // Training-free reducers applied to the trained plain model (specs). Empty: FastV (k = 2) and
  // VisionZip at the first pooling baseline's visual-token budget; {"none"}: none.
  std::vector<std::string> training_free;
  double lr = 3e-4;  // after the curriculum; 1e-3 from stage 0 alone
  int bench_repeats = 3, bench_batch = 16;
  std::vector<int> bench_gen{2, 128};
  int eval_limit = 0;
  uint64_t seed = 0;
  bool progress = true;
  // Data-parallel training stages (`--nproc`, torchrun variables): the group, or null to join the
  // one the environment names (RANK, WORLD_SIZE, ...) within dist_timeout_seconds.
  Communicator* comm = nullptr;
  int dist_timeout_seconds = 300;
  static ReproOptions quick();
};

// Runs everything and returns the report's path.
std::string run_repro(const ReproOptions& o);

}  // namespace victor
