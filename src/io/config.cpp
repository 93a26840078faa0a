#include "victor/config.h"

#include <cmath>
#include <tuple>
#include <limits>
#include <type_traits>
#include <filesystem>

#include "victor/error.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace victor {

std::string to_string(WeightDType d) {
  switch (d) {
    case WeightDType::F32: return "f32";
    case WeightDType::BF16: return "bf16";
    case WeightDType::Int8: return "int8";
  }
  return "?";
}

WeightDType weight_dtype_from_string(const std::string& s, const std::string& what) {
  if (s == "f32" || s == "float32") return WeightDType::F32;
  if (s == "bf16" || s == "bfloat16") return WeightDType::BF16;
  if (s == "int8") return WeightDType::Int8;
  throw Error(what + ": unknown weight dtype '" + s + "' (expected f32, bf16 or int8)");
}

int ModelConfig::vision_layers_needed() const {
  int n = vision.num_hidden_layers;
  return vision_feature_layer < 0 ? n + 1 + vision_feature_layer : vision_feature_layer;
}

namespace {

void require(bool ok, const std::string& key, const std::string& why) {
  if (!ok) throw Error("config: '" + key + "' " + why);
}

bool known_act(const std::string& a) {
  return a == "gelu" || a == "quick_gelu" || a == "silu" || a == "gelu_pytorch_tanh" ||
         a == "relu";
}

template <typename T>
void get_opt(const json& j, const char* key, T& out, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return;
  const json& v = j[key];
  const std::string name = where + ": key '" + key + "'";
  if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_boolean()) throw Error(name + " has the wrong type (expected true or false)");
    out = v.get<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    // Found by fuzzing: 1e95 converted to int is undefined behaviour, and 64.7 silently became 64.
    if (!v.is_number_integer()) throw Error(name + " has the wrong type (expected an integer)");
    if (v.is_number_unsigned() ? v.get<uint64_t>() > uint64_t(std::numeric_limits<T>::max())
                               : v.get<int64_t>() < int64_t(std::numeric_limits<T>::min()) ||
                                     v.get<int64_t>() > int64_t(std::numeric_limits<T>::max()))
      throw Error(name + " is out of range");
    out = T(v.get<int64_t>());
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!v.is_number()) throw Error(name + " has the wrong type (expected a number)");
    out = v.get<T>();
  } else {
    try {
      out = v.get<T>();
    } catch (const json::exception&) {
      throw Error(name + " has the wrong type");
    }
  }
}

}  // namespace

