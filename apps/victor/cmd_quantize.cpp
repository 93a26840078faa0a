// victor quantize: its options and what it runs.
#include "cli.h"

namespace victor::cli {

namespace {

// --- victor quantize ---
struct QuantizeArgs {
  std::string model, out, dtype = "int8";
  size_t shard_mb = 0;
  bool overwrite = false;
};

void run_quantize(const QuantizeArgs& a) {
  if (same_path(a.model, a.out))
    throw Error("quantize: --out must differ from --model (the source stays intact)");
  refuse_existing_model(a.out, a.overwrite, "--out");
  Vlm model = Vlm::load(a.model, weight_format_from_string(a.dtype));
  ModelFolderWrite write(a.out);
  model.save(a.out, a.shard_mb << 20);
  copy_tokenizer_files(a.model, a.out);
  write.commit();
  std::cout << "wrote " << model.config().weight_format() << " model to " << a.out << ": " << model.weight_bytes() / 1048576.0
            << " MiB of weights (" << model.parameter_count() / 1e6 << " M parameters)\n";
}

}  // namespace

Command quantize_command(CLI::App& app, int, char**) {
  auto qa_h = std::make_shared<QuantizeArgs>();
  QuantizeArgs& qa = *qa_h;
  auto* c_quant = app.add_subcommand("quantize", "Convert a checkpoint's weight matrices to int8, int4 or bf16 (loads directly)");
  c_quant->add_option("--model", qa.model, "Source checkpoint folder")->required()->check(CLI::ExistingDirectory);
  c_quant->add_option("--out", qa.out, "Output folder (HF layout; int8/int4 scales as <name>_scale tensors)")->required();
  add_dtype_option(c_quant, qa.dtype, false);
  add_overwrite_flag(c_quant, qa.overwrite);
  c_quant->add_option("--shard-mb", qa.shard_mb, "Split the safetensors into shards of this many MiB (0 = one file)")
      ->check(CLI::Range(0, 1 << 20));
  return {c_quant, [qa_h] { run_quantize(*qa_h); return 0; }};
}

}  // namespace victor::cli
