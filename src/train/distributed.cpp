// c10d data parallelism (Gloo over TCP) and the local launcher of `victor train --nproc N`.
#include "victor/distributed.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <exception>
#include <iostream>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <glog/logging.h>

#include "victor/error.h"

namespace victor {

namespace {

int env_int(const char* name, int fallback, int lo, int hi) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v, &end, 10);
  if (errno || *end || x < lo || x > hi)
    throw Error(std::string("environment variable ") + name + "='" + v + "' must be an integer in " +
                std::to_string(lo) + ".." + std::to_string(hi));
  return int(x);
}

}  // namespace

std::optional<DistEnv> dist_env_from_environment() {
  DistEnv e;
  // c10d/Gloo opens a connection per pair of ranks: 4096 ranks of CPU training is far past any
  // cluster this runs on, and WORLD_SIZE=65536 only waited forever.
  e.world_size = env_int("WORLD_SIZE", 1, 1, 4096);
  if (e.world_size == 1) {
    if (env_int("RANK", 0, 0, 1 << 30) != 0)
      throw Error(std::string("RANK=") + std::getenv("RANK") + " with WORLD_SIZE=1: the only rank is 0");
    return std::nullopt;
  }
  if (!std::getenv("RANK")) throw Error("WORLD_SIZE is " + std::to_string(e.world_size) + " but RANK is not set");
  e.rank = env_int("RANK", 0, 0, e.world_size - 1);
  e.local_rank = env_int("LOCAL_RANK", e.rank, 0, 1 << 16);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) e.master_addr = a;
  e.master_port = env_int("MASTER_PORT", 29500, 1, 65535);
  return e;
}

struct Communicator::Impl {
  c10::intrusive_ptr<c10d::TCPStore> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

namespace {
// Joining has phases c10d does not bound by its own timeout (rank 0 waiting for workers that
// never come, a master that accepts and never answers): a watchdog ends the process with one
// clear line when joining takes longer than --dist-timeout (plus a grace for c10d's own error).
class JoinWatchdog {
 public:
  JoinWatchdog(std::chrono::milliseconds timeout, std::string message) : message_(std::move(message)) {
    thread_ = std::thread([this, timeout] {
      std::unique_lock<std::mutex> lk(mu_);
      if (cv_.wait_for(lk, timeout + std::chrono::seconds(2), [this] { return done_; })) return;
      std::cerr << "victor: error: " << message_ << "\n" << std::flush;
      std::_Exit(1);
    });
  }
  ~JoinWatchdog() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::string message_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};
}  // namespace

namespace {
// What a c10d background thread's uncaught exception ends the process with (rather than
// "terminate called ..." and SIGABRT): one line naming the rank, the master and c10d's reason.
std::string g_terminate_context;
std::atomic<bool> g_joining{false};
[[noreturn]] void on_c10d_terminate() {
  std::string what = "an unknown exception";
  if (auto e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      what = x.what();
    } catch (...) {
    }
  }
  what = what.substr(0, what.find('\n'));
  std::fprintf(stderr, "victor: error: %s: the distributed runtime (c10d) failed%s: %s\n", g_terminate_context.c_str(),
               g_joining ? " while joining (the master answered with bytes c10d cannot read: is it a victor or torch rank 0?)"
                         : "",
               what.c_str());
  std::fflush(stderr);
  std::_Exit(1);
}

// c10d writes its own warnings and errors through glog straight to stderr (a port in use, an
// address that does not resolve, each retry); the error victor raises already carries c10d's
// reason. VICTOR_C10D_LOG=1 shows them.
void quiet_c10d_logs() {
  const char* v = std::getenv("VICTOR_C10D_LOG");
  if (v && *v && std::string(v) != "0") return;
  FLAGS_minloglevel = google::GLOG_FATAL;
}
}  // namespace

