#include "victor/generate.h"
#include "victor/ops.h"

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "victor/error.h"

namespace victor {

namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}
int64_t count_kind(const TokenMeta& m, int64_t row, TokenKind k) {
  return m.kind[row].eq(int64_t(k)).sum().item<int64_t>();
}
}  // namespace

std::vector<int64_t> prompt_ids(const Tokenizer& tok, const std::string& prompt, size_t n_images,
                                int64_t context_tokens) {
  if (prompt.find_first_not_of(" \t\r\n") == std::string::npos)
    throw Error("prompt: empty prompt");
  // Text that cannot fit the context however it is split is refused before it is tokenized.
  if (context_tokens > 0 && prompt.size() > size_t(context_tokens) * tok.max_bytes_per_token())
    throw Error("prompt: " + std::to_string(prompt.size()) + " bytes of text cannot fit in the model's context of " +
                std::to_string(context_tokens) + " tokens");
  size_t found = 0;
  for (size_t p = prompt.find("<image>"); p != std::string::npos; p = prompt.find("<image>", p + 1))
    ++found;
  std::string text = prompt;
  if (found == 0)
    for (size_t i = 0; i < n_images; ++i) text = "<image>\n" + text;
  else if (found != n_images)
    throw Error("prompt: has " + std::to_string(found) + " <image> placeholders but " +
                std::to_string(n_images) + " images were given");
  return encode_chat(tok, {{text, ""}}).ids;
}

torch::Tensor sample_next(const torch::Tensor& logits_in, const SamplingOptions& opt,
                          at::Generator& gen) {
  // A temperature that is zero in float32 (1e-300, 1e-45) is greedy: dividing by it would give
  // inf - inf = nan in the softmax.
  const float t = float(opt.temperature);
  if (t <= 0 || !std::isnormal(t)) return logits_in.argmax(-1);
  auto logits = logits_in / t;
  // A small one can still overflow: the same distribution from logits shifted to a maximum of 0
  // (the best token keeps 0, the others go to -inf at worst, never nan).
  if (!torch::isfinite(logits).all().item<bool>()) logits = (logits_in - logits_in.amax(-1, true)) / t;
  const int64_t V = logits.size(-1);
  if (opt.top_k > 0 && opt.top_k < V) {
    auto kth = std::get<0>(logits.topk(opt.top_k, -1)).select(-1, opt.top_k - 1).unsqueeze(-1);
    logits = logits.masked_fill(logits.lt(kth), -INFINITY);
  }
  if (opt.top_p < 1.0) {
    auto sorted = logits.sort(-1, /*descending=*/true);
    auto vals = std::get<0>(sorted), idx = std::get<1>(sorted);
    auto cum = torch::softmax(vals, -1).cumsum(-1);
    // Drop a token once the mass before it already reaches top_p (the first always stays).
    auto remove = (cum - torch::softmax(vals, -1)).gt(opt.top_p);
    vals = vals.masked_fill(remove, -INFINITY);
    logits = torch::full_like(logits, -INFINITY).scatter(-1, idx, vals);
  }
  auto probs = torch::softmax(logits, -1);
  return torch::multinomial(probs, 1, false, gen).squeeze(-1);
}

torch::ScalarType kv_dtype_from_string(const std::string& s, const std::string& what) {
  if (s == "f32" || s == "float32") return torch::kFloat32;
  if (s == "bf16" || s == "bfloat16") return torch::kBFloat16;
  throw Error(what + ": unknown KV-cache dtype '" + s + "' (expected f32 or bf16)");
}

int64_t kv_bytes_formula(const ModelConfig& c, int64_t text, int64_t images, int64_t generated,
                         int64_t element_bytes) {
  const int64_t per_row = 2 * int64_t(c.text.num_key_value_heads) * c.text.head_dim() * element_bytes;
  return per_row * c.reducer.kv_rows(c, text, images, generated);
}

double prefill_flops(const ModelConfig& c, int64_t text, int64_t images) {
  return c.reducer.prefill_flops(c, text, images);
}

