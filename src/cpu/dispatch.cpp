// Picks the SIMD level once per call: the best the CPU has, or the one DATTN_CPU_ISA forces.
#include <cstdlib>
#include <string>

#include "cpu/cpu_attention.hpp"
#include "cpu/isa_kernels.hpp"
#include "dattn/cpu.hpp"
#include "dattn/error.hpp"

namespace dattn {

bool cpu_supports(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::scalar: return true;
    case CpuIsa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case CpuIsa::avx512:
      return cpu_supports(CpuIsa::avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
  }
  return false;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::scalar: return "scalar";
    case CpuIsa::avx2: return "avx2";
    case CpuIsa::avx512: return "avx512";
  }
  return "unknown";
}

CpuIsa active_cpu_isa() {
  const char* forced = std::getenv("DATTN_CPU_ISA");
  if (forced && *forced) {
    for (CpuIsa isa : {CpuIsa::scalar, CpuIsa::avx2, CpuIsa::avx512})
      if (std::string(forced) == cpu_isa_name(isa)) {
        if (!cpu_supports(isa))
          throw Error(std::string("DATTN_CPU_ISA=") + forced + " but this CPU lacks " + forced +
                      "; expected one of the supported paths or unset");
        return isa;
      }
    throw Error(std::string("DATTN_CPU_ISA=") + forced + "; expected scalar, avx2 or avx512");
  }
  if (cpu_supports(CpuIsa::avx512)) return CpuIsa::avx512;
  if (cpu_supports(CpuIsa::avx2)) return CpuIsa::avx2;
  return CpuIsa::scalar;
}

namespace cpu {

void forward(const detail::DilatedParams& params) {
  switch (active_cpu_isa()) {
    case CpuIsa::avx512: return forward_avx512(params);
    case CpuIsa::avx2: return forward_avx2(params);
    case CpuIsa::scalar: return forward_scalar(params);
  }
}

void backward(const detail::DilatedParams& params) {
  switch (active_cpu_isa()) {
    case CpuIsa::avx512: return backward_avx512(params);
    case CpuIsa::avx2: return backward_avx2(params);
    case CpuIsa::scalar: return backward_scalar(params);
  }
}

}  // namespace cpu
}  // namespace dattn
