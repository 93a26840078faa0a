// The reducer table and what every row shares: spec parsing, the table, the formulas written once
// for every kind (each row supplies its rows, layer and parameters), config.json, the CLI's older
// Victor flags, and the compute defaults.
#include "victor/reducer.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include "reduce/kinds.h"
#include "victor/config.h"
#include "victor/error.h"

#ifndef VICTOR_SPEC_ONLY
#include "model/internal.h"
#include "victor/model.h"
#endif

namespace victor {

std::string to_string(RegisterMask m) {
  return m == RegisterMask::Causal ? "causal" : "registers_only";
}

RegisterMask register_mask_from_string(const std::string& s) {
  if (s == "causal") return RegisterMask::Causal;
  if (s == "registers_only") return RegisterMask::RegistersOnly;
  throw Error("register_mask: unknown value '" + s + "' (expected causal or registers_only)");
}

int full_visual_rows(const ModelConfig& c) {
  return c.vision.num_patches() + (c.vision_feature_select_strategy == "full" ? 1 : 0);
}

void require_reducer(bool ok, const std::string& spec, const std::string& why) {
  if (!ok) throw Error("token reducer '" + spec + "': " + why);
}

// ---- Spec arguments ----

void ReducerArgs::fail(const std::string& why) const { throw Error("--reducer '" + spec_ + "': " + why); }

std::string ReducerArgs::take(const std::string& k, const std::string& what) {
  auto it = kv_.find(k);
  if (it == kv_.end()) fail("missing " + what);
  std::string v = it->second;
  kv_.erase(it);
  return v;
}

int ReducerArgs::integer(const std::string& k, const std::string& what, int lo, int hi) {
  std::string v = take(k, what);
  char* end = nullptr;
  errno = 0;
  long x = std::strtol(v.c_str(), &end, 10);
  if (end == v.c_str() || *end || errno) fail(what + " '" + v + "' is not an integer");
  if (x < lo || x > hi)
    fail(what + " = " + v + " is out of range [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return int(x);
}

double ReducerArgs::real(const std::string& k, const std::string& what, double lo, double hi) {
  std::string v = take(k, what);
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (end == v.c_str() || *end || !std::isfinite(x)) fail(what + " '" + v + "' is not a number");
  if (x <= lo || x > hi)
    fail(what + " = " + v + " must be in (" + std::to_string(lo).substr(0, 3) + ", " + std::to_string(hi).substr(0, 3) +
         "]");
  return x;
}

void ReducerArgs::done() const {
  if (!kv_.empty()) fail("unknown parameter '" + (kv_.begin()->first.empty() ? kv_.begin()->second : kv_.begin()->first) + "'");
}

namespace {

// "k=2,keep=0.5" -> {k: "2", keep: "0.5"}; a bare value ("4") is stored under "".
std::map<std::string, std::string> parse_params(const std::string& spec, const std::string& body) {
  ReducerArgs a(spec, {});
  std::map<std::string, std::string> out;
  if (!body.empty() && body.back() == ',') a.fail("empty parameter (a trailing comma)");
  std::stringstream ss(body);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) a.fail("empty parameter");
    auto eq = item.find('=');
    std::string key = eq == std::string::npos ? "" : item.substr(0, eq);
    std::string val = eq == std::string::npos ? item : item.substr(eq + 1);
    if (val.empty()) a.fail("parameter '" + key + "' has no value");
    if (!out.emplace(key, val).second) a.fail(key.empty() ? "more than one bare value" : "parameter '" + key + "' given twice");
  }
  return out;
}

// The table, built-in kinds first (constructed on first use, so a test's static registration
// finds it whatever the order of initialisation).
std::map<std::string, ReducerKindEntry>& table() {
  static std::map<std::string, ReducerKindEntry> t = [] {
    std::map<std::string, ReducerKindEntry> m;
    for (auto& e : builtin_reducer_kinds()) m.emplace(e.kind, e);
    return m;
  }();
  return t;
}

std::string usage_list() {
  std::string s;
  for (const auto& u : reducer_usages()) s += (s.empty() ? "" : ", ") + u;
  return s;
}

}  // namespace