std::vector<int64_t> visual_rows_of(const ModelConfig& c, const PromptInput& in) {
  std::vector<int64_t> out;
  if (!in.layouts.empty()) {
    for (auto& l : in.layouts) out.push_back(image_rows(c, l));
  } else {
    out.assign(size_t(in.images()), c.visual_tokens_per_image());
  }
  return out;
}

int64_t views_of(const PromptInput& in) { return in.pixels.defined() ? in.pixels.size(0) : 0; }

int64_t kv_bytes_formula(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual, int64_t generated,
                         int64_t element_bytes) {
  const int64_t per_row = 2 * int64_t(c.text.num_key_value_heads) * c.text.head_dim() * element_bytes;
  return per_row * c.reducer.kv_rows(c, text, visual, generated);
}

double prefill_flops(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual, int64_t views) {
  return c.reducer.prefill_flops(c, text, visual, views);
}

int64_t prefill_activation_bytes(const ModelConfig& c, int64_t text, const std::vector<int64_t>& visual,
                                 int64_t views_per_image) {
  const int64_t f = 4;  // activations are float32
  int64_t vision = 0;
  if (!visual.empty() && views_per_image > 0) {
    // Per view: the patches' rows through a layer (x, norm, q, k, v, attention out, projection,
    // residual: 8 x D; the MLP's 2 x F), the kept feature layer, scores and softmax [H,T,T], the
    // pixels; then the projector's rows (2 x its width + the LLM's).
    const VisionConfig& v = c.vision;
    const int64_t n = views_per_image, T = v.num_patches() + 1, D = v.hidden_size, F = v.intermediate_size;
    const int64_t d = c.text.hidden_size;
    vision = f * n * (T * (9 * D + 2 * F) + 2 * int64_t(v.num_attention_heads) * T * T +
                      int64_t(v.num_channels) * v.image_size * v.image_size + T * 3 * d);
  }
  // The decoder: every row before any drop. Per row: d-wide x, norm, q, rotated q, attention out,
  // its transposed copy, o, residual, norm, down, sum (11 d); K/V wide k, v, rotated k and float
  // copies of a bf16 cache (5 dkv); the MLP's gate, up, silu, product (4 F). Scores: three copies
  // of a query block [H, block, rows] and the bool masks [rows, rows] (two).
  const TextConfig& t = c.text;
  int64_t rows = text + int64_t(visual.size()) * c.reducer.inserted_rows();
  for (int64_t r : visual) rows += r;
  const int64_t d = t.hidden_size, H = t.num_attention_heads;
  const int64_t dkv = int64_t(t.num_key_value_heads) * t.head_dim(), F = t.intermediate_size;
  const int64_t block = std::min(rows, attention_query_block(H, rows));
  const int64_t decoder = f * rows * (11 * d + 5 * dkv + 4 * F) + 3 * f * H * block * rows + 2 * rows * rows;
  // The assembled embeddings stay through the decoder; the last row's logits.
  return std::max(vision, decoder) + f * rows * d + f * t.vocab_size;
}

void add_image(PromptInput& in, const Image& img, const ModelConfig& c) {
  PreparedImage p = prepare_image(img, c);
  in.pixels = in.pixels.defined() && in.pixels.size(0) > 0 ? torch::cat({in.pixels, p.pixels}, 0) : p.pixels;
  if (c.is_next()) in.layouts.push_back(p.layout);
}

ModelConfig without_reducer(const ModelConfig& c) {
  ModelConfig p = c;
  p.reducer = Reducer::none();
  return p;
}

