// `victor repro`'s report: formats a Results struct as report.md (with gnuplot's plots where
// gnuplot is installed) and summary.json. No training or measuring happens here.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "repro/internal.h"
#include "victor/blas.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/process.h"
#include "victor/stats.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace victor::repro {

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
std::string num(double x, const char* fmt) {
  char b[32];
  std::snprintf(b, sizeof b, fmt, x);
  return b;
}

// Each interleaved timing round's time reduction of `r` against the plain model (same round).
std::vector<double> time_reductions(const Trained& plain, const Trained& r) {
  std::vector<double> out;
  for (size_t k = 0; k < std::min(plain.timing_step_seconds.size(), r.timing_step_seconds.size()); ++k)
    if (plain.timing_step_seconds[k] > 0) out.push_back(1.0 - r.timing_step_seconds[k] / plain.timing_step_seconds[k]);
  return out;
}

// Each benchmark repeat's requests/s ratio of `r` to the plain model at `key` (alternated repeats).
std::vector<double> throughput_ratios(const BenchResult& plain, const BenchResult& r, const std::string& key) {
  std::vector<double> out;
  auto a = r.requests_per_second_runs.find(key), b = plain.requests_per_second_runs.find(key);
  if (a == r.requests_per_second_runs.end() || b == plain.requests_per_second_runs.end()) return out;
  for (size_t k = 0; k < std::min(a->second.size(), b->second.size()); ++k)
    if (b->second[k] > 0) out.push_back(a->second[k] / b->second[k]);
  return out;
}

namespace {

// A string as a gnuplot single-quoted literal: '' stands for a quote; control characters and
// backquotes (gnuplot's command substitution) are dropped.
std::string gp_quote(const std::string& s) {
  std::string r = "'";
  for (char c : s) {
    if (c == '\'') r += "''";
    else if (c != '`' && static_cast<unsigned char>(c) >= 0x20) r += c;
  }
  return r + "'";
}

// Plots with gnuplot (Debian's gnuplot-nox) when present; returns false when it is not.
// One line per series (label, points), gnuplot's data blocks separated by two blank lines.
// gnuplot runs without a shell, on files in a private temporary folder, so no path of the user's
// reaches its command line or its script; the PNG is renamed into place when complete.
using Series = std::pair<std::string, std::vector<std::pair<double, double>>>;
bool plot(const std::string& dir, const std::string& name, const std::string& title, const std::string& ylabel,
          const std::vector<Series>& series, double baseline, const std::string& baseline_label,
          const std::string& xlabel = "registers m", bool log_x = true) {
  if (series.empty() || !program_on_path("gnuplot")) return false;
  std::string tmpl = (fs::temp_directory_path() / "victor-plot-XXXXXX").string();
  if (!mkdtemp(tmpl.data())) return false;
  const fs::path work(tmpl);
  std::ostringstream data;
  for (auto& [label, points] : series) {
    for (auto& [x, y] : points) data << x << " " << y << "\n";
    data << "\n\n";
  }
  std::ofstream(work / "data.dat") << data.str();
  std::string lines;
  for (size_t i = 0; i < series.size(); ++i)
    lines += "'data.dat' index " + std::to_string(i) + " using 1:2 with linespoints lw 2 pt 7 title " +
             gp_quote(series[i].first) + ", ";
  // noenhanced: labels such as "b16_g2" are text, not subscripts; the key goes below the plot so
  // the data keeps the canvas.
  std::ostringstream script;
  script << "set terminal png size 720,480 noenhanced\nset output 'plot.png'\nset title " << gp_quote(title)
         << "\nset xlabel " << gp_quote(xlabel) << "\nset ylabel " << gp_quote(ylabel)
         << "\nset grid\nset key below\n" << (log_x ? "set logscale x 2\nset xrange [0.5:*]\n" : "") << "plot "
         << lines << baseline << " with lines dt 2 lw 2 title " << gp_quote(baseline_label) << "\n";
  std::ofstream(work / "plot.gp") << script.str();
  // gnuplot reads relative names from its working folder: give it the script on stdin after a cd.
  std::ofstream(work / "main.gp") << "cd " << gp_quote(work.string()) << "\nload 'plot.gp'\n";
  bool ok = run_program({"gnuplot"}, (work / "main.gp").string()) == 0 && fs::exists(work / "plot.png");
  std::error_code ec;
  if (ok) {
    std::ostringstream png;
    png << std::ifstream(work / "plot.png", std::ios::binary).rdbuf();
    write_file_atomic((fs::path(dir) / (name + ".png")).string(), png.str());
  }
  fs::remove_all(work, ec);  // our own mkdtemp folder
  return ok;
}

}  // namespace