Communicator::Communicator(const DistEnv& env, std::chrono::milliseconds timeout)
    : env_(env), impl_(std::make_unique<Impl>()) {
  const std::string where = env.master_addr + ":" + std::to_string(env.master_port);
  quiet_c10d_logs();
  g_terminate_context = "rank " + std::to_string(env.rank) + " of " + std::to_string(env.world_size) +
                        " (MASTER_ADDR:MASTER_PORT = " + where + ")";
  std::set_terminate(on_c10d_terminate);
  g_joining = true;
  struct Joined {
    ~Joined() { g_joining = false; }
  } joined;
  JoinWatchdog watchdog(timeout, "rank " + std::to_string(env.rank) + " of " + std::to_string(env.world_size) +
                                     ": the training group at MASTER_ADDR:MASTER_PORT = " + where +
                                     " did not form within --dist-timeout " + std::to_string(timeout.count() / 1000) +
                                     " s (ranks missing, or the master does not answer as c10d)");
  try {
    c10d::TCPStoreOptions o;
    o.port = uint16_t(env.master_port);
    o.isServer = env.rank == 0;
    o.numWorkers = size_t(env.world_size);
    o.waitWorkers = true;
    o.timeout = timeout;
    impl_->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, o);
    // Collectives wait much longer than joining: while rank 0 writes a checkpoint (minutes for a
    // large model) the others wait in the next all-reduce. A rank that dies is noticed at once
    // (its connections close); this bounds only a rank that hangs.
    auto opts = c10d::ProcessGroupGloo::Options::create(std::max<std::chrono::milliseconds>(timeout, std::chrono::hours(2)));
    // The interface that reaches the master (loopback for local workers, the cluster network else).
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(env.master_addr));
    opts->threads = 1;
    impl_->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, env.rank, env.world_size, opts);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    msg = msg.substr(0, msg.find('\n'));
    throw Error("rank " + std::to_string(env.rank) + " of " + std::to_string(env.world_size) +
                ": cannot join the training group at MASTER_ADDR:MASTER_PORT = " + where + " within " +
                std::to_string(timeout.count() / 1000) + " s (" + msg + ")");
  }
}

Communicator::~Communicator() = default;

void Communicator::allreduce_sum(const std::vector<torch::Tensor>& tensors, size_t bucket_bytes) {
  size_t i = 0;
  while (i < tensors.size()) {
    size_t j = i, bytes = 0;
    while (j < tensors.size() && (j == i || bytes + size_t(tensors[j].numel()) * 4 <= bucket_bytes))
      bytes += size_t(tensors[j++].numel()) * 4;
    std::vector<torch::Tensor> part(tensors.begin() + long(i), tensors.begin() + long(j));
    std::vector<torch::Tensor> flat{torch::cat([&] {
      std::vector<torch::Tensor> v;
      for (auto& t : part) v.push_back(t.detach().reshape({-1}).to(torch::kFloat32));
      return v;
    }())};
    impl_->pg->allreduce(flat)->wait();
    int64_t at = 0;
    for (auto& t : part) {
      const int64_t n = t.numel();
      torch::NoGradGuard ng;
      t.copy_(flat[0].narrow(0, at, n).view(t.sizes()));
      at += n;
    }
    bytes_reduced_ += bytes;
    i = j;
  }
}

std::pair<int64_t, int64_t> Communicator::min_max(int64_t value) {
  std::vector<torch::Tensor> lo{torch::full({1}, value, torch::kInt64)}, hi{torch::full({1}, value, torch::kInt64)};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::MIN;
  impl_->pg->allreduce(lo, o)->wait();
  o.reduceOp = c10d::ReduceOp::MAX;
  impl_->pg->allreduce(hi, o)->wait();
  return {lo[0].item<int64_t>(), hi[0].item<int64_t>()};
}

void Communicator::barrier() { impl_->pg->barrier()->wait(); }

std::function<void()> Communicator::start_allreduce_sum(torch::Tensor flat) {
  TORCH_CHECK(flat.is_contiguous() && flat.scalar_type() == torch::kFloat32, "start_allreduce_sum: contiguous float32");
  std::vector<torch::Tensor> v{flat};
  auto work = impl_->pg->allreduce(v);
  bytes_reduced_ += uint64_t(flat.numel()) * 4;
  return [work] { work->wait(); };
}

// --- gradients all-reduced during the backward pass ---

OverlappedGradients::OverlappedGradients(Communicator& comm, std::vector<torch::Tensor> params, size_t bucket_bytes)
    : comm_(comm), params_(std::move(params)) {
  bucket_of_.resize(params_.size());
  size_t bytes = 0;
  for (size_t k = params_.size(); k-- > 0;) {  // the backward pass reaches the last parameters first
    const size_t b = size_t(params_[k].numel()) * 4;
    if (buckets_.empty() || (bytes + b > bucket_bytes && !buckets_.back().empty())) buckets_.emplace_back(), bytes = 0;
    buckets_.back().push_back(k);
    bucket_of_[k] = buckets_.size() - 1;
    bytes += b;
  }
}

OverlappedGradients::~OverlappedGradients() {
  for (size_t i = 0; i < hooks_.size(); ++i) params_[i].remove_hook(hooks_[i]);
}

void OverlappedGradients::arm() {
  TORCH_CHECK(!armed_, "OverlappedGradients::arm twice");
  slots_.assign(params_.size(), torch::Tensor());
  arrived_.assign(buckets_.size(), 0);
  flats_.assign(buckets_.size(), torch::Tensor());
  waits_.assign(buckets_.size(), nullptr);
  next_ = 0;
  hooks_.clear();
  for (size_t i = 0; i < params_.size(); ++i)
    hooks_.push_back(params_[i].register_hook([this, i](const torch::Tensor& g) { on_grad(i, g); }));
  armed_ = true;
}

