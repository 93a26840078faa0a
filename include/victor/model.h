// The VLM: CLIP-style vision tower, LLaVA projector, LLaMA decoder and Victor's registers.
// Weights, activations and the KV cache are separate objects; one tensor list drives loading,
// saving, counting and freezing.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "victor/config.h"
#include "victor/kv_cache.h"
#include "victor/ops.h"

namespace victor {

// Which part of the model a tensor belongs to (what --train selects). Registers: the token
// reducer's own parameters (Victor's registers, the resampler's block).
enum class Part { Vision, Projector, Registers, Llm };
const char* part_name(Part p);

struct ParamRef {
  std::string name;  // canonical (classic Hub) name
  std::vector<int64_t> shape;
  Part part;
  torch::Tensor* tensor;
  bool optional = false;  // may be absent from a checkpoint (post_layernorm, tied lm_head)
  // Weight matrices (stored in the model's WeightDType) point at their int8 scale slot; every
  // other tensor (norms, biases, registers, ...) is float32 and has none.
  torch::Tensor* scale = nullptr;
  bool is_matrix() const { return scale != nullptr; }
};


struct NormW {
  torch::Tensor weight, bias;
};

struct VisionLayerW {
  LinearW q, k, v, out, fc1, fc2;
  NormW ln1, ln2;
};
struct VisionW {
  torch::Tensor class_embedding, patch_embedding, position_embedding;
  NormW pre_ln, post_ln;
  std::vector<VisionLayerW> layers;
};
struct LlamaLayerW {
  LinearW q, k, v, o, gate, up, down;
  torch::Tensor input_norm, post_norm;
};
struct LlamaW {
  LinearW embed_tokens, lm_head;  // lm_head shares embed_tokens' storage when tied
  torch::Tensor norm;
  std::vector<LlamaLayerW> layers;
};
// The token reducer's own parameters (ReducerOps::params declares them): tensors by checkpoint
// name, matrices (stored in the language model's weight format, with their biases) by the name of
// their weight.
struct ReducerWeights {
  std::map<std::string, torch::Tensor> tensors;
  std::map<std::string, LinearW> matrices;
  // Undefined when the reducer has no such tensor.
  const torch::Tensor& tensor(const std::string& name) const;
  // Throws when the reducer has no such matrix.
  const LinearW& matrix(const std::string& name) const;
};
struct VlmWeights {
  VisionW vision;
  LinearW proj1, proj2;
  torch::Tensor image_newline;  // [d_text]: LLaVA-NeXT's row separator (undefined on LLaVA-1.5)
  LlamaW llm;
  ReducerWeights reducer;
};

// What the last block of the vision tower reports when the reducer ranks patches (VisionZip).
struct VisionLastBlock {
  torch::Tensor cls_attention;  // [n,1+N]: the class token's attention, averaged over heads
  torch::Tensor keys;           // [n,1+N,hd]: the block's keys, averaged over heads
};

// A batch ready for the decoder: embeddings plus metadata (and training targets).
struct SequenceBatch {
  torch::Tensor embeds;  // [B,T,d]
  TokenMeta meta;
  torch::Tensor targets;  // [B,T] int64 next-token targets, -100 where not trained (optional)
  // [B] int64: each row's last prompt token (FastV ranks the visual rows by its attention);
  // undefined = the last row of the batch (decode).
  torch::Tensor query;
};

// What forward() reports besides the hidden states.
struct ForwardTrace {
  std::vector<int64_t> tokens_per_layer;  // rows (incl. padding) each decoder layer processed
  // Called per layer with attention probabilities [B,H,T,S] and the query/key metadata (tests).
  std::function<void(int, const torch::Tensor&, const TokenMeta&, const TokenMeta&)> probe;
};

struct ForwardOutput {
  torch::Tensor hidden;  // [B,T',d] after the final norm
  TokenMeta meta;
  torch::Tensor targets;  // gathered alongside (undefined if the batch had none)
};

// A request's input before embedding: token ids where each image_token_index stands for one
// image, and the images' pixels.
struct PromptInput {
  std::vector<int64_t> ids;
  std::vector<int64_t> targets;  // optional, same length as ids: target for the NEXT token, -100
  // The views of every image, in order: [views,3,S,S] or undefined. Without layouts each view is
  // one image (LLaVA-1.5); with them (LLaVA-NeXT, one per image) image i owns layouts[i].views().
  torch::Tensor pixels;
  std::vector<ImageLayout> layouts;
  int64_t images() const {
    return !layouts.empty() ? int64_t(layouts.size()) : (pixels.defined() ? pixels.size(0) : 0);
  }
  // Trailing ids that were generated, not prompted (a full recompute of a decode): FastV ranks by
  // the last prompt token, before them.
  int64_t generated = 0;
};

// What the vision tower reports besides the features (tests, VisionZip's choice).
struct VisionTrace {
  torch::Tensor dominant;  // [n,dominant] int64: patch indices VisionZip kept (ascending)
};

class Vlm {
 public:
  explicit Vlm(const ModelConfig& config);  // allocates uninitialised weights
  // Copies share the weight storage (tensor handles); the tensor list is rebuilt to point at
  // the new object's members.
  Vlm(const Vlm& other);
  Vlm(Vlm&& other) noexcept;
  Vlm& operator=(const Vlm&) = delete;
  // Random weights (std 0.02), converted tensor by tensor to `dtype` (so a 7B model never
  // needs its float32 size in memory).
  static Vlm random(const ModelConfig& config, uint64_t seed, const WeightFormat& format);
  static Vlm random(const ModelConfig& config, uint64_t seed, std::optional<WeightDType> dtype = std::nullopt) {
    return random(config, seed, dtype ? WeightFormat::all(*dtype) : WeightFormat::keep());
  }
  // config.json + safetensors. `dtype` converts the weight matrices on load, tensor by tensor;
  // without it they stay as the checkpoint stores them (float16 checkpoints load as float32).
  // A folder an interrupted write left incomplete (files.h) is refused unless
  // `allow_incomplete`: a training run resuming from its own checkpoint, whose trainer state
  // holds every parameter.
  // `format` may convert some parts only (WeightFormat: e.g. an int4 language model beside a bf16
  // vision tower and projector).
  static Vlm load(const std::string& dir, const WeightFormat& format, bool allow_incomplete = false);
  static Vlm load(const std::string& dir, std::optional<WeightDType> dtype = std::nullopt,
                  bool allow_incomplete = false) {
    return load(dir, dtype ? WeightFormat::all(*dtype) : WeightFormat::keep(), allow_incomplete);
  }

