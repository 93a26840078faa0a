#include "victor/stats.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include "victor/error.h"

namespace victor {

std::string Interval::format(double scale, int decimals) const {
  char buf[96];
  std::snprintf(buf, sizeof buf, "%.*f [%.*f, %.*f]", decimals, estimate * scale, decimals, lo * scale,
                decimals, hi * scale);
  return buf;
}

namespace {

// Percentile interval of a statistic over `resamples` draws of n indices with replacement.
template <class Stat>
Interval percentile_bootstrap(size_t n, double estimate, int resamples, uint64_t seed, double level,
                              Stat stat) {
  if (n == 0) throw Error("bootstrap: no questions to resample");
  if (resamples < 1) throw Error("bootstrap: resamples must be >= 1");
  if (!(level > 0 && level < 1)) throw Error("bootstrap: level must be in (0, 1)");
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> pick(0, n - 1);
  std::vector<double> draws(static_cast<size_t>(resamples));
  std::vector<size_t> idx(n);
  for (auto& d : draws) {
    for (auto& i : idx) i = pick(rng);
    d = stat(idx);
  }
  std::sort(draws.begin(), draws.end());
  const double alpha = (1 - level) / 2;
  const size_t lo = size_t(std::floor(alpha * resamples));
  const size_t hi = std::min(size_t(resamples) - 1, size_t(std::ceil((1 - alpha) * resamples)) - 1);
  return {estimate, draws[lo], draws[hi]};
}

double mean(const std::vector<uint8_t>& v) {
  double s = 0;
  for (auto x : v) s += x;
  return v.empty() ? 0 : s / double(v.size());
}

}  // namespace

Interval bootstrap_mean(const std::vector<uint8_t>& c, int resamples, uint64_t seed, double level) {
  return percentile_bootstrap(c.size(), mean(c), resamples, seed, level, [&](const std::vector<size_t>& idx) {
    double s = 0;
    for (auto i : idx) s += c[i];
    return s / double(idx.size());
  });
}

Interval paired_bootstrap_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b,
                                     int resamples, uint64_t seed, double level) {
  if (a.size() != b.size())
    throw Error("paired bootstrap: the two runs scored different question counts (" +
                std::to_string(a.size()) + " and " + std::to_string(b.size()) + ")");
  return percentile_bootstrap(a.size(), mean(a) - mean(b), resamples, seed, level,
                              [&](const std::vector<size_t>& idx) {
                                double s = 0;
                                for (auto i : idx) s += double(a[i]) - double(b[i]);
                                return s / double(idx.size());
                              });
}

Interval range_of(double estimate, const std::vector<double>& repeats) {
  Interval r{estimate, estimate, estimate};
  for (double x : repeats) {
    r.lo = std::min(r.lo, x);
    r.hi = std::max(r.hi, x);
  }
  return r;
}

std::string verdict_at_most(const Interval& i, double limit) {
  if (i.hi <= limit) return "met";
  if (i.lo > limit) return "missed";
  return "not resolved";
}

std::string verdict_at_least(const Interval& i, double limit) {
  if (i.lo >= limit) return "met";
  if (i.hi < limit) return "missed";
  return "not resolved";
}

}  // namespace victor
