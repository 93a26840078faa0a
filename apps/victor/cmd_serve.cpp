// victor serve: its options and what it runs.
#include "cli.h"

namespace victor::cli {

namespace {

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
  Vlm model = load_model(a.model, a.dtype, a.reducer, a.cap);
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

}  // namespace

Command serve_command(CLI::App& app, int, char**) {
  auto sv_h = std::make_shared<ServeArgs>();
  ServeArgs& sv = *sv_h;
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
  return {c_serve, [sv_h] { run_serve(*sv_h); return 0; }};
}

}  // namespace victor::cli