  const ModelConfig& config() const { return config_; }
  ModelConfig& mutable_config() { return config_; }
  VlmWeights& weights() { return w_; }
  const std::vector<ParamRef>& params() const { return params_; }
  int64_t parameter_count(int part_mask = -1) const;

  // Writes config.json, preprocessor_config.json and model.safetensors (atomic), each tensor in
  // its storage dtype (F32, BF16, I8 plus its F32 `_scale`, or U8 int4 plus its F16 `_scale`).
  void save(const std::string& dir, size_t max_shard_bytes = 0) const;
  // Converts every weight matrix to `dtype` (quantizing or dequantizing as needed), or those of
  // the parts `format` sets.
  void set_weight_dtype(WeightDType dtype) { set_weight_format(WeightFormat::all(dtype)); }
  void set_weight_format(const WeightFormat& format);
  // Bytes of all parameters as stored (what the weights cost in memory).
  int64_t weight_bytes() const;
  // Sets the token reducer (validated against the model). Trained registers are kept when the
  // new reducer has as many; a different count is refused unless `replace_registers`; a reducer
  // without registers drops them; registers the model lacks start random (std 0.02, `seed`).
  void set_reducer(const Reducer& r, uint64_t seed = 0, bool replace_registers = false);
  // LLaVA-NeXT's cap on an image's bill (--max-crops, --max-image-tokens; 0 = no cap), validated;
  // refused on a LLaVA-1.5 model (one view per image: nothing to cap).
  void set_image_cap(int max_crops, int max_image_tokens);
  // Registers from the mean of the projected visual tokens of `pixels` [n,3,S,S] plus noise.
  void init_registers_mean(const torch::Tensor& pixels, uint64_t seed);
  void set_trainable(const std::vector<Part>& parts);