GenerationResult generate_ids(const Vlm& model, const std::vector<PromptInput>& inputs,
                              int64_t eos_id, const SamplingOptions& opt) {
  if (inputs.empty()) throw Error("generate: no requests");
  if (opt.max_new_tokens < 1) throw Error("generate: max_new_tokens must be >= 1");
  // NaN passes range checks (every comparison is false) and would reach the sampler as NaN
  // probabilities: refused here, by name, for every caller.
  if (!std::isfinite(opt.temperature) || opt.temperature < 0)
    throw Error("generate: temperature must be a finite number >= 0 (got " + std::to_string(opt.temperature) + ")");
  if (!(opt.top_p >= 0 && opt.top_p <= 1))
    throw Error("generate: top_p must be a number in [0, 1] (got " + std::to_string(opt.top_p) + ")");
  if (opt.top_k < 0) throw Error("generate: top_k must be >= 0");
  torch::NoGradGuard no_grad;
  const auto& cfg = model.config();
  const int64_t B = inputs.size();
  GenerationResult res;
  res.tokens.resize(B);
  GenerationStats& st = res.stats;
  st.batch = B;
  st.layers = cfg.num_layers();
  st.reducer = cfg.reducer.name();
  st.reduce_layer = std::min(cfg.reducer.reduce_layer(cfg).value_or(cfg.num_layers()), cfg.num_layers());
  auto t0 = Clock::now();
  const int64_t max_pos = cfg.text.max_position_embeddings;
  // Each request's text rows (for the plain model's KV figure); row 0's counts go to the stats.
  std::vector<int64_t> text_rows(size_t(B), 0);
  auto prepare = [&](const std::vector<PromptInput>& rows, int64_t first) {
    auto tv = Clock::now();
    std::vector<torch::Tensor> image_embeds = model.encode_prompt_images(rows);
    st.vision_seconds += seconds_since(tv);
    SequenceBatch batch = model.assemble(rows, image_embeds, /*pad_left=*/true);
    if (batch.embeds.size(1) + opt.max_new_tokens > max_pos)
      throw Error("request too long: " + std::to_string(batch.embeds.size(1)) + " prompt rows + " +
                  std::to_string(opt.max_new_tokens) + " new tokens exceed max_position_embeddings " +
                  std::to_string(max_pos));
    for (size_t r = 0; r < rows.size(); ++r)
      text_rows[size_t(first) + r] = count_kind(batch.meta, int64_t(r), TokenKind::Text);
    if (first == 0) {
      st.prompt_tokens = count_kind(batch.meta, 0, TokenKind::Text);
      st.visual_tokens = count_kind(batch.meta, 0, TokenKind::Visual);
      st.register_tokens = count_kind(batch.meta, 0, TokenKind::Register);
    }
    return batch;
  };

  // Prefill: the whole batch at once (one padded cache), or one request at a time into caches
  // of their own that then decode together, as the server does: a batch whose joint prefill
  // would not fit in memory (LLaVA-NeXT at batch 16) still runs.
  KvCache cache;
  std::vector<KvCache> own;
  torch::Tensor logits;
  if (!opt.prefill_one_at_a_time || B == 1) {
    SequenceBatch batch = prepare(inputs, 0);
    std::tie(cache, logits) = model.prefill(batch, opt.kv_dtype, opt.max_new_tokens);
  } else {
    std::vector<torch::Tensor> first;
    for (int64_t b = 0; b < B; ++b) {
      SequenceBatch batch = prepare({inputs[size_t(b)]}, b);
      auto [c, l] = model.prefill(batch, opt.kv_dtype, opt.max_new_tokens);
      own.push_back(std::move(c));
      first.push_back(l);
    }
    logits = torch::cat(first, 0);
  }
  std::vector<KvCache*> own_ptrs;
  for (auto& c : own) own_ptrs.push_back(&c);
  st.tokens_before_drop = st.prompt_tokens + st.visual_tokens + st.register_tokens;
  // Rows each image still holds past the reduction: FastV's kept rows, Victor's registers alone,
  // or all of them.
  st.tokens_after_drop = st.prompt_tokens;
  for (int64_t n : visual_rows_of(cfg, inputs[0])) st.tokens_after_drop += cfg.reducer.rows_past_reduction(cfg, n);

  auto gen = at::detail::createCPUGenerator(opt.seed);
  std::vector<torch::Tensor> kept_logits;
  std::vector<bool> done(B, false);
  int64_t fed = 0;
  torch::Tensor next;
  auto td = Clock::now();
  for (int step = 0; step < opt.max_new_tokens; ++step) {
    if (step > 0) {
      logits = own.empty() ? model.decode_step(next, cache) : model.decode_step(next, own_ptrs);
      ++fed;
    }
    if (opt.keep_logits) kept_logits.push_back(logits.clone());
    next = sample_next(logits, opt, gen);
    if (step == 0) {
      st.ttft_seconds = seconds_since(t0);
      td = Clock::now();
    }
    auto acc = next.accessor<int64_t, 1>();
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      if (!done[b]) {
        if (acc[b] == eos_id) done[b] = true;
        else res.tokens[b].push_back(acc[b]);
      }
      all_done = all_done && done[b];
    }
    if (all_done) break;
  }
  st.decode_seconds = seconds_since(td);
  for (auto& t : res.tokens) st.generated_tokens += t.size();
  st.decode_tokens_per_second = fed > 0 && st.decode_seconds > 0 ? fed * B / st.decode_seconds : 0;
  st.kv_bytes = cache.bytes();
  for (auto& c : own) st.kv_bytes += c.bytes();
  const ModelConfig plain = without_reducer(cfg);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t text = text_rows[size_t(b)];
    st.kv_bytes_plain += kv_bytes_formula(plain, text, visual_rows_of(plain, inputs[b]), fed,
                                          int64_t(c10::elementSize(opt.kv_dtype)));
    if (b == 0) {
      st.prefill_gflops = prefill_flops(cfg, text, visual_rows_of(cfg, inputs[b]), views_of(inputs[b])) / 1e9;
      st.prefill_gflops_plain = prefill_flops(plain, text, visual_rows_of(plain, inputs[b]), views_of(inputs[b])) / 1e9;
    }
  }
  if (opt.keep_logits) res.step_logits = torch::stack(kept_logits, 0);
  return res;
}