void OverlappedGradients::on_grad(size_t i, const torch::Tensor& g) {
  // A leaf's hook runs before the gradient is added to .grad: the step's whole gradient is what
  // earlier micro-batches left there plus this one.
  torch::NoGradGuard ng;
  const torch::Tensor& before = params_[i].grad();
  torch::Tensor whole = before.defined() ? before + g : g.clone();
  if (slots_[i].defined()) {  // a second gradient for the same leaf in one pass (not expected): add it
    slots_[i].add_(g);
    return;
  }
  slots_[i] = whole.to(torch::kFloat32).contiguous();
  if (++arrived_[bucket_of_[i]] == buckets_[bucket_of_[i]].size()) launch_ready();
}

void OverlappedGradients::launch_ready() {
  while (next_ < buckets_.size() && arrived_[next_] == buckets_[next_].size()) launch(next_++);
}

void OverlappedGradients::launch(size_t b) {
  std::vector<torch::Tensor> parts;
  for (size_t i : buckets_[b]) parts.push_back(slots_[i].reshape({-1}));
  flats_[b] = torch::cat(parts);
  waits_[b] = comm_.start_allreduce_sum(flats_[b]);
}

void OverlappedGradients::finish() {
  TORCH_CHECK(armed_, "OverlappedGradients::finish without arm");
  for (size_t i = 0; i < hooks_.size(); ++i) params_[i].remove_hook(hooks_[i]);
  hooks_.clear();
  armed_ = false;
  torch::NoGradGuard ng;
  for (size_t i = 0; i < params_.size(); ++i)
    if (!slots_[i].defined()) {  // no gradient reached it in the last pass on this rank
      const torch::Tensor& g = params_[i].grad();
      slots_[i] = g.defined() ? g.to(torch::kFloat32).contiguous().clone() : torch::zeros_like(params_[i], torch::kFloat32);
      ++arrived_[bucket_of_[i]];
    }
  launch_ready();
  for (size_t b = 0; b < buckets_.size(); ++b) {
    waits_[b]();
    int64_t at = 0;
    for (size_t i : buckets_[b]) {
      auto& grad = params_[i].mutable_grad();
      const int64_t n = params_[i].numel();
      auto sum = flats_[b].narrow(0, at, n).view(params_[i].sizes()).to(params_[i].scalar_type());
      if (grad.defined()) grad.copy_(sum);
      else grad = sum.clone();
      at += n;
    }
  }
  slots_.clear();
  flats_.clear();
}

// --- the local launcher ---

