// The HTTP side of `victor serve` (cpp-httplib): OpenAI's chat-completions API with server-sent
// events, /v1/models, /health, /metrics and the web page.
#include <httplib.h>

#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <ctime>
#include <nlohmann/json.hpp>
#include <random>

#include "victor/error.h"
#include "victor/serve/server.h"

namespace victor {

extern const char* const kServePage;  // page.html, embedded at build time

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

std::string random_id() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  static const char* hex = "0123456789abcdef";
  std::string s = "chatcmpl-";
  for (int i = 0; i < 24; ++i) s.push_back(hex[rng() & 15]);
  return s;
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(error_body(e), "application/json");
}

// What the page and curious clients see besides OpenAI's fields.
json victor_figures(const ServeEngine& engine, const Job& job) {
  const auto& cfg = engine.model().config();
  const ModelConfig plain = without_reducer(cfg);
  const int64_t images = job.images;
  const int64_t generated = int64_t(job.tokens.size());
  const int64_t el = int64_t(c10::elementSize(engine.options().kv_dtype));
  const auto& r = cfg.reducer;
  const std::vector<int64_t>& visual = job.visual_rows, &visual_plain = job.visual_rows_plain;
  int64_t in = 0, to_llm = 0, after = 0;
  for (int64_t v : visual_plain) in += v;
  for (int64_t v : visual) {
    to_llm += v + r.inserted_rows();
    after += r.rows_past_reduction(cfg, v) - r.inserted_rows();
  }
  return {{"reducer", cfg.reducer.name()},
          {"images", images},
          {"visual_tokens_in", in},
          {"visual_tokens_to_llm", to_llm},
          {"visual_tokens_after_reduction", after},
          {"kv_bytes", job.kv_bytes},
          {"kv_bytes_plain", kv_bytes_formula(plain, job.text_tokens, visual_plain, std::max<int64_t>(generated - 1, 0), el)},
          {"time_to_first_token_seconds", job.ttft_seconds},
          {"decode_tokens_per_second", generated > 1 && job.decode_seconds > 0 ? (generated - 1) / job.decode_seconds : 0.0},
          {"image_cache_hit", images > 0 && job.vision_cached}};
}

json usage_json(const Job& job) {
  const int64_t c = int64_t(job.tokens.size());
  return {{"prompt_tokens", job.prompt_rows}, {"completion_tokens", c}, {"total_tokens", job.prompt_rows + c}};
}

// The HTTP status of a job that ended without an answer.
ApiError job_error(const Job& job) {
  if (job.finish_reason == "timeout")
    return ApiError(504, "timeout", "", "the request ran past the server's timeout (--request-timeout)");
  if (job.finish_reason == "cancelled")
    return ApiError(503, "server_error", "", "cancelled: " + (job.error.empty() ? std::string("client went away") : job.error));
  return ApiError(500, "server_error", "", job.error);
}

// Text in these documents is sanitize_utf8'd already; replacing stays as the last guard (an
// exception here would end the server).
std::string dumps(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }
// Debian's cpp-httplib was built with a listen backlog of 5: with a hundred clients connecting at
// once the kernel drops connections (clients see a reset after ~2 s). Linux lets listen() be
// called again on a listening socket to change its backlog: find ours by its port.
void widen_backlog(int port) {
  DIR* d = opendir("/proc/self/fd");
  if (!d) return;
  while (dirent* e = readdir(d)) {
    const int fd = std::atoi(e->d_name);
    if (fd <= 2) continue;
    int accepting = 0;
    socklen_t len = sizeof accepting;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &len) != 0 || !accepting) continue;
    sockaddr_storage addr{};
    socklen_t alen = sizeof addr;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &alen) != 0) continue;
    int p = addr.ss_family == AF_INET    ? ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port)
            : addr.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                                         : -1;
    if (p == port) ::listen(fd, SOMAXCONN);
  }
  closedir(d);
}

std::string sse(const json& j) { return "data: " + dumps(j) + "\n\n"; }

}  // namespace

struct Server::Impl {
  ServeEngine& engine;
  httplib::Server http;
  std::unique_ptr<Gate> gate;
  std::thread thread;
  explicit Impl(ServeEngine& e) : engine(e) {}

