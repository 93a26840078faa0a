// The token-reducer seam: spec parsing, each reducer's formulas, "no reduction equals plain",
// FastV's and VisionZip's choices against independent computations, and the bootstrap intervals.
#include <filesystem>
#include <fstream>

#include "helpers.h"
#include "victor/error.h"
#include "victor/generate.h"
#include "victor/image.h"
#include "victor/npy.h"
#include "victor/tokenizer.h"
#include "victor/ops.h"
#include "victor/stats.h"

using namespace victor;
using namespace victor::test;
namespace fs = std::filesystem;

namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

PromptInput one_image(const ModelConfig& c, uint64_t seed) {
  return prompt(c, {5, 6, 7}, {8, 9, 10, 11}, random_pixels(1, 28, seed));
}

ModelConfig with(const std::string& spec) {
  ModelConfig c = tiny_config();
  c.reducer = Reducer::parse(spec);
  c.validate();
  return c;
}

}  // namespace

TEST(Reducer, SpecsRoundTripAndNameThemselves) {
  for (std::string s : {"none", "victor:m=8,k=2", "victor:m=0,k=1,mask=registers_only", "pool:4",
                        "fastv:k=2,keep=0.25", "visionzip:dominant=54,contextual=10", "resampler:latents=64"})
    EXPECT_EQ(Reducer::parse(s).spec(), s);
  EXPECT_EQ(Reducer::parse("pool:p=2").spec(), "pool:2");
  EXPECT_EQ(Reducer::parse("plain").spec(), "none");
  EXPECT_EQ(Reducer::parse("victor:m=8,k=3").name(), "victor m=8 k=3");
  EXPECT_EQ(Reducer::parse("fastv:k=2,keep=0.5").name(), "fastv k=2 keep=0.5");
  EXPECT_EQ(Reducer::parse("visionzip:dominant=16,contextual=4").name(), "visionzip 16+4");
}

TEST(Reducer, BadSpecsAreRefusedByName) {
  struct Case {
    std::string spec, says;
  };
  for (auto& c : std::vector<Case>{{"zip:3", "unknown reducer"},
                                   {"victor:m=8", "missing k"},
                                   {"victor:k=2", "missing m"},
                                   {"victor:m=-1,k=2", "out of range"},
                                   {"victor:m=8,k=2,mask=sideways", "mask 'sideways'"},
                                   {"victor:m=8,k=two", "not an integer"},
                                   {"fastv:k=2,keep=1.5", "keep"},
                                   {"fastv:k=2,keep=0", "keep"},
                                   {"fastv:k=0,keep=0.5", "out of range"},
                                   {"fastv:k=2", "missing keep"},
                                   {"fastv:k=2,keep=0.5,x=1", "unknown parameter 'x'"},
                                   {"pool:1", "out of range"},
                                   {"pool:", "nothing after"},
                                   {"visionzip:dominant=5", "missing contextual"},
                                   {"victor:m=8,m=4,k=2", "given twice"}}) {
    std::string e = error_of([&] { Reducer::parse(c.spec); });
    EXPECT_NE(e.find("'" + c.spec + "'"), std::string::npos) << c.spec << ": " << e;
    EXPECT_NE(e.find(c.says), std::string::npos) << c.spec << ": " << e;
    EXPECT_EQ(e.find('\n'), std::string::npos) << "one line";
  }
  // Parameters that cannot fit the tiny model (4 layers, a 4x4 patch grid).
  for (std::string s : {"victor:m=2,k=5", "fastv:k=4,keep=0.5", "pool:3", "visionzip:dominant=17,contextual=0",
                        "visionzip:dominant=12,contextual=4"}) {
    ModelConfig c = tiny_config();
    c.reducer = Reducer::parse(s);
    std::string e = error_of([&] { c.validate(); });
    EXPECT_NE(e.find("'" + s + "'"), std::string::npos) << s << ": " << e;
  }
}