void ModelConfig::validate() const {
  const auto& v = vision;
  const auto& t = text;
  // Sizes beyond any real model are refused here, before anything is allocated from them (a
  // num_hidden_layers of 10^9 used to end in std::bad_alloc).
  constexpr int kMaxLayers = 1024, kMaxHidden = 1 << 16, kMaxFfn = 1 << 20, kMaxHeads = 1024;
  for (auto [key, value, limit] : {std::tuple<const char*, int64_t, int64_t>{"vision_config.hidden_size", v.hidden_size, kMaxHidden},
                                   {"vision_config.intermediate_size", v.intermediate_size, kMaxFfn},
                                   {"vision_config.num_hidden_layers", v.num_hidden_layers, kMaxLayers},
                                   {"vision_config.num_attention_heads", v.num_attention_heads, kMaxHeads},
                                   {"vision_config.image_size", v.image_size, 8192},
                                   {"text_config.hidden_size", t.hidden_size, kMaxHidden},
                                   {"text_config.intermediate_size", t.intermediate_size, kMaxFfn},
                                   {"text_config.num_hidden_layers", t.num_hidden_layers, kMaxLayers},
                                   {"text_config.num_attention_heads", t.num_attention_heads, kMaxHeads},
                                   {"text_config.vocab_size", t.vocab_size, int64_t(1) << 24},
                                   {"text_config.max_position_embeddings", t.max_position_embeddings, int64_t(1) << 22}})
    require(value <= limit, key, "is " + std::to_string(value) + ", more than victor accepts (" + std::to_string(limit) + ")");
  require(v.hidden_size > 0, "vision_config.hidden_size", "must be positive");
  require(v.num_attention_heads > 0 && v.hidden_size % v.num_attention_heads == 0,
          "vision_config.num_attention_heads", "must divide vision_config.hidden_size");
  require(v.num_hidden_layers > 0, "vision_config.num_hidden_layers", "must be positive");
  require(v.intermediate_size > 0, "vision_config.intermediate_size", "must be positive");
  require(v.patch_size > 0 && v.image_size > 0 && v.image_size % v.patch_size == 0,
          "vision_config.patch_size", "must divide vision_config.image_size");
  require(v.num_channels == 3, "vision_config.num_channels", "must be 3 (RGB)");
  require(known_act(v.hidden_act), "vision_config.hidden_act", "unknown activation '" + v.hidden_act + "'");
  require(t.hidden_size > 0, "text_config.hidden_size", "must be positive");
  require(t.num_attention_heads > 0 && t.hidden_size % t.num_attention_heads == 0,
          "text_config.num_attention_heads", "must divide text_config.hidden_size");
  require(t.num_key_value_heads > 0 && t.num_attention_heads % t.num_key_value_heads == 0,
          "text_config.num_key_value_heads", "must divide text_config.num_attention_heads");
  require(t.head_dim() % 2 == 0, "text_config.hidden_size", "head dimension must be even (RoPE)");
  require(t.num_hidden_layers > 0, "text_config.num_hidden_layers", "must be positive");
  require(t.intermediate_size > 0, "text_config.intermediate_size", "must be positive");
  require(t.vocab_size > 0, "text_config.vocab_size", "must be positive");
  require(t.hidden_act == "silu", "text_config.hidden_act", "must be silu (LLaMA SwiGLU)");
  require(t.rope_theta > 0, "text_config.rope_theta", "must be positive");
  // A negative or NaN epsilon gives NaN or wrong norms, never an error: refused by name.
  require(t.rms_norm_eps > 0 && std::isfinite(t.rms_norm_eps), "text_config.rms_norm_eps",
          "must be a positive number");
  require(v.layer_norm_eps > 0 && std::isfinite(v.layer_norm_eps), "vision_config.layer_norm_eps",
          "must be a positive number");
  require(image_token_index >= 0 && image_token_index < t.vocab_size, "image_token_index",
          "must lie inside text_config.vocab_size");
  require(known_act(projector_hidden_act), "projector_hidden_act",
          "unknown activation '" + projector_hidden_act + "'");
  int needed = vision_layers_needed();
  require(needed >= 0 && needed <= v.num_hidden_layers, "vision_feature_layer",
          "is out of range for " + std::to_string(v.num_hidden_layers) + " vision layers");
  require(vision_feature_select_strategy == "default" || vision_feature_select_strategy == "full",
          "vision_feature_select_strategy", "must be 'default' or 'full'");
  reducer.validate(*this);
  require(preprocess.crop_size > 0 && preprocess.shortest_edge >= preprocess.crop_size,
          "preprocessor_config.crop_size", "must be positive and <= size.shortest_edge");
  require(preprocess.crop_size == v.image_size, "preprocessor_config.crop_size",
          "must equal vision_config.image_size (" + std::to_string(v.image_size) + ")");
  require(preprocess.image_mean.size() == 3 && preprocess.image_std.size() == 3,
          "preprocessor_config.image_mean/image_std", "must have 3 entries");
  for (double s : preprocess.image_std) require(s > 0, "preprocessor_config.image_std", "must be > 0");
}

namespace {
ModelConfig config_from_json_checked(const json& j, const std::string& src);
}

ModelConfig config_from_json(const json& j, const std::string& src) {
  // Every key is read by get_opt, which names it; a JSON-library error that still escapes (found
  // by fuzzing: a number where a string belongs) is at least tied to the file.
  try {
    return config_from_json_checked(j, src);
  } catch (const json::exception& e) {
    throw Error(src + ": unexpected value (" + std::string(e.what()) + ")");
  }
}

