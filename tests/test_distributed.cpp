// Data-parallel training on c10d/Gloo, through the CLI as users run it: `victor train --nproc N`
// and the torchrun variables. Processes on loopback; each test compares parameters, not logs.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "helpers.h"
#include "victor/distributed.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/safetensors.h"

using namespace victor;
using namespace victor::test;
namespace fs = std::filesystem;

namespace {

const std::string kVictor = VICTOR_BIN;

int sh(const std::string& cmd) {
  int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc);
}

// A tiny Victor model (m = 4, k = 1) and 12 GridVQA images, once for the suite.
struct Fixture {
  std::string dir, model, data;
  Fixture() {
    dir = temp_dir("dist");
    model = dir + "/m";
    data = dir + "/g/train.json";
    EXPECT_EQ(sh(kVictor + " init --preset tiny --registers 4 --summary-layers 1 --out " + model + " >/dev/null"), 0);
    EXPECT_EQ(sh(kVictor + " data gridvqa --out " + dir + "/g --train-images 12 --test-images 1 >/dev/null"), 0);
  }
};
const Fixture& fixture() {
  static Fixture f;
  return f;
}

// The same run for every layout: 6 steps, lr high enough that every step moves the parameters.
std::string train_cmd(const std::string& out, const std::string& extra) {
  const Fixture& f = fixture();
  return kVictor + " train --model " + f.model + " --data " + f.data + " --out " + out +
         " --max-steps 6 --lr 0.01 --seed 5 --threads 1 " + extra;
}

// Largest |a - b| / (1 + |b|) over every tensor of two checkpoints (which must hold the same names).
double max_rel_diff(const std::string& a, const std::string& b) {
  SafetensorsFile fa(a + "/model.safetensors"), fb(b + "/model.safetensors");
  EXPECT_EQ(fa.tensors().size(), fb.tensors().size());
  double worst = 0;
  for (auto& [n, i] : fa.tensors()) {
    auto x = fa.load(n), y = fb.load(n);
    worst = std::max(worst, ((x - y).abs() / (1 + y.abs())).max().item<double>());
  }
  return worst;
}

// ||a - b|| / ||a - start|| over every tensor of a that start also holds: how far apart two runs
// ended, against how far training moved them. Robust where max_rel_diff is not: after many Adam
// steps a parameter with a near-zero gradient moves by +-lr on float rounding alone.
double l2_diff_over_moved(const std::string& a, const std::string& b, const std::string& start) {
  SafetensorsFile fa(a + "/model.safetensors"), fb(b + "/model.safetensors"), fs0(start + "/model.safetensors");
  double diff = 0, moved = 0;
  for (auto& [n, i] : fa.tensors()) {
    if (!fs0.tensors().count(n)) continue;
    auto x = fa.load(n).to(torch::kFloat64), y = fb.load(n).to(torch::kFloat64), z = fs0.load(n).to(torch::kFloat64);
    diff += (x - y).pow(2).sum().item<double>();
    moved += (x - z).pow(2).sum().item<double>();
  }
  return moved > 0 ? std::sqrt(diff / moved) : 1e9;
}

int free_port() {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(s);
  return ntohs(a.sin_port);
}

}  // namespace

TEST(Distributed, ShuffledAndGroundedStepsAreTheSameOnAnyRankCount) {
  // --shuffle-visual draws a token order per row of the micro-batch and grounding reads it: a rank's
  // rows must get the orders the single process gives them.
  const std::string dir = temp_dir("dist_shuffle");
  const std::string extra = "--shuffle-visual --ground-weight 1 --ground-layer 0 ";
  ASSERT_EQ(sh(train_cmd(dir + "/one", extra + "--batch-size 4 >/dev/null 2>&1")), 0);
  ASSERT_EQ(sh(train_cmd(dir + "/two", extra + "--nproc 2 --batch-size 2 >/dev/null 2>&1")), 0);
  EXPECT_GT(max_rel_diff(dir + "/one", fixture().model), 1e-3);
  EXPECT_LT(max_rel_diff(dir + "/two", dir + "/one"), 2e-5);
  EXPECT_NE(read_file(dir + "/two/metrics.jsonl", FileKind::Dataset).find("ground_mass"), std::string::npos);
}

