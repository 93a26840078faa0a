// Token reducers: how many of an image's visual tokens the language model sees, and where.
//
// A table, the way KernelSet dispatches kernels: each kind of reducer is one file under
// src/reduce/ holding one `ReducerOps` row (its parameters, what it does to the sequence, its
// formulas, its config.json keys and its compute hooks) and registering it by name. A `Reducer`
// value points at one row with its parameters. The model, the formulas, bench, eval, serve and
// repro ask the row; none of them branches on the kind, so a new reducer is one file (a test
// registers a toy one from the test file alone). A spec string names one reducer:
//
//   none                          every visual token, every layer
//   victor:m=8,k=2[,mask=causal|registers_only]
//                                 m learned registers after each image; visual rows leave at layer k
//   pool:4                        average-pool the projected p x p patch neighbourhoods (576 -> 36)
//   fastv:k=2,keep=0.5            training-free: at layer k keep the visual tokens the last prompt
//                                 token attends to most in layer k-1 (averaged over heads)
//   visionzip:dominant=54,contextual=10
//                                 training-free: in the vision tower's selected layer keep the
//                                 patches the class token attends to most, merge the rest by key
//                                 similarity into `contextual` tokens
//   resampler:latents=64          trained: a Perceiver-style block, `latents` learned queries
//                                 cross-attending to the projected visual tokens, replaces them
//
// The compute hooks take LibTorch tensors; the fuzz build (no LibTorch) compiles the rows with
// VICTOR_SPEC_ONLY, which leaves them out: parsing, formulas and config are all it fuzzes.
#pragma once
#include <nlohmann/json.hpp>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "victor/attention_rule.h"

namespace at {
class Tensor;
}

namespace victor {

struct ModelConfig;
struct TokenMeta;
struct ReducerWeights;
struct VisionLastBlock;
struct ImageLayout;

std::string to_string(RegisterMask m);
RegisterMask register_mask_from_string(const std::string& s);

// A parameter a reducer owns (declared in this order; trained with --train registers). A matrix
// is stored in the language model's weight format; `bias_of` names the matrix a bias belongs to.
struct ReducerParam {
  std::string name;  // checkpoint name: "victor.registers", "resampler.attn.q_proj.weight"
  std::vector<int64_t> shape;
  bool matrix = false;
  std::string bias_of;
  std::string counted;  // what its rows are called when their count is the user's choice ("registers")
};

// One kind of reducer with its parameters: the table row.
class ReducerOps {
 public:
  virtual ~ReducerOps() = default;
  virtual std::string kind() const = 0;  // "victor", "fastv", ...
  virtual std::string spec() const = 0;  // canonical: Reducer::parse(spec()) is this reducer
  virtual std::string name() const = 0;  // display name for tables: "victor m=8 k=2"
  // Trained with the model (Victor, pooling, the resampler), or applied to a trained plain model.
  virtual bool trained() const { return false; }
  // Refuses parameters that cannot apply to this model (one line naming the key).
  virtual void validate(const ModelConfig& c) const;

