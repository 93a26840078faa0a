// `victor repro`'s stages: each a function of the run's Context, returning what the report needs.
#include <algorithm>
#include <numeric>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "repro/internal.h"
#include "victor/distributed.h"
#include "victor/error.h"
#include "victor/files.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace victor::repro {

namespace {
bool g_quiet = false;
}  // namespace

void set_quiet(bool quiet) { g_quiet = quiet; }

void say(const std::string& s) {
  if (!g_quiet) std::cerr << "repro: " << s << std::endl;
}

void Context::sync() const {
  if (comm) comm->barrier();
}

bool Context::agree(bool decision) const {
  if (!comm) return decision;
  auto t = torch::tensor({lead && decision ? 1.0f : 0.0f});
  comm->allreduce_sum({t});
  return t.item<float>() > 0.5f;
}

int rank_share(int global_batch, int world, const std::string& what) {
  if (global_batch % world != 0)
    throw Error(what + " " + std::to_string(global_batch) + " does not split over " + std::to_string(world) +
                " ranks (--nproc): choose a batch divisible by the rank count");
  return global_batch / world;
}

int Context::per_rank(int global_batch, const std::string& what) const { return rank_share(global_batch, world, what); }

MainData build_main_data(const Context& c) {
  const ReproOptions& o = c.o;
  MainData d;
  GridVqaOptions& g = d.options;
  g.out_dir = c.data;
  g.train_images = o.train_images;
  g.test_images = o.test_images;
  g.questions_per_image = o.questions;
  g.seed = o.seed;
  say("building GridVQA (" + std::to_string(o.train_images) + " train / " + std::to_string(o.test_images) +
      " test images) in " + c.data + (c.world > 1 ? " (" + std::to_string(c.world) + " data-parallel ranks)" : ""));
  if (c.lead) build_gridvqa(g);
  c.sync();
  d.convs = load_llava_json((fs::path(c.data) / "train.json").string());
  d.describe = load_llava_json((fs::path(c.data) / "pretrain.json").string());
  d.questions = load_questions_jsonl((fs::path(c.data) / "test.jsonl").string());
  if (o.eval_limit > 0 && int(d.questions.size()) > o.eval_limit) d.questions.resize(size_t(o.eval_limit));
  return d;
}

// One initial model (random weights, GridVQA's tokenizer) every run starts from.
void make_initial_model(const Context& c) {
  const ReproOptions& o = c.o;
  const std::string& init_dir = c.init_dir;
  if (c.lead) {
    ModelConfig cfg = preset_config(o.preset);
    int n = train_tokenizer(gridvqa_corpus(), init_dir, 512);
    fit_vocabulary(cfg, n, false);
    Vlm::random(cfg, o.seed).save(init_dir);
  }
  c.sync();
}

// Stage 0 (shared): the vision tower learns the items' classes, as LLaVA starts from CLIP. Its own
// loop, not data-parallel: rank 0 alone, the others wait.
VisionPretrainReport stage0_vision(const Context& c, const GridVqaOptions& g) {
  const ReproOptions& o = c.o;
  const std::string& data = c.data;
  const std::string& init_dir = c.init_dir;
  VisionPretrainReport vrep;
  if (c.lead) {
    std::string vision_data = data;
    if (o.vision_images > 0) {  // its own set: more items than the main training images
      GridVqaOptions vg = g;
      vision_data = vg.out_dir = (fs::path(o.out) / "gridvqa-vision").string();
      vg.train_images = o.vision_images;
      vg.questions_per_image = 1;
      vg.seed = o.seed + 77;
      vg.text_grids = 0;
      say("stage 0: building its GridVQA set (" + std::to_string(o.vision_images) + " train images) in " + vision_data);
      build_gridvqa(vg);
    }
    Vlm model = Vlm::load(init_dir);
    auto grids_train = load_grid_images(vision_data, "train", model.config());
    auto grids_test = load_grid_images(vision_data, "t10k", model.config());
    VisionPretrainOptions vo;
    vo.steps = o.vision_steps;
    vo.batch_size = o.vision_batch;
    vo.seed = o.seed;
    vo.progress = o.progress;
    vo.per_patch = o.vision_targets == "patch";
    vo.counts = o.vision_counts;
    say("stage 0: pretraining the vision tower on cell classes (" + std::to_string(o.vision_steps) + " steps of " +
        std::to_string(o.vision_batch) + " images)");
    vrep = pretrain_vision(model, grids_train, grids_test, vo);
    model.save(init_dir);
    say("stage 0: " + num(vrep.seconds, "%.1f") + " s, test cell accuracy " + pct(vrep.test_cell_accuracy) +
        ", single patch " + pct(vrep.test_patch_accuracy) + ", place " + pct(vrep.test_position_accuracy) +
        (o.vision_counts ? ", class counts " + pct(vrep.test_count_patch_accuracy) + " from one patch, " +
                               pct(vrep.test_count_mean_accuracy) + " from the mean"
                         : ""));
  }
  c.sync();
  return vrep;
}