namespace {
ModelConfig config_from_json_checked(const json& j, const std::string& src) {
  if (!j.is_object()) throw Error(src + ": config must be a JSON object");
  ModelConfig c;
  // Hugging Face class defaults for keys a config.json leaves out.
  c.vision = VisionConfig{768, 3072, 12, 12, 224, 32, 3, 1e-5, "quick_gelu"};
  c.text = TextConfig{};
  c.text.vocab_size = 32000;
  c.text.max_position_embeddings = 2048;
  c.text.rms_norm_eps = 1e-6;
  if (j.contains("vision_config")) {
    const json& v = j["vision_config"];
    std::string w = src + ": vision_config";
    if (!v.is_object()) throw Error(w + " must be an object");
    get_opt(v, "hidden_size", c.vision.hidden_size, w);
    get_opt(v, "intermediate_size", c.vision.intermediate_size, w);
    get_opt(v, "num_hidden_layers", c.vision.num_hidden_layers, w);
    get_opt(v, "num_attention_heads", c.vision.num_attention_heads, w);
    get_opt(v, "image_size", c.vision.image_size, w);
    get_opt(v, "patch_size", c.vision.patch_size, w);
    get_opt(v, "num_channels", c.vision.num_channels, w);
    get_opt(v, "layer_norm_eps", c.vision.layer_norm_eps, w);
    get_opt(v, "hidden_act", c.vision.hidden_act, w);
  }
  if (j.contains("text_config")) {
    const json& t = j["text_config"];
    std::string w = src + ": text_config";
    if (!t.is_object()) throw Error(w + " must be an object");
    if (t.contains("model_type") && t["model_type"] != "llama")
      throw Error(w + ".model_type: only 'llama' language towers are supported, got " +
                  t["model_type"].dump());
    get_opt(t, "vocab_size", c.text.vocab_size, w);
    get_opt(t, "hidden_size", c.text.hidden_size, w);
    get_opt(t, "intermediate_size", c.text.intermediate_size, w);
    get_opt(t, "num_hidden_layers", c.text.num_hidden_layers, w);
    get_opt(t, "num_attention_heads", c.text.num_attention_heads, w);
    c.text.num_key_value_heads = c.text.num_attention_heads;
    get_opt(t, "num_key_value_heads", c.text.num_key_value_heads, w);
    get_opt(t, "max_position_embeddings", c.text.max_position_embeddings, w);
    get_opt(t, "rms_norm_eps", c.text.rms_norm_eps, w);
    get_opt(t, "rope_theta", c.text.rope_theta, w);
    get_opt(t, "tie_word_embeddings", c.text.tie_word_embeddings, w);
    get_opt(t, "hidden_act", c.text.hidden_act, w);
    get_opt(t, "bos_token_id", c.text.bos_token_id, w);
    get_opt(t, "eos_token_id", c.text.eos_token_id, w);
    if (t.contains("rope_scaling") && !t["rope_scaling"].is_null())
      throw Error(w + ".rope_scaling: RoPE scaling is not supported");
    // Biases on the attention or MLP projections (Qwen-style): victor's LLaMA has none, and
    // ignoring them would give wrong logits, so such a checkpoint is refused.
    for (const char* key : {"attention_bias", "mlp_bias"}) {
      bool on = false;
      get_opt(t, key, on, w);
      if (on) throw Error(w + "." + key + ": biases on the LLaMA projections are not supported");
    }
    int head_dim = c.text.head_dim();
    get_opt(t, "head_dim", head_dim, w);
    if (head_dim != c.text.head_dim())
      throw Error(w + ".head_dim: must equal hidden_size / num_attention_heads");
  }
  get_opt(j, "tie_word_embeddings", c.text.tie_word_embeddings, src);
  get_opt(j, "image_token_index", c.image_token_index, src);
  get_opt(j, "image_token_id", c.image_token_index, src);
  get_opt(j, "pad_token_id", c.pad_token_id, src);
  get_opt(j, "projector_hidden_act", c.projector_hidden_act, src);
  if (j.contains("vision_feature_layer") && j["vision_feature_layer"].is_array())
    throw Error(src + ": vision_feature_layer as a list (multi-layer features) is not supported");
  get_opt(j, "vision_feature_layer", c.vision_feature_layer, src);
  get_opt(j, "vision_feature_select_strategy", c.vision_feature_select_strategy, src);
  if (j.contains("image_aspect_ratio") && !j["image_aspect_ratio"].is_null()) {
    std::string a;
    get_opt(j, "image_aspect_ratio", a, src);
    if (a != "pad" && a != "square")
      throw Error(src + ": image_aspect_ratio '" + a + "' is not supported (pad or square)");
    c.preprocess.pad_to_square = a == "pad";
  }
  c.preprocess.crop_size = c.vision.image_size;
  c.preprocess.shortest_edge = c.vision.image_size;
  // Checkpoints in float16 load as float32 unless --dtype says otherwise; bfloat16 stays bfloat16.
  std::string torch_dtype;
  get_opt(j, "torch_dtype", torch_dtype, src);
  if (torch_dtype == "bfloat16") c.weight_dtype = WeightDType::BF16;
  if (j.contains("quantization_config") && !j["quantization_config"].is_null()) {
    const json& q = j["quantization_config"];
    std::string method;
    if (q.is_object()) get_opt(q, "quant_method", method, src + ": quantization_config");
    if (method != "victor_int8")
      throw Error(src + ": quantization_config.quant_method '" + method +
                  "' is not supported (victor reads its own 'victor_int8'; quantize a float "
                  "checkpoint with `victor quantize`)");
    c.weight_dtype = WeightDType::Int8;
  }
  c.reducer = Reducer::from_json(j, src);
  return c;
}
}  // namespace

