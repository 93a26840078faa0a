// The reducer table: spec parsing and arguments, the table of kinds, config.json's reducer keys and
// the CLI's older Victor flags. Nothing here reads a model's config (config.h holds a Reducer, so
// this file stays below it); what every row shares that does, the formulas written once and the
// rows' default hooks, is in shared.cpp.
#include "victor/reducer.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include "reduce/kinds.h"
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

}  // namespace victor
