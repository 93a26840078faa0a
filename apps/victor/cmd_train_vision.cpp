// victor train-vision: its options and what it runs.
#include "cli.h"

namespace victor::cli {

namespace {

// --- victor train-vision ---
struct VisionArgs {
  std::string model, data, out;
  VisionPretrainOptions opt;
  std::string targets = "cell";
  int threads = default_threads(), limit = 0;
  bool overwrite = false;
};

void run_train_vision(const VisionArgs& a) {
  set_threads(a.threads);
  VisionPretrainOptions opt = a.opt;
  opt.per_patch = a.targets == "patch";
  opt.progress = isatty(2);
  if (same_path(a.model, a.out))
    throw Error("train-vision: --out must differ from --model (the starting checkpoint stays intact)");
  refuse_existing_model(a.out, a.overwrite, "--out");
  Vlm model = Vlm::load(a.model);
  auto train = load_grid_images(a.data, "train", model.config(), a.limit);
  auto test = load_grid_images(a.data, "t10k", model.config());
  auto r = pretrain_vision(model, train, test, opt);
  ModelFolderWrite write(a.out);
  model.save(a.out);
  copy_tokenizer_files(a.model, a.out);
  write.commit();
  std::cout << "vision tower pretrained: " << r.steps << " steps in " << r.seconds << " s, final loss "
            << r.final_loss << ", test cell accuracy " << 100 * r.test_cell_accuracy << "%, position accuracy "
            << 100 * r.test_position_accuracy << "%, single patch " << 100 * r.test_patch_accuracy << "%";
  if (opt.counts)
    std::cout << ", class counts exact " << 100 * r.test_count_patch_accuracy << "% from one patch, "
              << 100 * r.test_count_mean_accuracy << "% from the mean";
  std::cout << "\nmodel written to "
            << a.out << "\n";
}

}  // namespace

Command train_vision_command(CLI::App& app, int, char**) {
  auto va_h = std::make_shared<VisionArgs>();
  VisionArgs& va = *va_h;
  auto* c_tv = app.add_subcommand("train-vision", "Pretrain the vision tower on GridVQA's cell classes (recipe stage 0)");
  c_tv->add_option("--model", va.model, "Starting checkpoint")->required();
  c_tv->add_option("--data", va.data, "GridVQA folder (grids.jsonl, images/)")->required()->check(CLI::ExistingDirectory);
  c_tv->add_option("--out", va.out, "Output model folder")->required();
  c_tv->add_option("--steps", va.opt.steps, "Steps")->check(CLI::Range(1, 10000000))->capture_default_str();
  c_tv->add_option("--batch-size", va.opt.batch_size, "Images per step")->check(CLI::Range(1, 4096))->capture_default_str();
  c_tv->add_option("--lr", va.opt.lr, "Peak learning rate")->check(CLI::PositiveNumber)->check(kFinite)->capture_default_str();
  c_tv->add_option("--targets", va.targets, "cell (each cell's mean patch names its class and place) or patch (every patch does)")
      ->check(CLI::IsMember({"cell", "patch"}))
      ->capture_default_str();
  c_tv->add_option("--counts", va.opt.counts, "Also teach how many cells hold each class (true/false)")->capture_default_str();
  c_tv->add_option("--limit", va.limit, "Use only the first N training grids")->check(CLI::Range(0, 10000000));
  c_tv->add_option("--seed", va.opt.seed, "Seed");
  add_overwrite_flag(c_tv, va.overwrite);
  c_tv->add_option("--threads", va.threads, "CPU threads")->check(CLI::Range(1, 1024));
  return {c_tv, [va_h] { run_train_vision(*va_h); return 0; }};
}

}  // namespace victor::cli