TEST(Reducer, TokenCountsAndCacheBytesEqualTheFormulas) {
  const int64_t N = 16, L = 4, row = 2 * 2 * 16 * 4;  // per layer: K,V x Hkv 2 x hd 16 x 4 bytes
  struct Case {
    std::string spec;
    std::vector<int64_t> visual_per_layer;  // visual rows each layer's cache holds
    int64_t inserted;
  };
  for (auto& c : std::vector<Case>{{"none", {N, N, N, N}, 0},
                                   {"victor:m=3,k=2", {N, N, 0, 0}, 3},
                                   {"victor:m=3,k=2,mask=registers_only", {0, 0, 0, 0}, 3},
                                   {"pool:2", {4, 4, 4, 4}, 0},
                                   {"fastv:k=2,keep=0.25", {N, N, 4, 4}, 0},
                                   {"fastv:k=1,keep=0.4", {N, 6, 6, 6}, 0},
                                   {"visionzip:dominant=5,contextual=2", {7, 7, 7, 7}, 0},
                                   {"resampler:latents=3", {3, 3, 3, 3}, 0}}) {
    SCOPED_TRACE(c.spec);
    auto cfg = with(c.spec);
    Vlm m = Vlm::random(cfg, 41);
    auto p = one_image(cfg, 4);
    const int64_t text = int64_t(p.ids.size()) - 1;
    torch::NoGradGuard ng;
    KvCache cache = m.make_cache(1);
    m.forward(m.assemble({p}, true), &cache);
    for (int l = 0; l < L; ++l) {
      auto kinds = cache.layers[l].key_meta().kind;
      EXPECT_EQ(kinds.eq(int64_t(TokenKind::Visual)).sum().item<int64_t>(), c.visual_per_layer[l]) << l;
      EXPECT_EQ(kinds.eq(int64_t(TokenKind::Register)).sum().item<int64_t>(), c.inserted) << l;
      EXPECT_EQ(cache.layers[l].len, text + c.inserted + c.visual_per_layer[l]) << l;
    }
    EXPECT_EQ(cache.bytes(), kv_bytes_formula(cfg, text, 1, 0));
    // What generate's stats and the server's figures report: the last layer's rows per image.
    EXPECT_EQ(cfg.reducer.rows_past_reduction(cfg), c.visual_per_layer[L - 1] + c.inserted);
    int64_t rows = 0;
    for (auto v : c.visual_per_layer) rows += text + c.inserted + v;
    EXPECT_EQ(cache.bytes(), row * rows);
  }
}

TEST(Reducer, NoReductionEqualsThePlainModelExactly) {
  Vlm plain = Vlm::random(tiny_config(), 42);
  auto p = one_image(plain.config(), 5);
  auto want = last_logits(plain, {p});
  for (std::string s : {"fastv:k=2,keep=1", "visionzip:dominant=16,contextual=0", "victor:m=0,k=4"}) {
    Vlm r(plain);
    r.set_reducer(Reducer::parse(s));
    EXPECT_TRUE(torch::equal(last_logits(r, {p}), want)) << s;
  }
}

TEST(Reducer, FastVKeepsTheTopVisualTokensOfTheQueryRow) {
  for (int K : {1, 2, 3})
    for (double keep : {0.25, 0.5}) {
      SCOPED_TRACE("K=" + std::to_string(K) + " keep=" + std::to_string(keep));
      auto cfg = with("fastv:k=" + std::to_string(K) + ",keep=" + std::to_string(keep));
      Vlm m = Vlm::random(cfg, 43 + K);
      // Two images, so the choice is per image.
      auto p = prompt(cfg, {5, 6}, {8, 9, 10}, random_pixels(2, 28, 6));
      torch::Tensor probs_before;
      TokenMeta keys_before, queries_after;
      ForwardTrace tr;
      tr.probe = [&](int l, const torch::Tensor& probs, const TokenMeta& qm, const TokenMeta& km) {
        if (l == K - 1) probs_before = probs, keys_before = km;
        if (l == K) queries_after = qm;
      };
      torch::NoGradGuard ng;
      m.forward(m.assemble({p}, true), nullptr, &tr);
      // Independent of the ranking code: the full attention of layer K-1, last row, mean of heads.
      auto row = probs_before[0].select(1, probs_before.size(2) - 1).mean(0);  // [S]
      std::set<int64_t> want;
      for (int64_t g : {0, 1}) {
        auto is = keys_before.kind[0].eq(int64_t(TokenKind::Visual)) & keys_before.group[0].eq(g);
        auto idx = torch::nonzero(is).squeeze(1);
        const int64_t kept = std::lround(keep * 16);
        auto top = std::get<1>(row.index_select(0, idx).topk(kept));
        for (int64_t i = 0; i < kept; ++i)
          want.insert(keys_before.order[0][idx[top[i].item<int64_t>()].item<int64_t>()].item<int64_t>());
      }
      std::set<int64_t> got;
      for (int64_t t = 0; t < queries_after.length(); ++t)
        if (queries_after.kind[0][t].item<int64_t>() == int64_t(TokenKind::Visual))
          got.insert(queries_after.order[0][t].item<int64_t>());
      EXPECT_EQ(got, want);
      // Kept tokens keep their original positions.
      for (int64_t t = 0; t < queries_after.length(); ++t)
        EXPECT_EQ(queries_after.pos[0][t].item<int64_t>(), queries_after.order[0][t].item<int64_t>());
    }
}