bool register_reducer(ReducerKindEntry entry) {
  if (entry.kind.empty() || !entry.parse) throw Error("register_reducer: a kind needs a name and a parser");
  const std::string kind = entry.kind;
  if (!table().emplace(kind, std::move(entry)).second)
    throw Error("register_reducer: a token reducer named '" + kind + "' is already registered");
  return true;
}

std::vector<std::string> reducer_usages() {
  std::vector<std::string> out;
  for (const auto& [k, e] : table()) out.push_back(e.usage);
  return out;
}

Reducer Reducer::parse(const std::string& spec) {
  ReducerArgs none_args(spec, {});
  if (spec.empty()) none_args.fail("empty (give one of: " + usage_list() + ")");
  auto colon = spec.find(':');
  std::string kind = spec.substr(0, colon);
  if (kind == "plain") kind = "none";
  auto it = table().find(kind);
  if (it == table().end())
    none_args.fail("unknown reducer '" + kind + "' (expected " + usage_list() + ")");
  ReducerArgs args(spec, colon == std::string::npos ? std::map<std::string, std::string>{}
                                                    : parse_params(spec, spec.substr(colon + 1)));
  if (colon != std::string::npos && args.empty()) args.fail("nothing after ':'");
  Reducer r = it->second.parse(args);
  args.done();
  return r;
}

// ---- Row defaults ----

void ReducerOps::validate(const ModelConfig&) const {}
int ReducerOps::visual_rows(const ModelConfig& c) const { return full_visual_rows(c); }
std::optional<int> ReducerOps::grid_side(const ModelConfig& c) const { return c.vision.image_size / c.vision.patch_size; }

// ---- What every kind shares ----

int Reducer::drop_layer(const ModelConfig& c) const {
  const int L = c.num_layers();
  const auto r = reduce_layer(c);
  return r && kept_visual(visual_rows(c)) == 0 ? std::min(*r, L) : L;
}

int64_t Reducer::rows_past_reduction(const ModelConfig& c, int64_t n) const {
  const auto r = reduce_layer(c);
  const bool reduced = r && *r < c.num_layers();
  return inserted_rows() + (reduced ? kept_visual(int(n)) : n);
}

int64_t Reducer::kv_rows(const ModelConfig& c, int64_t text, int64_t images, int64_t generated) const {
  return kv_rows(c, text, std::vector<int64_t>(size_t(std::max<int64_t>(images, 0)), visual_rows(c)), generated);
}

double Reducer::prefill_flops(const ModelConfig& c, int64_t text, int64_t images) const {
  return prefill_flops(c, text, std::vector<int64_t>(size_t(std::max<int64_t>(images, 0)), visual_rows(c)), images);
}

// Layers before the reduction hold every visual row (the causal mask keeps their keys; Victor's
// registers_only frees them after the prefill, as no later token may read them), the layers from
// it on the kept ones; inserted rows and text are in every layer.
int64_t Reducer::kv_rows(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual,
                         int64_t generated) const {
  const int64_t L = c.num_layers(), base = text + generated, images = int64_t(visual.size());
  const int64_t r = std::min<int64_t>(reduce_layer(c).value_or(int(L)), L), m = inserted_rows();
  int64_t N = 0, kept = 0;
  for (int64_t n : visual) N += n, kept += kept_visual(int(n));
  const int64_t late = base + images * m + kept;
  const int64_t early = base + images * m + (mask() == RegisterMask::Causal ? N : 0);
  return r * early + (L - r) * late;
}

double Reducer::prefill_flops(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual,
                              int64_t views) const {
  const auto& t = c.text;
  const double d = t.hidden_size, H = t.num_attention_heads, Hkv = t.num_key_value_heads;
  const double hd = t.head_dim(), F = t.intermediate_size;
  auto layer = [&](double T) {
    return 2 * T * (d * H * hd + 2 * d * Hkv * hd + H * hd * d + 3 * d * F) + 2 * T * T * H * hd;
  };
  const auto& v = c.vision;
  const double Tv = v.num_patches() + 1, D = v.hidden_size, I = v.intermediate_size;
  const int64_t images = int64_t(visual.size());
  // The tower runs on every patch of every view; the projector on every selected feature (a
  // reducer's own compute after it, per image, on top).
  double vision = views * (c.vision_layers_needed() * (2 * Tv * (4 * D * D + 2 * D * I) + 4 * Tv * Tv * D) +
                           2.0 * full_visual_rows(c) * (D * d + d * d));
  if (const double own = ops().vision_flops(c); own != 0) vision += images * own;
  const int64_t L = c.num_layers(), r = std::min<int64_t>(reduce_layer(c).value_or(int(L)), L), m = inserted_rows();
  int64_t N = 0, kept = 0;
  for (int64_t n : visual) N += n, kept += kept_visual(int(n));
  return vision + r * layer(double(text + N + images * m)) + (L - r) * layer(double(text + kept + images * m));
}