json config_to_json(const ModelConfig& c) {
  json j;
  j["architectures"] = {"LlavaForConditionalGeneration"};
  j["model_type"] = "llava";
  j["image_token_index"] = c.image_token_index;
  j["pad_token_id"] = c.pad_token_id;
  j["projector_hidden_act"] = c.projector_hidden_act;
  j["vision_feature_layer"] = c.vision_feature_layer;
  j["vision_feature_select_strategy"] = c.vision_feature_select_strategy;
  j["image_aspect_ratio"] = c.preprocess.pad_to_square ? "pad" : "square";
  j["tie_word_embeddings"] = c.text.tie_word_embeddings;
  j["torch_dtype"] = c.weight_dtype == WeightDType::BF16 ? "bfloat16" : "float32";
  if (c.weight_dtype == WeightDType::Int8)
    j["quantization_config"] = {{"quant_method", "victor_int8"},
                                {"bits", 8},
                                {"granularity", "per_output_row"},
                                {"symmetric", true},
                                {"scale_suffix", "_scale"}};
  const auto& v = c.vision;
  j["vision_config"] = {{"model_type", "clip_vision_model"},
                        {"hidden_size", v.hidden_size},
                        {"intermediate_size", v.intermediate_size},
                        {"num_hidden_layers", v.num_hidden_layers},
                        {"num_attention_heads", v.num_attention_heads},
                        {"image_size", v.image_size},
                        {"patch_size", v.patch_size},
                        {"num_channels", v.num_channels},
                        {"layer_norm_eps", v.layer_norm_eps},
                        {"hidden_act", v.hidden_act}};
  const auto& t = c.text;
  j["text_config"] = {{"model_type", "llama"},
                      {"vocab_size", t.vocab_size},
                      {"hidden_size", t.hidden_size},
                      {"intermediate_size", t.intermediate_size},
                      {"num_hidden_layers", t.num_hidden_layers},
                      {"num_attention_heads", t.num_attention_heads},
                      {"num_key_value_heads", t.num_key_value_heads},
                      {"max_position_embeddings", t.max_position_embeddings},
                      {"rms_norm_eps", t.rms_norm_eps},
                      {"rope_theta", t.rope_theta},
                      {"tie_word_embeddings", t.tie_word_embeddings},
                      {"hidden_act", t.hidden_act},
                      {"bos_token_id", t.bos_token_id},
                      {"eos_token_id", t.eos_token_id}};
  c.reducer.to_json(j);
  return j;
}

json preprocess_to_json(const ModelConfig& c) {
  const auto& p = c.preprocess;
  return {{"image_processor_type", "CLIPImageProcessor"},
          {"do_resize", true},
          {"size", {{"shortest_edge", p.shortest_edge}}},
          {"resample", 3},
          {"do_center_crop", true},
          {"crop_size", {{"height", p.crop_size}, {"width", p.crop_size}}},
          {"do_rescale", true},
          {"rescale_factor", 1.0 / 255.0},
          {"do_normalize", true},
          {"image_mean", p.image_mean},
          {"image_std", p.image_std},
          {"do_convert_rgb", true}};
}

