// The benchmark harness: configurations measured alternately (ABAB...) in one run, medians over
// repeats, every figure also as a ratio to the plain model.
#pragma once
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "victor/model.h"

namespace victor {

struct BenchConfig {
  Reducer reducer;  // none = the plain model
  // The checkpoint's own reducer with its trained registers (else new registers start random).
  bool keep_registers = false;
  std::string name() const { return reducer.name(); }
};

struct BenchOptions {
  std::vector<int> batches{1, 16};
  std::vector<int> gen_tokens{2, 128};
  int prompt_tokens = 64;  // text tokens around the image
  // LLaVA-NeXT: the benchmark image's size (its crops follow from it; 672 x 672 is llava-v1.6's
  // largest square pinpoint: 2,880 patches in five views).
  int image_width = 672, image_height = 672;
  int repeats = 3;
  uint64_t seed = 0;
  torch::ScalarType kv_dtype = torch::kFloat32;  // KV-cache storage for every configuration
  bool progress = true;
  // What a batch may hold besides the weights: its KV cache (kv_bytes_formula) and its prefill's
  // activations (prefill_activation_bytes). A batch whose joint prefill does not fit is prefilled
  // one request at a time (SamplingOptions::prefill_one_at_a_time); one whose KV alone, with one
  // request's prefill, does not fit is not run, and the result says why. 0 = the memory the
  // kernel reports available (MemAvailable) once the models are built.
  int64_t memory_budget_bytes = 0;
};

// How a configuration runs one batch size within a memory budget.
struct BatchPlan {
  bool run = true;
  bool one_at_a_time = false;  // prefill one request at a time (the joint prefill does not fit)
  int64_t kv_bytes = 0;        // the batch's KV cache (formula)
  int64_t joint_bytes = 0;     // KV + the whole batch's prefill activations
  int64_t single_bytes = 0;    // KV + one request's prefill activations
  std::string why;             // when not run, or prefilled one at a time
};
BatchPlan plan_batch(int64_t kv_per_request, int64_t activations_per_request, int batch, int64_t budget);
// MemAvailable from /proc/meminfo, bytes (0 when unreadable).
int64_t available_memory_bytes();

struct BenchResult {
  std::string name, reducer;  // display name, spec
  int visual_tokens = 0;        // visual rows per image entering the LLM
  int inserted_tokens = 0;      // registers per image
  double vision_seconds = 0, ttft_seconds = 0, decode_tokens_per_second = 0;
  std::map<std::string, double> requests_per_second;  // "b16_g128" -> requests/s (median)
  // Each repeat's figure, in order: configurations alternate within a repeat, so the i-th figures
  // of two configurations were measured side by side (a ratio per repeat gives a range).
  std::map<std::string, std::vector<double>> requests_per_second_runs;
  int64_t kv_bytes = 0, kv_bytes_formula = 0, peak_rss_bytes = 0;
  double prefill_gflops = 0;
  std::map<int, BatchPlan> plans;  // batch size -> how it ran (or why not)
  int64_t memory_budget_bytes = 0;  // what the plans were made against (0: unknown, none)
};

// The standard set: plain, the checkpoint's own reducer (if any), then `extra` in order (the
// duplicates left out), each validated against the model.
std::vector<BenchConfig> bench_configs(const ModelConfig& cfg, const std::vector<Reducer>& extra);

std::vector<BenchResult> run_bench(const Vlm& model, const std::vector<BenchConfig>& configs,
                                   const BenchOptions& opt);

// The language model alone, as llama-bench measures it: prefill of `prompt` random text tokens
// (tokens/s) and decode of `gen` tokens after it (tokens/s), medians of `repeats` after a warm-up.
struct LlmBenchResult {
  int prompt = 0, gen = 0, repeats = 0;
  double prefill_tokens_per_second = 0, decode_tokens_per_second = 0;
  double prefill_min = 0, prefill_max = 0, decode_min = 0, decode_max = 0;
  int64_t peak_rss_bytes = 0;
};
LlmBenchResult run_llm_bench(const Vlm& model, int prompt, int gen, int repeats, uint64_t seed);

std::string bench_table(const std::vector<BenchResult>& results);
nlohmann::json bench_json(const std::vector<BenchResult>& results, const ModelConfig& cfg,
                          const BenchOptions& opt);

// Peak resident memory (VmHWM), resettable per measurement on Linux.
void reset_peak_rss();
int64_t peak_rss_bytes();

}  // namespace victor
