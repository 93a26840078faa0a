// The assembly: tensor list, loading/saving, Victor's registers, the sequence layout and the
// decoder loop with the drop after layer k.
#include "victor/model.h"

#include <ATen/CPUGeneratorImpl.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <filesystem>
#include <iostream>
#include <map>

#include "internal.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/image_io.h"
#include "victor/kernels.h"
#include "victor/ops.h"
#include "victor/safetensors.h"

namespace fs = std::filesystem;

namespace victor {

const char* part_name(Part p) {
  switch (p) {
    case Part::Vision: return "vision";
    case Part::Projector: return "projector";
    case Part::Registers: return "registers";
    case Part::Llm: return "llm";
  }
  return "?";
}

std::string canonical_tensor_name(const std::string& n) {
  auto starts = [&](const char* p) { return n.rfind(p, 0) == 0; };
  if (n == "lm_head.weight") return "language_model.lm_head.weight";
  if (starts("model.language_model.")) return "language_model.model." + n.substr(21);
  if (starts("model.vision_tower.")) return n.substr(6);
  if (starts("model.multi_modal_projector.")) return n.substr(6);
  if (starts("model.victor.")) return n.substr(6);
  if (n == "model.image_newline") return "image_newline";
  return n;
}

Vlm::Vlm(const ModelConfig& config) : config_(config) {
  config_.validate();
  declare_params();
}

const torch::Tensor& ReducerWeights::tensor(const std::string& name) const {
  static const torch::Tensor undefined;
  auto it = tensors.find(name);
  return it == tensors.end() ? undefined : it->second;
}

const LinearW& ReducerWeights::matrix(const std::string& name) const {
  auto it = matrices.find(name);
  if (it == matrices.end()) throw Error("the token reducer's matrix '" + name + "' is missing");
  return it->second;
}

Vlm::Vlm(const Vlm& o) : config_(o.config_), w_(o.w_) { declare_params(); }
Vlm::Vlm(Vlm&& o) noexcept : config_(std::move(o.config_)), w_(std::move(o.w_)) { declare_params(); }

namespace {
// The storage a part's weight matrices take (the token reducer's follow the language model's).
WeightDType part_dtype(const ModelConfig& c, Part p) {
  if (p == Part::Vision) return c.vision_weight_dtype;
  if (p == Part::Projector) return c.projector_weight_dtype;
  return c.weight_dtype;
}
void copy_weight_dtypes(ModelConfig& to, const ModelConfig& from) {
  to.weight_dtype = from.weight_dtype;
  to.vision_weight_dtype = from.vision_weight_dtype;
  to.projector_weight_dtype = from.projector_weight_dtype;
}
}  // namespace

void Vlm::declare_params() {
  params_.clear();
  const auto& v = config_.vision;
  const auto& t = config_.text;
  const int64_t D = v.hidden_size, I = v.intermediate_size, P = v.patch_size;
  const int64_t d = t.hidden_size, H = t.num_attention_heads, Hkv = t.num_key_value_heads;
  const int64_t hd = t.head_dim(), F = t.intermediate_size, V = t.vocab_size;

  auto add = [&](const std::string& name, std::vector<int64_t> shape, Part part, torch::Tensor& ref,
                 bool optional = false) {
    params_.push_back({name, std::move(shape), part, &ref, optional});
  };
  // A weight matrix, stored in the model's dtype; int8 adds its per-row scale right after it,
  // int4 its per-group scales.
  auto matrix = [&](const std::string& name, int64_t out, int64_t in, Part part, LinearW& w) {
    params_.push_back({name, {out, in}, part, &w.weight, false, &w.scale});
    const WeightDType wdt = part_dtype(config_, part);
    if (wdt == WeightDType::Int8) add(name + "_scale", {out}, part, w.scale);
    if (wdt == WeightDType::Int4) add(name + "_scale", {out, int4_groups(in)}, part, w.scale);
  };
  auto& vw = w_.vision;
  vw.layers.resize(v.num_hidden_layers);
  const std::string vp = "vision_tower.vision_model.";
  add(vp + "embeddings.class_embedding", {D}, Part::Vision, vw.class_embedding);
  add(vp + "embeddings.patch_embedding.weight", {D, 3, P, P}, Part::Vision, vw.patch_embedding);
  add(vp + "embeddings.position_embedding.weight", {v.num_patches() + 1, D}, Part::Vision,
      vw.position_embedding);
  add(vp + "pre_layrnorm.weight", {D}, Part::Vision, vw.pre_ln.weight);
  add(vp + "pre_layrnorm.bias", {D}, Part::Vision, vw.pre_ln.bias);
  for (int i = 0; i < v.num_hidden_layers; ++i) {
    auto& L = vw.layers[i];
    std::string p = vp + "encoder.layers." + std::to_string(i) + ".";
    auto lin = [&](const std::string& n, LinearW& w, int64_t out, int64_t in) {
      matrix(p + n + ".weight", out, in, Part::Vision, w);
      add(p + n + ".bias", {out}, Part::Vision, w.bias);
    };
    lin("self_attn.q_proj", L.q, D, D);
    lin("self_attn.k_proj", L.k, D, D);
    lin("self_attn.v_proj", L.v, D, D);
    lin("self_attn.out_proj", L.out, D, D);
    add(p + "layer_norm1.weight", {D}, Part::Vision, L.ln1.weight);
    add(p + "layer_norm1.bias", {D}, Part::Vision, L.ln1.bias);
    lin("mlp.fc1", L.fc1, I, D);
    lin("mlp.fc2", L.fc2, D, I);
    add(p + "layer_norm2.weight", {D}, Part::Vision, L.ln2.weight);
    add(p + "layer_norm2.bias", {D}, Part::Vision, L.ln2.bias);
  }
  // Unused by LLaVA's features (taken before it) but present in every CLIP checkpoint.
  add(vp + "post_layernorm.weight", {D}, Part::Vision, vw.post_ln.weight, true);
  add(vp + "post_layernorm.bias", {D}, Part::Vision, vw.post_ln.bias, true);

  matrix("multi_modal_projector.linear_1.weight", d, D, Part::Projector, w_.proj1);
  add("multi_modal_projector.linear_1.bias", {d}, Part::Projector, w_.proj1.bias);
  matrix("multi_modal_projector.linear_2.weight", d, d, Part::Projector, w_.proj2);
  add("multi_modal_projector.linear_2.bias", {d}, Part::Projector, w_.proj2.bias);
  if (config_.is_next()) add("image_newline", {d}, Part::Projector, w_.image_newline);

  auto& lw = w_.llm;
  lw.layers.resize(t.num_hidden_layers);
  const std::string lp = "language_model.model.";
  matrix(lp + "embed_tokens.weight", V, d, Part::Llm, lw.embed_tokens);
  for (int i = 0; i < t.num_hidden_layers; ++i) {
    auto& L = lw.layers[i];
    std::string p = lp + "layers." + std::to_string(i) + ".";
    matrix(p + "self_attn.q_proj.weight", H * hd, d, Part::Llm, L.q);
    matrix(p + "self_attn.k_proj.weight", Hkv * hd, d, Part::Llm, L.k);
    matrix(p + "self_attn.v_proj.weight", Hkv * hd, d, Part::Llm, L.v);
    matrix(p + "self_attn.o_proj.weight", d, H * hd, Part::Llm, L.o);
    matrix(p + "mlp.gate_proj.weight", F, d, Part::Llm, L.gate);
    matrix(p + "mlp.up_proj.weight", F, d, Part::Llm, L.up);
    matrix(p + "mlp.down_proj.weight", d, F, Part::Llm, L.down);
    add(p + "input_layernorm.weight", {d}, Part::Llm, L.input_norm);
    add(p + "post_attention_layernorm.weight", {d}, Part::Llm, L.post_norm);
  }
  add(lp + "norm.weight", {d}, Part::Llm, lw.norm);
  if (!t.tie_word_embeddings) matrix("language_model.lm_head.weight", V, d, Part::Llm, lw.lm_head);
  // The token reducer's own parameters, as its row declares them.
  auto& rw = w_.reducer;
  for (const ReducerParam& p : config_.reducer.ops().params(config_)) {
    if (p.matrix) matrix(p.name, p.shape.at(0), p.shape.at(1), Part::Registers, rw.matrices[p.name]);
    else if (!p.bias_of.empty()) add(p.name, p.shape, Part::Registers, rw.matrices[p.bias_of].bias);
    else add(p.name, p.shape, Part::Registers, rw.tensors[p.name]);
  }
}

namespace {

bool is_norm_weight(const std::string& n) {
  return n.find("norm") != std::string::npos || n.find("layrnorm") != std::string::npos ||
         n.find("layer_norm") != std::string::npos;
}

void init_param(const ParamRef& p, at::Generator& gen) {
  const std::string& n = p.name;
  auto t = torch::empty(p.shape, torch::kFloat32);
  if (n.size() >= 5 && n.compare(n.size() - 5, 5, ".bias") == 0) t.zero_();
  else if (is_norm_weight(n)) t.fill_(1.0);
  else t.normal_(0.0, 0.02, gen);
  *p.tensor = t;
}

}  // namespace

namespace {

WeightDType stored_dtype(const torch::Tensor& w) {
  switch (w.scalar_type()) {
    case torch::kInt8: return WeightDType::Int8;
    case torch::kUInt8: return WeightDType::Int4;
    case torch::kBFloat16: return WeightDType::BF16;
    default: return WeightDType::F32;
  }
}

// A weight matrix of K columns converted to `to` (quantized, dequantized or cast) and placed in
// huge-page memory. `scale` is its scale slot (defined exactly when the result is int8 or int4).
// int8 <-> int4 goes through float32 (requantized from the stored values).
// An int4 result is interleaved for the decode products (kernels.h) unless it is `embedding`
// (whose rows are looked up one by one).
void release_freed_heap();

void convert_matrix(torch::Tensor& w, torch::Tensor& scale, WeightDType to, int64_t K, bool embedding) {
  // The heap is trimmed every 512 MiB of converted originals, not only once at the end: a freed
  // float32 matrix below the mmap threshold stays resident in glibc's heap, and when the next
  // (larger) one cannot reuse the hole, the heap grows by it. Building llava-7b in int8 grew
  // past 24 GiB this way (machine A, 2026-12-08: killed by the kernel) instead of ~7 GiB.
  thread_local int64_t converted_since_trim = 0;
  const int64_t original = int64_t(w.nbytes());
  const WeightDType from = stored_dtype(w);
  const bool kept = from == to && (from != WeightDType::F32 || w.scalar_type() == torch::kFloat32);
  const bool quantized = from == WeightDType::Int8 || from == WeightDType::Int4;
  if (!kept) switch (to) {
    case WeightDType::F32:
      w = weight_as_float(w, scale, K);
      scale = torch::Tensor();
      break;
    case WeightDType::BF16:
      w = (quantized ? weight_as_float(w, scale, K) : w).to(torch::kBFloat16).contiguous();
      scale = torch::Tensor();
      break;
    case WeightDType::Int8: {
      auto q = quantize_int8(quantized ? weight_as_float(w, scale, K) : w);
      w = q.q;
      scale = q.scale;
      break;
    }
    case WeightDType::Int4: {
      auto q = quantize_int4(quantized ? weight_as_float(w, scale, K) : w);
      w = q.q;
      scale = q.scale;
      break;
    }
  }
  if (to == WeightDType::Int4 && !embedding) int4_tile_for_kernels(w, scale, K);  // a no-op on tiles already
  w = in_huge_pages(w);
  if (!kept && (converted_since_trim += original) >= (int64_t(512) << 20)) {
    release_freed_heap();
    converted_since_trim = 0;
  }
}

bool is_embedding(const ParamRef& p) {
  const std::string suffix = "embed_tokens.weight";
  return p.name.size() >= suffix.size() && p.name.compare(p.name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Gives the heap pages freed while building or converting the weights back to the system. A
// 7B model converted matrix by matrix leaves ~5 GB of freed float32 chunks inside glibc's heap
// (each below the mmap threshold), which a batch-16 prefill then needs.
void release_freed_heap() {
#ifdef __GLIBC__
  malloc_trim(0);
#endif
}

bool is_scale_of_matrix(const ParamRef& p) {
  return !p.is_matrix() && p.name.size() > 6 && p.name.compare(p.name.size() - 6, 6, "_scale") == 0;
}

}  // namespace

Vlm Vlm::random(const ModelConfig& config, uint64_t seed, const WeightFormat& format) {
  ModelConfig target = config;
  target.set_weight_format(format);
  ModelConfig c = config;
  c.set_weight_format(WeightFormat::all(WeightDType::F32));
  Vlm m(c);
  auto gen = at::detail::createCPUGenerator(seed);
  for (auto& p : m.params_) {
    init_param(p, gen);
    m.convert_param(p, target);
  }
  m.adopt_weight_format(target);
  return m;
}

void Vlm::convert_param(ParamRef& p, const ModelConfig& target) {
  if (p.is_matrix()) convert_matrix(*p.tensor, *p.scale, part_dtype(target, p.part), p.shape[1], is_embedding(p));
}

void Vlm::adopt_weight_format(const ModelConfig& target) {
  if (config_.text.tie_word_embeddings) w_.llm.lm_head = w_.llm.embed_tokens;
  copy_weight_dtypes(config_, target);
  declare_params();
  release_freed_heap();  // the float32 originals of converted matrices
}

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? "," : "") + std::to_string(s[i]);
  return r + "]";
}

// The scale stored next to quantized matrix `name` ([rows, cols]), checked: for int8 float32, one
// finite non-negative entry per row; for int4 float16, one finite entry per row and group of
// kInt4Group columns (the sign is the group's own). Mismatched or corrupt scales would silently
// scale every output of the layer.
torch::Tensor load_scale(const TensorStore& store, const std::string& name, int64_t rows, int64_t cols, bool int4) {
  const std::string sname = name + "_scale";
  const char* what = int4 ? "int4" : "int8";
  if (!store.contains(sname))
    throw Error(store.file_of(name) + ": tensor '" + name + "' is " + what + " but its scale '" + sname +
                "' is missing");
  const auto& info = store.info(sname);
  if (int4) {
    const std::vector<int64_t> want{rows, int4_groups(cols)};
    if (info.shape != want)
      throw Error(store.file_of(sname) + ": scale tensor '" + sname + "' has shape " + shape_str(info.shape) +
                  " but its int4 matrix of " + std::to_string(rows) + " rows and " + std::to_string(cols) +
                  " columns needs " + shape_str(want) + " (one per row and group of " + std::to_string(kInt4Group) +
                  ")");
    if (info.dtype != "F16")
      throw Error(store.file_of(sname) + ": scale tensor '" + sname + "' has dtype " + info.dtype +
                  "; int4 scales are F16");
    auto scale = store.load_raw(sname).contiguous().clone();
    if (!torch::isfinite(scale.to(torch::kFloat32)).all().item<bool>())
      throw Error(store.file_of(sname) + ": scale tensor '" + sname + "' is corrupt (NaN or infinite entries)");
    return scale;
  }
  if (info.shape != std::vector<int64_t>{rows})
    throw Error(store.file_of(sname) + ": scale tensor '" + sname + "' has shape " +
                shape_str(info.shape) + " but its matrix has " + std::to_string(rows) + " rows");
  auto scale = store.load(sname).contiguous();
  if (!torch::isfinite(scale).all().item<bool>() || scale.lt(0).any().item<bool>())
    throw Error(store.file_of(sname) + ": scale tensor '" + sname +
                "' is corrupt (negative, NaN or infinite entries)");
  return scale;
}

}  // namespace

