// `victor serve`: an OpenAI-compatible chat-completions server with continuous batching, a KV
// budget for admission and a cache of encoded images. Three layers, each testable alone:
//   parse_chat_request   the request body -> a ChatRequest (pure; every error names its field)
//   ServeEngine          one scheduler thread: admits jobs under the KV budget, prefills new ones
//                        between decode steps of the running ones, caches encoded images
//   Server               cpp-httplib routes: /v1/chat/completions (+ SSE), /v1/models, /health,
//                        /metrics (Prometheus), / (the web page)
#pragma once
#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "victor/generate.h"
#include "victor/serve_api.h"
#include "victor/serve_gate.h"
#include "victor/model.h"
#include "victor/tokenizer.h"

namespace victor {

// ---- Text released to a client as tokens arrive (stop strings, split UTF-8 held back) ----
class TextStream {
 public:
  TextStream(const Tokenizer& tok, std::vector<std::string> stop) : tok_(tok), stop_(std::move(stop)) {}
  // Adds a token; returns the text that may be released now (sanitize_utf8'd; the pieces join
  // to sanitize_utf8 of the whole text). stopped() turns true when a stop string appeared (the
  // text ends before it).
  std::string push(int64_t token);
  // The rest of the text at the end of the generation.
  std::string finish();
  bool stopped() const { return stopped_; }

 private:
  // all[released_.size(), end), when `all` still begins with what was released; sanitized.
  std::string release(const std::string& all, size_t end);
  const Tokenizer& tok_;
  std::vector<std::string> stop_;
  std::vector<int64_t> tokens_;
  std::string released_;  // raw bytes released so far
  bool stopped_ = false;
};

// ---- Metrics ----
struct Histogram {
  std::vector<double> bounds;  // upper bounds, ascending (+Inf implied)
  std::vector<uint64_t> counts;  // per bound, not cumulative; last = +Inf
  double sum = 0;
  uint64_t count = 0;
  explicit Histogram(std::vector<double> b) : bounds(std::move(b)), counts(bounds.size() + 1, 0) {}
  void observe(double v);
  std::string prometheus(const std::string& name, const std::string& help) const;
};

// ---- The engine ----
struct ServeOptions {
  ServeLimits limits;
  int64_t kv_budget_bytes = 2ll << 30;     // KV cache reserved by admitted requests, at most
  int64_t image_cache_bytes = 256ll << 20; // encoded images kept (LRU)
  int max_batch = 32;                      // requests decoding together, at most
  int prefills_per_step = 4;               // requests admitted (prefilled) between decode steps
  torch::ScalarType kv_dtype = torch::kFloat32;
  std::string model_name = "victor";
  std::string api_key;      // when set, /v1/* need "Authorization: Bearer <key>" (401 otherwise)
  std::string cors_origin;  // when set, sent as Access-Control-Allow-Origin (browsers elsewhere)
  GateOptions gate;         // connection caps and deadlines in front of the HTTP library
  // Bytes that decoding and preprocessing the images of requests in flight may hold at once
  // (decoded pixels, the padded square, the resize's buffers); a request waits for its share.
  int64_t image_memory_bytes = 512ll << 20;
};

// One request's life: filled by the HTTP thread, advanced by the engine thread; the HTTP thread
// waits on `cv` for text.
struct Job {
  // Input (set before submit).
  PromptInput input;                  // ids with one image token per image, the images' views
  std::vector<uint64_t> image_keys;   // hash of each image's bytes (the image cache's key)
  SamplingOptions sampling;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  int64_t prompt_rows = 0;            // rows entering the LLM (text + visual + registers)
  int64_t text_tokens = 0;
  int64_t kv_reserved = 0;            // bytes the KV budget holds for it (its worst case)
  std::chrono::steady_clock::time_point created, deadline;

