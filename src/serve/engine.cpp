// The serving engine: one scheduler thread runs continuous batching over per-request caches.
// Each loop admits up to --prefills-per-step waiting requests (while the KV budget and the batch
// allow), prefills them, then runs one decode step for every running request; requests leave the
// batch when done.
#include <malloc.h>

#include <atomic>
#include <iostream>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <functional>
#include <random>
#include <sstream>

#include "victor/error.h"
#include "victor/image.h"
#include "victor/serve/engine.h"

namespace victor {

namespace {
using Clock = std::chrono::steady_clock;
double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}
std::string mib(int64_t bytes) {
  std::ostringstream o;
  o.precision(1);
  o << std::fixed << bytes / 1048576.0 << " MiB";
  return o.str();
}
}  // namespace

uint64_t hash_bytes(const std::string& bytes) {
  // FNV-1a over the bytes, then the length mixed in (splitmix64 finaliser).
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  uint64_t z = h + 0x9E3779B97F4A7C15ull * (bytes.size() + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

const char* MemoryBudget::kind_name(Kind k) {
  switch (k) {
    case kDecoding: return "decoding";
    case kPixels: return "pixels";
    case kKv: return "kv";
    case kActivations: return "activations";
    default: return "?";
  }
}

MemoryBudget::MemoryBudget(int64_t total, int64_t set_aside, int64_t image_cap, int64_t kv_cap)
    : total_(total), set_aside_(set_aside), image_cap_(image_cap), kv_cap_(kv_cap) {
  if (request_ceiling() <= 0)
    throw Error("--memory-budget-mb (" + mib(total) + ") must exceed --image-cache-mb (" + mib(set_aside) +
                ") + --image-memory-mb (" + mib(image_cap) + "): nothing would be left for a request's KV and activations");
}

bool MemoryBudget::fits(Kind kind, int64_t bytes) const {
  // Two parts: images (decoding + pixels) within their cap, KV + activations within the rest.
  if (kind == kDecoding || kind == kPixels) return s_.by_kind[kDecoding] + s_.by_kind[kPixels] + bytes <= image_cap_;
  if (kind == kKv && s_.by_kind[kKv] + bytes > kv_cap_) return false;
  return s_.by_kind[kKv] + s_.by_kind[kActivations] + bytes <= request_ceiling();
}

void MemoryBudget::add(Kind kind, int64_t bytes) {
  s_.by_kind[kind] += bytes;
  s_.reserved += bytes;
  s_.peak = std::max(s_.peak, s_.reserved);
  s_.peak_by_kind[kind] = std::max(s_.peak_by_kind[kind], s_.by_kind[kind]);
  s_.images_peak = std::max(s_.images_peak, s_.by_kind[kDecoding] + s_.by_kind[kPixels]);
}

bool MemoryBudget::reserve(Kind kind, int64_t bytes, std::chrono::milliseconds wait) {
  std::unique_lock<std::mutex> lk(mu_);
  if (!room_.wait_for(lk, wait, [&] { return stopped_ || fits(kind, bytes); }) || stopped_) return false;
  add(kind, bytes);
  return true;
}

bool MemoryBudget::try_admit(int64_t kv, int64_t activations) {
  std::lock_guard<std::mutex> lk(mu_);
  if (stopped_ || !fits(kKv, kv) || !fits(kActivations, kv + activations)) return false;
  add(kKv, kv);
  add(kActivations, activations);
  return true;
}

void MemoryBudget::release(Kind kind, int64_t bytes) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    s_.by_kind[kind] -= bytes;
    s_.reserved -= bytes;
  }
  room_.notify_all();
}

void MemoryBudget::move(Kind from, Kind to, int64_t bytes) {
  std::lock_guard<std::mutex> lk(mu_);
  s_.by_kind[from] -= bytes;
  s_.reserved -= bytes;
  add(to, bytes);
}

void MemoryBudget::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopped_ = true;
  }
  room_.notify_all();
}

