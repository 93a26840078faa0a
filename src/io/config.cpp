#include "victor/config.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <limits>
#include <type_traits>
#include <filesystem>

#include "victor/error.h"
#include "victor/files.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace victor {

std::string to_string(WeightDType d) {
  switch (d) {
    case WeightDType::F32: return "f32";
    case WeightDType::BF16: return "bf16";
    case WeightDType::Int8: return "int8";
    case WeightDType::Int4: return "int4";
  }
  return "?";
}

WeightDType weight_dtype_from_string(const std::string& s, const std::string& what) {
  if (s == "f32" || s == "float32") return WeightDType::F32;
  if (s == "bf16" || s == "bfloat16") return WeightDType::BF16;
  if (s == "int8") return WeightDType::Int8;
  if (s == "int4") return WeightDType::Int4;
  throw Error(what + ": unknown weight dtype '" + s + "' (expected f32, bf16, int8 or int4)");
}

WeightFormat weight_format_from_string(const std::string& s, const std::string& what) {
  if (s == "auto") return WeightFormat::keep();
  if (s.find('=') == std::string::npos) return WeightFormat::all(weight_dtype_from_string(s, what));
  WeightFormat f;
  size_t at = 0;
  while (at <= s.size()) {
    const size_t comma = std::min(s.find(',', at), s.size());
    const std::string item = s.substr(at, comma - at);
    const size_t eq = item.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == item.size())
      throw Error(what + ": '" + item + "' is not PART=DTYPE (PART llm, vision or projector; e.g. llm=int4,vision=bf16)");
    const std::string part = item.substr(0, eq);
    std::optional<WeightDType>* slot = part == "llm"         ? &f.llm
                                       : part == "vision"    ? &f.vision
                                       : part == "projector" ? &f.projector
                                                             : nullptr;
    if (!slot) throw Error(what + ": unknown part '" + part + "' (expected llm, vision or projector)");
    if (slot->has_value()) throw Error(what + ": part '" + part + "' is given twice");
    *slot = weight_dtype_from_string(item.substr(eq + 1), what + " " + part);
    at = comma + 1;
  }
  return f;
}

std::string ModelConfig::weight_format() const {
  if (uniform_weights()) return to_string(weight_dtype);
  return "llm=" + to_string(weight_dtype) + ",vision=" + to_string(vision_weight_dtype) +
         ",projector=" + to_string(projector_weight_dtype);
}

