#include "victor/bench.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>

#include "victor/blas.h"
#include "victor/error.h"
#include "victor/generate.h"
#include "victor/kernels.h"
#include "victor/progress.h"

using json = nlohmann::json;

namespace victor {

void reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  if (f) f << "5";  // resets VmHWM to the current RSS
}

namespace {
// A "Key:   N kB" line of a /proc file, in bytes (0 when absent or unreadable).
int64_t proc_kib_field(const char* path, const std::string& key) {
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key + ":", 0) == 0) return std::stoll(line.substr(key.size() + 1)) * 1024;
  return 0;
}
}  // namespace

int64_t peak_rss_bytes() { return proc_kib_field("/proc/self/status", "VmHWM"); }

int64_t available_memory_bytes() { return proc_kib_field("/proc/meminfo", "MemAvailable"); }

namespace {
std::string gib(int64_t bytes) {  // GiB, or MiB below one GiB
  char buf[32];
  if (bytes >= (int64_t(1) << 30)) std::snprintf(buf, sizeof buf, "%.2f GiB", double(bytes) / (1024.0 * 1024.0 * 1024.0));
  else std::snprintf(buf, sizeof buf, "%.2f MiB", double(bytes) / (1024.0 * 1024.0));
  return buf;
}
}  // namespace

BatchPlan plan_batch(int64_t kv_per_request, int64_t activations_per_request, int batch, int64_t budget) {
  BatchPlan p;
  p.kv_bytes = kv_per_request * batch;
  p.joint_bytes = p.kv_bytes + activations_per_request * batch;
  p.single_bytes = p.kv_bytes + activations_per_request;
  if (budget <= 0 || p.joint_bytes <= budget) return p;
  if (batch > 1 && p.single_bytes <= budget) {
    p.one_at_a_time = true;
    p.why = "prefilled one request at a time: the joint prefill needs " + gib(p.joint_bytes) + " (KV " +
            gib(p.kv_bytes) + " + activations " + gib(p.joint_bytes - p.kv_bytes) + ") > the budget " + gib(budget);
    return p;
  }
  p.run = false;
  p.why = "not run: needs " + gib(p.single_bytes) + " (KV " + gib(p.kv_bytes) + " for " + std::to_string(batch) +
          " request" + (batch > 1 ? "s" : "") + " + one prefill's activations " + gib(activations_per_request) +
          ") > the budget " + gib(budget);
  return p;
}

std::vector<BenchConfig> bench_configs(const ModelConfig& cfg, const std::vector<Reducer>& extra) {
  std::vector<BenchConfig> out{{Reducer::none(), false}};
  if (!cfg.reducer.is_none()) out.push_back({cfg.reducer, true});
  for (auto& r : extra) {
    r.validate(cfg);
    bool dup = false;
    for (auto& c : out) dup |= c.reducer == r;
    if (!dup) out.push_back({r, false});
  }
  return out;
}

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// A prompt of `text` tokens (random ids below the specials), with one image after the first eight
// when `pixels` is defined.
PromptInput synthetic_prompt(const ModelConfig& c, int text, uint64_t seed, const torch::Tensor& pixels,
                             const std::vector<ImageLayout>& layouts = {}) {
  PromptInput p;
  uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  const int64_t hi = std::min<int64_t>(c.image_token_index, c.text.vocab_size) - 3;
  p.ids.push_back(c.text.bos_token_id);
  for (int i = 1; i < text; ++i) {
    if (pixels.defined() && i == std::min(8, text - 1)) p.ids.push_back(c.image_token_index);
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    p.ids.push_back(3 + int64_t((s >> 33) % uint64_t(std::max<int64_t>(1, hi))));
  }
  p.pixels = pixels;
  p.layouts = layouts;
  return p;
}

}  // namespace

namespace {

// The image and prompts every configuration is timed on: one random image (LLaVA-NeXT: of the
// asked size, preprocessed as the checkpoint's processor does; 672 x 672 takes four crops and the
// base view, 2,928 rows) and synthetic prompts of `prompt_tokens` text tokens around it.
struct BenchInputs {
  const ModelConfig& cfg;
  int prompt_tokens;
  torch::Tensor pixels;
  std::vector<ImageLayout> layouts;  // LLaVA-NeXT: the image's AnyRes layout