  json model_card() const {
    const auto& cfg = engine.model().config();
    return {{"id", engine.options().model_name},
            {"object", "model"},
            {"created", 0},
            {"owned_by", "victor"},
            {"victor",
             {{"reducer", cfg.reducer.name()},
              {"reducer_spec", cfg.reducer.spec()},
              {"weight_dtype", cfg.weight_format()},
              {"kv_dtype", engine.options().kv_dtype == torch::kBFloat16 ? "bf16" : "f32"},
              {"visual_tokens_per_image", without_reducer(cfg).visual_tokens_per_image()},
              {"context", cfg.text.max_position_embeddings},
              {"kv_budget_bytes", engine.options().kv_budget_bytes},
              {"memory_budget_bytes", engine.options().memory_budget_bytes}}}};
  }

  void completions(const httplib::Request& req, httplib::Response& res) {
    ChatRequest cr = parse_chat_request(req.body, engine.options().limits);
    const std::string& name = engine.options().model_name;
    if (!cr.model.empty() && cr.model != name)
      throw ApiError(404, "invalid_request_error", "model",
                     "model: '" + cr.model + "' is not served here (this server serves '" + name + "'; see /v1/models)");
    std::shared_ptr<Job> job = engine.make_job(cr);
    if (!engine.submit(job)) {
      res.set_header("Retry-After", "1");
      throw ApiError(503, "server_error", "", "the request queue is full (--max-queue " +
                                                 std::to_string(engine.options().limits.max_queue) + "); retry later");
    }
    const std::string id = random_id();
    const int64_t created = int64_t(std::time(nullptr));
    if (!cr.stream) {
      bool finished = false;
      // The client may leave while it waits: the gate says so, and the work stops (the engine
      // drops a cancelled job at its next step).
      while (!finished) {
        job->take(std::chrono::milliseconds(250), &finished);
        if (!finished && gate && gate->client_gone(req.remote_port)) job->cancelled = true;
      }
      std::lock_guard<std::mutex> lk(job->mu);
      if (job->finish_reason != "stop" && job->finish_reason != "length") throw job_error(*job);
      json j = {{"id", id},
                {"object", "chat.completion"},
                {"created", created},
                {"model", name},
                {"system_fingerprint", nullptr},
                {"choices",
                 json::array({{{"index", 0},
                               {"message", {{"role", "assistant"}, {"content", job->text}}},
                               {"logprobs", nullptr},
                               {"finish_reason", job->finish_reason}}})},
                {"usage", usage_json(*job)},
                {"victor", victor_figures(engine, *job)}};
      res.set_content(dumps(j), "application/json");
      return;
    }
    res.set_header("Cache-Control", "no-cache");
    const bool include_usage = cr.include_usage;
    auto sent_role = std::make_shared<bool>(false);
    ServeEngine* eng = &engine;
    res.set_chunked_content_provider(
        "text/event-stream",
        [job, id, created, name, include_usage, sent_role, eng](size_t, httplib::DataSink& sink) -> bool {
          try {
          auto chunk = [&](const json& delta, const json& finish) {
            return json{{"id", id},
                        {"object", "chat.completion.chunk"},
                        {"created", created},
                        {"model", name},
                        {"system_fingerprint", nullptr},
                        {"choices", json::array({{{"index", 0}, {"delta", delta}, {"logprobs", nullptr}, {"finish_reason", finish}}})}};
          };
          auto write = [&](const std::string& s) {
            if (sink.write(s.data(), s.size())) return true;
            job->cancelled = true;  // the client went away: the engine frees its cache
            return false;
          };
          if (!*sent_role) {
            *sent_role = true;
            return write(sse(chunk({{"role", "assistant"}, {"content", ""}}, nullptr)));
          }
          bool finished = false;
          const std::string text = job->take(std::chrono::milliseconds(1000), &finished);
          if (!text.empty() && !write(sse(chunk({{"content", text}}, nullptr)))) return false;
          // A comment line now and then: a client that left is noticed even before a token.
          if (text.empty() && !finished && !write(": keep-alive\n\n")) return false;
          if (!finished) return true;
          std::lock_guard<std::mutex> lk(job->mu);
          if (job->finish_reason != "stop" && job->finish_reason != "length") {
            ApiError e = job_error(*job);
            write("data: " + error_body(e) + "\n\n");
          } else {
            json last = chunk(json::object(), job->finish_reason);
            last["victor"] = victor_figures(*eng, *job);
            if (!write(sse(last))) return false;
            if (include_usage) {
              json u = chunk(json::object(), nullptr);
              u["choices"] = json::array();
              u["usage"] = usage_json(*job);
              if (!write(sse(u))) return false;
            }
          }
          write("data: [DONE]\n\n");
          sink.done();
          return true;
          } catch (const std::exception&) {
            job->cancelled = true;  // nothing sensible can be sent mid-stream: end it
            return false;
          }
        },
        [job](bool success) {
          if (!success) job->cancelled = true;
        });
  }
};