void ModelConfig::set_weight_format(const WeightFormat& f) {
  if (f.llm) weight_dtype = *f.llm;
  if (f.vision) vision_weight_dtype = *f.vision;
  if (f.projector) projector_weight_dtype = *f.projector;
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
  if (is_next()) {
    for (auto& p : image_grid_pinpoints)
      require(p[0] > 0 && p[1] > 0 && p[0] % v.image_size == 0 && p[1] % v.image_size == 0 &&
                  int64_t(p[0] / v.image_size) * (p[1] / v.image_size) <= 64,
              "image_grid_pinpoints",
              "entry [" + std::to_string(p[0]) + ", " + std::to_string(p[1]) + "] must be multiples of vision_config.image_size (" +
                  std::to_string(v.image_size) + ") with at most 64 crops");
    require(vision_feature_select_strategy == "default", "vision_feature_select_strategy",
            "must be 'default' on LLaVA-NeXT (its crops are packed as a grid of patches, without class tokens)");
    require(preprocess.shortest_edge == preprocess.crop_size, "preprocessor_config.size.shortest_edge",
            "must equal crop_size on LLaVA-NeXT (the base view is resized to shortest_edge squared, the crops are crop_size)");
  }
  require(preprocess.max_crops >= 0 && preprocess.max_image_tokens >= 0, "image token cap", "must be >= 0");
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

// Every key of config.json's vision_config and text_config, declared once: reading, writing and
// the key names in errors all come from these tables. `V`/`T` may be const (writing) or not (reading).
template <class V, class F>
void vision_fields(V& v, F&& f) {
  f("hidden_size", v.hidden_size);
  f("intermediate_size", v.intermediate_size);
  f("num_hidden_layers", v.num_hidden_layers);
  f("num_attention_heads", v.num_attention_heads);
  f("image_size", v.image_size);
  f("patch_size", v.patch_size);
  f("num_channels", v.num_channels);
  f("layer_norm_eps", v.layer_norm_eps);
  f("hidden_act", v.hidden_act);
}

template <class T, class F>
void text_fields(T& t, F&& f) {
  f("vocab_size", t.vocab_size);
  f("hidden_size", t.hidden_size);
  f("intermediate_size", t.intermediate_size);
  f("num_hidden_layers", t.num_hidden_layers);
  f("num_attention_heads", t.num_attention_heads);
  f("num_key_value_heads", t.num_key_value_heads);  // absent: num_attention_heads (multi-head attention)
  f("max_position_embeddings", t.max_position_embeddings);
  f("rms_norm_eps", t.rms_norm_eps);
  f("rope_theta", t.rope_theta);
  f("tie_word_embeddings", t.tie_word_embeddings);
  f("hidden_act", t.hidden_act);
  f("bos_token_id", t.bos_token_id);
  f("eos_token_id", t.eos_token_id);
}

// The top-level keys that are plain fields (the aspect ratio, dtype, quantization and the reducer
// have their own readers and writers).
template <class C, class F>
void top_fields(C& c, F&& f) {
  f("image_token_index", c.image_token_index);
  f("pad_token_id", c.pad_token_id);
  f("projector_hidden_act", c.projector_hidden_act);
  f("vision_feature_layer", c.vision_feature_layer);
  f("vision_feature_select_strategy", c.vision_feature_select_strategy);
  f("tie_word_embeddings", c.text.tie_word_embeddings);
}

// Hugging Face's class defaults (CLIPVisionConfig, LlamaConfig) for keys a config.json leaves out.
VisionConfig hf_clip_vision_defaults() {
  VisionConfig v;
  v.hidden_size = 768;
  v.intermediate_size = 3072;
  v.num_hidden_layers = 12;
  v.num_attention_heads = 12;
  v.image_size = 224;
  v.patch_size = 32;
  v.num_channels = 3;
  v.layer_norm_eps = 1e-5;
  v.hidden_act = "quick_gelu";
  return v;
}

// What victor implements: LLaVA-1.5 (LlavaForConditionalGeneration) and LLaVA-NeXT
// (LlavaNextForConditionalGeneration), a CLIP tower, an MLP projector, a LLaMA/Mistral language
// model. Any other model type or architecture is refused by name, never loaded as if it were one.
// Returns true for LLaVA-NeXT.
bool check_architecture(const json& j, const std::string& src) {
  bool next = false, named = false;
  if (j.contains("model_type") && !j["model_type"].is_null()) {
    std::string mt;
    get_opt(j, "model_type", mt, src);
    if (mt != "llava" && mt != "llava_next")
      throw Error(src + ": model_type '" + mt +
                  "' is not supported; victor runs 'llava' (LlavaForConditionalGeneration) and 'llava_next' "
                  "(LlavaNextForConditionalGeneration)");
    next = mt == "llava_next";
    named = true;
  }
  if (j.contains("architectures") && !j["architectures"].is_null()) {
    const json& a = j["architectures"];
    if (!a.is_array()) throw Error(src + ": architectures must be a list of class names");
    for (auto& name : a) {
      const std::string n = name.is_string() ? name.get<std::string>() : "";
      if (n != "LlavaForConditionalGeneration" && n != "LlavaNextForConditionalGeneration")
        throw Error(src + ": architectures " + name.dump() +
                    " is not supported; victor runs LlavaForConditionalGeneration and LlavaNextForConditionalGeneration");
      const bool is_next = n == "LlavaNextForConditionalGeneration";
      if (named && is_next != next)
        throw Error(src + ": architectures " + name.dump() + " contradicts model_type '" +
                    (next ? "llava_next" : "llava") + "'");
      next = is_next;
      named = true;
    }
  }
  if (j.contains("vision_config") && j["vision_config"].is_object() && j["vision_config"].contains("model_type") &&
      j["vision_config"]["model_type"] != "clip_vision_model")
    throw Error(src + ": vision_config.model_type " + j["vision_config"]["model_type"].dump() +
                " is not supported; victor's vision tower is CLIP's (clip_vision_model)");
  return next;
}

json pinpoints_json(const std::vector<Pinpoint>& pins) {
  json out = json::array();
  for (auto& p : pins) out.push_back({p[0], p[1]});
  return out;
}

// image_grid_pinpoints: a non-empty list of [height, width] pairs of positive integers.
std::vector<Pinpoint> read_pinpoints(const json& j, const std::string& where) {
  if (!j.is_array() || j.empty())
    throw Error(where + " must be a non-empty list of [height, width] pairs, got " + j.dump().substr(0, 200));
  if (j.size() > 256) throw Error(where + " has " + std::to_string(j.size()) + " entries (at most 256)");
  std::vector<Pinpoint> out;
  for (auto& e : j) {
    if (!e.is_array() || e.size() != 2 || !e[0].is_number_integer() || !e[1].is_number_integer() ||
        e[0].get<int64_t>() <= 0 || e[1].get<int64_t>() <= 0 || e[0].get<int64_t>() > 16384 ||
        e[1].get<int64_t>() > 16384)
      throw Error(where + ": entry " + e.dump().substr(0, 100) +
                  " is not a [height, width] pair of positive integers (at most 16384)");
    out.push_back({int(e[0].get<int64_t>()), int(e[1].get<int64_t>())});
  }
  return out;
}

// victor_int8 as victor writes it: every key it knows, with the one value it implements.
// victor's own quantization_config for each quantized storage: every key it writes, with the one
// value it implements.
json quantization_json(WeightDType d) {
  if (d == WeightDType::Int4)
    return {{"quant_method", "victor_int4"}, {"bits", 4},           {"granularity", "group"},
            {"group_size", 32 /* kernels::kInt4Group */},{"symmetric", true},   {"scale_dtype", "float16"},
            {"scale_suffix", "_scale"}};
  return {{"quant_method", "victor_int8"},
          {"bits", 8},
          {"granularity", "per_output_row"},
          {"symmetric", true},
          {"scale_suffix", "_scale"}};
}

WeightDType check_quantization(const json& q, const std::string& src) {
  const std::string w = src + ": quantization_config";
  if (!q.is_object()) throw Error(w + " must be an object");
  std::string method;
  get_opt(q, "quant_method", method, w);
  if (method != "victor_int8" && method != "victor_int4")
    throw Error(w + ".quant_method '" + method +
                "' is not supported (victor reads its own 'victor_int8' and 'victor_int4'; quantize a float "
                "checkpoint with `victor quantize`)");
  const WeightDType d = method == "victor_int4" ? WeightDType::Int4 : WeightDType::Int8;
  const json expected = quantization_json(d);
  for (auto& [key, value] : q.items()) {
    if (!expected.contains(key)) {
      std::string keys;
      for (auto& [k, v] : expected.items()) keys += (keys.empty() ? "" : ", ") + k;
      throw Error(w + "." + key + ": unknown key; " + method + " has only " + keys);
    }
    if (value != expected[key])
      throw Error(w + "." + key + " " + value.dump() + " is not implemented (" + method + " means " +
                  expected[key].dump() + ")");
  }
  return d;
}

ModelConfig config_from_json_checked(const json& j, const std::string& src) {
  if (!j.is_object()) throw Error(src + ": config must be a JSON object");
  const bool next = check_architecture(j, src);
  ModelConfig c;
  // Hugging Face class defaults for keys a config.json leaves out.
  c.vision = hf_clip_vision_defaults();
  c.text = TextConfig{};
  c.text.vocab_size = 32000;
  c.text.max_position_embeddings = 2048;
  c.text.rms_norm_eps = 1e-6;
  if (j.contains("vision_config")) {
    const json& v = j["vision_config"];
    std::string w = src + ": vision_config";
    if (!v.is_object()) throw Error(w + " must be an object");
    vision_fields(c.vision, [&](const char* key, auto& field) { get_opt(v, key, field, w); });
  }
  if (j.contains("text_config")) {
    const json& t = j["text_config"];
    std::string w = src + ": text_config";
    if (!t.is_object()) throw Error(w + " must be an object");
    if (t.contains("model_type") && t["model_type"] != "llama" && t["model_type"] != "mistral")
      throw Error(w + ".model_type: only 'llama' and 'mistral' language towers are supported, got " +
                  t["model_type"].dump());
    if (t.contains("model_type")) c.text.model_type = t["model_type"].get<std::string>();
    if (c.text.model_type == "mistral") c.text.max_position_embeddings = 4096 * 32;  // MistralConfig's default
    text_fields(c.text, [&](const char* key, auto& field) { get_opt(t, key, field, w); });
    if (!t.contains("num_key_value_heads") || t["num_key_value_heads"].is_null())
      c.text.num_key_value_heads = c.text.num_attention_heads;
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
    // Mistral's sliding window: attention over at most that many keys. A window at least as long
    // as the context never changes the math; a shorter one would, and is not implemented.
    // MistralConfig's default window is 4096 (a key left out means that); null means none.
    const bool has_window = c.text.model_type == "mistral" ? !(t.contains("sliding_window") && t["sliding_window"].is_null())
                                                          : t.contains("sliding_window") && !t["sliding_window"].is_null();
    if (has_window) {
      int window = 4096;
      get_opt(t, "sliding_window", window, w);
      if (window < c.text.max_position_embeddings)
        throw Error(w + ".sliding_window " + std::to_string(window) + " is shorter than max_position_embeddings " +
                    std::to_string(c.text.max_position_embeddings) +
                    ": sliding-window attention is not implemented (it would change the logits of longer prompts)");
    }
  }
  if (j.contains("vision_feature_layer") && j["vision_feature_layer"].is_array())
    throw Error(src + ": vision_feature_layer as a list (multi-layer features) is not supported");
  top_fields(c, [&](const char* key, auto& field) { get_opt(j, key, field, src); });
  get_opt(j, "image_token_id", c.image_token_index, src);  // newer transformers' name for it
  if (next) {
    if (!j.contains("image_grid_pinpoints") || j["image_grid_pinpoints"].is_null())
      throw Error(src + ": image_grid_pinpoints is missing (a LLaVA-NeXT config lists its AnyRes resolutions)");
    c.image_grid_pinpoints = read_pinpoints(j["image_grid_pinpoints"], src + ": image_grid_pinpoints");
    if (j.contains("multimodal_projector_bias") && j["multimodal_projector_bias"] == false)
      throw Error(src + ": multimodal_projector_bias false is not implemented (the projector has biases)");
  } else if (j.contains("image_grid_pinpoints") && !j["image_grid_pinpoints"].is_null()) {
    throw Error(src + ": image_grid_pinpoints belongs to LLaVA-NeXT, but the config says LLaVA-1.5 "
                "(LlavaForConditionalGeneration)");
  }
  if (j.contains("image_aspect_ratio") && !j["image_aspect_ratio"].is_null()) {
    std::string a;
    get_opt(j, "image_aspect_ratio", a, src);
    if (next && a != "anyres")
      throw Error(src + ": image_aspect_ratio '" + a + "' contradicts LLaVA-NeXT's AnyRes (image_grid_pinpoints)");
    if (!next && a != "pad" && a != "square")
      throw Error(src + ": image_aspect_ratio '" + a + "' is not supported (pad or square)");
    c.preprocess.pad_to_square = a == "pad";
    c.preprocess.pad_from_config = !next;
  }
  c.preprocess.crop_size = c.vision.image_size;
  c.preprocess.shortest_edge = c.vision.image_size;
  if (next) c.preprocess.pad_to_square = false;  // AnyRes pads to the chosen pinpoint, never to a square
  // Checkpoints in float16 load as float32 unless --dtype says otherwise; bfloat16 stays bfloat16.
  std::string torch_dtype;
  get_opt(j, "torch_dtype", torch_dtype, src);
  if (torch_dtype == "bfloat16") c.weight_dtype = WeightDType::BF16;
  if (j.contains("quantization_config") && !j["quantization_config"].is_null()) {
    c.weight_dtype = check_quantization(j["quantization_config"], src);
  }
  c.vision_weight_dtype = c.projector_weight_dtype = c.weight_dtype;
  // Parts stored unlike the language model: victor's own key, every part named.
  if (j.contains("victor_weight_format") && !j["victor_weight_format"].is_null()) {
    const json& f = j["victor_weight_format"];
    const std::string w = src + ": victor_weight_format";
    if (!f.is_object()) throw Error(w + " must be an object");
    for (auto& [key, value] : f.items())
      if (key != "language_model" && key != "vision_tower" && key != "multi_modal_projector")
        throw Error(w + "." + key + ": unknown part (expected language_model, vision_tower, multi_modal_projector)");
    auto part = [&](const char* key) {
      if (!f.contains(key) || !f[key].is_string()) throw Error(w + "." + key + " must be a dtype string");
      return weight_dtype_from_string(f[key].get<std::string>(), w + "." + key);
    };
    if (part("language_model") != c.weight_dtype)
      throw Error(w + ".language_model '" + f["language_model"].get<std::string>() +
                  "' contradicts torch_dtype / quantization_config (" + to_string(c.weight_dtype) + ")");
    c.vision_weight_dtype = part("vision_tower");
    c.projector_weight_dtype = part("multi_modal_projector");
  }
  c.reducer = Reducer::from_json(j, src);
  return c;
}
}  // namespace