TEST(Reducer, FastVIncrementalDecodeEqualsFullRecompute) {
  for (int K : {1, 3}) {
    auto cfg = with("fastv:k=" + std::to_string(K) + ",keep=0.5");
    Vlm m = Vlm::random(cfg, 47);
    SCOPED_TRACE(K);
    check_incremental_equals_full(m, one_image(cfg, 7), 6);
    check_incremental_equals_full(m, prompt(cfg, {5}, {8, 9}, random_pixels(2, 28, 8)), 4);
  }
  // Batched with left padding equals one request at a time.
  auto cfg = with("fastv:k=2,keep=0.25");
  Vlm m = Vlm::random(cfg, 48);
  std::vector<PromptInput> rows{prompt(cfg, {5, 6, 7, 8, 9, 10}, {8, 9}, random_pixels(1, 28, 9)),
                                prompt(cfg, {5}, {11}, random_pixels(1, 28, 10))};
  SamplingOptions opt;
  opt.max_new_tokens = 4;
  auto both = generate_ids(m, rows, -1, opt);
  for (int i = 0; i < 2; ++i) EXPECT_EQ(both.tokens[i], generate_ids(m, {rows[i]}, -1, opt).tokens[0]) << i;
}

TEST(Reducer, VisionZipKeepsTheClassTokensTopPatchesAndMergesTheRest) {
  auto cfg = with("visionzip:dominant=5,contextual=3");
  Vlm m = Vlm::random(cfg, 49);
  auto px = random_pixels(2, 28, 11);
  VisionTrace trace;
  torch::NoGradGuard ng;
  auto feats = m.vision_features(px, &trace);
  ASSERT_EQ(feats.sizes(), (std::vector<int64_t>{2, 8, cfg.vision.hidden_size}));
  // Independently: the selected block's input (the previous layer's hidden states, class token
  // included), its LN1, q and k, and the class token's attention averaged over heads.
  ModelConfig prev = tiny_config();
  prev.vision_feature_layer = m.config().vision_layers_needed() - 1;
  prev.vision_feature_select_strategy = "full";
  Vlm before(m);
  before.mutable_config() = prev;
  auto x = before.vision_features(px);  // [2,17,D]
  const auto& w = m.weights().vision.layers[m.config().vision_layers_needed() - 1];
  const int64_t D = cfg.vision.hidden_size, H = cfg.vision.num_attention_heads, hd = D / H;
  auto h = layer_norm(x, w.ln1.weight, w.ln1.bias, cfg.vision.layer_norm_eps);
  auto q = dense(h, w.q).view({2, 17, H, hd}).transpose(1, 2);
  auto k = dense(h, w.k).view({2, 17, H, hd}).transpose(1, 2);
  auto att = torch::softmax(torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(double(hd)), -1);
  auto cls = att.select(2, 0).mean(1).narrow(1, 1, 16);  // [2,16] over the patches
  auto want = std::get<0>(std::get<1>(cls.topk(5, 1)).sort(1));
  EXPECT_TRUE(torch::equal(trace.dominant, want));
  // The dominant tokens are those patches' features of the selected layer, in patch order.
  Vlm plain = Vlm::random(tiny_config(), 49);
  auto all = plain.vision_features(px);  // [2,16,D]
  for (int64_t b = 0; b < 2; ++b)
    EXPECT_TRUE(torch::allclose(feats[b].narrow(0, 0, 5), all[b].index_select(0, want[b]), 1e-5, 1e-6));
  // Contextual tokens: 11 others; targets every 3rd of them (0, 3, 6); each target plus the mean of
  // the other patches whose head-averaged normalised key is most similar. Recompute for image 0.
  auto rest = torch::ones({16}, torch::kBool).index_fill_(0, want[0], false);
  auto rest_idx = torch::nonzero(rest).squeeze(1);  // 11 patches, ascending
  auto keys = k[0].mean(0).narrow(0, 1, 16).index_select(0, rest_idx);
  keys = keys / keys.norm(2, -1, true);
  std::vector<int64_t> targets{0, 3, 6};
  for (int c = 0; c < 3; ++c) {
    auto sum = torch::zeros({D});
    int n = 0;
    for (int64_t j = 0; j < 11; ++j) {
      if (j == 0 || j == 3 || j == 6) continue;
      auto sims = torch::stack({(keys[j] * keys[0]).sum(), (keys[j] * keys[3]).sum(), (keys[j] * keys[6]).sum()});
      if (sims.argmax().item<int64_t>() == c) sum += all[0][rest_idx[j]], ++n;
    }
    auto expect = all[0][rest_idx[targets[c]]] + (n ? sum / n : sum);
    EXPECT_TRUE(torch::allclose(feats[0][5 + c], expect, 1e-4, 1e-5)) << c;
  }
}

