// victor init: its options and what it runs.
#include "cli.h"

namespace victor::cli {

namespace {

// --- victor init ---
struct InitArgs {
  std::string preset = "tiny", out, corpus, tokenizer_type = "bpe", dtype = "f32", from;
  ReducerChoice reducer;
  int vocab = 512;
  uint64_t seed = 0;
  bool overwrite = false;
};



// The preset's shapes must be the source's: every field that sizes a weight, named when it differs.
void require_same_shapes(const ModelConfig& preset, const ModelConfig& src, const InitArgs& a) {
  const std::vector<std::tuple<const char*, int, int>> fields{
      {"vision_config.hidden_size", preset.vision.hidden_size, src.vision.hidden_size},
      {"vision_config.intermediate_size", preset.vision.intermediate_size, src.vision.intermediate_size},
      {"vision_config.num_hidden_layers", preset.vision.num_hidden_layers, src.vision.num_hidden_layers},
      {"vision_config.num_attention_heads", preset.vision.num_attention_heads, src.vision.num_attention_heads},
      {"vision_config.image_size", preset.vision.image_size, src.vision.image_size},
      {"vision_config.patch_size", preset.vision.patch_size, src.vision.patch_size},
      {"text_config.hidden_size", preset.text.hidden_size, src.text.hidden_size},
      {"text_config.intermediate_size", preset.text.intermediate_size, src.text.intermediate_size},
      {"text_config.num_hidden_layers", preset.text.num_hidden_layers, src.text.num_hidden_layers},
      {"text_config.num_attention_heads", preset.text.num_attention_heads, src.text.num_attention_heads},
      {"text_config.num_key_value_heads", preset.text.num_key_value_heads, src.text.num_key_value_heads}};
  for (const auto& [name, want, got] : fields)
    if (want != got)
      throw Error("--from " + a.from + ": " + name + " is " + std::to_string(got) + ", preset " + a.preset +
                  " has " + std::to_string(want) + " (pick the preset of the checkpoint's shape)");
}

// `--from DIR`: the preset's model (its AnyRes pinpoints and preprocessing) on DIR's weights and
// tokenizer, as LLaVA-NeXT starts from a LLaVA-1.5 checkpoint: every tensor of DIR copied by name,
// the ones DIR lacks (image_newline, new registers) random.
struct Started {
  Vlm model;
  std::vector<std::string> fresh;  // the tensors left random
};
Started init_from(const InitArgs& a) {
  Vlm src = Vlm::load(a.from, WeightDType::F32);
  ModelConfig cfg = src.config();
  const ModelConfig preset = preset_config(a.preset);
  require_same_shapes(preset, cfg, a);
  cfg.image_grid_pinpoints = preset.image_grid_pinpoints;
  cfg.preprocess.pad_to_square = preset.preprocess.pad_to_square;
  cfg.reducer = a.reducer.resolve(src.config().reducer);
  cfg.set_weight_format(WeightFormat::all(WeightDType::F32));
  Vlm model = Vlm::random(cfg, a.seed);
  std::map<std::string, const ParamRef*> have;
  for (const auto& p : src.params()) have[p.name] = &p;
  std::vector<std::string> fresh;
  for (const auto& p : model.params()) {
    auto it = have.find(p.name);
    if (it == have.end() || !it->second->tensor->defined()) {
      if (p.tensor->defined()) fresh.push_back(p.name);
      continue;
    }
    if (!p.tensor->defined()) continue;
    if (it->second->tensor->sizes() != p.tensor->sizes())
      throw Error("--from " + a.from + ": tensor " + p.name + " has another shape than the new model's");
    p.tensor->copy_(*it->second->tensor);
    have.erase(it);
  }
  for (const auto& [name, p] : have)
    if (p->tensor->defined())
      throw Error("--from " + a.from + ": tensor " + name + " has no place in the new model" +
                  (name.find("register") != std::string::npos ? " (its reducer keeps registers: pass --reducer)" : ""));
  model.set_weight_format(weight_format_from_string(a.dtype));
  return {std::move(model), std::move(fresh)};
}

void run_init(const InitArgs& a) {
  refuse_existing_model(a.out, a.overwrite, "--out");
  if (!a.from.empty()) {
    const InitArgs defaults;
    if (a.corpus != defaults.corpus || a.vocab != defaults.vocab || a.tokenizer_type != defaults.tokenizer_type)
      throw Error("--from takes the checkpoint's own tokenizer: --corpus, --vocab-size and --tokenizer-type do not apply");
    namespace fs = std::filesystem;
    if (fs::absolute(a.from).lexically_normal() == fs::absolute(a.out).lexically_normal())
      throw Error("--from and --out are the same folder: the source model would be overwritten");
    auto [model, fresh] = init_from(a);
    ModelFolderWrite write(a.out);
    copy_tokenizer_files(a.from, a.out);
    model.save(a.out);
    write.commit();
    std::string names;
    for (const auto& n : fresh) names += (names.empty() ? "" : ", ") + n;
    std::cout << "wrote " << a.preset << " model to " << a.out << " on the weights of " << a.from << ": "
              << model.parameter_count() / 1e6 << " M parameters (" << model.config().weight_format() << "), "
              << (fresh.empty() ? "every tensor copied" : "new and random: " + names);
    if (!model.config().reducer.is_none()) std::cout << ", token reducer " << model.config().reducer.spec();
    std::cout << "\n";
    return;
  }
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
  c_init->add_option("--preset", init.preset, "Model shape: tiny and llava-next-tiny (tests), small (GridVQA), small-next (GridVQA-HR), clip-l-1b, clip-l-1b-next (its AnyRes twin), llava-7b, llava-next-7b")
      ->check(CLI::IsMember(preset_names()));
  c_init->add_option("--out", init.out, "Output folder")->required();
  c_init->add_option("--corpus", init.corpus, "Text file to train the tokenizer on (default: GridVQA's vocabulary)")
      ->check(CLI::ExistingFile);
  c_init->add_option("--vocab-size", init.vocab, "SentencePiece vocabulary size (upper bound)")
      ->check(CLI::Range(300, 64000));
  c_init->add_option("--tokenizer-type", init.tokenizer_type, "SentencePiece model type: bpe (as Llama's) | unigram")
      ->check(CLI::IsMember({"bpe", "unigram"}));
  c_init->add_option("--seed", init.seed, "Random seed for the weights");
  c_init->add_option("--from", init.from,
                     "Start from this checkpoint's weights and tokenizer instead of random ones (the preset must have its "
                     "shapes): e.g. --preset small-next --from a trained small model gives it LLaVA-NeXT's AnyRes, as "
                     "LLaVA-NeXT starts from LLaVA-1.5; tensors it lacks (image_newline, new registers) start random")
      ->check(CLI::ExistingDirectory);
  add_dtype_option(c_init, init.dtype, false);
  add_overwrite_flag(c_init, init.overwrite);
  add_reducer_options(c_init, init.reducer);
  return {c_init, [init_h] { run_init(*init_h); return 0; }};
}

}  // namespace victor::cli
