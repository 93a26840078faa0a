// Answer normalization and scoring.
#include <fstream>

#include "helpers.h"
#include "victor/error.h"
#include "victor/eval.h"
#include "victor/files.h"
#include "repro/internal.h"

using namespace victor;
using namespace victor::test;

TEST(Eval, NormalizationCases) {
  EXPECT_EQ(normalize_answer("Two."), "2");
  EXPECT_EQ(normalize_answer("  The Sneaker!"), "sneaker");
  EXPECT_EQ(normalize_answer("an ankle boot"), "ankle boot");
  EXPECT_EQ(normalize_answer("Row 1,  column 4"), "row 1 column 4");
  EXPECT_EQ(normalize_answer("YES"), "yes");
  EXPECT_EQ(normalize_answer("t-shirt"), "t-shirt");
  EXPECT_EQ(normalize_answer("zero"), "0");
  EXPECT_NE(normalize_answer("shirt"), normalize_answer("t-shirt"));
}

TEST(Eval, AccuracyOnHandMadeAnswersFile) {
  auto dir = temp_dir("eval");
  std::ofstream(dir + "/q.jsonl") << R"({"question_id": 1, "text": "How many?", "answer": "2", "family": "count"}
{"question_id": 2, "text": "What?", "answer": "sneaker", "family": "identify"}
{"question_id": 3, "text": "Is there?", "answer": "yes", "family": "exist"}
{"question_id": "four", "text": "Where?", "answer": "row 1, column 2", "family": "locate"}
)";
  std::ofstream(dir + "/a.jsonl") << R"({"question_id": 1, "text": "two"}
{"question_id": 2, "text": "A sneaker."}
{"question_id": 3, "text": "no"}
{"question_id": "four", "text": "Row 1, column 2"}
)";
  EvalReport r = score_files(dir + "/q.jsonl", dir + "/a.jsonl");
  EXPECT_EQ(r.overall.total, 4);
  EXPECT_EQ(r.overall.correct, 3);
  EXPECT_DOUBLE_EQ(r.per_family["exist"].accuracy(), 0.0);
  EXPECT_DOUBLE_EQ(r.per_family["count"].accuracy(), 1.0);
  std::ofstream(dir + "/b.jsonl") << R"({"question_id": 9, "text": "two"})" << "\n";
  auto scoring_error = [&](const std::string& answers) {
    return error_of([&] { score_files(dir + "/q.jsonl", dir + "/" + answers); });
  };
  EXPECT_NE(scoring_error("b.jsonl").find("question_id 9"), std::string::npos);
  // Half the answers missing used to score only the answered half (here: 2 of 2 right = 100%).
  std::ofstream(dir + "/c.jsonl") << R"({"question_id": 1, "text": "two"}
{"question_id": "four", "text": "Row 1, column 2"}
)";
  const std::string missing = scoring_error("c.jsonl");
  EXPECT_NE(missing.find("2 of 4 questions"), std::string::npos) << missing;
  EXPECT_NE(missing.find("question_id 2"), std::string::npos) << missing;
  std::ofstream(dir + "/d.jsonl") << R"({"question_id": 1, "text": "two"}
{"question_id": 1, "text": "2"}
)";
  EXPECT_NE(scoring_error("d.jsonl").find("answered twice"), std::string::npos);
  // With a limit only the first questions count: c.jsonl's missing answers (2 and 3) are beyond
  // the first one, a.jsonl's answers beyond it are skipped, b.jsonl's unknown id is still refused.
  EvalReport first = score_files(dir + "/q.jsonl", dir + "/c.jsonl", 1);
  EXPECT_EQ(first.overall.total, 1);
  EXPECT_EQ(first.overall.correct, 1);
  EvalReport three = score_files(dir + "/q.jsonl", dir + "/a.jsonl", 3);
  EXPECT_EQ(three.overall.total, 3);
  EXPECT_EQ(three.overall.correct, 2);
  const std::string short_of = error_of([&] { score_files(dir + "/q.jsonl", dir + "/c.jsonl", 2); });
  EXPECT_NE(short_of.find("1 of 2 first questions"), std::string::npos) << short_of;
  EXPECT_NE(error_of([&] { score_files(dir + "/q.jsonl", dir + "/b.jsonl", 2); }).find("question_id 9"),
            std::string::npos);
}