  // ---- The sequence ----
  // Visual rows one image (one view on LLaVA-NeXT) contributes before the first decoder layer.
  virtual int visual_rows(const ModelConfig& c) const;
  // Rows inserted after each image's visual rows (Victor's registers).
  virtual int inserted_rows() const { return 0; }
  // The layer at whose input visual rows leave (keep_rows chooses which stay), if any.
  virtual std::optional<int> reduce_layer(const ModelConfig&) const { return std::nullopt; }
  // Visual rows of an image's `n` that stay past reduce_layer.
  virtual int kept_visual(int n) const { return n; }
  // Who sees whose keys (Victor's registers_only; causal otherwise).
  virtual RegisterMask mask() const { return RegisterMask::Causal; }
  // Visual tokens per side of the patch grid they sit on (LLaVA-NeXT's crop grid, grounding), or
  // none when they are not on a grid (merged or learned tokens).
  virtual std::optional<int> grid_side(const ModelConfig& c) const;
  // FLOPs of the reducer's own compute before the language model, per image.
  virtual double vision_flops(const ModelConfig&) const { return 0; }
  // The reducer's own parameters.
  virtual std::vector<ReducerParam> params(const ModelConfig&) const { return {}; }
  // config.json: writes the reducer's keys (the default a `token_reducer` spec).
  virtual void to_json(nlohmann::json& j) const { j["token_reducer"] = spec(); }

#ifndef VICTOR_SPEC_ONLY
  // ---- Compute (src/model asks these) ----
  // keep_rows needs the attention scores of the layer before reduce_layer (FastV).
  virtual bool needs_scores() const { return false; }
  // At reduce_layer: which rows of [B,T] stay (bool). `scores` [B,T] is defined when asked for.
  // The default keeps text and inserted rows (every visual row and the padding leave).
  virtual at::Tensor keep_rows(const TokenMeta& meta, const at::Tensor& scores) const;
  // The vision tower's selected features: `hidden` [n,1+N,D] (class token first) -> [n,rows,D].
  // `last` is filled only when needs_last_block(); `index` may receive what the choice kept.
  virtual bool needs_last_block() const { return false; }
  virtual at::Tensor select_features(const ModelConfig& c, const at::Tensor& hidden, const VisionLastBlock& last,
                                     at::Tensor* index) const;
  // After the projector: [n,N,d] -> [n,visual_rows,d].
  virtual at::Tensor after_projector(const ModelConfig& c, const ReducerWeights& w, const at::Tensor& x) const;
  // The rows inserted after each image, [inserted_rows, d].
  virtual at::Tensor inserted(const ReducerWeights& w) const;
  // LLaVA-NeXT, when grid_side() is none: one image's views [views,rows,d] (and what
  // select_features kept of each view) packed into its sequence of rows.
  virtual at::Tensor pack_views(const ModelConfig& c, const at::Tensor& views, const ImageLayout& l,
                                const at::Tensor& index) const;
#endif
};

// Reads a spec's parameters ("k=2,keep=0.5"; a bare value is stored under ""), each refused with
// the spec and the key when missing, malformed or out of range; done() refuses what is left over.
class ReducerArgs {
 public:
  ReducerArgs(std::string spec, std::map<std::string, std::string> kv) : spec_(std::move(spec)), kv_(std::move(kv)) {}
  bool has(const std::string& k) const { return kv_.count(k) > 0; }
  bool empty() const { return kv_.empty(); }
  std::string take(const std::string& k, const std::string& what);
  int integer(const std::string& k, const std::string& what, int lo, int hi);
  double real(const std::string& k, const std::string& what, double lo, double hi);  // in (lo, hi]
  void done() const;
  [[noreturn]] void fail(const std::string& why) const;
  const std::string& spec() const { return spec_; }

 private:
  std::string spec_;
  std::map<std::string, std::string> kv_;
};

class Reducer;

// A table entry: the kind's name, its spec syntax (for errors and --help) and its parser.
struct ReducerKindEntry {
  std::string kind;
  std::string usage;  // "victor:m=M,k=K[,mask=...]"
  std::function<Reducer(ReducerArgs&)> parse;
};
// Adds a kind to the table (refused when the name is taken). Returns true, so a file can register
// its row in a static initialiser.
bool register_reducer(ReducerKindEntry entry);
std::vector<std::string> reducer_usages();

struct VictorParams {
  int registers = 8;                  // m, per image
  std::optional<int> summary_layers;  // k: visual rows leave before layer k; none = never (k = L)
  RegisterMask mask = RegisterMask::Causal;
};
struct PoolParams {
  int factor = 2;  // p: p x p patches -> one token
};
struct FastVParams {
  int layer = 2;      // K: layers >= K see only the kept visual tokens (K >= 1)
  double keep = 0.5;  // share of each image's visual tokens kept, (0, 1]
};
struct VisionZipParams {
  int dominant = 54;    // patches kept by class-token attention
  int contextual = 10;  // tokens the other patches are merged into
};
struct ResamplerParams {
  int latents = 64;  // learned queries = visual rows per image entering the LLM
};

class Reducer {
 public:
  Reducer();  // none
  explicit Reducer(std::shared_ptr<const ReducerOps> ops) : ops_(std::move(ops)) {}
  static Reducer none() { return {}; }
  // The built-in kinds (each defined in its own file).
  static Reducer victor(VictorParams p);
  static Reducer pool(PoolParams p);
  static Reducer fastv(FastVParams p);
  static Reducer visionzip(VisionZipParams p);
  static Reducer resampler(ResamplerParams p);
  // Parses a spec ("victor:m=8,k=2") through the table; a bad one is refused with one line naming it.
  static Reducer parse(const std::string& spec);

