// The plain model: incremental decoding, batching, vision features.
#include "helpers.h"
#include "victor/error.h"
#include "victor/generate.h"

using namespace victor;
using namespace victor::test;

namespace victor::test {
void check_incremental_equals_full(const Vlm& m, const PromptInput& p, int steps, double tol) {
  torch::NoGradGuard ng;
  SamplingOptions opt;
  opt.max_new_tokens = steps;
  opt.keep_logits = true;
  auto res = generate_ids(m, {p}, /*eos=*/-1, opt);
  ASSERT_EQ(int(res.tokens[0].size()), steps);
  PromptInput full = p;
  for (int s = 0; s < steps; ++s) {
    auto ref = last_logits(m, {full});
    EXPECT_TRUE(torch::allclose(res.step_logits[s][0], ref[0], tol, tol))
        << "step " << s << " max diff " << (res.step_logits[s][0] - ref[0]).abs().max().item<float>();
    full.ids.push_back(res.tokens[0][s]);
    full.generated += 1;  // FastV ranks by the last prompt token, not the last generated one
  }
}
}  // namespace victor::test

TEST(Model, IncrementalDecodeEqualsFullRecompute) {
  auto cfg = tiny_config();
  Vlm m = Vlm::random(cfg, 11);
  check_incremental_equals_full(m, prompt(cfg, {5, 6, 7}, {8, 9}, random_pixels(1, 28, 1)), 6);
  check_incremental_equals_full(m, prompt(cfg, {5}, {8}, torch::Tensor()), 4);  // text only
}

TEST(Model, BatchWithPaddingEqualsSingleRequests) {
  auto cfg = tiny_config();
  Vlm m = Vlm::random(cfg, 12);
  std::vector<PromptInput> rows{prompt(cfg, {5, 6, 7, 8, 9, 10}, {8, 9}, random_pixels(1, 28, 1)),
                                prompt(cfg, {5}, {11}, random_pixels(1, 28, 2))};
  for (bool left : {true, false}) {
    auto batched = last_logits(m, rows, left);
    for (int i = 0; i < 2; ++i)
      EXPECT_TRUE(torch::allclose(batched[i], last_logits(m, {rows[i]})[0], 1e-4, 1e-4)) << i << left;
  }
  // Batched generation equals one-at-a-time generation.
  SamplingOptions opt;
  opt.max_new_tokens = 5;
  auto both = generate_ids(m, rows, -1, opt);
  for (int i = 0; i < 2; ++i) EXPECT_EQ(both.tokens[i], generate_ids(m, {rows[i]}, -1, opt).tokens[0]);
}

TEST(Model, VisionFeaturesSelectLayerAndDropClassToken) {
  auto cfg = tiny_config();
  cfg.vision.num_hidden_layers = 3;
  Vlm m = Vlm::random(cfg, 13);
  auto px = random_pixels(2, 28, 3);
  auto f = m.vision_features(px);
  EXPECT_EQ(f.sizes(), (std::vector<int64_t>{2, 16, 32}));  // 4x4 patches, class token removed
  // -2 = output of the second-to-last block: perturbing the last block changes nothing.
  auto before = f.clone();
  m.weights().vision.layers[2].fc1.weight.add_(1.0);
  EXPECT_TRUE(torch::equal(m.vision_features(px), before));
  m.weights().vision.layers[1].fc1.weight.add_(1.0);
  EXPECT_FALSE(torch::equal(m.vision_features(px), before));
  cfg.vision_feature_select_strategy = "full";
  EXPECT_EQ(Vlm::random(cfg, 1).vision_features(px).size(1), 17);
}

TEST(Model, TiedEmbeddingsShareTheHead) {
  auto cfg = tiny_config();
  cfg.text.tie_word_embeddings = true;
  Vlm m = Vlm::random(cfg, 14);
  EXPECT_EQ(m.weights().llm.lm_head.weight.data_ptr(), m.weights().llm.embed_tokens.weight.data_ptr());
  for (auto& p : m.params()) EXPECT_NE(p.name, "language_model.lm_head.weight");
}

TEST(Model, SamplingIsSeededAndRespectsTopK) {
  auto cfg = tiny_config();
  Vlm m = Vlm::random(cfg, 15);
  auto p = prompt(cfg, {5}, {6}, random_pixels(1, 28, 1));
  SamplingOptions opt;
  opt.max_new_tokens = 8;
  opt.temperature = 1.0;
  opt.seed = 3;
  auto a = generate_ids(m, {p}, -1, opt), b = generate_ids(m, {p}, -1, opt);
  EXPECT_EQ(a.tokens, b.tokens);
  // top-k = 1 is greedy.
  opt.top_k = 1;
  SamplingOptions greedy;
  greedy.max_new_tokens = 8;
  EXPECT_EQ(generate_ids(m, {p}, -1, opt).tokens, generate_ids(m, {p}, -1, greedy).tokens);
  // top-p keeps only the smallest set reaching p: with a dominant token it is always chosen.
  auto gen = at::detail::createCPUGenerator(1);
  auto logits = torch::tensor({{10.0f, 0.0f, 0.0f, 0.0f}});
  SamplingOptions tp;
  tp.temperature = 1.0;
  tp.top_p = 0.5;
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_next(logits, tp, gen).item<int64_t>(), 0);
}

TEST(Model, AveragePoolingBaselineReducesVisualTokens) {
  auto cfg = tiny_config();
  Vlm plain = Vlm::random(cfg, 16);
  cfg.reducer = Reducer::pool({2});
  Vlm pooled = Vlm::random(cfg, 16);  // same weights
  EXPECT_EQ(cfg.visual_tokens_per_image(), 4);
  auto px = random_pixels(2, 28, 5);
  auto full = plain.encode_images(px);   // [2,16,d], a 4x4 grid
  auto got = pooled.encode_images(px);   // [2,4,d]
  ASSERT_EQ(got.sizes(), (std::vector<int64_t>{2, 4, 64}));
  // Token (0,1) of the pooled 2x2 grid is the mean of patches (0,2),(0,3),(1,2),(1,3).
  auto ref = (full.select(1, 2) + full.select(1, 3) + full.select(1, 6) + full.select(1, 7)) / 4;
  EXPECT_TRUE(torch::allclose(got.select(1, 1), ref, 1e-5, 1e-6));
  cfg.reducer = Reducer::pool({3});
  EXPECT_THROW(cfg.validate(), Error);
}
