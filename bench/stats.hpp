// Timing samples summarised as the bench reports them: median [min–max].
#pragma once

#include <algorithm>
#include <nlohmann/json.hpp>
#include <vector>

namespace dattn_bench {

struct Stat {
  double median = 0, min = 0, max = 0;
  std::vector<double> samples;
};

inline Stat summarize(std::vector<double> samples) {
  Stat s;
  s.samples = samples;
  std::sort(samples.begin(), samples.end());
  const std::size_t n = samples.size();
  s.min = samples.front();
  s.max = samples.back();
  s.median = n % 2 ? samples[n / 2] : 0.5 * (samples[n / 2 - 1] + samples[n / 2]);
  return s;
}

inline nlohmann::json stat_json(const Stat& s) {
  return {{"median", s.median}, {"min", s.min}, {"max", s.max}, {"samples", s.samples}};
}

}  // namespace dattn_bench