Reducer Reducer::from_json(const nlohmann::json& j, const std::string& src) {
  auto int_key = [&](const char* key, int fallback) {
    if (!j.contains(key)) return fallback;
    if (!j[key].is_number_integer()) throw Error(src + ": '" + key + "' must be an integer");
    return j[key].get<int>();
  };
  const int pool_factor = int_key("visual_pool", 1);
  const int m = int_key("num_registers", 0);
  const int k = int_key("summary_layers", -1);
  if (m < 0) throw Error(src + ": 'num_registers' must be >= 0");
  if (k < -1) throw Error(src + ": 'summary_layers' must be >= 0 (or -1: never drop)");
  if (pool_factor < 1) throw Error(src + ": 'visual_pool' must be >= 1");
  RegisterMask mask = RegisterMask::Causal;
  if (j.contains("register_mask")) {
    if (!j["register_mask"].is_string()) throw Error(src + ": 'register_mask' must be a string");
    mask = register_mask_from_string(j["register_mask"].get<std::string>());
  }
  const int L = j.contains("text_config") && j["text_config"].is_object() &&
                        j["text_config"].contains("num_hidden_layers") &&
                        j["text_config"]["num_hidden_layers"].is_number_integer()
                    ? j["text_config"]["num_hidden_layers"].get<int>()
                    : 32;
  // Victor is on when it inserts registers or drops visual rows before the last layer; "m = 0,
  // k = L" (written by earlier versions for plain models) is the plain model.
  const bool victor_on = m > 0 || (k >= 0 && k != L);  // k > L stays, for validate() to refuse
  std::vector<Reducer> found;
  if (victor_on) found.push_back(victor({m, k < 0 ? std::nullopt : std::optional<int>(k), mask}));
  if (pool_factor > 1) found.push_back(pool({pool_factor}));
  if (j.contains("token_reducer")) {
    if (!j["token_reducer"].is_string()) throw Error(src + ": 'token_reducer' must be a spec string");
    try {
      found.push_back(parse(j["token_reducer"].get<std::string>()));
    } catch (const Error& e) {
      throw Error(src + ": token_reducer: " + e.what());
    }
  }
  if (found.size() > 1)
    throw Error(src + ": declares more than one token reducer (" + found[0].spec() + " and " +
                found[1].spec() + "); a model has one");
  return found.empty() ? none() : found[0];
}

#ifndef VICTOR_SPEC_ONLY
// ---- Compute defaults ----

torch::Tensor ReducerOps::keep_rows(const TokenMeta& meta, const torch::Tensor&) const {
  return meta.kind.eq(int64_t(TokenKind::Text)) | meta.kind.eq(int64_t(TokenKind::Register));
}

torch::Tensor ReducerOps::select_features(const ModelConfig& c, const torch::Tensor& hidden, const VisionLastBlock&,
                                          torch::Tensor*) const {
  return c.vision_feature_select_strategy == "default" ? hidden.narrow(1, 1, hidden.size(1) - 1) : hidden;
}

torch::Tensor ReducerOps::after_projector(const ModelConfig&, const ReducerWeights&, const torch::Tensor& x) const {
  return x;
}

torch::Tensor ReducerOps::inserted(const ReducerWeights&) const {
  throw Error("token reducer '" + spec() + "' inserts no rows");
}

torch::Tensor ReducerOps::pack_views(const ModelConfig&, const torch::Tensor&, const ImageLayout&,
                                     const torch::Tensor&) const {
  throw Error("token reducer '" + spec() + "': its tokens are not on the patch grid and it packs no LLaVA-NeXT views");
}
#endif

}  // namespace victor
