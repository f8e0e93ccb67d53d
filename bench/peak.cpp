// The measured fp32 FMA and bf16 dot-product peaks: each of `threads` OpenMP threads runs the widest loop the CPU
// supports for a fixed count; the best of several timed trials (after a warm-up) is reported.
#include "peak.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <vector>

namespace dattn_bench {

double fma_loop_scalar(long iterations, float* sink) {
  // Plain C++: the compiler vectorises what it can for the baseline ISA (SSE2).
  float a[32];
  for (int j = 0; j < 32; ++j) a[j] = 1.0f + 0.01f * float(j);
  for (long i = 0; i < iterations; ++i)
    for (int u = 0; u < 4; ++u)
      for (int j = 0; j < 32; ++j) a[j] = a[j] * 0.999999f + 1e-6f;
  float s = 0;
  for (float x : a) s += x;
  *sink = s;
  return double(iterations) * 4 * 32 * 2;
}

namespace {

double best_gflops(double (*loop)(long, float*), int threads, int trials, double trial_seconds) {
  // Calibrate on one thread to ~trial_seconds per trial, then run all threads together.
  std::vector<float> sinks(std::size_t(threads) * 16);
  long iterations = 1 << 16;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    loop(iterations, &sinks[0]);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s > 0.03) {
      iterations = std::max(1L, long(double(iterations) * trial_seconds / s));
      break;
    }
    iterations *= 2;
  }
  double best = 0;
  for (int trial = 0; trial <= trials; ++trial) {  // trial 0 is the warm-up (clocks ramp up)
    double flops = 0;
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : flops)
    { flops += loop(iterations, &sinks[std::size_t(omp_get_thread_num()) * 16]); }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (trial > 0) best = std::max(best, flops / s * 1e-9);
  }
  return best;
}

}  // namespace

PeakResult measure_fma_peak(int threads, int trials, double trial_seconds) {
  PeakResult result;
  result.threads = threads;
  double (*loop)(long, float*) = fma_loop_scalar;
  result.isa = "scalar";
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    loop = fma_loop_avx512;
    result.isa = "avx512";
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    loop = fma_loop_avx2;
    result.isa = "avx2+fma";
  }
  result.gflops = best_gflops(loop, threads, trials, trial_seconds);
  return result;
}

PeakResult measure_dot_bf16_peak(int threads, int trials, double trial_seconds) {
  PeakResult result;
  result.threads = threads;
  result.isa = "none";
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512bf16")) return result;
  result.isa = "avx512_bf16";
  result.gflops = best_gflops(dot_bf16_loop_avx512, threads, trials, trial_seconds);
  return result;
}

}  // namespace dattn_bench