  BenchInputs(const ModelConfig& c, const BenchOptions& opt) : cfg(c), prompt_tokens(opt.prompt_tokens) {
    torch::manual_seed(opt.seed);
    const int S = c.vision.image_size;
    pixels = torch::randn({1, 3, S, S});
    if (!c.is_next()) return;
    Image img;
    img.width = opt.image_width;
    img.height = opt.image_height;
    img.rgb.resize(size_t(img.width) * img.height * 3);
    auto bytes = torch::randint(0, 256, {int64_t(img.rgb.size())}, torch::kUInt8);
    std::memcpy(img.rgb.data(), bytes.data_ptr<uint8_t>(), img.rgb.size());
    PreparedImage prepared = prepare_image(img, c);
    pixels = prepared.pixels;
    layouts = {prepared.layout};
  }
  PromptInput prompt(uint64_t seed) const { return synthetic_prompt(cfg, prompt_tokens, seed, pixels, layouts); }
  std::vector<PromptInput> rows(int b) const {  // the timed batches' requests (seeds 100, 101, ...)
    std::vector<PromptInput> out;
    for (int i = 0; i < b; ++i) out.push_back(prompt(100 + uint64_t(i)));
    return out;
  }
};

// One configuration's measurements over the repeats.
struct Samples {
  std::vector<double> vision, ttft, decode;
  std::map<std::string, std::vector<double>> rps;
  int64_t kv = 0, peak = 0;
  double gflops = 0;
};

// Warm-up: one short pass per configuration at batch 1 and at the largest batch (allocator, thread
// pool, the heap grown to the batch's buffers). Without the second, the first repeat's batched
// figure of the first configuration measured was about half its later ones (the full repro of
// 2026-12-03: every ratio ~2x in repeat 1, within 3% in repeats 2 and 3).
void warm_up(const std::vector<Vlm>& models, const std::vector<std::map<int, BatchPlan>>& plans,
             const BenchInputs& in, const BenchOptions& opt) {
  for (size_t ci = 0; ci < models.size(); ++ci) {
    SamplingOptions warm{2};
    warm.kv_dtype = opt.kv_dtype;
    generate_ids(models[ci], {in.prompt(1)}, -1, warm);
    int largest = 1;  // the largest batch this configuration runs
    for (auto& [b, plan] : plans[ci])
      if (plan.run && b > largest) largest = b;
    if (largest == 1) continue;
    warm.prefill_one_at_a_time = plans[ci].at(largest).one_at_a_time;
    generate_ids(models[ci], in.rows(largest), -1, warm);
  }
}

// One repeat of one configuration: the vision tower, a batch-1 request (TTFT, decode, KV) and
// every batch x generation length's requests/s.
void measure(const Vlm& m, const std::map<int, BatchPlan>& plans, const BenchInputs& in, const BenchOptions& opt,
             int max_gen, Samples& s) {
  reset_peak_rss();
  auto t0 = Clock::now();
  m.encode_images(in.pixels);
  s.vision.push_back(since(t0));
  SamplingOptions so;
  so.max_new_tokens = max_gen;
  so.kv_dtype = opt.kv_dtype;
  auto one = generate_ids(m, {in.prompt(2)}, -1, so);
  s.ttft.push_back(one.stats.ttft_seconds);
  s.decode.push_back(one.stats.decode_tokens_per_second);
  s.kv = one.stats.kv_bytes;
  s.gflops = one.stats.prefill_gflops;
  for (int b : opt.batches)
    for (int g : opt.gen_tokens) {
      const BatchPlan& plan = plans.at(b);
      if (!plan.run) continue;
      auto rows = in.rows(b);
      SamplingOptions sg;
      sg.max_new_tokens = g;
      sg.kv_dtype = opt.kv_dtype;
      sg.prefill_one_at_a_time = plan.one_at_a_time;
      auto t1 = Clock::now();
      generate_ids(m, rows, -1, sg);
      s.rps["b" + std::to_string(b) + "_g" + std::to_string(g)].push_back(b / since(t1));
    }
  s.peak = std::max(s.peak, peak_rss_bytes());
}

// Medians of a configuration's samples, with the KV formula beside the measured cache.
BenchResult summarize(const BenchConfig& config, const ModelConfig& mc, const Samples& s, const BenchInputs& in,
                      const BenchOptions& opt, int max_gen, const std::map<int, BatchPlan>& plans, int64_t budget) {
  BenchResult r;
  r.plans = plans;
  r.memory_budget_bytes = budget;
  r.name = config.name();
  r.reducer = mc.reducer.spec();
  const PromptInput probe = synthetic_prompt(mc, opt.prompt_tokens, 2, in.pixels, in.layouts);
  r.visual_tokens = int(visual_rows_of(mc, probe)[0]);
  r.inserted_tokens = mc.reducer.inserted_rows();
  r.vision_seconds = median(s.vision);
  r.ttft_seconds = median(s.ttft);
  r.decode_tokens_per_second = median(s.decode);
  for (auto& [k, v] : s.rps) r.requests_per_second[k] = median(v);
  r.requests_per_second_runs = s.rps;
  r.kv_bytes = s.kv;
  r.kv_bytes_formula = kv_bytes_formula(mc, opt.prompt_tokens, visual_rows_of(mc, probe), max_gen - 1,
                                        int64_t(c10::elementSize(opt.kv_dtype)));
  r.peak_rss_bytes = s.peak;
  r.prefill_gflops = s.gflops;
  return r;
}

}  // namespace