Vlm Vlm::load(const std::string& dir, const WeightFormat& format, bool allow_incomplete) {
  if (!allow_incomplete) check_model_folder_complete(dir);
  ModelConfig config = load_config(dir);
  ModelConfig target = config;
  target.set_weight_format(format);
  Vlm m(config);
  TensorStore store(dir);
  std::map<std::string, std::string> by_canonical;
  for (auto& n : store.names()) by_canonical[canonical_tensor_name(n)] = n;
  std::set<std::string> used;
  for (auto& p : m.params_) {
    if (is_scale_of_matrix(p)) continue;  // read with its matrix
    auto it = by_canonical.find(p.name);
    if (it == by_canonical.end()) {
      if (p.optional) {
        *p.tensor = p.name.find(".bias") != std::string::npos ? torch::zeros(p.shape)
                                                               : torch::ones(p.shape);
        continue;
      }
      throw Error(dir + ": missing tensor '" + p.name + "'" +
                  (p.part == Part::Registers ? " (config.json declares the token reducer " +
                                                   config.reducer.spec() + ")"
                                             : ""));
    }
    const auto& info = store.info(it->second);
    // An int4 matrix is stored packed: two values a byte, K padded to whole groups.
    const bool stored_int4 = p.is_matrix() && info.dtype == "U8";
    const std::vector<int64_t> stored_shape =
        stored_int4 ? std::vector<int64_t>{p.shape[0], int4_row_bytes(p.shape[1])} : p.shape;
    if (info.shape != stored_shape)
      throw Error(store.file_of(it->second) + ": tensor '" + it->second + "' has shape " +
                  shape_str(info.shape) + " but config.json implies " + shape_str(stored_shape) +
                  (stored_int4 ? " (int4: " + std::to_string(p.shape[1]) + " columns packed two a byte)" : ""));
    used.insert(it->second);
    if (!p.is_matrix()) {
      *p.tensor = store.load(it->second);
      continue;
    }
    const bool stored_int8 = info.dtype == "I8";
    if (!stored_int8 && !stored_int4 && info.dtype != "F32" && info.dtype != "BF16" && info.dtype != "F16")
      throw Error(store.file_of(it->second) + ": weight '" + it->second + "' has dtype " +
                  info.dtype + " (expected F32, BF16, F16, I8 or U8 (int4))");
    if (!stored_int8 && !stored_int4 && store.contains(it->second + "_scale"))
      throw Error(store.file_of(it->second) + ": weight '" + it->second + "' has a scale '" +
                  it->second + "_scale' but is stored as " + info.dtype + ", not int8 or int4");
    // Native dtype, memory-mapped in place when it is already the target.
    torch::Tensor w = store.load_raw(it->second);
    torch::Tensor scale;
    if (stored_int8 || stored_int4) {
      scale = load_scale(store, it->second, p.shape[0], p.shape[1], stored_int4);
      used.insert(it->second + "_scale");
    }
    const void* mapped = w.data_ptr();
    convert_matrix(w, scale, part_dtype(target, p.part), p.shape[1], is_embedding(p));
    // The matrix now lives in its own (huge-page) copy: the file's pages it was read from would
    // otherwise stay resident beside it, and peak memory was twice the weights.
    if (w.data_ptr() != mapped) store.release_pages(it->second);
    *p.tensor = w;
    *p.scale = scale;
  }
  m.adopt_weight_format(target);
  int ignored = 0;
  for (auto& n : store.names()) {
    if (used.count(n) || n.find("position_ids") != std::string::npos ||
        n.find("rotary_emb.inv_freq") != std::string::npos)
      continue;
    // A bias on a LLaMA projection the model would skip: the logits would be silently wrong.
    const std::string c = canonical_tensor_name(n);
    if (c.rfind("language_model.", 0) == 0 && c.size() > 5 && c.compare(c.size() - 5, 5, ".bias") == 0 &&
        (c.find(".self_attn.") != std::string::npos || c.find(".mlp.") != std::string::npos))
      throw Error(store.file_of(n) + ": tensor '" + n +
                  "' is a bias on a LLaMA projection (attention_bias / mlp_bias), which victor does not apply; "
                  "refusing rather than computing wrong logits");
    // A tensor of a module victor builds that no parameter takes: the checkpoint has a part
    // (a layer, a norm, a projector stage) the model would skip.
    for (const char* module : {"vision_tower.", "multi_modal_projector.", "language_model.", "victor.", "resampler.",
                               "image_newline"})
      if (c.rfind(module, 0) == 0)
        throw Error(store.file_of(n) + ": tensor '" + n + "' belongs to " + std::string(module, std::strlen(module) - 1) +
                    " but no part of the model as config.json describes it uses it; refusing rather than "
                    "computing without it");
    ++ignored;
  }
  if (ignored > 0)
    std::cerr << "victor: warning: " << dir << ": " << ignored
              << " tensor(s) in the checkpoint are not used by the model\n";
  return m;
}