MemoryBudget::Snapshot MemoryBudget::snapshot() const {
  std::lock_guard<std::mutex> lk(mu_);
  return s_;
}

std::string Job::take(std::chrono::milliseconds wait, bool* finished) {
  std::unique_lock<std::mutex> lk(mu);
  if (pending_text.empty() && !done) cv.wait_for(lk, wait, [&] { return !pending_text.empty() || done; });
  std::string out;
  out.swap(pending_text);
  *finished = done;  // everything released has been taken
  return out;
}

ServeEngine::ServeEngine(const Vlm& model, const Tokenizer& tok, ServeOptions opt)
    : model_(model), tok_(tok), opt_(std::move(opt)) {
  if (opt_.kv_budget_bytes <= 0) throw Error("--kv-budget-mb must be > 0");
  if (opt_.max_batch < 1) throw Error("--max-batch must be >= 1");
  if (opt_.prefills_per_step < 1) throw Error("--prefills-per-step must be >= 1");
  budget_ = std::make_shared<MemoryBudget>(opt_.memory_budget_bytes, opt_.image_cache_bytes, opt_.image_memory_bytes,
                                           opt_.kv_budget_bytes);
  thread_ = std::thread([this] { loop(); });
}

ServeEngine::~ServeEngine() { stop(); }

void ServeEngine::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.notify_all();
  budget_->stop();
  if (thread_.joinable()) thread_.join();
  for (auto& r : running_) finish(r.job, "cancelled", "the server is shutting down");
  running_.clear();
  std::deque<std::shared_ptr<Job>> left;
  {
    std::lock_guard<std::mutex> lk(mu_);
    left.swap(pending_);
  }
  for (auto& j : left) finish(j, "cancelled", "the server is shutting down");
}

namespace {
// The most bytes decoding and preprocessing one image holds at once: the decoder's buffers (stb
// inflates a PNG into one buffer, unfilters it into a second, victor copies it into a third:
// three times the RGB bytes, measured), the padded square, the resize's horizontal pass and its
// float output, the rescale's double copy.
int64_t preprocess_bytes(int w, int h, const ModelConfig& c) {
  const PreprocessConfig& p = c.preprocess;
  if (c.is_next()) {
    // Decoded RGB, the base view's resize, the chosen pinpoint's resize and black canvas (floats),
    // and the normalized views (with a temporary each).
    const ImageLayout l = image_layout(w, h, c);  // throws when the cap leaves nothing
    const int64_t S = p.crop_size, E = p.shortest_edge;
    int64_t total = 3 * int64_t(w) * h + E * int64_t(h) * 3 + E * E * 3 * 4;
    if (l.grid_rows > 0) {
      const int64_t bh = l.grid_rows * S, bw = l.grid_cols * S;
      total += bw * int64_t(h) * 3 + bh * bw * 3 * 4 * 2;
    }
    return total + int64_t(l.views()) * S * S * 3 * 4 * 3;
  }
  int64_t pw = w, ph = h, total = 3 * int64_t(w) * h * 3;
  if (p.pad_to_square && w != h) {
    pw = ph = std::max(w, h);
    total += pw * ph * 3;
  }
  const ResizeCrop rc = resize_crop(int(pw), int(ph), p);  // throws for extreme aspect ratios
  total += int64_t(rc.width) * ph * 3 + int64_t(rc.width) * rc.height * 3 * 4;
  total += int64_t(p.crop_size) * p.crop_size * 3 * 8;
  return total;
}
}  // namespace

