// Tiny models built in-process for the tests.
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "victor/bench.h"
#include "victor/config.h"
#include "victor/error.h"
#include "victor/image_io.h"
#include "victor/model.h"
#include "victor/safetensors.h"
#include "victor/train.h"

namespace victor::test {

inline ModelConfig tiny_config(int registers = 0, int summary_layers = -1,
                               RegisterMask mask = RegisterMask::Causal) {
  ModelConfig c = preset_config("tiny");
  c.text.vocab_size = 64;
  c.image_token_index = 60;
  c.pad_token_id = 61;
  // Victor m = 0 with k = L (or none) is the plain model, written as such.
  if (registers > 0 || (summary_layers >= 0 && summary_layers < c.num_layers()))
    c.reducer = Reducer::victor({registers, summary_layers < 0 ? std::nullopt : std::optional<int>(summary_layers), mask});
  return c;
}

// A one-repeat benchmark of `batches` x `gen` with `prompt` text tokens, quiet.
inline BenchOptions quick_bench(std::vector<int> batches, std::vector<int> gen, int prompt) {
  BenchOptions o;
  o.batches = std::move(batches);
  o.gen_tokens = std::move(gen);
  o.prompt_tokens = prompt;
  o.repeats = 1;
  o.progress = false;
  return o;
}

// The message of the victor::Error f throws, or "" when it throws none (so a test that looks for
// words in it fails).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// An image of w x h random RGB bytes drawn from LibTorch's generator seeded with `seed` (the
// pinned logits in fixtures/reducer_pins.json depend on these exact bytes).
inline Image random_image(int w, int h, uint64_t seed) {
  Image img;
  img.width = w;
  img.height = h;
  torch::manual_seed(seed);
  auto t = torch::randint(0, 256, {int64_t(w) * h * 3}, torch::kUInt8);
  img.rgb.assign(t.data_ptr<uint8_t>(), t.data_ptr<uint8_t>() + t.numel());
  return img;
}

// The same from a 64-bit LCG, leaving LibTorch's global generator alone (the serve and
// toy-reducer tests' images).
inline Image lcg_image(int w, int h, uint64_t seed) {
  Image img;
  img.width = w;
  img.height = h;
  img.rgb.resize(size_t(w) * h * 3);
  uint64_t s = seed * 2654435761u + 1;
  for (auto& b : img.rgb) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    b = uint8_t(s >> 56);
  }
  return img;
}

inline torch::Tensor random_pixels(int n, int size, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randn({n, 3, size, size});
}

// A prompt: BOS, some text, <image>, more text.
inline PromptInput prompt(const ModelConfig& c, std::vector<int64_t> before, std::vector<int64_t> after,
                          const torch::Tensor& pixels) {
  PromptInput p;
  p.ids = {1};
  p.ids.insert(p.ids.end(), before.begin(), before.end());
  for (int64_t i = 0; i < (pixels.defined() ? pixels.size(0) : 0); ++i) p.ids.push_back(c.image_token_index);
  p.ids.insert(p.ids.end(), after.begin(), after.end());
  p.pixels = pixels;
  return p;
}

// Folders made by temp_dir, removed when the test process exits normally (only by the process
// that made them: a forked child exiting must not delete its parent's files). Set
// VICTOR_KEEP_TEST_DIRS=1 to keep them for a look after a failure.
struct TempDirs {
  pid_t owner = ::getpid();
  std::vector<std::filesystem::path> paths;
  ~TempDirs() {
    if (::getpid() != owner || std::getenv("VICTOR_KEEP_TEST_DIRS")) return;
    std::error_code ec;
    for (const auto& p : paths) std::filesystem::remove_all(p, ec);
  }
};

// A saved folder's tensors under the 2025 hub key layout (model.language_model.*,
// model.vision_tower.*, model.multi_modal_projector.*, model.image_newline, lm_head.weight), as
// newer transformers save LLaVA and LLaVA-NeXT.
inline std::vector<std::pair<std::string, torch::Tensor>> tensors_in_2025_layout(const std::string& dir) {
  SafetensorsFile f(dir + "/model.safetensors");
  std::vector<std::pair<std::string, torch::Tensor>> ts;
  for (auto& [n, i] : f.tensors()) {
    std::string r = n;
    if (r.rfind("language_model.model.", 0) == 0) r = "model.language_model." + r.substr(21);
    else if (r == "language_model.lm_head.weight") r = "lm_head.weight";
    else if (r.rfind("vision_tower.", 0) == 0 || r.rfind("multi_modal_projector.", 0) == 0 || r == "image_newline")
      r = "model." + r;
    ts.emplace_back(r, f.load(n).clone());
  }
  return ts;
}

// The mean next-token loss of a model over samples' targets (no gradient).
inline float mean_loss(const Vlm& m, const std::vector<TrainSample>& samples) {
  torch::NoGradGuard ng;
  std::vector<PromptInput> rows;
  for (auto& s : samples) rows.push_back(s.input);
  auto out = m.forward(m.assemble(rows, false));
  auto sel = out.targets.ne(-100);
  return torch::nn::functional::cross_entropy(m.logits(out.hidden.index({sel})), out.targets.index({sel})).item<float>();
}

inline std::string temp_dir(const std::string& name) {
  static TempDirs made;
  auto p = std::filesystem::temp_directory_path() /
           ("victor_test_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  made.paths.push_back(p);
  return p.string();
}

// Logits at the last valid position of each row of a full (cache-free) forward.
inline torch::Tensor last_logits(const Vlm& m, const std::vector<PromptInput>& rows, bool pad_left = true) {
  torch::NoGradGuard ng;
  auto out = m.forward(m.assemble(rows, pad_left));
  auto valid = out.meta.kind.ne(int64_t(TokenKind::Pad)).to(torch::kInt64);
  auto last = (valid * torch::arange(valid.size(1))).argmax(1);
  return m.logits(out.hidden.index({torch::arange(int64_t(rows.size())), last}));
}

// Greedy decoding with the cache, then a full recompute over prompt + generated tokens must give
// the same logits at every step (within `tol`, relative and absolute).
void check_incremental_equals_full(const Vlm& m, const PromptInput& p, int steps, double tol = 1e-4);

}  // namespace victor::test