TEST(Reducer, ChangingTheReducerNeverRedrawsTrainedRegisters) {
  Vlm v = Vlm::random(tiny_config(4, 2), 50);
  auto regs = v.weights().reducer.tensor("victor.registers").clone();
  Vlm same(v);
  same.set_reducer(Reducer::parse("victor:m=4,k=1"));
  EXPECT_TRUE(torch::equal(same.weights().reducer.tensor("victor.registers"), regs)) << "same m keeps the trained registers";
  Vlm other(v);
  EXPECT_NE(error_of([&] { other.set_reducer(Reducer::parse("victor:m=8,k=2")); }).find("4 trained registers"),
            std::string::npos);
  EXPECT_TRUE(torch::equal(other.weights().reducer.tensor("victor.registers"), regs)) << "a refused change leaves the model as it was";
  Vlm pooled(v);
  pooled.set_reducer(Reducer::parse("pool:2"));
  EXPECT_FALSE(pooled.weights().reducer.tensor("victor.registers").defined());
  EXPECT_EQ(pooled.config().reducer.spec(), "pool:2");
}

TEST(Reducer, ConfigJsonKeepsVictorsKeysAndReadsEveryEarlierForm) {
  auto base = config_to_json(tiny_config());
  // Victor writes its historic top-level keys; pooling its visual_pool; the others a spec.
  auto j = config_to_json(with("victor:m=8,k=2,mask=registers_only"));
  EXPECT_EQ(j["num_registers"], 8);
  EXPECT_EQ(j["summary_layers"], 2);
  EXPECT_EQ(j["register_mask"], "registers_only");
  EXPECT_FALSE(j.contains("token_reducer"));
  EXPECT_EQ(config_to_json(with("pool:2"))["visual_pool"], 2);
  EXPECT_EQ(config_to_json(with("fastv:k=2,keep=0.5"))["token_reducer"], "fastv:k=2,keep=0.5");
  for (std::string s : {"none", "victor:m=8,k=2", "pool:2", "fastv:k=2,keep=0.5", "visionzip:dominant=5,contextual=2",
                        "resampler:latents=3"})
    EXPECT_EQ(config_from_json(config_to_json(with(s)), "config.json").reducer.spec(), s);
  // Earlier versions wrote plain models as m = 0, k = L, and Victor's k as the resolved layer.
  auto old = base;
  old["num_registers"] = 0;
  old["summary_layers"] = 4;
  old["register_mask"] = "causal";
  EXPECT_TRUE(config_from_json(old, "config.json").reducer.is_none());
  old["num_registers"] = 3;
  EXPECT_EQ(config_from_json(old, "config.json").reducer.spec(), "victor:m=3,k=4");
  old["visual_pool"] = 2;
  EXPECT_NE(error_of([&] { config_from_json(old, "config.json"); }).find("more than one token reducer"),
            std::string::npos);
  auto bad = base;
  bad["token_reducer"] = "fastv:k=2";
  EXPECT_NE(error_of([&] { config_from_json(bad, "x/config.json"); }).find("x/config.json"), std::string::npos);
}