PreparedImage ServeEngine::decode_within_budget(const ChatImage& img, const ModelConfig& cfg, MemoryHold* pixels) const {
  int w = 0, h = 0;
  if (!image_dimensions(img.bytes, &w, &h))
    throw ApiError(400, "invalid_request_error", img.field,
                   img.field + ": not a readable image (PNG, JPEG and BMP are supported)");
  if (int64_t(w) * h > opt_.limits.max_image_pixels)
    throw ApiError(413, "invalid_request_error", img.field,
                   img.field + ": image of " + std::to_string(w) + "x" + std::to_string(h) +
                       " pixels is over the limit of " + std::to_string(opt_.limits.max_image_pixels) + " pixels");
  int64_t need = 0;
  try {
    need = preprocess_bytes(w, h, cfg);
  } catch (const Error& e) {
    throw ApiError(413, "invalid_request_error", img.field, img.field + ": " + e.what());
  }
  if (need > opt_.image_memory_bytes)
    throw ApiError(413, "invalid_request_error", img.field,
                   img.field + ": image of " + std::to_string(w) + "x" + std::to_string(h) + " needs " +
                       std::to_string(need >> 20) + " MiB to decode and preprocess, more than the server's " +
                       std::to_string(opt_.image_memory_bytes >> 20) + " MiB (--image-memory-mb)");
  if (!budget_->reserve(MemoryBudget::kDecoding, need, std::chrono::seconds(30)))
    throw ApiError(503, "server_error", "", "the server is busy decoding other images; retry shortly");
  struct Release {
    MemoryHold hold;
    ~Release() {
      const int64_t n = hold.bytes();  // (what is left after the pixels' split: still large)
      hold.reset();
      // Hand a large decode's freed pages back to the kernel (`victor serve` allocates from one
      // arena: tune_allocator; before both: 2.5 GB for 16 requests of 8 4096^2 images, staying).
#ifdef __GLIBC__
      if (n >= (16 << 20)) malloc_trim(0);
#endif
    }
  } release{MemoryHold(budget_, MemoryBudget::kDecoding, need)};
  Image decoded;
  try {
    decoded = decode_image(img.bytes, img.field);
  } catch (const Error& e) {
    throw ApiError(400, "invalid_request_error", img.field, e.what());
  }
  PreparedImage p;
  try {
    p = prepare_image(decoded, cfg);
  } catch (const Error& e) {
    throw ApiError(413, "invalid_request_error", img.field, img.field + ": " + e.what());
  }
  // The pixels stay until the prefill: their bytes move from decoding to pixels (they are part of
  // `need`), before the rest of the decoding share goes back.
  const int64_t px = p.pixels.numel() * int64_t(p.pixels.element_size());
  *pixels = release.hold.split(MemoryBudget::kPixels, px);
  return p;
}