std::vector<BenchResult> run_bench(const Vlm& base, const std::vector<BenchConfig>& configs,
                                   const BenchOptions& opt) {
  if (opt.repeats < 1) throw Error("bench: --repeats must be >= 1");
  torch::NoGradGuard ng;
  std::vector<Vlm> models;
  for (auto& c : configs) {
    Vlm m(base);
    // The checkpoint's own configuration keeps its trained registers; every other one with
    // registers gets new ones (the timing does not depend on their values).
    m.set_reducer(c.reducer, opt.seed + 17, /*replace_registers=*/!c.keep_registers);
    models.push_back(std::move(m));
  }
  const BenchInputs in(base.config(), opt);
  const int max_gen = *std::max_element(opt.gen_tokens.begin(), opt.gen_tokens.end());
  // Each configuration's batches within the memory budget (the weights are resident by now).
  const int64_t budget = opt.memory_budget_bytes > 0 ? opt.memory_budget_bytes : available_memory_bytes();
  std::vector<std::map<int, BatchPlan>> plans(configs.size());
  const PromptInput probe = in.prompt(2);
  for (size_t ci = 0; ci < configs.size(); ++ci) {
    const ModelConfig& mc = models[ci].config();
    const std::vector<int64_t> visual = visual_rows_of(mc, probe);
    const int64_t kv = kv_bytes_formula(mc, opt.prompt_tokens, visual, max_gen,
                                        int64_t(c10::elementSize(opt.kv_dtype)));
    const int64_t act = prefill_activation_bytes(mc, opt.prompt_tokens, visual, views_of(probe));
    std::vector<int> sizes = opt.batches;
    sizes.push_back(1);  // the batch-1 request every repeat times
    for (int b : sizes) {
      BatchPlan plan = plan_batch(kv, act, b, budget);
      if (b == 1 && !plan.run)
        throw Error("bench: " + configs[ci].name() + " does not fit in memory even alone (" + plan.why +
                    "); try --kv-dtype bf16, a smaller --image-size or --max-image-tokens");
      if (!plan.why.empty() && !plans[ci].count(b))
        std::cerr << "bench: " << configs[ci].name() << " at batch " << b << ": " << plan.why << "\n";
      plans[ci][b] = plan;
    }
  }
  std::vector<Samples> samples(configs.size());
  Progress bar("bench", int64_t(opt.repeats) * int64_t(configs.size()), opt.progress && isatty(2));
  int64_t done = 0;
  warm_up(models, plans, in, opt);
  for (int r = 0; r < opt.repeats; ++r)
    for (size_t ci = 0; ci < configs.size(); ++ci) {  // ABAB...: configurations interleaved
      measure(models[ci], plans[ci], in, opt, max_gen, samples[ci]);
      bar.update(++done);
    }
  bar.finish();
  std::vector<BenchResult> out;
  for (size_t ci = 0; ci < configs.size(); ++ci)
    out.push_back(summarize(configs[ci], models[ci].config(), samples[ci], in, opt, max_gen, plans[ci], budget));
  return out;
}

