// bf16 dot-product peak loop (vdpbf16ps); this file alone is compiled with -mavx512f
// -mavx512bf16 and only called when the CPU reports AVX512_BF16. Each instruction does 16
// lanes × 2 products, counted as 2 FLOPs each (a multiply and an add), as the kernels' GEMMs are.
#include <immintrin.h>

#include "peak.hpp"

namespace dattn_bench {

double dot_bf16_loop_avx512(long iterations, float* sink) {
  const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x3f803f80));  // (1.0, 1.0) in bf16
  const __m512bh b = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x33d633d6));  // ~1e-7
  __m512 acc[12];
  for (int j = 0; j < 12; ++j) acc[j] = _mm512_set1_ps(float(j));
  for (long i = 0; i < iterations; ++i)
    for (int u = 0; u < 4; ++u)
      for (int j = 0; j < 12; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);  // 12 independent chains
  __m512 s = acc[0];
  for (int j = 1; j < 12; ++j) s = _mm512_add_ps(s, acc[j]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  *sink = lanes[0] + lanes[15];
  return double(iterations) * 4 * 12 * 16 * 2 * 2;
}

}  // namespace dattn_bench
