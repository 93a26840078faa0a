#include "victor/train.h"

#include <ATen/autocast_mode.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "victor/gridvqa.h"
#include "victor/distributed.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/optim.h"
#include "victor/progress.h"
#include "victor/safetensors.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace victor {

std::vector<Part> parse_parts(const std::string& spec) {
  if (spec == "pretrain") return {Part::Projector, Part::Registers};
  if (spec == "finetune") return {Part::Projector, Part::Registers, Part::Llm};
  if (spec == "all") return {Part::Vision, Part::Projector, Part::Registers, Part::Llm};
  std::vector<Part> out;
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item == "vision") out.push_back(Part::Vision);
    else if (item == "projector") out.push_back(Part::Projector);
    else if (item == "registers") out.push_back(Part::Registers);
    else if (item == "llm") out.push_back(Part::Llm);
    else
      throw Error("--train: unknown part '" + item +
                  "' (vision, projector, registers, llm, or pretrain / finetune / all)");
  }
  if (out.empty()) throw Error("--train: nothing to train");
  return out;
}

std::vector<TrainSample> prepare_samples(const std::vector<Conversation>& convs, const Tokenizer& tok,
                                         const ModelConfig& cfg, const std::string& image_folder,
                                         bool skip_bad, std::vector<std::string>* skipped) {
  std::vector<TrainSample> out;
  struct Loaded {
    torch::Tensor pixels;
    int width = 0, height = 0;
    ImageLayout layout;
    torch::Tensor centres;  // LLaVA-NeXT grounding: each packed row's centre (once per image)
  };
  std::unordered_map<std::string, Loaded> loaded;  // image path -> pixels
  Progress bar("loading", int64_t(convs.size()), isatty(2) && convs.size() > 200);
  const int64_t image_rows = cfg.visual_tokens_per_image() + cfg.reducer.inserted_rows();
  for (size_t i = 0; i < convs.size(); ++i) {
    const Conversation& c = convs[i];
    try {
      TrainSample s;
      s.id = c.id;
      EncodedChat chat = encode_chat(tok, c.turns);
      s.input.ids = chat.ids;
      s.input.targets.assign(chat.ids.size(), -100);
      for (size_t j = 0; j + 1 < chat.ids.size(); ++j)
        if (chat.is_target[j + 1]) s.input.targets[j] = chat.ids[j + 1];
      for (auto t : s.input.targets) s.target_tokens += t != -100;
      if (s.target_tokens == 0) throw Error("sample '" + c.id + "': no assistant tokens to train on");
      int64_t images = 0;
      for (auto id : chat.ids) images += id == cfg.image_token_index;
      if (images > 0 && c.image.empty()) throw Error("sample '" + c.id + "': <image> but no image");
      int64_t length = int64_t(chat.ids.size()) + images * (image_rows - 1);
      if (length > cfg.text.max_position_embeddings && !cfg.is_next())
        throw Error("sample '" + c.id + "': " + std::to_string(length) +
                    " tokens exceed the context (max_position_embeddings " +
                    std::to_string(cfg.text.max_position_embeddings) + ")");
      if (images > 1 && cfg.is_next())
        throw Error("sample '" + c.id + "': several <image> tokens for one image file (LLaVA-NeXT training takes one)");
      if (images > 0) {
        fs::path p = fs::path(image_folder) / c.image;
        auto seen = loaded.find(p.string());
        if (seen != loaded.end()) {
          s.input.pixels = seen->second.pixels;  // one tensor per image, shared by its samples
          if (cfg.is_next()) s.input.layouts = {seen->second.layout};
        } else {
          if (!fs::exists(p)) throw Error("sample '" + c.id + "': image not found: " + p.string());
          Image img;
          try {
            img = load_image(p.string());
          } catch (const Error& e) {
            throw Error("sample '" + c.id + "': " + e.what());
          }
          PreparedImage prepared = prepare_image(img, cfg);
          s.input.pixels = prepared.pixels;
          if (cfg.is_next()) s.input.layouts = {prepared.layout};
          seen = loaded.emplace(p.string(), Loaded{s.input.pixels, img.width, img.height, prepared.layout}).first;
        }
        if (cfg.is_next()) {
          length = int64_t(chat.ids.size()) - 1 + victor::image_rows(cfg, seen->second.layout) + cfg.reducer.inserted_rows();
          if (length > cfg.text.max_position_embeddings)
            throw Error("sample '" + c.id + "': " + std::to_string(length) +
                        " rows exceed the context (max_position_embeddings " +
                        std::to_string(cfg.text.max_position_embeddings) + ")");
        }
        // Boxes are mapped through LLaVA-1.5's single view into its input; on LLaVA-NeXT they stay
        // in the image's coordinates and each packed row carries its centre there.
        const bool grounded = std::any_of(c.turns.begin(), c.turns.end(), [](const Turn& t) { return t.grounded; });
        if (grounded) {
          for (const Turn& t : c.turns) {
            TurnGrounding g{t.grounded, {}};
            for (const Box& b : t.boxes) {
              Box in;
              if (cfg.is_next())
                g.boxes.push_back(b);
              else if (box_in_input(b, seen->second.width, seen->second.height, cfg.preprocess, &in))
                g.boxes.push_back(in);
            }
            s.grounding.push_back(std::move(g));
          }
          if (cfg.is_next() && cfg.reducer.grid_side(cfg)) {
            Loaded& l = seen->second;
            if (!l.centres.defined()) l.centres = next_row_centres(cfg, l.layout);
            s.centres = l.centres;  // shared by the image's samples
          }
        }
      }
      out.push_back(std::move(s));
    } catch (const Error& e) {
      if (!skip_bad) throw;
      if (skipped) skipped->push_back(e.what());
    }
    bar.update(int64_t(i + 1));
  }
  return out;
}