namespace {

volatile sig_atomic_t g_stop_signal = 0;
void on_stop(int sig) { g_stop_signal = sig; }

int free_port() {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  if (s < 0) throw Error(std::string("--nproc: cannot open a socket: ") + std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ::close(s);
    throw Error(std::string("--nproc: cannot find a free port: ") + std::strerror(errno));
  }
  ::close(s);
  return ntohs(a.sin_port);
}

struct Worker {
  pid_t pid = -1;
  int out = -1, err = -1;  // read ends
  std::string out_buf, err_buf, last_error;
  bool done = false;
  int status = 0;
};

void forward_lines(std::string& buf, int rank, std::ostream& to, std::string* last) {
  size_t nl;
  while ((nl = buf.find('\n')) != std::string::npos) {
    const std::string line = buf.substr(0, nl);
    buf.erase(0, nl + 1);
    to << "[rank " << rank << "] " << line << "\n";
    to.flush();
    if (last && !line.empty()) *last = line;
  }
}

// Starts rank r of nproc: this program again with `args`, the torchrun variables set, its output
// on two pipes this process reads.
Worker start_worker(int r, int nproc, int port, const std::vector<std::string>& args) {
  int po[2], pe[2];
  if (pipe(po) != 0 || pipe(pe) != 0) throw Error(std::string("--nproc: pipe failed: ") + std::strerror(errno));
  pid_t pid = fork();
  if (pid < 0) throw Error(std::string("--nproc: fork failed: ") + std::strerror(errno));
  if (pid == 0) {
    setenv("RANK", std::to_string(r).c_str(), 1);
    setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
    setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
    setenv("MASTER_ADDR", "127.0.0.1", 1);
    setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
    setenv("VICTOR_RANK_LOGS", "1", 1);
    dup2(po[1], 1);
    dup2(pe[1], 2);
    for (int fd : {po[0], po[1], pe[0], pe[1]}) close(fd);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv("/proc/self/exe", argv.data());
    std::fprintf(stderr, "victor: error: cannot start worker: %s\n", std::strerror(errno));
    _exit(127);
  }
  close(po[1]);
  close(pe[1]);
  Worker w;
  w.pid = pid;
  w.out = po[0];
  w.err = pe[0];
  return w;
}

// Waits up to 200 ms for output of any worker and forwards its complete lines, each tagged with
// its rank (stdout to stdout, stderr to stderr); a closed pipe flushes what is left.
void forward_output(std::vector<Worker>& w) {
  std::vector<pollfd> fds;
  std::vector<std::pair<int, bool>> who;  // rank, is stderr
  for (int r = 0; r < int(w.size()); ++r) {
    if (w[size_t(r)].out >= 0) fds.push_back({w[size_t(r)].out, POLLIN, 0}), who.push_back({r, false});
    if (w[size_t(r)].err >= 0) fds.push_back({w[size_t(r)].err, POLLIN, 0}), who.push_back({r, true});
  }
  if (fds.empty()) {
    ::usleep(50000);
    return;
  }
  ::poll(fds.data(), fds.size(), 200);
  for (size_t i = 0; i < fds.size(); ++i) {
    if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    auto [r, is_err] = who[i];
    Worker& x = w[size_t(r)];
    char buf[4096];
    const ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
    std::string& b = is_err ? x.err_buf : x.out_buf;
    if (n > 0) {
      b.append(buf, size_t(n));
      forward_lines(b, r, is_err ? std::cerr : std::cout, is_err ? &x.last_error : nullptr);
    } else {
      if (!b.empty()) b += "\n", forward_lines(b, r, is_err ? std::cerr : std::cout, is_err ? &x.last_error : nullptr);
      ::close(fds[i].fd);
      (is_err ? x.err : x.out) = -1;
    }
  }
}

// Reaps the workers that ended; returns the rank that caused a failure found in this sweep, or
// -1. When several ranks are found dead in one sweep, the cause is the one a signal killed (the
// others then fail on its closed connections), else the lowest rank.
int reap(std::vector<Worker>& w, int& running) {
  int first_failed = -1;
  for (int r = 0; r < int(w.size()); ++r) {
    Worker& x = w[size_t(r)];
    if (x.done || waitpid(x.pid, &x.status, WNOHANG) != x.pid) continue;
    x.done = true;
    --running;
    const bool ok = WIFEXITED(x.status) && WEXITSTATUS(x.status) == 0;
    if (!ok && (first_failed < 0 || (WIFSIGNALED(x.status) && !WIFSIGNALED(w[size_t(first_failed)].status))))
      first_failed = r;
  }
  return first_failed;
}

}  // namespace

int launch_local_workers(int nproc, const std::vector<std::string>& args) {
  if (nproc < 2) throw Error("--nproc must be >= 2 to launch workers");
  const int port = free_port();
  struct sigaction sa {};
  sa.sa_handler = on_stop;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  std::vector<Worker> w;
  for (int r = 0; r < nproc; ++r) w.push_back(start_worker(r, nproc, port, args));
  // A failed rank or a stop signal stops every worker: SIGTERM, then SIGKILL after 10 s.
  int failed = -1, running = nproc;
  bool stopping = false;
  auto stop_deadline = std::chrono::steady_clock::now();
  auto stop_all = [&](int sig) {
    for (auto& x : w)
      if (!x.done) kill(x.pid, sig);
  };
  while (running > 0) {
    forward_output(w);
    const int first_failed = reap(w, running);
    if (first_failed >= 0 && failed < 0 && !stopping) failed = first_failed;
    if ((failed >= 0 || g_stop_signal) && !stopping) {
      stopping = true;
      stop_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      stop_all(SIGTERM);
    }
    if (stopping && std::chrono::steady_clock::now() > stop_deadline) stop_all(SIGKILL);
  }
  for (auto& x : w) {
    if (x.out >= 0) close(x.out);
    if (x.err >= 0) close(x.err);
  }
  if (failed >= 0) {
    const Worker& x = w[size_t(failed)];
    std::string how = WIFSIGNALED(x.status) ? "killed by signal " + std::to_string(WTERMSIG(x.status))
                                            : "exit " + std::to_string(WEXITSTATUS(x.status));
    std::cerr << "victor: error: rank " << failed << " failed (" << how << ")"
              << (x.last_error.empty() ? std::string() : ": " + x.last_error)
              << "; the other workers were stopped, the last complete checkpoint is kept\n";
    return 1;
  }
  if (g_stop_signal) {
    std::cerr << "victor: interrupted; all workers stopped\n";
    return 128 + int(g_stop_signal);
  }
  return 0;
}

}  // namespace victor