// Stage L (shared): the language model learns to answer from grids written as text, as LLaVA
// starts from a pretrained Vicuna. Only the language model is trained here.
TrainReport stage_l_text(const Context& c, const Tokenizer& tok) {
  const ReproOptions& o = c.o;
  const std::string& data = c.data;
  const std::string& init_dir = c.init_dir;
  TrainReport lrep;
  {
    Vlm model = Vlm::load(init_dir);
    auto text = load_llava_json((fs::path(data) / "text.json").string());
    auto samples = prepare_samples(text, tok, model.config(), data, false, nullptr);
    TrainOptions t;
    t.parts = {Part::Llm};
    t.lr = o.text_lr;
    t.batch_size = c.per_rank(o.text_batch, "stage L's batch");
    t.comm = c.comm;
    t.max_steps = o.text_steps;
    t.seed = o.seed;
    t.progress = o.progress;
    say("stage L: pretraining the language model on grids written as text (" + std::to_string(o.text_steps) +
        " steps of " + std::to_string(o.text_batch) + ", lr " + num(o.text_lr, "%g") + ")");
    lrep = train_model(model, samples, t, init_dir);
    if (c.lead) model.save(init_dir);
    c.sync();
    say("stage L: " + num(lrep.seconds, "%.1f") + " s, final loss " + num(lrep.final_loss, "%.4f"));
  }

  return lrep;
}

