// Victor's semantics: registers, the drop after layer k, both mask modes, the per-layer cache.
#include "helpers.h"
#include "victor/generate.h"

using namespace victor;
using namespace victor::test;

namespace {

PromptInput one_image(const ModelConfig& c, uint64_t seed) {
  return prompt(c, {5, 6, 7}, {8, 9, 10, 11}, random_pixels(1, 28, seed));
}

}  // namespace

TEST(Victor, OffReproducesThePlainModelExactly) {
  Vlm plain = Vlm::random(tiny_config(), 21);
  Vlm off = Vlm::random(tiny_config(0, 4), 21);  // m = 0, k = L
  EXPECT_TRUE(off.config().reducer.is_none());
  auto p = one_image(plain.config(), 1);
  EXPECT_TRUE(torch::equal(last_logits(plain, {p}), last_logits(off, {p})));
  // The two above were normalised to "none" when built: the real case is a model that HAD
  // registers and a drop, switched off, against one that never had them (same other weights:
  // the registers are declared last, so the seed draws the rest alike).
  Vlm had = Vlm::random(tiny_config(3, 2), 21);
  ASSERT_TRUE(had.weights().reducer.tensor("victor.registers").defined());
  EXPECT_FALSE(torch::equal(last_logits(plain, {p}), last_logits(had, {p})));
  had.set_reducer(Reducer::none(), 0, /*replace_registers=*/true);
  EXPECT_FALSE(had.weights().reducer.tensor("victor.registers").defined());
  EXPECT_TRUE(torch::equal(last_logits(plain, {p}), last_logits(had, {p})));
}

TEST(Victor, RegistersWithoutDropEqualPlainModelOnInsertedSequence) {
  auto cfg = tiny_config(3, 4);  // m = 3, k = L: nothing dropped
  Vlm v = Vlm::random(cfg, 22);
  Vlm plain = Vlm::random(tiny_config(), 22);  // same weights (same seed, registers declared last)
  auto p = one_image(cfg, 2);
  auto got = last_logits(v, {p});
  // Reference: the plain model's batch with the register rows spliced in after the visual rows.
  torch::NoGradGuard ng;
  SequenceBatch b = plain.assemble({p}, false);
  int64_t after_visual = 0;
  auto kinds = b.meta.kind[0];
  for (int64_t t = 0; t < kinds.size(0); ++t)
    if (kinds[t].item<int64_t>() == int64_t(TokenKind::Visual)) after_visual = t + 1;
  auto regs = v.weights().reducer.tensor("victor.registers").unsqueeze(0);
  auto e = torch::cat({b.embeds.narrow(1, 0, after_visual), regs,
                       b.embeds.narrow(1, after_visual, b.embeds.size(1) - after_visual)}, 1);
  SequenceBatch r;
  r.embeds = e;
  const int64_t T = e.size(1);
  r.meta.order = torch::arange(T).view({1, T});
  r.meta.pos = r.meta.order.clone();
  r.meta.kind = torch::zeros({1, T}, torch::kInt64);  // all plain tokens
  r.meta.group = torch::full({1, T}, int64_t(-1));
  auto out = plain.forward(r);
  auto ref = plain.logits(out.hidden.select(1, T - 1));
  EXPECT_TRUE(torch::allclose(got, ref, 1e-5, 1e-5));
}

TEST(Victor, IncrementalDecodeEqualsFullRecomputeWithDrop) {
  for (auto mode : {RegisterMask::Causal, RegisterMask::RegistersOnly})
    for (int k : {0, 1, 2, 3}) {
      auto cfg = tiny_config(2, k, mode);
      Vlm m = Vlm::random(cfg, 23 + k);
      SCOPED_TRACE(to_string(mode) + " k=" + std::to_string(k));
      check_incremental_equals_full(m, one_image(cfg, 3), 5);
    }
}

namespace {

KvCache clone_cache(const KvCache& c) {
  KvCache o = c;
  for (auto& l : o.layers) {
    l.k = l.k.clone();
    l.v = l.v.clone();
    l.meta = {l.meta.order.clone(), l.meta.pos.clone(), l.meta.kind.clone(), l.meta.group.clone()};
  }
  o.next_pos = c.next_pos.clone();
  return o;
}

}  // namespace

