// Confidence intervals for accuracies and paired differences (percentile bootstrap over
// questions), and the three-way verdict every "target met" claim uses.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace victor {

struct Interval {
  double estimate = 0, lo = 0, hi = 0;  // point estimate and the interval's ends
  std::string format(double scale = 100, int decimals = 1) const;  // "74.1 [72.9, 75.3]"
};

// 95% (by default) percentile-bootstrap interval of the mean of `correct` (0/1 per question).
Interval bootstrap_mean(const std::vector<uint8_t>& correct, int resamples = 2000,
                        uint64_t seed = 1, double level = 0.95);
// Interval of mean(a) - mean(b) where a[i] and b[i] score the same question i: questions are
// resampled together, so what both get right or wrong cancels.
Interval paired_bootstrap_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b,
                                     int resamples = 2000, uint64_t seed = 1, double level = 0.95);

// A measured figure and the range of its repeated measurements: estimate, and lo/hi the smallest
// and largest of `repeats` and the estimate itself (a "several runs with their range" interval).
Interval range_of(double estimate, const std::vector<double>& repeats);

// "met" when the whole interval lies at or below `limit`, "missed" when it lies wholly above,
// else "not resolved" (e.g. a drop interval against "at most 4 points").
std::string verdict_at_most(const Interval& i, double limit);
// "met" when the whole interval lies at or above `limit`, "missed" when wholly below.
std::string verdict_at_least(const Interval& i, double limit);

}  // namespace victor