// Stage C (shared): the curriculum. Each stage has its own GridVQA (train split items only for
// training, its own small test set to report progress) and trains projector + language model.
std::vector<CurriculumResult> stage_c_curriculum(const Context& c_, const Tokenizer& tok) {
  const Context& ctx = c_;
  const ReproOptions& o = ctx.o;
  const std::string& init_dir = ctx.init_dir;
  std::vector<CurriculumResult> cur;
  for (size_t i = 0; i < o.curriculum.size(); ++i) {
    const CurriculumStage& c = o.curriculum[i];
    const std::string tag = "C" + std::to_string(i + 1);
    // Families with their own share of empty cells are asked on their own GridVQA set (each with
    // its own test set); the stage trains on its sets mixed.
    std::vector<std::pair<double, std::vector<std::string>>> sets;  // empty rate (< 0 = default), families
    const std::vector<std::string> fams = c.families.empty() ? kQuestionFamilies : c.families;
    for (size_t j = 0; j < fams.size(); ++j) {
      const double rate = c.family_rate(j) >= 0 ? c.family_rate(j) : c.empty_rate;
      auto it = std::find_if(sets.begin(), sets.end(), [&](const auto& s) { return s.first == rate; });
      if (it == sets.end()) it = sets.insert(sets.end(), {rate, {}});
      it->second.push_back(fams[j]);
    }
    const bool single = o.curriculum_single_turn && c.pool > 1;
    Vlm model = Vlm::load(init_dir);
    // The stage's pooling, or with curriculum_summary_layers the visual tokens leave after that layer.
    model.set_reducer(c.pool > 1 ? Reducer::pool({c.pool})
                      : o.curriculum_summary_layers >= 0
                          ? Reducer::victor({0, o.curriculum_summary_layers, RegisterMask::Causal})
                          : Reducer::none(),
                      o.seed + 1);
    const std::string stage_dir = (fs::path(o.out) / ("curriculum-" + std::to_string(i + 1))).string();
    std::vector<Conversation> cconvs;
    std::vector<EvalQuestion> cquestions;
    std::vector<TrainSample> samples;
    for (size_t p = 0; p < sets.size(); ++p) {
      GridVqaOptions cg;
      cg.out_dir = p == 0 ? stage_dir : stage_dir + "-empty" + whole_percent(sets[p].first);
      cg.grid = c.grid;
      cg.train_images = o.curriculum_images;
      cg.test_images = std::max(1, o.test_images / 3);
      cg.questions_per_image = o.questions;
      cg.families = sets[p].second;
      cg.seed = o.seed + 101 + i + 1009 * uint64_t(p);
      cg.text_grids = 0;
      if (sets[p].first >= 0) cg.empty_rate = sets[p].first;
      say("stage " + tag + ": building " + std::to_string(c.grid) + "x" + std::to_string(c.grid) + " GridVQA (" +
          std::to_string(cg.train_images) + " images" +
          (sets.size() > 1 ? ", " + join_names(cg.families, "+") + " at " + pct(cg.empty_rate) + " empty" : "") +
          ") in " + cg.out_dir);
      if (ctx.lead) build_gridvqa(cg);
      ctx.sync();
      auto convs = load_llava_json((fs::path(cg.out_dir) / "train.json").string());
      auto part = prepare_samples(single ? split_turns(convs) : convs, tok, model.config(), cg.out_dir, false, nullptr);
      samples.insert(samples.end(), std::make_move_iterator(part.begin()), std::make_move_iterator(part.end()));
      for (auto& q : load_questions_jsonl((fs::path(cg.out_dir) / "test.jsonl").string())) {
        q.image = (fs::path(cg.out_dir) / q.image).string();  // the sets' images live in different folders
        if (p > 0)  // ids stay unique across the sets
          q.question_id = "set" + std::to_string(p + 1) + "_" +
                          (q.question_id.is_string() ? q.question_id.get<std::string>() : q.question_id.dump());
        cquestions.push_back(std::move(q));
      }
      cconvs.insert(cconvs.end(), convs.begin(), convs.end());
    }
    CurriculumResult r;
    r.stage = c;
    r.visual_tokens = model.config().visual_tokens_per_image();
    r.prior = answer_prior(cconvs, cquestions);
    EvalOptions e;  // the questions' image paths include their set's folder
    e.progress = o.progress;
    for (int rep = 0; rep < c.repeats; ++rep) {
      TrainOptions t;
      t.parts = {Part::Projector, Part::Llm};
      t.lr = o.curriculum_lr;
      t.shuffle_visual = o.curriculum_shuffle;
      t.ground_weight = o.ground_weight;
      t.ground_layer = o.ground_layer;
      t.ground_heads = o.ground_heads;
      t.batch_size = ctx.per_rank(single ? o.curriculum_batch * o.questions : o.curriculum_batch, "stage C's batch");
      t.comm = ctx.comm;
      t.max_steps = c.steps;
      t.seed = o.seed + 101 + i + 7919 * uint64_t(rep);  // each schedule its own data order
      t.progress = o.progress;
      // progress readable without a terminal, one file per schedule
      t.log = (fs::path(stage_dir) / (rep ? "metrics-" + std::to_string(rep + 1) + ".jsonl" : "metrics.jsonl")).string();
      say("stage " + tag + (c.repeats > 1 ? ", schedule " + std::to_string(rep + 1) + " of at most " + std::to_string(c.repeats) : "") +
          ": " + std::to_string(c.steps) + " steps, " + format_curriculum({c}) + " (" +
          std::to_string(r.visual_tokens) + " visual tokens" + (o.curriculum_shuffle ? ", shuffled" : "") +
          (single ? ", one question per sample" : "") + "), lr " +
          num(o.curriculum_lr, "%g"));
      TrainReport tr = train_model(model, samples, t, init_dir);
      r.seconds += tr.seconds;
      r.steps += tr.steps;
      r.schedules++;
      if (!ctx.lead) {  // rank 0 evaluates; every rank follows its decision to stop
        if (ctx.agree(false)) break;
        continue;
      }
      r.eval = evaluate(model, tok, cquestions, e);
      r.accuracies.push_back(r.eval.overall.accuracy());
      const std::string by_family = per_family_line(r.eval, r.prior);
      say("stage " + tag + ": " + num(r.seconds, "%.1f") + " s, " + std::to_string(r.steps) + " steps, accuracy " +
          pct(r.eval.overall.accuracy()) + " (answer prior " + pct(r.prior.overall.accuracy()) +
          (c.target >= 0 ? ", bar " + pct(c.target) : "") + ")" +
          (by_family.empty() ? "" : "; " + by_family));
      if (ctx.agree(c.target >= 0 && r.eval.overall.accuracy() >= c.target)) break;
    }
    model.set_reducer(Reducer::none());  // the shared start is plain
    if (ctx.lead) model.save(init_dir);
    ctx.sync();
    cur.push_back(std::move(r));
  }

  return cur;
}

