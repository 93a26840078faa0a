// Vision-tower pretraining on GridVQA's cell classes (the recipe's stage 0).
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "victor/error.h"
#include "victor/jsonl.h"
#include "victor/optim.h"
#include "victor/progress.h"
#include "victor/train.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace victor {

std::vector<GridImage> load_grid_images(const std::string& dir, const std::string& split,
                                        const ModelConfig& cfg, int limit) {
  const fs::path p = fs::path(dir) / "grids.jsonl";
  if (!fs::exists(p)) throw Error(p.string() + ": cannot open (build the data with `victor data gridvqa`)");
  std::vector<GridImage> out;
  for_each_jsonl_file(p.string(), FileKind::Dataset, [&](const json& j, int n) {
    if (j.value("split", "") != split) return true;
    GridImage g;
    try {
      g.image = j.at("image").get<std::string>();
      g.grid = j.at("grid").get<int>();
      g.labels = j.at("labels").get<std::vector<int>>();
    } catch (const json::exception& e) {
      throw Error(p.string() + ":" + std::to_string(n) + ": needs string 'image', integer 'grid' and integer 'labels' (" +
                  e.what() + ")");
    }
    g.pixels = preprocess_image(load_image((fs::path(dir) / g.image).string()), cfg.preprocess);
    out.push_back(std::move(g));
    return !(limit > 0 && int(out.size()) >= limit);
  });
  return out;
}

namespace {

// Mean of each cell's patch features: [n,N,D] -> [n,G*G,D].
torch::Tensor cell_features(const torch::Tensor& feats, int grid, int patches_per_side) {
  const int64_t n = feats.size(0), D = feats.size(2), c = patches_per_side / grid;
  auto x = feats.view({n, grid, c, grid, c, D});
  return x.mean(std::vector<int64_t>{2, 4}).reshape({n, grid * grid, D});
}

}  // namespace

torch::Tensor class_counts(const torch::Tensor& labels) {
  // labels [n,G*G]: -1 empty, else a class in [0, 10)
  auto shifted = (labels.to(torch::kInt64) + 1).clamp(0, 10);
  return torch::one_hot(shifted, 11).sum(1).slice(1, 1, 11);  // [n,10]
}

torch::Tensor patch_cells(int grid, int patches_per_side) {
  if (grid <= 0 || patches_per_side <= 0 || patches_per_side % grid != 0)
    throw Error(std::to_string(patches_per_side) + " patches per side do not split into a " + std::to_string(grid) +
                "x" + std::to_string(grid) + " grid");
  const int c = patches_per_side / grid;
  std::vector<int64_t> idx(size_t(patches_per_side) * patches_per_side);
  for (int y = 0; y < patches_per_side; ++y)
    for (int x = 0; x < patches_per_side; ++x) idx[size_t(y) * patches_per_side + x] = (y / c) * grid + x / c;
  return torch::tensor(idx);
}

namespace {

// The probe heads stage 0 trains on the tower's tokens: each unit's class (11: empty + 10), its
// cell's place in the grid, and optionally every class's count (0..cells) in the image.
struct VisionHeads {
  static constexpr int64_t kClasses = 10;
  int64_t cells = 0, bins = 0;
  torch::Tensor class_w, class_b, where_w, where_b, count_w, count_b;  // count_*: only with counts

