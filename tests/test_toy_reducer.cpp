// The reducer table's promise: a reducer defined and registered in this file alone ("first": at
// the input of layer k each image keeps its first n visual rows) runs through generate, eval, bench
// and serve without a line changed elsewhere, and its KV cache, statistics and decode agree with
// the table's generic formulas and with a full recompute.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "helpers.h"
#include "victor/bench.h"
#include "victor/gridvqa.h"
#include "victor/eval.h"
#include "victor/generate.h"
#include "victor/image_io.h"
#include "victor/serve/server.h"
#include "victor/serve/api.h"
#include "victor/tokenizer.h"

using namespace victor;
using namespace victor::test;

namespace {

class FirstRowsOps final : public ReducerOps {
 public:
  FirstRowsOps(int n, int k) : n_(n), k_(k) {}
  std::string kind() const override { return "first"; }
  std::string spec() const override { return "first:n=" + std::to_string(n_) + ",k=" + std::to_string(k_); }
  std::string name() const override { return "first " + std::to_string(n_) + " at " + std::to_string(k_); }
  void validate(const ModelConfig& c) const override {
    require_reducer(k_ >= 1 && k_ < c.num_layers(), spec(), "k must be inside the decoder");
  }
  std::optional<int> reduce_layer(const ModelConfig&) const override { return k_; }
  int kept_visual(int n) const override { return std::min(n, n_); }
  torch::Tensor keep_rows(const TokenMeta& meta, const torch::Tensor&) const override {
    auto visual = meta.kind.eq(int64_t(TokenKind::Visual));
    auto keep = meta.kind.eq(int64_t(TokenKind::Text)) | meta.kind.eq(int64_t(TokenKind::Register));
    // A visual row's index among its image's visual rows: the count of same-image visual rows before it.
    for (int64_t b = 0; b < meta.rows(); ++b) {
      std::map<int64_t, int> seen;
      for (int64_t t = 0; t < meta.length(); ++t)
        if (visual[b][t].item<bool>() && seen[meta.group[b][t].item<int64_t>()]++ < n_) keep[b][t] = true;
    }
    return keep;
  }

 private:
  int n_, k_;
};

const bool registered = register_reducer({"first", "first:n=N,k=K", [](ReducerArgs& a) {
                                            const int n = a.integer("n", "n (visual rows kept)", 1, 4096);
                                            const int k = a.integer("k", "k (the layer)", 1, 64);
                                            return Reducer(std::make_shared<const FirstRowsOps>(n, k));
                                          }});


struct ToyFixture {
  std::string dir;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<Vlm> model;
  explicit ToyFixture(bool next = false) {
    dir = temp_dir(next ? "toy_reducer_next" : "toy_reducer");
    train_tokenizer(gridvqa_corpus(), dir, 400);
    tok = std::make_unique<Tokenizer>(dir);
    ModelConfig cfg = preset_config("tiny");
    cfg.text.vocab_size = 448;
    cfg.image_token_index = tok->token_id("<image>");
    cfg.pad_token_id = tok->token_id("<pad>");
    if (next) cfg.image_grid_pinpoints = preset_config("llava-next-tiny").image_grid_pinpoints, cfg.preprocess.pad_to_square = false;
    cfg.reducer = Reducer::parse("first:n=3,k=2");  // through the table, as the CLI's --reducer does
    cfg.validate();
    model = std::make_unique<Vlm>(Vlm::random(cfg, 21));
  }
};

}  // namespace

TEST(ToyReducer, RegisteredFromTheTestFileAloneItParsesValidatesAndRoundTripsThroughConfig) {
  ASSERT_TRUE(registered);
  Reducer r = Reducer::parse("first:n=3,k=2");
  EXPECT_EQ(r.kind(), "first");
  EXPECT_EQ(Reducer::parse(r.spec()), r);
  EXPECT_NE(error_of([] { Reducer::parse("first:n=3"); }).find("missing k"), std::string::npos);
  EXPECT_NE(error_of([] { register_reducer({"first", "x", [](ReducerArgs&) { return Reducer(); }}); }).find("already"),
            std::string::npos);
  ModelConfig c = tiny_config();
  c.reducer = Reducer::parse("first:n=3,k=9");
  EXPECT_NE(error_of([&] { c.validate(); }).find("'first:n=3,k=9'"), std::string::npos);
  c.reducer = r;
  EXPECT_EQ(config_from_json(config_to_json(c), "config.json").reducer, r) << "written as a token_reducer spec";
  EXPECT_EQ(r.kv_rows(c, 10, 2, 4), 2 * (10 + 4 + 2 * 16) + 2 * (10 + 4 + 2 * 3));
  EXPECT_EQ(r.rows_past_reduction(c), 3);
}

