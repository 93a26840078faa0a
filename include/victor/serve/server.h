// `victor serve`: an OpenAI-compatible chat-completions server with continuous batching, a KV
// budget for admission and a cache of encoded images. Three layers, each testable alone:
//   parse_chat_request   the request body -> a ChatRequest (pure; every error names its field)
//   ServeEngine          one scheduler thread: admits jobs under the KV budget, prefills new ones
//                        between decode steps of the running ones, caches encoded images
//   Server               cpp-httplib routes: /v1/chat/completions (+ SSE), /v1/models, /health,
//                        /metrics (Prometheus), / (the web page)
//
// This header is the HTTP layer (src/serve/server.cpp); the engine is in serve/engine.h
// (engine.cpp), the text and metrics pieces in serve/stream.h (stream.cpp), the request parser in
// serve/api.h (api.cpp), the connection gate in serve/gate.h (gate.cpp).
#pragma once
#include <memory>
#include <string>

#include "victor/serve/engine.h"

namespace victor {

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