json config_to_json(const ModelConfig& c) {
  json j;
  j["architectures"] = {c.is_next() ? "LlavaNextForConditionalGeneration" : "LlavaForConditionalGeneration"};
  j["model_type"] = c.is_next() ? "llava_next" : "llava";
  top_fields(c, [&](const char* key, const auto& field) { j[key] = field; });
  if (c.is_next()) {
    j["image_grid_pinpoints"] = pinpoints_json(c.image_grid_pinpoints);
  } else {
    j["image_aspect_ratio"] = c.preprocess.pad_to_square ? "pad" : "square";
  }
  j["torch_dtype"] = c.weight_dtype == WeightDType::BF16 ? "bfloat16" : "float32";
  if (c.weight_dtype == WeightDType::Int8 || c.weight_dtype == WeightDType::Int4)
    j["quantization_config"] = quantization_json(c.weight_dtype);
  if (!c.uniform_weights())
    j["victor_weight_format"] = {{"language_model", to_string(c.weight_dtype)},
                                 {"vision_tower", to_string(c.vision_weight_dtype)},
                                 {"multi_modal_projector", to_string(c.projector_weight_dtype)}};
  json& v = j["vision_config"] = {{"model_type", "clip_vision_model"}};
  vision_fields(c.vision, [&](const char* key, const auto& field) { v[key] = field; });
  json& t = j["text_config"] = {{"model_type", c.text.model_type}};
  text_fields(c.text, [&](const char* key, const auto& field) { t[key] = field; });
  if (c.text.model_type == "mistral") t["sliding_window"] = nullptr;
  c.reducer.to_json(j);
  return j;
}

