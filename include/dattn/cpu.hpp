// Which SIMD path the CPU kernels run. Picked at run time from the CPU's features; the
// environment variable DATTN_CPU_ISA=scalar|avx2|avx512|avx512_bf16|amx_bf16 forces one (an error
// if the CPU lacks it). avx512_bf16 is avx512 whose bfloat16 GEMMs use bf16 dot products
// (vdpbf16ps, float32 accumulation), amx_bf16 the same on AMX tiles (tdpbf16ps; needs the Linux
// kernel's permission, which cpu_supports asks for); float32 and float16 data run the avx512
// kernels under both.
#pragma once

namespace dattn {

enum class CpuIsa { scalar, avx2, avx512, avx512_bf16, amx_bf16 };

bool cpu_supports(CpuIsa isa);
CpuIsa active_cpu_isa();  // reads DATTN_CPU_ISA on every call
const char* cpu_isa_name(CpuIsa isa);

}  // namespace dattn
