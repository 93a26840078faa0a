// A one-line progress bar on a terminal (stderr); silent when stderr is not a terminal
// unless forced, so logs stay clean.
#pragma once
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>

namespace victor {

class Progress {
 public:
  Progress(std::string label, int64_t total, bool enabled = isatty(2))
      : label_(std::move(label)), total_(total), enabled_(enabled),
        start_(std::chrono::steady_clock::now()) {}
  ~Progress() { finish(); }
  // `extra` is printed after the bar (loss, tokens/s, ...).
  void update(int64_t done, const std::string& extra = "") {
    if (!enabled_) return;
    auto now = std::chrono::steady_clock::now();
    if (done < total_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    double el = std::chrono::duration<double>(now - start_).count();
    double eta = done > 0 ? el * double(total_ - done) / double(done) : 0.0;
    int width = 24, fill = total_ > 0 ? int(width * done / total_) : width;
    std::string bar(size_t(fill), '#');
    bar.append(size_t(width - fill), '.');
    std::fprintf(stderr, "\r%s [%s] %lld/%lld %s elapsed %s eta %s   ", label_.c_str(), bar.c_str(),
                 (long long)done, (long long)total_, extra.c_str(), clock(el).c_str(),
                 clock(eta).c_str());
    std::fflush(stderr);
    shown_ = true;
  }
  void finish() {
    if (shown_) std::fprintf(stderr, "\n");
    shown_ = false;
  }
  double elapsed() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  static std::string clock(double s) {
    char b[32];
    int t = int(s + 0.5);
    std::snprintf(b, sizeof b, "%d:%02d", t / 60, t % 60);
    return b;
  }
  std::string label_;
  int64_t total_;
  bool enabled_, shown_ = false;
  std::chrono::steady_clock::time_point start_, last_{};
};

}  // namespace victor
