// The scalar instance of the CPU kernels.
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
#include "cpu/simd.hpp"
#include "cpu/attention_kernel.hpp"

namespace dattn::cpu {

void forward_scalar(const detail::DilatedParams& p) { forward_isa<ScalarIsa>(p); }
void backward_scalar(const detail::DilatedParams& p) { backward_isa<ScalarIsa>(p); }

}  // namespace dattn::cpu