void Vlm::set_weight_format(const WeightFormat& format) {
  ModelConfig target = config_;
  target.set_weight_format(format);
  for (auto& p : params_) convert_param(p, target);
  adopt_weight_format(target);
}

int64_t Vlm::weight_bytes() const {
  int64_t n = 0;
  for (auto& p : params_) n += p.tensor->numel() * int64_t(p.tensor->element_size());
  return n;
}

int64_t Vlm::parameter_count(int part_mask) const {
  int64_t n = 0;
  for (auto& p : params_) {
    if (part_mask >= 0 && !(part_mask & (1 << int(p.part)))) continue;
    // A matrix counts its values, however it is stored (int4 packs two a byte).
    n += p.is_matrix() ? p.shape[0] * p.shape[1] : p.tensor->numel();
  }
  return n;
}

void Vlm::save(const std::string& dir, size_t max_shard_bytes) const {
  ModelFolderWrite write(dir);  // a no-op inside a caller's write of the same folder
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  // int4 matrices and their scales go to disk in the file layout (rows one after another), whatever
  // their tiles in memory.
  for (auto& p : params_)
    tensors.emplace_back(p.name, p.is_matrix()           ? int4_file_layout(*p.tensor)
                                 : is_scale_of_matrix(p) ? int4_scale_file_layout(*p.tensor)
                                                         : *p.tensor);
  save_checkpoint_tensors(dir, tensors, max_shard_bytes, SaveDtype::Native);
  save_config(config_, dir);
  write.commit();
}

