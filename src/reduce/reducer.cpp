#include "victor/reducer.h"

#include <cmath>
#include <cstdlib>
#include <map>
#include <sstream>

#include "victor/config.h"
#include "victor/error.h"

namespace victor {

std::string to_string(RegisterMask m) {
  return m == RegisterMask::Causal ? "causal" : "registers_only";
}

RegisterMask register_mask_from_string(const std::string& s) {
  if (s == "causal") return RegisterMask::Causal;
  if (s == "registers_only") return RegisterMask::RegistersOnly;
  throw Error("register_mask: unknown value '" + s + "' (expected causal or registers_only)");
}

Reducer Reducer::victor(VictorParams p) { return make(ReducerKind::Victor, &Reducer::victor_, p); }
Reducer Reducer::pool(PoolParams p) { return make(ReducerKind::Pool, &Reducer::pool_, p); }
Reducer Reducer::fastv(FastVParams p) { return make(ReducerKind::FastV, &Reducer::fastv_, p); }
Reducer Reducer::visionzip(VisionZipParams p) { return make(ReducerKind::VisionZip, &Reducer::visionzip_, p); }
Reducer Reducer::resampler(ResamplerParams p) { return make(ReducerKind::Resampler, &Reducer::resampler_, p); }

namespace {

[[noreturn]] void bad_spec(const std::string& spec, const std::string& why) {
  throw Error("--reducer '" + spec + "': " + why);
}

// "k=2,keep=0.5" -> {k: "2", keep: "0.5"}; a bare value ("4") is stored under "".
std::map<std::string, std::string> parse_params(const std::string& spec, const std::string& body) {
  std::map<std::string, std::string> out;
  if (!body.empty() && body.back() == ',') bad_spec(spec, "empty parameter (a trailing comma)");
  std::stringstream ss(body);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) bad_spec(spec, "empty parameter");
    auto eq = item.find('=');
    std::string key = eq == std::string::npos ? "" : item.substr(0, eq);
    std::string val = eq == std::string::npos ? item : item.substr(eq + 1);
    if (val.empty()) bad_spec(spec, "parameter '" + key + "' has no value");
    if (!out.emplace(key, val).second)
      bad_spec(spec, key.empty() ? "more than one bare value" : "parameter '" + key + "' given twice");
  }
  return out;
}

struct Params {
  std::string spec;
  std::map<std::string, std::string> kv;

  bool has(const std::string& k) const { return kv.count(k) > 0; }
  std::string take(const std::string& k, const std::string& what) {
    auto it = kv.find(k);
    if (it == kv.end()) bad_spec(spec, "missing " + what);
    std::string v = it->second;
    kv.erase(it);
    return v;
  }
  int integer(const std::string& k, const std::string& what, int lo, int hi) {
    std::string v = take(k, what);
    char* end = nullptr;
    errno = 0;
    long x = std::strtol(v.c_str(), &end, 10);
    if (end == v.c_str() || *end || errno) bad_spec(spec, what + " '" + v + "' is not an integer");
    if (x < lo || x > hi)
      bad_spec(spec, what + " = " + v + " is out of range [" + std::to_string(lo) + ", " +
                         std::to_string(hi) + "]");
    return int(x);
  }
  double real(const std::string& k, const std::string& what, double lo, double hi) {
    std::string v = take(k, what);
    char* end = nullptr;
    double x = std::strtod(v.c_str(), &end);
    if (end == v.c_str() || *end || !std::isfinite(x)) bad_spec(spec, what + " '" + v + "' is not a number");
    if (x <= lo || x > hi)
      bad_spec(spec, what + " = " + v + " must be in (" + std::to_string(lo).substr(0, 3) + ", " +
                         std::to_string(hi).substr(0, 3) + "]");
    return x;
  }
  void done() const {
    if (!kv.empty())
      bad_spec(spec, "unknown parameter '" + (kv.begin()->first.empty() ? kv.begin()->second : kv.begin()->first) + "'");
  }
};

std::string num(double x) {
  std::ostringstream o;
  o << x;
  return o.str();
}

}  // namespace

