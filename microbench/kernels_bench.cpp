// Google Benchmark microbenchmarks for the hot kernels: attention over a per-layer KV cache
// (the decode step Victor shortens), the LLaMA MLP, the vision tower.
#include <benchmark/benchmark.h>

#include "victor/blas.h"
#include "victor/config.h"
#include "victor/kernels.h"
#include "victor/kv_cache.h"
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

// The decode step's own attention kernel (attend_decode) on the 7B shape: 16 rows, 32 heads of 128
// (one query head per KV head), a bf16 cache of S keys per row (136 = Victor's mean context at 128
// new tokens, 704 = plain's). GB/s counts the cache bytes read: the kernel should run at the
// memory's speed, as the products do.
void BM_AttendDecode7b(benchmark::State& st) {
  const int64_t B = 16, H = 32, hd = 128, S = st.range(0), cap = S + 8;
  auto q = torch::randn({B, H, hd});
  auto k = torch::randn({B, H, cap, hd}).to(torch::kBFloat16), v = torch::randn({B, H, cap, hd}).to(torch::kBFloat16);
  std::vector<uint8_t> allowed(size_t(S), 1);
  std::vector<DecodeKv> rows(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b)
    rows[size_t(b)] = {k[b].data_ptr(), v[b].data_ptr(), cap * hd, S, allowed.data()};
  auto out = torch::empty({B, H, hd});
  for (auto _ : st) attend_decode(q.data_ptr<float>(), B, H, H, hd, true, rows.data(), out.data_ptr<float>());
  st.counters["GB/s"] = benchmark::Counter(double(2 * B * H * S * hd * 2), benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_AttendDecode7b)->Arg(136)->Arg(704)->Unit(benchmark::kMillisecond)->UseRealTime();

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

// The paper's vision tower (CLIP ViT-L/14-336: 24 layers, 1024 wide, 577 tokens) on one image,
// in the storage the clip-l-1b preset runs (arg: 0 f32, 1 bf16, 2 int8). The language model is
// cut to one layer so the set-up stays short; only encode_images is timed.
void BM_VisionTowerClipL(benchmark::State& st) {
  torch::NoGradGuard ng;
  ModelConfig c = preset_config("clip-l-1b");
  c.text.num_hidden_layers = 1;
  const WeightDType dt = st.range(0) == 0 ? WeightDType::F32 : st.range(0) == 1 ? WeightDType::BF16 : WeightDType::Int8;
  Vlm m = Vlm::random(c, 0, dt);
  const int64_t S = c.vision.image_size;
  auto px = torch::randn({1, 3, S, S});
  benchmark::DoNotOptimize(m.encode_images(px));  // warm: first-touch pages, oneDNN kernels
  for (auto _ : st) benchmark::DoNotOptimize(m.encode_images(px));
  st.SetLabel(to_string(dt));
}
BENCHMARK(BM_VisionTowerClipL)->Arg(0)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();

// The machine's limits, so every kernel's figure reads as a share of them.
// Bandwidth: sum a 512 MiB float array (far beyond every cache), threads over halves.
void BM_PeakReadBandwidth(benchmark::State& st) {
  auto a = torch::ones({128 * 1024 * 1024});
  for (auto _ : st) benchmark::DoNotOptimize(a.sum());
  st.counters["GB/s"] = benchmark::Counter(double(a.numel()) * 4, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_PeakReadBandwidth)->Unit(benchmark::kMillisecond)->UseRealTime();

// FMA peak: LibTorch's best float GEMM on a cache-friendly shape is our practical ceiling.
void BM_PeakGemmF32(benchmark::State& st) {
  torch::NoGradGuard ng;
  auto a = torch::randn({1024, 1024}), b = torch::randn({1024, 1024});
  for (auto _ : st) benchmark::DoNotOptimize(at::mm(a, b));
  st.counters["GFLOP/s"] = benchmark::Counter(2.0 * 1024 * 1024 * 1024, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_PeakGemmF32)->Unit(benchmark::kMillisecond)->UseRealTime();

// y = x W^T on 1B-class MLP matrices (5632 x 2048) for each weight storage and row count:
// 1-16 rows use victor's streaming kernels (GB/s of weights), more the bf16 GEMM (GFLOP/s).
// Eight distinct matrices in turn (>= 92 MiB, beyond the caches), as a model's layers stream.
// Arg 0: storage (0 f32, 1 bf16, 2 int8, 3 int4 as a model holds it, 4 int4 in 4-row tiles), arg 1: rows. GB/s counts the stored bytes (int4:
// the packed values and their float16 scales).
void BM_MatmulWeight(benchmark::State& st) {
  torch::NoGradGuard ng;
  const int64_t O = 5632, K = 2048, M = st.range(1), copies = 8;
  std::vector<torch::Tensor> stored, scales;
  for (int64_t i = 0; i < copies; ++i) {
    auto w = torch::randn({O, K}) * 0.02;
    torch::Tensor s;
    if (st.range(0) == 1) w = w.to(torch::kBFloat16);
    if (st.range(0) == 2) {
      auto q = quantize_int8(w);
      w = q.q;
      s = q.scale;
    }
    if (st.range(0) == 3) {  // in the tiles a loaded model holds (16 rows on AVX-512 VNNI, else 4)
      auto q = quantize_int4(w);
      w = q.q;
      s = q.scale;
      int4_tile_for_kernels(w, s, K);
    }
    if (st.range(0) == 4) {  // in 4-row tiles (what a model held before the 16-row tiles)
      auto q = quantize_int4(w);
      w = int4_interleave(q.q, K);
      s = q.scale;
    }
    stored.push_back(w);
    scales.push_back(s);
  }
  auto x = torch::randn({M, K});
  int64_t i = 0;
  for (auto _ : st) {
    benchmark::DoNotOptimize(matmul_weight(x, stored[i], scales[i]));
    i = (i + 1) % copies;
  }
  const double bytes = double(stored[0].numel()) * stored[0].element_size() +
                       (st.range(0) >= 3 ? double(scales[0].numel()) * 2 : 0.0);
  st.counters["GB/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
  st.counters["GFLOP/s"] = benchmark::Counter(2.0 * M * O * K, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
  static const char* names[] = {"f32", "bf16", "int8", "int4", "int4-tiles4"};
  st.SetLabel(std::string(names[st.range(0)]) + " " + kernels::isa_name(kernels::active_isa()));
}
BENCHMARK(BM_MatmulWeight)->ArgsProduct({{0, 1, 2, 3, 4}, {1, 4, 16, 64, 640}})->Unit(benchmark::kMillisecond)->UseRealTime();

// Times x [M,K] times int8 weights [O,K] on the active kernel path, cycling through `copies`
// quantized matrices so the weights stream from memory; GB/s of int8 weights, labelled by path.
void time_int8_products(benchmark::State& st, int64_t O, int64_t K, int64_t M, int64_t copies) {
  std::vector<Int8Matrix> stored;
  for (int64_t i = 0; i < copies; ++i) stored.push_back(quantize_int8(torch::randn({O, K}) * 0.02));
  auto x = torch::randn({M, K});
  size_t i = 0;
  for (auto _ : st) {
    benchmark::DoNotOptimize(matmul_weight(x, stored[i].q, stored[i].scale));
    i = (i + 1) % stored.size();
  }
  st.counters["GB/s"] = benchmark::Counter(double(O * K), benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
  st.SetLabel(std::string("int8 ") + kernels::isa_name(kernels::active_isa()));
}

// int8 weights on every kernel path this CPU has, in one run (arg 0: index into supported_isas(),
// arg 1: rows): the int8 x int8 VNNI path against widening the weights to float.
void BM_MatmulInt8PerIsa(benchmark::State& st) {
  torch::NoGradGuard ng;
  const auto isas = kernels::supported_isas();
  if (size_t(st.range(0)) >= isas.size()) {
    st.SkipWithError("this CPU has fewer kernel paths");
    return;
  }
  const kernels::Isa saved = kernels::active_isa();
  kernels::use_isa(isas[size_t(st.range(0))]);
  time_int8_products(st, 5632, 2048, st.range(1), 8);
  kernels::use_isa(saved);
}
BENCHMARK(BM_MatmulInt8PerIsa)->ArgsProduct({{0, 1, 2, 3, 4}, {1, 4, 8, 16}})->Unit(benchmark::kMillisecond)->UseRealTime();

// The int8 product of 16 rows (a batch-16 decode step) on the 7B language model's shapes, on the
// best path this CPU has: args (O, K) = (4096, 4096) attention, (11008, 4096) gate / up,
// (4096, 11008) down; (5632, 2048) is BM_MatmulInt8PerIsa's shape. Enough copies that the weights
// stream from memory.
void BM_MatmulInt8Shapes(benchmark::State& st) {
  torch::NoGradGuard ng;
  const int64_t O = st.range(0), K = st.range(1);
  time_int8_products(st, O, K, 16, std::max<int64_t>(2, (int64_t(256) << 20) / (O * K)));
}
BENCHMARK(BM_MatmulInt8Shapes)->Args({4096, 4096})->Args({11008, 4096})->Args({4096, 11008})->Args({5632, 2048})->Unit(benchmark::kMillisecond)->UseRealTime();

// LibTorch's own one-row products on the same matrix, for comparison with the kernels above.
void BM_TorchMv(benchmark::State& st) {
  torch::NoGradGuard ng;
  auto w = torch::randn({5632, 2048}) * 0.02;
  if (st.range(0) == 1) w = w.to(torch::kBFloat16);
  auto x = torch::randn({2048}).to(w.scalar_type());
  for (auto _ : st) benchmark::DoNotOptimize(at::mv(w, x));
  st.counters["GB/s"] = benchmark::Counter(double(w.numel()) * w.element_size(), benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
  st.SetLabel(st.range(0) == 1 ? "bf16" : "f32");
}
BENCHMARK(BM_TorchMv)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

// One batched decode step of the paper's language model (llava-7b: 4096 wide, 32 heads, 11008
// FFN, vocab 32064) cut to 4 layers, int8 weights, bf16 KV cache, 16 rows each holding S keys
// (arg 0: 136 = Victor's mean context at 128 new tokens, 704 = plain's), the LM head included.
// GB/s counts the weight bytes a step streams (the KV cache's bytes are the second counter); the
// step's products have the 7B shapes (K = 4096 and 11008; BM_MatmulInt8Shapes times them alone).
void BM_DecodeStepLlava7bInt8(benchmark::State& st) {
  torch::NoGradGuard ng;
  const int64_t B = 16, S = st.range(0);
  ModelConfig c = preset_config("llava-7b");
  c.text.num_hidden_layers = 4;
  c.vision.num_hidden_layers = 2;
  Vlm m = Vlm::random(c, 0, WeightDType::Int8);
  std::vector<PromptInput> rows(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    auto ids = torch::randint(3, 32000, {S}, torch::kInt64);
    rows[size_t(b)].ids.assign(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + S);
  }
  auto [cache, logits] = m.prefill(m.assemble(rows, true), torch::kBFloat16, 8);
  auto ids = logits.argmax(-1);
  // Each step appends one row past every layer's len; rewinding len and the next position makes
  // every timed step identical.
  const int64_t order = cache.next_order;
  const torch::Tensor pos = cache.next_pos;  // decode_step replaces the tensor, never writes it
  std::vector<int64_t> lens;
  for (auto& l : cache.layers) lens.push_back(l.len);
  for (auto _ : st) {
    benchmark::DoNotOptimize(m.decode_step(ids, cache));
    for (size_t l = 0; l < lens.size(); ++l) cache.layers[l].len = lens[l];
    cache.next_order = order;
    cache.next_pos = pos;
  }
  int64_t llm = 0;
  for (auto& p : m.params())
    if (p.name.rfind("language_model", 0) == 0 && p.name.find("embed_tokens") == std::string::npos)
      llm += p.tensor->numel() * p.tensor->element_size();
  st.counters["GB/s"] = benchmark::Counter(double(llm), benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
  st.counters["KV MB"] = double(cache.bytes()) / 1e6;
  st.counters["weight MB"] = double(llm) / 1e6;
}
BENCHMARK(BM_DecodeStepLlava7bInt8)->Arg(136)->Arg(704)->Unit(benchmark::kMillisecond)->UseRealTime();


// The key-visibility mask of a prefill (attention_allowed: key_visible per query and key, threads
// over query rows) against the vectorised LibTorch expression it replaced (kept here as the
// reference), for one row of T tokens: 64 text, T - 80 visual, 8 registers, 8 text; arg 1 = 1:
// registers_only. At T = 3,000 (a LLaVA-NeXT prefill) the mask is 9 M entries, computed once per
// side of the reduction per forward. Measured 2026-12-07 (Intel Xeon, AVX-512, 2 threads): at 3,000
// rows the loop takes 4.8 ms causal (tensor ops 2.0 ms) and 5.3 ms registers_only (tensor ops
// 7.6 ms); at 300 rows (the small model's training rows) 0.05 ms. Against a prefill of 3,000 rows
// (minutes on a 7B model) or a training step (~0.5 s) both forms are noise, so the rule stays
// written once (key_visible) rather than twice for speed.
TokenMeta one_row_meta(int64_t T) {
  auto order = torch::arange(T, torch::kInt64).unsqueeze(0);
  auto kind = torch::zeros({1, T}, torch::kInt64), group = torch::full({1, T}, -1, torch::kInt64);
  kind.narrow(1, 64, T - 80).fill_(int64_t(TokenKind::Visual));
  kind.narrow(1, T - 16, 8).fill_(int64_t(TokenKind::Register));
  group.narrow(1, 64, T - 72).fill_(0);
  return {order, order.clone(), kind, group};
}

torch::Tensor allowed_by_tensor_ops(const TokenMeta& qm, const TokenMeta& km, RegisterMask mode) {
  const auto pad = static_cast<int64_t>(TokenKind::Pad);
  auto allowed = km.order.unsqueeze(1).le(qm.order.unsqueeze(2)) & km.kind.ne(pad).unsqueeze(1);
  if (mode == RegisterMask::RegistersOnly) {
    auto key_visual = km.kind.eq(static_cast<int64_t>(TokenKind::Visual)).unsqueeze(1);
    auto q_image = qm.kind.eq(static_cast<int64_t>(TokenKind::Visual)) | qm.kind.eq(static_cast<int64_t>(TokenKind::Register));
    auto same_image = qm.group.unsqueeze(2).eq(km.group.unsqueeze(1));
    allowed = allowed & (key_visual.logical_not() | (q_image.unsqueeze(2) & same_image));
  }
  return allowed;
}

void BM_AttentionAllowed(benchmark::State& st) {
  const TokenMeta m = one_row_meta(st.range(0));
  const RegisterMask mode = st.range(1) ? RegisterMask::RegistersOnly : RegisterMask::Causal;
  const bool reference = st.range(2) != 0;
  if (!torch::equal(attention_allowed(m, m, mode), allowed_by_tensor_ops(m, m, mode)))
    st.SkipWithError("the two forms of the rule disagree");
  for (auto _ : st) benchmark::DoNotOptimize(reference ? allowed_by_tensor_ops(m, m, mode) : attention_allowed(m, m, mode));
  st.SetLabel(reference ? "tensor ops (before)" : "key_visible loop");
}
BENCHMARK(BM_AttentionAllowed)->ArgsProduct({{300, 3000}, {0, 1}, {0, 1}})->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  victor::ensure_fast_blas(argv);  // measure the kernels and the allocator users get
  victor::tune_allocator();
  at::set_num_threads(2);
  benchmark::AddCustomContext("blas_core", victor::blas_core_name());
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  return 0;
}
