// Training in the LLaVA way: LLaVA JSON in, loss on assistant tokens, AdamW with warm-up and
// cosine decay, gradient accumulation and clipping, atomic checkpoints with exact resume.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "victor/gridvqa.h"
#include "victor/model.h"
#include "victor/tokenizer.h"

namespace victor {

class Communicator;

struct TrainOptions {
  std::string model_dir;     // starting checkpoint (HF layout, with tokenizer)
  std::string data;          // LLaVA JSON
  std::string image_folder;  // default: the JSON's folder
  std::string out;           // output folder: model + trainer state + metrics.jsonl
  std::vector<Part> parts{Part::Projector, Part::Registers};  // what is trained
  double lr = 1e-3, min_lr_ratio = 0.0, weight_decay = 0.0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double clip = 1.0;
  int batch_size = 8, grad_accum = 1, epochs = 1, max_steps = 0, warmup_steps = -1;
  int stop_after = 0;  // stop after this many steps in this session (0 = run to the end)
  int save_every = 0;  // steps between checkpoints (0 = only at the end)
  uint64_t seed = 0;
  bool resume = false, skip_bad = false, progress = true;
  std::string log;  // metrics JSON lines (default out/metrics.jsonl)
  // The token reducer for the starting model (unset: the checkpoint's own). Trained registers
  // are kept when the count matches and never silently redrawn.
  std::optional<Reducer> reducer;
  // Augmentation: each image's visual tokens in a fresh random order every step, so a lookup must
  // go by what a token says (its cell's place, from stage 0), not by its sequence position; such a
  // lookup survives a change of pooling or resolution. Seeded by (seed, step): resume stays exact.
  bool shuffle_visual = false;
  bool single_turn = false;  // every turn its own sample (split_turns): no answers to lean on
  // Mixed precision: the forward pass's matrix products (and so their backward) in bf16 through
  // LibTorch's CPU autocast; master weights, optimizer state and the loss stay float32. About
  // 1.9x faster per step on an AVX-512 BF16 CPU (notebook@f64a969); off by default so runs
  // stay bit-comparable with float32 ones.
  bool autocast_bf16 = false;
  int max_samples = 0;  // use only the first N samples (0 = all)
  int feature_cache_mb = 4096;  // frozen vision tower: keep each image's features (0 = recompute)
  // Grounded attention (GridVQA's "boxes", any data with them): the first `ground_heads` heads of
  // decoder layer `ground_layer` (0-based), at every position that predicts a grounded answer's
  // tokens, are trained toward the answer's regions: one share of attention on the row's first token (the
  // sink, "nothing here") and one share on each box's visual tokens. Weighted by ground_weight
  // (0 = off) and added to the loss. A lookup keyed by the question is a two-hop circuit a model
  // trained from scratch finds only after a long plateau (notebook@f64a969); this says where to look.
  double ground_weight = 0;
  int ground_layer = 1, ground_heads = 1;
  // Data parallelism (docs/distributed.md): set by train() from the torchrun environment, or by
  // tests. Each rank takes its share of every global batch (batch_size per rank per micro-batch),
  // gradients are summed over ranks after a token-weighted loss, so N ranks with batch b step
  // exactly as one process with batch N*b. Rank 0 alone writes checkpoints and metrics.
  Communicator* comm = nullptr;
  int dist_timeout_seconds = 300;  // joining the group (train() only)
  // With comm: the last backward pass of each step starts the gradients' all-reduce bucket by
  // bucket as they are ready (OverlappedGradients); false: one bucketed all-reduce after it.
  // Off by default: on one 2-core machine the ranks already use every core, Gloo's thread competes
  // with the backward pass, and overlapping measured 3-7% slower (docs/distributed.md). It is for
  // ranks on separate machines, where the all-reduce waits on the network.
  bool overlap_allreduce = false;
};

// Each row of x [n,N,d] with its N tokens in a random order (Fisher-Yates, seeded): the
// --shuffle-visual augmentation.
// `order` (optional) receives [n,N] int64: for each new place, the token's original index.
// `first_row`: x's rows are rows first_row.. of a larger batch shuffled with this seed (a rank's
// slice of the global micro-batch gets the orders the single process gives those rows).
torch::Tensor shuffle_tokens(const torch::Tensor& x, uint64_t seed, torch::Tensor* order = nullptr,
                             int64_t first_row = 0);

// Throws an Error naming --ground-layer / --ground-heads unless `layer` still sees the visual tokens
// (layer < cfg.drop_layer(): Victor drops them after layer k) and 1 <= heads <= the attention heads.
void check_grounding(const ModelConfig& cfg, int layer, int heads);

// Each visual token's centre (x, y), normalized to the model's input image, in the order the
// projector emits them (row-major patches, average-pooled by config.visual_pool): [N,2].
torch::Tensor visual_token_centres(const ModelConfig& cfg);
// LLaVA-NeXT: each of one image's packed rows (pack_image's order: the base view, then the
// unpadded crop grid with a newline after each row) as its centre in the image, normalized; the
// newlines (-1, -1), inside no box. The base view is the whole image squeezed to a square, the
// unpadded grid the image itself. For reducers whose rows stay on the patch grid (none, Victor).
torch::Tensor next_row_centres(const ModelConfig& cfg, const ImageLayout& layout);
// Per visual token, its share of the boxes: each box that holds at least one token centre gives
// one unit, spread evenly over those tokens. centres [N,2] -> [N] (sums to the boxes that hold a token).
torch::Tensor box_token_weights(const std::vector<Box>& boxes, const torch::Tensor& centres);

// One assistant turn's grounding, its boxes in the model input's coordinates.
struct TurnGrounding {
  bool on = false;
  std::vector<Box> boxes;
};

// Parses "vision,projector,registers,llm" or the presets "pretrain" and "finetune".
std::vector<Part> parse_parts(const std::string& spec);

// One prepared sample: token ids with next-token targets, and its image (pixels cached).
struct TrainSample {
  std::string id;
  PromptInput input;
  int64_t target_tokens = 0;
  std::vector<TurnGrounding> grounding;  // one per assistant turn (empty: none grounded)
  // LLaVA-NeXT with boxes: the centre of each of the image's packed rows (next_row_centres); the
  // boxes stay in the image's coordinates.
  torch::Tensor centres{};
};

// Tokenizes conversations (chat template, targets on assistant tokens only) and loads images.
// Bad samples throw an Error naming the sample, or with skip_bad are skipped and reported in
// `skipped` ("id: reason").
std::vector<TrainSample> prepare_samples(const std::vector<Conversation>& convs, const Tokenizer& tok,
                                         const ModelConfig& cfg, const std::string& image_folder,
                                         bool skip_bad, std::vector<std::string>* skipped);

struct TrainReport {
  int steps = 0, samples = 0, skipped = 0;
  double seconds = 0, final_loss = 0, mean_step_seconds = 0, tokens_per_second = 0;
  std::vector<double> step_seconds;  // each optimizer step's wall time, in order
  int64_t tokens = 0;
  int64_t feature_cache_hits = 0;  // images whose frozen vision features came from the cache
  int world_size = 1;              // data-parallel ranks
  uint64_t bytes_reduced_per_step = 0;  // gradient bytes each rank all-reduced per optimizer step
  // Mean seconds per optimizer step inside the all-reduce: the transfer and sum, plus the wait for
  // the slowest rank to finish its backward pass (what overlapping with the backward could hide).
  double reduce_seconds_per_step = 0;
  int64_t grounded_answers = 0;    // answer positions the grounding loss taught
  double final_ground_loss = 0;    // KL(target || attention) of the last step, mean over answers and heads
  double final_ground_mass = 0;    // attention on the target's tokens (sink included), last step
};

double lr_at(const TrainOptions& o, int step, int total_steps);
int total_steps(const TrainOptions& o, size_t n_samples);

TrainReport train(const TrainOptions& opt);
// The same, on a model and samples in memory (tests, repro); writes checkpoints only if out set.
TrainReport train_model(Vlm& model, const std::vector<TrainSample>& samples, const TrainOptions& opt,
                        const std::string& tokenizer_dir);

}  // namespace victor

