// The gate: victor serve's own accept loop in front of cpp-httplib (serve/gate.h says why).
// One thread, poll(): each client is held here until its request head is complete and valid
// (deadline, size, line count, Content-Length / chunked sizes), then relayed to the library on
// loopback with `Connection: close` (one request per connection: a pipelined second request is
// not answered, the connection closes after the first response).
#include "victor/serve/gate.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "victor/error.h"
#include "victor/serve/http_head.h"
#include "victor/serve/api.h"

namespace victor {

namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kRelayBuffer = 1 << 20;  // bytes buffered toward a slow reader before pausing

std::chrono::milliseconds ms(double seconds) { return std::chrono::milliseconds(int64_t(seconds * 1000)); }

std::string http_reply(int status, const char* reason, const std::string& message, const std::string& extra = "") {
  const std::string body =
      error_body(ApiError(status, status >= 500 ? "server_error" : "invalid_request_error", "", message));
  return "HTTP/1.1 " + std::to_string(status) + " " + reason +
         "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
         "\r\nConnection: close\r\n" + extra + "\r\n" + body;
}

void set_nonblocking(int fd) { ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK); }

struct Conn {
  int fd = -1, up = -1;
  std::string peer;
  enum Phase { Head, Body, Relay, Reply } phase = Head;
  std::string in, to_up, to_client;
  Clock::time_point head_deadline, body_deadline, last_activity;
  bool chunked = false, up_eof = false;
  int64_t body_left = 0;
  ChunkScanner chunks;
};

}  // namespace

struct Gate::Impl {
  GateOptions o;
  HeadLimits limits() const { return {o.max_header_bytes, o.max_header_lines, o.max_body_bytes}; }
  int listen_fd = -1, port = 0, upstream_port = 0;
  int wake[2] = {-1, -1};
  std::atomic<bool> stopping{false};
  std::thread thread;
  std::list<Conn> conns;
  std::map<std::string, int> per_peer;
  mutable std::mutex mu;  // counters, gone
  GateCounters counters;
  std::map<int, Clock::time_point> gone;  // upstream local ports whose client left

  void note_gone(const Conn& c) {
    if (c.up < 0) return;
    sockaddr_in a{};
    socklen_t len = sizeof a;
    if (::getsockname(c.up, reinterpret_cast<sockaddr*>(&a), &len) != 0) return;
    const auto now = Clock::now();
    std::lock_guard<std::mutex> lk(mu);
    for (auto it = gone.begin(); it != gone.end();) it = now - it->second > std::chrono::minutes(10) ? gone.erase(it) : std::next(it);
    gone[ntohs(a.sin_port)] = now;
  }

  void count(uint64_t GateCounters::*field) {
    std::lock_guard<std::mutex> lk(mu);
    ++(counters.*field);
  }

  void close_conn(std::list<Conn>::iterator it) {
    if (it->fd >= 0) ::close(it->fd);
    if (it->up >= 0) ::close(it->up);
    if (--per_peer[it->peer] <= 0) per_peer.erase(it->peer);
    conns.erase(it);
  }

  // Ends the exchange with an error reply (the upstream connection, if any, is dropped).
  void refuse(Conn& c, int status, const char* reason, const std::string& message, uint64_t GateCounters::*field) {
    count(field);
    if (c.up >= 0) {
      ::close(c.up);
      c.up = -1;
    }
    c.to_up.clear();
    c.to_client = http_reply(status, reason, message);
    c.phase = Conn::Reply;
  }