void Vlm::set_image_cap(int max_crops, int max_image_tokens) {
  if (max_crops == 0 && max_image_tokens == 0) return;
  if (!config_.is_next())
    throw Error("--max-crops / --max-image-tokens: this model is LLaVA-1.5 (one view per image); the cap applies to "
                "LLaVA-NeXT's AnyRes crops");
  ModelConfig c = config_;
  c.preprocess.max_crops = max_crops;
  c.preprocess.max_image_tokens = max_image_tokens;
  c.validate();
  config_ = c;
}

void Vlm::set_reducer(const Reducer& r, uint64_t seed, bool replace_registers) {
  ModelConfig c = config_;
  c.reducer = r;
  c.validate();
  // The reducer's own parameters keep their trained values when their shape matches; another
  // count is refused unless asked for; parameters the new reducer lacks are dropped.
  const auto wanted = r.ops().params(c);
  auto held = [&](const ReducerParam& p) -> const torch::Tensor* {
    if (p.matrix) {
      auto it = w_.reducer.matrices.find(p.name);
      return it == w_.reducer.matrices.end() || !it->second.weight.defined() ? nullptr : &it->second.weight;
    }
    if (!p.bias_of.empty()) {
      auto it = w_.reducer.matrices.find(p.bias_of);
      return it == w_.reducer.matrices.end() || !it->second.bias.defined() ? nullptr : &it->second.bias;
    }
    auto it = w_.reducer.tensors.find(p.name);
    return it == w_.reducer.tensors.end() || !it->second.defined() ? nullptr : &it->second;
  };
  ReducerWeights kept;
  for (const ReducerParam& p : wanted) {
    const torch::Tensor* have = held(p);
    if (!have) continue;
    const bool same = p.matrix || have->sizes().vec() == p.shape;  // matrices are d-wide: same model, same shape
    if (!same && !replace_registers)
      throw Error("token reducer '" + r.spec() + "': the model holds " + std::to_string(have->size(0)) + " trained " +
                  (p.counted.empty() ? p.name : p.counted) + "; keep that count or ask for new ones explicitly");
    if (!same) continue;
    if (p.matrix) kept.matrices[p.name] = w_.reducer.matrices.at(p.name);
    else if (!p.bias_of.empty()) kept.matrices[p.bias_of].bias = *have;
    else kept.tensors[p.name] = *have;
  }
  config_ = c;
  w_.reducer = std::move(kept);
  declare_params();
  auto gen = at::detail::createCPUGenerator(seed);
  for (auto& p : params_) {
    if (p.part != Part::Registers || p.tensor->defined() || is_scale_of_matrix(p)) continue;
    init_param(p, gen);
    if (p.is_matrix()) convert_matrix(*p.tensor, *p.scale, config_.weight_dtype, p.shape[1], is_embedding(p));
  }
}

