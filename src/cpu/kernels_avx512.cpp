// The avx512 instance of the CPU kernels.
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
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")
#include "cpu/simd_avx512.hpp"
#include "cpu/attention_kernel.hpp"

namespace dattn::cpu {

void forward_avx512(const detail::DilatedParams& p) { forward_isa<Avx512Isa>(p); }
void backward_avx512(const detail::DilatedParams& p) { backward_isa<Avx512Isa>(p); }

}  // namespace dattn::cpu
#pragma GCC pop_options