TEST(Victor, FastDecodeStepEqualsTheGenericLayerPath) {
  // decode_step runs the layers on raw buffers (llama_layer_decode); forward() on the same one-token
  // batch runs them through LibTorch ops (llama_layer). Same logits, same caches, for both mask
  // modes, both cache storages, a left-padded batch of two, with and without room reserved.
  for (auto mode : {RegisterMask::Causal, RegisterMask::RegistersOnly})
    for (auto kv : {torch::kFloat32, torch::kBFloat16})
      for (int64_t reserve : {0, 3}) {
        SCOPED_TRACE(to_string(mode) + (kv == torch::kBFloat16 ? " bf16" : " f32") + " reserve " +
                     std::to_string(reserve));
        auto cfg = tiny_config(2, 2, mode);
        Vlm m = Vlm::random(cfg, 27);
        torch::NoGradGuard ng;
        auto batch = m.assemble({one_image(cfg, 8), prompt(cfg, {5}, {9}, random_pixels(1, 28, 9))}, true);
        auto [fast, first] = m.prefill(batch, kv, reserve);
        KvCache slow = clone_cache(fast);
        for (int step = 0; step < 4; ++step) {
          auto ids = torch::tensor({int64_t(3 + step), int64_t(7 - step)});
          auto got = m.decode_step(ids, fast);
          SequenceBatch b;
          b.embeds = m.embed_tokens(ids.view({2, 1}));
          b.meta.order = torch::full({2, 1}, slow.next_order);
          b.meta.pos = slow.next_pos.view({2, 1}).clone();
          b.meta.kind = torch::full({2, 1}, int64_t(TokenKind::Text));
          b.meta.group = torch::full({2, 1}, int64_t(-1));
          auto want = m.logits(m.forward(b, &slow).hidden.select(1, 0));
          slow.next_order += 1;
          slow.next_pos = slow.next_pos + 1;
          EXPECT_LT((got - want).abs().max().item<double>(), 1e-5) << "step " << step;
          // Keys equal to float32's rounding; in bf16 storage a key a rounding apart in float32
          // may land one bf16 step (2^-8 of itself) apart.
          const double rtol = kv == torch::kBFloat16 ? 1.0 / 128 : 1e-5;
          for (int l = 0; l < cfg.num_layers(); ++l) {
            ASSERT_EQ(fast.layers[l].len, slow.layers[l].len);
            EXPECT_TRUE(torch::allclose(fast.layers[l].keys().to(torch::kFloat32),
                                        slow.layers[l].keys().to(torch::kFloat32), rtol, 1e-6));
            EXPECT_TRUE(torch::allclose(fast.layers[l].values().to(torch::kFloat32),
                                        slow.layers[l].values().to(torch::kFloat32), rtol, 1e-6));
            EXPECT_TRUE(torch::equal(fast.layers[l].key_meta().order, slow.layers[l].key_meta().order));
            EXPECT_TRUE(torch::equal(fast.layers[l].key_meta().kind, slow.layers[l].key_meta().kind));
          }
        }
        EXPECT_TRUE(torch::equal(fast.next_pos, slow.next_pos));
      }
}

TEST(Victor, RegistersOnlyBlocksTextFromVisualTokens) {
  auto cfg = tiny_config(2, 3, RegisterMask::RegistersOnly);
  Vlm m = Vlm::random(cfg, 24);
  ForwardTrace trace;
  int checked = 0;
  trace.probe = [&](int, const torch::Tensor& probs, const TokenMeta& q, const TokenMeta& k) {
    auto text_q = q.kind[0].eq(int64_t(TokenKind::Text)).nonzero().squeeze(1);
    auto vis_k = k.kind[0].eq(int64_t(TokenKind::Visual)).nonzero().squeeze(1);
    if (vis_k.numel() == 0) return;
    auto sub = probs[0].index_select(1, text_q).index_select(2, vis_k);
    EXPECT_EQ(sub.abs().max().item<float>(), 0.0f);
    ++checked;
  };
  torch::NoGradGuard ng;
  m.forward(m.assemble({one_image(cfg, 4)}, true), nullptr, &trace);
  EXPECT_EQ(checked, 3);  // layers 0..k-1 have visual keys
}