TEST(Eval, AnswerPriorPicksMostFrequentTrainingAnswer) {
  std::vector<Conversation> train{{"a", "", {{"<image>\nIs there a bag?", "yes"}, {"How many bags are there?", "1"}}},
                                  {"b", "", {{"<image>\nIs there a bag?", "yes"}}},
                                  {"c", "", {{"<image>\nIs there a bag?", "no"}}}};
  std::vector<EvalQuestion> qs(2);
  qs[0].question_id = 1, qs[0].text = "Is there a bag?", qs[0].answer = "yes", qs[0].family = "exist";
  qs[1].question_id = 2, qs[1].text = "How many bags are there?", qs[1].answer = "2", qs[1].family = "count";
  EvalReport r = answer_prior(train, qs);
  EXPECT_EQ(r.overall.correct, 1);
  EXPECT_EQ(r.per_family["exist"].correct, 1);
}

#include "victor/bench.h"
#include "victor/generate.h"

TEST(Bench, JsonHasEveryFieldAndKvBytesMatchFormula) {
  auto cfg = tiny_config(8, 2);
  Vlm m = Vlm::random(cfg, 60);
  BenchOptions o = quick_bench({1, 2}, {2, 5}, 20);
  auto configs = bench_configs(cfg, {Reducer::victor({4, 1, RegisterMask::RegistersOnly})});
  ASSERT_EQ(configs.size(), 3u);  // plain, the checkpoint's own, the sweep
  auto results = run_bench(m, configs, o);
  auto j = bench_json(results, cfg, o);
  ASSERT_EQ(j["configs"].size(), 3u);
  EXPECT_GT(j["memory_budget_bytes"].get<int64_t>(), 0);  // MemAvailable when no budget is given
  for (auto& c : j["configs"]) {
    for (auto key : {"name", "reducer", "visual_tokens", "inserted_tokens", "vision_seconds", "ttft_seconds",
                     "decode_tokens_per_second", "requests_per_second", "kv_bytes", "kv_bytes_formula",
                     "peak_rss_bytes", "prefill_gflops", "ratio_to_plain"})
      EXPECT_TRUE(c.contains(key)) << key;
    for (auto key : {"b1_g2", "b1_g5", "b2_g2", "b2_g5"}) {
      EXPECT_GT(c["requests_per_second"][key].template get<double>(), 0) << key;
      EXPECT_TRUE(c["ratio_to_plain"]["requests_per_second"].contains(key));
    }
    EXPECT_GT(c["ttft_seconds"].template get<double>(), 0);
    EXPECT_GT(c["peak_rss_bytes"].get<int64_t>(), 0);
    EXPECT_EQ(c["kv_bytes"].get<int64_t>(), c["kv_bytes_formula"].get<int64_t>()) << c["name"];
  }
  // Hand formula for the checkpoint's own config (m=8, k=2, causal): 20 text + 4 fed tokens,
  // 16 visual tokens; per row 2 * Hkv 2 * hd 16 * 4 bytes.
  const int64_t row = 2 * 2 * 16 * 4, T = 20 + 4;
  EXPECT_EQ(j["configs"][1]["kv_bytes"].get<int64_t>(), row * (2 * (T + 8 + 16) + 2 * (T + 8)));
  EXPECT_EQ(j["configs"][0]["kv_bytes"].get<int64_t>(), row * 4 * (T + 16));
  EXPECT_EQ(j["configs"][2]["kv_bytes"].get<int64_t>(), row * 4 * (T + 4));  // registers_only
}