json preprocess_to_json(const ModelConfig& c) {
  const auto& p = c.preprocess;
  // The steps every processor victor writes shares; the type and its own keys follow.
  json j = {{"do_resize", true},
            {"size", {{"shortest_edge", p.shortest_edge}}},
            {"resample", 3},
            {"do_center_crop", true},
            {"crop_size", {{"height", p.crop_size}, {"width", p.crop_size}}},
            {"do_rescale", true},
            {"rescale_factor", p.rescale_factor},
            {"do_normalize", p.do_normalize},
            {"image_mean", p.image_mean},
            {"image_std", p.image_std},
            {"do_convert_rgb", true}};
  if (c.is_next()) {
    j["image_processor_type"] = "LlavaNextImageProcessor";
    j["processor_class"] = "LlavaNextProcessor";
    j["image_grid_pinpoints"] = pinpoints_json(c.image_grid_pinpoints);
    j["do_pad"] = true;
    return j;
  }
  // LlavaImageProcessor with do_pad says in the processor's own terms what config.json's
  // image_aspect_ratio says: transformers preprocesses victor's folders as victor does.
  j["image_processor_type"] = "LlavaImageProcessor";
  j["processor_class"] = "LlavaProcessor";
  j["do_pad"] = p.pad_to_square;
  return j;
}

