// Which SIMD path the CPU kernels run. Picked at run time from the CPU's features; the
// environment variable DATTN_CPU_ISA=scalar|avx2|avx512 forces one (an error if the CPU lacks it).
#pragma once

namespace dattn {

enum class CpuIsa { scalar, avx2, avx512 };

bool cpu_supports(CpuIsa isa);
CpuIsa active_cpu_isa();  // reads DATTN_CPU_ISA on every call
const char* cpu_isa_name(CpuIsa isa);

}  // namespace dattn