// The models of the comparison, plain first: every (m, k) Victor pair, the pooling baselines, the
// resamplers, then the training-free reducers on the plain model's weights.
std::vector<Trained> plan_runs(const ReproOptions& o) {
  std::vector<Trained> runs;
  auto add_run = [&runs](const std::string& name, Reducer reducer) {
    Trained t;
    t.name = name;
    t.reducer = std::move(reducer);
    runs.push_back(t);
  };
  add_run("plain", Reducer::none());
  const RegisterMask mask = register_mask_from_string(o.register_mask);
  for (int k : o.summary_layers)  // the name carries k only when the run compares several
    for (int m : o.registers)
      add_run("victor-m" + std::to_string(m) + (o.summary_layers.size() > 1 ? "-k" + std::to_string(k) : ""),
              Reducer::victor({m, k, mask}));
  for (int p : o.pools)
    if (p > 1) add_run("pool-" + std::to_string(p) + "x" + std::to_string(p), Reducer::pool({p}));
  for (int n : o.resamplers)
    if (n > 0) add_run("resampler-" + std::to_string(n), Reducer::resampler({n}));
  for (auto& r : training_free_reducers(o, preset_config(o.preset))) {
    Trained t;
    t.name = slug(r.name());
    t.reducer = r;
    t.training_free = true;
    runs.push_back(t);
  }
  return runs;
}

namespace {

// A trained run's starting model: the shared start with the run's reducer (validated; fresh
// registers or latents drawn from the run's seed). Fills r.drop_layer and r.grounded.
Vlm start_model(const Context& c, Trained& r) {
  const ReproOptions& o = c.o;
  Vlm model = Vlm::load(c.init_dir);
  model.set_reducer(r.reducer, o.seed + 1);  // validates
  r.drop_layer = model.config().reducer.drop_layer(model.config());
  // Grounding needs visual tokens on the patch grid (not the resampler's latents) that reach its layer.
  r.grounded = o.ground_weight > 0 && o.ground_layer < r.drop_layer && r.reducer.grid_side(model.config());
  return model;
}

// Stage 2's training options for a run (the same for every model but the grounding); no output folder.
TrainOptions stage2_options(const Context& c, const Trained& r) {
  const ReproOptions& o = c.o;
  TrainOptions t;
  t.parts = parse_parts(o.train_parts);
  t.lr = o.lr;
  t.batch_size = c.per_rank(o.batch_size, "--batch-size");
  t.comm = c.comm;
  if (r.grounded) {
    t.ground_weight = o.ground_weight;
    t.ground_layer = o.ground_layer;
    t.ground_heads = o.ground_heads;
  }
  t.seed = o.seed;
  t.progress = o.progress;
  return t;
}

}  // namespace