TEST(Bench, BatchesThatDoNotFitArePrefilledOneAtATimeOrLeftOutWithTheReason) {
  // By hand: KV 100 and activations 30 per request, batch 4 -> joint 520, one at a time 430.
  EXPECT_FALSE(plan_batch(100, 30, 4, 600).one_at_a_time);
  EXPECT_TRUE(plan_batch(100, 30, 4, 600).run);
  EXPECT_TRUE(plan_batch(100, 30, 4, 0).run);  // no budget known: as asked
  BatchPlan one = plan_batch(100, 30, 4, 450);
  EXPECT_TRUE(one.run && one.one_at_a_time);
  EXPECT_EQ(one.joint_bytes, 520);
  EXPECT_EQ(one.single_bytes, 430);
  EXPECT_NE(one.why.find("one request at a time"), std::string::npos) << one.why;
  BatchPlan none = plan_batch(100, 30, 4, 429);
  EXPECT_FALSE(none.run);
  EXPECT_NE(none.why.find("not run"), std::string::npos) << none.why;
  EXPECT_FALSE(plan_batch(100, 30, 1, 129).run);  // alone: nothing to split

  // A budget the plain model's batch of 4 cannot fit however it is prefilled, Victor's (m = 4,
  // k = 1, registers only: far fewer KV rows) can: plain has no batch-4 figures, Victor has.
  auto cfg = tiny_config();
  Vlm m = Vlm::random(cfg, 61);
  BenchOptions o = quick_bench({1, 4}, {3}, 20);
  auto configs = bench_configs(cfg, {Reducer::victor({4, 1, RegisterMask::RegistersOnly})});
  ASSERT_EQ(configs.size(), 2u);
  const std::vector<int64_t> visual{cfg.visual_tokens_per_image()};
  auto need = [&](const ModelConfig& c, int b) {
    return plan_batch(kv_bytes_formula(c, 20, visual, 3, 4), prefill_activation_bytes(c, 20, visual, 1), b, 0);
  };
  ModelConfig vc = cfg;
  vc.reducer = configs[1].reducer;
  const BatchPlan plain4 = need(cfg, 4), victor4 = need(vc, 4);
  ASSERT_LT(victor4.single_bytes, plain4.single_bytes);
  o.memory_budget_bytes = plain4.single_bytes - 1;
  ASSERT_GT(o.memory_budget_bytes, need(cfg, 1).single_bytes);  // plain alone still runs
  auto results = run_bench(m, configs, o);
  ASSERT_EQ(results.size(), 2u);
  EXPECT_FALSE(results[0].plans.at(4).run);
  EXPECT_EQ(results[0].requests_per_second.count("b4_g3"), 0u);
  EXPECT_GT(results[0].requests_per_second.at("b1_g3"), 0);
  EXPECT_TRUE(results[1].plans.at(4).run);
  EXPECT_EQ(results[1].plans.at(4).one_at_a_time, victor4.joint_bytes > o.memory_budget_bytes);
  EXPECT_GT(results[1].requests_per_second.at("b4_g3"), 0);
  const std::string table = bench_table(results);
  EXPECT_NE(table.find("plain at batch 4: not run"), std::string::npos) << table;
  auto j = bench_json(results, cfg, o);
  EXPECT_FALSE(j["configs"][0]["batches"]["b4"]["run"].get<bool>());
  EXPECT_TRUE(j["configs"][1]["batches"]["b4"]["run"].get<bool>());
  EXPECT_FALSE(j["configs"][1]["ratio_to_plain"]["requests_per_second"].contains("b4_g3"));
  EXPECT_EQ(j["memory_budget_bytes"].get<int64_t>(), o.memory_budget_bytes);

  // A budget the plain model's joint prefill of 4 does not fit but one request's does: it runs
  // one request at a time.
  o.memory_budget_bytes = plain4.joint_bytes - 1;
  ASSERT_LE(plain4.single_bytes, o.memory_budget_bytes);
  auto again = run_bench(m, {configs[0]}, o);
  EXPECT_TRUE(again[0].plans.at(4).one_at_a_time);
  EXPECT_GT(again[0].requests_per_second.at("b4_g3"), 0);
  // Not even one request fits: refused by name.
  o.memory_budget_bytes = need(cfg, 1).single_bytes - 1;
  EXPECT_NE(error_of([&] { run_bench(m, {configs[0]}, o); }).find("does not fit in memory even alone"),
            std::string::npos);
}

// The repro's report formats what the stages measured: a hand-made Results whose figures are
// known gives known rows, drops, ratios and verdicts in report.md and summary.json.
namespace {
EvalReport scored(const std::vector<uint8_t>& correct) {
  EvalReport e;
  for (size_t i = 0; i < correct.size(); ++i) {
    e.ids.push_back(std::to_string(i));
    e.answers.push_back(correct[i] ? "yes" : "no");
    e.correct.push_back(correct[i]);
    e.overall.total++;
    e.overall.correct += correct[i];
  }
  e.per_family["exist"] = e.overall;
  return e;
}
BenchResult benched(const std::string& name, double short_rps, std::vector<double> short_runs, double long_rps,
                    int64_t kv_bytes) {
  BenchResult b;
  b.name = name;
  b.visual_tokens = 16;
  b.requests_per_second = {{"b16_g2", short_rps}, {"b16_g128", long_rps}};
  b.requests_per_second_runs = {{"b16_g2", std::move(short_runs)}, {"b16_g128", {long_rps}}};
  b.kv_bytes = kv_bytes;
  return b;
}
}  // namespace