int total_steps(const TrainOptions& o, size_t n) {
  if (o.max_steps > 0) return o.max_steps;
  const size_t per_step = size_t(o.batch_size) * o.grad_accum;
  return int(std::max<size_t>(1, (n * o.epochs + per_step - 1) / per_step));
}

double lr_at(const TrainOptions& o, int step, int total) {
  const int warm = o.warmup_steps >= 0 ? o.warmup_steps : std::max(1, total * 3 / 100);
  return warmup_cosine_lr(o.lr, step, warm, total, o.min_lr_ratio);
}

torch::Tensor shuffle_tokens(const torch::Tensor& x, uint64_t seed, torch::Tensor* order, int64_t first_row) {
  Rng rng(seed);
  const int64_t n = x.size(0), N = x.size(1);
  std::vector<int64_t> idx(size_t(n * N));
  for (int64_t i = 0; i < first_row; ++i)  // the draws of the rows before this slice
    for (int64_t t = N - 1; t > 0; --t) (void)rng.uniform(int(t + 1));
  for (int64_t i = 0; i < n; ++i) {
    int64_t* row = idx.data() + i * N;
    for (int64_t t = 0; t < N; ++t) row[t] = t;
    for (int64_t t = N - 1; t > 0; --t) std::swap(row[t], row[rng.uniform(int(t + 1))]);
  }
  auto perm = torch::tensor(idx).view({n, N});
  if (order) *order = perm;
  return x.gather(1, perm.unsqueeze(-1).expand({n, N, x.size(2)}));
}

void check_grounding(const ModelConfig& cfg, int layer, int heads) {
  if (!cfg.reducer.grid_side(cfg))
    throw Error("grounded attention needs visual tokens on the patch grid; " + cfg.reducer.name() +
                "'s are not (train it with --ground-weight 0)");
  const int seeing = cfg.reducer.drop_layer(cfg);  // layers 0 .. seeing-1 see the visual tokens
  if (layer < 0 || layer >= seeing)
    throw Error("--ground-layer " + std::to_string(layer) + " must be a layer that sees the visual tokens: 0 to " +
                std::to_string(seeing - 1) +
                (seeing < cfg.num_layers() ? " (they leave after layer k = " + std::to_string(seeing) + ")" : ""));
  if (heads < 1 || heads > cfg.text.num_attention_heads)
    throw Error("--ground-heads " + std::to_string(heads) + " must be in [1, " +
                std::to_string(cfg.text.num_attention_heads) + "]");
}

torch::Tensor visual_token_centres(const ModelConfig& cfg) {
  const int side = cfg.reducer.grid_side(cfg).value_or(0);
  if (side == 0) throw Error("visual token centres: " + cfg.reducer.name() + "'s tokens are not on the patch grid");
  auto at = (torch::arange(side, torch::kFloat32) + 0.5f) / float(side);
  auto y = at.view({side, 1}).expand({side, side}), x = at.view({1, side}).expand({side, side});
  return torch::stack({x.reshape({-1}), y.reshape({-1})}, 1);  // [side*side, 2]
}

torch::Tensor next_row_centres(const ModelConfig& cfg, const ImageLayout& l) {
  const int side = next_view_side(cfg);
  auto at = [](int i, int n) { return (float(i) + 0.5f) / float(n); };
  std::vector<float> xy;
  for (int r = 0; r < side; ++r)
    for (int c = 0; c < side; ++c) xy.insert(xy.end(), {at(c, side), at(r, side)});
  if (l.grid_rows == 0) {
    xy.insert(xy.end(), {-1.f, -1.f});
  } else {
    const GridRegion g = unpad_region(l.grid_rows * side, l.grid_cols * side, l.height, l.width);
    for (int r = 0; r < g.height; ++r) {
      for (int c = 0; c < g.width; ++c) xy.insert(xy.end(), {at(c, g.width), at(r, g.height)});
      xy.insert(xy.end(), {-1.f, -1.f});
    }
  }
  const int64_t n = int64_t(xy.size() / 2);
  if (n != next_packed_rows(l, side))
    throw Error("next_row_centres: " + std::to_string(n) + " centres for " + std::to_string(next_packed_rows(l, side)) +
                " packed rows");
  return torch::from_blob(xy.data(), {n, 2}, torch::kFloat32).clone();
}

torch::Tensor box_token_weights(const std::vector<Box>& boxes, const torch::Tensor& centres) {
  auto w = torch::zeros({centres.size(0)});
  auto x = centres.select(1, 0), y = centres.select(1, 1);
  for (const Box& b : boxes) {
    auto in = (x.ge(b[0]) & x.lt(b[2]) & y.ge(b[1]) & y.lt(b[3])).to(torch::kFloat32);
    const float n = in.sum().item<float>();
    if (n > 0) w += in / n;
  }
  return w;
}

namespace {

using Clock = std::chrono::steady_clock;

// Sample order for an epoch: a seeded permutation, recomputable on resume.
std::vector<size_t> epoch_order(size_t n, uint64_t seed, int epoch) {
  std::vector<size_t> idx(n);
  for (size_t i = 0; i < n; ++i) idx[i] = i;
  Rng rng(seed * 1000003ull + uint64_t(epoch));
  for (size_t i = n; i > 1; --i) std::swap(idx[i - 1], idx[size_t(rng.uniform(int(i)))]);
  return idx;
}

// With the vision tower frozen its features are a fixed function of each image, so they are
// computed once and kept (as LLaVA's pretraining precomputes CLIP features); only the projector
// and what follows run every step. Keyed by the pixel tensor, which samples of one image share.
// Bounded by `cap_mb`; past it, features are computed every time.
class FeatureCache {
 public:
  explicit FeatureCache(int cap_mb) : cap_(size_t(std::max(cap_mb, 0)) << 20) {}

