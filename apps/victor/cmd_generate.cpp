// victor generate: its options and what it runs.
#include "cli.h"

namespace victor::cli {

namespace {

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
  Vlm model = load_model(a.model, a.dtype, a.reducer, a.cap, a.register_init, a.calibration, a.sampling.seed);
  const double load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
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

}  // namespace

Command generate_command(CLI::App& app, int, char**) {
  auto gen_h = std::make_shared<GenerateArgs>();
  GenerateArgs& gen = *gen_h;
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
  return {c_gen, [gen_h] { run_generate(*gen_h); return 0; }};
}

}  // namespace victor::cli