void Vlm::init_registers_mean(const torch::Tensor& pixels, uint64_t seed) {
  const int m = config_.reducer.inserted_rows();
  if (m == 0) throw Error("init_registers_mean: the model has no registers (its reducer is " +
                          config_.reducer.spec() + ")");
  torch::NoGradGuard ng;
  auto mean = encode_images(pixels).mean(std::vector<int64_t>{0, 1});  // [d]
  auto gen = at::detail::createCPUGenerator(seed);
  auto noise = torch::empty({m, config_.text.hidden_size}).normal_(0, 0.02, gen);
  w_.reducer.tensors["victor.registers"] = (mean.unsqueeze(0) + noise).contiguous();
}

void Vlm::set_trainable(const std::vector<Part>& parts) {
  if (!config_.all_f32() && !parts.empty())
    throw Error("training needs float32 weights, but this model holds " +
                config_.weight_format() +
                " weights (load it with --dtype f32; training keeps float32 master weights)");
  for (auto& p : params_) {
    bool on = std::find(parts.begin(), parts.end(), p.part) != parts.end();
    p.tensor->requires_grad_(on);
  }
}

torch::Tensor Vlm::vision_features(const torch::Tensor& pixels, VisionTrace* trace) const {
  const auto& v = config_.vision;
  if (pixels.dim() != 4 || pixels.size(1) != 3 || pixels.size(2) != v.image_size ||
      pixels.size(3) != v.image_size)
    throw Error("vision tower: expected pixels [n,3," + std::to_string(v.image_size) + "," +
                std::to_string(v.image_size) + "]");
  const ReducerOps& ops = config_.reducer.ops();
  VisionLastBlock last;
  auto h = vision_forward(w_.vision, v, pixels, config_.vision_layers_needed(), ops.needs_last_block() ? &last : nullptr);
  torch::Tensor index;
  auto out = ops.select_features(config_, h, last, &index);
  if (trace) trace->dominant = index;
  return out;
}

torch::Tensor Vlm::encode_images(const torch::Tensor& pixels) const {
  return project(vision_features(pixels));
}

torch::Tensor Vlm::pack_image(const torch::Tensor& views, const ImageLayout& l, const torch::Tensor& dominant) const {
  if (!config_.is_next()) return views.squeeze(0);
  if (views.dim() != 3 || views.size(0) != l.views())
    throw Error("pack_image: expected the " + std::to_string(l.views()) + " views of a " +
                std::to_string(l.grid_rows) + " x " + std::to_string(l.grid_cols) + " crop grid");
  // Tokens off the patch grid (merged or learned) are packed by their reducer.
  if (!config_.reducer.grid_side(config_)) return config_.reducer.ops().pack_views(config_, views, l, dominant);
  const int64_t n = views.size(1), d = views.size(2);
  const int64_t side = next_view_side(config_);
  if (side * side != n) throw Error("pack_image: " + std::to_string(n) + " features per view are not a square grid");
  const auto nl = w_.image_newline.to(views.scalar_type());
  if (l.grid_rows == 0) return torch::cat({views[0], nl.view({1, d})}, 0);
  // [rows*cols, side, side, d] -> one [rows*side, cols*side, d] grid, crops placed row by row.
  auto grid = views.narrow(0, 1, l.views() - 1)
                  .reshape({l.grid_rows, l.grid_cols, side, side, d})
                  .permute({0, 2, 1, 3, 4})
                  .reshape({l.grid_rows * side, l.grid_cols * side, d});
  const GridRegion r = unpad_region(int(grid.size(0)), int(grid.size(1)), l.height, l.width);
  grid = grid.narrow(0, r.top, r.height).narrow(1, r.left, r.width);
  auto newline = nl.view({1, 1, d}).expand({r.height, 1, d});
  auto rows = torch::cat({grid, newline}, 1).reshape({int64_t(r.height) * (r.width + 1), d});
  return torch::cat({views[0], rows}, 0);
}

torch::Tensor Vlm::encode_image(const torch::Tensor& views, const ImageLayout& layout) const {
  VisionTrace tr;
  auto f = project(vision_features(views, &tr));
  return pack_image(f, layout, tr.dominant);
}

