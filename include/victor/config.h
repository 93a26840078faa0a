// Model settings as plain data: read from and written to a checkpoint's config.json (the
// Hugging Face LLaVA layout plus Victor's keys), validated once on load.
#pragma once
#include <nlohmann/json.hpp>
#include <array>
#include <optional>
#include <string>
#include <vector>

#include "victor/reducer.h"

namespace victor {

struct VisionConfig {
  int hidden_size = 1024;
  int intermediate_size = 4096;
  int num_hidden_layers = 24;
  int num_attention_heads = 16;
  int image_size = 336;
  int patch_size = 14;
  int num_channels = 3;
  double layer_norm_eps = 1e-5;
  std::string hidden_act = "quick_gelu";
  int num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
};

struct TextConfig {
  int vocab_size = 32064;
  int hidden_size = 4096;
  int intermediate_size = 11008;
  int num_hidden_layers = 32;
  int num_attention_heads = 32;
  int num_key_value_heads = 32;
  int max_position_embeddings = 4096;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  std::string hidden_act = "silu";
  // "llama" (Vicuna) or "mistral" (LLaMA's math with GQA; a sliding window shorter than the
  // context is refused, never ignored).
  std::string model_type = "llama";
  int bos_token_id = 1;
  int eos_token_id = 2;
  int head_dim() const { return num_attention_heads > 0 ? hidden_size / num_attention_heads : 0; }  // 0: invalid (validate() refuses)
};

// How the weight matrices (every linear layer, the embedding and the LM head) are held in memory
// and on disk. Norms, biases, position embeddings, the patch convolution and the registers stay
// float32. Int8 is per-output-row symmetric with a float32 scale per row (`<name>_scale`); Int4
// is group-wise symmetric, 32 values along K a group, with a float16 scale per group
// (`<name>_scale`, [rows, groups]; victor/kernels.h's Int4Matrix).
enum class WeightDType { F32, BF16, Int8, Int4 };

// A weight storage per part of the model, as `--dtype` asks for it: `llm` the language model
// (and the token reducer's own matrices), `vision` the vision tower, `projector` the multimodal
// projector. An unset part keeps what it is (the checkpoint's storage on load; f32 for new random
// weights). llama.cpp keeps the projector in F16 beside a 4-bit language model; victor lets each
// part choose (notebook@f64a969 measures the drift of each combination).
struct WeightFormat {
  std::optional<WeightDType> llm, vision, projector;
  static WeightFormat all(WeightDType d) { return {d, d, d}; }
  static WeightFormat keep() { return {}; }
};
// "f32" | "bf16" | "int8" | "int4" (every part), "auto" (keep every part), or a comma list of
// PART=DTYPE with PART llm | vision | projector (each at most once), e.g. "llm=int4,vision=bf16".
// Errors name `what` (an option or key) and the offending item.
WeightFormat weight_format_from_string(const std::string& s, const std::string& what = "--dtype");

// LLaVA-1.5 image preprocessing, as the checkpoint's own processor does it
// (preprocessor_config.json; docs/formats.md lists each key): pad to a square with the mean colour
// (LlavaImageProcessor's do_pad, or the original LLaVA's image_aspect_ratio "pad"), resize the
// shortest edge (PIL bicubic), center-crop, rescale, normalize.
struct PreprocessConfig {
  int shortest_edge = 336;
  int crop_size = 336;
  std::vector<double> image_mean{0.48145466, 0.4578275, 0.40821073};
  std::vector<double> image_std{0.26862954, 0.26130258, 0.27577711};
  double rescale_factor = 1.0 / 255.0;
  bool do_normalize = true;
  // Without config.json's image_aspect_ratio (the original LLaVA layout, which outranks it), the
  // processor decides: CLIPImageProcessor never pads, LlavaImageProcessor pads when do_pad.
  bool pad_to_square = true;
  bool pad_from_config = false;  // config.json's image_aspect_ratio set pad_to_square
  // A cap on LLaVA-NeXT's image-token bill (run-time settings, never saved): at most this many
  // crops, at most this many rows per image in the language model; 0 = no cap. The cap chooses
  // among the checkpoint's pinpoints (or the base view alone), never a resolution it was not
  // trained with.
  int max_crops = 0;
  int max_image_tokens = 0;
};

// LLaVA-NeXT's AnyRes (LlavaNextForConditionalGeneration): the candidate resolutions of
// image_grid_pinpoints, each (height, width) in pixels, multiples of the tower's image size.
using Pinpoint = std::array<int, 2>;

// How one image became views for the vision tower: its original size and, on LLaVA-NeXT, the grid
// of crops of the chosen resolution (0 x 0: the base view alone; LLaVA-1.5 always).
struct ImageLayout {
  int height = 0, width = 0;
  int grid_rows = 0, grid_cols = 0;
  int views() const { return 1 + grid_rows * grid_cols; }
};

struct ModelConfig {
  VisionConfig vision;
  TextConfig text;
  PreprocessConfig preprocess;
  // The token reducer (Victor, pooling, FastV, VisionZip, or none): see reducer.h.
  Reducer reducer;
  int image_token_index = 32000;
  int pad_token_id = 32001;
  std::string projector_hidden_act = "gelu";
  int vision_feature_layer = -2;
  std::string vision_feature_select_strategy = "default";
  // Non-empty: LLaVA-NeXT (image_grid_pinpoints, image_newline, AnyRes preprocessing); empty:
  // LLaVA-1.5 (one view per image).
  std::vector<Pinpoint> image_grid_pinpoints;
  bool is_next() const { return !image_grid_pinpoints.empty(); }
  // Storage of the language model's weight matrices (and the token reducer's): config.json's
  // torch_dtype ("float32" / "bfloat16") and, for int8 / int4, a quantization_config with
  // quant_method "victor_int8" / "victor_int4". The vision tower's and the projector's, where they
  // differ, come from config.json's "victor_weight_format" (docs/formats.md).
  WeightDType weight_dtype = WeightDType::F32;
  WeightDType vision_weight_dtype = WeightDType::F32;
  WeightDType projector_weight_dtype = WeightDType::F32;
  bool uniform_weights() const {
    return vision_weight_dtype == weight_dtype && projector_weight_dtype == weight_dtype;
  }
  bool all_f32() const { return uniform_weights() && weight_dtype == WeightDType::F32; }
  // "int4" when every part shares one storage, else "llm=int4,vision=bf16,projector=bf16".
  std::string weight_format() const;
  // Applies the parts `f` sets.
  void set_weight_format(const WeightFormat& f);

