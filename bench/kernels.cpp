// Google Benchmark microbenchmarks for the hot kernels: attention over a per-layer KV cache
// (the decode step Victor shortens), the LLaMA MLP, the vision tower.
#include <benchmark/benchmark.h>

#include "victor/blas.h"
#include "victor/config.h"
#include "victor/model.h"
#include "victor/ops.h"

using namespace victor;

namespace {

// One decode step's attention for a 1B-class layer (32 heads, 4 KV heads, hd 64) over S keys:
// S = 64 + 576 (plain LLaVA prompt) versus 64 + 8 (after Victor's drop).
void BM_DecodeAttention(benchmark::State& st) {
  torch::NoGradGuard ng;
  const int64_t S = st.range(0);
  auto q = torch::randn({1, 32, 1, 64}), k = torch::randn({1, 4, S, 64}), v = torch::randn({1, 4, S, 64});
  auto allowed = torch::ones({1, 1, S}, torch::kBool);
  for (auto _ : st) benchmark::DoNotOptimize(attention(q, k, v, allowed));
  st.counters["keys"] = double(S);
}
BENCHMARK(BM_DecodeAttention)->Arg(72)->Arg(640)->Unit(benchmark::kMicrosecond);

// Prefill attention for the same layer over T tokens.
void BM_PrefillAttention(benchmark::State& st) {
  torch::NoGradGuard ng;
  const int64_t T = st.range(0);
  auto q = torch::randn({1, 32, T, 64}), k = torch::randn({1, 4, T, 64}), v = torch::randn({1, 4, T, 64});
  auto allowed = torch::ones({T, T}, torch::kBool).tril().unsqueeze(0);
  for (auto _ : st) benchmark::DoNotOptimize(attention(q, k, v, allowed));
}
BENCHMARK(BM_PrefillAttention)->Arg(72)->Arg(640)->Unit(benchmark::kMillisecond);

// SwiGLU MLP of a 1B-class layer (2048 -> 5632 -> 2048) on T rows (1 = decode).
void BM_LlamaMlp(benchmark::State& st) {
  torch::NoGradGuard ng;
  const int64_t T = st.range(0);
  auto x = torch::randn({1, T, 2048});
  auto g = torch::randn({5632, 2048}) * 0.02, u = torch::randn({5632, 2048}) * 0.02, d = torch::randn({2048, 5632}) * 0.02;
  for (auto _ : st) benchmark::DoNotOptimize(dense(torch::silu(dense(x, g)) * dense(x, u), d));
  st.counters["rows"] = double(T);
}
BENCHMARK(BM_LlamaMlp)->Arg(1)->Arg(72)->Arg(640)->Unit(benchmark::kMillisecond);

// The small preset's vision tower on one 112 px image (256 patches).
void BM_VisionTowerSmall(benchmark::State& st) {
  torch::NoGradGuard ng;
  ModelConfig c = preset_config("small");
  c.text.vocab_size = 384;
  c.image_token_index = 380;
  Vlm m = Vlm::random(c, 0);
  auto px = torch::randn({st.range(0), 3, 112, 112});
  for (auto _ : st) benchmark::DoNotOptimize(m.encode_images(px));
}
BENCHMARK(BM_VisionTowerSmall)->Arg(1)->Arg(16)->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  victor::ensure_fast_blas(argv);  // measure the kernels users get
  at::set_num_threads(2);
  benchmark::AddCustomContext("blas_core", victor::blas_core_name());
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  return 0;
}