TEST(Repro, ReportShowsTheMeasuredDropsRatiosAndVerdicts) {
  ReproOptions o;
  o.out = temp_dir("report");
  o.registers = {8};
  repro::Results res;
  // 100 questions: plain right on 80, its Victor twin on 70 of those (a paired drop of 10 points),
  // FastV on all 80 and 5 more (-5). The answer prior is right on 30.
  std::vector<uint8_t> plain(100, 0), victor(100, 0), fastv(100, 0), prior(100, 0);
  for (int i = 0; i < 80; ++i) plain[i] = 1;
  for (int i = 0; i < 70; ++i) victor[i] = 1;
  for (int i = 0; i < 85; ++i) fastv[i] = 1;
  for (int i = 0; i < 30; ++i) prior[i] = 1;
  res.prior = scored(prior);
  repro::Trained p{"plain", "", Reducer::none()};
  p.train_seconds = 100;
  p.step_seconds = 1.0;
  p.timing_step_seconds = {1.0, 1.0, 1.0};
  p.eval = scored(plain);
  repro::Trained v{"victor-m8", "", Reducer::victor({8, 2})};
  v.train_seconds = 50;
  v.step_seconds = 0.5;
  v.drop_layer = 2;
  v.timing_step_seconds = {0.5, 0.6, 0.4};  // 50%, 40%, 60% less
  v.eval = scored(victor);
  repro::Trained f{"fastv", "", Reducer::fastv({})};
  f.training_free = true;
  f.eval = scored(fastv);
  res.runs = {p, v, f};
  res.bench = {benched("plain", 1.0, {1.0, 1.0, 1.0}, 2.0, 1000), benched("victor", 4.0, {3.5, 4.0, 4.5}, 7.0, 100),
               benched("fastv", 1.5, {1.5, 1.5, 1.5}, 3.0, 500)};
  res.questions = 100;
  res.seconds = 600;
  const std::string path = repro::write_report(o, res);
  EXPECT_EQ(path, o.out + "/report.md");
  const std::string md = read_file(path, FileKind::Dataset);
  // The main table's Victor row: accuracy, the paired drop (plain minus Victor, so positive),
  // relative drop, time reduction, both throughputs and ratios, the KV ratio.
  EXPECT_NE(md.find("| victor-m8 | `victor:m=8,k=2` | 16 + 8 | 70.0% ["), std::string::npos) << md;
  EXPECT_NE(md.find("| +10.0 ["), std::string::npos) << md;
  EXPECT_NE(md.find("| 12.5% | 50 s | 50.0% | 4.00 req/s | 4.00x | 7.00 req/s | 3.50x | 10.00x |"), std::string::npos)
      << md;
  EXPECT_NE(md.find("| fastv | `fastv"), std::string::npos) << md;
  EXPECT_NE(md.find("| -5.0 ["), std::string::npos) << md;
  EXPECT_NE(md.find("| -6.2% | training-free | - | 1.50 req/s | 1.50x | 3.00 req/s | 1.50x | 2.00x |"),
            std::string::npos) << md;
  EXPECT_NE(md.find("Answer-prior baseline (most frequent training answer per question): **30.0%**"), std::string::npos);
  // Verdicts: a 10-point drop against at most 3.2 points is missed; the time reductions' range
  // [40%, 60%] straddles 43%; the throughput ratios' range [3.5x, 4.5x] clears 3.3x.
  EXPECT_NE(md.find("a drop of at most 3.20 points): measured +10.0 points ["), std::string::npos) << md;
  EXPECT_NE(md.find("] — missed\n"), std::string::npos) << md;
  EXPECT_NE(md.find("training time at least 43% lower: measured 50.0% [40.0%, 60.0%] — not resolved"),
            std::string::npos) << md;
  EXPECT_NE(md.find("throughput at least 3.3x (b16_g2): measured 4.00x [3.50x, 4.50x] — met"), std::string::npos)
      << md;
  EXPECT_NE(md.find("| victor-m8 | 0.500 s, 50.0% | 0.500 s (50.0%), 0.600 s (40.0%), 0.400 s (60.0%) |"),
            std::string::npos) << md;
  EXPECT_EQ(md.find("Caution"), std::string::npos);  // plain is 50 points above the prior
  EXPECT_NE(md.find("Whole run: 10.0 min."), std::string::npos);
  const auto summary = nlohmann::json::parse(read_file(o.out + "/summary.json", FileKind::Dataset));
  ASSERT_EQ(summary["runs"].size(), 3u);
  EXPECT_NEAR(summary["runs"][1]["drop_points_interval"][0].template get<double>(), 0.10, 1e-12);
  EXPECT_DOUBLE_EQ(summary["runs"][1]["throughput_ratio"].template get<double>(), 4.0);
  EXPECT_EQ(summary["runs"][1]["time_reduction_rounds"].size(), 3u);
  EXPECT_NEAR(summary["answer_prior"].template get<double>(), 0.30, 1e-12);
}
