// victor data gridvqa: its options and what it runs.
#include "cli.h"

namespace victor::cli {

namespace {

// --- victor data gridvqa ---
void run_gridvqa(const GridVqaOptions& o) {
  Progress bar("gridvqa", o.train_images + o.test_images);
  auto s = build_gridvqa(o, [&](int done, int) { bar.update(done); });
  bar.finish();
  std::cout << "wrote GridVQA to " << o.out_dir << ": " << s.train_images << " train images ("
            << s.train_questions << " questions), " << s.test_images << " test images ("
            << s.test_questions << " questions), " << s.text_grids << " grids as text (text.json)\n";
}

// `--nproc N` starts its own ranks: under a launcher that already set RANK (torchrun, Slurm) it

}  // namespace

Command data_command(CLI::App& app, int, char**) {
  auto* c_data = app.add_subcommand("data", "Build datasets");
  c_data->require_subcommand(1);
  auto gq_h = std::make_shared<GridVqaOptions>();
  GridVqaOptions& gq = *gq_h;
  auto* c_grid = c_data->add_subcommand("gridvqa", "GridVQA: questions about grids of Fashion-MNIST items");
  c_grid->add_option("--out", gq.out_dir, "Output folder")->capture_default_str();
  c_grid->add_option("--source", gq.source_dir, "Fashion-MNIST folder (IDX .gz files)")->capture_default_str();
  c_grid->add_option("--grid", gq.grid, "Grid size G (G x G cells)")->check(CLI::Range(1, 8))->capture_default_str();
  c_grid->add_option("--train-images", gq.train_images, "Training images")->check(CLI::Range(0, 1000000))->capture_default_str();
  c_grid->add_option("--test-images", gq.test_images, "Test images")->check(CLI::Range(0, 1000000))->capture_default_str();
  c_grid->add_option("--questions", gq.questions_per_image, "Questions per image")->check(CLI::Range(1, 16))->capture_default_str();
  c_grid->add_option("--empty-rate", gq.empty_rate, "Probability that a cell is empty")->check(CLI::Range(0.0, 0.99))->check(kFinite)->capture_default_str();
  c_grid->add_option("--families", gq.families,
                     "Question families asked, comma-separated (identify,count,exist,locate; one family for a curriculum)")
      ->delimiter(',')
      ->capture_default_str();
  c_grid->add_option("--seed", gq.seed, "Seed")->capture_default_str();
  c_grid->add_option("--text-grids", gq.text_grids, "Grids written as text (text.json, the language model's pretraining corpus)")->check(CLI::Range(0, 10000000))->capture_default_str();
  return {c_grid, [gq_h] { run_gridvqa(*gq_h); return 0; }};
}

}  // namespace victor::cli