// 3-4. Every trained model from the shared start with identical budgets, then its evaluation
// (rank 0); the training-free ones are evaluated on the plain model's weights.
void train_and_evaluate(const Context& c, const Tokenizer& tok, const MainData& d, std::vector<Trained>& runs) {
  const ReproOptions& o = c.o;
  const std::string& data = c.data;
  const std::string& init_dir = c.init_dir;
  const auto& convs = d.convs;
  const auto& describe = d.describe;
  const auto& questions = d.questions;
  for (auto& r : runs) {
    if (r.training_free) {  // the trained plain model, its visual tokens reduced at inference
      if (!c.lead) continue;
      r.dir = runs.front().dir;
      Vlm model = Vlm::load(r.dir);
      model.set_reducer(r.reducer);
      r.drop_layer = model.config().reducer.drop_layer(model.config());
      EvalOptions e;
      e.image_folder = data;
      e.answers_out = (fs::path(o.out) / ("answers-" + r.name + ".jsonl")).string();
      e.progress = o.progress;
      e.model_id = r.name;
      say("evaluating the plain model with " + r.reducer.spec() + " (training-free)");
      r.eval = evaluate(model, tok, questions, e);
      say(r.name + ": " + format_report(r.eval).substr(0, format_report(r.eval).find('\n')));
      continue;
    }
    r.dir = (fs::path(o.out) / "models" / r.name).string();
    Vlm model = start_model(c, r);
    r.reducer_params = model.parameter_count(1 << int(Part::Registers));
    TrainOptions t = stage2_options(c, r);
    double seconds = 0, step_time = 0;
    int steps = 0;
    if (o.pretrain_steps > 0) {  // stage 1: descriptions, no checkpoint
      auto s1 = prepare_samples(describe, tok, model.config(), data, false, nullptr);
      t.max_steps = o.pretrain_steps;
      say("training " + r.name + ", stage 1: " + std::to_string(o.pretrain_steps) + " steps of descriptions");
      TrainOptions t1 = t;
      t1.ground_weight = 0;  // descriptions rest on the whole image: no boxes
      auto rep1 = train_model(model, s1, t1, init_dir);
      seconds += rep1.seconds;
      step_time += rep1.mean_step_seconds * rep1.steps;
      steps += rep1.steps;
    }
    auto samples = prepare_samples(convs, tok, model.config(), data, false, nullptr);
    t.max_steps = o.steps;
    t.out = r.dir;
    say("training " + r.name + ", stage 2: " + std::to_string(o.steps) + " steps of questions");
    auto rep = train_model(model, samples, t, init_dir);
    seconds += rep.seconds;
    step_time += rep.mean_step_seconds * rep.steps;
    steps += rep.steps;
    r.train_seconds = seconds;
    r.step_seconds = steps ? step_time / steps : 0;
    r.final_loss = rep.final_loss;
    say(r.name + ": " + num(rep.seconds, "%.1f") + " s, final loss " + num(rep.final_loss, "%.4f"));
    if (!c.lead) continue;  // the trainer's last barrier: r.dir is complete; rank 0 evaluates it
    // 4. Evaluate.
    EvalOptions e;
    e.image_folder = data;
    e.answers_out = (fs::path(o.out) / ("answers-" + r.name + ".jsonl")).string();
    e.progress = o.progress;
    e.model_id = r.name;
    r.eval = evaluate(model, tok, questions, e);
    say(r.name + ": " + format_report(r.eval).substr(0, format_report(r.eval).find('\n')));
  }
}

