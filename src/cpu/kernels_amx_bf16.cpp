// The amx_bf16 instance of the CPU kernels: bfloat16 data only (dispatch.cpp sends other dtypes to avx512).
// Standard and API headers come before the target pragma so that no ISA-specific copy of a
// shared inline function exists; everything after it is a template over the ISA (or a static
// function), so each translation unit owns its instances.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/isa_kernels.hpp"
#include "dattn/philox.hpp"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c")
#include "cpu/simd_amx_bf16.hpp"
#include "cpu/attention_kernel.hpp"
#include "cpu/amx_attention.hpp"

namespace dattn::cpu {

void forward_amx_bf16(const detail::DilatedParams& p) { forward_typed<AmxBf16Isa, BFloat16>(p); }
void backward_amx_bf16(const detail::DilatedParams& p) { backward_typed<AmxBf16Isa, BFloat16>(p); }

}  // namespace dattn::cpu
#pragma GCC pop_options