void apply_preprocess_json(ModelConfig& c, const json& j, const std::string& src) {
  if (!j.is_object()) throw Error(src + ": must be a JSON object");
  PreprocessConfig& p = c.preprocess;
  auto given = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
  // The processor class: transformers' LLaVA maps a folder without one to CLIPImageProcessor.
  std::string type = "CLIPImageProcessor";
  if (given("image_processor_type")) get_opt(j, "image_processor_type", type, src);
  if (type.size() > 4 && type.compare(type.size() - 4, 4, "Fast") == 0) type.resize(type.size() - 4);
  if (type != "CLIPImageProcessor" && type != "LlavaImageProcessor" && type != "LlavaNextImageProcessor")
    throw Error(src + ": image_processor_type '" + type +
                "' is not supported (CLIPImageProcessor, LlavaImageProcessor or LlavaNextImageProcessor)");
  if ((type == "LlavaNextImageProcessor") != c.is_next())
    throw Error(src + ": image_processor_type '" + type + "' does not match the model (" +
                (c.is_next() ? "LLaVA-NeXT needs LlavaNextImageProcessor" : "LLaVA-1.5 cannot use AnyRes tiling") + ")");
  if (type == "LlavaNextImageProcessor") {
    // AnyRes never pads to a square (its do_pad pads a batch's crop lists, a no-op here). The
    // processor tiles with its own pinpoints and the model packs with config.json's: they must agree.
    if (given("image_grid_pinpoints") &&
        read_pinpoints(j["image_grid_pinpoints"], src + ": image_grid_pinpoints") != c.image_grid_pinpoints)
      throw Error(src + ": image_grid_pinpoints differ from config.json's (the crops would not match the packing)");
    p.pad_to_square = false;
  } else {
    bool do_pad = false;
    if (type == "LlavaImageProcessor") get_opt(j, "do_pad", do_pad, src);
    if (!p.pad_from_config) p.pad_to_square = do_pad;
  }
  // Steps victor always takes: turning one off is refused, never ignored.
  for (const char* key : {"do_resize", "do_center_crop", "do_rescale"}) {
    bool on = true;
    get_opt(j, key, on, src);
    if (!on) throw Error(src + ": " + key + " false is not implemented (victor always resizes, center-crops and rescales)");
  }
  int resample = 3;
  get_opt(j, "resample", resample, src);
  if (resample != 3)
    throw Error(src + ": resample " + std::to_string(resample) +
                " is not implemented (victor resizes with PIL's bicubic filter, resample 3)");
  get_opt(j, "rescale_factor", p.rescale_factor, src);
  if (!(p.rescale_factor > 0) || !std::isfinite(p.rescale_factor))
    throw Error(src + ": rescale_factor must be a positive number");
  get_opt(j, "do_normalize", p.do_normalize, src);
  get_opt(j, "image_mean", p.image_mean, src);
  get_opt(j, "image_std", p.image_std, src);
  if (given("size")) {
    const json& s = j["size"];
    if (s.is_object() && !s.contains("shortest_edge"))
      throw Error(src + ": size " + s.dump() + " (a fixed height x width) is not implemented; victor resizes the "
                  "shortest edge (size.shortest_edge)");
    if (s.is_object()) get_opt(s, "shortest_edge", p.shortest_edge, src);
    else get_opt(j, "size", p.shortest_edge, src);
  }
  if (given("crop_size")) {
    const json& s = j["crop_size"];
    if (s.is_object()) {
      int h = p.crop_size, w = p.crop_size;
      get_opt(s, "height", h, src);
      get_opt(s, "width", w, src);
      if (h != w) throw Error(src + ": crop_size " + s.dump() + " is not square; the vision tower takes square images");
      p.crop_size = h;
    } else {
      get_opt(j, "crop_size", p.crop_size, src);
    }
  }
}