  // Features [n,N,d] of the images `pixels` (one [1,3,S,S] each).
  torch::Tensor get(const Vlm& model, const std::vector<torch::Tensor>& pixels) {
    torch::NoGradGuard ng;
    std::vector<torch::Tensor> out(pixels.size()), missing_px;
    std::unordered_map<const void*, int64_t> batch_rows;  // image -> its row in missing_px
    for (size_t i = 0; i < pixels.size(); ++i) {
      const void* key = pixels[i].data_ptr();
      auto it = slots_.find(key);
      if (it != slots_.end()) {
        out[i] = it->second;
        ++hits_;
        continue;
      }
      auto [b, fresh] = batch_rows.emplace(key, int64_t(missing_px.size()));
      if (fresh)
        missing_px.push_back(pixels[i]);
      else
        ++hits_;  // the same image twice in this batch: computed once
    }
    if (!missing_px.empty()) {
      // One image at a time: a batched product's rounding can depend on its row count when
      // several threads share it, and a resumed run meets its images in different company than
      // the uninterrupted run did (it starts with an empty cache), so a feature must not depend on
      // which other images were missing with it. The tower's products have 577 rows per image
      // either way, so this costs next to nothing.
      std::vector<torch::Tensor> parts;
      for (auto& px : missing_px) parts.push_back(model.vision_features(px));
      auto f = torch::cat(parts, 0);
      for (auto& [key, row] : batch_rows) {
        auto feat = f[row].unsqueeze(0).clone();
        size_t bytes = size_t(feat.numel()) * feat.element_size();
        if (used_ + bytes <= cap_) {
          slots_.emplace(key, feat);
          used_ += bytes;
        }
      }
      for (size_t i = 0; i < pixels.size(); ++i)
        if (!out[i].defined()) out[i] = f[batch_rows.at(pixels[i].data_ptr())].unsqueeze(0);
    }
    return torch::cat(out, 0);
  }
  int64_t hits() const { return hits_; }

 private:
  std::unordered_map<const void*, torch::Tensor> slots_;
  size_t cap_, used_ = 0;
  int64_t hits_ = 0;
};

// LibTorch's CPU autocast in bf16 for one forward pass (TrainOptions::autocast_bf16); always
// switched off again, also when the pass throws.
class BfloatAutocast {
 public:
  explicit BfloatAutocast(bool on) : on_(on) {
    if (!on_) return;
    at::autocast::set_cpu_enabled(true);
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
  }
  ~BfloatAutocast() {
    if (!on_) return;
    at::autocast::set_cpu_enabled(false);
    at::autocast::clear_cache();
  }
  BfloatAutocast(const BfloatAutocast&) = delete;
  BfloatAutocast& operator=(const BfloatAutocast&) = delete;