// 4b. Training time again, in interleaved segments: each round trains every trained model for
// o.timing_steps stage-2 steps from the shared start (nothing saved), in the opposite order to the
// round before, so drift in the machine's speed falls on every model alike. The segment's samples
// are the first ones of the training set, as many as make the share of first-seen images (whose
// frozen vision features are computed, not cached) the full run's.
void time_training(const Context& c, const Tokenizer& tok, const MainData& d, std::vector<Trained>& runs) {
  const ReproOptions& o = c.o;
  if (o.timing_rounds <= 0) return;
  std::vector<size_t> trained;
  for (size_t i = 0; i < runs.size(); ++i)
    if (!runs[i].training_free) trained.push_back(i);
  const int steps = o.timing_segment_steps();
  const double full = double(o.steps) * o.batch_size;  // samples the full stage 2 drew
  const double first_seen = std::min(1.0, double(d.convs.size()) / full);
  const size_t n = std::max<size_t>(size_t(o.batch_size),
                                    size_t(std::lround(first_seen * (steps + 1) * o.batch_size)));
  const std::vector<Conversation> subset(d.convs.begin(), d.convs.begin() + std::min(n, d.convs.size()));
  say("timing: " + std::to_string(o.timing_rounds) + " rounds of " + std::to_string(steps) +
      " stage-2 steps per trained model, interleaved (" + std::to_string(subset.size()) + " samples each)");
  std::vector<std::vector<TrainSample>> samples(runs.size());  // per run, prepared in its first round
  for (int round = 0; round < o.timing_rounds; ++round) {
    std::vector<size_t> order = trained;
    if (round % 2) std::reverse(order.begin(), order.end());
    for (size_t i : order) {
      Trained& r = runs[i];
      Vlm model = start_model(c, r);  // sets what stage 2 already set, to the same values
      TrainOptions t = stage2_options(c, r);
      t.max_steps = steps + 1;  // the first step warms up (allocations, threads): not counted
      t.progress = false;
      if (samples[i].empty()) samples[i] = prepare_samples(subset, tok, model.config(), c.data, false, nullptr);
      auto rep = train_model(model, samples[i], t, c.init_dir);
      const std::vector<double> counted(rep.step_seconds.begin() + 1, rep.step_seconds.end());
      r.timing_step_seconds.push_back(std::accumulate(counted.begin(), counted.end(), 0.0) / double(counted.size()));
    }
    std::string line;
    for (size_t i : trained)
      line += (line.empty() ? "" : ", ") + runs[i].name + " " + num(runs[i].timing_step_seconds.back(), "%.3f") + " s";
    say("timing round " + std::to_string(round + 1) + " of " + std::to_string(o.timing_rounds) + ", mean step: " + line);
  }
}

// 5. The same weights under each configuration, measured alternately (rank 0).
std::vector<BenchResult> benchmark(const Context& c, const std::vector<Trained>& runs, Results& r) {
  const ReproOptions& o = c.o;
  Vlm bench_model = Vlm::load(runs.front().dir);
  std::vector<BenchConfig> configs{{Reducer::none(), false}};
  for (size_t i = 1; i < runs.size(); ++i) configs.push_back({runs[i].reducer, false});
  BenchOptions b;
  b.batches = {1, o.bench_batch};
  b.gen_tokens = o.bench_gen;
  b.repeats = o.bench_repeats;
  b.progress = o.progress;
  say("benchmarking " + std::to_string(configs.size()) + " configurations (" + std::to_string(o.bench_repeats) +
      " repeats, alternating)");
  auto bench = run_bench(bench_model, configs, b);
  write_file_atomic((fs::path(o.out) / "bench.json").string(),
                    bench_json(bench, bench_model.config(), b).dump(2) + "\n");

  r.visual_tokens = bench_model.config().visual_tokens_per_image();
  r.layers = bench_model.config().num_layers();
  return bench;
}

}  // namespace victor::repro
