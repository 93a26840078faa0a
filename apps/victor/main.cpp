// victor: the one CLI. It parses options and prints; the library holds the logic.
#include <cmath>
#include <CLI/CLI.hpp>
#include <signal.h>

#include <cerrno>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <set>
#include <thread>

#include "victor/bench.h"
#include "victor/bench_serve.h"
#include "victor/blas.h"
#include "victor/data.h"
#include "victor/distributed.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/eval.h"
#include "victor/generate.h"
#include "victor/kernels.h"
#include "victor/npy.h"
#include "victor/progress.h"
#include "victor/repro.h"
#include "victor/safetensors.h"
#include "victor/serve.h"
#include "victor/tokenizer.h"
#include "victor/train.h"

namespace fs = std::filesystem;
using namespace victor;

namespace {

// All cores, unless OMP_NUM_THREADS says otherwise (CI runs tests side by side).
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

void add_dtype_option(CLI::App* c, std::string& dtype, bool with_auto = true) {
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

// --- victor init ---
struct InitArgs {
  std::string preset = "tiny", out, corpus, tokenizer_type = "bpe", dtype = "f32";
  ReducerChoice reducer;
  int vocab = 512;
  uint64_t seed = 0;
  bool overwrite = false;
};

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

const char* const kReducerHelp =
    "Token reducer: none | victor:m=8,k=2[,mask=causal|registers_only] | pool:4 | fastv:k=2,keep=0.5 | "
    "visionzip:dominant=54,contextual=10 (default: the checkpoint's own)";

// --reducer and Victor's / pooling's shorthand flags, resolved against the model's own reducer.
// --nproc (workers on this machine) and --dist-timeout, as train and repro take them.
void add_distributed_options(CLI::App* c, int& nproc, int& timeout_seconds, const std::string& nproc_help) {
  c->add_option("--nproc", nproc, nproc_help)->check(CLI::Range(1, 256));
  c->add_option("--dist-timeout", timeout_seconds, "Seconds a rank waits for the others to join")
      ->check(CLI::Range(1, 86400))
      ->capture_default_str();
}

void add_reducer_options(CLI::App* c, ReducerChoice& r, bool pool_flag = true) {
  c->add_option("--reducer", r.spec, kReducerHelp);
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

// LLaVA-NeXT's image-token bill: a cap that picks fewer crops (a smaller pinpoint, or the base
// view alone). Run-time settings: they change which views are made, not the model.
struct ImageCap {
  int max_crops = 0, max_image_tokens = 0;
};

void add_cap_options(CLI::App* c, ImageCap& cap) {
  c->add_option("--max-crops", cap.max_crops,
                "LLaVA-NeXT: crops per image at most (chooses among the checkpoint's pinpoints; 0 = no cap, "
                "and the base view alone when none fits)")
      ->check(CLI::Range(0, 64));
  c->add_option("--max-image-tokens", cap.max_image_tokens,
                "LLaVA-NeXT: rows per image in the language model at most (base view, crops, newlines; 0 = no cap)")
      ->check(CLI::Range(0, 1 << 20));
}

void apply_cap(Vlm& model, const ImageCap& cap) {
  if (cap.max_crops == 0 && cap.max_image_tokens == 0) return;
  if (!model.config().is_next())
    throw Error("--max-crops / --max-image-tokens: this model is LLaVA-1.5 (one view per image); the cap applies to "
                "LLaVA-NeXT's AnyRes crops");
  auto& p = model.mutable_config().preprocess;
  p.max_crops = cap.max_crops;
  p.max_image_tokens = cap.max_image_tokens;
  model.config().validate();
}

void run_init(const InitArgs& a) {
  refuse_existing_model(a.out, a.overwrite, "--out");
  ModelConfig cfg = preset_config(a.preset);
  std::vector<std::string> corpus = a.corpus.empty() ? gridvqa_corpus() : read_lines(a.corpus);
  ModelFolderWrite write(a.out);
  int n = train_tokenizer(corpus, a.out, a.vocab, a.tokenizer_type);
  // The real-model presets keep their vocabulary (32064 rows, padded beyond the tokenizer as
  // llava-hf pads 32000 to 32064) so the embedding and LM head cost what they cost there; the
  // training presets shrink it to the tokenizer, padded to a multiple of 64 the same way.
  const int padded = ((n + 2 + 63) / 64) * 64;
  const bool real_shape = a.preset == "clip-l-1b" || a.preset == "llava-7b" || a.preset == "llava-next-7b";
  cfg.text.vocab_size = real_shape ? std::max(cfg.text.vocab_size, padded) : padded;
  cfg.image_token_index = n;
  cfg.pad_token_id = n + 1;
  cfg.reducer = a.reducer.resolve(Reducer::none());
  Vlm model = Vlm::random(cfg, a.seed, weight_format_from_string(a.dtype));
  model.save(a.out);
  write.commit();
  std::cout << "wrote " << a.preset << " model to " << a.out << ": "
            << model.parameter_count() / 1e6 << " M parameters (" << model.config().weight_format() << ", "
            << model.weight_bytes() / 1048576.0 << " MiB), vocabulary " << cfg.text.vocab_size
            << " (SentencePiece " << n << " + <image>, <pad>), "
            << cfg.visual_tokens_per_image() << " visual tokens per " << (cfg.is_next() ? "view" : "image");
  if (!cfg.reducer.is_none()) std::cout << ", token reducer " << cfg.reducer.spec();
  std::cout << "\n";
}

// --- victor generate ---
struct GenerateArgs {
  ImageCap cap;
  std::string model, prompt, dump_logits, register_init = "random", dtype = "auto", kv_dtype = "f32";
  std::vector<std::string> images, calibration;
  SamplingOptions sampling;
  int threads = default_threads();
  ReducerChoice reducer;
  bool stats = false;
};

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

void run_generate(const GenerateArgs& a) {
  set_threads(a.threads);
  {
    std::vector<std::string> inputs = a.images;
    inputs.insert(inputs.end(), a.calibration.begin(), a.calibration.end());
    refuse_output_over_inputs("--dump-logits", a.dump_logits, inputs);
  }
  if (a.prompt.find_first_not_of(" \t\r\n") == std::string::npos)
    throw Error("--prompt: empty prompt");
  std::vector<Image> images;
  for (auto& p : a.images) images.push_back(load_image(p));
  auto t_load = std::chrono::steady_clock::now();
  Vlm model = Vlm::load(a.model, weight_format_from_string(a.dtype));
  const double load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
  apply_reducer(model, a.reducer, a.register_init, a.calibration, a.sampling.seed);
  apply_cap(model, a.cap);
  Tokenizer tok(a.model);
  SamplingOptions opt = a.sampling;
  opt.keep_logits = !a.dump_logits.empty();
  opt.kv_dtype = kv_dtype_from_string(a.kv_dtype);
  auto res = generate(model, tok, {Request{a.prompt, images}}, opt);
  std::cout << res.texts[0] << "\n";
  if (!a.dump_logits.empty()) {
    save_npy(a.dump_logits, res.step_logits.select(1, 0));
    std::cerr << "logits of " << res.step_logits.size(0) << " steps written to " << a.dump_logits
              << "\n";
  }
  if (a.stats) {
    std::cerr << format_stats(res.stats);
    std::cerr << "weights: " << model.config().weight_format() << ", "
              << model.weight_bytes() / 1048576.0 << " MiB, loaded in " << load_seconds << " s; kernels "
              << kernels::isa_name(kernels::active_isa()) << "\n";
    if (!images.empty()) {
      // The first encode above ran cold (first touch of the weights, thread pool, allocator);
      // a second one shows the steady state a server sees.
      std::vector<torch::Tensor> px;
      for (auto& img : images) px.push_back(prepare_image(img, model.config()).pixels);
      torch::NoGradGuard ng;
      auto t0 = std::chrono::steady_clock::now();
      model.encode_images(torch::cat(px, 0));
      std::cerr << "vision tower: cold " << res.stats.vision_seconds << " s, warm "
                << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
                << " s\n";
    }
  }
}

// --- victor serve ---
struct ServeArgs {
  ImageCap cap;
  std::string model, dtype = "auto", kv_dtype = "f32", host = "127.0.0.1", name;
  int port = 8080, threads = default_threads(), http_threads = 0;
  double kv_budget_mb = 2048, image_cache_mb = 256, max_body_mb = 64, max_image_mb = 20, image_memory_mb = 512, memory_budget_mb = 4096;
  ReducerChoice reducer;
  ServeOptions opt;
};

void run_serve(ServeArgs a) {
  set_threads(a.threads);
  // SIGINT/SIGTERM are taken by sigwait below: blocked before any thread starts, so every
  // thread inherits the mask and the main thread alone receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a client that hangs up is noticed by a failed write, not a signal
  Vlm model = Vlm::load(a.model, weight_format_from_string(a.dtype));
  apply_reducer(model, a.reducer, "random", {}, 0);
  apply_cap(model, a.cap);
  Tokenizer tok(a.model);
  ServeOptions o = a.opt;
  o.kv_dtype = kv_dtype_from_string(a.kv_dtype);
  o.kv_budget_bytes = int64_t(a.kv_budget_mb * 1048576.0);
  o.image_cache_bytes = int64_t(a.image_cache_mb * 1048576.0);
  o.image_memory_bytes = int64_t(a.image_memory_mb * 1048576.0);
  o.memory_budget_bytes = int64_t(a.memory_budget_mb * 1048576.0);
  o.limits.max_body_bytes = int64_t(a.max_body_mb * 1048576.0);
  o.limits.max_image_bytes = int64_t(a.max_image_mb * 1048576.0);
  o.model_name = a.name.empty() ? fs::path(a.model).lexically_normal().filename().string() : a.name;
  if (o.model_name.empty()) o.model_name = fs::absolute(a.model).parent_path().filename().string();
  if (!o.limits.allow_files.empty() && !fs::is_directory(o.limits.allow_files))
    throw Error("--allow-files: not a folder: " + o.limits.allow_files);
  ServeEngine engine(model, tok, o);
  Server server(engine, a.host, a.port, a.http_threads);
  const auto& cfg = model.config();
  std::cerr << "victor serve: " << o.model_name << " (" << cfg.weight_format() << " weights, "
            << model.weight_bytes() / 1048576.0 << " MiB; reducer " << cfg.reducer.name() << "; memory budget "
            << a.memory_budget_mb << " MiB, KV at most " << a.kv_budget_mb << " MiB) on http://" << a.host << ":" << server.port() << "/\n";
  server.start();
  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::cerr << "victor serve: stopping (signal " << sig << ")\n";
  engine.stop();
  server.stop();
}

// --- victor bench-serve ---
struct BenchServeArgs {
  BenchServeOptions opt;
  std::string json_out;
};

void run_bench_serve(BenchServeArgs a, const char* argv0) {
  refuse_output_over_inputs("--json-out", a.json_out, {});
  std::error_code ec;
  a.opt.victor_binary = fs::read_symlink("/proc/self/exe", ec).string();
  if (ec) a.opt.victor_binary = argv0;
  if (!fs::exists(fs::path(a.opt.model) / "config.json")) throw Error("--model: no config.json in " + a.opt.model);
  a.opt.progress = isatty(2);
  BenchServeReport r = bench_serve(a.opt);
  std::cout << r.table();
  if (!a.json_out.empty()) {
    write_file_atomic(a.json_out, r.to_json().dump(2) + "\n");
    std::cout << "wrote " << a.json_out << "\n";
  }
  if (r.errors > 0) throw Error("bench-serve: " + std::to_string(r.errors) + " of " + std::to_string(r.requests) + " requests failed");
}

// --- victor data gridvqa ---
void run_gridvqa(const GridVqaOptions& o) {
  Progress bar("gridvqa", o.train_images + o.test_images);
  auto s = build_gridvqa(o, [&](int done, int) { bar.update(done); });
  bar.finish();
  std::cout << "wrote GridVQA to " << o.out_dir << ": " << s.train_images << " train images ("
            << s.train_questions << " questions), " << s.test_images << " test images ("
            << s.test_questions << " questions), " << s.text_grids << " grids as text (text.json)\n";
}

// `--nproc N` starts its own ranks: under a launcher that already set RANK (torchrun, Slurm) it
// would be ignored, so it is refused. Workers it starts run without --nproc.
void refuse_nproc_under_launcher(int nproc) {
  if (nproc <= 1) return;
  for (const char* v : {"RANK", "WORLD_SIZE"})
    if (const char* x = std::getenv(v); x && *x)
      throw Error("--nproc " + std::to_string(nproc) + " starts its own ranks, but " + v + "=" + x +
                  " is already set (a launcher's rank): unset RANK and WORLD_SIZE, or drop --nproc");
}

// `--nproc N` (train, repro): this process becomes the launcher of N workers, each the same
// command line without --nproc and with the torchrun variables set; the cores are shared out
// unless --threads says otherwise.
int launch_workers(int argc, char** argv, int nproc, bool threads_given) {
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

// --- victor train ---
void run_train(TrainOptions o, const std::string& parts, int threads, bool overwrite) {
  set_threads(threads);
  if (!o.resume && same_path(o.model_dir, o.out))
    throw Error("train: --out must differ from --model (the starting checkpoint stays intact; --resume continues "
                "the run in --out)");
  if (!o.resume) refuse_existing_model(o.out, overwrite, "--out");
  refuse_output_over_inputs("--log", o.log, {o.data});
  o.parts = parse_parts(parts);
  TrainReport r = train(o);
  if (const char* rank = std::getenv("RANK"); r.world_size > 1 && rank && std::string(rank) != "0") return;
  if (r.world_size > 1)
    std::cout << r.world_size << " ranks (c10d/Gloo), " << r.bytes_reduced_per_step / 1e6
              << " MB of gradients all-reduced per step in " << r.reduce_seconds_per_step * 1e3 << " ms\n";
  std::cout << "trained " << r.steps << " steps (" << r.samples << " samples, " << r.tokens
            << " tokens) in " << r.seconds << " s: " << r.mean_step_seconds << " s/step, "
            << r.tokens_per_second << " tokens/s, final loss " << r.final_loss;
  if (r.skipped) std::cout << ", " << r.skipped << " bad samples skipped";
  if (r.feature_cache_hits) std::cout << ", " << r.feature_cache_hits << " images' vision features from the cache";
  if (r.grounded_answers)
    std::cout << ", grounded attention on the answers' regions " << r.final_ground_mass << " (KL " << r.final_ground_loss << ")";
  std::cout << "\nmodel and trainer state in " << o.out << "\n";
}

// --- victor eval ---
struct EvalArgs {
  ImageCap cap;
  std::string model, questions, answers_file, train_data, compare_answers;
  EvalOptions opt;
  int threads = default_threads();
  ReducerChoice reducer;
  std::string dtype = "auto", kv_dtype = "f32";
};

void run_eval(EvalArgs a) {
  set_threads(a.threads);
  refuse_output_over_inputs("--answers-out", a.opt.answers_out,
                            {a.questions, a.answers_file, a.compare_answers, a.train_data});
  auto qs = load_questions_jsonl(a.questions);
  if (a.opt.image_folder.empty()) a.opt.image_folder = fs::path(a.questions).parent_path().string();
  if (!a.model.empty()) {
    Vlm model = Vlm::load(a.model, weight_format_from_string(a.dtype));
    apply_reducer(model, a.reducer, "random", {}, 0);
    apply_cap(model, a.cap);
    a.opt.kv_dtype = kv_dtype_from_string(a.kv_dtype);
    Tokenizer tok(a.model);
    a.opt.model_id = fs::path(a.model).filename().string();
    auto r = evaluate(model, tok, qs, a.opt);
    std::cout << format_report(r);
    if (!a.opt.answers_out.empty()) std::cout << "answers written to " << a.opt.answers_out << "\n";
    if (!a.compare_answers.empty())
      std::cout << format_comparison(compare_reports(r, score_files(a.questions, a.compare_answers, a.opt.limit)),
                                     "this run", a.compare_answers);
  } else if (!a.answers_file.empty()) {
    auto r = score_files(a.questions, a.answers_file, a.opt.limit);
    std::cout << format_report(r);
    if (!a.compare_answers.empty())
      std::cout << format_comparison(compare_reports(r, score_files(a.questions, a.compare_answers, a.opt.limit)),
                                     a.answers_file, a.compare_answers);
  } else {
    throw Error("eval: give --model (answer and score) or --answers (score an answers file)");
  }
  if (!a.train_data.empty()) {
    auto prior = answer_prior(load_llava_json(a.train_data), qs);
    std::cout << "answer-prior baseline: " << format_report(prior);
  }
}

// --- victor bench ---
struct BenchArgs {
  ImageCap cap;
  std::string image_size = "672x672";
  std::string model, preset, json_out, mask = "causal", dtype = "auto", kv_dtype = "f32";
  std::vector<std::string> reducers;
  std::vector<int> sweep_registers, sweep_layers, pools;
  BenchOptions opt;
  bool json = false, llm_only = false;
  int threads = default_threads();
  uint64_t seed = 0;
};

void run_bench_cli(BenchArgs a) {
  set_threads(a.threads);
  refuse_output_over_inputs("--json-out", a.json_out, {});
  if (a.model.empty() == a.preset.empty()) throw Error("bench: give exactly one of --model or --preset");
  ModelConfig cfg;
  std::unique_ptr<Vlm> model;
  if (!a.model.empty()) {
    model = std::make_unique<Vlm>(Vlm::load(a.model, weight_format_from_string(a.dtype)));
  } else {
    cfg = preset_config(a.preset);
    model = std::make_unique<Vlm>(Vlm::random(cfg, a.seed, weight_format_from_string(a.dtype)));
    std::cerr << "bench: random " << a.preset << " weights (" << model->parameter_count() / 1e9
              << " B parameters)\n";
  }
  apply_cap(*model, a.cap);
  std::cerr << "bench: " << model->config().weight_format() << " weights, "
            << model->weight_bytes() / 1048576.0 << " MiB\n";
  a.opt.seed = a.seed;
  a.opt.kv_dtype = kv_dtype_from_string(a.kv_dtype);
  {
    int w = 0, h = 0;
    char x = 0, extra = 0;
    if (std::sscanf(a.image_size.c_str(), "%d%c%d%c", &w, &x, &h, &extra) != 3 || x != 'x' || w < 1 || h < 1 ||
        w > 16384 || h > 16384)
      throw Error("--image-size '" + a.image_size + "': expected WIDTHxHEIGHT, each 1..16384 (e.g. 672x672)");
    a.opt.image_width = w;
    a.opt.image_height = h;
  }
  if (a.llm_only) {
    const int gen = *std::max_element(a.opt.gen_tokens.begin(), a.opt.gen_tokens.end());
    auto r = run_llm_bench(*model, a.opt.prompt_tokens, gen, a.opt.repeats, a.seed);
    std::printf("language model alone (%s weights, %d threads): pp%d %.2f tokens/s [%.2f, %.2f], "
                "tg%d %.2f tokens/s [%.2f, %.2f] (medians of %d, [min, max]); peak RSS %.0f MiB\n",
                model->config().weight_format().c_str(), at::get_num_threads(), r.prompt,
                r.prefill_tokens_per_second, r.prefill_min, r.prefill_max, r.gen - 1,
                r.decode_tokens_per_second, r.decode_min, r.decode_max, r.repeats,
                r.peak_rss_bytes / 1048576.0);
    return;
  }
  if (a.sweep_registers.empty() != a.sweep_layers.empty())
    throw Error("bench: --sweep-registers and --sweep-layers go together");
  std::vector<Reducer> extra;
  for (auto& spec : a.reducers) extra.push_back(Reducer::parse(spec));
  for (int k : a.sweep_layers)
    for (int m : a.sweep_registers) extra.push_back(Reducer::victor({m, k, register_mask_from_string(a.mask)}));
  for (int p : a.pools) extra.push_back(Reducer::pool({p}));
  if (extra.empty() && model->config().reducer.is_none())  // a plain checkpoint: compare with Victor m=8, k=2
    extra.push_back(Reducer::victor({8, std::min(2, model->config().num_layers()), RegisterMask::Causal}));
  auto configs = bench_configs(model->config(), extra);
  auto results = run_bench(*model, configs, a.opt);
  auto j = bench_json(results, model->config(), a.opt);
  if (!a.json_out.empty()) write_file_atomic(a.json_out, j.dump(2) + "\n");
  if (a.json) std::cout << j.dump(2) << "\n";
  else std::cout << bench_table(results);
}

// --- victor quantize ---
struct QuantizeArgs {
  std::string model, out, dtype = "int8";
  size_t shard_mb = 0;
  bool overwrite = false;
};

void run_quantize(const QuantizeArgs& a) {
  if (same_path(a.model, a.out))
    throw Error("quantize: --out must differ from --model (the source stays intact)");
  refuse_existing_model(a.out, a.overwrite, "--out");
  Vlm model = Vlm::load(a.model, weight_format_from_string(a.dtype));
  ModelFolderWrite write(a.out);
  model.save(a.out, a.shard_mb << 20);
  copy_tokenizer_files(a.model, a.out);
  write.commit();
  std::cout << "wrote " << model.config().weight_format() << " model to " << a.out << ": " << model.weight_bytes() / 1048576.0
            << " MiB of weights (" << model.parameter_count() / 1e6 << " M parameters)\n";
}

// --- victor train-vision ---
struct VisionArgs {
  std::string model, data, out;
  VisionPretrainOptions opt;
  std::string targets = "cell";
  int threads = default_threads(), limit = 0;
  bool overwrite = false;
};

void run_train_vision(const VisionArgs& a) {
  set_threads(a.threads);
  VisionPretrainOptions opt = a.opt;
  opt.per_patch = a.targets == "patch";
  opt.progress = isatty(2);
  if (same_path(a.model, a.out))
    throw Error("train-vision: --out must differ from --model (the starting checkpoint stays intact)");
  refuse_existing_model(a.out, a.overwrite, "--out");
  Vlm model = Vlm::load(a.model);
  auto train = load_grid_images(a.data, "train", model.config(), a.limit);
  auto test = load_grid_images(a.data, "t10k", model.config());
  auto r = pretrain_vision(model, train, test, opt);
  ModelFolderWrite write(a.out);
  model.save(a.out);
  copy_tokenizer_files(a.model, a.out);
  write.commit();
  std::cout << "vision tower pretrained: " << r.steps << " steps in " << r.seconds << " s, final loss "
            << r.final_loss << ", test cell accuracy " << 100 * r.test_cell_accuracy << "%, position accuracy "
            << 100 * r.test_position_accuracy << "%, single patch " << 100 * r.test_patch_accuracy << "%";
  if (opt.counts)
    std::cout << ", class counts exact " << 100 * r.test_count_patch_accuracy << "% from one patch, "
              << 100 * r.test_count_mean_accuracy << "% from the mean";
  std::cout << "\nmodel written to "
            << a.out << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  victor::ensure_fast_blas(argv);
  // The subcommand is the first argument that is not an option (victor has no global options
  // taking values).
  const char* command = "";
  for (int i = 1; i < argc; ++i)
    if (argv[i][0] != '-') {
      command = argv[i];
      break;
    }
  tune_allocator(std::string(command) == "serve");
  CLI::App app{"victor: efficient vision-language models with Visual Compact Token Registers"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Show help for every subcommand");

  InitArgs init;
  auto* c_init = app.add_subcommand("init", "Write a randomly initialised checkpoint (HF LLaVA layout)");
  c_init->add_option("--preset", init.preset, "Model shape: tiny | small | clip-l-1b | llava-7b | llava-next-tiny | llava-next-7b")
      ->check(CLI::IsMember({"tiny", "small", "clip-l-1b", "llava-7b", "llava-next-tiny", "llava-next-7b"}));
  c_init->add_option("--out", init.out, "Output folder")->required();
  c_init->add_option("--corpus", init.corpus, "Text file to train the tokenizer on (default: GridVQA's vocabulary)")
      ->check(CLI::ExistingFile);
  c_init->add_option("--vocab-size", init.vocab, "SentencePiece vocabulary size (upper bound)")
      ->check(CLI::Range(300, 64000));
  c_init->add_option("--tokenizer-type", init.tokenizer_type, "SentencePiece model type: bpe (as Llama's) | unigram")
      ->check(CLI::IsMember({"bpe", "unigram"}));
  c_init->add_option("--seed", init.seed, "Random seed for the weights");
  add_dtype_option(c_init, init.dtype, false);
  add_overwrite_flag(c_init, init.overwrite);
  add_reducer_options(c_init, init.reducer);

  GenerateArgs gen;
  auto* c_gen = app.add_subcommand("generate", "Answer a question about an image");
  c_gen->add_option("--model", gen.model, "Model folder (config.json, *.safetensors, tokenizer.model)")
      ->required();
  c_gen->add_option("--image", gen.images, "Image file(s): PNG, JPEG or BMP (repeat for several)");
  c_gen->add_option("--prompt", gen.prompt, "The question; <image> marks where images go")->required();
  c_gen->add_option("--max-new-tokens", gen.sampling.max_new_tokens, "Tokens to generate at most")
      ->check(CLI::Range(1, 8192));
  c_gen->add_flag("--ignore-eos", gen.sampling.ignore_eos,
                  "Run to --max-new-tokens past the end-of-sequence token (benchmarks, dtype comparisons)");
  c_gen->add_option("--temperature", gen.sampling.temperature, "0 = greedy")->check(CLI::Range(0.0, 100.0))->check(kFinite);
  c_gen->add_option("--top-k", gen.sampling.top_k, "Sample among the k most likely tokens (0 = off)")
      ->check(CLI::Range(0, 1000000));
  c_gen->add_option("--top-p", gen.sampling.top_p, "Nucleus sampling mass (1 = off)")
      ->check(CLI::Range(0.0, 1.0))->check(kFinite);
  c_gen->add_option("--seed", gen.sampling.seed, "Sampling seed");
  c_gen->add_option("--threads", gen.threads, "CPU threads")->check(CLI::Range(1, 1024));
  c_gen->add_flag("--stats", gen.stats, "Print token counts, timings (vision cold and warm), KV-cache bytes, FLOPs, weight bytes");
  add_dtype_option(c_gen, gen.dtype);
  add_kv_dtype_option(c_gen, gen.kv_dtype);
  c_gen->add_option("--dump-logits", gen.dump_logits, "Save every step's logits as .npy [steps, vocab]");
  add_reducer_options(c_gen, gen.reducer);
  add_cap_options(c_gen, gen.cap);
  c_gen->add_option("--register-init", gen.register_init,
                    "New registers: random (std 0.02) | mean (of calibration images' visual tokens)")
      ->check(CLI::IsMember({"random", "mean"}));
  c_gen->add_option("--calibration-images", gen.calibration, "Images for --register-init mean")
      ->check(CLI::ExistingFile);

  ServeArgs sv;
  auto* c_serve = app.add_subcommand("serve", "OpenAI-compatible chat server with continuous batching, an image cache and a web page");
  c_serve->add_option("--model", sv.model, "Model folder (config.json, *.safetensors, tokenizer.model)")->required();
  c_serve->add_option("--host", sv.host, "Address to listen on")->capture_default_str();
  c_serve->add_option("--port", sv.port, "Port (0 = any free port, printed at start)")->check(CLI::Range(0, 65535))->capture_default_str();
  c_serve->add_option("--name", sv.name, "Model name clients send (default: the model folder's name)");
  c_serve->add_option("--threads", sv.threads, "CPU threads for the model")->check(CLI::Range(1, 1024));
  c_serve->add_option("--http-threads", sv.http_threads, "HTTP worker threads (default: --max-queue + --max-batch + 8; each streaming client holds one)")
      ->check(CLI::Range(0, 100000));
  add_dtype_option(c_serve, sv.dtype);
  add_kv_dtype_option(c_serve, sv.kv_dtype);
  add_reducer_options(c_serve, sv.reducer);
  add_cap_options(c_serve, sv.cap);
  c_serve->add_option("--kv-budget-mb", sv.kv_budget_mb, "KV cache the admitted requests may reserve (their worst case); more wait in the queue")
      ->check(CLI::Range(0.001, 1e7))->check(kFinite)->capture_default_str();
  c_serve->add_option("--image-cache-mb", sv.image_cache_mb, "Encoded images kept by hash of their bytes (LRU; 0 = off)")
      ->check(CLI::Range(0.0, 1e7))->check(kFinite)->capture_default_str();
  c_serve->add_option("--max-batch", sv.opt.max_batch, "Requests decoding together at most")->check(CLI::Range(1, 4096))->capture_default_str();
  c_serve->add_option("--prefills-per-step", sv.opt.prefills_per_step,
                      "Waiting requests admitted (prefilled) between two decode steps at most: more raises concurrency sooner, fewer keeps the running requests' tokens flowing")
      ->check(CLI::Range(1, 4096))->capture_default_str();
  c_serve->add_option("--max-queue", sv.opt.limits.max_queue, "Requests waiting at most (503 with Retry-After beyond)")
      ->check(CLI::Range(0, 1000000))->capture_default_str();
  c_serve->add_option("--max-body-mb", sv.max_body_mb, "Largest request body (413 beyond)")->check(CLI::Range(0.001, 4096.0))->check(kFinite)->capture_default_str();
  c_serve->add_option("--max-image-mb", sv.max_image_mb, "Largest encoded image (413 beyond)")->check(CLI::Range(0.001, 4096.0))->check(kFinite)->capture_default_str();
  c_serve->add_option("--max-image-pixels", sv.opt.limits.max_image_pixels, "Largest image, width x height (413 beyond)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 40))->capture_default_str();
  c_serve->add_option("--max-images", sv.opt.limits.max_images, "Images per request at most")->check(CLI::Range(0, 1024))->capture_default_str();
  c_serve->add_option("--max-tokens", sv.opt.limits.max_tokens, "The largest max_tokens a request may ask for")->check(CLI::Range(1, 1000000))->capture_default_str();
  c_serve->add_option("--default-max-tokens", sv.opt.limits.default_max_tokens, "max_tokens when a request names none")->check(CLI::Range(1, 1000000))->capture_default_str();
  c_serve->add_option("--request-timeout", sv.opt.limits.request_timeout_seconds, "Seconds a request may take, queue included (504 beyond)")
      ->check(CLI::Range(0.001, 1e7))->check(kFinite)->capture_default_str();
  c_serve->add_option("--api-key", sv.opt.api_key, "Require 'Authorization: Bearer KEY' on /v1/* (401 otherwise); also read from VICTOR_API_KEY")
      ->envname("VICTOR_API_KEY");
  c_serve->add_option("--cors", sv.opt.cors_origin, "Access-Control-Allow-Origin to send (e.g. '*' or https://my.app), for pages served elsewhere");
  c_serve->add_option("--image-memory-mb", sv.image_memory_mb,
                      "Memory that decoding and preprocessing the images of requests in flight may hold at once; a "
                      "request waits for its share (413 for an image that alone needs more)")
      ->check(CLI::Range(1.0, 1e7))->check(kFinite)->capture_default_str();
  c_serve->add_option("--memory-budget-mb", sv.memory_budget_mb,
                      "Memory that requests may hold besides the weights: images decoding and waiting, worst-case KV, "
                      "prefill and decode activations, and the image cache's cap; a request is admitted when its "
                      "KV and activations fit (400 for one that alone cannot)")
      ->check(CLI::Range(1.0, 1e8))->check(kFinite)->capture_default_str();
  c_serve->add_option("--max-connections", sv.opt.gate.max_connections, "Open client connections at most (503 beyond)")
      ->check(CLI::Range(1, 1000000))->capture_default_str();
  c_serve->add_option("--max-connections-per-peer", sv.opt.gate.max_connections_per_peer,
                      "Open connections from one address at most (503 beyond)")
      ->check(CLI::Range(1, 1000000))->capture_default_str();
  c_serve->add_option("--header-timeout", sv.opt.gate.header_timeout_seconds,
                      "Seconds a client has to send its whole request head (408 beyond; a slow client holds no worker)")
      ->check(CLI::Range(0.1, 3600.0))->check(kFinite)->capture_default_str();
  c_serve->add_option("--body-timeout", sv.opt.gate.body_timeout_seconds, "Seconds a client has to send its whole request body (408 beyond)")
      ->check(CLI::Range(0.1, 3600.0))->check(kFinite)->capture_default_str();
  c_serve->add_option("--allow-files", sv.opt.limits.allow_files, "Accept image_url paths to local files inside this folder (off by default)");

  BenchServeArgs bs;
  auto* c_bs = app.add_subcommand("bench-serve", "Load benchmark: start `victor serve`, drive it with N concurrent streaming clients, report requests/s, TTFT p50/p99, tokens/s, errors, peak RSS and RSS growth");
  c_bs->add_option("--model", bs.opt.model, "Model folder for the server")->required();
  c_bs->add_option("--clients", bs.opt.clients, "Concurrent clients")->check(CLI::Range(1, 10000))->capture_default_str();
  c_bs->add_option("--requests", bs.opt.requests, "Requests in all")->check(CLI::Range(1, 100000000))->capture_default_str();
  c_bs->add_option("--max-tokens", bs.opt.max_tokens, "New tokens per request (exactly: the requests set ignore_eos)")
      ->check(CLI::Range(1, 100000))->capture_default_str();
  c_bs->add_option("--images", bs.opt.images, "Distinct GridVQA images (4 questions each) cycled through")
      ->check(CLI::Range(1, 100000))->capture_default_str();
  c_bs->add_option("--seed", bs.opt.seed, "Workload seed");
  c_bs->add_option("--serve-arg", bs.opt.serve_args, "An argument for `victor serve` (repeat; e.g. --serve-arg=--reducer --serve-arg=victor:m=8,k=2)")
      ->allow_extra_args(false);
  c_bs->add_option("--json-out", bs.json_out, "Write the figures as JSON");

  auto* c_data = app.add_subcommand("data", "Build datasets");
  c_data->require_subcommand(1);
  GridVqaOptions gq;
  auto* c_grid = c_data->add_subcommand("gridvqa", "GridVQA: questions about grids of Fashion-MNIST items");
  c_grid->add_option("--out", gq.out_dir, "Output folder")->capture_default_str();
  c_grid->add_option("--source", gq.source_dir, "Fashion-MNIST folder (IDX .gz files)")->capture_default_str();
  c_grid->add_option("--grid", gq.grid, "Grid size G (G x G cells)")->check(CLI::Range(1, 8))->capture_default_str();
  c_grid->add_option("--train-images", gq.train_images, "Training images")->check(CLI::Range(0, 1000000))->capture_default_str();
  c_grid->add_option("--test-images", gq.test_images, "Test images")->check(CLI::Range(0, 1000000))->capture_default_str();
  c_grid->add_option("--questions", gq.questions_per_image, "Questions per image")->check(CLI::Range(1, 16))->capture_default_str();
  c_grid->add_option("--empty-rate", gq.empty_rate, "Probability that a cell is empty")->check(CLI::Range(0.0, 0.99))->check(kFinite)->capture_default_str();
  c_grid->add_option("--families", gq.families,
                     "Question families asked, comma-separated (identify,count,exist,locate; one family for a curriculum)")
      ->delimiter(',')
      ->capture_default_str();
  c_grid->add_option("--seed", gq.seed, "Seed")->capture_default_str();
  c_grid->add_option("--text-grids", gq.text_grids, "Grids written as text (text.json, the language model's pretraining corpus)")->check(CLI::Range(0, 10000000))->capture_default_str();

  TrainOptions tr;
  std::string train_parts = "pretrain";
  int train_threads = default_threads();
  auto* c_train = app.add_subcommand("train", "Train on LLaVA-format data (loss on assistant tokens)");
  c_train->add_option("--model", tr.model_dir, "Starting checkpoint folder")->required();
  c_train->add_option("--data", tr.data, "LLaVA JSON: [{id, image, conversations}]")->required()->check(CLI::ExistingFile);
  c_train->add_option("--image-folder", tr.image_folder, "Folder the samples' image paths are relative to (default: the JSON's folder)");
  c_train->add_option("--out", tr.out, "Output folder (model, trainer state, metrics.jsonl)")->required();
  c_train->add_option("--train", train_parts, "What to train: vision,projector,registers,llm or pretrain (projector+registers) | finetune (+llm) | all")->capture_default_str();
  c_train->add_option("--lr", tr.lr, "Peak learning rate")->check(CLI::PositiveNumber)->check(kFinite)->capture_default_str();
  c_train->add_option("--min-lr-ratio", tr.min_lr_ratio, "Cosine floor as a fraction of --lr")->check(CLI::Range(0.0, 1.0))->check(kFinite);
  c_train->add_option("--weight-decay", tr.weight_decay, "AdamW decoupled weight decay")->check(CLI::Range(0.0, 1.0))->check(kFinite);
  c_train->add_option("--warmup-steps", tr.warmup_steps, "Linear warm-up steps (default 3% of the run)")->check(CLI::Range(-1, 10000000));
  c_train->add_option("--batch-size", tr.batch_size, "Samples per micro-batch")->check(CLI::Range(1, 4096))->capture_default_str();
  c_train->add_option("--grad-accum", tr.grad_accum, "Micro-batches per optimizer step")->check(CLI::Range(1, 4096))->capture_default_str();
  c_train->add_option("--epochs", tr.epochs, "Epochs (ignored with --max-steps)")->check(CLI::Range(1, 100000))->capture_default_str();
  c_train->add_option("--max-steps", tr.max_steps, "Optimizer steps (0 = from --epochs)")->check(CLI::Range(0, 100000000));
  c_train->add_option("--stop-after", tr.stop_after, "Stop after N steps of this session (resume later)")->check(CLI::Range(0, 100000000));
  c_train->add_option("--save-every", tr.save_every, "Checkpoint every N steps (0 = at the end)")->check(CLI::Range(0, 100000000));
  c_train->add_option("--clip", tr.clip, "Gradient norm clipping (0 = off)")->check(CLI::Range(0.0, 1e6))->check(kFinite)->capture_default_str();
  c_train->add_option("--seed", tr.seed, "Seed (data order)");
  c_train->add_option("--threads", train_threads, "CPU threads")->check(CLI::Range(1, 1024));
  c_train->add_flag("--single-turn", tr.single_turn,
                    "Train every turn of a multi-turn conversation as its own sample (the image with one question)");
  c_train->add_option("--max-samples", tr.max_samples, "Use only the first N samples")->check(CLI::Range(0, 100000000));
  c_train->add_option("--feature-cache-mb", tr.feature_cache_mb,
                      "Vision tower frozen: keep each image's features in memory up to this many MiB (0 = recompute every step)")
      ->check(CLI::Range(0, 1 << 20));
  c_train->add_option("--log", tr.log, "Metrics JSON lines (default OUT/metrics.jsonl)");
  c_train->add_flag("--resume", tr.resume, "Continue exactly where the checkpoint in --out stopped");
  bool train_overwrite = false;
  add_overwrite_flag(c_train, train_overwrite);
  int train_nproc = 1;
  add_distributed_options(c_train, train_nproc, tr.dist_timeout_seconds,
                          "Data-parallel workers on this machine (c10d/Gloo; each takes --batch-size per micro-batch, "
                          "so the global batch is N x --batch-size x --grad-accum). Across machines set RANK, "
                          "WORLD_SIZE, MASTER_ADDR, MASTER_PORT instead (docs/distributed.md)");
  c_train->add_option("--overlap-allreduce", tr.overlap_allreduce,
                      "With several ranks: start each gradient bucket's all-reduce during the backward pass as soon as "
                      "it is ready (true: for ranks on separate machines), or all-reduce after it (false: measured "
                      "faster when the ranks share one machine's cores)")
      ->capture_default_str();
  c_train->add_flag("--skip-bad", tr.skip_bad, "Skip (and count) bad samples instead of stopping");
  add_reducer_options(c_train, tr.reducer);
  c_train->add_flag("--autocast-bf16", tr.autocast_bf16,
                    "Mixed precision: the forward pass's matrix products (and their gradients) in bf16, master weights and "
                    "optimizer in float32 (2.4x faster per step on the repro's model, 40 steps on an AVX-512 BF16 CPU, docs/benchmarks.md item 11; off keeps runs "
                    "bit-comparable with float32 ones)");
  c_train->add_flag("--shuffle-visual", tr.shuffle_visual,
                    "Augment: each image's visual tokens in a random order every step (lookups by content, not position)");
  c_train->add_option("--ground-weight", tr.ground_weight,
                      "Grounded attention: weight of the loss that teaches heads of --ground-layer to look at each answer's "
                      "boxes (the gpt turn's \"boxes\", GridVQA writes them); 0 = off")
      ->check(CLI::Range(0.0, 1e3))->check(kFinite)->capture_default_str();
  c_train->add_option("--ground-layer", tr.ground_layer, "Grounded attention: the decoder layer (0-based; must see the visual tokens)")
      ->check(CLI::Range(0, 1024))->capture_default_str();
  c_train->add_option("--ground-heads", tr.ground_heads, "Grounded attention: how many heads (the first ones) are taught")
      ->check(CLI::Range(1, 1024))->capture_default_str();

  EvalArgs ev;
  auto* c_eval = app.add_subcommand("eval", "Answer question JSONL and score against references");
  c_eval->add_option("--model", ev.model, "Model folder (omit to only score --answers)");
  c_eval->add_option("--questions", ev.questions, "Questions JSONL: question_id, image, text[, answer, family]")->required()->check(CLI::ExistingFile);
  c_eval->add_option("--answers-out", ev.opt.answers_out, "Write answers JSONL here");
  c_eval->add_option("--answers", ev.answers_file, "Score this answers JSONL instead of running a model")->check(CLI::ExistingFile);
  c_eval->add_option("--image-folder", ev.opt.image_folder, "Folder of the questions' images (default: the JSONL's folder)");
  c_eval->add_option("--batch-size", ev.opt.batch_size, "Questions per batch")->check(CLI::Range(1, 1024))->capture_default_str();
  c_eval->add_option("--max-new-tokens", ev.opt.max_new_tokens, "Answer length limit")->check(CLI::Range(1, 4096))->capture_default_str();
  c_eval->add_option("--limit", ev.opt.limit, "Only the first N questions (answered, scored and compared)")->check(CLI::Range(0, 100000000));
  c_eval->add_option("--compare-answers", ev.compare_answers,
                     "Another run's answers JSONL on the same questions: print the accuracy difference with a "
                     "paired 95% bootstrap interval and how often the answers agree")
      ->check(CLI::ExistingFile);
  c_eval->add_option("--train-data", ev.train_data, "LLaVA JSON to compute the answer-prior baseline from")->check(CLI::ExistingFile);
  c_eval->add_option("--threads", ev.threads, "CPU threads")->check(CLI::Range(1, 1024));
  add_reducer_options(c_eval, ev.reducer);
  add_cap_options(c_eval, ev.cap);
  add_dtype_option(c_eval, ev.dtype);
  add_kv_dtype_option(c_eval, ev.kv_dtype);

  BenchArgs bn;
  auto* c_bench = app.add_subcommand("bench", "Measure plain vs Victor (vision, TTFT, decode, requests/s, KV, memory)");
  c_bench->add_option("--model", bn.model, "Checkpoint folder (its own m and k are one configuration)");
  c_bench->add_option("--preset", bn.preset, "Random weights of a preset shape: tiny | small | clip-l-1b | llava-7b | llava-next-tiny | llava-next-7b")
      ->check(CLI::IsMember({"tiny", "small", "clip-l-1b", "llava-7b", "llava-next-tiny", "llava-next-7b"}));
  add_dtype_option(c_bench, bn.dtype);
  add_kv_dtype_option(c_bench, bn.kv_dtype);
  add_cap_options(c_bench, bn.cap);
  c_bench->add_option("--image-size", bn.image_size, "LLaVA-NeXT: the benchmark image, WIDTHxHEIGHT (default 672x672)");
  c_bench->add_option("--reducer", bn.reducers,
                      "A reducer to measure beside plain (repeat for several): victor:m=8,k=2 | pool:4 | "
                      "fastv:k=2,keep=0.25 | visionzip:dominant=16,contextual=4");
  c_bench->add_option("--sweep-registers", bn.sweep_registers, "Register counts m to sweep (with --sweep-layers)")->delimiter(',');
  c_bench->add_option("--sweep-layers", bn.sweep_layers, "Summary layers k to sweep")->delimiter(',');
  c_bench->add_option("--pool", bn.pools, "Average-pooling baselines to add (e.g. 2,4)")->delimiter(',')->check(CLI::Range(2, 64));
  c_bench->add_option("--register-mask", bn.mask, "Mask for swept configurations")->check(CLI::IsMember({"causal", "registers_only"}));
  c_bench->add_option("--batch", bn.opt.batches, "Batch sizes for requests/s")->delimiter(',')->check(CLI::Range(1, 1024));
  c_bench->add_option("--gen", bn.opt.gen_tokens, "Generated tokens per request")->delimiter(',')->check(CLI::Range(1, 8192));
  c_bench->add_option("--prompt-tokens", bn.opt.prompt_tokens, "Text tokens per prompt (one image each)")->check(CLI::Range(2, 100000))->capture_default_str();
  c_bench->add_option("--repeats", bn.opt.repeats, "Repeats per configuration (medians)")->check(CLI::Range(1, 1000))->capture_default_str();
  c_bench->add_option("--threads", bn.threads, "CPU threads")->check(CLI::Range(1, 1024));
  c_bench->add_option("--seed", bn.seed, "Seed for random weights and inputs");
  c_bench->add_flag("--json", bn.json, "Print JSON instead of the table");
  c_bench->add_flag("--llm-only", bn.llm_only,
                    "Time the language model alone like llama-bench: prefill of --prompt-tokens text tokens, "
                    "then decode of the largest --gen");
  c_bench->add_option("--json-out", bn.json_out, "Also write the JSON to this file");

  QuantizeArgs qa;
  auto* c_quant = app.add_subcommand("quantize", "Convert a checkpoint's weight matrices to int8, int4 or bf16 (loads directly)");
  c_quant->add_option("--model", qa.model, "Source checkpoint folder")->required()->check(CLI::ExistingDirectory);
  c_quant->add_option("--out", qa.out, "Output folder (HF layout; int8/int4 scales as <name>_scale tensors)")->required();
  add_dtype_option(c_quant, qa.dtype, false);
  add_overwrite_flag(c_quant, qa.overwrite);
  c_quant->add_option("--shard-mb", qa.shard_mb, "Split the safetensors into shards of this many MiB (0 = one file)")
      ->check(CLI::Range(0, 1 << 20));

  // --quick changes the defaults, so it is read before the options bind to them: every option
  // given explicitly still wins, and --help after --quick shows the quick defaults.
  bool rp_quick = false;
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--quick") rp_quick = true;
  ReproOptions rp = rp_quick ? ReproOptions::quick() : ReproOptions{};
  int rp_threads = default_threads();
  auto* c_repro = app.add_subcommand("repro", "GridVQA -> train plain + Victor -> eval -> bench -> report");
  c_repro->add_flag("--quick", rp_quick, "About 5 minutes on 2 cores (smaller data, fewer steps)");
  c_repro->add_option("--out", rp.out, "Output folder (default runs/repro, or runs/repro-quick)");
  c_repro->add_option("--preset", rp.preset, "Model shape trained from scratch")->check(CLI::IsMember({"tiny", "small"}));
  c_repro->add_option("--registers", rp.registers, "Victor register counts to train (comma list)")->delimiter(',')->check(CLI::Range(0, 1024));
  c_repro->add_option("--summary-layers", rp.summary_layers, "Victor k values to train (comma list; every m with every k)")->delimiter(',')->check(CLI::Range(0, 64));
  c_repro->add_option("--training-free", rp.training_free,
                      "Training-free reducers run on the trained plain model (repeat; 'none' for none; default: "
                      "FastV k=2 and VisionZip at the pooling baseline's visual-token budget)");
  c_repro->add_option("--register-mask", rp.register_mask, "causal | registers_only")->check(CLI::IsMember({"causal", "registers_only"}));
  c_repro->add_option("--train-images", rp.train_images, "GridVQA training images")->check(CLI::Range(1, 1000000));
  c_repro->add_option("--test-images", rp.test_images, "GridVQA test images")->check(CLI::Range(1, 100000));
  c_repro->add_option("--steps", rp.steps, "Stage 2 steps per model: questions (identical budgets)")->check(CLI::Range(1, 10000000));
  c_repro->add_option("--pretrain-steps", rp.pretrain_steps, "Stage 1 steps: row-by-row descriptions (0 = skip)")->check(CLI::Range(0, 10000000));
  c_repro->add_option("--pool", rp.pools, "Average-pooling baselines to train (e.g. 4; 1 = none)")->delimiter(',')->check(CLI::Range(1, 64));
  c_repro->add_option("--resampler", rp.resamplers, "Perceiver-style resamplers to train, by latent count (e.g. 16; 0 = none)")
      ->delimiter(',')
      ->check(CLI::Range(0, 4096));
  c_repro->add_option("--vision-steps", rp.vision_steps, "Stage 0 steps: vision tower on cell classes (0 = skip)")->check(CLI::Range(0, 10000000));
  c_repro->add_option("--vision-images", rp.vision_images,
                      "Stage 0's own GridVQA training images (0 = the main training set)")
      ->check(CLI::Range(0, 1000000))
      ->capture_default_str();
  c_repro->add_option("--vision-targets", rp.vision_targets,
                      "Stage 0 targets: cell (each cell's mean patch names its class and place) or patch (every patch does)")
      ->check(CLI::IsMember({"cell", "patch"}))
      ->capture_default_str();
  c_repro->add_option("--vision-counts", rp.vision_counts,
                      "Stage 0 also teaches how many cells hold each class, the image's summary (true/false)")
      ->capture_default_str();
  c_repro->add_option("--text-steps", rp.text_steps, "Stage L steps: the language model on grids written as text, shared (0 = skip)")->check(CLI::Range(0, 10000000));
  c_repro->add_option("--text-lr", rp.text_lr, "Stage L peak learning rate")->check(CLI::PositiveNumber)->check(kFinite);
  std::string rp_curriculum = format_curriculum(rp.curriculum);
  c_repro->add_option("--curriculum", rp_curriculum,
                      "Stage C, shared: GRID:FAMILIES:POOL:STEPS[xREPEATS][@TARGET][:EMPTY] stages, comma-separated (FAMILIES = "
                      "all or e.g. count+exist; POOL pools the visual tokens; xREPEATS@TARGET repeats the STEPS schedule "
                      "up to REPEATS times until the stage's test accuracy reaches TARGET percent; EMPTY = percent of "
                      "empty cells, default 30; a family written NAME/EMPTY, e.g. identify+exist/75, is asked on its own "
                      "grids with that share of empty cells, its own GridVQA set mixed into the stage's); none = skip")
      ->capture_default_str();
  c_repro->add_option("--curriculum-images", rp.curriculum_images, "Stage C training images per stage")->check(CLI::Range(1, 1000000))->capture_default_str();
  c_repro->add_option("--curriculum-lr", rp.curriculum_lr, "Stage C peak learning rate")->check(CLI::PositiveNumber)->check(kFinite)->capture_default_str();
  c_repro->add_option("--curriculum-shuffle", rp.curriculum_shuffle,
                      "Stage C: each image's visual tokens in a random order every step (true/false)")
      ->capture_default_str();
  c_repro->add_option("--curriculum-single-turn", rp.curriculum_single_turn,
                      "Stage C: pooled stages train one question per sample, the same answers per step (true/false)")
      ->capture_default_str();
  c_repro->add_option("--ground-weight", rp.ground_weight,
                      "Grounded attention in stages C and 2: weight of the loss that teaches heads of --ground-layer to "
                      "look at the cells each answer rests on (0 = off); stage 2 grounds only models whose k > layer")
      ->check(CLI::Range(0.0, 1e3))->check(kFinite)
      ->capture_default_str();
  c_repro->add_option("--ground-layer", rp.ground_layer, "Grounded attention: the decoder layer (0-based)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  c_repro->add_option("--ground-heads", rp.ground_heads, "Grounded attention: how many heads (the first ones)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  c_repro->add_option("--curriculum-summary-layers", rp.curriculum_summary_layers,
                      "Stage C: drop the visual tokens after this layer (no registers), so lookups are learned "
                      "where Victor twins with k >= K still see them; -1 = every layer")
      ->check(CLI::Range(-1, 1024))
      ->capture_default_str();
  c_repro->add_option("--train", rp.train_parts, "Parts trained in stages 1-2 (finetune = projector + registers + llm, vision frozen)");
  c_repro->add_option("--batch-size", rp.batch_size, "Conversations per step")->check(CLI::Range(1, 1024));
  c_repro->add_option("--lr", rp.lr, "Peak learning rate")->check(CLI::PositiveNumber)->check(kFinite);
  c_repro->add_option("--bench-repeats", rp.bench_repeats, "Benchmark repeats")->check(CLI::Range(1, 100));
  c_repro->add_option("--timing-rounds", rp.timing_rounds,
                      "Training time measured again: rounds of interleaved stage-2 segments, every trained model "
                      "in each, giving each time reduction a range (0 = off)")
      ->check(CLI::Range(0, 100));
  c_repro->add_option("--timing-steps", rp.timing_steps, "Stage-2 steps per model in each timing round (at most --steps)")
      ->check(CLI::Range(2, 10000000));
  c_repro->add_option("--bench-batch", rp.bench_batch, "Large batch for throughput (paper: 16)")->check(CLI::Range(1, 256));
  c_repro->add_option("--bench-gen", rp.bench_gen, "Generated tokens (paper: 2,128)")->delimiter(',')->check(CLI::Range(1, 4096));
  c_repro->add_option("--eval-limit", rp.eval_limit, "Evaluate only the first N test questions")->check(CLI::Range(0, 10000000));
  c_repro->add_option("--seed", rp.seed, "Seed");
  c_repro->add_option("--threads", rp_threads, "CPU threads (per rank with --nproc)")->check(CLI::Range(1, 1024));
  int rp_nproc = 1;
  add_distributed_options(c_repro, rp_nproc, rp.dist_timeout_seconds,
                          "Data-parallel workers for the training stages (c10d/Gloo, as train --nproc): each takes a "
                          "share of the same global batches, so the recipe does not change; rank 0 builds the data, "
                          "evaluates and benchmarks. Across machines set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT");

  VisionArgs va;
  auto* c_tv = app.add_subcommand("train-vision", "Pretrain the vision tower on GridVQA's cell classes (recipe stage 0)");
  c_tv->add_option("--model", va.model, "Starting checkpoint")->required();
  c_tv->add_option("--data", va.data, "GridVQA folder (grids.jsonl, images/)")->required()->check(CLI::ExistingDirectory);
  c_tv->add_option("--out", va.out, "Output model folder")->required();
  c_tv->add_option("--steps", va.opt.steps, "Steps")->check(CLI::Range(1, 10000000))->capture_default_str();
  c_tv->add_option("--batch-size", va.opt.batch_size, "Images per step")->check(CLI::Range(1, 4096))->capture_default_str();
  c_tv->add_option("--lr", va.opt.lr, "Peak learning rate")->check(CLI::PositiveNumber)->check(kFinite)->capture_default_str();
  c_tv->add_option("--targets", va.targets, "cell (each cell's mean patch names its class and place) or patch (every patch does)")
      ->check(CLI::IsMember({"cell", "patch"}))
      ->capture_default_str();
  c_tv->add_option("--counts", va.opt.counts, "Also teach how many cells hold each class (true/false)")->capture_default_str();
  c_tv->add_option("--limit", va.limit, "Use only the first N training grids")->check(CLI::Range(0, 10000000));
  c_tv->add_option("--seed", va.opt.seed, "Seed");
  add_overwrite_flag(c_tv, va.overwrite);
  c_tv->add_option("--threads", va.threads, "CPU threads")->check(CLI::Range(1, 1024));

  check_all_options(&app);
  try {
    refuse_empty_list_items(&app, argc, argv);
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (c_init->parsed()) run_init(init);
    else if (c_gen->parsed()) run_generate(gen);
    else if (c_grid->parsed()) run_gridvqa(gq);
    else if (c_eval->parsed()) run_eval(ev);
    else if (c_bench->parsed()) run_bench_cli(bn);
    else if (c_quant->parsed()) run_quantize(qa);
    else if (c_serve->parsed()) run_serve(sv);
    else if (c_bs->parsed()) run_bench_serve(bs, argv[0]);
    else if (c_repro->parsed()) {
      refuse_nproc_under_launcher(rp_nproc);
      if (rp_nproc > 1 && !std::getenv("RANK"))
        return launch_workers(argc, argv, rp_nproc, c_repro->count("--threads") > 0);
      set_threads(rp_threads);
      ReproOptions o = rp;
      o.curriculum = parse_curriculum(rp_curriculum);
      o.progress = isatty(2);
      std::string report = run_repro(o);
      if (!report.empty()) std::cout << "report: " << report << "\n";  // rank 0's
    } else if (c_train->parsed()) {
      refuse_nproc_under_launcher(train_nproc);
      if (train_nproc > 1 && !std::getenv("RANK"))
        return launch_workers(argc, argv, train_nproc, c_train->count("--threads") > 0);
      run_train(tr, train_parts, train_threads, train_overwrite);
    }
    else if (c_tv->parsed()) run_train_vision(va);
  } catch (const victor::Error& e) {
    std::cerr << "victor: error: " << e.what() << "\n";
    return 1;
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    std::cerr << "victor: error: " << msg.substr(0, msg.find('\n')) << "\n";
    return 1;
  } catch (const std::bad_alloc&) {
    // Sizes from files are bounded before allocating; what is left is a model or batch too large
    // for this machine's memory.
    std::cerr << "victor: error: out of memory (the model, batch or context needs more RAM than is free; "
                 "try --dtype int8/bf16, a smaller --batch-size or fewer --threads)\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "victor: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
