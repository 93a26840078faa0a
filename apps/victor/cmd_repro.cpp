// victor repro: its options and what it runs.
#include "cli.h"

namespace victor::cli {

Command repro_command(CLI::App& app, int argc, char** argv) {
  // --quick changes the defaults, so it is read before the options bind to them: every option
  // given explicitly still wins, and --help after --quick shows the quick defaults.
  auto rp_quick_h = std::make_shared<bool>(false);
  bool& rp_quick = *rp_quick_h;
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--quick") rp_quick = true;
  auto rp_h = std::make_shared<ReproOptions>(rp_quick ? ReproOptions::quick() : ReproOptions{});
  ReproOptions& rp = *rp_h;
  auto rp_threads_h = std::make_shared<int>(default_threads());
  int& rp_threads = *rp_threads_h;
  auto* c_repro = app.add_subcommand("repro", "GridVQA -> train plain + Victor -> eval -> bench -> report");
  c_repro->add_flag("--quick", rp_quick, "About 10 minutes on 2 cores (smaller data, fewer steps)");
  // Every ReproOptions field a flag, from the one table (src/repro/options.cpp).
  auto curriculum_h = std::make_shared<std::optional<std::string>>();
  for (const ReproOption& row : repro_options()) {
    CLI::Option* opt = std::visit(
        [&](auto field) -> CLI::Option* {
          using T = std::decay_t<decltype(rp.*field)>;
          if constexpr (std::is_same_v<T, std::vector<CurriculumStage>>) {
            return c_repro->add_option_function<std::string>(row.flag, [curriculum_h](const std::string& v) { *curriculum_h = v; },
                                                              row.help)
                ->default_str(format_curriculum(rp.*field));
          } else {
            CLI::Option* o = c_repro->add_option(row.flag, rp.*field, row.help);
            if constexpr (std::is_same_v<T, std::vector<int>>) o->delimiter(',');
            // Integers checked as integers (so --help reads "INT in [1 - 1024]").
            if constexpr (std::is_same_v<T, double>) {
              if (row.lo < row.hi) o->check(CLI::Range(row.lo, row.hi));
            } else if (row.lo < row.hi) {
              o->check(CLI::Range(int64_t(row.lo), int64_t(row.hi)));
            }
            return o;
          }
        },
        row.field);
    if (row.positive) opt->check(CLI::PositiveNumber);
    if (std::holds_alternative<double ReproOptions::*>(row.field)) opt->check(kFinite);
    if (!row.choices.empty()) opt->check(CLI::IsMember(row.choices));
    if (!std::holds_alternative<std::vector<CurriculumStage> ReproOptions::*>(row.field)) opt->capture_default_str();
  }
  c_repro->add_option("--threads", rp_threads, "CPU threads (per rank with --nproc)")->check(CLI::Range(1, 1024));
  auto rp_nproc_h = std::make_shared<int>(1);
  int& rp_nproc = *rp_nproc_h;
  add_distributed_options(c_repro, rp_nproc, rp.dist_timeout_seconds,
                          "Data-parallel workers for the training stages (c10d/Gloo, as train --nproc): each takes a "
                          "share of the same global batches, so the recipe does not change; rank 0 builds the data, "
                          "evaluates and benchmarks. Across machines set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT");
  return {c_repro, [=]() -> int {
    if (auto launched = launch_workers_if_asked(argc, argv, *rp_nproc_h, c_repro->count("--threads") > 0)) return *launched;
    set_threads(*rp_threads_h);
    ReproOptions o = *rp_h;
    if (*curriculum_h) o.curriculum = parse_curriculum(**curriculum_h);
    o.progress = isatty(2);
    std::string report = run_repro(o);
    if (!report.empty()) std::cout << "report: " << report << "\n";  // rank 0's
    return 0;
  }};
}

}  // namespace victor::cli