Reducer Reducer::parse(const std::string& spec) {
  if (spec.empty()) bad_spec(spec, "empty (give none, victor:m=M,k=K, pool:P, fastv:k=K,keep=R, visionzip:... or resampler:N)");
  auto colon = spec.find(':');
  std::string kind = spec.substr(0, colon);
  Params p{spec, colon == std::string::npos ? std::map<std::string, std::string>{}
                                            : parse_params(spec, spec.substr(colon + 1))};
  if (colon != std::string::npos && p.kv.empty()) bad_spec(spec, "nothing after ':'");
  constexpr int big = 1 << 20;
  // Learned rows (registers, latents) are allocated as [count, hidden]: bounded as the
  // --registers flag is, so a spec cannot ask for gigabytes before a shape check sees it.
  constexpr int max_rows = 4096;
  if (kind == "none" || kind == "plain") {
    p.done();
    return none();
  }
  if (kind == "victor") {
    VictorParams v;
    v.registers = p.integer("m", "m (registers per image)", 0, max_rows);
    v.summary_layers = p.integer("k", "k (summary layers)", 0, big);
    if (p.has("mask")) v.mask = [&] {
      std::string m = p.take("mask", "mask");
      if (m != "causal" && m != "registers_only")
        bad_spec(spec, "mask '" + m + "' is not causal or registers_only");
      return register_mask_from_string(m);
    }();
    p.done();
    return victor(v);
  }
  if (kind == "pool") {
    PoolParams q;
    q.factor = p.integer(p.has("") ? "" : "p", "the pool factor p (pool:4)", 2, 64);
    p.done();
    return pool(q);
  }
  if (kind == "fastv") {
    FastVParams f;
    f.layer = p.integer("k", "k (the layer whose input is pruned, >= 1)", 1, big);
    f.keep = p.real("keep", "keep (share of visual tokens kept)", 0.0, 1.0);
    p.done();
    return fastv(f);
  }
  if (kind == "visionzip") {
    VisionZipParams z;
    z.dominant = p.integer("dominant", "dominant (patches kept)", 1, big);
    z.contextual = p.integer("contextual", "contextual (merged tokens)", 0, big);
    p.done();
    return visionzip(z);
  }
  if (kind == "resampler") {
    ResamplerParams q;
    q.latents = p.integer(p.has("") ? "" : "latents", "latents (learned queries)", 1, max_rows);
    p.done();
    return resampler(q);
  }
  bad_spec(spec, "unknown reducer '" + kind + "' (expected none, victor:m=M,k=K[,mask=...], pool:P, "
                 "fastv:k=K,keep=S, visionzip:dominant=D,contextual=C or resampler:latents=N)");
}

template <class P>
const P& Reducer::params_of(ReducerKind kind, P Reducer::*field, const char* name) const {
  if (kind_ != kind) throw Error("reducer " + spec() + " is not " + name);
  return this->*field;
}
const VictorParams& Reducer::victor_params() const { return params_of(ReducerKind::Victor, &Reducer::victor_, "victor"); }
const PoolParams& Reducer::pool_params() const { return params_of(ReducerKind::Pool, &Reducer::pool_, "pool"); }
const FastVParams& Reducer::fastv_params() const { return params_of(ReducerKind::FastV, &Reducer::fastv_, "fastv"); }
const VisionZipParams& Reducer::visionzip_params() const {
  return params_of(ReducerKind::VisionZip, &Reducer::visionzip_, "visionzip");
}
const ResamplerParams& Reducer::resampler_params() const {
  return params_of(ReducerKind::Resampler, &Reducer::resampler_, "resampler");
}

std::string Reducer::spec() const {
  switch (kind_) {
    case ReducerKind::None: return "none";
    case ReducerKind::Victor: {
      std::string s = "victor:m=" + std::to_string(victor_.registers);
      if (victor_.summary_layers) s += ",k=" + std::to_string(*victor_.summary_layers);
      if (victor_.mask != RegisterMask::Causal) s += ",mask=" + to_string(victor_.mask);
      return s;
    }
    case ReducerKind::Pool: return "pool:" + std::to_string(pool_.factor);
    case ReducerKind::FastV: return "fastv:k=" + std::to_string(fastv_.layer) + ",keep=" + num(fastv_.keep);
    case ReducerKind::VisionZip:
      return "visionzip:dominant=" + std::to_string(visionzip_.dominant) +
             ",contextual=" + std::to_string(visionzip_.contextual);
    case ReducerKind::Resampler: return "resampler:latents=" + std::to_string(resampler_.latents);
  }
  return "?";
}

std::string Reducer::name() const {
  switch (kind_) {
    case ReducerKind::None: return "plain";
    case ReducerKind::Victor: {
      std::string s = "victor m=" + std::to_string(victor_.registers);
      s += " k=" + (victor_.summary_layers ? std::to_string(*victor_.summary_layers) : std::string("L"));
      if (victor_.mask != RegisterMask::Causal) s += " " + to_string(victor_.mask);
      return s;
    }
    case ReducerKind::Pool: return "pool " + std::to_string(pool_.factor) + "x" + std::to_string(pool_.factor);
    case ReducerKind::FastV: return "fastv k=" + std::to_string(fastv_.layer) + " keep=" + num(fastv_.keep);
    case ReducerKind::VisionZip:
      return "visionzip " + std::to_string(visionzip_.dominant) + "+" + std::to_string(visionzip_.contextual);
    case ReducerKind::Resampler: return "resampler " + std::to_string(resampler_.latents);
  }
  return "?";
}