std::shared_ptr<Job> ServeEngine::make_job(const ChatRequest& r) const {
  // The request's own image-token cap, within the server's (LLaVA-NeXT).
  ModelConfig cfg = model_.config();
  if (r.max_crops || r.max_image_tokens) {
    if (!cfg.is_next())
      throw ApiError(400, "invalid_request_error", r.max_crops ? "max_crops" : "max_image_tokens",
                     std::string(r.max_crops ? "max_crops" : "max_image_tokens") +
                         ": this model is LLaVA-1.5 (one view per image); the cap applies to LLaVA-NeXT's crops");
    auto tighter = [](int server, int asked) { return asked == 0 ? server : server == 0 ? asked : std::min(server, asked); };
    cfg.preprocess.max_crops = tighter(cfg.preprocess.max_crops, r.max_crops);
    cfg.preprocess.max_image_tokens = tighter(cfg.preprocess.max_image_tokens, r.max_image_tokens);
  }
  auto job = std::make_shared<Job>();
  // Refused before tokenizing: text that cannot fit the context however it is split.
  size_t text_bytes = 0;
  for (auto& t : r.turns) text_bytes += t.human.size() + t.assistant.size();
  const size_t ctx_bytes = size_t(cfg.text.max_position_embeddings) * tok_.max_bytes_per_token();
  if (text_bytes > ctx_bytes)
    throw ApiError(400, "invalid_request_error", "messages",
                   "messages: " + std::to_string(text_bytes) + " bytes of text cannot fit in the model's context of " +
                       std::to_string(cfg.text.max_position_embeddings) + " tokens");
  job->input.ids = encode_chat(tok_, r.turns).ids;
  std::vector<torch::Tensor> px;
  for (auto& img : r.images) {
    job->pixel_holds.emplace_back();
    PreparedImage p = decode_within_budget(img, cfg, &job->pixel_holds.back());
    px.push_back(p.pixels);
    if (cfg.is_next()) job->input.layouts.push_back(p.layout);
    // The cache holds an image's packed rows: the same bytes under another cap are another entry.
    const ImageLayout& l = p.layout;
    job->image_keys.push_back(hash_bytes(img.bytes) ^ (uint64_t(l.grid_rows) * 0x9E3779B97F4A7C15ull) ^
                              (uint64_t(l.grid_cols) * 0xC2B2AE3D27D4EB4Full));
  }
  const int64_t n = int64_t(r.images.size());
  if (n > 0) job->input.pixels = torch::cat(px, 0);
  job->text_tokens = int64_t(job->input.ids.size()) - n;
  job->images = n;
  const std::vector<int64_t> visual = visual_rows_of(cfg, job->input);
  job->visual_rows = visual;
  job->visual_rows_plain = visual_rows_of(without_reducer(cfg), job->input);
  job->prompt_rows = job->text_tokens + n * cfg.reducer.inserted_rows();
  for (int64_t v : visual) job->prompt_rows += v;
  const int64_t ctx = cfg.text.max_position_embeddings;
  if (job->prompt_rows >= ctx)
    throw ApiError(400, "invalid_request_error", "messages",
                   "messages: the prompt takes " + std::to_string(job->prompt_rows) +
                       " rows (text and visual tokens), the model's context is " + std::to_string(ctx));
  int max_new = r.max_tokens ? *r.max_tokens
                             : int(std::min<int64_t>(opt_.limits.default_max_tokens, ctx - job->prompt_rows));
  if (job->prompt_rows + max_new > ctx)
    throw ApiError(400, "invalid_request_error", "max_tokens",
                   "max_tokens: the prompt's " + std::to_string(job->prompt_rows) + " rows + " +
                       std::to_string(max_new) + " new tokens exceed the model's context of " + std::to_string(ctx));
  SamplingOptions& s = job->sampling;
  s.max_new_tokens = max_new;
  s.temperature = r.temperature;
  s.top_p = r.top_p;
  s.top_k = r.top_k;
  s.seed = r.seed ? *r.seed : std::random_device{}() * 4294967296ull + std::random_device{}();
  s.kv_dtype = opt_.kv_dtype;
  job->stop = r.stop;
  job->ignore_eos = r.ignore_eos;
  job->kv_reserved =
      kv_bytes_formula(cfg, job->text_tokens, visual, max_new, int64_t(c10::elementSize(opt_.kv_dtype)));
  if (job->kv_reserved > opt_.kv_budget_bytes)
    throw ApiError(400, "invalid_request_error", "max_tokens",
                   "max_tokens: this request needs " + mib(job->kv_reserved) +
                       " of KV cache at most, more than the server's whole budget (--kv-budget-mb " +
                       mib(opt_.kv_budget_bytes) + "); ask for fewer tokens or images");
  // Activations: the prefill's (released when it ends) and a share of each decode step's (one
  // row through a layer, its scores over the whole context, the logits), held while it runs.
  int64_t views = 0;
  for (auto& l : job->input.layouts) views = std::max<int64_t>(views, l.views());
  if (n > 0 && views == 0) views = 1;
  job->prefill_activations = prefill_activation_bytes(cfg, job->text_tokens, visual, views);
  {
    const TextConfig& t = cfg.text;
    job->decode_activations = 4 * (11 * int64_t(t.hidden_size) + 4 * int64_t(t.intermediate_size) + t.vocab_size +
                                   3 * int64_t(t.num_attention_heads) * (job->prompt_rows + max_new));
  }
  const int64_t want = job->kv_reserved + job->decode_activations + job->prefill_activations;
  if (want > budget_->request_ceiling())
    throw ApiError(400, "invalid_request_error", "messages",
                   "messages: this request needs " + mib(job->kv_reserved) + " of KV cache and " +
                       mib(job->prefill_activations + job->decode_activations) +
                       " of activations at most, more than the server's memory budget leaves for one request (" +
                       mib(budget_->request_ceiling()) +
                       " = --memory-budget-mb - --image-cache-mb - --image-memory-mb); ask for fewer tokens or images");
  job->created = Clock::now();
  job->deadline = job->created + std::chrono::milliseconds(int64_t(opt_.limits.request_timeout_seconds * 1000));
  return job;
}