TEST(Distributed, ReproWithTwoRanksTrainsTheModelsOneProcessTrains) {
  // `repro --nproc 2`: every training stage (L, C, 2) data-parallel with the same global batches;
  // rank 0 alone builds the data, runs stage 0, evaluates, benchmarks and reports.
  const std::string dir = temp_dir("dist_repro");
  const std::string args =
      " repro --preset tiny --train-images 12 --test-images 2 --steps 4 --vision-steps 2 --vision-images 8 "
      "--text-steps 2 --registers 2 --summary-layers 1 --pool 1 --resampler 4 --training-free fastv:k=1,keep=0.5 "
      "--bench-repeats 1 --bench-batch 2 --bench-gen 2,4 --eval-limit 4 --curriculum 2:identify:2:2x2@100 "
      "--curriculum-images 8 --lr 0.01 --seed 3";
  ASSERT_EQ(sh(kVictor + args + " --out " + dir + "/one --threads 1 >/dev/null 2>&1"), 0);
  ASSERT_EQ(sh(kVictor + args + " --out " + dir + "/two --nproc 2 > " + dir + "/two.log 2>&1"), 0);
  // The shared start after stages 0, L and C; then each model's stage 2 from it. Float rounding
  // (a sum over two ranks is not the sum over one batch) leaves them ~1e-5 apart, as 1 vs 2
  // threads do; a rank that trained on other rows or token orders leaves them ~1 apart.
  EXPECT_LT(max_rel_diff(dir + "/two/models/init", dir + "/one/models/init"), 1e-4);
  for (const char* m : {"plain", "victor-m2", "resampler-4"})
    EXPECT_LT(l2_diff_over_moved(dir + "/one/models/" + m, dir + "/two/models/" + m, dir + "/one/models/init"), 1e-3)
        << m;
  const std::string log = read_file(dir + "/two.log", FileKind::Dataset);
  EXPECT_NE(log.find("[rank 0] report: " + dir + "/two/report.md"), std::string::npos) << log;
  EXPECT_EQ(log.find("[rank 1] repro:"), std::string::npos) << "rank 1 spoke:\n" << log;
  const std::string report = read_file(dir + "/two/report.md", FileKind::Dataset);
  EXPECT_NE(report.find("2 data-parallel ranks in the training stages"), std::string::npos);
  for (const char* f : {"answers-plain.jsonl", "answers-fastv-k1-keep0.5.jsonl", "bench.json"})
    EXPECT_TRUE(fs::exists(dir + "/two/" + f)) << f;
  // A batch the ranks cannot share is refused before any work.
  EXPECT_NE(sh(kVictor + args + " --batch-size 3 --out " + dir + "/bad --nproc 2 > " + dir + "/bad.log 2>&1"), 0);
  EXPECT_NE(read_file(dir + "/bad.log", FileKind::Dataset).find("--batch-size 3 does not split over 2 ranks"), std::string::npos)
      << read_file(dir + "/bad.log", FileKind::Dataset);
  EXPECT_FALSE(fs::exists(dir + "/bad/gridvqa"));
}

TEST(Distributed, TwoRanksStepExactlyAsOneProcessWithTheGlobalBatch) {
  const std::string dir = temp_dir("dist_equal");
  // Victor registers and the projector trained, the tower frozen (its features cached per rank).
  ASSERT_EQ(sh(train_cmd(dir + "/one", "--batch-size 4 >/dev/null 2>&1")), 0);
  ASSERT_EQ(sh(train_cmd(dir + "/two", "--nproc 2 --batch-size 2 > " + dir + "/two.log 2>&1")), 0);
  const double moved = max_rel_diff(dir + "/one", fixture().model);
  const double diff = max_rel_diff(dir + "/two", dir + "/one");
  EXPECT_GT(moved, 1e-3);  // training changed the parameters: the comparison below can fail
  EXPECT_LT(diff, 2e-5) << "2 ranks x batch 2 vs 1 process x batch 4 (parameters moved by " << moved << ")";
  // Rank 0 alone wrote metrics.jsonl: one line per step, the global loss equal to the single run's.
  auto last_loss = [](const std::string& f) {
    std::ifstream in(f);
    std::string line, last;
    int n = 0;
    while (std::getline(in, line)) last = line, ++n;
    EXPECT_EQ(n, 6) << f;
    return nlohmann::json::parse(last)["loss"].get<double>();
  };
  EXPECT_NEAR(last_loss(dir + "/two/metrics.jsonl"), last_loss(dir + "/one/metrics.jsonl"), 1e-4);
  const std::string log = read_file(dir + "/two.log", FileKind::Dataset);
  EXPECT_NE(log.find("[rank 0] 2 ranks (c10d/Gloo)"), std::string::npos) << log;
  EXPECT_NE(log.find("MB of gradients all-reduced per step"), std::string::npos) << log;
}

