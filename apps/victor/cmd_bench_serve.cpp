// victor bench-serve: its options and what it runs.
#include "cli.h"

namespace victor::cli {

namespace {

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

}  // namespace

Command bench_serve_command(CLI::App& app, int, char** argv) {
  auto bs_h = std::make_shared<BenchServeArgs>();
  BenchServeArgs& bs = *bs_h;
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
  return {c_bs, [bs_h, argv0 = argv[0]] { run_bench_serve(*bs_h, argv0); return 0; }};
}

}  // namespace victor::cli
