// `victor bench-serve`: starts `victor serve` as a child process, drives it on loopback with N
// concurrent streaming clients asking GridVQA questions about GridVQA images, and reports
// requests/s, TTFT percentiles, tokens/s, errors, the server's peak RSS and RSS growth.
#include <httplib.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <numeric>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "victor/bench_serve.h"
#include "victor/gridvqa.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/image.h"
#include "victor/progress.h"
#include "victor/serve.h"

extern char** environ;

namespace victor {

namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

int64_t rss_kib(pid_t pid, const char* field) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  const std::string key = std::string(field) + ":";
  while (std::getline(f, line))
    if (line.rfind(key, 0) == 0) return std::stoll(line.substr(key.size()));
  return 0;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = p * double(v.size() - 1);
  const size_t lo = size_t(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - double(lo));
}

// Requests: GridVQA questions about GridVQA test grids rendered from Fashion-MNIST (PNG bytes).
std::vector<std::pair<std::string, std::string>> make_workload(int images, uint64_t seed) {
  const std::string src = GridVqaOptions{}.source_dir;
  IdxImages items = read_idx_images(src + "/t10k-images-idx3-ubyte.gz");
  auto labels = read_idx_labels(src + "/t10k-labels-idx1-ubyte.gz");
  Rng rng(seed);
  std::vector<std::pair<std::string, std::string>> out;
  for (int i = 0; i < images; ++i) {
    Grid g = random_grid(4, 0.3, labels, rng);
    const std::string png = encode_png(render_grid(g, items));
    for (auto& qa : ask_balanced(g, 4, rng)) out.push_back({png, qa.question});
  }
  return out;
}

std::string metric_value(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(name + " ", 0) == 0) return line.substr(name.size() + 1);
  return "";
}

}  // namespace

json BenchServeReport::to_json() const {
  return {{"serve_args", serve_args},
          {"clients", clients},
          {"requests", requests},
          {"errors", errors},
          {"errors_by_status", errors_by_status},
          {"max_tokens", max_tokens},
          {"wall_seconds", wall_seconds},
          {"requests_per_second", requests_per_second},
          {"completion_tokens", completion_tokens},
          {"tokens_per_second", tokens_per_second},
          {"ttft_p50_seconds", ttft_p50},
          {"ttft_p99_seconds", ttft_p99},
          {"latency_p50_seconds", latency_p50},
          {"latency_p99_seconds", latency_p99},
          {"max_running", max_running},
          {"kv_bytes_per_request", kv_bytes_per_request},
          {"kv_bytes_plain_per_request", kv_bytes_plain_per_request},
          {"vision_runs", vision_runs},
          {"image_cache_hits", image_cache_hits},
          {"rss_peak_mib", rss_peak_mib},
          {"rss_after_warmup_mib", rss_after_warmup_mib},
          {"rss_end_mib", rss_end_mib}};
}

std::string BenchServeReport::table() const {
  std::ostringstream o;
  o.precision(3);
  o << "requests " << requests << " (" << clients << " concurrent clients, " << max_tokens
    << " new tokens each), errors " << errors << "\n"
    << "requests/s " << requests_per_second << ", tokens/s " << tokens_per_second << ", wall "
    << wall_seconds << " s\n"
    << "TTFT p50 " << ttft_p50 << " s, p99 " << ttft_p99 << " s; latency p50 " << latency_p50
    << " s, p99 " << latency_p99 << " s\n"
    << "most requests decoding at once " << max_running << "; KV per request " << kv_bytes_per_request / 1024.0
    << " KiB (plain model " << kv_bytes_plain_per_request / 1024.0 << " KiB)\n"
    << "vision-tower runs " << vision_runs << ", image-cache hits " << image_cache_hits << "\n"
    << "server RSS: peak " << rss_peak_mib << " MiB, after warm-up " << rss_after_warmup_mib
    << " MiB, at the end " << rss_end_mib << " MiB (growth " << rss_end_mib - rss_after_warmup_mib << " MiB)\n";
  return o.str();
}