 private:
  bool on_;
};

// The grounding loss of one micro-batch (TrainOptions::ground_weight): cross-entropy of the
// supervised heads' attention, at each position that predicts a grounded answer's tokens, against its target.
struct GroundingLoss {
  torch::Tensor loss;  // undefined when no answer in the batch is grounded
  int64_t answers = 0;       // positions taught (one per answer token, end of turn included)
  double kl = 0, mass = 0;  // KL(target || attention) and the attention on the target's tokens
};

GroundingLoss grounding_loss(const torch::Tensor& probs, const SequenceBatch& batch,
                             const std::vector<const TrainSample*>& rows, const torch::Tensor& centres,
                             const torch::Tensor& order, int heads) {
  const int64_t B = probs.size(0), T = probs.size(2), S = probs.size(3);
  auto targets = batch.targets.contiguous(), kind = batch.meta.kind.contiguous();
  const int64_t* tg = targets.data_ptr<int64_t>();
  const int64_t* kd = kind.data_ptr<int64_t>();
  std::vector<int64_t> qb, qt;
  std::vector<torch::Tensor> dist;
  int64_t image = 0;
  for (int64_t b = 0; b < B; ++b) {
    const TrainSample& s = *rows[size_t(b)];
    const int64_t img = image;
    if (s.input.pixels.defined()) image += s.input.pixels.size(0);
    if (s.grounding.empty() || !s.input.pixels.defined()) continue;
    std::vector<int64_t> visual;
    for (int64_t t = 0; t < T; ++t)
      if (kd[b * T + t] == int64_t(TokenKind::Visual)) visual.push_back(t);
    const torch::Tensor& own = s.centres.defined() ? s.centres : centres;  // LLaVA-NeXT: the sample's own
    if (!own.defined()) throw Error("sample '" + s.id + "': grounding without its rows' centres");
    if (int64_t(visual.size()) != own.size(0))
      throw Error("sample '" + s.id + "': grounding needs exactly one image (" + std::to_string(visual.size()) +
                  " visual tokens, " + std::to_string(own.size(0)) + " per image)");
    const auto visual_index = torch::tensor(visual);
    auto centres_here = order.defined() ? own.index_select(0, order[img]) : own;
    // Each assistant answer is one run of targets; every position in it predicts one of the
    // answer's tokens ("row 2, column 3" names the place in its later tokens), so every one is taught.
    size_t turn = 0;
    torch::Tensor d;  // the current answer's target, undefined when it is not grounded
    for (int64_t t = 0; t < T; ++t) {
      if (tg[b * T + t] == -100) continue;
      if (t == 0 || tg[b * T + t - 1] == -100) {  // a new answer
        if (turn >= s.grounding.size()) break;
        const TurnGrounding& g = s.grounding[turn++];
        d = torch::Tensor();
        if (g.on) {
          d = torch::zeros({S});
          d[0] = 1;  // the sink: the row's first token
          d.index_put_({visual_index}, box_token_weights(g.boxes, centres_here));
          d = d / d.sum();
        }
      }
      if (!d.defined()) continue;
      dist.push_back(d);
      qb.push_back(b);
      qt.push_back(t);
    }
  }
  GroundingLoss r;
  if (dist.empty()) return r;
  auto target = torch::stack(dist).unsqueeze(1);  // [Q,1,S]
  auto p = probs.narrow(1, 0, heads).transpose(1, 2).index({torch::tensor(qb), torch::tensor(qt)});  // [Q,h,S]
  r.loss = -(target * (p + 1e-9).log()).sum(-1).mean();
  const double entropy = -(target * (target + 1e-12).log()).sum(-1).mean().item<double>();
  r.kl = r.loss.item<double>() - entropy;
  r.mass = (p.detach() * target.gt(0)).sum(-1).mean().item<double>();
  r.answers = int64_t(dist.size());
  return r;
}

// Model files, then the full trainer state under a step-tagged name, then trainer_state.json
// (atomic) pointing at it: a crash at any point leaves a consistent resumable state.
void save_checkpoint(const Vlm& model, const std::vector<ParamRef*>& trainable, const AdamW& adam,
                     const TrainOptions& o, int step, int total, const std::string& tok_dir) {
  ModelFolderWrite write(o.out);
  model.save(o.out);
  copy_tokenizer_files(tok_dir, o.out);
  std::vector<std::pair<std::string, torch::Tensor>> state;
  for (auto& p : model.params()) state.emplace_back("param." + p.name, *p.tensor);
  for (size_t i = 0; i < trainable.size(); ++i) {
    state.emplace_back("exp_avg." + trainable[i]->name, adam.exp_avg()[i]);
    state.emplace_back("exp_avg_sq." + trainable[i]->name, adam.exp_avg_sq()[i]);
  }
  std::string name = "trainer_state-" + std::to_string(step) + ".safetensors";
  save_safetensors((fs::path(o.out) / name).string(), state);
  json parts = json::array();
  for (auto p : o.parts) parts.push_back(part_name(p));
  json j = {{"step", step},        {"total_steps", total},       {"seed", o.seed},
            {"state_file", name},  {"batch_size", o.batch_size}, {"grad_accum", o.grad_accum},
            {"lr", o.lr},          {"parts", parts},             {"data", o.data},
            {"world_size", o.comm ? o.comm->world_size() : 1},
            {"global_batch", int64_t(o.batch_size) * o.grad_accum * (o.comm ? o.comm->world_size() : 1)}};
  fs::path sj = fs::path(o.out) / "trainer_state.json";
  write_file_atomic(sj.string(), j.dump(2) + "\n");
  write.commit();
  // Now that trainer_state.json names the new state, every other state file is garbage: the
  // previous one, and any a killed run wrote but never pointed at (as are stale temporaries).
  std::vector<fs::path> garbage;
  std::error_code ec;
  for (auto it = fs::directory_iterator(o.out, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    const std::string f = it->path().filename().string();
    if (f != name && f.rfind("trainer_state-", 0) == 0 && it->path().extension() == ".safetensors")
      garbage.push_back(it->path());
  }
  for (auto& g : garbage) fs::remove(g, ec);
  remove_stale_temporaries(o.out);
}

struct ResumePoint {
  int step = 0, total = 0;
  int64_t global_batch = 0;  // 0: written before data parallelism
  std::string state_file;
};

// trainer_state.json, every field checked and the error naming the file.
ResumePoint read_resume_point(const fs::path& sj) {
  if (!fs::exists(sj)) throw Error(sj.string() + ": nothing to resume from");
  ResumePoint r;
  try {
    json j = json::parse(read_file(sj.string(), FileKind::Json));
    r.step = j.at("step").get<int>();
    r.total = j.at("total_steps").get<int>();
    r.state_file = j.at("state_file").get<std::string>();
    r.global_batch = j.value("global_batch", int64_t(0));
  } catch (const json::exception& e) {
    throw Error(sj.string() + ": corrupt trainer state (" + e.what() + ")");
  }
  if (r.step < 0 || r.state_file.empty() || r.state_file.find('/') != std::string::npos ||
      r.state_file.find("..") != std::string::npos)
    throw Error(sj.string() + ": corrupt trainer state (step or state_file)");
  return r;
}

// A run killed after logging steps it had not yet checkpointed logs them again on resume: keep
// only the lines up to the resumed step (and drop a line cut short by the kill).
void truncate_log(const std::string& path, int step) {
  if (!fs::exists(path)) return;
  // Lines kept byte for byte (a re-serialized object would reorder its keys).
  std::istringstream in(read_file(path, FileKind::Dataset));
  std::string line, kept;
  while (std::getline(in, line)) {
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int>() <= step)
      kept += line + "\n";
  }
  write_file_atomic(path, kept);
}

// ---- The training loop's named steps --------------------------------------------------------

// What the run refuses before it starts: an empty or malformed batch, a reducer that has nothing
// to train, grounding without its prerequisites.
void check_run(const Vlm& model, const std::vector<TrainSample>& samples, const TrainOptions& o) {
  if (samples.empty()) throw Error("train: no usable samples");
  if (o.batch_size < 1 || o.grad_accum < 1) throw Error("train: batch size and accumulation must be >= 1");
  const auto& cfg = model.config();
  if (!cfg.reducer.is_none() && !cfg.reducer.trained())
    throw Error("train: " + cfg.reducer.spec() + " is a training-free reducer; train the plain model and "
                "evaluate it with --reducer " + cfg.reducer.spec());
  if (o.ground_weight <= 0) return;
  if (cfg.is_next() && !cfg.reducer.grid_side(cfg))
    throw Error("--ground-weight on LLaVA-NeXT: " + cfg.reducer.name() +
                " moves the rows off the packed patch grid (grounding runs with none, victor or pool)");
  try {
    check_grounding(cfg, o.ground_layer, o.ground_heads);
  } catch (const Error& e) {
    throw Error(std::string("train: ") + e.what());
  }
  if (std::none_of(samples.begin(), samples.end(), [](const TrainSample& s) { return !s.grounding.empty(); }))
    throw Error("train: --ground-weight needs answers with \"boxes\" (none of the " + std::to_string(samples.size()) +
                " samples has any; GridVQA writes them)");
}

// Marks the chosen parts trainable and returns their parameters, in the model's order.
std::vector<ParamRef*> select_trainable(Vlm& model, const std::vector<Part>& parts) {
  model.set_trainable(parts);
  std::vector<ParamRef*> trainable;
  for (auto& p : const_cast<std::vector<ParamRef>&>(model.params()))
    if (p.tensor->requires_grad()) trainable.push_back(&p);
  if (trainable.empty()) throw Error("train: the selected parts have no parameters (no registers?)");
  return trainable;
}

// Ranks that load different checkpoints, data or options would silently train different models
// and average their gradients: a hash of all three must agree.
void check_ranks_agree(const Vlm& model, const std::vector<TrainSample>& samples, const TrainOptions& o,
                       Communicator& comm) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
  for (auto& p : model.params()) {
    const double sum = p.tensor->to(torch::kFloat64).sum().item<double>();
    uint64_t bits;
    std::memcpy(&bits, &sum, sizeof bits);
    mix(bits);
    mix(std::hash<std::string>{}(p.name));
  }
  for (auto& smp : samples) {
    mix(std::hash<std::string>{}(smp.id));
    mix(uint64_t(smp.target_tokens));
    for (int64_t id : smp.input.ids) mix(uint64_t(id));
  }
  for (uint64_t v : {uint64_t(o.batch_size), uint64_t(o.grad_accum), uint64_t(o.max_steps), uint64_t(o.epochs),
                     o.seed, uint64_t(o.lr * 1e12), uint64_t(o.parts.size())})
    mix(v);
  const auto [lo, hi] = comm.min_max(int64_t(h));
  if (lo != hi)
    throw Error("train: rank " + std::to_string(comm.rank()) + ": the ranks disagree on the model, data or options "
                "(their hashes differ): every rank must load the same checkpoint and data with the same options");
}