bool ServeEngine::submit(const std::shared_ptr<Job>& job) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_ || int(pending_.size()) >= opt_.limits.max_queue) {
      ++counters_.rejected_queue_full;
      return false;
    }
    pending_.push_back(job);
    counters_.queue_length = int64_t(pending_.size());
  }
  cv_.notify_all();
  return true;
}

EngineCounters ServeEngine::counters() const {
  std::lock_guard<std::mutex> lk(mu_);
  return counters_;
}

// An internal failure's text (a LibTorch message with its stack and load addresses) goes to the
// server's log under an id; the client gets the id and a clean sentence.
std::string internal_error(const std::string& stage, const std::exception& e) {
  static std::atomic<uint64_t> next{1};
  const std::string id = "err-" + std::to_string(next++);
  std::string what = e.what();
  std::cerr << "victor serve: " << id << ": " << stage << " failed: " << what << "\n";
  return "internal error during " + stage + " (" + id + " in the server log)";
}

void ServeEngine::finish(const std::shared_ptr<Job>& job, const std::string& reason, const std::string& error) {
  // Called by the engine thread only (and by stop() after it ended). The counters move before the
  // job is marked done, so a client that saw its answer also sees it counted in /metrics.
  int64_t tokens = 0;
  double decode_seconds = 0;
  {
    std::lock_guard<std::mutex> lk(job->mu);
    if (job->done) return;
    tokens = int64_t(job->tokens.size());
    decode_seconds = job->decode_seconds;
  }
  release_memory(*job);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (reason == "stop" || reason == "length") ++counters_.requests_ok;
    else if (reason == "cancelled") ++counters_.requests_cancelled;
    else if (reason == "timeout") ++counters_.requests_timeout;
    else ++counters_.requests_error;
    counters_.completion_tokens += uint64_t(tokens);
    if (tokens > 1 && decode_seconds > 0) tps_.observe(double(tokens - 1) / decode_seconds);
  }
  {
    std::lock_guard<std::mutex> lk(job->mu);
    job->done = true;
    job->finish_reason = reason;
    job->error = error;
  }
  job->cv.notify_all();
}

std::vector<torch::Tensor> ServeEngine::image_embeds(const Job& job, bool* all_cached) {
  *all_cached = true;
  std::vector<torch::Tensor> out;
  if (!job.input.pixels.defined() || job.input.pixels.size(0) == 0) return out;
  int64_t view = 0;  // the first view of image i
  uint64_t hits = 0, misses = 0;
  for (size_t i = 0; i < job.image_keys.size(); ++i) {
    const uint64_t key = job.image_keys[i];
    const ImageLayout layout = job.input.layouts.empty() ? ImageLayout{} : job.input.layouts[i];
    const int64_t first = view;
    view += layout.views();
    auto it = images_.find(key);
    if (it != images_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second.second);
      out.push_back(it->second.first);
      ++hits;
      continue;
    }
    *all_cached = false;
    ++misses;
    // The image's packed rows [N,d] (LLaVA-NeXT: base view, crops and newlines).
    auto e = model_.encode_image(job.input.pixels.narrow(0, first, layout.views()), layout);
    out.push_back(e);
    const int64_t bytes = e.numel() * int64_t(e.element_size());
    if (bytes <= opt_.image_cache_bytes) {
      lru_.push_front(key);
      images_[key] = {e, lru_.begin()};
      image_cache_total_ += bytes;
      while (image_cache_total_ > opt_.image_cache_bytes && !lru_.empty()) {
        auto victim = images_.find(lru_.back());
        image_cache_total_ -= victim->second.first.numel() * int64_t(victim->second.first.element_size());
        images_.erase(victim);
        lru_.pop_back();
      }
    }
  }
  std::lock_guard<std::mutex> lk(mu_);
  counters_.image_cache_bytes = image_cache_total_;
  counters_.image_cache_hits += hits;
  counters_.image_cache_misses += misses;
  counters_.vision_runs += misses;
  return out;
}

