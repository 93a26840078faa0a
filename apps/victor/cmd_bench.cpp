// victor bench: its options and what it runs.
#include "cli.h"

namespace victor::cli {

namespace {

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
  double memory_budget_mb = 0;
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
  a.opt.memory_budget_bytes = int64_t(a.memory_budget_mb * 1048576.0);
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

}  // namespace

Command bench_command(CLI::App& app, int, char**) {
  auto bn_h = std::make_shared<BenchArgs>();
  BenchArgs& bn = *bn_h;
  auto* c_bench = app.add_subcommand("bench", "Measure plain vs Victor (vision, TTFT, decode, requests/s, KV, memory)");
  c_bench->add_option("--model", bn.model, "Checkpoint folder (its own m and k are one configuration)");
  c_bench->add_option("--preset", bn.preset, "Random weights of a preset shape (as victor init makes them)")
      ->check(CLI::IsMember(preset_names()));
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
  c_bench->add_option("--memory-budget-mb", bn.memory_budget_mb,
                      "Memory a batch may hold besides the weights (KV cache + prefill activations, by their "
                      "formulas; default: what the kernel reports available once the model is built). A batch "
                      "whose joint prefill does not fit is prefilled one request at a time, then decoded "
                      "together (as serve does); one that does not fit even so is not run, and the table says why")
      ->check(CLI::Range(1.0, 1e9));
  c_bench->add_option("--threads", bn.threads, "CPU threads")->check(CLI::Range(1, 1024));
  c_bench->add_option("--seed", bn.seed, "Seed for random weights and inputs");
  c_bench->add_flag("--json", bn.json, "Print JSON instead of the table");
  c_bench->add_flag("--llm-only", bn.llm_only,
                    "Time the language model alone like llama-bench: prefill of --prompt-tokens text tokens, "
                    "then decode of the largest --gen");
  c_bench->add_option("--json-out", bn.json_out, "Also write the JSON to this file");
  return {c_bench, [bn_h] { run_bench_cli(*bn_h); return 0; }};
}

}  // namespace victor::cli
