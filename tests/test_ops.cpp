// Layer-level checks against straightforward reference computations.
#include <cmath>
#include <cstdlib>

#include "helpers.h"
#include "victor/blas.h"
#include "victor/ops.h"

using namespace victor;

TEST(Ops, RmsNormMatchesFormula) {
  torch::manual_seed(1);
  auto x = torch::randn({2, 3, 8});
  auto w = torch::randn({8});
  auto y = rms_norm(x, w, 1e-6);
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 3; ++t) {
      double ss = 0;
      for (int i = 0; i < 8; ++i) ss += std::pow(x[b][t][i].item<double>(), 2);
      double r = 1.0 / std::sqrt(ss / 8 + 1e-6);
      for (int i = 0; i < 8; ++i)
        EXPECT_NEAR(y[b][t][i].item<double>(), x[b][t][i].item<double>() * r * w[i].item<double>(), 1e-5);
    }
}

TEST(Ops, RopeMatchesRotateHalfFormula) {
  torch::manual_seed(2);
  const int hd = 8;
  const double theta = 10000.0;
  auto x = torch::randn({1, 2, 3, hd});
  auto pos = torch::tensor({{0, 5, 17}}, torch::kInt64);
  auto y = apply_rope(x, pos, theta);
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < 3; ++t) {
      double p = pos[0][t].item<double>();
      for (int i = 0; i < hd / 2; ++i) {
        // Pair (i, i + hd/2) rotates by angle p * theta^(-2i/hd).
        double ang = p * std::pow(theta, -2.0 * i / hd);
        double a = x[0][h][t][i].item<double>(), b = x[0][h][t][i + hd / 2].item<double>();
        EXPECT_NEAR(y[0][h][t][i].item<double>(), a * std::cos(ang) - b * std::sin(ang), 1e-4);
        EXPECT_NEAR(y[0][h][t][i + hd / 2].item<double>(), b * std::cos(ang) + a * std::sin(ang), 1e-4);
      }
    }
  // Position 0 is the identity.
  EXPECT_TRUE(torch::allclose(y.select(2, 0), x.select(2, 0)));
}

TEST(Ops, RawRowFormsOfRmsNormAndRopeEqualTheLibTorchOnes) {
  // The decode fast path's rms_norm_rows and rope_rows against rms_norm and apply_rope.
  torch::manual_seed(3);
  const int64_t B = 3, H = 4, hd = 16, d = H * hd;
  auto x = torch::randn({B, d}) * 3, w = torch::randn({d});
  auto out = torch::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), B, d, 1e-5, out.data_ptr<float>());
  EXPECT_TRUE(torch::allclose(out, rms_norm(x, w, 1e-5), 1e-5, 1e-6));
  auto pos = torch::tensor({0, 7, 1234}, torch::kInt64).view({B, 1});
  auto q = torch::randn({B, H, 1, hd});
  auto want = apply_rope(q, pos, 1e4);
  RopeTables t = rope_tables(pos, hd, 1e4);
  auto cos = t.cos.reshape({B, hd}).narrow(1, 0, hd / 2).contiguous(), sin = t.sin.reshape({B, hd}).narrow(1, 0, hd / 2).contiguous();
  auto got = q.clone().contiguous();
  rope_rows(got.data_ptr<float>(), B, H, hd, cos.data_ptr<float>(), sin.data_ptr<float>());
  EXPECT_TRUE(torch::allclose(got, want, 1e-5, 1e-6)) << (got - want).abs().max().item<float>();
  EXPECT_GT((got - q).abs().max().item<float>(), 0.1) << "positions 7 and 1234 rotate";
}

TEST(Ops, GroupedQueryAttentionMatchesExplicitSoftmax) {
  torch::manual_seed(3);
  const int B = 2, H = 4, Hkv = 2, T = 3, S = 5, hd = 4;
  auto q = torch::randn({B, H, T, hd}), k = torch::randn({B, Hkv, S, hd}), v = torch::randn({B, Hkv, S, hd});
  auto allowed = torch::rand({B, T, S}).gt(0.3);
  allowed.select(2, 0).fill_(true);  // every query sees at least one key
  torch::Tensor probs;
  auto out = attention(q, k, v, allowed, &probs);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      int kvh = h / (H / Hkv);  // Hugging Face repeat_kv: consecutive query heads share a KV head
      auto s = torch::matmul(q[b][h], k[b][kvh].t()) / std::sqrt(double(hd));
      s = s.masked_fill(allowed[b].logical_not(), -INFINITY);
      auto p = torch::softmax(s, -1);
      EXPECT_TRUE(torch::allclose(probs[b][h], p, 1e-5, 1e-6));
      EXPECT_TRUE(torch::allclose(out[b][h], torch::matmul(p, v[b][kvh]), 1e-5, 1e-5));
    }
  // Disallowed keys get exactly zero probability.
  EXPECT_EQ(probs.masked_select(allowed.unsqueeze(1).expand_as(probs).logical_not()).abs().max().item<float>(), 0.0f);
}

