// `victor bench-serve`: the server under load (a benchmark, not a test). Starts `victor serve`
// as a child process and drives it with concurrent streaming clients on loopback.
#pragma once
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace victor {

struct BenchServeOptions {
  std::string victor_binary;            // the victor executable to start as the server
  std::string model;
  std::vector<std::string> serve_args;  // passed to `victor serve` (--reducer, --kv-budget-mb, ...)
  int clients = 100;
  int requests = 1000;
  int max_tokens = 16;  // every request generates exactly this many (ignore_eos)
  int images = 16;      // distinct GridVQA images cycled through (4 questions each)
  uint64_t seed = 0;
  bool progress = false;
};

struct BenchServeReport {
  std::vector<std::string> serve_args;
  int clients = 0, requests = 0, errors = 0, max_tokens = 0;
  std::map<std::string, int> errors_by_status;
  double wall_seconds = 0, requests_per_second = 0, tokens_per_second = 0;
  int64_t completion_tokens = 0;
  double ttft_p50 = 0, ttft_p99 = 0, latency_p50 = 0, latency_p99 = 0;
  int64_t max_running = 0, kv_bytes_per_request = 0, kv_bytes_plain_per_request = 0;
  int64_t vision_runs = 0, image_cache_hits = 0;
  double rss_peak_mib = 0, rss_after_warmup_mib = 0, rss_end_mib = 0;
  nlohmann::json to_json() const;
  std::string table() const;
};

BenchServeReport bench_serve(const BenchServeOptions& o);

}  // namespace victor