// Loads the parameters and optimizer moments trainer_state.json names in the output folder and
// returns the step to continue from; the run's total steps and global batch must match.
int resume(Vlm& model, const std::vector<ParamRef*>& trainable, AdamW& adam, const TrainOptions& o, int total,
           int world) {
  const fs::path sj = fs::path(o.out) / "trainer_state.json";
  const ResumePoint rp = read_resume_point(sj);
  if (rp.total != total)
    throw Error(sj.string() + ": total_steps " + std::to_string(rp.total) + " differs from this run's " +
                std::to_string(total) + " (same options needed)");
  const int64_t global_batch = int64_t(o.batch_size) * o.grad_accum * world;
  if (rp.global_batch > 0 && rp.global_batch != global_batch)
    throw Error(sj.string() + ": the checkpoint's global batch is " + std::to_string(rp.global_batch) +
                " samples per step, this run's " + std::to_string(global_batch) +
                " (--batch-size x --grad-accum x ranks must stay the same to resume)");
  SafetensorsFile st((fs::path(o.out) / rp.state_file).string());
  torch::NoGradGuard ng;
  for (auto& p : model.params()) p.tensor->copy_(st.load("param." + p.name));
  for (size_t i = 0; i < trainable.size(); ++i) {
    adam.exp_avg()[i].copy_(st.load("exp_avg." + trainable[i]->name));
    adam.exp_avg_sq()[i].copy_(st.load("exp_avg_sq." + trainable[i]->name));
  }
  return rp.step;
}

// metrics.jsonl (or --log), rank 0 only; on resume cut back to the resumed step and appended to.
std::ofstream open_metrics_log(const TrainOptions& o, int step, bool writer) {
  std::ofstream log;
  const std::string path = !o.log.empty() ? o.log : o.out.empty() ? "" : (fs::path(o.out) / "metrics.jsonl").string();
  if (path.empty() || !writer) return log;
  if (fs::path(path).has_parent_path()) fs::create_directories(fs::path(path).parent_path());
  if (o.resume) truncate_log(path, step);
  log.open(path, o.resume ? std::ios::app : std::ios::trunc);
  return log;
}

// What one optimizer step sums over its micro-batches (and, data-parallel, over the ranks).
struct StepFigures {
  double loss_sum = 0, ground_kl = 0, ground_mass = 0;
  int64_t tokens = 0, rows = 0, grounded = 0;
};