  void accept_all() {
    for (;;) {
      sockaddr_storage addr{};
      socklen_t len = sizeof addr;
      const int fd = ::accept4(listen_fd, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;
      char host[INET6_ADDRSTRLEN] = "?";
      if (addr.ss_family == AF_INET)
        ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&addr)->sin_addr, host, sizeof host);
      else if (addr.ss_family == AF_INET6)
        ::inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&addr)->sin6_addr, host, sizeof host);
      count(&GateCounters::accepted);
      const bool busy = int(conns.size()) >= o.max_connections;
      const bool peer_full = per_peer[host] >= o.max_connections_per_peer;
      if (busy || peer_full) {
        // Best effort, never blocking: the reply fits a fresh socket's buffer.
        const std::string r = http_reply(503, "Service Unavailable",
                                         busy ? "too many open connections (--max-connections); retry shortly"
                                              : "too many open connections from your address (--max-connections-per-peer)",
                                         "Retry-After: 1\r\n");
        [[maybe_unused]] ssize_t w = ::send(fd, r.data(), r.size(), MSG_NOSIGNAL);
        ::close(fd);
        count(busy ? &GateCounters::refused_busy : &GateCounters::refused_peer);
        if (per_peer[host] == 0) per_peer.erase(host);
        continue;
      }
      ++per_peer[host];
      Conn c;
      c.fd = fd;
      c.peer = host;
      c.head_deadline = Clock::now() + ms(o.header_timeout_seconds);
      c.last_activity = Clock::now();
      conns.push_back(std::move(c));
    }
  }

  // The head is complete: validate, rewrite, connect upstream. Body bytes already read follow.
  void start_request(Conn& c, size_t head_end) {
    const std::string head = c.in.substr(0, head_end);
    const std::string rest = c.in.substr(head_end + 4);
    c.in.clear();
    HeadVerdict v = parse_request_head(head, limits());
    if (v.refusal != HeadVerdict::None)
      return refuse(c, v.status, v.reason, v.message,
                    v.refusal == HeadVerdict::HeaderTooLarge ? &GateCounters::header_too_large
                    : v.refusal == HeadVerdict::BodyTooLarge ? &GateCounters::body_too_large
                                                             : &GateCounters::bad_request);
    c.chunked = v.chunked;
    const uint64_t length = v.content_length;
    std::string forwarded = std::move(v.forwarded);
    c.body_left = int64_t(length);
    c.up = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(uint16_t(upstream_port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (c.up < 0 || ::connect(c.up, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
      return refuse(c, 503, "Service Unavailable", "the server is not accepting requests", &GateCounters::refused_busy);
    set_nonblocking(c.up);
    count(&GateCounters::relayed);
    c.to_up = forwarded;
    c.phase = Conn::Body;
    c.body_deadline = Clock::now() + ms(o.body_timeout_seconds);
    feed_body(c, rest.data(), rest.size());
  }

  // Forwards the body's bytes (and nothing after it: one request per connection).
  void feed_body(Conn& c, const char* p, size_t n) {
    if (c.phase != Conn::Body) return;
    if (c.chunked) {
      size_t used = 0;
      if (!c.chunks.feed(p, n, &used))
        return refuse(c, 400, "Bad Request", "malformed chunked body", &GateCounters::bad_request);
      if (c.chunks.total > uint64_t(o.max_body_bytes))
        return refuse(c, 413, "Payload Too Large",
                      "chunked request body larger than the limit of " + std::to_string(o.max_body_bytes) +
                          " bytes (--max-body-mb)",
                      &GateCounters::body_too_large);
      c.to_up.append(p, used);
      if (c.chunks.st == ChunkScanner::Done) c.phase = Conn::Relay;
    } else {
      const size_t take = size_t(std::min<int64_t>(c.body_left, int64_t(n)));
      c.to_up.append(p, take);
      c.body_left -= int64_t(take);
      if (c.body_left == 0) c.phase = Conn::Relay;
    }
  }

  // Reads what the client sent; returns false when the connection is to be closed.
  bool on_client_readable(Conn& c) {
    char buf[16384];
    const ssize_t n = ::recv(c.fd, buf, sizeof buf, 0);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      if (c.phase != Conn::Head || !c.in.empty()) count(&GateCounters::client_gone);
      if (c.phase == Conn::Relay && !c.up_eof) note_gone(c);
      return false;  // the client left: its upstream request is dropped with it
    }
    if (n < 0) return true;
    c.last_activity = Clock::now();
    if (c.phase == Conn::Head) {
      const size_t searched = c.in.size();
      c.in.append(buf, size_t(n));
      const size_t end = find_head_end(c.in, searched);
      if (end == std::string::npos) {
        if (c.in.size() > o.max_header_bytes)
          refuse(c, 431, "Request Header Fields Too Large",
                 "request head larger than " + std::to_string(o.max_header_bytes) + " bytes", &GateCounters::header_too_large);
        return true;
      }
      if (end > o.max_header_bytes) {
        refuse(c, 431, "Request Header Fields Too Large",
               "request head larger than " + std::to_string(o.max_header_bytes) + " bytes", &GateCounters::header_too_large);
        return true;
      }
      start_request(c, end);
    } else if (c.phase == Conn::Body) {
      feed_body(c, buf, size_t(n));
    }
    // Relay / Reply: bytes after the request (pipelined requests) are not answered.
    return true;
  }

  bool on_upstream_readable(Conn& c) {
    char buf[16384];
    const ssize_t n = ::recv(c.up, buf, sizeof buf, 0);
    if (n > 0) {
      c.to_client.append(buf, size_t(n));
      c.last_activity = Clock::now();
    } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      c.up_eof = true;
    }
    return true;
  }

  // Writes pending bytes; false on a broken connection.
  static bool flush(int fd, std::string& out, Conn& c) {
    while (!out.empty()) {
      const ssize_t n = ::send(fd, out.data(), out.size(), MSG_NOSIGNAL);
      if (n > 0) {
        out.erase(0, size_t(n));
        c.last_activity = Clock::now();
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
      if (n < 0 && errno == EINTR) continue;
      return false;
    }
    return true;
  }

  void loop() {
    std::vector<pollfd> fds;
    std::vector<std::list<Conn>::iterator> owner;  // per fds entry from 2 on: its connection
    while (!stopping) {
      fds.clear();
      owner.clear();
      fds.push_back({wake[0], POLLIN, 0});
      fds.push_back({listen_fd, POLLIN, 0});
      auto now = Clock::now();
      auto next = now + std::chrono::seconds(1);
      for (auto it = conns.begin(); it != conns.end(); ++it) {
        Conn& c = *it;
        short ev = 0;
        if (c.phase != Conn::Reply && c.to_client.size() < kRelayBuffer) ev |= POLLIN;  // also notices a hang-up
        if (!c.to_client.empty()) ev |= POLLOUT;
        fds.push_back({c.fd, ev, 0});
        owner.push_back(it);
        if (c.up >= 0) {
          short uev = 0;
          if (!c.up_eof && c.to_client.size() < kRelayBuffer) uev |= POLLIN;
          if (!c.to_up.empty()) uev |= POLLOUT;
          fds.push_back({c.up, uev, 0});
          owner.push_back(it);
        }
        next = std::min(next, c.phase == Conn::Head ? c.head_deadline
                              : c.phase == Conn::Body ? c.body_deadline
                                                      : c.last_activity + ms(o.idle_timeout_seconds));
      }
      const int timeout = int(std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::milliseconds>(next - now).count()) + 1);
      if (::poll(fds.data(), fds.size(), timeout) < 0 && errno != EINTR) break;
      if (fds[0].revents) {
        char b[64];
        while (::read(wake[0], b, sizeof b) > 0) {
        }
      }
      if (stopping) break;
      std::vector<std::list<Conn>::iterator> dead;
      for (size_t i = 2; i < fds.size(); ++i) {
        auto it = owner[i - 2];
        Conn& c = *it;
        if (std::find(dead.begin(), dead.end(), it) != dead.end() || !fds[i].revents) continue;
        bool alive = true;
        if (fds[i].fd == c.fd) {
          if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) alive = on_client_readable(c);
          if (alive && (fds[i].revents & POLLOUT)) alive = flush(c.fd, c.to_client, c);
        } else if (fds[i].fd == c.up) {
          if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) on_upstream_readable(c);
          if (fds[i].revents & POLLOUT) alive = flush(c.up, c.to_up, c);
        }
        if (!alive) dead.push_back(it);
      }
      now = Clock::now();
      for (auto it = conns.begin(); it != conns.end(); ++it) {
        if (std::find(dead.begin(), dead.end(), it) != dead.end()) continue;
        Conn& c = *it;
        if (c.phase == Conn::Head && now >= c.head_deadline)
          refuse(c, 408, "Request Timeout", "the request head did not arrive within " +
                 std::to_string(int(o.header_timeout_seconds)) + " s", &GateCounters::header_timeout);
        else if (c.phase == Conn::Body && now >= c.body_deadline)
          refuse(c, 408, "Request Timeout", "the request body did not arrive within " +
                 std::to_string(int(o.body_timeout_seconds)) + " s", &GateCounters::body_timeout);
        const bool done = (c.phase == Conn::Reply && c.to_client.empty()) ||
                          (c.phase == Conn::Relay && c.up_eof && c.to_client.empty()) ||
                          (c.phase != Conn::Head && c.phase != Conn::Body && now - c.last_activity >= ms(o.idle_timeout_seconds));
        if (c.phase == Conn::Reply && !c.to_client.empty()) flush(c.fd, c.to_client, c);
        if (done || (c.phase == Conn::Reply && c.to_client.empty())) dead.push_back(it);
      }
      std::sort(dead.begin(), dead.end(), [](auto a, auto b) { return &*a < &*b; });
      dead.erase(std::unique(dead.begin(), dead.end()), dead.end());
      for (auto it : dead) close_conn(it);
      accept_all_if_ready(fds[1].revents);
      std::lock_guard<std::mutex> lk(mu);
      counters.open = conns.size();
    }
    while (!conns.empty()) close_conn(conns.begin());
  }

  void accept_all_if_ready(short revents) {
    if (revents & POLLIN) accept_all();
  }
};