Server::Server(ServeEngine& engine, const std::string& host, int port, int http_threads)
    : impl_(std::make_unique<Impl>(engine)) {
  auto& http = impl_->http;
  const auto& lim = engine.options().limits;
  // Every streaming client holds a thread while it waits for tokens: enough for the queue,
  // the batch and a few more.
  const size_t threads = http_threads > 0 ? size_t(http_threads) : size_t(lim.max_queue + engine.options().max_batch + 8);
  http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  http.set_payload_max_length(size_t(lim.max_body_bytes));
  http.set_read_timeout(60);
  http.set_write_timeout(60);
  http.set_keep_alive_max_count(1000);
  Impl* impl = impl_.get();
  const ServeOptions& so = engine.options();
  // Before any route: CORS headers, the preflight, and the API key on /v1/*.
  http.set_pre_routing_handler([&so](const httplib::Request& req, httplib::Response& res) {
    if (!so.cors_origin.empty()) {
      res.set_header("Access-Control-Allow-Origin", so.cors_origin);
      res.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type");
      res.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS");
      if (req.method == "OPTIONS") {
        res.status = 204;
        return httplib::Server::HandlerResponse::Handled;
      }
    }
    if (!so.api_key.empty() && req.path.rfind("/v1/", 0) == 0 &&
        req.get_header_value("Authorization") != "Bearer " + so.api_key) {
      send_error(res, ApiError(401, "invalid_request_error", "",
                               "missing or wrong API key (send 'Authorization: Bearer <key>')"));
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });

  http.Post("/v1/chat/completions", [impl](const httplib::Request& req, httplib::Response& res) {
    try {
      impl->completions(req, res);
    } catch (const ApiError& e) {
      send_error(res, e);
    } catch (const Error& e) {
      // victor's own errors name a problem with the request's content (an image, a prompt).
      send_error(res, ApiError(400, "invalid_request_error", "", e.what()));
    } catch (const std::exception& e) {
      send_error(res, ApiError(500, "server_error", "", internal_error("the request", e)));
    }
  });
  http.Get("/v1/models", [impl](const httplib::Request&, httplib::Response& res) {
    json j = {{"object", "list"}, {"data", json::array({impl->model_card()})}};
    res.set_content(dumps(j), "application/json");
  });
  http.Get("/health", [impl](const httplib::Request&, httplib::Response& res) {
    auto c = impl->engine.counters();
    json j = {{"status", "ok"}, {"running", c.running}, {"queue", c.queue_length}};
    res.set_content(j.dump(), "application/json");
  });
  http.Get("/metrics", [impl](const httplib::Request&, httplib::Response& res) {
    res.set_content(impl->engine.metrics_text() + impl->gate->metrics_text(), "text/plain; version=0.0.4");
  });
  http.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(kServePage, "text/html; charset=utf-8");
  });
  // httplib's own refusals (413 body too large, 404 no route, 400 unreadable request) in
  // OpenAI's error shape.
  http.set_error_handler([&lim](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    std::string msg = res.status == 413 ? "request body larger than the limit of " + std::to_string(lim.max_body_bytes) + " bytes (--max-body-mb)"
                      : res.status == 404 ? "no route " + req.method + " " + req.path
                                          : "bad request (" + std::to_string(res.status) + ")";
    res.set_content(error_body(ApiError(res.status, "invalid_request_error", "", msg)), "application/json");
  });
  // cpp-httplib listens on loopback only; clients reach it through the gate (serve/gate.h), which
  // holds slow and malformed clients itself and bounds heads, bodies and connections.
  const int http_port = http.bind_to_any_port("127.0.0.1");
  if (http_port <= 0) throw Error("serve: cannot listen on 127.0.0.1 (any port) for the HTTP library");
  widen_backlog(http_port);
  GateOptions g = engine.options().gate;
  g.max_body_bytes = lim.max_body_bytes;
  impl_->gate = std::make_unique<Gate>(host, port, http_port, g);
  port_ = impl_->gate->port();
}

Server::~Server() { stop(); }

void Server::run() {
  impl_->gate->start();
  impl_->http.listen_after_bind();
}

void Server::start() {
  impl_->thread = std::thread([this] { impl_->http.listen_after_bind(); });
  for (int i = 0; i < 500 && !impl_->http.is_running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  impl_->gate->start();
}

void Server::stop() {
  if (!impl_) return;
  if (impl_->gate) impl_->gate->stop();
  impl_->http.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

}  // namespace victor