// The run's fixed context for its micro-batches.
struct Run {
  const TrainOptions& o;
  Communicator* comm;
  int rank, world;
  bool vision_trained;
  FeatureCache& features;
  bool grounding;         // --ground-weight > 0
  torch::Tensor centres;  // LLaVA-1.5 grounding: each visual token's centre (LLaVA-NeXT: per sample)
};

// The samples of micro-batch `a` of `step` on this rank: rank r takes the r-th slice of each
// global micro-batch, in the seeded per-epoch order (one rank: the whole micro-batch).
class SampleOrder {
 public:
  SampleOrder(const std::vector<TrainSample>& samples, uint64_t seed) : samples_(samples), seed_(seed) {}
  std::vector<const TrainSample*> micro_batch(const Run& run, int step, int a) {
    const auto& o = run.o;
    const size_t per_step = size_t(o.batch_size) * o.grad_accum * size_t(run.world);
    std::vector<const TrainSample*> out;
    for (int b = 0; b < o.batch_size; ++b) {
      const size_t global = size_t(step) * per_step + size_t(a) * o.batch_size * run.world +
                            size_t(run.rank) * o.batch_size + size_t(b);
      const int epoch = int(global / samples_.size());
      if (epoch != epoch_) {
        order_ = epoch_order(samples_.size(), seed_, epoch);
        epoch_ = epoch;
      }
      out.push_back(&samples_[order_[global % samples_.size()]]);
    }
    return out;
  }

 private:
  const std::vector<TrainSample>& samples_;
  uint64_t seed_;
  std::vector<size_t> order_;
  int epoch_ = -1;
};

// The sequence batch of one micro-batch: images encoded (frozen tower: through the feature cache),
// projected, optionally shuffled, and assembled right-padded with the answer targets.
SequenceBatch micro_batch_inputs(Vlm& model, const Run& run, const std::vector<PromptInput>& rows, int step, int a,
                                 torch::Tensor* visual_order) {
  const auto& o = run.o;
  if (model.config().is_next()) {  // each image's packed rows (no feature cache)
    if (o.shuffle_visual) throw Error("--shuffle-visual is not implemented on LLaVA-NeXT (its rows are a packed grid)");
    return model.assemble(rows, model.encode_prompt_images(rows), /*pad_left=*/false);
  }
  std::vector<torch::Tensor> px;
  for (auto& r : rows)
    if (r.pixels.defined()) px.push_back(r.pixels);
  torch::Tensor embeds;
  if (!px.empty()) {
    embeds = run.vision_trained ? model.encode_images(torch::cat(px, 0)) : model.project(run.features.get(model, px));
    if (o.shuffle_visual)  // a distinct permutation for every micro-batch of the run
      embeds = shuffle_tokens(embeds, o.seed * 1000003ull + uint64_t(step) * uint64_t(o.grad_accum) + uint64_t(a),
                              visual_order, int64_t(run.rank) * o.batch_size);
  }
  return model.assemble(rows, embeds, /*pad_left=*/false);
}

// Forward of one micro-batch and its loss: cross-entropy over the answer tokens (data-parallel:
// this rank's share of the global mean), plus the weighted grounding loss. Adds to `fig`.
torch::Tensor micro_batch_loss(Vlm& model, const Run& run, const std::vector<const TrainSample*>& sources,
                               int step, int a, StepFigures& fig) {
  const auto& o = run.o;
  std::vector<PromptInput> rows;
  for (auto* s : sources) rows.push_back(s->input);
  torch::Tensor visual_order;
  SequenceBatch batch = micro_batch_inputs(model, run, rows, step, a, &visual_order);
  const bool grounding = run.grounding;
  ForwardTrace trace;
  torch::Tensor probs;
  if (grounding)
    trace.probe = [&](int layer, const torch::Tensor& p, const TokenMeta&, const TokenMeta&) {
      if (layer == o.ground_layer) probs = p;
    };
  ForwardOutput out;
  torch::Tensor sel, logits;
  {
    BfloatAutocast mixed(o.autocast_bf16);
    out = model.forward(batch, nullptr, grounding ? &trace : nullptr);
    sel = out.targets.ne(-100);
    logits = model.logits(out.hidden.index({sel}));
  }
  logits = logits.to(torch::kFloat32);  // the loss in float32
  if (probs.defined()) probs = probs.to(torch::kFloat32);
  auto targets = out.targets.index({sel});
  GroundingLoss g;
  if (grounding) g = grounding_loss(probs, batch, sources, run.centres, visual_order, o.ground_heads);
  torch::Tensor loss;
  if (!run.comm) {
    loss = torch::nn::functional::cross_entropy(logits, targets);
  } else {
    // The loss the single process takes over the whole global micro-batch (a mean over all its
    // target tokens, and over all grounded answers): each rank's share, weighted by its counts
    // out of the global ones, so that summed gradients equal the single process's.
    torch::Tensor counts =
        torch::tensor({double(targets.size(0)), double(g.loss.defined() ? g.answers : 0)}, torch::kFloat32);
    run.comm->allreduce_sum({counts});
    const double n_all = std::max(1.0, double(counts[0].item<float>()));
    loss = torch::nn::functional::cross_entropy(
               logits, targets, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)) / n_all;
    if (g.loss.defined()) g.loss = g.loss * (double(g.answers) / std::max(1.0, double(counts[1].item<float>())));
  }
  fig.loss_sum += loss.item<double>();  // data-parallel: summed over the ranks after the step
  if (g.loss.defined()) {
    loss = loss + o.ground_weight * g.loss;
    fig.ground_kl += g.kl * g.answers;
    fig.ground_mass += g.mass * g.answers;
    fig.grounded += g.answers;
  }
  fig.tokens += batch.meta.kind.ne(int64_t(TokenKind::Pad)).sum().item<int64_t>();
  fig.rows += int64_t(rows.size());
  return loss;
}

