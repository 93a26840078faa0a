// Data-parallel training on PyTorch's c10d: a TCPStore rendezvous at MASTER_ADDR:MASTER_PORT and
// a Gloo process group (CPU). The same environment variables as torchrun, Slurm scripts and the
// field's launchers: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
#pragma once
#include <torch/torch.h>

#include <chrono>
#include <functional>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace victor {

struct DistEnv {
  int rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
};

// The torchrun variables; nullopt when WORLD_SIZE is unset or 1. A malformed or inconsistent value
// (RANK outside 0..WORLD_SIZE-1, a port outside 1..65535) throws naming the variable.
std::optional<DistEnv> dist_env_from_environment();

// One rank's membership in the group. Collectives are blocking and must be called by every rank
// in the same order.
class Communicator {
 public:
  // Joins the group: rank 0 serves the store, the others connect to it; a rank that cannot reach
  // the master within `timeout` throws naming the address. Collectives then wait up to
  // max(timeout, 2 h) for a rank that hangs (one that dies is noticed at once).
  explicit Communicator(const DistEnv& env, std::chrono::milliseconds timeout = std::chrono::seconds(300));
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return env_.rank; }
  int world_size() const { return env_.world_size; }

  // Sums float32 tensors in place across ranks. Tensors are packed into flat buckets of about
  // `bucket_bytes` (one message each) so many small gradients cost few round trips.
  void allreduce_sum(const std::vector<torch::Tensor>& tensors, size_t bucket_bytes = size_t(32) << 20);
  // The smallest and largest value over ranks (consistency checks).
  std::pair<int64_t, int64_t> min_max(int64_t value);
  void barrier();
  // Starts summing one contiguous float32 tensor across ranks on Gloo's background thread and
  // returns the wait for it; the tensor must not be touched until the wait returns. Every rank must
  // start the same sums in the same order.
  std::function<void()> start_allreduce_sum(torch::Tensor flat);
  // Bytes this rank has sent into all-reduces so far (the payload, not Gloo's framing).
  uint64_t bytes_reduced() const { return bytes_reduced_; }

 private:
  struct Impl;
  DistEnv env_;
  std::unique_ptr<Impl> impl_;
  uint64_t bytes_reduced_ = 0;
};

// The gradients of `params` all-reduced in buckets while the backward pass still runs (the scheme
// of PyTorch's DDP): arm() before the last backward of an optimizer step registers a hook on each
// parameter; when every gradient of a bucket has arrived, its sum across ranks starts on Gloo's
// thread, buckets always in the same order (the last parameters first, as the backward pass reaches
// them; a bucket waits for the ones before it, so ranks whose graphs differ still agree); finish()
// starts what is left (a parameter with no gradient on this rank contributes zeros), waits, and
// leaves each parameter's .grad holding the sum across ranks of everything accumulated in it.
class OverlappedGradients {
 public:
  OverlappedGradients(Communicator& comm, std::vector<torch::Tensor> params, size_t bucket_bytes = size_t(8) << 20);
  ~OverlappedGradients();
  void arm();
  void finish();

 private:
  void on_grad(size_t i, const torch::Tensor& g);
  void launch_ready();
  void launch(size_t b);
  Communicator& comm_;
  std::vector<torch::Tensor> params_;
  std::vector<std::vector<size_t>> buckets_;  // parameter indices, in launch order
  std::vector<size_t> bucket_of_;
  std::vector<torch::Tensor> slots_;          // per parameter: its whole gradient for this step
  std::vector<size_t> arrived_;               // per bucket
  std::vector<torch::Tensor> flats_;
  std::vector<std::function<void()>> waits_;
  std::vector<unsigned> hooks_;
  size_t next_ = 0;  // the next bucket to launch
  bool armed_ = false;
};

// `victor train --nproc N`: starts N local workers (this executable with `args`, the torchrun
// variables set, a free port), prefixes their output with their rank, stops them all when one
// fails (reporting its error) or on SIGINT/SIGTERM. Returns the exit code for the launcher.
int launch_local_workers(int nproc, const std::vector<std::string>& args);

}  // namespace victor
