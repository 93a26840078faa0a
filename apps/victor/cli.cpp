// What the commands share: option helpers and validators, the one model-loading step, threads,
// and the --nproc launcher.
#include "cli.h"

#include <cerrno>
#include <cmath>
#include <fstream>
#include <thread>

namespace victor::cli {

int default_threads() {
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  return int(std::max(1u, std::thread::hardware_concurrency()));
}

void add_kv_dtype_option(CLI::App* c, std::string& kv) {
  c->add_option("--kv-dtype", kv,
                "KV-cache storage: f32 | bf16 (half the bytes; attention still computes in float32)")
      ->check(CLI::IsMember({"f32", "bf16"}))
      ->capture_default_str();
}

void add_dtype_option(CLI::App* c, std::string& dtype, bool with_auto) {
  c->add_option("--dtype", dtype,
                std::string("Weight storage: ") + (with_auto ? "auto (as the checkpoint stores them) | " : "") +
                    "f32 | bf16 | int8 (per-row symmetric) | int4 (groups of 32, float16 scales: Q4_0's bits), "
                    "for every part, or per part as PART=DTYPE,... with PART llm | vision | projector "
                    "(e.g. llm=int4,vision=bf16,projector=bf16; parts left out keep theirs)")
      ->check(
          [with_auto](const std::string& v) {
            if (!with_auto && v == "auto") return std::string("auto is not a storage here");
            try {
              weight_format_from_string(v);
            } catch (const std::exception& e) {
              std::string m = e.what();  // CLI11 names the option itself
              if (m.rfind("--dtype", 0) == 0) m.erase(0, m.find_first_not_of(": ", 7));
              return m;
            }
            return std::string();
          },
          "DTYPE")
      ->capture_default_str();
}

void set_threads(int n) {
  at::set_num_threads(n);
  at::set_num_interop_threads(1);
}

std::vector<std::string> read_lines(const std::string& path) {
  std::vector<std::string> out;
  std::istringstream in(read_file(path, FileKind::Dataset));
  std::string l;
  while (std::getline(in, l))
    if (!l.empty()) out.push_back(l);
  return out;
}

void add_overwrite_flag(CLI::App* c, bool& overwrite) {
  c->add_flag("--overwrite", overwrite,
              "Replace the model already in --out (without it such a folder is refused); a kill mid-write leaves "
              "the old model, the new one, or a folder that load refuses as incomplete, never a mix");
}

// CLI11's Range and PositiveNumber compare, and NaN fails no comparison: `--temperature nan`
// passed them and surfaced as a raw LibTorch error. Every floating-point option also gets this.
const CLI::Validator kFinite(
    [](std::string& v) -> std::string {
      try {
        size_t used = 0;
        const double d = std::stod(v, &used);
        if (!std::isfinite(d)) return "'" + v + "' is not a finite number";
      } catch (const std::exception&) {
      }
      return {};
    },
    "FINITE");

// An option given as an empty string (`--reducer ''`) is a mistake, not "use the default".
const CLI::Validator kNonEmpty([](std::string& v) -> std::string { return v.empty() ? "empty value" : ""; }, "");

// CLI11 accepts 18446744073709551616 for a uint64_t (it wraps): a seed is checked by hand.
const CLI::Validator kUint64(
    [](std::string& v) -> std::string {
      if (v.empty() || v.find_first_not_of("0123456789") != std::string::npos)
        return "'" + v + "' is not a non-negative integer";
      errno = 0;
      std::strtoull(v.c_str(), nullptr, 10);
      if (errno == ERANGE) return "'" + v + "' is larger than 18446744073709551615";
      return {};
    },
    "");

// Every option of every command: no empty values (`--reducer ''`, `--batch 1,,2`), and seeds
// within 64 bits.
void check_all_options(CLI::App* app) {
  for (CLI::Option* o : app->get_options()) {
    if (o->get_type_size() == 0) continue;  // a flag
    o->check(kNonEmpty);
    if (o->get_name() == "--seed") o->check(kUint64);
  }
  for (CLI::App* sub : app->get_subcommands([](CLI::App*) { return true; })) check_all_options(sub);
}

// CLI11 drops empty items from comma lists (`--batch 1,,2` became 1,2): the names of the list
// options, so main can refuse such a value before parsing.
void list_option_names(CLI::App* app, std::set<std::string>& names) {
  for (CLI::Option* o : app->get_options())
    if (o->get_delimiter() != '\0') names.insert(o->get_name());
  for (CLI::App* sub : app->get_subcommands([](CLI::App*) { return true; })) list_option_names(sub, names);
}

// Throws CLI's validation error for a comma list with an empty item.
void refuse_empty_list_items(CLI::App* app, int argc, char** argv) {
  std::set<std::string> lists;
  list_option_names(app, lists);
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], name = a, value;
    if (auto eq = a.find('='); a.rfind("--", 0) == 0 && eq != std::string::npos) {
      name = a.substr(0, eq);
      value = a.substr(eq + 1);
    } else if (i + 1 < argc) {
      value = argv[i + 1];
    }
    if (!lists.count(name)) continue;
    if (value.empty() || value.front() == ',' || value.back() == ',' || value.find(",,") != std::string::npos)
      throw CLI::ValidationError(name, "'" + value + "' has an empty item");
  }
}

std::string reducer_help() {
  std::string s = "Token reducer: ";
  const auto usages = reducer_usages();
  for (size_t i = 0; i < usages.size(); ++i) s += (i ? " | " : "") + usages[i];
  return s + " (default: the checkpoint's own)";
}