  VisionHeads(int grid, int64_t hidden, bool counts, uint64_t seed) : cells(int64_t(grid) * grid), bins(cells + 1) {
    torch::manual_seed(seed);
    class_w = (torch::randn({kClasses + 1, hidden}) * 0.02).requires_grad_(true);
    class_b = torch::zeros({kClasses + 1}).requires_grad_(true);
    // A second head names each cell's place in the grid, so the visual tokens carry where they
    // are (the language model must find "row 2, column 3" by content, not only by RoPE distance).
    where_w = (torch::randn({cells, hidden}) * 0.02).requires_grad_(true);
    where_b = torch::zeros({cells}).requires_grad_(true);
    // Drawn only when used, so the random stream (and every result) without counts is unchanged.
    if (counts) {
      count_w = (torch::randn({kClasses * bins, hidden}) * 0.02).requires_grad_(true);
      count_b = torch::zeros({kClasses * bins}).requires_grad_(true);
    }
  }
  bool counts() const { return count_w.defined(); }
  std::vector<torch::Tensor> params() const {
    std::vector<torch::Tensor> p{class_w, class_b, where_w, where_b};
    if (counts()) p.insert(p.end(), {count_w, count_b});
    return p;
  }
  torch::Tensor classes(const torch::Tensor& units) const { return torch::matmul(units, class_w.t()) + class_b; }
  torch::Tensor places(const torch::Tensor& units) const { return torch::matmul(units, where_w.t()) + where_b; }
  // [n,U,D] -> count logits [n,U,10,bins]
  torch::Tensor count_logits(const torch::Tensor& units) const {
    return (torch::matmul(units, count_w.t()) + count_b).view({units.size(0), units.size(1), kClasses, bins});
  }
};

// `count` grids from `set` starting at `start` (wrapping): pixels [n,3,S,S] and cell labels
// [n,cells] with 0 = empty, 1 + class otherwise.
std::pair<torch::Tensor, torch::Tensor> grid_batch(const std::vector<GridImage>& set, size_t start, size_t count) {
  std::vector<torch::Tensor> px, lab;
  for (size_t i = 0; i < count; ++i) {
    const GridImage& g = set[(start + i) % set.size()];
    px.push_back(g.pixels);
    std::vector<int64_t> l(g.labels.begin(), g.labels.end());
    lab.push_back(torch::tensor(l) + 1);
  }
  return {torch::stack(px), torch::stack(lab)};
}

// The probes' test accuracies: per cell mean, per patch, the place, and the counts.
void evaluate_heads(const Vlm& model, const VisionHeads& h, const std::vector<GridImage>& test, int grid, int side,
                    VisionPretrainReport& rep) {
  torch::NoGradGuard ng;
  const auto patch_of = patch_cells(grid, side);
  const auto where_target = torch::arange(h.cells, torch::kInt64);
  int64_t correct = 0, total = 0, where_ok = 0, patch_ok = 0, patches = 0;
  int64_t count_patch_ok = 0, count_mean_ok = 0, count_pairs = 0, count_patch_pairs = 0;
  for (size_t s = 0; s < test.size(); s += 64) {
    auto [px, lab] = grid_batch(test, s, std::min<size_t>(64, test.size() - s));
    auto feats = model.vision_features(px);
    auto patch_pred = h.classes(feats).argmax(-1);  // [n,N]
    patch_ok += patch_pred.eq(lab.index_select(1, patch_of)).sum().item<int64_t>();
    patches += patch_pred.numel();
    auto cells = cell_features(feats, grid, side);
    correct += h.classes(cells).argmax(-1).eq(lab).sum().item<int64_t>();
    where_ok += h.places(cells).argmax(-1).eq(where_target.unsqueeze(0)).sum().item<int64_t>();
    total += lab.numel();
    if (h.counts()) {
      auto target = class_counts(lab - 1);                                       // [n,10]
      auto per_patch = h.count_logits(feats).argmax(-1);                         // [n,N,10]
      count_patch_ok += per_patch.eq(target.unsqueeze(1)).sum().item<int64_t>();
      count_patch_pairs += per_patch.numel();
      auto mean = h.count_logits(feats.mean(1, true)).argmax(-1).squeeze(1);     // [n,10]
      count_mean_ok += mean.eq(target).sum().item<int64_t>();
      count_pairs += target.numel();
    }
  }
  if (count_pairs) {
    rep.test_count_patch_accuracy = double(count_patch_ok) / double(count_patch_pairs);
    rep.test_count_mean_accuracy = double(count_mean_ok) / double(count_pairs);
  }
  rep.test_cell_accuracy = double(correct) / double(total);
  rep.test_position_accuracy = double(where_ok) / double(total);
  rep.test_patch_accuracy = double(patch_ok) / double(patches);
}

}  // namespace