namespace {
int full_visual_rows(const ModelConfig& c) {
  return c.vision.num_patches() + (c.vision_feature_select_strategy == "full" ? 1 : 0);
}
void require(bool ok, const std::string& spec, const std::string& why) {
  if (!ok) throw Error("token reducer '" + spec + "': " + why);
}
}  // namespace

void Reducer::validate(const ModelConfig& c) const {
  const int L = c.num_layers(), side = c.vision.image_size / c.vision.patch_size;
  const std::string s = spec();
  if (c.is_next())
    require(kind_ != ReducerKind::Resampler, s,
            "is not implemented on LLaVA-NeXT yet (none, victor, fastv, pool and visionzip are)");
  switch (kind_) {
    case ReducerKind::None: return;
    case ReducerKind::Victor:
      require(victor_.registers >= 0, s, "num_registers must be >= 0");
      require(!victor_.summary_layers || (*victor_.summary_layers >= 0 && *victor_.summary_layers <= L), s,
              "summary_layers k must be between 0 and the " + std::to_string(L) + " decoder layers");
      return;
    case ReducerKind::Pool:
      require(pool_.factor >= 2 && side % pool_.factor == 0, s,
              "visual_pool must be >= 2 and divide the " + std::to_string(side) + " patches per side");
      require(c.vision_feature_select_strategy == "default", s,
              "pooling needs vision_feature_select_strategy 'default' (no class token)");
      return;
    case ReducerKind::FastV:
      require(fastv_.layer >= 1 && fastv_.layer < L, s,
              "k must be between 1 and " + std::to_string(L - 1) + " (the model has " +
                  std::to_string(L) + " decoder layers; layer k-1 ranks the tokens)");
      require(fastv_.keep > 0 && fastv_.keep <= 1, s, "keep must be in (0, 1]");
      return;
    case ReducerKind::VisionZip:
      require(c.vision_feature_select_strategy == "default", s,
              "needs vision_feature_select_strategy 'default' (the class token ranks the patches)");
      require(visionzip_.dominant >= 1 && visionzip_.contextual >= 0 &&
                  visionzip_.dominant + visionzip_.contextual <= c.vision.num_patches(),
              s, "dominant + contextual must be at most the " + std::to_string(c.vision.num_patches()) +
                     " patches (and dominant >= 1)");
      require(visionzip_.contextual == 0 || visionzip_.dominant + visionzip_.contextual < c.vision.num_patches(), s,
              "contextual tokens need patches left to merge");
      return;
    case ReducerKind::Resampler:
      require(resampler_.latents >= 1, s, "latents must be >= 1");
      require(c.text.hidden_size % c.text.num_attention_heads == 0, s,
              "needs text_config.hidden_size divisible by its attention heads");
      return;
  }
}

int Reducer::visual_rows(const ModelConfig& c) const {
  switch (kind_) {
    case ReducerKind::Pool: return c.vision.num_patches() / (pool_.factor * pool_.factor);
    case ReducerKind::VisionZip: return visionzip_.dominant + visionzip_.contextual;
    case ReducerKind::Resampler: return resampler_.latents;
    default: return full_visual_rows(c);
  }
}

int Reducer::inserted_rows() const { return kind_ == ReducerKind::Victor ? victor_.registers : 0; }

int Reducer::drop_layer(const ModelConfig& c) const {
  const int L = c.num_layers();
  if (kind_ != ReducerKind::Victor || !victor_.summary_layers) return L;
  return std::min(*victor_.summary_layers, L);
}

std::optional<int> Reducer::prune_layer() const {
  if (kind_ != ReducerKind::FastV) return std::nullopt;
  return fastv_.layer;
}

int Reducer::kept_after_prune(int n) const {
  if (kind_ != ReducerKind::FastV || n == 0) return n;
  return std::max(1, std::min(n, int(std::lround(fastv_.keep * n))));
}

int Reducer::rows_past_reduction(const ModelConfig& c) const {
  if (prune_layer()) return kept_after_prune(visual_rows(c)) + inserted_rows();
  if (drop_layer(c) < c.num_layers()) return inserted_rows();
  return visual_rows(c) + inserted_rows();
}