// Every trainable parameter's gradient (zeros where the step left none).
std::vector<torch::Tensor> gradients(const std::vector<ParamRef*>& trainable) {
  std::vector<torch::Tensor> grads;
  for (auto* p : trainable) {
    auto& g = p->tensor->mutable_grad();
    if (!g.defined()) g = torch::zeros_like(*p->tensor);
    grads.push_back(g);
  }
  return grads;
}

// The distributed reduction: one all-reduce per step, in buckets, of the gradients (unless the
// backward pass already summed them, `summed`) and then the step's figures, which come back as
// the global ones.
void reduce_step(Communicator& comm, const std::vector<torch::Tensor>& grads, bool summed, StepFigures& fig) {
  torch::Tensor figures = torch::tensor({fig.loss_sum, double(fig.tokens), double(fig.rows), fig.ground_kl,
                                         fig.ground_mass, double(fig.grounded)}, torch::kFloat64).to(torch::kFloat32);
  std::vector<torch::Tensor> all;
  if (!summed) all = grads;
  all.push_back(figures);
  comm.allreduce_sum(all);
  fig.loss_sum = figures[0].item<float>();
  fig.tokens = int64_t(std::llround(figures[1].item<float>()));
  fig.rows = int64_t(std::llround(figures[2].item<float>()));
  fig.ground_kl = figures[3].item<float>();
  fig.ground_mass = figures[4].item<float>();
  fig.grounded = int64_t(std::llround(figures[5].item<float>()));
}

// One line of metrics.jsonl (step is 1-based, as the checkpoints count) and the progress bar's text.
void log_step(std::ofstream& log, Progress& bar, int step, const StepFigures& fig, double loss_mean, double loss_ema,
              double lr, double norm, double dt, double epoch) {
  const bool grounded = fig.grounded > 0;
  if (log.is_open()) {
    json j = {{"step", step},   {"loss", loss_mean}, {"lr", lr}, {"grad_norm", norm}, {"tokens", fig.tokens},
              {"samples", fig.rows}, {"step_seconds", dt}, {"tokens_per_second", fig.tokens / dt}, {"epoch", epoch}};
    if (grounded) {
      j["ground_kl"] = fig.ground_kl / double(fig.grounded);
      j["ground_mass"] = fig.ground_mass / double(fig.grounded);
    }
    log << j.dump() << "\n";
    log.flush();
  }
  char extra[128];
  if (grounded)
    std::snprintf(extra, sizeof extra, "loss %.4f  ground %.2f  %.0f tok/s", loss_ema,
                  fig.ground_mass / double(fig.grounded), fig.tokens / dt);
  else
    std::snprintf(extra, sizeof extra, "loss %.4f  %.0f tok/s", loss_ema, fig.tokens / dt);
  bar.update(step, extra);
}

}  // namespace