TEST(Victor, WithoutRegistersTheImageReachesTextOnlyUnderCausal) {
  auto img_a = one_image(tiny_config(), 5), img_b = one_image(tiny_config(), 6);
  Vlm ro = Vlm::random(tiny_config(0, 2, RegisterMask::RegistersOnly), 25);
  EXPECT_TRUE(torch::equal(last_logits(ro, {img_a}), last_logits(ro, {img_b})));
  Vlm causal = Vlm::random(tiny_config(0, 2, RegisterMask::Causal), 25);
  EXPECT_FALSE(torch::allclose(last_logits(causal, {img_a}), last_logits(causal, {img_b})));
}

TEST(Victor, KvCacheOfLaterLayersHoldsNoVisualRows) {
  for (auto mode : {RegisterMask::Causal, RegisterMask::RegistersOnly}) {
    auto cfg = tiny_config(3, 2, mode);
    Vlm m = Vlm::random(cfg, 26);
    torch::NoGradGuard ng;
    auto p = one_image(cfg, 7);
    auto cache = m.make_cache(1);
    m.forward(m.assemble({p}, true), &cache);
    const int64_t text = int64_t(p.ids.size()) - 1, N = 16;
    for (int l = 0; l < 4; ++l) {
      auto kinds = cache.layers[l].key_meta().kind;
      int64_t vis = kinds.eq(int64_t(TokenKind::Visual)).sum().item<int64_t>();
      bool expect_visual = l < 2 && mode == RegisterMask::Causal;
      EXPECT_EQ(vis, expect_visual ? N : 0) << l;
      EXPECT_EQ(cache.layers[l].len, text + 3 + (expect_visual ? N : 0)) << l;
    }
    EXPECT_EQ(cache.bytes(), kv_bytes_formula(cfg, text, 1, 0));
    // Per layer: 2 (K,V) * Hkv 2 * hd 16 * 4 bytes per row.
    const int64_t row = 2 * 2 * 16 * 4;
    int64_t expect = mode == RegisterMask::Causal ? row * (2 * (text + 3 + N) + 2 * (text + 3))
                                                  : row * 4 * (text + 3);
    EXPECT_EQ(cache.bytes(), expect);
    EXPECT_EQ(kv_bytes_formula(without_reducer(cfg), text, 1, 0), row * 4 * (text + N));
    // Decoding continues from the full length.
    EXPECT_EQ(cache.next_pos[0].item<int64_t>(), text + N + 3);
  }
}

TEST(Victor, GradientsReachRegistersAndEarlyLayersOnly) {
  auto cfg = tiny_config(2, 2);
  Vlm m = Vlm::random(cfg, 27);
  m.set_trainable({Part::Vision, Part::Projector, Part::Registers, Part::Llm});
  auto p = one_image(cfg, 8);
  p.targets.assign(p.ids.size(), -100);
  p.targets[p.ids.size() - 2] = 9;
  p.targets[p.ids.size() - 1] = 3;
  auto out = m.forward(m.assemble({p}, false));
  auto sel = out.targets.ne(-100);
  auto loss = torch::nn::functional::cross_entropy(m.logits(out.hidden.index({sel})), out.targets.index({sel}));
  loss.backward();
  EXPECT_GT(m.weights().reducer.tensor("victor.registers").grad().abs().sum().item<float>(), 0);
  EXPECT_GT(m.weights().llm.layers[0].q.weight.grad().abs().sum().item<float>(), 0);
  EXPECT_GT(m.weights().proj1.weight.grad().abs().sum().item<float>(), 0);
  // k = 0: the visual rows are dropped before any layer, so no gradient reaches the vision side.
  Vlm z = Vlm::random(tiny_config(2, 0), 27);
  z.set_trainable({Part::Vision, Part::Projector, Part::Registers, Part::Llm});
  auto oz = z.forward(z.assemble({p}, false));
  auto sz = oz.targets.ne(-100);
  torch::nn::functional::cross_entropy(z.logits(oz.hidden.index({sz})), oz.targets.index({sz})).backward();
  auto g = z.weights().proj1.weight.grad();
  EXPECT_TRUE(!g.defined() || g.abs().sum().item<float>() == 0.0f);
  EXPECT_GT(z.weights().reducer.tensor("victor.registers").grad().abs().sum().item<float>(), 0);
}