VisionPretrainReport pretrain_vision(Vlm& model, const std::vector<GridImage>& train,
                                     const std::vector<GridImage>& test, const VisionPretrainOptions& o) {
  if (train.empty()) throw Error("vision pretraining: no training grids");
  const auto& cfg = model.config();
  if (cfg.vision_feature_select_strategy != "default")
    throw Error("vision pretraining: needs vision_feature_select_strategy 'default'");
  const int side = cfg.vision.image_size / cfg.vision.patch_size, grid = train.front().grid;
  if (side % grid != 0)
    throw Error("vision pretraining: " + std::to_string(side) + " patches per side do not split into a " +
                std::to_string(grid) + "x" + std::to_string(grid) + " grid");
  auto t0 = std::chrono::steady_clock::now();
  model.set_trainable({Part::Vision});
  const VisionHeads heads(grid, cfg.vision.hidden_size, o.counts, o.seed);
  const auto where_target = torch::arange(heads.cells, torch::kInt64);
  const auto patch_of = patch_cells(grid, side);
  std::vector<torch::Tensor> params = heads.params();
  for (auto& p : model.params())
    if (p.part == Part::Vision) params.push_back(*p.tensor);
  AdamW opt(params, AdamWOptions{});  // the trainer's optimizer, no weight decay
  std::vector<size_t> order(train.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  Rng rng(o.seed + 99);
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[size_t(rng.uniform(int(i)))]);
  std::vector<GridImage> shuffled;
  for (auto i : order) shuffled.push_back(train[i]);
  Progress bar("vision", o.steps, o.progress && isatty(2));
  VisionPretrainReport rep;
  for (int step = 0; step < o.steps; ++step) {
    // Linear warm-up over 5% then cosine to zero: the trainer's schedule.
    const double lr = warmup_cosine_lr(o.lr, step, std::max(1, o.steps / 20), o.steps, 0.0);
    auto [px, lab] = grid_batch(shuffled, size_t(step) * o.batch_size, size_t(o.batch_size));
    auto feats = model.vision_features(px);  // [n,N,D]
    // Per cell: the mean of its patches. Per patch: every patch names its own cell's class and
    // place, so any visual token of a cell carries what the cell holds (what full resolution needs).
    auto units = o.per_patch ? feats : cell_features(feats, grid, side);
    auto unit_labels = o.per_patch ? lab.index_select(1, patch_of) : lab;          // [n,U]
    auto unit_places = o.per_patch ? patch_of : where_target;                      // [U]
    auto class_loss = torch::nn::functional::cross_entropy(heads.classes(units).reshape({-1, VisionHeads::kClasses + 1}),
                                                           unit_labels.reshape({-1}));
    auto place_loss = torch::nn::functional::cross_entropy(heads.places(units).reshape({-1, heads.cells}),
                                                           unit_places.repeat({px.size(0)}));
    auto loss = class_loss + place_loss;
    if (heads.counts()) {
      // every patch (or the image mean) names every class's count: lab holds classes + 1, 0 = empty
      auto target = class_counts(lab - 1);                                        // [n,10]
      auto units_c = o.per_patch ? feats : feats.mean(1, /*keepdim=*/true);        // [n,U,D]
      auto cl = heads.count_logits(units_c);                                      // [n,U,10,bins]
      auto tgt = target.unsqueeze(1).expand({-1, cl.size(1), -1});
      auto count_loss = torch::nn::functional::cross_entropy(cl.reshape({-1, heads.bins}), tgt.reshape({-1}));
      rep.final_count_loss = count_loss.item<double>();
      loss = loss + count_loss;
    }
    for (auto& p : params)
      if (p.grad().defined()) p.mutable_grad().zero_();
    loss.backward();
    std::vector<torch::Tensor> grads;
    for (auto& p : params) {
      auto& g = p.mutable_grad();
      if (!g.defined()) g = torch::zeros_like(p);
      grads.push_back(g);
    }
    opt.step(grads, lr, clip_scale(grads, 1.0, nullptr, step), step);
    rep.final_class_loss = class_loss.item<double>();
    rep.final_place_loss = place_loss.item<double>();
    rep.final_loss = rep.final_class_loss + rep.final_place_loss + rep.final_count_loss;
    char extra[96];
    if (heads.counts())
      std::snprintf(extra, sizeof extra, "loss %.4f (class %.4f, place %.4f, count %.4f)", rep.final_loss,
                    rep.final_class_loss, rep.final_place_loss, rep.final_count_loss);
    else
      std::snprintf(extra, sizeof extra, "loss %.4f (class %.4f, place %.4f)", rep.final_loss, rep.final_class_loss,
                    rep.final_place_loss);
    bar.update(step + 1, extra);
    rep.steps++;
  }
  bar.finish();
  model.set_trainable({});
  if (!test.empty()) evaluate_heads(model, heads, test, grid, side, rep);
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace victor
