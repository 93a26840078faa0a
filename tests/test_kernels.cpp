// Every weight kernel against a plain double-precision reference, on odd shapes, on every
// instruction-set path this CPU supports (the AVX2 path is forced on AVX-512 machines too).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "victor/kernels.h"

using namespace victor;

namespace {

// Restores the machine's best kernel set when a test ends.
struct IsaScope {
  kernels::Isa saved = kernels::active_isa();
  explicit IsaScope(kernels::Isa isa) { kernels::use_isa(isa); }
  ~IsaScope() { kernels::use_isa(saved); }
};

// x [M,K] times the float value of the stored weight, in double.
torch::Tensor reference(const torch::Tensor& x, const torch::Tensor& w_as_float) {
  return at::mm(x.to(torch::kFloat64), w_as_float.to(torch::kFloat64).t());
}

double max_rel_err(const torch::Tensor& got, const torch::Tensor& want) {
  const double scale = want.abs().max().item<double>() + 1e-12;
  return (got.to(torch::kFloat64) - want).abs().max().item<double>() / scale;
}

}  // namespace

TEST(Kernels, EveryPathMatchesReferenceOnOddShapes) {
  torch::manual_seed(7);
  for (auto isa : kernels::supported_isas()) {
    IsaScope scope(isa);
    for (int64_t M : {1, 2, 3, 5, 16})
      for (int64_t K : {1, 7, 16, 33, 100, 257})
        for (int64_t O : {1, 3, 5, 37}) {
          SCOPED_TRACE(std::string(kernels::isa_name(isa)) + " M=" + std::to_string(M) +
                       " K=" + std::to_string(K) + " O=" + std::to_string(O));
          auto x = torch::randn({M, K});
          auto w = torch::randn({O, K});
          // f32 weights.
          EXPECT_LT(max_rel_err(matmul_weight(x, w), reference(x, w)), 1e-5);
          // bf16 weights: the stored values are exact in float, so only summation order differs.
          auto wb = w.to(torch::kBFloat16);
          EXPECT_LT(max_rel_err(matmul_weight(x, wb), reference(x, wb.to(torch::kFloat32))), 1e-5);
          // int8 weights with per-row scales.
          auto qm = quantize_int8(w);
          auto deq = dequantize_int8(qm.q, qm.scale);
          EXPECT_LT(max_rel_err(matmul_weight(x, qm.q, qm.scale), reference(x, deq)), 1e-5);
        }
  }
}

TEST(Kernels, ThreadedRowSplitAndBatchShapesAgree) {
  // Enough rows that every thread gets a share, leading dims folded, batch 1 and 16.
  torch::manual_seed(8);
  at::set_num_threads(2);
  for (auto isa : kernels::supported_isas()) {
    IsaScope scope(isa);
    for (int64_t M : {1, 16}) {
      auto x = torch::randn({1, M, 130});
      auto w = torch::randn({203, 130});
      auto qm = quantize_int8(w);
      auto y = matmul_weight(x, qm.q, qm.scale);
      ASSERT_EQ(y.sizes(), (std::vector<int64_t>{1, M, 203}));
      EXPECT_LT(max_rel_err(y[0], reference(x[0], dequantize_int8(qm.q, qm.scale))), 1e-5);
    }
  }
  at::set_num_threads(1);
}

TEST(Kernels, LongProductsUseBf16GemmWithinItsRounding) {
  // More rows than kSkinnyRows: activations and output are rounded to bf16 once (8 bits).
  torch::manual_seed(9);
  auto x = torch::randn({kSkinnyRows + 7, 96});
  auto w = torch::randn({45, 96});
  auto wb = w.to(torch::kBFloat16);
  auto want = reference(x, wb.to(torch::kFloat32));
  EXPECT_LT(max_rel_err(matmul_weight(x, wb), want), 2e-2);
  auto qm = quantize_int8(w);
  for (auto isa : kernels::supported_isas()) {
    IsaScope scope(isa);  // the int8 -> bf16 dequantization runs on this path
    EXPECT_LT(max_rel_err(matmul_weight(x, qm.q, qm.scale), reference(x, dequantize_int8(qm.q, qm.scale))), 2e-2);
  }
  // f32 weights stay exact in float.
  EXPECT_LT(max_rel_err(matmul_weight(x, w), reference(x, w)), 1e-5);
}

TEST(Kernels, Int8QuantizationIsPerRowSymmetricWithinHalfAStep) {
  torch::manual_seed(10);
  auto w = torch::randn({9, 50});
  w[3].zero_();            // an all-zero row stays exactly zero
  w[4].mul_(1000.0);       // rows have their own scale
  auto qm = quantize_int8(w);
  ASSERT_EQ(qm.q.scalar_type(), torch::kInt8);
  ASSERT_EQ(qm.scale.sizes(), (std::vector<int64_t>{9}));
  auto amax = w.abs().amax(1);
  EXPECT_TRUE(torch::allclose(qm.scale, amax / 127.0));
  EXPECT_EQ(qm.q.abs().amax(1)[0].item<int>(), 127);  // the largest |w| maps to 127
  auto err = (dequantize_int8(qm.q, qm.scale) - w).abs();
  EXPECT_TRUE(err.le(qm.scale.unsqueeze(1) * 0.5 + 1e-6).all().item<bool>());
  EXPECT_EQ(dequantize_int8(qm.q, qm.scale)[3].abs().sum().item<float>(), 0.f);
}

TEST(Kernels, EmbeddingRowsDecodeEachStorage) {
  torch::manual_seed(11);
  auto table = torch::randn({20, 12});
  auto ids = torch::tensor({{3, 0}, {19, 3}}, torch::kInt64);
  auto want = table.index_select(0, ids.reshape({-1})).view({2, 2, 12});
  EXPECT_TRUE(torch::equal(embedding_rows(table, {}, ids), want));
  auto tb = table.to(torch::kBFloat16);
  EXPECT_TRUE(torch::equal(embedding_rows(tb, {}, ids), tb.to(torch::kFloat32).index_select(0, ids.reshape({-1})).view({2, 2, 12})));
  auto qm = quantize_int8(table);
  auto deq = dequantize_int8(qm.q, qm.scale);
  EXPECT_TRUE(torch::allclose(embedding_rows(qm.q, qm.scale, ids), deq.index_select(0, ids.reshape({-1})).view({2, 2, 12})));
}

TEST(Kernels, WrongShapesAndMissingScalesAreRefused) {
  auto x = torch::randn({2, 8});
  EXPECT_THROW(matmul_weight(x, torch::randn({4, 9})), std::runtime_error);
  EXPECT_THROW(matmul_weight(x, torch::zeros({4, 8}, torch::kInt8)), std::runtime_error);
  EXPECT_THROW(matmul_weight(x, torch::zeros({4, 8}, torch::kInt8), torch::ones({3})), std::runtime_error);
}