Gate::Gate(const std::string& host, int port, int upstream_port, const GateOptions& options)
    : impl_(std::make_unique<Impl>()) {
  auto& g = *impl_;
  g.o = options;
  g.upstream_port = upstream_port;
  // Each client is a descriptor (two while relayed): raise the soft limit to the hard one.
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = std::min<rlim_t>(rl.rlim_max, 1 << 20);
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0 || !res)
    throw Error("serve: cannot resolve --host " + host);
  g.listen_fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  const int one = 1;
  ::setsockopt(g.listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  const bool bound = g.listen_fd >= 0 && ::bind(g.listen_fd, res->ai_addr, res->ai_addrlen) == 0 &&
                     ::listen(g.listen_fd, 4096) == 0;
  ::freeaddrinfo(res);
  if (!bound) {
    if (g.listen_fd >= 0) ::close(g.listen_fd);
    throw Error("serve: cannot listen on " + host + ":" + std::to_string(port) + " (in use, or not an address of this machine)");
  }
  sockaddr_storage a{};
  socklen_t len = sizeof a;
  ::getsockname(g.listen_fd, reinterpret_cast<sockaddr*>(&a), &len);
  g.port = ntohs(a.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&a)->sin6_port
                                         : reinterpret_cast<sockaddr_in*>(&a)->sin_port);
  if (::pipe2(g.wake, O_NONBLOCK | O_CLOEXEC) != 0) throw Error("serve: cannot create the gate's wake-up pipe");
}