TEST(ToyReducer, GenerateKeepsTheFirstRowsAndDecodesAsAFullRecompute) {
  for (bool next : {false, true}) {
    SCOPED_TRACE(next ? "LLaVA-NeXT" : "LLaVA-1.5");
    ToyFixture f(next);
    const auto& cfg = f.model->config();
    SamplingOptions o;
    o.max_new_tokens = 5;
    o.ignore_eos = true;
    const std::vector<Image> imgs = {lcg_image(40, 24, 1), lcg_image(28, 28, 2)};
    auto res = generate(*f.model, *f.tok, {Request{"<image> <image> How many bags are there?", imgs}}, o);
    ASSERT_EQ(res.tokens[0].size(), 5u);
    EXPECT_EQ(res.stats.reduce_layer, 2);
    EXPECT_EQ(res.stats.tokens_after_drop, res.stats.prompt_tokens + 2 * 3);
    // Each layer from k on holds the text and three rows per image.
    PromptInput in;
    in.ids = prompt_ids(*f.tok, "<image> <image> How many bags are there?", 2);
    for (const auto& img : imgs) add_image(in, img, cfg);
    ForwardTrace tr;
    f.model->forward(f.model->assemble({in}, false), nullptr, &tr);
    for (int l = 2; l < cfg.num_layers(); ++l) EXPECT_EQ(tr.tokens_per_layer[size_t(l)], res.stats.prompt_tokens + 6) << l;
    EXPECT_GT(tr.tokens_per_layer[0], tr.tokens_per_layer[2]);
    // Incremental decode equals a full recompute of the prompt with the generated tokens.
    for (size_t s = 0; s + 1 < res.tokens[0].size(); ++s) {
      PromptInput full = in;
      full.ids.insert(full.ids.end(), res.tokens[0].begin(), res.tokens[0].begin() + long(s) + 1);
      auto logits = last_logits(*f.model, {full});
      EXPECT_EQ(logits.argmax(-1).item<int64_t>(), res.tokens[0][s + 1]) << "step " << s + 1;
    }
    // The measured cache equals the table's generic formula.
    const int64_t el = 4, per_row = 2 * int64_t(cfg.text.num_key_value_heads) * cfg.text.head_dim() * el;
    const std::vector<int64_t> visual = visual_rows_of(cfg, in);
    EXPECT_EQ(res.stats.kv_bytes,
              per_row * cfg.reducer.kv_rows(cfg, res.stats.prompt_tokens, visual, int64_t(res.tokens[0].size()) - 1));
  }
}

TEST(ToyReducer, RunsThroughEvalBenchAndServeUntouched) {
  ToyFixture f;
  // eval: questions on image files.
  const std::string dir = f.dir + "/eval";
  std::filesystem::create_directories(dir);
  std::vector<EvalQuestion> qs;
  for (int i = 0; i < 3; ++i) {
    std::ofstream(dir + "/" + std::to_string(i) + ".png", std::ios::binary) << encode_png(lcg_image(30 + i, 28, 5 + i));
    qs.push_back({i, std::to_string(i) + ".png", "How many bags are there?", "2", "count"});
  }
  EvalOptions eo;
  eo.image_folder = dir;
  eo.batch_size = 2;
  eo.max_new_tokens = 3;
  eo.progress = false;
  std::vector<AnswerRecord> answers;
  auto report = evaluate(*f.model, *f.tok, qs, eo, &answers);
  EXPECT_EQ(answers.size(), 3u);
  // bench: the toy beside plain, its measured cache equal to the formula.
  BenchOptions bo = quick_bench({1, 2}, {2}, 12);
  auto results = run_bench(*f.model, bench_configs(f.model->config(), {}), bo);
  auto j = bench_json(results, f.model->config(), bo);
  bool seen = false;
  for (auto& c : j["configs"]) {
    EXPECT_EQ(c["kv_bytes"].get<int64_t>(), c["kv_bytes_formula"].get<int64_t>()) << c["name"];
    seen = seen || c["reducer"] == "first:n=3,k=2";
  }
  EXPECT_TRUE(seen) << j.dump();
  // serve: a chat request answers what generate answers.
  ServeOptions so;
  ServeEngine engine(*f.model, *f.tok, so);
  const Image img = lcg_image(36, 28, 9);
  nlohmann::json content = nlohmann::json::array(
      {{{"type", "image_url"}, {"image_url", {{"url", "data:image/png;base64," + base64_encode(encode_png(img))}}}},
       {{"type", "text"}, {"text", "Where is the dress?"}}});
  nlohmann::json body = {{"messages", {{{"role", "user"}, {"content", content}}}}, {"max_tokens", 5}, {"temperature", 0}};
  auto job = engine.make_job(parse_chat_request(body.dump(), so.limits));
  ASSERT_TRUE(engine.submit(job));
  bool done = false;
  for (int i = 0; i < 600 && !done; ++i) job->take(std::chrono::milliseconds(100), &done);
  ASSERT_TRUE(done);
  SamplingOptions o;
  o.max_new_tokens = 5;
  auto ref = generate(*f.model, *f.tok, {Request{"Where is the dress?", {img}}}, o);
  EXPECT_EQ(job->tokens, ref.tokens[0]);
  engine.stop();
}