ModelConfig load_config(const std::string& dir) {
  if (!fs::is_directory(dir)) throw Error(dir + ": model folder not found");
  fs::path p = fs::path(dir) / "config.json";
  if (!fs::exists(p)) throw Error(p.string() + ": missing (not a model folder?)");
  json j;
  try {
    j = json::parse(read_file(p.string(), FileKind::Json));
  } catch (const json::exception& e) {
    throw Error(p.string() + ": malformed JSON: " + e.what());
  }
  ModelConfig c = config_from_json(j, p.string());
  fs::path pp = fs::path(dir) / "preprocessor_config.json";
  if (fs::exists(pp)) {
    json pj;
    try {
      pj = json::parse(read_file(pp.string(), FileKind::Json));
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

void fit_vocabulary(ModelConfig& c, int pieces, bool keep_larger) {
  const int padded = ((pieces + 2 + 63) / 64) * 64;
  c.text.vocab_size = keep_larger ? std::max(c.text.vocab_size, padded) : padded;
  c.image_token_index = pieces;
  c.pad_token_id = pieces + 1;
}

const std::vector<std::string>& preset_names() {
  static const std::vector<std::string> names{"tiny",          "small",           "clip-l-1b",     "llava-7b",
                                              "llava-next-tiny", "small-next",      "clip-l-1b-next", "llava-next-7b"};
  return names;
}

bool preset_keeps_vocabulary(const std::string& name) {
  return name == "clip-l-1b" || name == "clip-l-1b-next" || name == "llava-7b" || name == "llava-next-7b";
}

ModelConfig preset_config(const std::string& name) {
  // CLIP ViT-L/14-336, LLaVA-1.5's tower: VisionConfig's own defaults.
  const VisionConfig clip_l_336;
  ModelConfig c;
  c.text.rms_norm_eps = 1e-5;
  if (name == "tiny") {
    c.vision.hidden_size = 32;
    c.vision.intermediate_size = 64;
    c.vision.num_hidden_layers = 2;
    c.vision.num_attention_heads = 2;
    c.vision.image_size = 28;
    c.vision.patch_size = 7;
    c.text.hidden_size = 64;
    c.text.intermediate_size = 128;
    c.text.num_hidden_layers = 4;
    c.text.num_attention_heads = 4;
    c.text.num_key_value_heads = 2;
    c.text.max_position_embeddings = 1024;
  } else if (name == "small") {
    // GridVQA: a 112 px grid of 28 px items, 7 px patches -> 256 visual tokens (16 per item).
    c.vision.hidden_size = 192;
    c.vision.intermediate_size = 768;
    c.vision.num_hidden_layers = 5;
    c.vision.num_attention_heads = 4;
    c.vision.image_size = 112;
    c.vision.patch_size = 7;
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
  } else if (name == "llava-next-tiny") {
    // The tiny shape with AnyRes: llava-v1.6's pinpoints scaled from 336 to its 28-pixel views.
    c = preset_config("tiny");
    c.image_grid_pinpoints = {{28, 56}, {56, 28}, {56, 56}, {84, 28}, {28, 84}};
  } else if (name == "small-next") {
    // GridVQA-HR (victor data gridvqa --scattered): the small shape with AnyRes over llava-v1.6's
    // pinpoints scaled from 336 to its 112-pixel views (up to four crops + the base view, 1,280
    // patches; 1,312 rows with the newlines on a 224x224 canvas).
    c = preset_config("small");
    c.image_grid_pinpoints = {{112, 224}, {224, 112}, {224, 224}, {336, 112}, {112, 336}};
  } else if (name == "llava-next-7b" || name == "clip-l-1b-next") {
    // llava-v1.6-vicuna-7b: LLaVA-1.5-7B's shapes, AnyRes over llava-v1.6's five pinpoints (up to
    // four 336-pixel crops plus the base view: 2,880 patches, 2,928 rows with the newlines);
    // clip-l-1b-next: the same AnyRes on clip-l-1b (side-by-side runs on a 1B language model).
    c = preset_config(name == "llava-next-7b" ? "llava-7b" : "clip-l-1b");
    c.image_grid_pinpoints = {{336, 672}, {672, 336}, {672, 672}, {1008, 336}, {336, 1008}};
  } else {
    std::string names;
    for (const auto& n : preset_names()) names += (names.empty() ? "" : ", ") + n;
    throw Error("unknown preset '" + name + "' (" + names + ")");
  }
  if (c.is_next()) c.preprocess.pad_to_square = false;
  c.preprocess.crop_size = c.vision.image_size;
  c.preprocess.shortest_edge = c.vision.image_size;
  return c;
}

}  // namespace victor