bool ServeEngine::advance(Running& r, int64_t token) {
  auto& job = *r.job;
  const bool eos = token == tok_.eos_id() && !job.ignore_eos;
  std::string text;
  bool length = false;
  if (!eos) {
    text = r.stream->push(token);
    std::lock_guard<std::mutex> lk(job.mu);
    job.tokens.push_back(token);
    length = int64_t(job.tokens.size()) >= job.sampling.max_new_tokens;
  }
  const bool stopped = r.stream->stopped();
  if ((eos || length) && !stopped) text += r.stream->finish();
  {
    std::lock_guard<std::mutex> lk(job.mu);
    job.pending_text += text;
    job.text += text;
    if (!job.tokens.empty()) job.decode_seconds = seconds_between(r.decode_start, Clock::now());
    job.kv_bytes = r.cache.bytes();
  }
  if (!text.empty()) job.cv.notify_all();
  r.next = token;
  if (eos || stopped) {
    finish(r.job, "stop");
    return true;
  }
  if (length) {
    finish(r.job, "length");
    return true;
  }
  return false;
}

void ServeEngine::release_memory(Job& job) {
  if (job.holds_prefill) budget_->release(MemoryBudget::kActivations, job.prefill_activations);
  job.holds_prefill = false;
  job.pixel_holds.clear();
  if (!job.holds_kv) return;
  job.holds_kv = false;
  budget_->release(MemoryBudget::kKv, job.kv_reserved);
  budget_->release(MemoryBudget::kActivations, job.decode_activations);
  std::lock_guard<std::mutex> lk(mu_);
  counters_.kv_bytes_reserved -= job.kv_reserved;
}

bool ServeEngine::prefill(const std::shared_ptr<Job>& job) {
  Running r;
  r.job = job;
  try {
    bool cached = false;
    std::vector<torch::Tensor> embeds = image_embeds(*job, &cached);
    SequenceBatch batch = model_.assemble({job->input}, embeds, /*pad_left=*/true);
    auto [cache, logits] = model_.prefill(batch, opt_.kv_dtype, job->sampling.max_new_tokens);
    r.cache = std::move(cache);
    r.gen = at::detail::createCPUGenerator(job->sampling.seed);
    r.stream = std::make_unique<TextStream>(tok_, job->stop);
    const int64_t first = sample_next(logits, job->sampling, r.gen).item<int64_t>();
    const auto now = Clock::now();
    {
      std::lock_guard<std::mutex> lk(job->mu);
      job->ttft_seconds = seconds_between(job->created, now);
      job->vision_cached = cached;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      ttft_.observe(job->ttft_seconds);
      counters_.prompt_tokens += uint64_t(job->prompt_rows);
    }
    r.decode_start = now;
    if (advance(r, first)) return false;
  } catch (const std::exception& e) {
    finish(job, "error", internal_error("prefill", e));
    return false;
  }
  running_.push_back(std::move(r));
  return true;
}