  int num_layers() const { return text.num_hidden_layers; }
  // Visual rows one image contributes to the language model (after the reducer's pre-LLM step);
  // on LLaVA-NeXT, those of one view (an image's own count depends on its size: next_image_rows).
  int visual_tokens_per_image() const { return reducer.visual_rows(*this); }
  // Vision layers that must run to produce the selected features.
  int vision_layers_needed() const;

  void validate() const;  // throws Error naming the key
};

ModelConfig config_from_json(const nlohmann::json& j, const std::string& source);
nlohmann::json config_to_json(const ModelConfig& c);
nlohmann::json preprocess_to_json(const ModelConfig& c);
void apply_preprocess_json(ModelConfig& c, const nlohmann::json& j, const std::string& source);
// Loads config.json (and preprocessor_config.json when present) from a model folder.
ModelConfig load_config(const std::string& dir);
void save_config(const ModelConfig& c, const std::string& dir);

std::string to_string(WeightDType d);  // f32, bf16, int8, int4
// Accepts f32|bf16|int8|int4 (and float32|bfloat16); the error names `what` (an option or key).
WeightDType weight_dtype_from_string(const std::string& s, const std::string& what = "--dtype");

// Ready-made shapes: "tiny" (tests), "small" (GridVQA), "clip-l-1b" (CLIP ViT-L/14-336 + a
// TinyLlama-1.1B-shaped LLaMA), "llava-7b" (the paper's own: CLIP ViT-L/14-336 + Vicuna-7B shape),
// "llava-next-tiny" (tests), "llava-next-7b" (llava-v1.6-vicuna-7b: llava-7b with AnyRes and
// llava-v1.6's pinpoints) and "clip-l-1b-next" (clip-l-1b with the same AnyRes).
ModelConfig preset_config(const std::string& name);
const std::vector<std::string>& preset_names();  // every name preset_config knows, in size order
// The presets of real models' shapes keep their 32064-row vocabulary beyond a smaller tokenizer.
bool preset_keeps_vocabulary(const std::string& name);
// Fits a config's vocabulary to a new SentencePiece tokenizer of `pieces` pieces: <image> = pieces,
// <pad> = pieces + 1, rows padded to a multiple of 64 (as llava-hf pads 32000 to 32064). With
// `keep_larger` a larger vocabulary stays (the real-model presets: the embedding and LM head cost
// what they cost there).
void fit_vocabulary(ModelConfig& c, int pieces, bool keep_larger);

}  // namespace victor