TEST(Distributed, ResumeWithAnotherWorldSizeEndsEqualToAnUninterruptedRun) {
  const std::string dir = temp_dir("dist_resume");
  ASSERT_EQ(sh(train_cmd(dir + "/ref", "--batch-size 4 >/dev/null 2>&1")), 0);
  // 2 ranks for 3 steps, then 1 process to the end; and the reverse.
  ASSERT_EQ(sh(train_cmd(dir + "/a", "--nproc 2 --batch-size 2 --save-every 1 --stop-after 3 >/dev/null 2>&1")), 0);
  ASSERT_EQ(sh(train_cmd(dir + "/a", "--batch-size 4 --resume >/dev/null 2>&1")), 0);
  ASSERT_EQ(sh(train_cmd(dir + "/b", "--batch-size 4 --save-every 1 --stop-after 3 >/dev/null 2>&1")), 0);
  ASSERT_EQ(sh(train_cmd(dir + "/b", "--nproc 2 --batch-size 2 --resume >/dev/null 2>&1")), 0);
  EXPECT_LT(max_rel_diff(dir + "/a", dir + "/ref"), 2e-5);
  EXPECT_LT(max_rel_diff(dir + "/b", dir + "/ref"), 2e-5);
  // Another global batch cannot continue the same data order: refused by name.
  ASSERT_EQ(sh(train_cmd(dir + "/c", "--batch-size 4 --save-every 1 --stop-after 2 >/dev/null 2>&1")), 0);
  EXPECT_NE(sh(train_cmd(dir + "/c", "--nproc 2 --batch-size 4 --resume > " + dir + "/c.log 2>&1")), 0);
  const std::string log = read_file(dir + "/c.log", FileKind::Dataset);
  EXPECT_NE(log.find("global batch is 4 samples per step, this run's 8"), std::string::npos) << log;
}