  // Vision tower + projector: [n,3,S,S] -> [n,N,d_text] (one row per view).
  torch::Tensor encode_images(const torch::Tensor& pixels) const;
  // Each image of the rows, in order, as the rows it gives the language model [N_i,d_text]: its
  // views through the tower in one batch, then (LLaVA-NeXT) packed as pack_image does.
  std::vector<torch::Tensor> encode_prompt_images(const std::vector<PromptInput>& rows) const;
  // LLaVA-NeXT's pack_image_features for one image: views [v,n,d] (base first, then the crops row
  // by row) -> base features, then the crops' grid unpadded to the image's aspect ratio with
  // image_newline after each row. LLaVA-1.5 (no layout grid, no newline): the view itself.
  // Under VisionZip, `dominant` [v,dominant] holds each view's kept patch indices, and the packing
  // is VisionZip's own for NeXT: the base view's tokens, the crops' dominant tokens in raster order
  // of the whole crop grid (no unpadding, no newlines), then the crops' contextual tokens.
  torch::Tensor pack_image(const torch::Tensor& views, const ImageLayout& layout,
                           const torch::Tensor& dominant = torch::Tensor()) const;
  // One image's views [v,3,S,S] through the tower and projector, packed: [N,d_text].
  torch::Tensor encode_image(const torch::Tensor& views, const ImageLayout& layout) const;
  // [n,N,d_vision]: the selected layer's patch features (VisionZip's dominant + contextual
  // tokens when that is the reducer).
  torch::Tensor vision_features(const torch::Tensor& pixels, VisionTrace* trace = nullptr) const;
  torch::Tensor project(const torch::Tensor& features) const;        // projector only

  // Expands each image placeholder into its visual rows + m registers and pads the batch
  // (left for generation, right for training). image_embeds: one [N_i,d] per image, in order.
  SequenceBatch assemble(const std::vector<PromptInput>& rows, const std::vector<torch::Tensor>& image_embeds,
                         bool pad_left) const;
  // The same with [n_total,N,d] (every image the same length, as on LLaVA-1.5).
  SequenceBatch assemble(const std::vector<PromptInput>& rows, const torch::Tensor& image_embeds,
                         bool pad_left) const;
  SequenceBatch assemble(const std::vector<PromptInput>& rows, bool pad_left) const;

  // The decoder with Victor's drop. With a cache, fills it (prefill) or extends it (decode).
  ForwardOutput forward(const SequenceBatch& batch, KvCache* cache = nullptr,
                        ForwardTrace* trace = nullptr) const;
  torch::Tensor logits(const torch::Tensor& hidden) const;  // [...,d] -> [...,V]
  torch::Tensor embed_tokens(const torch::Tensor& ids) const;

  // An empty cache for `batch` rows whose keys and values are stored as `kv_dtype`.
  KvCache make_cache(int64_t batch, torch::ScalarType kv_dtype = torch::kFloat32) const;
  // Prefill: a fresh cache filled with an assembled (left-padded) batch, room reserved for
  // `new_tokens` more per row, and the logits [B,V] of each row's last prompt row (the first new
  // token's). What generate and the server both start a request with.
  std::pair<KvCache, torch::Tensor> prefill(const SequenceBatch& batch, torch::ScalarType kv_dtype,
                                            int64_t new_tokens) const;
  // One decode step: ids [B] -> logits [B,V].
  torch::Tensor decode_step(const torch::Tensor& ids, KvCache& cache) const;
  // One decode step for B requests that each own a one-row cache (of any lengths, as a server's
  // requests join and leave): ids [B] -> logits [B,V]. Row b equals decode_step on caches[b] alone.
  torch::Tensor decode_step(const torch::Tensor& ids, const std::vector<KvCache*>& caches) const;

 private:
  void declare_params();
  // Converting to a weight format, one way for random(), load() and set_weight_format(): each
  // matrix to its part's dtype in `target` as it comes (so a float32 original is freed at once),
  // then the model adopts the target's dtypes.
  void convert_param(ParamRef& p, const ModelConfig& target);
  void adopt_weight_format(const ModelConfig& target);
  ModelConfig config_;
  VlmWeights w_;
  std::vector<ParamRef> params_;
};

// Canonical name for a tensor name in either Hugging Face scheme (classic or newer).
std::string canonical_tensor_name(const std::string& name);

}  // namespace victor