TrainReport train_model(Vlm& model, const std::vector<TrainSample>& samples, const TrainOptions& o,
                        const std::string& tok_dir) {
  check_run(model, samples, o);
  std::vector<ParamRef*> trainable = select_trainable(model, o.parts);
  const bool vision_trained = std::find(o.parts.begin(), o.parts.end(), Part::Vision) != o.parts.end();
  FeatureCache features(vision_trained ? 0 : o.feature_cache_mb);
  Communicator* comm = o.comm;
  const int world = comm ? comm->world_size() : 1, rank = comm ? comm->rank() : 0;
  const bool writer = rank == 0;  // rank 0 alone writes checkpoints and metrics
  if (size_t(world) > samples.size())
    throw Error("train: world size " + std::to_string(world) + " is larger than the " + std::to_string(samples.size()) +
                " samples: every rank needs data");
  if (comm) check_ranks_agree(model, samples, o, *comm);
  const bool grounding = o.ground_weight > 0;
  const Run run{o, comm, rank, world, vision_trained, features, grounding,
                grounding && !model.config().is_next() ? visual_token_centres(model.config()) : torch::Tensor()};

  std::unique_ptr<OverlappedGradients> overlapped;  // the last backward of a step starts the sums
  std::vector<torch::Tensor> trained_tensors;
  for (auto* p : trainable) trained_tensors.push_back(*p->tensor);
  if (comm && o.overlap_allreduce) overlapped = std::make_unique<OverlappedGradients>(*comm, trained_tensors);
  AdamWOptions adam_options;
  adam_options.beta1 = o.beta1, adam_options.beta2 = o.beta2, adam_options.eps = o.eps;
  adam_options.weight_decay = o.weight_decay;
  AdamW adam(trained_tensors, adam_options);

  TrainOptions global_o = o;  // every step's global batch: batch_size x grad_accum on each rank
  global_o.batch_size = o.batch_size * world;
  const int total = total_steps(global_o, samples.size());
  int step = o.resume ? resume(model, trainable, adam, o, total, world) : 0;
  std::ofstream log = open_metrics_log(o, step, writer);
  const size_t per_step = size_t(o.batch_size) * o.grad_accum * size_t(world);  // global samples per step
  const int end = o.stop_after > 0 ? std::min(total, step + o.stop_after) : total;
  Progress bar("train", total, o.progress && writer && isatty(2));
  TrainReport rep;
  double loss_ema = 0, step_time_sum = 0, reduce_seconds = 0;
  const auto t_start = Clock::now();
  SampleOrder order(samples, o.seed);
  for (; step < end; ++step) {
    const auto t0 = Clock::now();
    const uint64_t bytes_before = comm ? comm->bytes_reduced() : 0;
    StepFigures fig;
    for (int a = 0; a < o.grad_accum; ++a) {
      torch::Tensor loss = micro_batch_loss(model, run, order.micro_batch(run, step, a), step, a, fig);
      if (overlapped && a == o.grad_accum - 1) overlapped->arm();
      (loss / double(o.grad_accum)).backward();
    }
    const auto t_reduce = Clock::now();
    if (overlapped) overlapped->finish();  // waits for the sums the backward pass started
    std::vector<torch::Tensor> grads = gradients(trainable);
    if (comm) {
      reduce_step(*comm, grads, /*summed=*/overlapped != nullptr, fig);
      reduce_seconds += std::chrono::duration<double>(Clock::now() - t_reduce).count();
      rep.bytes_reduced_per_step = comm->bytes_reduced() - bytes_before;  // gradients, figures, token counts
    }
    // Clip, then AdamW with decoupled weight decay.
    double norm = 0;
    const double scale = clip_scale(grads, o.clip, &norm, step);
    const double lr = lr_at(o, step, total);
    adam.step(grads, lr, scale, step);
    {
      torch::NoGradGuard ng;
      for (auto& g : grads) g.zero_();
    }
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    const double loss_mean = fig.loss_sum / o.grad_accum;
    loss_ema = rep.steps == 0 ? loss_mean : 0.95 * loss_ema + 0.05 * loss_mean;
    rep.steps++;
    rep.samples += int(fig.rows);
    rep.tokens += fig.tokens;
    rep.final_loss = loss_mean;
    step_time_sum += dt;
    rep.step_seconds.push_back(dt);
    if (fig.grounded > 0) {
      rep.grounded_answers += fig.grounded;
      rep.final_ground_loss = fig.ground_kl / double(fig.grounded);
      rep.final_ground_mass = fig.ground_mass / double(fig.grounded);
    }
    log_step(log, bar, step + 1, fig, loss_mean, loss_ema, lr, norm, dt,
             double(size_t(step + 1) * per_step) / samples.size());
    if (writer && !o.out.empty() && o.save_every > 0 && (step + 1) % o.save_every == 0 && step + 1 < end)
      save_checkpoint(model, trainable, adam, o, step + 1, total, tok_dir);
  }
  bar.finish();
  if (writer && !o.out.empty()) save_checkpoint(model, trainable, adam, o, step, total, tok_dir);
  if (comm) comm->barrier();  // the other ranks return once the final checkpoint is complete
  rep.world_size = world;
  rep.reduce_seconds_per_step = comm && rep.steps ? reduce_seconds / rep.steps : 0;
  model.set_trainable({});
  rep.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  rep.mean_step_seconds = rep.steps ? step_time_sum / rep.steps : 0;
  rep.tokens_per_second = step_time_sum > 0 ? rep.tokens / step_time_sum : 0;
  rep.feature_cache_hits = features.hits();
  return rep;
}

TrainReport train(const TrainOptions& opts) {
  TrainOptions o = opts;
  if (o.out.empty()) throw Error("train: --out is required");
  // Under torchrun, Slurm or `--nproc`: join the group first, so a rank that cannot reach the
  // master fails before loading anything.
  std::unique_ptr<Communicator> comm;
  if (!o.comm) {
    if (auto env = dist_env_from_environment()) {
      comm = std::make_unique<Communicator>(*env, std::chrono::seconds(o.dist_timeout_seconds));
      o.comm = comm.get();
    }
  }
  const bool writer = !o.comm || o.comm->rank() == 0;
  std::vector<std::string> bad;
  auto convs = load_llava_json(o.data, o.skip_bad ? &bad : nullptr);
  if (o.single_turn) convs = split_turns(convs);
  if (o.max_samples > 0 && int(convs.size()) > o.max_samples) convs.resize(size_t(o.max_samples));
  // Resume continues from the output folder's own checkpoint.
  std::string start = o.resume ? o.out : o.model_dir;
  // A run killed mid-checkpoint resumes: the trainer state trainer_state.json names holds every
  // parameter, so the folder's half-replaced model files are not what it continues from.
  Vlm model = Vlm::load(start, std::nullopt, /*allow_incomplete=*/o.resume);
  if (!o.resume && o.reducer) model.set_reducer(*o.reducer, o.seed);
  Tokenizer tok(start, /*allow_incomplete=*/o.resume);
  std::string folder = o.image_folder.empty() ? fs::path(o.data).parent_path().string() : o.image_folder;
  auto samples = prepare_samples(convs, tok, model.config(), folder, o.skip_bad, &bad);
  if (!bad.empty() && writer) {
    std::cerr << "victor: skipped " << bad.size() << " bad sample(s); first: " << bad.front() << "\n";
    fs::create_directories(o.out);
    std::ofstream sk(fs::path(o.out) / "skipped.jsonl", std::ios::app);
    for (auto& b : bad) sk << json({{"skipped", b}}).dump() << "\n";
  }
  TrainReport r = train_model(model, samples, o, start);
  r.skipped = int(bad.size());
  if (!bad.empty() && !o.out.empty() && writer) {
    std::ofstream log(fs::path(o.out) / "metrics.jsonl", std::ios::app);
    log << json({{"skipped_samples", bad.size()}}).dump() << "\n";
  }
  return r;
}

}  // namespace victor