GenerationResult generate(const Vlm& model, const Tokenizer& tok, const std::vector<Request>& reqs,
                          const SamplingOptions& opt) {
  const auto& cfg = model.config();
  std::vector<PromptInput> inputs;
  for (auto& r : reqs) {
    PromptInput in;
    in.ids = prompt_ids(tok, r.prompt, r.images.size(), cfg.text.max_position_embeddings);
    for (auto& img : r.images) add_image(in, img, cfg);
    inputs.push_back(std::move(in));
  }
  GenerationResult res = generate_ids(model, inputs, opt.ignore_eos ? -1 : tok.eos_id(), opt);
  for (auto& t : res.tokens) res.texts.push_back(tok.decode(t));
  return res;
}

std::string format_stats(const GenerationStats& s) {
  char buf[2048];
  auto mib = [](int64_t b) { return double(b) / (1024.0 * 1024.0); };
  std::ostringstream o;
  std::snprintf(buf, sizeof buf,
                "tokens: %lld prompt text, %lld visual, %lld registers, %lld generated (batch %lld)\n",
                (long long)s.prompt_tokens, (long long)s.visual_tokens, (long long)s.register_tokens,
                (long long)s.generated_tokens, (long long)s.batch);
  o << buf;
  if (s.reduce_layer < s.layers)
    std::snprintf(buf, sizeof buf,
                  "reducer %s: layers 0-%d see %lld tokens; layers %d-%d see %lld\n", s.reducer.c_str(),
                  s.reduce_layer - 1, (long long)s.tokens_before_drop, s.reduce_layer, s.layers - 1,
                  (long long)s.tokens_after_drop);
  else
    std::snprintf(buf, sizeof buf, "reducer %s: all %d layers see %lld tokens\n", s.reducer.c_str(), s.layers,
                  (long long)s.tokens_before_drop);
  o << buf;
  std::snprintf(buf, sizeof buf,
                "time to first token: %.3f s (vision %.3f s); decode: %.2f tokens/s\n",
                s.ttft_seconds, s.vision_seconds, s.decode_tokens_per_second);
  o << buf;
  std::snprintf(buf, sizeof buf, "kv cache: %.3f MiB (without reducer %.3f MiB, %.2fx)\n",
                mib(s.kv_bytes), mib(s.kv_bytes_plain),
                s.kv_bytes > 0 ? double(s.kv_bytes_plain) / s.kv_bytes : 0.0);
  o << buf;
  std::snprintf(buf, sizeof buf, "prefill: %.3f GFLOPs (without reducer %.3f GFLOPs, %.2fx)\n",
                s.prefill_gflops, s.prefill_gflops_plain,
                s.prefill_gflops > 0 ? s.prefill_gflops_plain / s.prefill_gflops : 0.0);
  o << buf;
  return o.str();
}

}  // namespace victor
