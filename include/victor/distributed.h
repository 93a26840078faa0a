// Data-parallel training on PyTorch's c10d: a TCPStore rendezvous at MASTER_ADDR:MASTER_PORT and
// a Gloo process group (CPU). The same environment variables as torchrun, Slurm scripts and the
// field's launchers: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
#pragma once
#include <torch/torch.h>

#include <chrono>
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
  // Bytes this rank has sent into all-reduces so far (the payload, not Gloo's framing).
  uint64_t bytes_reduced() const { return bytes_reduced_; }

 private:
  struct Impl;
  DistEnv env_;
  std::unique_ptr<Impl> impl_;
  uint64_t bytes_reduced_ = 0;
};

// `victor train --nproc N`: starts N local workers (this executable with `args`, the torchrun
// variables set, a free port), prefixes their output with their rank, stops them all when one
// fails (reporting its error) or on SIGINT/SIGTERM. Returns the exit code for the launcher.
int launch_local_workers(int nproc, const std::vector<std::string>& args);

}  // namespace victor