LlmBenchResult run_llm_bench(const Vlm& model, int prompt, int gen, int repeats, uint64_t seed) {
  if (prompt < 1 || gen < 2 || repeats < 1)
    throw Error("bench --llm-only: needs --prompt-tokens >= 1, --gen >= 2, --repeats >= 1");
  torch::NoGradGuard ng;
  const PromptInput p = synthetic_prompt(model.config(), prompt, seed, torch::Tensor());
  SamplingOptions so;
  so.max_new_tokens = gen;
  generate_ids(model, {p}, -1, SamplingOptions{2});  // warm-up
  std::vector<double> pp, tg;
  reset_peak_rss();
  for (int r = 0; r < repeats; ++r) {
    auto res = generate_ids(model, {p}, -1, so);
    pp.push_back(prompt / res.stats.ttft_seconds);
    tg.push_back(res.stats.decode_tokens_per_second);
  }
  LlmBenchResult out;
  out.prompt = prompt;
  out.gen = gen;
  out.repeats = repeats;
  out.prefill_tokens_per_second = median(pp);
  out.decode_tokens_per_second = median(tg);
  out.prefill_min = *std::min_element(pp.begin(), pp.end());
  out.prefill_max = *std::max_element(pp.begin(), pp.end());
  out.decode_min = *std::min_element(tg.begin(), tg.end());
  out.decode_max = *std::max_element(tg.begin(), tg.end());
  out.peak_rss_bytes = peak_rss_bytes();
  return out;
}

std::string bench_table(const std::vector<BenchResult>& rs) {
  if (rs.empty()) return "";
  const BenchResult& p = rs.front();
  // Every batch x generation column any configuration measured (one that did not fit shows "-").
  std::set<std::string> keys;
  for (auto& r : rs)
    for (auto& [k, v] : r.requests_per_second) keys.insert(k);
  std::ostringstream o;
  char buf[512];
  std::snprintf(buf, sizeof buf, "%-24s %10s %10s %12s %10s %10s", "config", "vision ms", "TTFT ms",
                "decode tok/s", "KV KiB", "peak MiB");
  o << buf;
  for (auto& k : keys) {
    std::snprintf(buf, sizeof buf, " %14s", (k + " req/s").c_str());
    o << buf;
  }
  o << "\n";
  auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
  for (auto& r : rs) {
    std::snprintf(buf, sizeof buf, "%-24s %10.1f %10.1f %12.1f %10.1f %10.1f", r.name.c_str(),
                  1e3 * r.vision_seconds, 1e3 * r.ttft_seconds, r.decode_tokens_per_second,
                  r.kv_bytes / 1024.0, r.peak_rss_bytes / 1048576.0);
    o << buf;
    for (auto& k : keys) {
      auto it = r.requests_per_second.find(k);
      if (it == r.requests_per_second.end()) std::snprintf(buf, sizeof buf, " %14s", "-");
      else std::snprintf(buf, sizeof buf, " %14.4g", it->second);  // 4 digits: a 7B model serves ~0.01/s
      o << buf;
    }
    o << "\n";
    if (&r == &p) continue;
    std::snprintf(buf, sizeof buf, "%-24s %10s %9.2fx %11.2fx %9.2fx %9.2fx", "  vs plain", "",
                  ratio(p.ttft_seconds, r.ttft_seconds), ratio(r.decode_tokens_per_second, p.decode_tokens_per_second),
                  ratio(p.kv_bytes, r.kv_bytes), ratio(p.peak_rss_bytes, r.peak_rss_bytes));
    o << buf;
    for (auto& k : keys) {
      auto a = r.requests_per_second.find(k), b = p.requests_per_second.find(k);
      if (a == r.requests_per_second.end() || b == p.requests_per_second.end())
        std::snprintf(buf, sizeof buf, " %14s", "-");
      else
        std::snprintf(buf, sizeof buf, " %13.2fx", ratio(a->second, b->second));
      o << buf;
    }
    o << "\n";
  }
  o << "(ratios: TTFT, KV and peak memory as plain/config — higher is better; throughput as config/plain)\n";
  for (auto& r : rs)
    for (auto& [b, plan] : r.plans)
      if (!plan.why.empty()) o << r.name << " at batch " << b << ": " << plan.why << "\n";
  return o.str();
}