void apply_preprocess_json(ModelConfig& c, const json& j, const std::string& src) {
  if (!j.is_object()) throw Error(src + ": must be a JSON object");
  get_opt(j, "image_mean", c.preprocess.image_mean, src);
  get_opt(j, "image_std", c.preprocess.image_std, src);
  if (j.contains("size")) {
    if (j["size"].is_object()) get_opt(j["size"], "shortest_edge", c.preprocess.shortest_edge, src);
    else get_opt(j, "size", c.preprocess.shortest_edge, src);
  }
  if (j.contains("crop_size")) {
    if (j["crop_size"].is_object()) get_opt(j["crop_size"], "height", c.preprocess.crop_size, src);
    else get_opt(j, "crop_size", c.preprocess.crop_size, src);
  }
}

ModelConfig load_config(const std::string& dir) {
  if (!fs::is_directory(dir)) throw Error(dir + ": model folder not found");
  fs::path p = fs::path(dir) / "config.json";
  if (!fs::exists(p)) throw Error(p.string() + ": missing (not a model folder?)");
  json j;
  try {
    j = json::parse(read_file(p.string()));
  } catch (const json::exception& e) {
    throw Error(p.string() + ": malformed JSON: " + e.what());
  }
  ModelConfig c = config_from_json(j, p.string());
  fs::path pp = fs::path(dir) / "preprocessor_config.json";
  if (fs::exists(pp)) {
    json pj;
    try {
      pj = json::parse(read_file(pp.string()));
    } catch (const json::exception& e) {
      throw Error(pp.string() + ": malformed JSON: " + e.what());
    }
    apply_preprocess_json(c, pj, pp.string());
  }
  try {
    c.validate();
  } catch (const Error& e) {
    throw Error(p.string() + ": " + e.what());
  }
  return c;
}

void save_config(const ModelConfig& c, const std::string& dir) {
  write_file_atomic((fs::path(dir) / "config.json").string(), config_to_json(c).dump(2) + "\n");
  write_file_atomic((fs::path(dir) / "preprocessor_config.json").string(),
                    preprocess_to_json(c).dump(2) + "\n");
}

ModelConfig preset_config(const std::string& name) {
  const VisionConfig clip_l_336{1024, 4096, 24, 16, 336, 14, 3, 1e-5, "quick_gelu"};
  ModelConfig c;
  c.text.rms_norm_eps = 1e-5;
  if (name == "tiny") {
    c.vision = VisionConfig{32, 64, 2, 2, 28, 7, 3, 1e-5, "quick_gelu"};
    c.text.hidden_size = 64;
    c.text.intermediate_size = 128;
    c.text.num_hidden_layers = 4;
    c.text.num_attention_heads = 4;
    c.text.num_key_value_heads = 2;
    c.text.max_position_embeddings = 1024;
  } else if (name == "small") {
    // GridVQA: a 112 px grid of 28 px items, 7 px patches -> 256 visual tokens (16 per item).
    c.vision = VisionConfig{192, 768, 5, 4, 112, 7, 3, 1e-5, "quick_gelu"};
    c.text.hidden_size = 256;
    c.text.intermediate_size = 704;
    c.text.num_hidden_layers = 6;
    c.text.num_attention_heads = 8;
    c.text.num_key_value_heads = 4;
    c.text.max_position_embeddings = 2048;
  } else if (name == "clip-l-1b") {
    // CLIP ViT-L/14-336 (576 visual tokens) and a TinyLlama-1.1B-shaped language tower.
    c.vision = clip_l_336;
    c.text.vocab_size = 32064;
    c.text.hidden_size = 2048;
    c.text.intermediate_size = 5632;
    c.text.num_hidden_layers = 22;
    c.text.num_attention_heads = 32;
    c.text.num_key_value_heads = 4;
    c.text.max_position_embeddings = 4096;
  } else if (name == "llava-7b") {
    // LLaVA-1.5-7B: CLIP ViT-L/14-336 and Vicuna-7B (LLaMA-2 7B shape, full multi-head attention).
    c.vision = clip_l_336;
    c.text.vocab_size = 32064;
    c.text.hidden_size = 4096;
    c.text.intermediate_size = 11008;
    c.text.num_hidden_layers = 32;
    c.text.num_attention_heads = 32;
    c.text.num_key_value_heads = 32;
    c.text.max_position_embeddings = 4096;
  } else {
    throw Error("unknown preset '" + name + "' (tiny, small, clip-l-1b, llava-7b)");
  }
  c.preprocess.crop_size = c.vision.image_size;
  c.preprocess.shortest_edge = c.vision.image_size;
  return c;
}

}  // namespace victor
