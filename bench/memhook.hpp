// The heap counters of memhook.cpp (malloc interposed), and a timed call measured with them.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "stats.hpp"

extern "C" {
std::int64_t dattn_memhook_live();        // bytes live now
std::int64_t dattn_memhook_peak();        // high-water mark since the last reset
void dattn_memhook_reset_peak();          // high-water mark := bytes live now
}

namespace dattn_bench {

struct Measured {
  Stat ms;
  double extra_bytes = 0;  // max over all calls (warm-up included) of heap peak - heap before
};

// `warmup` untimed then `repeats` timed calls of call().
template <class F>
Measured measure(F&& call, int warmup, int repeats) {
  Measured m;
  std::vector<double> samples;
  std::int64_t extra = 0;
  for (int i = 0; i < warmup + repeats; ++i) {
    const std::int64_t live = dattn_memhook_live();
    dattn_memhook_reset_peak();
    const auto t0 = std::chrono::steady_clock::now();
    call();
    const auto t1 = std::chrono::steady_clock::now();
    extra = std::max(extra, dattn_memhook_peak() - live);
    if (i >= warmup) samples.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  m.ms = summarize(samples);
  m.extra_bytes = double(extra);
  return m;
}

}  // namespace dattn_bench