json bench_json(const std::vector<BenchResult>& rs, const ModelConfig& cfg, const BenchOptions& opt) {
  json out = {{"visual_tokens_per_image", cfg.visual_tokens_per_image()},
              {"layers", cfg.num_layers()},
              {"prompt_tokens", opt.prompt_tokens},
              {"batches", opt.batches},
              {"gen_tokens", opt.gen_tokens},
              {"repeats", opt.repeats},
              {"threads", at::get_num_threads()},
              {"blas_core", blas_core_name()},
              {"kernels", kernels::isa_name(kernels::active_isa())},
              {"weight_dtype", cfg.weight_format()},
              {"kv_dtype", opt.kv_dtype == torch::kBFloat16 ? "bf16" : "f32"},
              {"memory_budget_bytes", rs.empty() ? opt.memory_budget_bytes : rs.front().memory_budget_bytes},
              {"configs", json::array()}};
  const BenchResult& p = rs.front();
  auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
  for (auto& r : rs) {
    json rps = json::object(), rps_ratio = json::object(), batches = json::object();
    for (auto& [k, v] : r.requests_per_second) {
      rps[k] = v;
      auto b = p.requests_per_second.find(k);
      if (b != p.requests_per_second.end()) rps_ratio[k] = ratio(v, b->second);
    }
    for (auto& [b, plan] : r.plans)
      batches["b" + std::to_string(b)] = {{"run", plan.run},
                                          {"prefill", plan.one_at_a_time ? "one_at_a_time" : "joint"},
                                          {"kv_bytes", plan.kv_bytes},
                                          {"joint_bytes", plan.joint_bytes},
                                          {"one_at_a_time_bytes", plan.single_bytes},
                                          {"why", plan.why}};
    out["configs"].push_back({{"name", r.name},
                              {"reducer", r.reducer},
                              {"visual_tokens", r.visual_tokens},
                              {"inserted_tokens", r.inserted_tokens},
                              {"vision_seconds", r.vision_seconds},
                              {"ttft_seconds", r.ttft_seconds},
                              {"decode_tokens_per_second", r.decode_tokens_per_second},
                              {"requests_per_second", rps},
                              {"requests_per_second_runs", r.requests_per_second_runs},
                              {"kv_bytes", r.kv_bytes},
                              {"kv_bytes_formula", r.kv_bytes_formula},
                              {"peak_rss_bytes", r.peak_rss_bytes},
                              {"prefill_gflops", r.prefill_gflops},
                              {"batches", batches},
                              {"ratio_to_plain",
                               {{"vision_speedup", ratio(p.vision_seconds, r.vision_seconds)},
                                {"ttft_speedup", ratio(p.ttft_seconds, r.ttft_seconds)},
                                {"decode_speedup", ratio(r.decode_tokens_per_second, p.decode_tokens_per_second)},
                                {"kv_reduction", ratio(p.kv_bytes, r.kv_bytes)},
                                {"peak_memory_reduction", ratio(p.peak_rss_bytes, r.peak_rss_bytes)},
                                {"requests_per_second", rps_ratio}}}});
  }
  return out;
}

}  // namespace victor