  const ReducerOps& ops() const { return *ops_; }
  std::string kind() const { return ops_->kind(); }
  bool is_none() const { return kind() == "none"; }
  bool trained() const { return ops_->trained(); }
  // Victor's parameters, when this is Victor (the older --registers flags change them).
  const VictorParams* victor_params() const;

  std::string spec() const { return ops_->spec(); }
  std::string name() const { return ops_->name(); }
  bool operator==(const Reducer& o) const { return spec() == o.spec(); }
  bool operator!=(const Reducer& o) const { return !(*this == o); }
  void validate(const ModelConfig& c) const { ops_->validate(c); }

  // ---- The sequence (see ReducerOps) ----
  int visual_rows(const ModelConfig& c) const { return ops_->visual_rows(c); }
  int inserted_rows() const { return ops_->inserted_rows(); }
  std::optional<int> reduce_layer(const ModelConfig& c) const { return ops_->reduce_layer(c); }
  int kept_visual(int n) const { return ops_->kept_visual(n); }
  RegisterMask mask() const { return ops_->mask(); }
  std::optional<int> grid_side(const ModelConfig& c) const { return ops_->grid_side(c); }
  // The first decoder layer that holds no visual rows (L when some stay to the end).
  int drop_layer(const ModelConfig& c) const;
  // Rows (visual + inserted) an image of `n` visual rows still holds after the reduction; of one
  // image of visual_rows(c) for the second form. Stats and the server's figures.
  int64_t rows_past_reduction(const ModelConfig& c, int64_t n) const;
  int rows_past_reduction(const ModelConfig& c) const { return int(rows_past_reduction(c, visual_rows(c))); }

  // ---- Formulas, per request with `text` prompt tokens, `images` images, `generated` tokens ----
  // KV-cache rows summed over layers (bytes = rows * 2 * kv_heads * head_dim * element size).
  int64_t kv_rows(const ModelConfig& c, int64_t text, int64_t images, int64_t generated) const;
  // Prefill FLOPs of the LLM (vision tower and projector included).
  double prefill_flops(const ModelConfig& c, int64_t text, int64_t images) const;
  // The same for images of their own lengths (LLaVA-NeXT): `visual` holds each image's rows
  // entering the LLM (image_rows), `views` the views the tower ran on.
  int64_t kv_rows(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual, int64_t generated) const;
  double prefill_flops(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual, int64_t views) const;

  // config.json: Victor keeps its historic top-level keys (num_registers, summary_layers,
  // register_mask), pooling its `visual_pool`; the others write a `token_reducer` spec.
  void to_json(nlohmann::json& j) const { ops_->to_json(j); }
  static Reducer from_json(const nlohmann::json& j, const std::string& source);

 private:
  std::shared_ptr<const ReducerOps> ops_;
};

// Shared by the rows: the tower's selected features per view (the class token with
// vision_feature_select_strategy "full"), and a one-line refusal naming the spec.
int full_visual_rows(const ModelConfig& c);
void require_reducer(bool ok, const std::string& spec, const std::string& why);

}  // namespace victor
