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
  c_grid->add_flag("--scattered", gq.scattered,
                   "GridVQA-HR, for LLaVA-NeXT: items of random sizes at random points of their cells (off the patch grid, "
                   "some across crop boundaries) on canvases of several shapes; questions name the cell an item's centre is in");
  c_grid->add_option_function<std::vector<std::string>>(
            "--canvases",
            [&gq](const std::vector<std::string>& v) {
              gq.canvases.clear();
              for (const auto& s : v) {
                int r = 0, c = 0;
                char tail = 0;
                if (std::sscanf(s.c_str(), "%dx%d%c", &r, &c, &tail) != 2)
                  throw CLI::ValidationError("--canvases", "'" + s + "' is not ROWSxCOLS (e.g. 2x4)");
                gq.canvases.push_back({r, c});
              }
            },
            "With --scattered: canvas shapes in cells, ROWSxCOLS comma-separated, one drawn per image (default "
            "4x4,2x4,4x2,2x6,6x2)")
      ->delimiter(',');
  c_grid->add_option("--cell-pixels", gq.cell_pixels, "With --scattered: a cell's side in pixels")
      ->check(CLI::Range(8, 448))
      ->capture_default_str();
  c_grid->add_option_function<std::string>(
            "--item-pixels",
            [&gq](const std::string& s) {
              int lo = 0, hi = 0;
              char tail = 0;
              if (std::sscanf(s.c_str(), "%d-%d%c", &lo, &hi, &tail) != 2)
                throw CLI::ValidationError("--item-pixels", "'" + s + "' is not MIN-MAX (e.g. 14-40)");
              gq.item_min = lo;
              gq.item_max = hi;
            },
            "With --scattered: an item's side in pixels, MIN-MAX, drawn uniformly (default 14-40)");
  c_grid->add_option("--seed", gq.seed, "Seed")->capture_default_str();
  c_grid->add_option("--text-grids", gq.text_grids, "Grids written as text (text.json, the language model's pretraining corpus)")->check(CLI::Range(0, 10000000))->capture_default_str();
  return {c_grid, [gq_h, c_grid] {
            const GridVqaOptions& o = *gq_h;
            if (!o.scattered)
              for (const char* f : {"--canvases", "--cell-pixels", "--item-pixels"})
                if (c_grid->count(f) > 0) throw Error(std::string(f) + " applies to the scattered layout: add --scattered");
            if (o.scattered && c_grid->count("--grid") > 0)
              throw Error("--grid sets the aligned layout's size; with --scattered the canvases are set by --canvases");
            run_gridvqa(o);
            return 0;
          }};
}

}  // namespace victor::cli
