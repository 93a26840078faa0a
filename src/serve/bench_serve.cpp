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

#include "victor/serve/bench_serve.h"
#include "victor/gridvqa.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/image.h"
#include "victor/progress.h"
#include "victor/serve/server.h"

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

namespace {

// `victor serve` started from this binary on a free port, its log in a temporary file; stopped
// (SIGTERM, waited for) and its log removed when this goes.
class ServerProcess {
 public:
  explicit ServerProcess(const BenchServeOptions& o) {
    char log_template[] = "/tmp/victor-bench-serve-XXXXXX";
    int log_fd = mkstemp(log_template);
    if (log_fd < 0) throw Error("bench-serve: cannot create a log file in /tmp");
    log_path_ = log_template;
    args_ = {o.victor_binary, "serve", "--model", o.model, "--port", "0"};
    args_.insert(args_.end(), o.serve_args.begin(), o.serve_args.end());
    std::vector<char*> argv;
    for (auto& a : args_) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, log_fd, 2);
    int rc = posix_spawn(&pid_, o.victor_binary.c_str(), &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    close(log_fd);
    if (rc != 0) {
      pid_ = 0;
      std::remove(log_path_.c_str());
      throw Error("bench-serve: cannot start " + o.victor_binary + ": " + std::strerror(rc));
    }
    wait_for_port();
  }
  ~ServerProcess() { stop(); }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  const std::vector<std::string>& args() const { return args_; }
  void stop() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      int st = 0;
      waitpid(pid_, &st, 0);
      pid_ = 0;
    }
    if (!log_path_.empty()) std::remove(log_path_.c_str());
    log_path_.clear();
  }

 private:
  // The port the server's log announces ("on http://HOST:PORT"), within 120 s; a server that
  // exits first is an error with the end of its log.
  void wait_for_port() {
    for (int i = 0; i < 1200 && port_ == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      const std::string log = read_file(log_path_, FileKind::Log);
      const size_t at = log.find("on http://");
      if (at != std::string::npos) {
        const size_t colon = log.find(':', at + 10);
        port_ = std::atoi(log.c_str() + colon + 1);
      }
      int st = 0;
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = 0;
        const std::string tail = log.substr(log.size() > 400 ? log.size() - 400 : 0);
        stop();
        throw Error("bench-serve: the server exited: " + tail);
      }
    }
    if (port_ == 0) {
      stop();
      throw Error("bench-serve: the server did not start within 120 s");
    }
  }
  pid_t pid_ = 0;
  int port_ = 0;
  std::string log_path_;
  std::vector<std::string> args_;
};

// One streamed request's outcome: an empty status when it completed.
struct Outcome {
  std::string status;
  double ttft = -1, latency = 0;
  int64_t completion_tokens = 0, kv_bytes = 0, kv_bytes_plain = 0;
};

// Sends one chat request (an image and a question, streamed, `max_tokens` tokens without EOS) and
// reads its stream: the first text chunk's time, the usage and victor's figures, or what failed.
Outcome one_request(httplib::Client& cli, const std::string& png, const std::string& question, int max_tokens) {
  json body = {{"messages",
                json::array({{{"role", "user"},
                              {"content",
                               json::array({{{"type", "image_url"},
                                             {"image_url", {{"url", "data:image/png;base64," + base64_encode(png)}}}},
                                            {{"type", "text"}, {"text", question}}})}}})},
               {"max_tokens", max_tokens},
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
  Outcome out;
  const auto ts = Clock::now();
  req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
    got.append(d, n);
    // The first chunk with text (the first one only names the role).
    if (out.ttft < 0 && got.find("\"delta\":{\"content\":\"", got.find("\"role\":\"assistant\"") + 1) != std::string::npos)
      out.ttft = std::chrono::duration<double>(Clock::now() - ts).count();
    return true;
  };
  auto res = cli.send(req);
  out.latency = std::chrono::duration<double>(Clock::now() - ts).count();
  out.status = !res ? "connection: " + httplib::to_string(res.error()) + " (after " + std::to_string(int(out.latency)) +
                          " s, " + std::to_string(got.size()) + " bytes)"
               : res->status != 200 ? std::to_string(res->status)
                                    : "";
  if (!out.status.empty()) return out;
  json usage, fig;
  if (got.find("data: [DONE]") == std::string::npos) out.status = "incomplete stream";
  for (size_t p = got.find("data: {"); p != std::string::npos; p = got.find("data: {", p + 1)) {
    auto e = json::parse(got.substr(p + 6, got.find("\n\n", p) - p - 6), nullptr, false);
    if (e.is_discarded()) continue;
    if (e.contains("usage")) usage = e["usage"];
    if (e.contains("victor")) fig = e["victor"];
    if (e.contains("error")) out.status = "error event";
  }
  if (usage.is_null() && out.status.empty()) out.status = "no usage";
  if (!out.status.empty()) return out;
  out.completion_tokens = usage["completion_tokens"].get<int64_t>();
  out.kv_bytes = fig.value("kv_bytes", int64_t(0));
  out.kv_bytes_plain = fig.value("kv_bytes_plain", int64_t(0));
  return out;
}

}  // namespace

BenchServeReport bench_serve(const BenchServeOptions& o) {
  if (o.clients < 1 || o.requests < 1) throw Error("bench-serve: --clients and --requests must be >= 1");
  auto workload = make_workload(o.images, o.seed);
  ServerProcess server(o);
  const int port = server.port();
  const pid_t pid = server.pid();

  BenchServeReport rep;
  rep.serve_args = server.args();
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
    clients.emplace_back([&] {
      httplib::Client cli("127.0.0.1", port);
      cli.set_read_timeout(3600);
      cli.set_connection_timeout(60);
      cli.set_keep_alive(true);
      for (int i = next++; i < o.requests; i = next++) {
        const auto& [png, question] = workload[size_t(i) % workload.size()];
        const Outcome r = one_request(cli, png, question, o.max_tokens);
        std::lock_guard<std::mutex> lk(mu);
        if (!r.status.empty()) {
          ++rep.errors;
          ++rep.errors_by_status[r.status];
        } else {
          tokens += r.completion_tokens;
          ttfts.push_back(r.ttft >= 0 ? r.ttft : r.latency);
          latencies.push_back(r.latency);
          kv.push_back(r.kv_bytes);
          kv_plain.push_back(r.kv_bytes_plain);
        }
        bar.update(++finished, "errors " + std::to_string(rep.errors));
      }
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
  server.stop();
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
