// The fp32 FMA peak of this CPU, measured: every thread runs a register-resident loop of
// independent fused multiply-adds in the widest vector ISA the CPU has. Likewise the bf16
// dot-product peak (vdpbf16ps, float32 accumulation) where the CPU has AVX512_BF16.
#pragma once

#include <string>

namespace dattn_bench {

struct PeakResult {
  double gflops = 0;     // best of the trials, all threads together
  std::string isa;       // "avx512", "avx2+fma" or "scalar"
  int threads = 0;
};

// `trials` timed runs of about `trial_seconds` each after one warm-up run; the best is reported.
PeakResult measure_fma_peak(int threads, int trials = 3, double trial_seconds = 0.15);
// isa "avx512_bf16"; gflops 0 and isa "none" where the CPU lacks the instruction.
PeakResult measure_dot_bf16_peak(int threads, int trials = 3, double trial_seconds = 0.15);

// One thread's loop: `iterations` passes, returns the FLOPs done (2 per lane per FMA) and
// writes a value the compiler cannot drop.
double fma_loop_avx512(long iterations, float* sink);
double fma_loop_avx2(long iterations, float* sink);
double fma_loop_scalar(long iterations, float* sink);
double dot_bf16_loop_avx512(long iterations, float* sink);

}  // namespace dattn_bench