namespace {

// The report's sections. Each writer is a member, so every section reads the same named views
// (the options, the results, the plain model and its benchmark, the two throughput keys, the
// paired drops against the plain model) without restating them.
class Report {
 public:
  Report(const ReproOptions& options, const Results& results);
  void setup(std::ostringstream& md) const;         // the setting; shared stages 0 and L
  void curriculum(std::ostringstream& md) const;    // stage C
  void grounding(std::ostringstream& md) const;     // which models trained with grounded attention
  void main_table(std::ostringstream& md) const;    // accuracy, drop, time, throughput, KV per model
  void families(std::ostringstream& md) const;      // accuracy per question family
  void verdicts(std::ostringstream& md) const;      // the paper's targets for the 8-register models
  void training(std::ostringstream& md) const;      // benchmark table, training steps, timing rounds
  void plots(std::ostringstream& md) const;         // gnuplot's plots and their links
  void summary() const;                             // summary.json

 private:
  const ReproOptions& o;
  const Results& res;
  const std::vector<Trained>& runs;      // runs[0] is the plain model
  const std::vector<BenchResult>& bench; // one per run, same order
  const EvalReport& prior;               // the answer prior
  const Trained& plain;
  const BenchResult& bp;                 // the plain model's benchmark
  std::string key_short, key_long;       // "b16_g2", "b16_g128"
  std::vector<Interval> drops;           // per run: plain minus it, paired (runs[0]: none)
  bool plain_at_prior = false;
};

Report::Report(const ReproOptions& options, const Results& results)
    : o(options), res(results), runs(results.runs), bench(results.bench), prior(results.prior),
      plain(results.runs.front()), bp(results.bench.front()),
      key_short("b" + std::to_string(options.bench_batch) + "_g" + std::to_string(options.bench_gen.front())),
      key_long("b" + std::to_string(options.bench_batch) + "_g" + std::to_string(options.bench_gen.back())) {
  drops.resize(runs.size());
  for (size_t i = 1; i < runs.size(); ++i) drops[i] = compare_reports(plain.eval, runs[i].eval).difference;
  plain_at_prior = plain.eval.overall.accuracy() - prior.overall.accuracy() < 0.05;
}

// The run's setting and the shared stages 0 and L.
void Report::setup(std::ostringstream& md) const {
  const auto& vrep = res.vision;
  const auto& lrep = res.text;
  const int world = res.world;
  const auto parts = parse_parts(o.train_parts);
  const bool vision_frozen = std::find(parts.begin(), parts.end(), Part::Vision) == parts.end();
  const std::string blas_kernels = blas_core_name().empty() ? "not OpenBLAS" : blas_core_name();
  md << "# Victor on GridVQA: reproduction report\n\n";
  md << "Preset `" << o.preset << "` trained from random weights (" << o.steps << " steps of " << o.batch_size
     << " conversations, lr " << o.lr << ", trained: `" << o.train_parts << "`"
     << (vision_frozen ? "; the frozen vision tower's features computed once per image" : "") << "), "
     << res.visual_tokens
     << " visual tokens per image, " << res.layers << " decoder layers, Victor k = "
     << join(o.summary_layers, ", ") << " (" << o.register_mask << " mask). GridVQA: " << o.train_images << " train images ("
     << res.conversations << " conversations), " << res.questions << " test questions from "
     << o.test_images << " test images (Fashion-MNIST test split only). Threads: " << res.threads
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
}

// Stage C: its stages, their schedules and accuracies.
void Report::curriculum(std::ostringstream& md) const {
  const auto& cur = res.curriculum;
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
}

// Which models trained with grounded attention.
void Report::grounding(std::ostringstream& md) const {
  const auto& cur = res.curriculum;
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
}

// The comparison: accuracy, paired drop, training time, throughput and KV per model.
void Report::main_table(std::ostringstream& md) const {
  md << "Accuracies with 95% bootstrap intervals over the " << res.questions
     << " questions; each drop is the plain model's accuracy minus the configuration's, in points, with a paired "
        "95% bootstrap interval over the same questions (what both get right or wrong cancels). Training-free "
        "reducers run on the plain model's weights.\n\n";
  md << "| model | reducer | visual tokens | accuracy [95%] | drop, points [paired 95%] | relative drop | training time | time reduction | throughput " << key_short
     << " | ratio | throughput " << key_long << " | ratio | KV bytes ratio |\n";
  md << "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    const Trained& r = runs[i];
    const BenchResult& br = bench[i];
    double drop = plain.eval.overall.accuracy() > 0
                      ? 1.0 - r.eval.overall.accuracy() / plain.eval.overall.accuracy() : 0.0;
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
}

// Accuracy per question family.
void Report::families(std::ostringstream& md) const {
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
}

// The paper's targets for the 8-register models, each a verdict on its interval or range.
void Report::verdicts(std::ostringstream& md) const {
  md << "\n## Paper targets (8 registers)\n\n";
  const double prior_margin = plain.eval.overall.accuracy() - prior.overall.accuracy();
  if (plain_at_prior)
    md << "**Caution:** the plain model is " << (prior_margin < 0 ? pct(-prior_margin) + " below" : "only " + pct(prior_margin) + " above")
       << " the answer prior, so it has not "
       << "learned to read the images in this budget and the accuracy comparison below says little about Victor; "
       << "the training-time and throughput figures do not depend on it. The lab notes (`git show f64a969:docs/notebook.md`) show why: a language "
       << "model trained from scratch learns a lookup keyed by the question only after a long plateau; with few "
       << "visual tokens (stage C) it does, at 256 visual tokens and all four families within this budget it has not "
       << "yet, so the limit is the language model's training budget, not the images or Victor.\n\n";
  md << "A verdict is \"met\" only when the whole interval lies inside the target, \"missed\" when it lies wholly "
        "outside, else \"not resolved\". Accuracy drops carry their paired bootstrap interval; a time reduction "
        "the range of the full run and "
     << o.timing_rounds << " interleaved timing rounds (below); a throughput ratio the range of the benchmark's "
     << o.bench_repeats << " alternated repeats (each repeat's ratio measured side by side).\n\n";
  for (size_t i = 1; i < runs.size(); ++i) {
    const VictorParams* v = runs[i].reducer.victor_params();
    if (runs[i].training_free || !v || v->registers != 8) continue;
    const double plain_acc = plain.eval.overall.accuracy();
    double saved = 1.0 - runs[i].train_seconds / plain.train_seconds;
    double thr = bench[i].requests_per_second.at(key_short) / bp.requests_per_second.at(key_short);
    if (o.summary_layers.size() > 1) md << runs[i].name << " (k = " << runs[i].drop_layer << "):\n\n";
    // < 4% relative = a drop of at most 0.04 x the plain accuracy, in points.
    const Interval& d = drops[i];
    md << "- relative accuracy drop < 4% (a drop of at most " << num(4 * plain_acc, "%.2f") << " points): measured "
       << num(100 * d.estimate, "%+.1f") << " points [" << num(100 * d.lo, "%+.1f") << ", " << num(100 * d.hi, "%+.1f")
       << "] — "
       << (plain_at_prior ? "not meaningful (the plain model is at the answer prior)" : verdict_at_most(d, 0.04 * plain_acc))
       << "\n";
    const Interval saved_range = range_of(saved, time_reductions(plain, runs[i]));
    const Interval thr_range = range_of(thr, throughput_ratios(bp, bench[i], key_short));
    md << "- training time at least 43% lower: measured " << pct(saved) << " [" << pct(saved_range.lo) << ", "
       << pct(saved_range.hi) << "] — " << verdict_at_least(saved_range, 0.43) << "\n";
    md << "- throughput at least 3.3x (" << key_short << "): measured " << num(thr) << "x [" << num(thr_range.lo)
       << "x, " << num(thr_range.hi) << "x] — " << verdict_at_least(thr_range, 3.3) << "\n"
       << (o.summary_layers.size() > 1 ? "\n" : "");
  }
}

// The benchmark table, the training steps and the interleaved timing rounds.
void Report::training(std::ostringstream& md) const {
  md << "\n## Benchmark (same weights, configurations alternated, medians of " << o.bench_repeats << ")\n\n```\n"
     << bench_table(bench) << "```\n\n";
  md << "## Training\n\n| model | mean step | final loss |\n|---|---|---|\n";
  for (auto& r : runs)
    if (!r.training_free)
      md << "| " << r.name << " | " << num(r.step_seconds, "%.3f") << " s | " << num(r.final_loss, "%.4f") << " |\n";
  if (!plain.timing_step_seconds.empty()) {
    md << "\nTraining time measured again in " << plain.timing_step_seconds.size()
       << " interleaved rounds after stage 2 (each round: every trained model for " << o.timing_segment_steps()
       << " stage-2 steps from the shared start after one warm-up step, the order reversed each round, the full run's share of first-seen "
          "images). Mean step per round, and the time reduction against the plain model in the same round:\n\n"
       << "| model | full run: step, reduction | each round: step (reduction) |\n|---|---|---|\n";
    for (auto& r : runs) {
      if (r.training_free) continue;
      const bool is_plain = &r == &plain;
      md << "| " << r.name << " | " << num(r.step_seconds, "%.3f") << " s, "
         << (is_plain ? std::string("-") : pct(1.0 - r.train_seconds / plain.train_seconds)) << " | ";
      auto red = time_reductions(plain, r);
      for (size_t k = 0; k < r.timing_step_seconds.size(); ++k)
        md << (k ? ", " : "") << num(r.timing_step_seconds[k], "%.3f") << " s"
           << (is_plain || k >= red.size() ? std::string("") : " (" + pct(red[k]) + ")");
      md << " |\n";
    }
  }
}

// The plots (gnuplot), and their links.
void Report::plots(std::ostringstream& md) const {
  std::vector<Series> acc_pts, thr_pts;  // one line per k
  for (int k : o.summary_layers) {
    acc_pts.push_back({"Victor k = " + std::to_string(k), {}});
    thr_pts.push_back({"Victor k = " + std::to_string(k), {}});
    for (size_t i = 1; i < runs.size(); ++i) {
      const VictorParams* v = runs[i].reducer.victor_params();
      if (runs[i].training_free || !v || v->summary_layers != k) continue;
      acc_pts.back().second.emplace_back(v->registers, 100 * runs[i].eval.overall.accuracy());
      thr_pts.back().second.emplace_back(v->registers, bench[i].requests_per_second.at(key_short));
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
}

// summary.json: every run's figures, machine-readable.
void Report::summary() const {
  json summary = json::array();
  for (size_t i = 0; i < runs.size(); ++i)
    summary.push_back({{"name", runs[i].name}, {"reducer", runs[i].reducer.spec()},
                       {"training_free", runs[i].training_free},
                       {"accuracy_interval", {runs[i].eval.interval().lo, runs[i].eval.interval().hi}},
                       {"drop_points_interval", {drops[i].estimate, drops[i].lo, drops[i].hi}},
                       {"registers", runs[i].reducer.victor_params() ? runs[i].reducer.victor_params()->registers : 0},
                       {"summary_layers", runs[i].drop_layer}, {"accuracy", runs[i].eval.overall.accuracy()},
                       {"grounded", runs[i].grounded},
                       {"train_seconds", runs[i].train_seconds},
                       {"timing_step_seconds", runs[i].timing_step_seconds},
                       {"time_reduction_rounds", time_reductions(runs.front(), runs[i])},
                       {"throughput_ratio", bench[i].requests_per_second.at(key_short) / bp.requests_per_second.at(key_short)},
                       {"throughput_ratio_repeats", throughput_ratios(bp, bench[i], key_short)}});
  write_file_atomic((fs::path(o.out) / "summary.json").string(),
                    json({{"runs", summary}, {"answer_prior", prior.overall.accuracy()}}).dump(2) + "\n");
}

}  // namespace

std::string write_report(const ReproOptions& o, const Results& res) {
  const Report report(o, res);
  std::ostringstream md;
  report.setup(md);
  report.curriculum(md);
  report.grounding(md);
  report.main_table(md);
  report.families(md);
  report.verdicts(md);
  report.training(md);
  report.plots(md);
  md << "\nFiles: `gridvqa/` (data), `models/` (checkpoints, metrics.jsonl), `answers-*.jsonl`, `bench.json`. "
     << "Whole run: " << num(res.seconds / 60, "%.1f") << " min.\n";
  const std::string path = (fs::path(o.out) / "report.md").string();
  write_file_atomic(path, md.str());
  report.summary();
  return path;
}

}  // namespace victor::repro
