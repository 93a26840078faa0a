// `victor serve`'s text and metrics pieces (src/serve/stream.cpp): the text released to a client
// as tokens arrive, and the Prometheus histograms.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "victor/tokenizer.h"

namespace victor {

// ---- Text released to a client as tokens arrive (stop strings, split UTF-8 held back) ----
class TextStream {
 public:
  TextStream(const Tokenizer& tok, std::vector<std::string> stop) : tok_(tok), stop_(std::move(stop)) {}
  // Adds a token; returns the text that may be released now (sanitize_utf8'd; the pieces join
  // to sanitize_utf8 of the whole text). stopped() turns true when a stop string appeared (the
  // text ends before it).
  std::string push(int64_t token);
  // The rest of the text at the end of the generation.
  std::string finish();
  bool stopped() const { return stopped_; }

 private:
  // all[released_.size(), end), when `all` still begins with what was released; sanitized.
  std::string release(const std::string& all, size_t end);
  const Tokenizer& tok_;
  std::vector<std::string> stop_;
  std::vector<int64_t> tokens_;
  std::string released_;  // raw bytes released so far
  bool stopped_ = false;
};

// ---- Metrics ----
struct Histogram {
  std::vector<double> bounds;  // upper bounds, ascending (+Inf implied)
  std::vector<uint64_t> counts;  // per bound, not cumulative; last = +Inf
  double sum = 0;
  uint64_t count = 0;
  explicit Histogram(std::vector<double> b) : bounds(std::move(b)), counts(bounds.size() + 1, 0) {}
  void observe(double v);
  std::string prometheus(const std::string& name, const std::string& help) const;
};

}  // namespace victor