namespace victor {

// Stage 0 of the GridVQA recipe: pretrain the vision tower to classify every grid cell
// (10 classes + empty) and to name its place in the grid, from the mean of its patch features,
// as LLaVA starts from a pretrained CLIP. The linear heads are discarded; only the vision tower
// changes.
struct GridImage {
  std::string image;
  int grid = 0;
  std::vector<int> labels;  // row-major, -1 = empty
  torch::Tensor pixels;     // [3,S,S]
};
std::vector<GridImage> load_grid_images(const std::string& gridvqa_dir, const std::string& split,
                                        const ModelConfig& cfg, int limit = 0);

struct VisionPretrainOptions {
  int steps = 200, batch_size = 32;
  double lr = 1e-3;
  uint64_t seed = 0;
  bool progress = true;
  // false: the mean of each cell's patches is classified; true: every patch is (each carries its cell).
  bool per_patch = false;
  // Also teach the image's contents as a whole: for each of the 10 classes, how many cells hold it
  // (0..G*G, one softmax per class), from every patch (per_patch) or from the mean of all patches.
  // CLIP's features carry what an image holds, not only what each patch shows; a language model
  // reads "is there a dress?" or "how many bags?" off such a summary with any attention pattern,
  // where per-cell features alone need a lookup keyed by the class in every cell, then a comparison
  // (notebook@f64a969, items 6, 8 and 15).
  bool counts = false;
};
struct VisionPretrainReport {
  int steps = 0;
  double seconds = 0, final_loss = 0, test_cell_accuracy = 0, test_position_accuracy = 0;
  double final_class_loss = 0, final_place_loss = 0;  // the two parts of final_loss
  double test_patch_accuracy = 0;  // the class head on single patches (what full resolution sees)
  double final_count_loss = 0;     // with counts: the count head's part of final_loss
  // With counts: the share of (test image, class) pairs whose count the head gets exactly right,
  // from a single patch and from the mean of all patches.
  double test_count_patch_accuracy = 0, test_count_mean_accuracy = 0;
};

// Per image, how many cells hold each of the 10 classes: labels [n,G*G] (-1 = empty) -> [n,10].
torch::Tensor class_counts(const torch::Tensor& labels);
// Each patch's cell in raster order: [side*side] int64 values in [0, grid*grid).
torch::Tensor patch_cells(int grid, int patches_per_side);
VisionPretrainReport pretrain_vision(Vlm& model, const std::vector<GridImage>& train,
                                     const std::vector<GridImage>& test, const VisionPretrainOptions& o);

}  // namespace victor