TEST(Distributed, AKilledWorkerStopsTheOthersAndTheLastCheckpointLoads) {
  const std::string dir = temp_dir("dist_kill"), out = dir + "/out", err = dir + "/err.log";
  const Fixture& f = fixture();
  const std::string cmd = "exec " + kVictor + " train --model " + f.model + " --data " + f.data + " --out " + out +
                          " --nproc 2 --batch-size 2 --max-steps 100000 --save-every 5 --threads 1 >/dev/null 2>" + err;
  pid_t launcher = fork();
  ASSERT_GE(launcher, 0);
  if (launcher == 0) {
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(out + "/trainer_state.json") && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_TRUE(fs::exists(out + "/trainer_state.json")) << read_file(err, FileKind::Dataset);
  // The rank-1 worker, by its environment.
  pid_t victim = -1;
  std::ifstream children("/proc/" + std::to_string(launcher) + "/task/" + std::to_string(launcher) + "/children");
  for (pid_t c; children >> c;) {
    const std::string env = read_file("/proc/" + std::to_string(c) + "/environ", FileKind::Dataset);
    if (env.find(std::string("RANK=1\0", 7)) != std::string::npos && env.find("LOCAL_RANK=1") != std::string::npos)
      victim = c;
  }
  ASSERT_GT(victim, 0);
  ASSERT_EQ(kill(victim, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(launcher, &status, 0), launcher);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_NE(WEXITSTATUS(status), 0);
  const std::string log = read_file(err, FileKind::Dataset);
  EXPECT_NE(log.find("victor: error: rank 1 failed (killed by signal 9)"), std::string::npos) << log;
  EXPECT_NO_THROW(Vlm::load(out));
}

TEST(Distributed, OverlappedBucketsSumWhatEachRankAccumulatedEvenWhereAGradientIsMissing) {
  // Two ranks as two threads of this process. Three parameters, one bucket each (launched during
  // the backward pass, last parameter first). Rank 0's last pass reaches every parameter; rank 1's
  // reaches only the first, so its other buckets start in finish() -- in the same order, or the
  // sums would pair the wrong tensors. An earlier micro-batch's gradient is already in .grad.
  const int port = free_port();
  std::vector<std::vector<torch::Tensor>> result(2);
  std::vector<std::string> errors(2);
  // The same start on both ranks, drawn here: two threads drawing from LibTorch's one global
  // generator at once would interleave their draws (it failed that way under ASan's timing).
  torch::manual_seed(0);
  const std::vector<torch::Tensor> start{torch::randn({3, 4}), torch::randn({5}), torch::randn({2, 2})};
  auto run = [&](int rank) {
    try {
      DistEnv env;
      env.rank = rank;
      env.world_size = 2;
      env.master_port = port;
      Communicator comm(env, std::chrono::seconds(30));
      std::vector<torch::Tensor> p;
      for (const auto& t : start) p.push_back(t.clone().requires_grad_());
      OverlappedGradients og(comm, p, 16);  // 16 bytes: every tensor its own bucket
      (p[0].sum() * (rank + 1)).backward();  // micro-batch 1 on both ranks: only p0
      og.arm();
      if (rank == 0) (p[0].pow(2).sum() + p[1].sum() * 3 + p[2].sum() * 5).backward();
      else (p[0] * 7).sum().backward();
      og.finish();
      for (auto& t : p) result[size_t(rank)].push_back(t.grad().clone());
    } catch (const std::exception& e) {
      errors[size_t(rank)] = e.what();
    }
  };
  std::thread t0(run, 0), t1(run, 1);
  t0.join();
  t1.join();
  ASSERT_EQ(errors[0], "");
  ASSERT_EQ(errors[1], "");
  torch::manual_seed(0);
  auto p0 = torch::randn({3, 4});
  const auto want0 = (torch::ones({3, 4}) * 1 + p0 * 2) + (torch::ones({3, 4}) * 2 + torch::full({3, 4}, 7.0));
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(torch::allclose(result[size_t(r)][0], want0)) << r;
    EXPECT_TRUE(torch::allclose(result[size_t(r)][1], torch::full({5}, 3.0))) << r;  // rank 1 adds zeros
    EXPECT_TRUE(torch::allclose(result[size_t(r)][2], torch::full({2, 2}, 5.0))) << r;
  }
}

TEST(Distributed, OverlappedAllReduceWithGradientAccumulationStepsAsAfterTheBackward) {
  const std::string dir = temp_dir("dist_overlap");
  ASSERT_EQ(sh(train_cmd(dir + "/one", "--batch-size 2 --grad-accum 2 >/dev/null 2>&1")), 0);
  ASSERT_EQ(sh(train_cmd(dir + "/over", "--nproc 2 --batch-size 1 --grad-accum 2 --overlap-allreduce true >/dev/null 2>&1")), 0);
  ASSERT_EQ(sh(train_cmd(dir + "/after", "--nproc 2 --batch-size 1 --grad-accum 2 >/dev/null 2>&1")), 0);
  EXPECT_GT(max_rel_diff(dir + "/one", fixture().model), 1e-3);
  EXPECT_LT(max_rel_diff(dir + "/over", dir + "/one"), 2e-5);
  EXPECT_LT(max_rel_diff(dir + "/after", dir + "/one"), 2e-5);
}

TEST(Distributed, ClearErrorsForAnUnreachableMasterDisagreeingRanksAndTooLittleData) {
  const std::string dir = temp_dir("dist_errors");
  const Fixture& f = fixture();
  // A rank whose master never comes up.
  const int port = free_port();
  const std::string env1 = "RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " ";
  EXPECT_NE(sh(env1 + train_cmd(dir + "/x", "--batch-size 2 --dist-timeout 2 > " + dir + "/x.log 2>&1")), 0);
  std::string log = read_file(dir + "/x.log", FileKind::Dataset);
  EXPECT_NE(log.find("rank 1 of 2: cannot join the training group at MASTER_ADDR:MASTER_PORT = 127.0.0.1:" +
                     std::to_string(port)),
            std::string::npos) << log;
  // Two ranks on different data (one sample fewer): they would train different models.
  const int port2 = free_port();
  const std::string env = "WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port2) + " ";
  const std::string both = "(RANK=0 " + env + train_cmd(dir + "/y", "--batch-size 2 --max-samples 12 --dist-timeout 30 > " + dir + "/y0.log 2>&1") +
                           " & RANK=1 " + env + train_cmd(dir + "/y", "--batch-size 2 --max-samples 11 --dist-timeout 30 > " + dir + "/y1.log 2>&1") +
                           "; wait)";
  sh(both);
  log = read_file(dir + "/y0.log", FileKind::Dataset) + read_file(dir + "/y1.log", FileKind::Dataset);
  EXPECT_NE(log.find("the ranks disagree on the model, data or options"), std::string::npos) << log;
  // More ranks than samples.
  EXPECT_NE(sh(train_cmd(dir + "/z", "--nproc 2 --batch-size 1 --max-samples 1 > " + dir + "/z.log 2>&1")), 0);
  log = read_file(dir + "/z.log", FileKind::Dataset);
  EXPECT_NE(log.find("world size 2 is larger than the 1 samples"), std::string::npos) << log;
}