// --reducer and Victor's / pooling's shorthand flags, resolved against the model's own reducer.
// --nproc (workers on this machine) and --dist-timeout, as train and repro take them.
void add_distributed_options(CLI::App* c, int& nproc, int& timeout_seconds, const std::string& nproc_help) {
  c->add_option("--nproc", nproc, nproc_help)->check(CLI::Range(1, 256));
  c->add_option("--dist-timeout", timeout_seconds, "Seconds a rank waits for the others to join")
      ->check(CLI::Range(1, 86400))
      ->capture_default_str();
}

void add_reducer_options(CLI::App* c, ReducerChoice& r, bool pool_flag) {
  c->add_option("--reducer", r.spec, reducer_help());
  c->add_option("--registers", r.registers, "Victor shorthand: register tokens m per image (0 = none)")
      ->check(CLI::Range(0, 4096));
  c->add_option("--summary-layers", r.summary_layers,
                "Victor shorthand: k, visual tokens are dropped after layer k (-1 = never)")
      ->check(CLI::Range(-1, 1024));
  c->add_option("--register-mask", r.mask, "Victor shorthand: causal | registers_only")
      ->check(CLI::IsMember({"causal", "registers_only"}));
  if (pool_flag)
    c->add_option("--visual-pool", r.pool, "Pooling shorthand: pool the visual grid p x p (1 = none)")
        ->check(CLI::Range(1, 64));
}

void add_cap_options(CLI::App* c, ImageCap& cap) {
  c->add_option("--max-crops", cap.max_crops,
                "LLaVA-NeXT: crops per image at most (chooses among the checkpoint's pinpoints; 0 = no cap, "
                "and the base view alone when none fits)")
      ->check(CLI::Range(0, 64));
  c->add_option("--max-image-tokens", cap.max_image_tokens,
                "LLaVA-NeXT: rows per image in the language model at most (base view, crops, newlines; 0 = no cap)")
      ->check(CLI::Range(0, 1 << 20));
}

void apply_cap(Vlm& model, const ImageCap& cap) { model.set_image_cap(cap.max_crops, cap.max_image_tokens); }

// `--nproc N` under a launcher that already set RANK and WORLD_SIZE (torchrun, Slurm, an outer
// --nproc): the ranks it would start would be ignored, so it is refused. Workers it starts run
// without --nproc.
static void refuse_nproc_under_launcher(int nproc) {
  if (nproc <= 1) return;
  for (const char* v : {"RANK", "WORLD_SIZE"})
    if (const char* x = std::getenv(v); x && *x)
      throw Error("--nproc " + std::to_string(nproc) + " starts its own ranks, but " + v + "=" + x +
                  " is already set (a launcher's rank): unset RANK and WORLD_SIZE, or drop --nproc");
}

// `--nproc N` (train, repro): this process becomes the launcher of N workers, each the same
// command line without --nproc and with the torchrun variables set; the cores are shared out
// unless --threads says otherwise.
std::optional<int> launch_workers_if_asked(int argc, char** argv, int nproc, bool threads_given) {
  refuse_nproc_under_launcher(nproc);
  if (nproc <= 1 || std::getenv("RANK")) return std::nullopt;
  std::vector<std::string> args;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--nproc") {
      ++i;
      continue;
    }
    if (a.rfind("--nproc=", 0) == 0) continue;
    args.push_back(a);
  }
  if (!threads_given) args.push_back("--threads=" + std::to_string(std::max(1, default_threads() / nproc)));
  return launch_local_workers(nproc, args);
}

// Applies --reducer (or Victor's shorthand flags) to a loaded model. Trained registers stay when
// the count matches; a different count replaces them with new ones, said on stderr.
void apply_reducer(Vlm& model, const ReducerChoice& choice, const std::string& init,
                   const std::vector<std::string>& calibration, uint64_t seed) {
  if (!choice.any()) return;
  const Reducer r = choice.resolve(model.config().reducer);
  const auto& regs = model.weights().reducer.tensor("victor.registers");
  const int64_t have = regs.defined() ? regs.size(0) : 0, want = r.inserted_rows();
  if (have > 0 && want > 0 && have != want)
    std::cerr << "victor: " << r.spec() << " replaces the checkpoint's " << have << " trained registers with "
              << want << " new ones (" << init << " init)\n";
  model.set_reducer(r, seed, /*replace_registers=*/true);
  if (want > 0 && have != want && init == "mean") {
    if (calibration.empty()) throw Error("--register-init mean needs --calibration-images");
    std::vector<torch::Tensor> px;
    for (auto& p : calibration) px.push_back(prepare_image(load_image(p), model.config()).pixels);
    model.init_registers_mean(torch::cat(px, 0), seed);
  }
}

Vlm load_model(const std::string& dir, const std::string& dtype, const ReducerChoice& reducer, const ImageCap& cap,
               const std::string& register_init, const std::vector<std::string>& calibration, uint64_t seed) {
  Vlm model = Vlm::load(dir, weight_format_from_string(dtype));
  apply_reducer(model, reducer, register_init, calibration, seed);
  apply_cap(model, cap);
  return model;
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
  if (const VictorParams* have = current.victor_params()) v = *have;
  if (registers >= 0) v.registers = registers;
  if (summary_layers == -1) v.summary_layers = std::nullopt;
  else if (summary_layers >= 0) v.summary_layers = summary_layers;
  else if (summary_layers != -2) throw Error("--summary-layers must be >= 0 (or -1: never drop)");
  if (!mask.empty()) v.mask = register_mask_from_string(mask);
  if (v.registers == 0 && !v.summary_layers) return Reducer::none();
  return Reducer::victor(v);
}

}  // namespace victor::cli