Gate::~Gate() {
  stop();
  if (impl_->listen_fd >= 0) ::close(impl_->listen_fd);
  for (int fd : impl_->wake)
    if (fd >= 0) ::close(fd);
}

int Gate::port() const { return impl_->port; }

void Gate::start() {
  impl_->thread = std::thread([this] { impl_->loop(); });
}

void Gate::stop() {
  if (!impl_->thread.joinable()) return;
  impl_->stopping = true;
  [[maybe_unused]] ssize_t w = ::write(impl_->wake[1], "x", 1);
  impl_->thread.join();
}

GateCounters Gate::counters() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->counters;
}

bool Gate::client_gone(int upstream_port) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->gone.erase(upstream_port) > 0;
}

std::string Gate::metrics_text() const {
  const GateCounters c = counters();
  std::string s;
  s += "# HELP victor_http_connections_open Client connections open at the gate\n# TYPE victor_http_connections_open gauge\n";
  s += "victor_http_connections_open " + std::to_string(c.open) + "\n";
  s += "# HELP victor_http_connections_total Client connections accepted\n# TYPE victor_http_connections_total counter\n";
  s += "victor_http_connections_total " + std::to_string(c.accepted) + "\n";
  s += "# HELP victor_http_refused_total Connections the gate answered itself, by reason\n# TYPE victor_http_refused_total counter\n";
  const std::pair<const char*, uint64_t> reasons[] = {
      {"busy", c.refused_busy},           {"per_peer", c.refused_peer},     {"header_timeout", c.header_timeout},
      {"body_timeout", c.body_timeout},   {"header_too_large", c.header_too_large},
      {"body_too_large", c.body_too_large}, {"bad_request", c.bad_request}, {"client_gone", c.client_gone}};
  for (auto& [r, v] : reasons) s += std::string("victor_http_refused_total{reason=\"") + r + "\"} " + std::to_string(v) + "\n";
  return s;
}

}  // namespace victor