RegisterMask Reducer::mask() const {
  return kind_ == ReducerKind::Victor ? victor_.mask : RegisterMask::Causal;
}

int64_t Reducer::kv_rows(const ModelConfig& c, int64_t text, int64_t images, int64_t generated) const {
  return kv_rows(c, text, std::vector<int64_t>(size_t(std::max<int64_t>(images, 0)), visual_rows(c)), generated);
}

double Reducer::prefill_flops(const ModelConfig& c, int64_t text, int64_t images) const {
  return prefill_flops(c, text, std::vector<int64_t>(size_t(std::max<int64_t>(images, 0)), visual_rows(c)), images);
}

int64_t Reducer::kv_rows(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual,
                         int64_t generated) const {
  const int64_t L = c.num_layers(), base = text + generated, images = int64_t(visual.size());
  int64_t N = 0, kept = 0;  // visual rows of all images, and those past FastV's prune
  for (int64_t n : visual) N += n, kept += kept_after_prune(int(n));
  switch (kind_) {
    case ReducerKind::Victor: {
      const int64_t k = drop_layer(c), m = victor_.registers;
      const int64_t late = base + images * m;
      const int64_t early = victor_.mask == RegisterMask::Causal ? late + N : late;
      return k * early + (L - k) * late;
    }
    case ReducerKind::FastV: {
      const int64_t K = std::min<int64_t>(fastv_.layer, L);
      return K * (base + N) + (L - K) * (base + kept);
    }
    default: return L * (base + N);
  }
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
  // The tower runs on every patch of every view; the projector on every selected feature (pooling
  // follows it).
  double vision = views * (c.vision_layers_needed() * (2 * Tv * (4 * D * D + 2 * D * I) + 4 * Tv * Tv * D) +
                           2.0 * full_visual_rows(c) * (D * d + d * d));
  if (kind_ == ReducerKind::Resampler) {  // q, o and the 4d MLP on the latents; k, v on the tokens
    const double Q = resampler_.latents, Nf = full_visual_rows(c);
    vision += images * (2 * Q * (2 * d * d + 8 * d * d) + 2 * Nf * 2 * d * d + 4 * Q * Nf * d);
  }
  const int64_t L = c.num_layers();
  int64_t N = 0, kept = 0;
  for (int64_t n : visual) N += n, kept += kept_after_prune(int(n));
  switch (kind_) {
    case ReducerKind::Victor: {
      const int64_t k = drop_layer(c), m = victor_.registers;
      return vision + k * layer(double(text + N + images * m)) + (L - k) * layer(double(text + images * m));
    }
    case ReducerKind::FastV: {
      const int64_t K = std::min<int64_t>(fastv_.layer, L);
      return vision + K * layer(double(text + N)) + (L - K) * layer(double(text + kept));
    }
    default: return vision + L * layer(double(text + N));
  }
}

void Reducer::to_json(nlohmann::json& j) const {
  switch (kind_) {
    case ReducerKind::None: return;
    case ReducerKind::Victor:
      j["num_registers"] = victor_.registers;
      j["summary_layers"] = victor_.summary_layers ? *victor_.summary_layers : -1;
      j["register_mask"] = to_string(victor_.mask);
      return;
    case ReducerKind::Pool: j["visual_pool"] = pool_.factor; return;
    default: j["token_reducer"] = spec(); return;
  }
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

Reducer ReducerChoice::resolve(const Reducer& current) const {
  const bool victor_flags = registers >= 0 || summary_layers != -2 || !mask.empty();
  if (!spec.empty()) {
    if (victor_flags || pool > 0)
      throw Error("--reducer '" + spec + "' and --registers/--summary-layers/--register-mask/--visual-pool: "
                  "give one or the other");
    return Reducer::parse(spec);
  }
  if (pool > 0) {
    if (victor_flags) throw Error("--visual-pool and --registers/--summary-layers: a model has one token reducer");
    return pool > 1 ? Reducer::pool({pool}) : Reducer::none();
  }
  if (!victor_flags) return current;
  VictorParams v{0, std::nullopt, RegisterMask::Causal};
  if (current.kind() == ReducerKind::Victor) v = current.victor_params();
  if (registers >= 0) v.registers = registers;
  if (summary_layers == -1) v.summary_layers = std::nullopt;
  else if (summary_layers >= 0) v.summary_layers = summary_layers;
  else if (summary_layers != -2) throw Error("--summary-layers must be >= 0 (or -1: never drop)");
  if (!mask.empty()) v.mask = register_mask_from_string(mask);
  if (v.registers == 0 && !v.summary_layers) return Reducer::none();
  return Reducer::victor(v);
}

}  // namespace victor
