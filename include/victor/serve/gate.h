// The gate in front of `victor serve`'s HTTP library: one poll() thread owns every client
// connection until its request head is complete and valid, then relays it to cpp-httplib on a
// loopback port. A slow or malformed client costs one socket here, never a worker thread there.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace victor {

struct GateOptions {
  int max_connections = 1024;         // open client connections at most (503 beyond)
  int max_connections_per_peer = 256;  // from one address at most (503 beyond)
  double header_timeout_seconds = 10;  // the request head must be complete by then (408)
  double body_timeout_seconds = 60;    // the whole body must have arrived by then (408)
  double idle_timeout_seconds = 300;   // a relayed connection with no byte either way (closed)
  size_t max_header_bytes = 64 << 10;  // request line + headers (431 beyond)
  int max_header_lines = 100;          // header lines (431 beyond)
  int64_t max_body_bytes = 64 << 20;   // Content-Length or chunked total (413 beyond)
};

struct GateCounters {
  uint64_t accepted = 0, relayed = 0, open = 0;
  uint64_t refused_busy = 0, refused_peer = 0, header_timeout = 0, body_timeout = 0,
           header_too_large = 0, body_too_large = 0, bad_request = 0, client_gone = 0;
};

class Gate {
 public:
  // Listens on host:port (0: any free port); relays to 127.0.0.1:upstream_port. Throws Error.
  Gate(const std::string& host, int port, int upstream_port, const GateOptions& options);
  ~Gate();
  int port() const;
  void start();  // the poll thread
  void stop();   // closes every connection and joins
  GateCounters counters() const;
  // True (once) when the client whose request reached the HTTP library from `upstream_port` (the
  // library's req.remote_port) has left: its work can be cancelled, streaming or not.
  bool client_gone(int upstream_port);
  std::string metrics_text() const;  // Prometheus lines

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace victor