void ServeEngine::loop() {
  torch::NoGradGuard no_grad;  // thread-local: this thread runs the model
  while (true) {
    std::vector<std::shared_ptr<Job>> admitted;
    std::vector<std::shared_ptr<Job>> expired;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !pending_.empty() || !running_.empty(); });
      if (stop_) return;
      const auto now = Clock::now();
      for (auto it = pending_.begin(); it != pending_.end();) {
        if ((*it)->cancelled || now > (*it)->deadline) {
          expired.push_back(*it);
          it = pending_.erase(it);
        } else {
          ++it;
        }
      }
      // Admission: the oldest waiting request, when its worst-case KV and its activations fit
      // the memory budget beside everything held now (a request alone always fits once the
      // running ones end: make_job refused any larger than the budget's ceiling per request).
      while (!pending_.empty() && int(admitted.size()) < opt_.prefills_per_step &&
             int(running_.size() + admitted.size()) < opt_.max_batch &&
             budget_->try_admit(pending_.front()->kv_reserved,
                                pending_.front()->decode_activations + pending_.front()->prefill_activations)) {
        admitted.push_back(pending_.front());
        pending_.pop_front();
        admitted.back()->holds_kv = admitted.back()->holds_prefill = true;
        counters_.kv_bytes_reserved += admitted.back()->kv_reserved;
      }
      counters_.queue_length = int64_t(pending_.size());
    }
    for (auto& j : expired) finish(j, j->cancelled ? "cancelled" : "timeout", j->cancelled ? "" : "timed out in the queue");
    for (auto& job : admitted) {
      const bool running = prefill(job);
      // The prefill's activations and the prepared pixels are gone now (a job that already
      // finished gave back everything in finish()).
      if (job->holds_prefill) budget_->release(MemoryBudget::kActivations, job->prefill_activations);
      job->holds_prefill = false;
      job->pixel_holds.clear();
      job->input.pixels = torch::Tensor();
      if (!running) release_memory(*job);
    }
    // Leaves the batch (freeing its cache and its reservation) every request for which `gone`.
    auto release_if = [&](const std::function<bool(size_t)>& gone) {
      std::vector<Running> keep;
      std::vector<std::shared_ptr<Job>> gone_jobs;
      for (size_t i = 0; i < running_.size(); ++i) {
        if (gone(i)) gone_jobs.push_back(running_[i].job);
        else keep.push_back(std::move(running_[i]));
      }
      running_.swap(keep);
      for (auto& j : gone_jobs) release_memory(*j);
    };
    // Cancelled (client gone) or timed out.
    const auto now = Clock::now();
    release_if([&](size_t i) {
      auto& job = running_[i].job;
      if (!job->cancelled && now <= job->deadline) return false;
      finish(job, job->cancelled ? "cancelled" : "timeout", job->cancelled ? "" : "timed out");
      return true;
    });
    if (!running_.empty()) {
      std::vector<bool> finished(running_.size(), false);
      try {
        std::vector<KvCache*> caches;
        std::vector<int64_t> ids;
        for (auto& r : running_) {
          caches.push_back(&r.cache);
          ids.push_back(r.next);
        }
        auto logits = model_.decode_step(torch::tensor(ids, torch::kInt64), caches);
        for (size_t i = 0; i < running_.size(); ++i) {
          auto& r = running_[i];
          const int64_t t = sample_next(logits.narrow(0, int64_t(i), 1), r.job->sampling, r.gen).item<int64_t>();
          finished[i] = advance(r, t);
        }
      } catch (const std::exception& e) {
        for (size_t i = 0; i < running_.size(); ++i) {
          finish(running_[i].job, "error", internal_error("decode", e));
          finished[i] = true;
        }
      }
      release_if([&](size_t i) { return bool(finished[i]); });
    }
    int64_t in_use = 0;
    for (auto& r : running_) in_use += r.cache.bytes();
    std::lock_guard<std::mutex> lk(mu_);
    counters_.kv_bytes_in_use = in_use;
    counters_.running = int64_t(running_.size());
    counters_.max_running_seen = std::max(counters_.max_running_seen, counters_.running);
    if (!running_.empty()) ++counters_.decode_steps;
  }
}

