#include "victor/repro.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "victor/bench.h"
#include "victor/blas.h"
#include "victor/data.h"
#include "victor/distributed.h"
#include "victor/error.h"
#include "victor/eval.h"
#include "victor/train.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace victor {

ReproOptions ReproOptions::quick() {
  ReproOptions o;
  o.out = "runs/repro-quick";
  o.train_images = 400;
  o.test_images = 50;
  o.steps = 60;
  o.vision_steps = 40;
  o.vision_images = 0;
  o.bench_repeats = 1;
  o.bench_gen = {2, 32};
  o.registers = {8};
  o.summary_layers = {2};
  o.curriculum = {{4, {"identify"}, 4, 150}};
  o.curriculum_images = 600;
  o.lr = 1e-3;
  return o;
}

std::vector<CurriculumStage> parse_curriculum(const std::string& spec) {
  std::vector<CurriculumStage> out;
  if (spec.empty() || spec == "none") return out;
  std::stringstream all(spec);
  std::string item;
  while (std::getline(all, item, ',')) {
    std::vector<std::string> f;
    std::stringstream ss(item);
    for (std::string x; std::getline(ss, x, ':');) f.push_back(x);
    const std::string where = "--curriculum stage '" + item + "'";
    if (f.size() != 4 && f.size() != 5)
      throw Error(where + ": expected GRID:FAMILIES:POOL:STEPS[xREPEATS][@TARGET][:EMPTY], e.g. 2:identify:8:1000x6@70");
    auto integer = [&](const std::string& v, const char* name, int lo, int hi) {
      size_t used = 0;
      int x = 0;
      try {
        x = std::stoi(v, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != v.size() || v.empty() || x < lo || x > hi)
        throw Error(where + ": " + name + " must be an integer in [" + std::to_string(lo) + ", " +
                    std::to_string(hi) + "], got '" + v + "'");
      return x;
    };
    // "70" or "70%" -> 0.70
    auto percent = [&](std::string v, const char* name, int hi) {
      if (!v.empty() && v.back() == '%') v.pop_back();
      return integer(v, name, 0, hi) / 100.0;
    };
    CurriculumStage c;
    c.grid = integer(f[0], "GRID", 1, 8);
    if (f[1] != "all") {
      std::stringstream fs_(f[1]);
      std::vector<double> rates;
      for (std::string fam; std::getline(fs_, fam, '+');) {
        double rate = -1;
        if (auto slash = fam.find('/'); slash != std::string::npos) {  // NAME/EMPTY
          rate = percent(fam.substr(slash + 1), "a family's EMPTY (after /, percent of empty cells)", 99);
          fam.resize(slash);
        }
        if (std::find(kQuestionFamilies.begin(), kQuestionFamilies.end(), fam) == kQuestionFamilies.end())
          throw Error(where + ": unknown question family '" + fam + "' (all, or identify, count, exist, locate joined by +)");
        if (std::find(c.families.begin(), c.families.end(), fam) != c.families.end())
          throw Error(where + ": question family '" + fam + "' given twice");
        c.families.push_back(fam);
        rates.push_back(rate);
      }
      if (c.families.empty()) throw Error(where + ": FAMILIES is empty");
      if (std::any_of(rates.begin(), rates.end(), [](double r) { return r >= 0; })) c.family_empty = rates;
    }
    c.pool = integer(f[2], "POOL", 1, 64);
    std::string steps = f[3], repeats, target;
    if (auto at = steps.find('@'); at != std::string::npos) {
      target = steps.substr(at + 1);
      steps.resize(at);
    }
    if (auto x = steps.find('x'); x != std::string::npos) {
      repeats = steps.substr(x + 1);
      steps.resize(x);
    }
    c.steps = integer(steps, "STEPS", 1, 10000000);
    if (f[3].find('x') != std::string::npos) c.repeats = integer(repeats, "REPEATS (after x)", 1, 1000);
    if (f[3].find('@') != std::string::npos) c.target = percent(target, "TARGET (after @, percent)", 100);
    if (f.size() == 5) c.empty_rate = percent(f[4], "EMPTY (percent of empty cells)", 99);
    out.push_back(c);
  }
  return out;
}

// 0.75 -> "75", as --curriculum writes a percent (parse_curriculum's `percent` reads it back).
static std::string whole_percent(double fraction) { return std::to_string(int(std::lround(fraction * 100))); }

std::string format_curriculum(const std::vector<CurriculumStage>& stages) {
  std::string s;
  for (const auto& c : stages) {
    if (!s.empty()) s += ",";
    std::string fams;
    for (size_t j = 0; j < c.families.size(); ++j) {
      fams += (fams.empty() ? "" : "+") + c.families[j];
      if (c.family_rate(j) >= 0) fams += "/" + whole_percent(c.family_rate(j));
    }
    s += std::to_string(c.grid) + ":" + (fams.empty() ? "all" : fams) + ":" + std::to_string(c.pool) + ":" +
         std::to_string(c.steps);
    if (c.repeats != 1) s += "x" + std::to_string(c.repeats);
    if (c.target >= 0) s += "@" + whole_percent(c.target);
    if (c.empty_rate >= 0) s += ":" + whole_percent(c.empty_rate);
  }
  return s.empty() ? "none" : s;
}

namespace {

struct CurriculumResult {
  CurriculumStage stage;
  double seconds = 0;                  // training, every schedule
  int steps = 0, schedules = 0;
  std::vector<double> accuracies;      // after each schedule
  EvalReport eval, prior;              // after the last one
  int visual_tokens = 0;
};

struct Trained {
  std::string name, dir;
  Reducer reducer;
  bool training_free = false;  // the plain model's weights with a training-free reducer
  int64_t reducer_params = 0;  // the reducer's own parameters (registers, the resampler's block)
  int registers = 0, summary_layers = 0, pool = 1;
  bool grounded = false;  // stage 2 with grounded attention
  double train_seconds = 0, step_seconds = 0, final_loss = 0;
  EvalReport eval;
};

// Under --nproc every rank runs this file's pipeline; rank 0 alone speaks, builds data, evaluates,
// benchmarks and writes (set once in run_repro).
bool g_quiet = false;

void say(const std::string& s) {
  if (!g_quiet) std::cerr << "repro: " << s << std::endl;
}

std::string pct(double x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f%%", 100 * x);
  return b;
}
// "count 61.0% (prior 52.0%), exist ..." for an evaluation over more than one family, else "".
std::string per_family_line(const EvalReport& e, const EvalReport& prior) {
  if (e.per_family.size() < 2) return "";
  std::string s;
  for (const auto& [f, score] : e.per_family) {
    auto p = prior.per_family.find(f);
    s += (s.empty() ? "" : ", ") + f + " " + pct(score.accuracy()) +
         (p == prior.per_family.end() ? "" : " (prior " + pct(p->second.accuracy()) + ")");
  }
  return s;
}
std::string join(const std::vector<int>& xs, const std::string& sep) {
  std::string s;
  for (int x : xs) s += (s.empty() ? "" : sep) + std::to_string(x);
  return s;
}

std::string join_names(const std::vector<std::string>& xs, const std::string& sep) {
  std::string s;
  for (const auto& x : xs) s += (s.empty() ? "" : sep) + x;
  return s;
}
std::string num(double x, const char* fmt = "%.2f") {
  char b[32];
  std::snprintf(b, sizeof b, fmt, x);
  return b;
}

// Plots with gnuplot (Debian's gnuplot-nox) when present; returns false when it is not.
// One line per series (label, points), gnuplot's data blocks separated by two blank lines.
using Series = std::pair<std::string, std::vector<std::pair<double, double>>>;
bool plot(const std::string& dir, const std::string& name, const std::string& title, const std::string& ylabel,
          const std::vector<Series>& series, double baseline, const std::string& baseline_label,
          const std::string& xlabel = "registers m", bool log_x = true) {
  if (series.empty() || std::system("command -v gnuplot > /dev/null 2>&1") != 0) return false;
  std::string data = (fs::path(dir) / (name + ".dat")).string();
  std::ofstream(data) << [&] {
    std::ostringstream o;
    for (auto& [label, points] : series) {
      for (auto& [x, y] : points) o << x << " " << y << "\n";
      o << "\n\n";
    }
    return o.str();
  }();
  std::string lines;
  for (size_t i = 0; i < series.size(); ++i)
    lines += "'" + data + "' index " + std::to_string(i) + " using 1:2 with linespoints lw 2 pt 7 title '" +
             series[i].first + "', ";
  std::string png = (fs::path(dir) / (name + ".png")).string();
  std::string script = (fs::path(dir) / (name + ".gp")).string();
  std::ofstream(script) << "set terminal png size 640,400\nset output '" << png + ".tmp"
                        << "'\nset title '" << title << "'\nset xlabel '" << xlabel << "'\nset ylabel '" << ylabel
                        << "'\nset grid\nset key outside right\n"
                        << (log_x ? "set logscale x 2\nset xrange [0.5:*]\n" : "")
                        << "plot " << lines << baseline << " with lines dt 2 lw 2 title '" << baseline_label << "'\n";
  bool ok = std::system(("gnuplot '" + script + "' > /dev/null 2>&1").c_str()) == 0;
  if (ok) fs::rename(png + ".tmp", png);
  fs::remove(data);
  fs::remove(script);
  return ok;
}

}  // namespace

// The training-free reducers the run applies to its plain model: as asked, or FastV (k = 2) and
// VisionZip at the first pooling baseline's budget of visual tokens per image.
std::vector<Reducer> training_free_reducers(const ReproOptions& o, const ModelConfig& preset) {
  std::vector<Reducer> out;
  if (o.training_free.size() == 1 && o.training_free[0] == "none") return out;
  for (auto& s : o.training_free) out.push_back(Reducer::parse(s));
  if (o.training_free.empty()) {
    const int N = preset.vision.num_patches(), pool = o.pools.empty() ? 4 : o.pools.front();
    const int budget = std::max(1, N / (pool * pool));
    out.push_back(Reducer::fastv({std::min(2, preset.num_layers() - 1), double(budget) / N}));
    const int contextual = budget / 5;
    out.push_back(Reducer::visionzip({budget - contextual, contextual}));
  }
  for (auto& r : out) {
    if (r.trained()) throw Error("--training-free " + r.spec() + ": a trained reducer (train it with --registers/--pool)");
    r.validate(preset);
  }
  return out;
}

// A file-name form of a reducer's display name ("fastv k=2 keep=0.25" -> "fastv-k2-keep0.25").
std::string slug(const std::string& name) {
  std::string s;
  for (char c : name) s += c == ' ' ? '-' : c == '=' ? '\0' : c;
  s.erase(std::remove(s.begin(), s.end(), '\0'), s.end());
  return s;
}

std::string run_repro(const ReproOptions& opts) {
  auto t_all = std::chrono::steady_clock::now();
  ReproOptions o = opts;
  // Under `--nproc`, torchrun or Slurm: every training stage is data-parallel over the ranks, each
  // taking its share of the same global batch (so the recipe, and the models it trains, do not
  // change with the rank count). Rank 0 alone builds the data, runs stage 0 (the vision tower's
  // own loop), saves the shared start, evaluates, benchmarks and writes the report; the others wait
  // for it at barriers and leave after the last training stage.
  std::unique_ptr<Communicator> own_comm;
  if (!o.comm)
    if (auto env = dist_env_from_environment()) {
      own_comm = std::make_unique<Communicator>(*env, std::chrono::seconds(o.dist_timeout_seconds));
      o.comm = own_comm.get();
    }
  Communicator* const comm = o.comm;
  const int world = comm ? comm->world_size() : 1;
  const bool lead = !comm || comm->rank() == 0;
  g_quiet = !lead;
  auto sync = [comm] {
    if (comm) comm->barrier();
  };
  // Every rank must take the same decision from rank 0's evaluation.
  auto agree = [comm, lead](bool decision) {
    if (!comm) return decision;
    auto t = torch::tensor({lead && decision ? 1.0f : 0.0f});
    comm->allreduce_sum({t});
    return t.item<float>() > 0.5f;
  };
  auto per_rank = [world](int global_batch, const std::string& what) {
    if (global_batch % world != 0)
      throw Error(what + " " + std::to_string(global_batch) + " does not split over " + std::to_string(world) +
                  " ranks (--nproc): choose a batch divisible by the rank count");
    return global_batch / world;
  };
  if (world > 1) {  // refuse a batch the ranks cannot share before any work is done
    per_rank(o.batch_size, "--batch-size");
    if (o.text_steps > 0) per_rank(o.text_batch, "stage L's batch");
    for (const auto& c : o.curriculum)
      per_rank(o.curriculum_single_turn && c.pool > 1 ? o.curriculum_batch * o.questions : o.curriculum_batch,
               "stage C's batch (" + format_curriculum({c}) + ")");
  }
  {  // refuse a curriculum the model cannot pool, or a k it does not have, before any work is done
    const ModelConfig preset = preset_config(o.preset);
    auto has_layer = [&](int k) { return k >= 1 && k < preset.num_layers(); };  // a k the preset can drop after
    if (o.curriculum_summary_layers != -1 && !has_layer(o.curriculum_summary_layers))
      throw Error("--curriculum-summary-layers " + std::to_string(o.curriculum_summary_layers) +
                  ": must be -1 (every layer) or between 1 and " + std::to_string(preset.num_layers() - 1));
    if (o.ground_weight > 0) {  // as stage C will train: its drop, if any
      ModelConfig stage_c = preset;
      if (o.curriculum_summary_layers >= 0)
        stage_c.reducer = Reducer::victor({0, o.curriculum_summary_layers, RegisterMask::Causal});
      try {
        check_grounding(stage_c, o.ground_layer, o.ground_heads);
      } catch (const Error& e) {
        throw Error(std::string(e.what()) + (o.curriculum_summary_layers > 0 ? " in stage C (--curriculum-summary-layers)" : ""));
      }
    }
    training_free_reducers(o, preset);  // refuses a bad --training-free spec up front
    for (int n : o.resamplers)
      if (n > 0) Reducer::resampler({n}).validate(preset);
    if (o.curriculum_summary_layers >= 0)
      for (auto& c : o.curriculum)
        if (c.pool > 1)
          throw Error("--curriculum-summary-layers with a pooled stage C stage (POOL " + std::to_string(c.pool) +
                      "): a model has one token reducer, pooling or Victor's drop; use POOL 1 stages with it");
    for (int k : o.summary_layers)
      if (!has_layer(k))
        throw Error("--summary-layers " + std::to_string(k) + ": Victor k must be between 1 and " +
                    std::to_string(preset.num_layers() - 1) + " (the preset has " +
                    std::to_string(preset.num_layers()) + " decoder layers)");
    const VisionConfig v = preset.vision;
    const int side = v.image_size / v.patch_size;
    for (const auto& c : o.curriculum)
      if (side % c.pool != 0)
        throw Error("--curriculum stage '" + format_curriculum({c}) + "': POOL " + std::to_string(c.pool) +
                    " does not divide the preset's " + std::to_string(side) + "x" + std::to_string(side) +
                    " patch grid");
  }
  fs::create_directories(o.out);
  const std::string data = (fs::path(o.out) / "gridvqa").string();
  // 1. Data.
  GridVqaOptions g;
  g.out_dir = data;
  g.train_images = o.train_images;
  g.test_images = o.test_images;
  g.questions_per_image = o.questions;
  g.seed = o.seed;
  say("building GridVQA (" + std::to_string(o.train_images) + " train / " + std::to_string(o.test_images) +
      " test images) in " + data + (world > 1 ? " (" + std::to_string(world) + " data-parallel ranks)" : ""));
  if (lead) build_gridvqa(g);
  sync();
  auto convs = load_llava_json((fs::path(data) / "train.json").string());
  auto describe = load_llava_json((fs::path(data) / "pretrain.json").string());
  auto questions = load_questions_jsonl((fs::path(data) / "test.jsonl").string());
  if (o.eval_limit > 0 && int(questions.size()) > o.eval_limit) questions.resize(size_t(o.eval_limit));

  // 2. One initial model; every run starts from the same weights.
  const std::string init_dir = (fs::path(o.out) / "models" / "init").string();
  if (lead) {
    ModelConfig cfg = preset_config(o.preset);
    int n = train_tokenizer(gridvqa_corpus(), init_dir, 512);
    cfg.text.vocab_size = ((n + 2 + 63) / 64) * 64;
    cfg.image_token_index = n;
    cfg.pad_token_id = n + 1;
    Vlm::random(cfg, o.seed).save(init_dir);
  }
  sync();
  Tokenizer tok(init_dir);
  // Stage 0 (shared): the vision tower learns the items' classes, as LLaVA starts from CLIP.
  VisionPretrainReport vrep;
  if (o.vision_steps > 0 && lead) {  // its own loop, not data-parallel: rank 0 alone
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
  sync();
  // Stage L (shared): the language model learns to answer from grids written as text, as LLaVA
  // starts from a pretrained Vicuna. Only the language model is trained here.
  TrainReport lrep;
  if (o.text_steps > 0) {
    Vlm model = Vlm::load(init_dir);
    auto text = load_llava_json((fs::path(data) / "text.json").string());
    auto samples = prepare_samples(text, tok, model.config(), data, false, nullptr);
    TrainOptions t;
    t.parts = {Part::Llm};
    t.lr = o.text_lr;
    t.batch_size = per_rank(o.text_batch, "stage L's batch");
    t.comm = comm;
    t.max_steps = o.text_steps;
    t.seed = o.seed;
    t.progress = o.progress;
    say("stage L: pretraining the language model on grids written as text (" + std::to_string(o.text_steps) +
        " steps of " + std::to_string(o.text_batch) + ", lr " + num(o.text_lr, "%g") + ")");
    lrep = train_model(model, samples, t, init_dir);
    if (lead) model.save(init_dir);
    sync();
    say("stage L: " + num(lrep.seconds, "%.1f") + " s, final loss " + num(lrep.final_loss, "%.4f"));
  }

  // Stage C (shared): the curriculum. Each stage has its own GridVQA (train split items only for
  // training, its own small test set to report progress) and trains projector + language model.
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
      if (lead) build_gridvqa(cg);
      sync();
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
      t.batch_size = per_rank(single ? o.curriculum_batch * o.questions : o.curriculum_batch, "stage C's batch");
      t.comm = comm;
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
      if (!lead) {  // rank 0 evaluates; every rank follows its decision to stop
        if (agree(false)) break;
        continue;
      }
      r.eval = evaluate(model, tok, cquestions, e);
      r.accuracies.push_back(r.eval.overall.accuracy());
      const std::string by_family = per_family_line(r.eval, r.prior);
      say("stage " + tag + ": " + num(r.seconds, "%.1f") + " s, " + std::to_string(r.steps) + " steps, accuracy " +
          pct(r.eval.overall.accuracy()) + " (answer prior " + pct(r.prior.overall.accuracy()) +
          (c.target >= 0 ? ", bar " + pct(c.target) : "") + ")" +
          (by_family.empty() ? "" : "; " + by_family));
      if (agree(c.target >= 0 && r.eval.overall.accuracy() >= c.target)) break;
    }
    model.set_reducer(Reducer::none());  // the shared start is plain
    if (lead) model.save(init_dir);
    sync();
    cur.push_back(std::move(r));
  }

  // 3. Train plain and Victor models with identical budgets.
  std::vector<Trained> runs;
  auto add_run = [&runs, &o](const std::string& name, int registers, int summary_layers, int pool) {
    Trained t;
    t.name = name;
    t.registers = registers;
    t.summary_layers = summary_layers;
    t.pool = pool;
    t.reducer = pool > 1 ? Reducer::pool({pool})
                : name.rfind("victor", 0) == 0
                    ? Reducer::victor({registers, summary_layers, register_mask_from_string(o.register_mask)})
                    : Reducer::none();
    runs.push_back(t);
  };
  add_run("plain", 0, -1, 1);
  for (int k : o.summary_layers)  // the name carries k only when the run compares several
    for (int m : o.registers)
      add_run("victor-m" + std::to_string(m) + (o.summary_layers.size() > 1 ? "-k" + std::to_string(k) : ""), m, k, 1);
  for (int p : o.pools)
    if (p > 1) add_run("pool-" + std::to_string(p) + "x" + std::to_string(p), 0, -1, p);
  for (int n : o.resamplers)
    if (n > 0) {
      add_run("resampler-" + std::to_string(n), 0, -1, 1);
      runs.back().reducer = Reducer::resampler({n});
    }
  for (auto& r : training_free_reducers(o, preset_config(o.preset))) {
    Trained t;
    t.name = slug(r.name());
    t.reducer = r;
    t.training_free = true;
    runs.push_back(t);
  }
  for (auto& r : runs) {
    if (r.training_free) {  // the trained plain model, its visual tokens reduced at inference
      if (!lead) continue;
      r.dir = runs.front().dir;
      Vlm model = Vlm::load(r.dir);
      model.set_reducer(r.reducer);
      r.summary_layers = model.config().reducer.drop_layer(model.config());
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
    Vlm model = Vlm::load(init_dir);
    model.set_reducer(r.reducer, o.seed + 1);  // validates
    r.reducer_params = model.parameter_count(1 << int(Part::Registers));
    r.summary_layers = model.config().reducer.drop_layer(model.config());
    TrainOptions t;
    t.parts = parse_parts(o.train_parts);
    t.lr = o.lr;
    t.batch_size = per_rank(o.batch_size, "--batch-size");
    t.comm = comm;
    // Grounding needs visual tokens on the patch grid (not the resampler's latents) that reach its layer.
    r.grounded = o.ground_weight > 0 && o.ground_layer < r.summary_layers && r.reducer.kind() != ReducerKind::Resampler;
    if (r.grounded) {
      t.ground_weight = o.ground_weight;
      t.ground_layer = o.ground_layer;
      t.ground_heads = o.ground_heads;
    }
    t.seed = o.seed;
    t.progress = o.progress;
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
    if (!lead) continue;  // the trainer's last barrier: r.dir is complete; rank 0 evaluates it
    // 4. Evaluate.
    EvalOptions e;
    e.image_folder = data;
    e.answers_out = (fs::path(o.out) / ("answers-" + r.name + ".jsonl")).string();
    e.progress = o.progress;
    e.model_id = r.name;
    r.eval = evaluate(model, tok, questions, e);
    say(r.name + ": " + format_report(r.eval).substr(0, format_report(r.eval).find('\n')));
  }
  if (!lead) return "";  // every training stage is done: the rest is rank 0's
  EvalReport prior = answer_prior(convs, questions);

  // 5. Benchmark: the same weights under each configuration, measured alternately.
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

  // 6. Report.
  const Trained& plain = runs.front();
  const BenchResult& bp = bench.front();
  std::string key_short = "b" + std::to_string(o.bench_batch) + "_g" + std::to_string(o.bench_gen.front());
  std::string key_long = "b" + std::to_string(o.bench_batch) + "_g" + std::to_string(o.bench_gen.back());
  const auto parts = parse_parts(o.train_parts);
  const bool vision_frozen = std::find(parts.begin(), parts.end(), Part::Vision) == parts.end();
  const std::string blas_kernels = blas_core_name().empty() ? "not OpenBLAS" : blas_core_name();
  std::ostringstream md;
  md << "# Victor on GridVQA: reproduction report\n\n";
  md << "Preset `" << o.preset << "` trained from random weights (" << o.steps << " steps of " << o.batch_size
     << " conversations, lr " << o.lr << ", trained: `" << o.train_parts << "`"
     << (vision_frozen ? "; the frozen vision tower's features computed once per image" : "") << "), "
     << bench_model.config().visual_tokens_per_image()
     << " visual tokens per image, " << bench_model.config().num_layers() << " decoder layers, Victor k = "
     << join(o.summary_layers, ", ") << " (" << o.register_mask << " mask). GridVQA: " << o.train_images << " train images ("
     << convs.size() << " conversations), " << questions.size() << " test questions from "
     << o.test_images << " test images (Fashion-MNIST test split only). Threads: " << at::get_num_threads()
     << (world > 1 ? " per rank, " + std::to_string(world) + " data-parallel ranks in the training stages (c10d/Gloo; "
                     "the same global batches, each rank a share; stage 0, evaluation and benchmarks on rank 0)"
                   : std::string())
     << ", BLAS kernels: " << blas_kernels << ".\n\n";
  if (o.vision_steps > 0)
    md << "Stage 0, shared by every model: the vision tower pretrained to classify grid cells (" << vrep.steps
       << " steps of " << o.vision_batch << " images from "
       << (o.vision_images > 0 ? std::to_string(o.vision_images) + " of its own" : "the training set's")
       << ", targets on "
       << (o.vision_targets == "patch" ? "every patch" : "each cell's mean patch") << ", " << num(vrep.seconds, "%.0f")
       << " s, test-split cell accuracy " << pct(vrep.test_cell_accuracy) << ", single-patch accuracy "
       << pct(vrep.test_patch_accuracy) << ", place accuracy " << pct(vrep.test_position_accuracy)
       << (o.vision_counts ? "; every patch also names how many cells hold each class: exact for " +
                                 pct(vrep.test_count_patch_accuracy) + " of (image, class) pairs from one patch, " +
                                 pct(vrep.test_count_mean_accuracy) + " from the patches' mean"
                           : "")
       << "), like LLaVA starting from a pretrained CLIP. Training times below are stages 1 + 2 (the LLaVA-style "
       << "training), which differ between the models.\n\n";
  if (o.text_steps > 0)
    md << "Stage L, shared by every model: the language model pretrained on " << o.text_steps << " steps of "
       << o.text_batch << " GridVQA conversations about grids written as text (`text.json`, lr " << num(o.text_lr, "%g")
       << ", " << num(lrep.seconds, "%.0f") << " s, final loss " << num(lrep.final_loss, "%.3f")
       << "), like LLaVA starting from a pretrained Vicuna; not counted in the training times.\n\n";
  if (!cur.empty()) {
    md << "Stage C, shared by every model: a curriculum (projector + language model, lr " << num(o.curriculum_lr, "%g")
       << ", " << o.curriculum_batch << " conversations per step"
       << (o.curriculum_single_turn ? " (stages with pooled tokens: one question per sample, " +
                                          std::to_string(o.curriculum_batch * o.questions) + " samples per step)" : "")
       << ", " << o.curriculum_images << " images per stage"
       << (o.curriculum_shuffle ? ", each image's visual tokens in a fresh random order every step" : "")
       << (o.curriculum_summary_layers > 0
               ? ", the visual tokens dropped after layer " + std::to_string(o.curriculum_summary_layers) +
                     " (no registers), so the lookups are learned where Victor twins with k >= " +
                     std::to_string(o.curriculum_summary_layers) + " still see them"
               : "")
       << "). Few visual tokens first (pooled, or small grids): the answer to a question about one cell sits in "
          "one of N visual tokens, so without grounded attention the lookup's learning signal is ~1/N; a lookup learned "
          "on few tokens carries over to more. Not counted in the training times. Each stage's own test set:\n\n"
       << "A stage with a bar repeats its schedule (a warm restart, a new data order) until its test accuracy "
          "reaches the bar or its schedules run out; the accuracy column lists each schedule's result.\n\n"
       << "| stage | grid | families | pool | visual tokens | steps | time | accuracy | answer prior |\n"
       << "|---|---|---|---|---|---|---|---|---|\n";
    for (size_t i = 0; i < cur.size(); ++i) {
      const auto& c = cur[i].stage;
      std::string fams, steps = std::to_string(cur[i].steps), accs;
      for (size_t j = 0; j < c.families.size(); ++j)
        fams += (fams.empty() ? "" : ", ") + c.families[j] +
                (c.family_rate(j) >= 0 ? " (" + pct(c.family_rate(j)) + " empty)" : "");
      if (c.repeats > 1 || c.target >= 0) {
        steps += " (" + std::to_string(cur[i].schedules) + " x " + std::to_string(c.steps) + " of at most " +
                 std::to_string(c.repeats) + (c.target >= 0 ? ", bar " + pct(c.target) : "") + ")";
      }
      for (double a : cur[i].accuracies) accs += (accs.empty() ? "" : " -> ") + pct(a);
      md << "| C" << i + 1 << " | " << c.grid << "x" << c.grid
         << (c.empty_rate >= 0 ? ", " + pct(c.empty_rate) + " empty" : "") << " | " << (fams.empty() ? "all" : fams) << " | "
         << c.pool << " | " << cur[i].visual_tokens << " | " << steps << " | " << num(cur[i].seconds, "%.0f") << " s | "
         << accs << " | " << pct(cur[i].prior.overall.accuracy()) << " |\n";
    }
    md << "\n";
    std::string families;
    for (size_t i = 0; i < cur.size(); ++i)
      if (std::string line = per_family_line(cur[i].eval, cur[i].prior); !line.empty())
        families += "- C" + std::to_string(i + 1) + " per family, after its last schedule: " + line + "\n";
    if (!families.empty()) md << families << "\n";
  }
  if (o.ground_weight > 0) {
    std::vector<std::string> grounded, not_grounded;
    for (auto& r : runs)
      if (!r.training_free) (r.grounded ? grounded : not_grounded).push_back(r.name);
    md << "Grounded attention (weight " << num(o.ground_weight, "%g") << ", decoder layer " << o.ground_layer << ", "
       << o.ground_heads << (o.ground_heads == 1 ? " head" : " heads")
       << "): at every position that predicts an answer token, the supervised heads are taught to put one share of their "
          "attention on the row's first token and one on each cell the answer rests on (GridVQA's boxes: the asked cell, "
          "every cell of the asked class, the located item's cell; none for \"0\" and \"no\"), added to the loss"
       << (cur.empty() ? "" : " in every stage C step and") << " in stage 2 of "
       << (grounded.empty() ? std::string("no model") : join_names(grounded, ", "))
       << (not_grounded.empty() ? std::string("")
                                : "; not in stage 2 of " + join_names(not_grounded, ", ") +
                                      " (their visual tokens leave before that layer, or are not on the patch grid)")
       << ". Evaluation sees no boxes.\n\n";
  }
  md << "Accuracies with 95% bootstrap intervals over the " << questions.size()
     << " questions; each drop is the plain model's accuracy minus the configuration's, in points, with a paired "
        "95% bootstrap interval over the same questions (what both get right or wrong cancels). Training-free "
        "reducers run on the plain model's weights.\n\n";
  md << "| model | reducer | visual tokens | accuracy [95%] | drop, points [paired 95%] | relative drop | training time | time reduction | throughput " << key_short
     << " | ratio | throughput " << key_long << " | ratio | KV bytes ratio |\n";
  md << "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  std::vector<Interval> drops(runs.size());
  for (size_t i = 0; i < runs.size(); ++i) {
    const Trained& r = runs[i];
    const BenchResult& br = bench[i];
    double drop = plain.eval.overall.accuracy() > 0
                      ? 1.0 - r.eval.overall.accuracy() / plain.eval.overall.accuracy() : 0.0;
    if (i) {
      auto c = compare_reports(plain.eval, r.eval);
      drops[i] = c.difference;
    }
    auto ci = r.eval.interval();
    md << "| " << r.name << " | `" << r.reducer.spec() << "` | " << br.visual_tokens
       << (r.reducer.inserted_rows() ? " + " + std::to_string(r.reducer.inserted_rows()) : std::string("")) << " | "
       << pct(r.eval.overall.accuracy()) << " [" << num(100 * ci.lo, "%.1f") << ", " << num(100 * ci.hi, "%.1f") << "] | "
       << (i ? num(100 * drops[i].estimate, "%+.1f") + " [" + num(100 * drops[i].lo, "%+.1f") + ", " +
                   num(100 * drops[i].hi, "%+.1f") + "]"
             : std::string("-"))
       << " | " << (i ? (plain.eval.overall.accuracy() > 0 ? pct(drop) : std::string("n/a")) : "-") << " | "
       << (r.training_free ? std::string("training-free") : num(r.train_seconds, "%.0f") + " s") << " | "
       << (i && !r.training_free ? pct(1.0 - r.train_seconds / plain.train_seconds) : "-") << " | "
       << num(br.requests_per_second.at(key_short)) << " req/s | "
       << (i ? num(br.requests_per_second.at(key_short) / bp.requests_per_second.at(key_short)) + "x" : "-")
       << " | " << num(br.requests_per_second.at(key_long)) << " req/s | "
       << (i ? num(br.requests_per_second.at(key_long) / bp.requests_per_second.at(key_long)) + "x" : "-") << " | "
       << (i ? num(double(bp.kv_bytes) / br.kv_bytes) + "x" : "-") << " |\n";
  }
  {
    std::string counts;
    for (auto& r : runs)
      if (r.reducer_params > 0)
        counts += (counts.empty() ? "" : ", ") + r.name + " " + std::to_string(r.reducer_params);
    if (!counts.empty()) md << "\nThe reducers' own trained parameters: " << counts << ".\n";
  }
  md << "\nAnswer-prior baseline (most frequent training answer per question): **"
     << pct(prior.overall.accuracy()) << "**.\n\n";
  md << "## Accuracy per question family\n\n| model |";
  for (auto& [f, s] : plain.eval.per_family) md << " " << f << " |";
  md << "\n|---|";
  for (size_t i = 0; i < plain.eval.per_family.size(); ++i) md << "---|";
  md << "\n";
  auto family_row = [&](const std::string& name, const EvalReport& e) {
    md << "| " << name << " |";
    for (auto& [f, s] : plain.eval.per_family) {
      auto it = e.per_family.find(f);
      md << " " << (it == e.per_family.end() ? "-" : pct(it->second.accuracy())) << " |";
    }
    md << "\n";
  };
  for (auto& r : runs) family_row(r.name, r.eval);
  family_row("answer prior", prior);
  md << "\n## Paper targets (8 registers)\n\n";
  const double prior_margin = plain.eval.overall.accuracy() - prior.overall.accuracy();
  const bool plain_at_prior = prior_margin < 0.05;
  if (plain_at_prior)
    md << "**Caution:** the plain model is " << (prior_margin < 0 ? pct(-prior_margin) + " below" : "only " + pct(prior_margin) + " above")
       << " the answer prior, so it has not "
       << "learned to read the images in this budget and the accuracy comparison below says little about Victor; "
       << "the training-time and throughput figures do not depend on it. docs/benchmarks.md shows why: a language "
       << "model trained from scratch learns a lookup keyed by the question only after a long plateau; with few "
       << "visual tokens (stage C) it does, at 256 visual tokens and all four families within this budget it has not "
       << "yet, so the limit is the language model's training budget, not the images or Victor.\n\n";
  md << "A verdict is \"met\" only when the whole interval lies inside the target, \"missed\" when it lies wholly "
        "outside, else \"not resolved\". Training time and throughput come from one run each (the benchmark's "
        "medians of " << o.bench_repeats << " alternated repeats).\n\n";
  for (size_t i = 1; i < runs.size(); ++i) {
    if (runs[i].training_free || runs[i].registers != 8) continue;
    const double plain_acc = plain.eval.overall.accuracy();
    double saved = 1.0 - runs[i].train_seconds / plain.train_seconds;
    double thr = bench[i].requests_per_second.at(key_short) / bp.requests_per_second.at(key_short);
    if (o.summary_layers.size() > 1) md << runs[i].name << " (k = " << runs[i].summary_layers << "):\n\n";
    // < 4% relative = a drop of at most 0.04 x the plain accuracy, in points.
    const Interval& d = drops[i];
    md << "- relative accuracy drop < 4% (a drop of at most " << num(400 * plain_acc, "%.1f") << " points): measured "
       << num(100 * d.estimate, "%+.1f") << " points [" << num(100 * d.lo, "%+.1f") << ", " << num(100 * d.hi, "%+.1f")
       << "] — "
       << (plain_at_prior ? "not meaningful (the plain model is at the answer prior)" : verdict_at_most(d, 0.04 * plain_acc))
       << "\n";
    md << "- training time at least 43% lower: measured " << pct(saved) << " — " << (saved >= 0.43 ? "met" : "missed") << "\n";
    md << "- throughput at least 3.3x (" << key_short << "): measured " << num(thr) << "x — "
       << (thr >= 3.3 ? "met" : "missed") << "\n" << (o.summary_layers.size() > 1 ? "\n" : "");
  }
  md << "\n## Benchmark (same weights, configurations alternated, medians of " << o.bench_repeats << ")\n\n```\n"
     << bench_table(bench) << "```\n\n";
  md << "## Training\n\n| model | mean step | final loss |\n|---|---|---|\n";
  for (auto& r : runs)
    md << "| " << r.name << " | " << num(r.step_seconds, "%.3f") << " s | " << num(r.final_loss, "%.4f") << " |\n";
  std::vector<Series> acc_pts, thr_pts;  // one line per k
  for (int k : o.summary_layers) {
    acc_pts.push_back({"Victor k = " + std::to_string(k), {}});
    thr_pts.push_back({"Victor k = " + std::to_string(k), {}});
    for (size_t i = 1; i < runs.size(); ++i) {
      if (runs[i].training_free || runs[i].pool > 1 || runs[i].summary_layers != k) continue;
      acc_pts.back().second.emplace_back(runs[i].registers, 100 * runs[i].eval.overall.accuracy());
      thr_pts.back().second.emplace_back(runs[i].registers, bench[i].requests_per_second.at(key_short));
    }
  }
  bool p1 = plot(o.out, "accuracy_vs_registers", "GridVQA accuracy", "accuracy (%)", acc_pts,
                 100 * plain.eval.overall.accuracy(), "plain");
  // The frontier: every configuration's accuracy against its throughput, the plain model's accuracy
  // as the reference line (and its own point).
  std::vector<Series> frontier;
  for (size_t i = 0; i < runs.size(); ++i)
    frontier.push_back({runs[i].reducer.name(),
                        {{bench[i].requests_per_second.at(key_short), 100 * runs[i].eval.overall.accuracy()}}});
  bool p3 = plot(o.out, "accuracy_vs_throughput", "Every reducer: accuracy vs throughput (" + key_short + ")",
                 "accuracy (%)", frontier, 100 * plain.eval.overall.accuracy(), "plain accuracy", "requests/s", false);
  bool p2 = plot(o.out, "throughput_vs_registers", "Throughput (" + key_short + ")", "requests/s", thr_pts,
                 bp.requests_per_second.at(key_short), "plain");
  md << "\n## Plots\n\n";
  if (p1) md << "![accuracy](accuracy_vs_registers.png)\n";
  if (p2) md << "![throughput](throughput_vs_registers.png)\n";
  if (p3) md << "![frontier](accuracy_vs_throughput.png)\n";
  if (!p1 || !p2) md << "(gnuplot not found: plots skipped)\n";
  double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_all).count();
  md << "\nFiles: `gridvqa/` (data), `models/` (checkpoints, metrics.jsonl), `answers-*.jsonl`, `bench.json`. "
     << "Whole run: " << num(total / 60, "%.1f") << " min.\n";
  std::string report = (fs::path(o.out) / "report.md").string();
  write_file_atomic(report, md.str());
  json summary = json::array();
  for (size_t i = 0; i < runs.size(); ++i)
    summary.push_back({{"name", runs[i].name}, {"reducer", runs[i].reducer.spec()},
                       {"training_free", runs[i].training_free},
                       {"accuracy_interval", {runs[i].eval.interval().lo, runs[i].eval.interval().hi}},
                       {"drop_points_interval", {drops[i].estimate, drops[i].lo, drops[i].hi}},
                       {"registers", runs[i].registers},
                       {"summary_layers", runs[i].summary_layers}, {"accuracy", runs[i].eval.overall.accuracy()},
                       {"grounded", runs[i].grounded},
                       {"train_seconds", runs[i].train_seconds},
                       {"throughput_ratio", bench[i].requests_per_second.at(key_short) / bp.requests_per_second.at(key_short)}});
  write_file_atomic((fs::path(o.out) / "summary.json").string(),
                    json({{"runs", summary}, {"answer_prior", prior.overall.accuracy()}}).dump(2) + "\n");
  return report;
}

}  // namespace victor
