// `victor serve`'s engine (src/serve/engine.cpp): one memory budget for everything requests hold,
// jobs, and the scheduler thread that admits them under the KV budget, prefills new ones between
// decode steps of the running ones and caches encoded images.
#pragma once
#include <torch/torch.h>

#include <algorithm>
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
#include "victor/serve/api.h"
#include "victor/serve/gate.h"
#include "victor/model.h"
#include "victor/tokenizer.h"
#include "victor/serve/stream.h"

namespace victor {

// ---- One memory budget for everything requests hold besides the weights ----
// Kinds: images being decoded and preprocessed, the prepared pixels of requests not yet
// prefilled, the worst-case KV of admitted requests, the activations of their prefill (and of
// their decode steps while they run). The encoded-image cache's cap is set aside from the total.
// Two parts: images (decoding + pixels) within --image-memory-mb, and KV + activations within
// the rest (the total minus the image part and the cache), so a request whose KV and activations
// fit that rest is always admitted once running requests end, and images never wait for KV (no
// wait cycle). Thread-safe; shared by the engine and each job's hold.
class MemoryBudget {
 public:
  enum Kind { kDecoding, kPixels, kKv, kActivations, kKinds };
  static const char* kind_name(Kind k);
  MemoryBudget(int64_t total, int64_t set_aside, int64_t image_cap, int64_t kv_cap);
  // Reserves `bytes` of `kind` when it fits (the total and the kind's cap); waits up to `wait`
  // for room. False on time-out or stop().
  bool reserve(Kind kind, int64_t bytes, std::chrono::milliseconds wait);
  // Reserves KV and activations together without waiting (admission); false when they do not fit.
  bool try_admit(int64_t kv, int64_t activations);  // activations: its prefill's and decode's
  void release(Kind kind, int64_t bytes);
  // Moves bytes reserved as one kind to another (never waits: the total does not change).
  void move(Kind from, Kind to, int64_t bytes);
  void stop();
  // Room for requests (the total minus what is set aside) and what one request may ask at most.
  int64_t room() const { return total_ - set_aside_; }
  int64_t request_ceiling() const { return room() - image_cap_; }
  int64_t total() const { return total_; }
  struct Snapshot {
    int64_t by_kind[kKinds] = {0, 0, 0, 0};
    int64_t peak_by_kind[kKinds] = {0, 0, 0, 0};
    int64_t images_peak = 0;  // decoding + pixels, at most
    int64_t reserved = 0, peak = 0;
  };
  Snapshot snapshot() const;

 private:
  bool fits(Kind kind, int64_t bytes) const;  // with mu_ held
  void add(Kind kind, int64_t bytes);         // with mu_ held
  const int64_t total_, set_aside_, image_cap_, kv_cap_;
  mutable std::mutex mu_;
  std::condition_variable room_;
  Snapshot s_;
  bool stopped_ = false;
};

// A reservation that returns itself to the budget when destroyed (or reset).
class MemoryHold {
 public:
  MemoryHold() = default;
  MemoryHold(std::shared_ptr<MemoryBudget> b, MemoryBudget::Kind k, int64_t bytes)
      : budget_(std::move(b)), kind_(k), bytes_(bytes) {}
  MemoryHold(MemoryHold&& o) noexcept { *this = std::move(o); }
  MemoryHold& operator=(MemoryHold&& o) noexcept {
    if (this != &o) {
      reset();
      budget_ = std::move(o.budget_);
      kind_ = o.kind_;
      bytes_ = o.bytes_;
      o.bytes_ = 0;
    }
    return *this;
  }
  ~MemoryHold() { reset(); }
  void reset() {
    if (budget_ && bytes_) budget_->release(kind_, bytes_);
    budget_.reset();
    bytes_ = 0;
  }
  int64_t bytes() const { return bytes_; }
  // Splits `bytes` (at most bytes()) off as a hold of another kind.
  MemoryHold split(MemoryBudget::Kind to, int64_t bytes) {
    bytes = std::min(bytes, bytes_);
    if (budget_ && bytes > 0) budget_->move(kind_, to, bytes);
    bytes_ -= bytes;
    return MemoryHold(budget_, to, bytes);
  }

 private:
  std::shared_ptr<MemoryBudget> budget_;
  MemoryBudget::Kind kind_ = MemoryBudget::kPixels;
  int64_t bytes_ = 0;
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
  // Everything requests hold besides the weights: images decoding and waiting as pixels, KV,
  // prefill and decode activations, with the image cache's cap set aside (MemoryBudget).
  int64_t memory_budget_bytes = 4096ll << 20;
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
  int64_t images = 0;                 // (its pixels are dropped after the prefill)
  std::vector<int64_t> visual_rows, visual_rows_plain;  // per image, under the reducer and without
  int64_t kv_reserved = 0;            // bytes the KV budget holds for it (its worst case)
  int64_t prefill_activations = 0;    // its prefill's activations at most (prefill_activation_bytes)
  int64_t decode_activations = 0;     // its share of a decode step's activations
  std::vector<MemoryHold> pixel_holds;  // its prepared images' pixels, until its prefill ends
  bool holds_kv = false, holds_prefill = false;  // engine thread: its admission's reservations
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
  MemoryBudget::Snapshot memory() const { return budget_->snapshot(); }
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
  // Gives back what a job still holds in the memory budget (before it is marked done, so a
  // client that saw its answer sees the memory given back).
  void release_memory(Job& job);
  // Appends a sampled token; returns true when the job is finished.
  bool advance(Running& r, int64_t token);
  void finish(const std::shared_ptr<Job>& job, const std::string& reason, const std::string& error = "");
  // Decodes and preprocesses one image within the memory budget (waits for room); its pixels
  // stay reserved in `pixels` until the job's prefill ends.
  PreparedImage decode_within_budget(const ChatImage& img, const ModelConfig& cfg, MemoryHold* pixels) const;
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
  std::shared_ptr<MemoryBudget> budget_;
  // The image cache: key -> encoded image [1,N,d]; LRU order in `lru_` (front = newest).
  std::list<uint64_t> lru_;
  std::unordered_map<uint64_t, std::pair<torch::Tensor, std::list<uint64_t>::iterator>> images_;
  int64_t image_cache_total_ = 0;  // bytes held by images_
  std::thread thread_;
};

uint64_t hash_bytes(const std::string& bytes);

}  // namespace victor