BenchServeReport bench_serve(const BenchServeOptions& o) {
  if (o.clients < 1 || o.requests < 1) throw Error("bench-serve: --clients and --requests must be >= 1");
  auto workload = make_workload(o.images, o.seed);
  // The server: this binary's `serve` on a free port, its log in a temporary file.
  char log_template[] = "/tmp/victor-bench-serve-XXXXXX";
  int log_fd = mkstemp(log_template);
  if (log_fd < 0) throw Error("bench-serve: cannot create a log file in /tmp");
  const std::string log_path = log_template;
  std::vector<std::string> args = {o.victor_binary, "serve", "--model", o.model, "--port", "0"};
  args.insert(args.end(), o.serve_args.begin(), o.serve_args.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, log_fd, 2);
  pid_t pid = 0;
  int rc = posix_spawn(&pid, o.victor_binary.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(log_fd);
  if (rc != 0) throw Error("bench-serve: cannot start " + o.victor_binary + ": " + std::strerror(rc));
  auto stop_server = [&] {
    if (pid > 0) {
      kill(pid, SIGTERM);
      int st = 0;
      waitpid(pid, &st, 0);
      pid = 0;
    }
    std::remove(log_path.c_str());
  };
  int port = 0;
  for (int i = 0; i < 1200 && port == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const std::string log = read_file(log_path, FileKind::Log);
    const size_t at = log.find("on http://");
    if (at != std::string::npos) {
      const size_t colon = log.find(':', at + 10);
      port = std::atoi(log.c_str() + colon + 1);
    }
    int st = 0;
    if (waitpid(pid, &st, WNOHANG) == pid) {
      pid = 0;
      std::string tail = log.substr(log.size() > 400 ? log.size() - 400 : 0);
      std::remove(log_path.c_str());
      throw Error("bench-serve: the server exited: " + tail);
    }
  }
  if (port == 0) {
    stop_server();
    throw Error("bench-serve: the server did not start within 120 s");
  }

  BenchServeReport rep;
  rep.serve_args = args;
  rep.clients = o.clients;
  rep.requests = o.requests;
  rep.max_tokens = o.max_tokens;
  std::atomic<int> next{0}, finished{0};
  std::mutex mu;
  std::vector<double> ttfts, latencies;
  std::vector<int64_t> kv, kv_plain;
  std::atomic<int64_t> tokens{0};
  std::atomic<bool> sampling{true};
  std::atomic<int64_t> rss_warm{0};
  // RSS sampled every 100 ms; "after warm-up" once a tenth of the requests are done.
  std::thread sampler([&] {
    while (sampling) {
      if (rss_warm == 0 && finished >= std::max(1, o.requests / 10)) rss_warm = rss_kib(pid, "VmRSS");
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  Progress bar("bench-serve", o.requests, o.progress);
  const auto t0 = Clock::now();
  std::vector<std::thread> clients;
  for (int c = 0; c < o.clients; ++c) {
    clients.emplace_back([&, c] {
      httplib::Client cli("127.0.0.1", port);
      cli.set_read_timeout(3600);
      cli.set_connection_timeout(60);
      cli.set_keep_alive(true);
      for (int i = next++; i < o.requests; i = next++) {
        const auto& [png, question] = workload[size_t(i) % workload.size()];
        json body = {{"messages",
                      json::array({{{"role", "user"},
                                    {"content",
                                     json::array({{{"type", "image_url"},
                                                   {"image_url", {{"url", "data:image/png;base64," + base64_encode(png)}}}},
                                                  {{"type", "text"}, {"text", question}}})}}})},
                     {"max_tokens", o.max_tokens},
                     {"temperature", 0},
                     {"ignore_eos", true},
                     {"stream", true},
                     {"stream_options", {{"include_usage", true}}}};
        httplib::Request req;
        req.method = "POST";
        req.path = "/v1/chat/completions";
        req.body = body.dump();
        req.set_header("Content-Type", "application/json");
        std::string got;
        double ttft = -1;
        const auto ts = Clock::now();
        req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
          got.append(d, n);
          // The first chunk with text (the first one only names the role).
          if (ttft < 0 && got.find("\"delta\":{\"content\":\"", got.find("\"role\":\"assistant\"") + 1) != std::string::npos)
            ttft = std::chrono::duration<double>(Clock::now() - ts).count();
          return true;
        };
        auto res = cli.send(req);
        const double latency = std::chrono::duration<double>(Clock::now() - ts).count();
        std::string status = !res ? "connection: " + httplib::to_string(res.error()) + " (after " + std::to_string(int(latency)) + " s, " + std::to_string(got.size()) + " bytes)"
                                  : res->status != 200 ? std::to_string(res->status) : "";
        json usage, fig;
        if (status.empty()) {
          if (got.find("data: [DONE]") == std::string::npos) status = "incomplete stream";
          for (size_t p = got.find("data: {"); p != std::string::npos; p = got.find("data: {", p + 1)) {
            auto e = json::parse(got.substr(p + 6, got.find("\n\n", p) - p - 6), nullptr, false);
            if (e.is_discarded()) continue;
            if (e.contains("usage")) usage = e["usage"];
            if (e.contains("victor")) fig = e["victor"];
            if (e.contains("error")) status = "error event";
          }
          if (usage.is_null() && status.empty()) status = "no usage";
        }
        std::lock_guard<std::mutex> lk(mu);
        if (!status.empty()) {
          ++rep.errors;
          ++rep.errors_by_status[status];
        } else {
          tokens += usage["completion_tokens"].get<int64_t>();
          ttfts.push_back(ttft >= 0 ? ttft : latency);
          latencies.push_back(latency);
          kv.push_back(fig.value("kv_bytes", int64_t(0)));
          kv_plain.push_back(fig.value("kv_bytes_plain", int64_t(0)));
        }
        bar.update(++finished, "errors " + std::to_string(rep.errors));
      }
      (void)c;
    });
  }
  for (auto& t : clients) t.join();
  rep.wall_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  bar.finish();
  sampling = false;
  sampler.join();
  rep.rss_after_warmup_mib = rss_warm / 1024.0;
  rep.rss_end_mib = rss_kib(pid, "VmRSS") / 1024.0;
  rep.rss_peak_mib = rss_kib(pid, "VmHWM") / 1024.0;
  {
    httplib::Client cli("127.0.0.1", port);
    if (auto m = cli.Get("/metrics")) {
      rep.max_running = std::atoll(metric_value(m->body, "victor_running_requests_max").c_str());
      rep.vision_runs = std::atoll(metric_value(m->body, "victor_vision_runs_total").c_str());
      rep.image_cache_hits = std::atoll(metric_value(m->body, "victor_image_cache_hits_total").c_str());
    }
  }
  stop_server();
  rep.completion_tokens = tokens;
  const int ok = rep.requests - rep.errors;
  rep.requests_per_second = ok / rep.wall_seconds;
  rep.tokens_per_second = double(rep.completion_tokens) / rep.wall_seconds;
  rep.ttft_p50 = percentile(ttfts, 0.5);
  rep.ttft_p99 = percentile(ttfts, 0.99);
  rep.latency_p50 = percentile(latencies, 0.5);
  rep.latency_p99 = percentile(latencies, 0.99);
  if (!kv.empty()) {
    rep.kv_bytes_per_request = std::accumulate(kv.begin(), kv.end(), int64_t(0)) / int64_t(kv.size());
    rep.kv_bytes_plain_per_request = std::accumulate(kv_plain.begin(), kv_plain.end(), int64_t(0)) / int64_t(kv.size());
  }
  return rep;
}

}  // namespace victor
