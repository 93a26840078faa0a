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
  c_repro->add_flag("--quick", rp_quick, "About 5 minutes on 2 cores (smaller data, fewer steps)");
  c_repro->add_option("--out", rp.out, "Output folder (default runs/repro, or runs/repro-quick)");
  c_repro->add_option("--preset", rp.preset, "Model shape trained from scratch")->check(CLI::IsMember({"tiny", "small"}));
  c_repro->add_option("--registers", rp.registers, "Victor register counts to train (comma list)")->delimiter(',')->check(CLI::Range(0, 1024));
  c_repro->add_option("--summary-layers", rp.summary_layers, "Victor k values to train (comma list; every m with every k)")->delimiter(',')->check(CLI::Range(0, 64));
  c_repro->add_option("--training-free", rp.training_free,
                      "Training-free reducers run on the trained plain model (repeat; 'none' for none; default: "
                      "FastV k=2 and VisionZip at the pooling baseline's visual-token budget)");
  c_repro->add_option("--register-mask", rp.register_mask, "causal | registers_only")->check(CLI::IsMember({"causal", "registers_only"}));
  c_repro->add_option("--train-images", rp.train_images, "GridVQA training images")->check(CLI::Range(1, 1000000));
  c_repro->add_option("--test-images", rp.test_images, "GridVQA test images")->check(CLI::Range(1, 100000));
  c_repro->add_option("--steps", rp.steps, "Stage 2 steps per model: questions (identical budgets)")->check(CLI::Range(1, 10000000));
  c_repro->add_option("--pretrain-steps", rp.pretrain_steps, "Stage 1 steps: row-by-row descriptions (0 = skip)")->check(CLI::Range(0, 10000000));
  c_repro->add_option("--pool", rp.pools, "Average-pooling baselines to train (e.g. 4; 1 = none)")->delimiter(',')->check(CLI::Range(1, 64));
  c_repro->add_option("--resampler", rp.resamplers, "Perceiver-style resamplers to train, by latent count (e.g. 16; 0 = none)")
      ->delimiter(',')
      ->check(CLI::Range(0, 4096));
  c_repro->add_option("--vision-steps", rp.vision_steps, "Stage 0 steps: vision tower on cell classes (0 = skip)")->check(CLI::Range(0, 10000000));
  c_repro->add_option("--vision-images", rp.vision_images,
                      "Stage 0's own GridVQA training images (0 = the main training set)")
      ->check(CLI::Range(0, 1000000))
      ->capture_default_str();
  c_repro->add_option("--vision-targets", rp.vision_targets,
                      "Stage 0 targets: cell (each cell's mean patch names its class and place) or patch (every patch does)")
      ->check(CLI::IsMember({"cell", "patch"}))
      ->capture_default_str();
  c_repro->add_option("--vision-counts", rp.vision_counts,
                      "Stage 0 also teaches how many cells hold each class, the image's summary (true/false)")
      ->capture_default_str();
  c_repro->add_option("--text-steps", rp.text_steps, "Stage L steps: the language model on grids written as text, shared (0 = skip)")->check(CLI::Range(0, 10000000));
  c_repro->add_option("--text-lr", rp.text_lr, "Stage L peak learning rate")->check(CLI::PositiveNumber)->check(kFinite);
  auto rp_curriculum_h = std::make_shared<std::string>(format_curriculum(rp.curriculum));
  std::string& rp_curriculum = *rp_curriculum_h;
  c_repro->add_option("--curriculum", rp_curriculum,
                      "Stage C, shared: GRID:FAMILIES:POOL:STEPS[xREPEATS][@TARGET][:EMPTY] stages, comma-separated (FAMILIES = "
                      "all or e.g. count+exist; POOL pools the visual tokens; xREPEATS@TARGET repeats the STEPS schedule "
                      "up to REPEATS times until the stage's test accuracy reaches TARGET percent; EMPTY = percent of "
                      "empty cells, default 30; a family written NAME/EMPTY, e.g. identify+exist/75, is asked on its own "
                      "grids with that share of empty cells, its own GridVQA set mixed into the stage's); none = skip")
      ->capture_default_str();
  c_repro->add_option("--curriculum-images", rp.curriculum_images, "Stage C training images per stage")->check(CLI::Range(1, 1000000))->capture_default_str();
  c_repro->add_option("--curriculum-lr", rp.curriculum_lr, "Stage C peak learning rate")->check(CLI::PositiveNumber)->check(kFinite)->capture_default_str();
  c_repro->add_option("--curriculum-shuffle", rp.curriculum_shuffle,
                      "Stage C: each image's visual tokens in a random order every step (true/false)")
      ->capture_default_str();
  c_repro->add_option("--curriculum-single-turn", rp.curriculum_single_turn,
                      "Stage C: pooled stages train one question per sample, the same answers per step (true/false)")
      ->capture_default_str();
  c_repro->add_option("--ground-weight", rp.ground_weight,
                      "Grounded attention in stages C and 2: weight of the loss that teaches heads of --ground-layer to "
                      "look at the cells each answer rests on (0 = off); stage 2 grounds only models whose k > layer")
      ->check(CLI::Range(0.0, 1e3))->check(kFinite)
      ->capture_default_str();
  c_repro->add_option("--ground-layer", rp.ground_layer, "Grounded attention: the decoder layer (0-based)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  c_repro->add_option("--ground-heads", rp.ground_heads, "Grounded attention: how many heads (the first ones)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  c_repro->add_option("--curriculum-summary-layers", rp.curriculum_summary_layers,
                      "Stage C: drop the visual tokens after this layer (no registers), so lookups are learned "
                      "where Victor twins with k >= K still see them; -1 = every layer")
      ->check(CLI::Range(-1, 1024))
      ->capture_default_str();
  c_repro->add_option("--train", rp.train_parts, "Parts trained in stages 1-2 (finetune = projector + registers + llm, vision frozen)");
  c_repro->add_option("--batch-size", rp.batch_size, "Conversations per step")->check(CLI::Range(1, 1024));
  c_repro->add_option("--lr", rp.lr, "Peak learning rate")->check(CLI::PositiveNumber)->check(kFinite);
  c_repro->add_option("--bench-repeats", rp.bench_repeats, "Benchmark repeats")->check(CLI::Range(1, 100));
  c_repro->add_option("--timing-rounds", rp.timing_rounds,
                      "Training time measured again: rounds of interleaved stage-2 segments, every trained model "
                      "in each, giving each time reduction a range (0 = off)")
      ->check(CLI::Range(0, 100));
  c_repro->add_option("--timing-steps", rp.timing_steps, "Stage-2 steps per model in each timing round (at most --steps)")
      ->check(CLI::Range(2, 10000000));
  c_repro->add_option("--bench-batch", rp.bench_batch, "Large batch for throughput (paper: 16)")->check(CLI::Range(1, 256));
  c_repro->add_option("--bench-gen", rp.bench_gen, "Generated tokens (paper: 2,128)")->delimiter(',')->check(CLI::Range(1, 4096));
  c_repro->add_option("--eval-limit", rp.eval_limit, "Evaluate only the first N test questions")->check(CLI::Range(0, 10000000));
  c_repro->add_option("--seed", rp.seed, "Seed");
  c_repro->add_option("--threads", rp_threads, "CPU threads (per rank with --nproc)")->check(CLI::Range(1, 1024));
  auto rp_nproc_h = std::make_shared<int>(1);
  int& rp_nproc = *rp_nproc_h;
  add_distributed_options(c_repro, rp_nproc, rp.dist_timeout_seconds,
                          "Data-parallel workers for the training stages (c10d/Gloo, as train --nproc): each takes a "
                          "share of the same global batches, so the recipe does not change; rank 0 builds the data, "
                          "evaluates and benchmarks. Across machines set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT");
  return {c_repro, [=]() -> int {
    refuse_nproc_under_launcher(*rp_nproc_h);
    if (*rp_nproc_h > 1 && !std::getenv("RANK"))
      return launch_workers(argc, argv, *rp_nproc_h, c_repro->count("--threads") > 0);
    set_threads(*rp_threads_h);
    ReproOptions o = *rp_h;
    o.curriculum = parse_curriculum(*rp_curriculum_h);
    o.progress = isatty(2);
    std::string report = run_repro(o);
    if (!report.empty()) std::cout << "report: " << report << "\n";  // rank 0's
    return 0;
  }};
}

}  // namespace victor::cli