std::string ServeEngine::metrics_text() const {
  std::lock_guard<std::mutex> lk(mu_);
  const auto& c = counters_;
  std::ostringstream o;
  auto metric = [&](const char* name, const char* type, const char* help, auto value) {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n"
      << name << " " << value << "\n";
  };
  o << "# HELP victor_requests_total Finished chat completions by outcome.\n"
    << "# TYPE victor_requests_total counter\n"
    << "victor_requests_total{outcome=\"ok\"} " << c.requests_ok << "\n"
    << "victor_requests_total{outcome=\"error\"} " << c.requests_error << "\n"
    << "victor_requests_total{outcome=\"cancelled\"} " << c.requests_cancelled << "\n"
    << "victor_requests_total{outcome=\"timeout\"} " << c.requests_timeout << "\n"
    << "victor_requests_total{outcome=\"rejected_queue_full\"} " << c.rejected_queue_full << "\n";
  metric("victor_prompt_tokens_total", "counter", "Prompt rows prefilled (text + visual + register tokens).", c.prompt_tokens);
  metric("victor_completion_tokens_total", "counter", "Tokens generated.", c.completion_tokens);
  metric("victor_queue_length", "gauge", "Requests waiting for admission.", c.queue_length);
  metric("victor_running_requests", "gauge", "Requests in the decode batch.", c.running);
  metric("victor_running_requests_max", "gauge", "Most requests that were ever in the decode batch at once.", c.max_running_seen);
  metric("victor_kv_bytes_in_use", "gauge", "KV-cache bytes held by running requests.", c.kv_bytes_in_use);
  metric("victor_kv_bytes_reserved", "gauge", "KV-cache bytes reserved by admission (worst case of running requests).", c.kv_bytes_reserved);
  metric("victor_kv_budget_bytes", "gauge", "The admission budget (--kv-budget-mb).", opt_.kv_budget_bytes);
  metric("victor_vision_runs_total", "counter", "Images encoded by the vision tower.", c.vision_runs);
  metric("victor_image_cache_hits_total", "counter", "Images served from the image cache.", c.image_cache_hits);
  metric("victor_image_cache_misses_total", "counter", "Images not in the image cache.", c.image_cache_misses);
  metric("victor_image_cache_bytes", "gauge", "Bytes of encoded images cached.", c.image_cache_bytes);
  const MemoryBudget::Snapshot m = budget_->snapshot();
  metric("victor_image_bytes_in_flight", "gauge", "Bytes held by images being decoded and preprocessed, and by prepared pixels waiting for their prefill.",
         m.by_kind[MemoryBudget::kDecoding] + m.by_kind[MemoryBudget::kPixels]);
  metric("victor_image_bytes_peak", "gauge", "Most bytes images in flight ever held at once.", m.images_peak);
  metric("victor_image_memory_budget_bytes", "gauge", "Their cap within the memory budget (--image-memory-mb).", opt_.image_memory_bytes);
  o << "# HELP victor_memory_bytes_reserved Bytes reserved in the memory budget, by kind.\n"
    << "# TYPE victor_memory_bytes_reserved gauge\n";
  for (int k = 0; k < MemoryBudget::kKinds; ++k)
    o << "victor_memory_bytes_reserved{kind=\"" << MemoryBudget::kind_name(MemoryBudget::Kind(k)) << "\"} "
      << m.by_kind[k] << "\n";
  metric("victor_memory_bytes_reserved_peak", "gauge", "Most bytes ever reserved in the memory budget at once (all kinds).", m.peak);
  metric("victor_memory_budget_bytes", "gauge", "The memory budget (--memory-budget-mb); the image cache's cap is set aside from it.",
         budget_->total());
  metric("victor_decode_steps_total", "counter", "Batched decode steps run.", c.decode_steps);
  o << ttft_.prometheus("victor_time_to_first_token_seconds", "Arrival to first token, per request.");
  o << tps_.prometheus("victor_decode_tokens_per_second", "Decode speed per finished request.");
  return o.str();
}

}  // namespace victor