TEST(Victor, EachImageHasItsOwnRegisters) {
  for (auto mode : {RegisterMask::Causal, RegisterMask::RegistersOnly}) {
    auto cfg = tiny_config(2, 3, mode);
    Vlm m = Vlm::random(cfg, 28);
    auto p = prompt(cfg, {5}, {8, 9}, random_pixels(2, 28, 9));  // two images
    torch::NoGradGuard ng;
    auto b = m.assemble({p}, true);
    EXPECT_EQ(b.meta.kind.eq(int64_t(TokenKind::Register)).sum().item<int64_t>(), 4);
    ForwardTrace trace;
    trace.probe = [&](int layer, const torch::Tensor& probs, const TokenMeta& q, const TokenMeta& k) {
      if (layer != 0) return;
      auto reg1 = (q.kind[0].eq(int64_t(TokenKind::Register)) & q.group[0].eq(1)).nonzero().squeeze(1);
      auto vis0 = (k.kind[0].eq(int64_t(TokenKind::Visual)) & k.group[0].eq(0)).nonzero().squeeze(1);
      auto vis1 = (k.kind[0].eq(int64_t(TokenKind::Visual)) & k.group[0].eq(1)).nonzero().squeeze(1);
      auto own = probs[0].index_select(1, reg1).index_select(2, vis1).sum().item<float>();
      auto other = probs[0].index_select(1, reg1).index_select(2, vis0).sum().item<float>();
      EXPECT_GT(own, 0.0f);
      if (mode == RegisterMask::RegistersOnly) EXPECT_EQ(other, 0.0f);
      else EXPECT_GT(other, 0.0f);
    };
    m.forward(b, nullptr, &trace);
  }
}

TEST(Victor, BatchOfDifferentLengthsEqualsSingleRequests) {
  auto cfg = tiny_config(2, 2);
  Vlm m = Vlm::random(cfg, 29);
  std::vector<PromptInput> rows{prompt(cfg, {5, 6, 7, 8, 9}, {8}, random_pixels(1, 28, 1)),
                                prompt(cfg, {5}, {8, 9, 10}, random_pixels(2, 28, 2)),
                                prompt(cfg, {5, 6}, {7}, torch::Tensor())};
  for (bool left : {true, false}) {
    auto batched = last_logits(m, rows, left);
    for (int i = 0; i < 3; ++i)
      EXPECT_TRUE(torch::allclose(batched[i], last_logits(m, {rows[i]})[0], 1e-4, 1e-4)) << i << left;
  }
  SamplingOptions opt;
  opt.max_new_tokens = 4;
  auto all = generate_ids(m, rows, -1, opt);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(all.tokens[i], generate_ids(m, {rows[i]}, -1, opt).tokens[0]);
}

TEST(Victor, MeanRegisterInitUsesVisualTokens) {
  auto cfg = tiny_config(4, 2);
  Vlm m = Vlm::random(cfg, 30);
  auto px = random_pixels(3, 28, 10);
  m.init_registers_mean(px, 1);
  auto mean = m.encode_images(px).mean(std::vector<int64_t>{0, 1});
  auto diff = (m.weights().reducer.tensor("victor.registers") - mean.unsqueeze(0)).abs();
  EXPECT_LT(diff.max().item<float>(), 0.2f);  // mean plus N(0, 0.02) noise
  EXPECT_GT(diff.max().item<float>(), 0.0f);
}