TEST(Reducer, ACheckpointWrittenBeforeTheSeamLoadsWithIdenticalLogits) {
  // tests/fixtures/victor-m3-k2 was written before the reducer seam existed, by
  //   victor init --preset tiny --registers 3 --summary-layers 2 --seed 7 --out victor-m3-k2
  //   victor generate --model victor-m3-k2 --image victor-m3-k2/image.png \
  //     --prompt "How many bags are there?" --max-new-tokens 4 --dump-logits victor-m3-k2/logits.npy
  const fs::path dir = fs::path(VICTOR_SOURCE_DIR) / "tests/fixtures/victor-m3-k2";
  Vlm m = Vlm::load(dir.string());
  EXPECT_EQ(m.config().reducer.spec(), "victor:m=3,k=2");
  Tokenizer tok(dir.string());
  SamplingOptions opt;
  opt.max_new_tokens = 4;
  opt.keep_logits = true;
  auto res = generate(m, tok, {Request{"How many bags are there?", {load_image((dir / "image.png").string())}}}, opt);
  auto want = load_npy((dir / "logits.npy").string());
  auto got = res.step_logits.select(1, 0);
  ASSERT_EQ(got.sizes(), want.sizes());
  EXPECT_TRUE(torch::allclose(got, want, 1e-5, 1e-5)) << (got - want).abs().max().item<float>();
}

TEST(Stats, BootstrapIntervalsAgainstCasesComputedByHand) {
  // All correct: every resample is 1.
  auto all = bootstrap_mean(std::vector<uint8_t>(50, 1));
  EXPECT_EQ(all.estimate, 1.0);
  EXPECT_EQ(all.lo, 1.0);
  EXPECT_EQ(all.hi, 1.0);
  // Two questions, one right: resample means are 0, 0.5, 1 with chances 1/4, 1/2, 1/4, so the
  // 2.5% and 97.5% percentiles are 0 and 1.
  auto two = bootstrap_mean({1, 0}, 4000, 3);
  EXPECT_EQ(two.estimate, 0.5);
  EXPECT_EQ(two.lo, 0.0);
  EXPECT_EQ(two.hi, 1.0);
  // 3000 questions at 75%: the normal approximation gives +-1.96 sqrt(.75 .25 / 3000) = +-1.55 points.
  std::vector<uint8_t> big(3000);
  for (size_t i = 0; i < big.size(); ++i) big[i] = i % 4 != 0;
  auto b = bootstrap_mean(big, 2000, 5);
  EXPECT_NEAR(b.estimate, 0.75, 1e-12);
  EXPECT_NEAR(b.hi - b.estimate, 0.0155, 0.002);
  EXPECT_NEAR(b.estimate - b.lo, 0.0155, 0.002);
  // Paired: identical runs differ by exactly 0 in every resample.
  auto same = paired_bootstrap_difference(big, big);
  EXPECT_EQ(same.lo, 0.0);
  EXPECT_EQ(same.hi, 0.0);
  // b right where a is wrong on 30 of 3000 questions, else equal: the difference is -1 point, and
  // its interval (+-1.96 sqrt(p(1-p)/n) with p = 0.01) is +-0.36 points, far narrower than unpaired.
  std::vector<uint8_t> a = big, c = big;
  int flipped = 0;
  for (size_t i = 0; i < c.size() && flipped < 30; ++i)
    if (!c[i]) c[i] = 1, ++flipped;
  auto d = paired_bootstrap_difference(a, c, 2000, 7);
  EXPECT_NEAR(d.estimate, -0.01, 1e-12);
  EXPECT_NEAR(d.hi - d.estimate, 0.0036, 0.001);
  EXPECT_EQ(verdict_at_most(Interval{0.02, 0.01, 0.03}, 0.04), "met");
  EXPECT_EQ(verdict_at_most(Interval{0.03, 0.01, 0.05}, 0.04), "not resolved");
  EXPECT_EQ(verdict_at_most(Interval{0.06, 0.05, 0.07}, 0.04), "missed");
  EXPECT_EQ(verdict_at_least(Interval{3.4, 3.35, 3.5}, 3.3), "met");
  // A figure and its repeats: the range spans all of them, the figure included.
  auto r = range_of(0.45, {0.47, 0.41, 0.44});
  EXPECT_EQ(r.estimate, 0.45);
  EXPECT_EQ(r.lo, 0.41);
  EXPECT_EQ(r.hi, 0.47);
  EXPECT_EQ(verdict_at_least(r, 0.43), "not resolved");
  EXPECT_EQ(verdict_at_least(range_of(0.45, {0.44, 0.46}), 0.43), "met");
  EXPECT_EQ(verdict_at_least(range_of(0.40, {0.42, 0.38}), 0.43), "missed");
  EXPECT_EQ(range_of(2.0, {}).lo, 2.0);
  EXPECT_THROW(paired_bootstrap_difference({1, 0}, {1}), Error);
}