TEST(Ops, LargeBatchedPrefillAttentionRunsRowByRowWithTheSameResult) {
  // 2 x 16 heads x 1500 x 1500 float scores = 288 MB: above the limit, so without autograd the
  // rows of the batch run one at a time; asking for the probabilities keeps the batched path.
  torch::manual_seed(5);
  const int B = 2, H = 16, Hkv = 4, T = 1500, hd = 8;
  auto q = torch::randn({B, H, T, hd}), k = torch::randn({B, Hkv, T, hd}), v = torch::randn({B, Hkv, T, hd});
  auto allowed = torch::ones({T, T}, torch::kBool).tril().expand({B, T, T}).contiguous();
  allowed[1].narrow(1, 0, 7).fill_(false);  // the rows differ (padding on the left of row 1)
  allowed[1].select(1, 7).fill_(true);
  torch::NoGradGuard ng;
  auto chunked = attention(q, k, v, allowed);
  torch::Tensor probs;
  auto batched = attention(q, k, v, allowed, &probs);
  EXPECT_TRUE(torch::allclose(chunked, batched, 1e-5, 1e-6)) << (chunked - batched).abs().max().item<float>();
}

TEST(Ops, DenseOneRowPathEqualsMatmul) {
  torch::manual_seed(4);
  torch::NoGradGuard ng;
  auto w = torch::randn({7, 5}), b = torch::randn({7});
  auto x1 = torch::randn({1, 1, 5}), x3 = torch::randn({3, 5});
  EXPECT_TRUE(torch::allclose(dense(x1, w, b), torch::matmul(x1, w.t()) + b, 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(dense(x3, w), torch::matmul(x3, w.t()), 1e-5, 1e-5));
  EXPECT_EQ(dense(x1, w, b).sizes(), (std::vector<int64_t>{1, 1, 7}));
}

TEST(Ops, QuickGeluAndGelu) {
  auto x = torch::linspace(-3, 3, 13);
  EXPECT_TRUE(torch::allclose(activation(x, "quick_gelu"), x * torch::sigmoid(1.702 * x)));
  auto ref = x * 0.5 * (1 + torch::erf(x / std::sqrt(2.0)));
  EXPECT_TRUE(torch::allclose(activation(x, "gelu"), ref, 1e-5, 1e-6));
}

TEST(Ops, CompactionIndexKeepsOrderAndPadsRight) {
  auto keep = torch::tensor({{true, false, true, true}, {false, false, true, false}});
  auto idx = compaction_index(keep);
  auto expect = torch::tensor({{0, 2, 3}, {2, 4, 4}}, torch::kInt64);
  EXPECT_TRUE(torch::equal(idx, expect));
}

TEST(Ops, AttentionPermissions) {
  // Row: [text, visual(g0), visual(g0), register(g0), text]
  TokenMeta m;
  m.order = torch::arange(5).view({1, 5});
  m.pos = m.order.clone();
  m.kind = torch::tensor({{0, 1, 1, 2, 0}}, torch::kInt64);
  m.group = torch::tensor({{-1, 0, 0, 0, -1}}, torch::kInt64);
  auto causal = attention_allowed(m, m, RegisterMask::Causal)[0];
  auto ro = attention_allowed(m, m, RegisterMask::RegistersOnly)[0];
  EXPECT_TRUE(torch::equal(causal, torch::ones({5, 5}, torch::kBool).tril()));
  EXPECT_TRUE(ro[3][1].item<bool>());    // register sees its image
  EXPECT_FALSE(ro[4][1].item<bool>());   // text does not see visual tokens
  EXPECT_TRUE(ro[4][3].item<bool>());    // text sees the register
  EXPECT_TRUE(ro[2][1].item<bool>());    // visual sees earlier visual of the same image
}

TEST(Blas, OpenBlasRunsKernelsForThisCpuNotTheGenericFallback) {
  // test_main calls ensure_fast_blas, as every victor binary does; on a CPU with AVX2 + FMA the
  // kernels must not be OpenBLAS's SSE3 fallback (about 5x slower GEMM, docs/benchmarks.md).
  const std::string core = victor::blas_core_name();
  if (core.empty()) GTEST_SKIP() << "the BLAS is not OpenBLAS";
  if (std::getenv("OPENBLAS_CORETYPE") && !std::getenv("VICTOR_BLAS_REEXEC"))
    GTEST_SKIP() << "OPENBLAS_CORETYPE set by the user: " << std::getenv("OPENBLAS_CORETYPE");
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) GTEST_SKIP() << "no AVX2 + FMA";
  EXPECT_FALSE(victor::is_generic_blas_core(core)) << core;
  EXPECT_TRUE(victor::is_generic_blas_core("Prescott"));  // the fallback seen on Intel model 207
}
