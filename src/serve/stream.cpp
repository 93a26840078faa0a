// Text released to a streaming client as tokens arrive, and the metrics' histograms.
#include <sstream>

#include "victor/serve/stream.h"
#include "victor/serve/api.h"

namespace victor {

namespace {
// Bytes at the end of `s` that start a UTF-8 sequence not yet complete.
size_t incomplete_utf8_tail(const std::string& s) {
  for (size_t back = 1; back <= 4 && back <= s.size(); ++back) {
    const auto c = uint8_t(s[s.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back
    size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    return need > back ? back : 0;
  }
  return 0;
}
}  // namespace

std::string TextStream::push(int64_t token) {
  if (stopped_) return "";
  tokens_.push_back(token);
  const std::string all = tok_.decode(tokens_);
  // Where a stop string starts, the text ends.
  size_t cut = std::string::npos;
  for (auto& s : stop_) cut = std::min(cut, all.find(s));
  if (cut != std::string::npos) {
    stopped_ = true;
    return release(all, cut);
  }
  // Hold back what could be the start of a stop string, and a split UTF-8 character.
  size_t hold = 0;
  for (auto& s : stop_)
    for (size_t n = std::min(s.size() - 1, all.size()); n > hold; --n)
      if (all.compare(all.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
  return release(all, all.size() - std::max(hold, incomplete_utf8_tail(all)));
}

std::string TextStream::finish() {
  if (stopped_) return "";
  const std::string all = tok_.decode(tokens_);
  return release(all, all.size());
}

std::string TextStream::release(const std::string& all, size_t end) {
  // The decoder may rewrite the end of the text as tokens arrive (a leading space dropped, bytes
  // merged): release only what extends what was already released.
  if (end <= released_.size() || all.compare(0, released_.size(), released_) != 0) return "";
  std::string out = all.substr(released_.size(), end - released_.size());
  released_ += out;
  return sanitize_utf8(out);
}

// ---- Histogram ----

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < bounds.size() && v > bounds[i]) ++i;
  ++counts[i];
  sum += v;
  ++count;
}

std::string Histogram::prometheus(const std::string& name, const std::string& help) const {
  std::ostringstream o;
  o << "# HELP " << name << " " << help << "\n# TYPE " << name << " histogram\n";
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds.size(); ++i) {
    cum += counts[i];
    o << name << "_bucket{le=\"" << bounds[i] << "\"} " << cum << "\n";
  }
  cum += counts.back();
  o << name << "_bucket{le=\"+Inf\"} " << cum << "\n";
  o << name << "_sum " << sum << "\n" << name << "_count " << count << "\n";
  return o.str();
}

}  // namespace victor
