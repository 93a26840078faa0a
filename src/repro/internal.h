// The reproduction's pieces (src/repro/): what the stages produce, the context every stage runs
// in (one rank's view under --nproc), the stages, and the report that only formats results.
// run_repro (repro.cpp) is the short orchestrator over these.
#pragma once
#include <string>
#include <vector>

#include "victor/bench.h"
#include "victor/gridvqa.h"
#include "victor/eval.h"
#include "victor/reducer.h"
#include "victor/repro.h"
#include "victor/tokenizer.h"
#include "victor/train.h"

namespace victor::repro {

struct CurriculumResult {
  CurriculumStage stage;
  double seconds = 0;                  // training, every schedule
  int steps = 0, schedules = 0;
  std::vector<double> accuracies;      // after each schedule
  EvalReport eval, prior;              // after the last one
  int visual_tokens = 0;
};

// One model of the comparison: trained from the shared start with its reducer, or the trained
// plain model's weights with a training-free reducer.
struct Trained {
  std::string name, dir;
  Reducer reducer;
  bool training_free = false;  // the plain model's weights with a training-free reducer
  int64_t reducer_params = 0;  // the reducer's own parameters (registers, the resampler's block)
  int drop_layer = 0;  // the first decoder layer without visual rows (set when the model is built)
  bool grounded = false;  // stage 2 with grounded attention
  double train_seconds = 0, step_seconds = 0, final_loss = 0;
  std::vector<double> timing_step_seconds;  // mean stage-2 step of each interleaved timing round
  EvalReport eval;
};

// Everything the report shows; the stages fill it, write_report only formats it.
struct Results {
  VisionPretrainReport vision;                // stage 0 (steps 0 when skipped)
  TrainReport text;                           // stage L
  std::vector<CurriculumResult> curriculum;   // stage C
  std::vector<Trained> runs;                  // runs[0] is the plain model
  std::vector<BenchResult> bench;             // one per run, same order
  EvalReport prior;                           // the answer prior on the test questions
  size_t conversations = 0, questions = 0;
  int visual_tokens = 0, layers = 0;          // of the benchmarked (plain) model
  int world = 1, threads = 1;
  double seconds = 0;                         // the whole run so far
};

// One rank's view of the run. Under --nproc every rank runs every stage; rank 0 (`lead`) alone
// speaks, builds data, runs stage 0, saves the shared start, evaluates and benchmarks.
struct Context {
  const ReproOptions& o;
  Communicator* comm = nullptr;
  int world = 1;
  bool lead = true;
  std::string data, init_dir;  // the main GridVQA set; the shared start's folder
  void sync() const;                       // a barrier (no-op with one process)
  bool agree(bool decision) const;         // rank 0's decision, on every rank
  int per_rank(int global_batch, const std::string& what) const;  // a rank's share; throws if uneven
};

// A rank's share of a global batch; throws an Error naming `what` when the ranks cannot share it.
int rank_share(int global_batch, int world, const std::string& what);

// The main GridVQA set, as loaded on every rank.
struct MainData {
  GridVqaOptions options;
  std::vector<Conversation> convs, describe;
  std::vector<EvalQuestion> questions;
};

// Progress lines on stderr ("repro: ..."), rank 0's only.
void set_quiet(bool quiet);
void say(const std::string& s);

// options.cpp: every option checked before any work; the default training-free reducers.
void check_options(const ReproOptions& o, int world);
std::vector<Reducer> training_free_reducers(const ReproOptions& o, const ModelConfig& preset);
std::string slug(const std::string& name);  // "fastv k=2 keep=0.25" -> "fastv-k2-keep0.25"
std::string whole_percent(double fraction);  // 0.75 -> "75"

// stages.cpp, in the order run_repro calls them.
MainData build_main_data(const Context& c);
void make_initial_model(const Context& c);
VisionPretrainReport stage0_vision(const Context& c, const GridVqaOptions& main_set);
TrainReport stage_l_text(const Context& c, const Tokenizer& tok);
std::vector<CurriculumResult> stage_c_curriculum(const Context& c, const Tokenizer& tok);
std::vector<Trained> plan_runs(const ReproOptions& o);
void train_and_evaluate(const Context& c, const Tokenizer& tok, const MainData& d, std::vector<Trained>& runs);
void time_training(const Context& c, const Tokenizer& tok, const MainData& d, std::vector<Trained>& runs);
std::vector<BenchResult> benchmark(const Context& c, const std::vector<Trained>& runs, Results& r);

// report.cpp: report.md (+ plots with gnuplot) and summary.json; returns report.md's path.
std::string write_report(const ReproOptions& o, const Results& r);

// Formatting shared by the stages' progress lines and the report.
std::string pct(double x);
std::vector<double> time_reductions(const Trained& plain, const Trained& r);
std::vector<double> throughput_ratios(const BenchResult& plain, const BenchResult& r, const std::string& key);
std::string per_family_line(const EvalReport& e, const EvalReport& prior);
std::string join(const std::vector<int>& xs, const std::string& sep);
std::string join_names(const std::vector<std::string>& xs, const std::string& sep);
std::string num(double x, const char* fmt = "%.2f");

}  // namespace victor::repro
