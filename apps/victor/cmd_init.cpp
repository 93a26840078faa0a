// victor init: its options and what it runs.
#include "cli.h"

namespace victor::cli {

namespace {

// --- victor init ---
struct InitArgs {
  std::string preset = "tiny", out, corpus, tokenizer_type = "bpe", dtype = "f32";
  ReducerChoice reducer;
  int vocab = 512;
  uint64_t seed = 0;
  bool overwrite = false;
};



void run_init(const InitArgs& a) {
  refuse_existing_model(a.out, a.overwrite, "--out");
  ModelConfig cfg = preset_config(a.preset);
  std::vector<std::string> corpus = a.corpus.empty() ? gridvqa_corpus() : read_lines(a.corpus);
  ModelFolderWrite write(a.out);
  int n = train_tokenizer(corpus, a.out, a.vocab, a.tokenizer_type);
  // The real-model presets keep their vocabulary (32064 rows); the training presets shrink it to
  // the tokenizer.
  fit_vocabulary(cfg, n, preset_keeps_vocabulary(a.preset));
  cfg.reducer = a.reducer.resolve(Reducer::none());
  Vlm model = Vlm::random(cfg, a.seed, weight_format_from_string(a.dtype));
  model.save(a.out);
  write.commit();
  std::cout << "wrote " << a.preset << " model to " << a.out << ": "
            << model.parameter_count() / 1e6 << " M parameters (" << model.config().weight_format() << ", "
            << model.weight_bytes() / 1048576.0 << " MiB), vocabulary " << cfg.text.vocab_size
            << " (SentencePiece " << n << " + <image>, <pad>), "
            << cfg.visual_tokens_per_image() << " visual tokens per " << (cfg.is_next() ? "view" : "image");
  if (!cfg.reducer.is_none()) std::cout << ", token reducer " << cfg.reducer.spec();
  std::cout << "\n";
}

}  // namespace

Command init_command(CLI::App& app, int, char**) {
  auto init_h = std::make_shared<InitArgs>();
  InitArgs& init = *init_h;
  auto* c_init = app.add_subcommand("init", "Write a randomly initialised checkpoint (HF LLaVA layout)");
  c_init->add_option("--preset", init.preset, "Model shape: tiny and llava-next-tiny (tests), small (GridVQA), clip-l-1b, clip-l-1b-next (its AnyRes twin), llava-7b, llava-next-7b")
      ->check(CLI::IsMember(preset_names()));
  c_init->add_option("--out", init.out, "Output folder")->required();
  c_init->add_option("--corpus", init.corpus, "Text file to train the tokenizer on (default: GridVQA's vocabulary)")
      ->check(CLI::ExistingFile);
  c_init->add_option("--vocab-size", init.vocab, "SentencePiece vocabulary size (upper bound)")
      ->check(CLI::Range(300, 64000));
  c_init->add_option("--tokenizer-type", init.tokenizer_type, "SentencePiece model type: bpe (as Llama's) | unigram")
      ->check(CLI::IsMember({"bpe", "unigram"}));
  c_init->add_option("--seed", init.seed, "Random seed for the weights");
  add_dtype_option(c_init, init.dtype, false);
  add_overwrite_flag(c_init, init.overwrite);
  add_reducer_options(c_init, init.reducer);
  return {c_init, [init_h] { run_init(*init_h); return 0; }};
}

}  // namespace victor::cli
