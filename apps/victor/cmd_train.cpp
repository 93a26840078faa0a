// victor train: its options and what it runs.
#include "cli.h"

namespace victor::cli {

namespace {

// --- victor train ---
void run_train(TrainOptions o, const std::string& parts, int threads, bool overwrite) {
  set_threads(threads);
  if (!o.resume && same_path(o.model_dir, o.out))
    throw Error("train: --out must differ from --model (the starting checkpoint stays intact; --resume continues "
                "the run in --out)");
  if (!o.resume) refuse_existing_model(o.out, overwrite, "--out");
  refuse_output_over_inputs("--log", o.log, {o.data});
  o.parts = parse_parts(parts);
  TrainReport r = train(o);
  if (const char* rank = std::getenv("RANK"); r.world_size > 1 && rank && std::string(rank) != "0") return;
  if (r.world_size > 1)
    std::cout << r.world_size << " ranks (c10d/Gloo), " << r.bytes_reduced_per_step / 1e6
              << " MB of gradients all-reduced per step in " << r.reduce_seconds_per_step * 1e3 << " ms\n";
  std::cout << "trained " << r.steps << " steps (" << r.samples << " samples, " << r.tokens
            << " tokens) in " << r.seconds << " s: " << r.mean_step_seconds << " s/step, "
            << r.tokens_per_second << " tokens/s, final loss " << r.final_loss;
  if (r.skipped) std::cout << ", " << r.skipped << " bad samples skipped";
  if (r.feature_cache_hits) std::cout << ", " << r.feature_cache_hits << " images' vision features from the cache";
  if (r.grounded_answers)
    std::cout << ", grounded attention on the answers' regions " << r.final_ground_mass << " (KL " << r.final_ground_loss << ")";
  std::cout << "\nmodel and trainer state in " << o.out << "\n";
}

}  // namespace

Command train_command(CLI::App& app, int argc, char** argv) {
  auto tr_h = std::make_shared<TrainOptions>();
  TrainOptions& tr = *tr_h;
  auto train_parts_h = std::make_shared<std::string>("pretrain");
  std::string& train_parts = *train_parts_h;
  auto train_threads_h = std::make_shared<int>(default_threads());
  int& train_threads = *train_threads_h;
  auto* c_train = app.add_subcommand("train", "Train on LLaVA-format data (loss on assistant tokens)");
  c_train->add_option("--model", tr.model_dir, "Starting checkpoint folder")->required();
  c_train->add_option("--data", tr.data, "LLaVA JSON: [{id, image, conversations}]")->required()->check(CLI::ExistingFile);
  c_train->add_option("--image-folder", tr.image_folder, "Folder the samples' image paths are relative to (default: the JSON's folder)");
  c_train->add_option("--out", tr.out, "Output folder (model, trainer state, metrics.jsonl)")->required();
  c_train->add_option("--train", train_parts, "What to train: vision,projector,registers,llm or pretrain (projector+registers) | finetune (+llm) | all")->capture_default_str();
  c_train->add_option("--lr", tr.lr, "Peak learning rate")->check(CLI::PositiveNumber)->check(kFinite)->capture_default_str();
  c_train->add_option("--min-lr-ratio", tr.min_lr_ratio, "Cosine floor as a fraction of --lr")->check(CLI::Range(0.0, 1.0))->check(kFinite);
  c_train->add_option("--weight-decay", tr.weight_decay, "AdamW decoupled weight decay")->check(CLI::Range(0.0, 1.0))->check(kFinite);
  c_train->add_option("--warmup-steps", tr.warmup_steps, "Linear warm-up steps (default 3% of the run)")->check(CLI::Range(-1, 10000000));
  c_train->add_option("--batch-size", tr.batch_size, "Samples per micro-batch")->check(CLI::Range(1, 4096))->capture_default_str();
  c_train->add_option("--grad-accum", tr.grad_accum, "Micro-batches per optimizer step")->check(CLI::Range(1, 4096))->capture_default_str();
  c_train->add_option("--epochs", tr.epochs, "Epochs (ignored with --max-steps)")->check(CLI::Range(1, 100000))->capture_default_str();
  c_train->add_option("--max-steps", tr.max_steps, "Optimizer steps (0 = from --epochs)")->check(CLI::Range(0, 100000000));
  c_train->add_option("--stop-after", tr.stop_after, "Stop after N steps of this session (resume later)")->check(CLI::Range(0, 100000000));
  c_train->add_option("--save-every", tr.save_every, "Checkpoint every N steps (0 = at the end)")->check(CLI::Range(0, 100000000));
  c_train->add_option("--clip", tr.clip, "Gradient norm clipping (0 = off)")->check(CLI::Range(0.0, 1e6))->check(kFinite)->capture_default_str();
  c_train->add_option("--seed", tr.seed, "Seed (data order)");
  c_train->add_option("--threads", train_threads, "CPU threads")->check(CLI::Range(1, 1024));
  c_train->add_flag("--single-turn", tr.single_turn,
                    "Train every turn of a multi-turn conversation as its own sample (the image with one question)");
  c_train->add_option("--max-samples", tr.max_samples, "Use only the first N samples")->check(CLI::Range(0, 100000000));
  c_train->add_option("--feature-cache-mb", tr.feature_cache_mb,
                      "Vision tower frozen: keep each image's features in memory up to this many MiB (0 = recompute every step)")
      ->check(CLI::Range(0, 1 << 20));
  c_train->add_option("--log", tr.log, "Metrics JSON lines (default OUT/metrics.jsonl)");
  c_train->add_flag("--resume", tr.resume, "Continue exactly where the checkpoint in --out stopped");
  auto train_overwrite_h = std::make_shared<bool>(false);
  bool& train_overwrite = *train_overwrite_h;
  add_overwrite_flag(c_train, train_overwrite);
  auto train_nproc_h = std::make_shared<int>(1);
  int& train_nproc = *train_nproc_h;
  add_distributed_options(c_train, train_nproc, tr.dist_timeout_seconds,
                          "Data-parallel workers on this machine (c10d/Gloo; each takes --batch-size per micro-batch, "
                          "so the global batch is N x --batch-size x --grad-accum). Across machines set RANK, "
                          "WORLD_SIZE, MASTER_ADDR, MASTER_PORT instead (docs/distributed.md)");
  c_train->add_option("--overlap-allreduce", tr.overlap_allreduce,
                      "With several ranks: start each gradient bucket's all-reduce during the backward pass as soon as "
                      "it is ready (true: for ranks on separate machines), or all-reduce after it (false: measured "
                      "faster when the ranks share one machine's cores)")
      ->capture_default_str();
  c_train->add_flag("--skip-bad", tr.skip_bad, "Skip (and count) bad samples instead of stopping");
  auto choice_h = std::make_shared<ReducerChoice>();
  add_reducer_options(c_train, *choice_h);
  c_train->add_flag("--autocast-bf16", tr.autocast_bf16,
                    "Mixed precision: the forward pass's matrix products (and their gradients) in bf16, master weights and "
                    "optimizer in float32 (2.4x faster per step on the repro's model, 40 steps on an AVX-512 BF16 CPU; off keeps runs "
                    "bit-comparable with float32 ones)");
  c_train->add_flag("--shuffle-visual", tr.shuffle_visual,
                    "Augment: each image's visual tokens in a random order every step (lookups by content, not position)");
  c_train->add_option("--ground-weight", tr.ground_weight,
                      "Grounded attention: weight of the loss that teaches heads of --ground-layer to look at each answer's "
                      "boxes (the gpt turn's \"boxes\", GridVQA writes them); 0 = off")
      ->check(CLI::Range(0.0, 1e3))->check(kFinite)->capture_default_str();
  c_train->add_option("--ground-layer", tr.ground_layer, "Grounded attention: the decoder layer (0-based; must see the visual tokens)")
      ->check(CLI::Range(0, 1024))->capture_default_str();
  c_train->add_option("--ground-heads", tr.ground_heads, "Grounded attention: how many heads (the first ones) are taught")
      ->check(CLI::Range(1, 1024))->capture_default_str();
  return {c_train, [=]() -> int {
    if (auto launched = launch_workers_if_asked(argc, argv, *train_nproc_h, c_train->count("--threads") > 0)) return *launched;
    TrainOptions o = *tr_h;
    // The reducer flags resolved against the starting checkpoint's own reducer.
    if (!o.resume && choice_h->any()) o.reducer = choice_h->resolve(load_config(o.model_dir).reducer);
    run_train(o, *train_parts_h, *train_threads_h, *train_overwrite_h);
    return 0;
  }};
}

}  // namespace victor::cli