std::vector<torch::Tensor> Vlm::encode_prompt_images(const std::vector<PromptInput>& rows) const {
  std::vector<torch::Tensor> px;
  std::vector<ImageLayout> layouts;
  for (auto& r : rows) {
    if (!r.pixels.defined() || r.pixels.size(0) == 0) continue;
    px.push_back(r.pixels);
    if (config_.is_next()) {
      if (r.layouts.empty()) throw Error("LLaVA-NeXT: an image came without its AnyRes layout (use prepare_image)");
      int64_t views = 0;
      for (auto& l : r.layouts) views += l.views();
      if (views != r.pixels.size(0))
        throw Error("LLaVA-NeXT: the layouts describe " + std::to_string(views) + " views, the pixels hold " +
                    std::to_string(r.pixels.size(0)));
      layouts.insert(layouts.end(), r.layouts.begin(), r.layouts.end());
    } else if (!r.layouts.empty()) {
      for (auto& l : r.layouts)
        if (l.views() != 1) throw Error("LLaVA-1.5 takes one view per image, got an AnyRes layout");
    }
  }
  std::vector<torch::Tensor> out;
  if (px.empty()) return out;
  const torch::Tensor pixels = px.size() == 1 ? px[0] : torch::cat(px, 0);
  if (!config_.is_next()) return encode_images(pixels).unbind(0);
  // Every view of every image through the tower in one batch, then packed image by image.
  VisionTrace tr;
  torch::Tensor all = project(vision_features(pixels, &tr));  // [views,N,d]
  int64_t at = 0;
  for (auto& l : layouts) {
    out.push_back(pack_image(all.narrow(0, at, l.views()), l,
                             tr.dominant.defined() ? tr.dominant.narrow(0, at, l.views()) : torch::Tensor()));
    at += l.views();
  }
  return out;
}

torch::Tensor Vlm::project(const torch::Tensor& f) const {
  auto h = dense_act(f, w_.proj1, config_.projector_hidden_act);
  auto out = dense(h, w_.proj2);  // [n,N,d_text]
  return config_.reducer.ops().after_projector(config_, w_.reducer, out);
}

torch::Tensor Vlm::embed_tokens(const torch::Tensor& ids) const {
  const int64_t V = config_.text.vocab_size;
  if (ids.numel() > 0 && (ids.min().item<int64_t>() < 0 || ids.max().item<int64_t>() >= V))
    throw Error("token id out of range for vocab_size " + std::to_string(V));
  return embedding_rows(w_.llm.embed_tokens.weight, w_.llm.embed_tokens.scale, ids, config_.text.hidden_size);
}

torch::Tensor Vlm::logits(const torch::Tensor& hidden) const { return dense(hidden, w_.llm.lm_head); }

SequenceBatch Vlm::assemble(const std::vector<PromptInput>& rows, bool pad_left) const {
  return assemble(rows, encode_prompt_images(rows), pad_left);
}

SequenceBatch Vlm::assemble(const std::vector<PromptInput>& rows, const torch::Tensor& image_embeds,
                            bool pad_left) const {
  return assemble(rows, image_embeds.defined() ? image_embeds.unbind(0) : std::vector<torch::Tensor>{}, pad_left);
}

SequenceBatch Vlm::assemble(const std::vector<PromptInput>& rows, const std::vector<torch::Tensor>& image_embeds,
                            bool pad_left) const {
  const int64_t B = rows.size(), d = config_.text.hidden_size;
  const int64_t image_id = config_.image_token_index;
  const int64_t m = config_.reducer.inserted_rows();
  const int64_t n_images = int64_t(image_embeds.size());
  struct Row {
    std::vector<torch::Tensor> pieces;
    std::vector<int64_t> kind, group, target;
  };
  std::vector<Row> built(B);
  int64_t image_cursor = 0, T = 0;
  for (int64_t b = 0; b < B; ++b) {
    const auto& r = rows[b];
    if (!r.targets.empty() && r.targets.size() != r.ids.size())
      throw Error("assemble: row " + std::to_string(b) + ": targets and ids differ in length");
    Row& out = built[b];
    int64_t group = 0;
    size_t i = 0;
    while (i < r.ids.size()) {
      if (r.ids[i] == image_id) {
        if (image_cursor >= n_images)
          throw Error("prompt has more <image> tokens than images (row " + std::to_string(b) + ")");
        const torch::Tensor& e = image_embeds[image_cursor++];
        if (e.dim() != 2 || e.size(1) != d) throw Error("assemble: an image's rows must be [N," + std::to_string(d) + "]");
        const int64_t N = e.size(0);
        out.pieces.push_back(e);
        out.kind.insert(out.kind.end(), N, int64_t(TokenKind::Visual));
        out.group.insert(out.group.end(), N, group);
        out.target.insert(out.target.end(), N, -100);
        if (m > 0) {
          out.pieces.push_back(config_.reducer.ops().inserted(w_.reducer));
          out.kind.insert(out.kind.end(), m, int64_t(TokenKind::Register));
          out.group.insert(out.group.end(), m, group);
          out.target.insert(out.target.end(), m, -100);
        }
        ++group;
        ++i;
        continue;
      }
      size_t j = i;
      while (j < r.ids.size() && r.ids[j] != image_id) ++j;
      std::vector<int64_t> seg(r.ids.begin() + i, r.ids.begin() + j);
      out.pieces.push_back(embed_tokens(torch::tensor(seg, torch::kInt64)));
      out.kind.insert(out.kind.end(), seg.size(), int64_t(TokenKind::Text));
      out.group.insert(out.group.end(), seg.size(), -1);
      for (size_t t = i; t < j; ++t) out.target.push_back(r.targets.empty() ? -100 : r.targets[t]);
      i = j;
    }
    T = std::max<int64_t>(T, out.kind.size());
    if (r.generated < 0 || r.generated >= int64_t(out.kind.size()))
      throw Error("assemble: row " + std::to_string(b) + ": generated count " + std::to_string(r.generated) +
                  " leaves no prompt");
  }
  if (image_cursor != n_images)
    throw Error("got " + std::to_string(n_images) + " images but only " +
                std::to_string(image_cursor) + " <image> tokens in the prompts");
  std::vector<torch::Tensor> embeds;
  auto kind = torch::full({B, T}, int64_t(TokenKind::Pad));
  auto group = torch::full({B, T}, int64_t(-1));
  auto target = torch::full({B, T}, int64_t(-100));
  auto query = torch::empty({B}, torch::kInt64);
  for (int64_t b = 0; b < B; ++b) {
    Row& r = built[b];
    const int64_t len = r.kind.size(), padn = T - len, off = pad_left ? padn : 0;
    query[b] = off + len - 1 - rows[b].generated;
    std::vector<torch::Tensor> parts;
    auto zeros = torch::zeros({padn, d});
    if (pad_left && padn) parts.push_back(zeros);
    for (auto& p : r.pieces) parts.push_back(p);
    if (!pad_left && padn) parts.push_back(zeros);
    embeds.push_back(torch::cat(parts, 0));
    if (len) {
      kind[b].narrow(0, off, len).copy_(torch::tensor(r.kind));
      group[b].narrow(0, off, len).copy_(torch::tensor(r.group));
      target[b].narrow(0, off, len).copy_(torch::tensor(r.target));
    }
  }
  SequenceBatch out;
  out.embeds = torch::stack(embeds, 0);
  auto valid = kind.ne(int64_t(TokenKind::Pad)).to(torch::kInt64);
  out.meta.order = torch::arange(T, torch::kInt64).expand({B, T}).contiguous();
  out.meta.pos = (valid.cumsum(1) - 1).clamp_min(0);
  out.meta.kind = kind;
  out.meta.group = group;
  out.query = query;
  bool any_target = false;
  for (auto& r : rows) any_target |= !r.targets.empty();
  if (any_target) out.targets = target;
  return out;
}

