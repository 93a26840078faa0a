// Prefill + decode with a per-layer KV cache, sampling, and the figures --stats prints.
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "victor/image.h"
#include "victor/model.h"
#include "victor/tokenizer.h"

namespace victor {

struct SamplingOptions {
  int max_new_tokens = 64;
  double temperature = 0.0;  // 0 = greedy
  int top_k = 0;             // 0 = off
  double top_p = 1.0;        // 1 = off
  uint64_t seed = 0;
  bool keep_logits = false;  // every step's logits (for --dump-logits)
  bool ignore_eos = false;   // generate() runs to max_new_tokens past the end-of-sequence token
  // KV-cache storage: float32, or bfloat16 (half the bytes; attention still computes in float32
  // on a per-layer float copy of the keys and values).
  torch::ScalarType kv_dtype = torch::kFloat32;
  // Prefill the batch's requests one at a time, each into a cache of its own, then decode them
  // together (as the server does): the prefill holds one request's activations instead of the
  // whole batch's. The tokens are the same either way.
  bool prefill_one_at_a_time = false;
};

// "f32" / "bf16" -> the cache's element type; the error names `what` (the option).
torch::ScalarType kv_dtype_from_string(const std::string& s, const std::string& what = "--kv-dtype");

struct Request {
  std::string prompt;          // the user's question; "<image>" is prepended when missing
  std::vector<Image> images;   // one per <image>
};

struct GenerationStats {
  int64_t batch = 0;
  int64_t prompt_tokens = 0;      // text tokens of the prompt (row 0)
  int64_t visual_tokens = 0;      // visual tokens (row 0)
  int64_t register_tokens = 0;    // registers (row 0)
  int64_t generated_tokens = 0;   // summed over rows
  std::string reducer;            // its display name
  int reduce_layer = 0;           // first layer with fewer rows (Victor's k, FastV's K; else L)
  int layers = 0;                 // L
  int64_t tokens_before_drop = 0; // rows seen by layers < reduce_layer (row 0, prefill)
  int64_t tokens_after_drop = 0;  // rows seen by layers >= reduce_layer
  double vision_seconds = 0;
  double ttft_seconds = 0;        // preprocessing + vision + prefill + first token
  double decode_seconds = 0;
  double decode_tokens_per_second = 0;
  int64_t kv_bytes = 0;           // after prefill + decode, whole batch
  int64_t kv_bytes_plain = 0;     // the same requests without the reducer
  double prefill_gflops = 0;
  double prefill_gflops_plain = 0;
};

struct GenerationResult {
  std::vector<std::vector<int64_t>> tokens;
  std::vector<std::string> texts;
  GenerationStats stats;
  torch::Tensor step_logits;  // [steps, B, V] when keep_logits
};

// Builds the LLaVA-1.5 prompt ids for a request (BOS + "USER: <image>\n... ASSISTANT:").
// `context_tokens` > 0: a prompt too long to fit in that many tokens is refused before tokenizing.
std::vector<int64_t> prompt_ids(const Tokenizer& tok, const std::string& prompt, size_t n_images,
                                int64_t context_tokens = 0);

// Runs a batch of requests to completion (left-padded batch, one prefill, batched decode).
GenerationResult generate(const Vlm& model, const Tokenizer& tok, const std::vector<Request>& reqs,
                          const SamplingOptions& opt);
// The same on pre-built inputs (ids + pixels), no tokenizer needed (bench, tests).
GenerationResult generate_ids(const Vlm& model, const std::vector<PromptInput>& inputs,
                              int64_t eos_id, const SamplingOptions& opt);

// Picks the next token per row from logits [B,V].
torch::Tensor sample_next(const torch::Tensor& logits, const SamplingOptions& opt,
                          at::Generator& gen);

// Analytic figures for one request with `text` text tokens and `images` images, under the
// config's reducer (without_reducer(c) for the plain model's).
int64_t kv_bytes_formula(const ModelConfig& c, int64_t text, int64_t images, int64_t generated,
                         int64_t element_bytes = 4);
double prefill_flops(const ModelConfig& c, int64_t text, int64_t images);
// Each image's rows entering the LLM under `c` (LLaVA-NeXT: by its layout), in order, and the
// views the tower runs on.
std::vector<int64_t> visual_rows_of(const ModelConfig& c, const PromptInput& in);
int64_t views_of(const PromptInput& in);
// The formulas above for images of their own lengths.
int64_t kv_bytes_formula(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual, int64_t generated,
                         int64_t element_bytes);
double prefill_flops(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual, int64_t views);
// An upper bound on the bytes one request's prefill holds at once besides the weights and its KV
// cache (kv_bytes_formula): the vision tower over the largest image's `views` (one image runs at a
// time), then the decoder over every row (text + visual + inserted), its attention scores in
// query blocks (attention_query_block). The serving engine admits requests by it.
// ServeEngine.PrefillActivationFormulaBoundsTheMeasuredPeak holds it against VmHWM.
int64_t prefill_activation_bytes(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual,
                                 int64_t views_per_image);
// Adds an image to a prompt input: its views (prepare_image) appended to the pixels, its layout
// to the layouts.
void add_image(PromptInput& in, const Image& img, const ModelConfig& c);
ModelConfig without_reducer(const ModelConfig& c);

std::string format_stats(const GenerationStats& s);

}  // namespace victor
