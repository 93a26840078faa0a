// Token reducers: how many of an image's visual tokens the language model sees, and where.
//
// One value type, `Reducer`, holds the chosen kind and that kind's parameters. Everything that
// depends on the kind asks it: the model's assembly (rows per image, inserted registers), its
// forward (the layer where visual rows leave or are pruned), the cache and FLOP formulas, the
// display names of bench and repro, and config.json. A spec string names one reducer:
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
#pragma once
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

namespace victor {

struct ModelConfig;

enum class RegisterMask { Causal, RegistersOnly };
std::string to_string(RegisterMask m);
RegisterMask register_mask_from_string(const std::string& s);

enum class ReducerKind { None, Victor, Pool, FastV, VisionZip, Resampler };

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
  Reducer() = default;  // none
  static Reducer none() { return {}; }
  static Reducer victor(VictorParams p);
  static Reducer pool(PoolParams p);
  static Reducer fastv(FastVParams p);
  static Reducer visionzip(VisionZipParams p);
  static Reducer resampler(ResamplerParams p);
  // Parses a spec ("victor:m=8,k=2"); a bad one is refused with a one-line error naming it.
  static Reducer parse(const std::string& spec);

  ReducerKind kind() const { return kind_; }
  bool is_none() const { return kind_ == ReducerKind::None; }
  // Reducers a model is trained with (Victor, pooling, the resampler); the others are applied to
  // a trained plain model as they are.
  bool trained() const {
    return kind_ == ReducerKind::Victor || kind_ == ReducerKind::Pool || kind_ == ReducerKind::Resampler;
  }
  // Parameters of the kind (throw when the reducer is of another kind).
  const VictorParams& victor_params() const;
  const PoolParams& pool_params() const;
  const FastVParams& fastv_params() const;
  const VisionZipParams& visionzip_params() const;
  const ResamplerParams& resampler_params() const;

  std::string spec() const;  // canonical spec: parse(spec()) == *this
  std::string name() const;  // display name for tables: "Victor m=8 k=2", "FastV k=2 keep=50%"
  bool operator==(const Reducer& o) const { return spec() == o.spec(); }
  bool operator!=(const Reducer& o) const { return !(*this == o); }

  // Refuses parameters that cannot apply to this model (k past the last layer, a pool factor that
  // does not divide the patch grid, more tokens kept than the image has). Error names the key.
  void validate(const ModelConfig& c) const;

  // ---- The reducer's effect on the sequence (the model's forward asks these) ----
  // Visual rows one image contributes before the first decoder layer.
  int visual_rows(const ModelConfig& c) const;
  // Rows inserted after each image's visual rows (Victor's registers).
  int inserted_rows() const;
  // The first decoder layer that no longer holds visual rows (L when they are never dropped).
  int drop_layer(const ModelConfig& c) const;
  // The layer whose input keeps only the top-attended visual rows (FastV), if any.
  std::optional<int> prune_layer() const;
  // Visual rows per image that survive the prune (FastV), of `n` rows before it.
  int kept_after_prune(int n) const;
  // Rows per image (visual + inserted) that the layers after the reduction still hold: FastV's kept
  // rows, Victor's registers alone, or every row when nothing leaves. Stats and the server's figures.
  int rows_past_reduction(const ModelConfig& c) const;
  RegisterMask mask() const;  // attention permissions (Victor's registers_only; causal otherwise)

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
  void to_json(nlohmann::json& j) const;
  static Reducer from_json(const nlohmann::json& j, const std::string& source);

 private:
  // One kind with its parameters in `field` (the factories), and that field read back only when
  // the reducer is of that kind (the *_params accessors).
  template <class P>
  static Reducer make(ReducerKind kind, P Reducer::*field, const P& p) {
    Reducer r;
    r.kind_ = kind;
    r.*field = p;
    return r;
  }
  template <class P>
  const P& params_of(ReducerKind kind, P Reducer::*field, const char* name) const;

  ReducerKind kind_ = ReducerKind::None;
  VictorParams victor_;
  PoolParams pool_;
  FastVParams fastv_;
  VisionZipParams visionzip_;
  ResamplerParams resampler_;
};

// What the command line asks for: a `--reducer` spec, or Victor's and pooling's older flags
// (--registers, --summary-layers, --register-mask, --visual-pool/--pool) as a change to the model's
// own reducer. Unset values keep the current settings.
struct ReducerChoice {
  std::string spec;             // --reducer
  int registers = -1;           // --registers (-1 = keep)
  int summary_layers = -2;      // --summary-layers (-2 = keep, -1 = never drop)
  std::string mask;             // --register-mask ("" = keep)
  int pool = 0;                 // --visual-pool (0 = not given)
  bool any() const { return !spec.empty() || registers >= 0 || summary_layers != -2 || !mask.empty() || pool > 0; }
  // The reducer to use on a model whose reducer is `current`; conflicting flags are refused.
  Reducer resolve(const Reducer& current) const;
};

}  // namespace victor