KvCache Vlm::make_cache(int64_t batch, torch::ScalarType kv_dtype) const {
  if (kv_dtype != torch::kFloat32 && kv_dtype != torch::kBFloat16)
    throw Error("KV cache: only float32 and bfloat16 storage are supported");
  KvCache c;
  c.layers.resize(config_.num_layers());
  for (auto& l : c.layers) l.dtype = kv_dtype;
  c.next_pos = torch::zeros({batch}, torch::kInt64);
  return c;
}

std::pair<KvCache, torch::Tensor> Vlm::prefill(const SequenceBatch& batch, torch::ScalarType kv_dtype,
                                                int64_t new_tokens) const {
  KvCache cache = make_cache(batch.embeds.size(0), kv_dtype);
  ForwardOutput out = forward(batch, &cache);
  // Each row's last non-padding row (with left padding, the last column; the reducer may have
  // dropped rows, so out.meta, not batch.meta, says which are padding).
  auto valid = out.meta.kind.ne(int64_t(TokenKind::Pad)).to(torch::kInt64);
  auto last = (valid * torch::arange(valid.size(1), torch::kInt64)).argmax(1);
  auto logits = this->logits(out.hidden.index({torch::arange(out.hidden.size(0)), last}));
  cache.reserve(new_tokens);
  return {std::move(cache), logits};
}

ForwardOutput Vlm::forward(const SequenceBatch& batch, KvCache* cache, ForwardTrace* trace) const {
  const Reducer& reducer = config_.reducer;
  const ReducerOps& ops = reducer.ops();
  const int L = config_.num_layers(), k = reducer.drop_layer(config_);
  const std::optional<int> reduce_at = reducer.reduce_layer(config_);
  const auto mode = reducer.mask();
  torch::Tensor x = batch.embeds, targets = batch.targets;
  TokenMeta meta = batch.meta;
  const bool prefill = cache && cache->layers[0].len == 0;
  if (prefill) {
    // Decoding continues from the full length: positions and order past the last prompt token.
    cache->next_order = meta.order.max().item<int64_t>() + 1;
    cache->next_pos = std::get<0>(meta.pos.max(1)) + 1;
  }
  RopeTables rope = rope_tables(meta.pos, config_.text.head_dim(), config_.text.rope_theta);
  torch::Tensor allowed;  // computed by the first layer on each side of a drop or prune
  // A reducer that ranks by attention (FastV) ranks only when visual rows are present (a prefill or
  // a full forward, never a decode).
  const bool ranks = reduce_at && ops.needs_scores() && meta.kind.eq(int64_t(TokenKind::Visual)).any().item<bool>();
  RankRequest rank;
  if (ranks)
    rank.query = batch.query.defined() ? batch.query : torch::full({x.size(0)}, x.size(1) - 1, torch::kInt64);
  auto compact = [&](const torch::Tensor& keep) {
    const int64_t B = x.size(0), d = x.size(2);
    auto idx = compaction_index(keep);
    auto x_ext = torch::cat({x, torch::zeros({B, 1, d}, x.options())}, 1);
    x = x_ext.gather(1, idx.unsqueeze(-1).expand({B, idx.size(1), d}));
    TokenMeta pad{torch::zeros({B, 1}, torch::kInt64), torch::zeros({B, 1}, torch::kInt64),
                  torch::full({B, 1}, int64_t(TokenKind::Pad)), torch::full({B, 1}, int64_t(-1))};
    meta = meta.cat(pad).gather(idx);
    if (targets.defined())
      targets = torch::cat({targets, torch::full({B, 1}, int64_t(-100))}, 1).gather(1, idx);
    rope = rope_tables(meta.pos, config_.text.head_dim(), config_.text.rope_theta);
  };
  for (int l = 0; l < L; ++l) {
    if (reduce_at && l == *reduce_at) {
      // The reduction: the rows the reducer does not keep (visual rows, padding) leave the hidden
      // states, the metadata and the targets; survivors keep their positions.
      if (!ops.needs_scores() || ranks) {
        auto keep = ops.keep_rows(meta, ranks ? rank.scores : torch::Tensor());
        if (!keep.all().item<bool>()) compact(keep);
      }
      allowed = torch::Tensor();
    }
    x = llama_layer(w_.llm.layers[l], config_.text, mode, l, x, meta, rope, allowed,
                    cache ? &cache->layers[l] : nullptr, trace,
                    ranks && l + 1 == *reduce_at ? &rank : nullptr);
    if (trace) trace->tokens_per_layer.push_back(x.size(1));
  }
  if (prefill && mode == RegisterMask::RegistersOnly) {
    // Text can never attend to visual keys again: free them in every layer.
    for (int l = 0; l < std::min(k, L); ++l) {
      auto& lc = cache->layers[l];
      lc.keep_only(lc.key_meta().kind.ne(int64_t(TokenKind::Visual)));
    }
  }
  ForwardOutput out;
  out.hidden = rms_norm(x, w_.llm.norm, config_.text.rms_norm_eps);
  out.meta = meta;
  out.targets = targets;
  return out;
}