  // Progress (guarded by mu).
  std::mutex mu;
  std::condition_variable cv;
  std::string pending_text;           // released text not yet taken by the HTTP thread
  std::string text;                   // all released text
  std::vector<int64_t> tokens;
  bool done = false;
  std::string finish_reason;          // stop | length | cancelled | timeout | error
  std::string error;
  double ttft_seconds = 0, decode_seconds = 0;
  int64_t kv_bytes = 0;               // its cache at the end
  bool vision_cached = false;         // every image came from the image cache
  std::atomic<bool> cancelled{false};

  // Takes the released text (blocks up to `wait` for some or for the end).
  std::string take(std::chrono::milliseconds wait, bool* finished);
};

struct EngineCounters {
  uint64_t requests_ok = 0, requests_error = 0, requests_cancelled = 0, requests_timeout = 0;
  uint64_t rejected_queue_full = 0;
  uint64_t prompt_tokens = 0, completion_tokens = 0;
  uint64_t vision_runs = 0;  // images run through the vision tower
  uint64_t image_cache_hits = 0, image_cache_misses = 0;
  uint64_t decode_steps = 0;
  int64_t kv_bytes_in_use = 0, kv_bytes_reserved = 0, image_cache_bytes = 0;
  int64_t image_bytes_in_flight = 0, image_bytes_peak = 0;  // under --image-memory-mb
  int64_t queue_length = 0, running = 0, max_running_seen = 0;
};

class ServeEngine {
 public:
  ServeEngine(const Vlm& model, const Tokenizer& tok, ServeOptions opt);
  ~ServeEngine();
  ServeEngine(const ServeEngine&) = delete;
  ServeEngine& operator=(const ServeEngine&) = delete;

  // Builds a job from a parsed request (tokenize, decode + preprocess images, check the context
  // and the KV budget). Throws ApiError (4xx) naming the field.
  std::shared_ptr<Job> make_job(const ChatRequest& r) const;
  // Queues a job; false when the queue is full (the caller answers 503).
  bool submit(const std::shared_ptr<Job>& job);
  EngineCounters counters() const;
  std::string metrics_text() const;  // Prometheus exposition format
  const ServeOptions& options() const { return opt_; }
  const Vlm& model() const { return model_; }
  const Tokenizer& tokenizer() const { return tok_; }
  void stop();

 private:
  struct Running {
    std::shared_ptr<Job> job;
    KvCache cache;
    at::Generator gen;
    int64_t next = 0;  // the token to feed at the next decode step
    std::unique_ptr<TextStream> stream;
    std::chrono::steady_clock::time_point decode_start;
  };
  void loop();
  bool prefill(const std::shared_ptr<Job>& job);
  // Appends a sampled token; returns true when the job is finished.
  bool advance(Running& r, int64_t token);
  void finish(const std::shared_ptr<Job>& job, const std::string& reason, const std::string& error = "");
  // Decodes and preprocesses one image within the image memory budget (waits for room).
  PreparedImage decode_within_budget(const ChatImage& img, const ModelConfig& cfg) const;
  std::vector<torch::Tensor> image_embeds(const Job& job, bool* all_cached);

  const Vlm& model_;
  const Tokenizer& tok_;
  ServeOptions opt_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> pending_;
  std::vector<Running> running_;  // engine thread only
  EngineCounters counters_;
  Histogram ttft_{{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}};
  Histogram tps_{{1, 2, 5, 10, 20, 50, 100, 200, 500}};
  bool stop_ = false;
  mutable std::condition_variable image_room_;  // with mu_: image_bytes_in_flight went down
  // The image cache: key -> encoded image [1,N,d]; LRU order in `lru_` (front = newest).
  std::list<uint64_t> lru_;
  std::unordered_map<uint64_t, std::pair<torch::Tensor, std::list<uint64_t>::iterator>> images_;
  int64_t image_cache_total_ = 0;  // bytes held by images_
  std::thread thread_;
};

uint64_t hash_bytes(const std::string& bytes);

// ---- The HTTP server ----
class Server {
 public:
  Server(ServeEngine& engine, const std::string& host, int port, int http_threads = 0);
  ~Server();
  int port() const { return port_; }  // the bound port (port 0 picks a free one)
  void run();                         // blocks until stop()
  void start();                       // runs on a background thread
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace victor