namespace {

// Every layer of the language tower for one new token per row on the fast path (llama_layer_decode);
// rows[b] names row b's cache (its layer-0 entry) and batch row. Empty when a cache cannot take it.
torch::Tensor decode_fast(const LlamaW& w, const ModelConfig& cfg, const torch::Tensor& x0,
                          const std::vector<KvCache*>& caches, const std::vector<int64_t>& cache_rows) {
  if (torch::GradMode::is_enabled() || x0.scalar_type() != torch::kFloat32) return {};
  const bool bf16 = caches[0]->layers[0].k.defined() && caches[0]->layers[0].k.scalar_type() == torch::kBFloat16;
  for (const KvCache* c : caches)
    for (const auto& l : c->layers)
      if (!decode_fast_path_ok(l) || (l.k.scalar_type() == torch::kBFloat16) != bf16) return {};
  for (const auto& l : w.layers)
    if (l.input_norm.scalar_type() != torch::kFloat32 || l.post_norm.scalar_type() != torch::kFloat32) return {};
  const int64_t B = x0.size(0);
  std::vector<DecodeRow> rows(static_cast<size_t>(B));
  std::vector<int64_t> pos(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const KvCache& c = *caches[size_t(b)];
    pos[size_t(b)] = c.next_pos[cache_rows[size_t(b)]].item<int64_t>();
    rows[size_t(b)] = {nullptr, cache_rows[size_t(b)], c.next_order, pos[size_t(b)]};
  }
  const DecodeRope rope = decode_rope(pos, cfg.text.head_dim(), cfg.text.rope_theta);
  torch::Tensor x = x0;
  for (int l = 0; l < cfg.num_layers(); ++l) {
    for (int64_t b = 0; b < B; ++b) rows[size_t(b)].cache = &caches[size_t(b)]->layers[size_t(l)];
    x = llama_layer_decode(w.layers[size_t(l)], cfg.text, cfg.reducer.mask(), x, rope, rows);
  }
  return x;
}

}  // namespace

torch::Tensor Vlm::decode_step(const torch::Tensor& ids, KvCache& cache) const {
  const int64_t B = ids.size(0);
  SequenceBatch b;
  b.embeds = embed_tokens(ids.view({B, 1}));
  if (cache.next_pos.numel() == B && B > 0) {
    std::vector<int64_t> rows(static_cast<size_t>(B));
    for (int64_t r = 0; r < B; ++r) rows[size_t(r)] = r;
    auto x = decode_fast(w_.llm, config_, b.embeds, std::vector<KvCache*>(size_t(B), &cache), rows);
    if (x.defined()) {
      cache.next_order += 1;
      cache.next_pos = cache.next_pos + 1;
      return logits(rms_norm(x, w_.llm.norm, config_.text.rms_norm_eps).select(1, 0));
    }
  }
  b.meta.order = torch::full({B, 1}, cache.next_order);
  b.meta.pos = cache.next_pos.view({B, 1}).clone();
  b.meta.kind = torch::full({B, 1}, int64_t(TokenKind::Text));
  b.meta.group = torch::full({B, 1}, int64_t(-1));
  auto out = forward(b, &cache);
  cache.next_order += 1;
  cache.next_pos = cache.next_pos + 1;
  return logits(out.hidden.select(1, 0));
}

torch::Tensor Vlm::decode_step(const torch::Tensor& ids, const std::vector<KvCache*>& caches) const {
  const int64_t B = ids.size(0);
  if (B != int64_t(caches.size()) || B == 0)
    throw Error("decode_step: " + std::to_string(B) + " ids for " + std::to_string(caches.size()) + " caches");
  for (auto* c : caches)
    if (c->next_pos.numel() != 1) throw Error("decode_step: each cache must hold one request");
  torch::Tensor x = embed_tokens(ids.view({B, 1}));
  torch::Tensor fast = decode_fast(w_.llm, config_, x, caches, std::vector<int64_t>(size_t(B), 0));
  if (fast.defined()) {
    x = fast;
  } else {
    // The LibTorch path: each row's [1,1] metadata and the RoPE tables for the rows' positions.
    std::vector<TokenMeta> metas;
    std::vector<torch::Tensor> pos;
    for (auto* c : caches) {
      TokenMeta m;
      m.order = torch::full({1, 1}, c->next_order);
      m.pos = c->next_pos.view({1, 1}).clone();
      m.kind = torch::full({1, 1}, int64_t(TokenKind::Text));
      m.group = torch::full({1, 1}, int64_t(-1));
      pos.push_back(m.pos);
      metas.push_back(std::move(m));
    }
    RopeTables rope = rope_tables(torch::cat(pos, 0), config_.text.head_dim(), config_.text.rope_theta);
    std::vector<LayerCache*> layer(B);
    for (int l = 0; l < config_.num_layers(); ++l) {
      for (int64_t b = 0; b < B; ++b) layer[b] = &caches[b]->layers[l];
      x = llama_layer_rows(w_.llm.layers[l], config_.text, config_.reducer.mask(), x, metas, rope, layer);
    }
  }
  for (auto* c : caches) {
    c->next_order += 1;
    c->next_pos = c->next_pos + 1;
  }
  return logits(rms_norm(x, w_.llm.norm, config_.text.rms_norm_eps).select(1, 0));
}

}  // namespace victor
