// AVX-512 with bf16 dot products (vdpbf16ps): the AVX-512 vocabulary plus a tile GEMM whose
// operands are rounded to bf16 pairs and whose products accumulate in float32. Used for bfloat16
// data only, where q, k, v and dout are bf16 already and the rounding touches P, dS and dP alone.
// Include only under `#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma,f16c")`.
#pragma once

#include <vector>

#include "cpu/simd_avx512.hpp"

namespace dattn::cpu {

namespace dot_bf16 {

// Rows `even` and `odd` (16 columns each) as 16 bf16 pairs, (even[j], odd[j]) in lane j: the
// operand layout of vdpbf16ps, which adds a[2j]·b[2j] + a[2j+1]·b[2j+1] into float lane j.
inline __m512i pair_rows(__m512 even, __m512 odd) {
  const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even));  // [even | odd]
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, both);
}

// src[K × n] (row pitch ld, n a multiple of 16) as pairs of rows [ceil(K/2) × n]; an odd K's
// last pair has a zero partner, so the padding adds nothing.
inline void pack_row_pairs(const float* src, std::int64_t ld, int K, int n, std::uint32_t* dst) {
  for (int k = 0; k < K; k += 2, dst += n) {
    const float* even = src + k * ld;
    const float* odd = k + 1 < K ? even + ld : nullptr;
    for (int j = 0; j < n; j += 16) {
      const __m512 o = odd ? _mm512_loadu_ps(odd + j) : _mm512_setzero_ps();
      _mm512_storeu_si512(dst + j, pair_rows(_mm512_loadu_ps(even + j), o));
    }
  }
}

// a[M × K] (row pitch lda) as each row's consecutive pairs [M × ceil(K/2)], zero past K.
inline void pack_column_pairs(const float* a, std::int64_t lda, int M, int K, std::uint32_t* dst) {
  const int pairs = (K + 1) / 2;
  for (int r = 0; r < M; ++r)
    for (int k = 0; k < K; k += 32) {
      const int rest = K - k;
      const __mmask16 lo = rest >= 16 ? __mmask16(0xffff) : __mmask16((1u << rest) - 1);
      const __mmask16 hi = rest >= 32 ? __mmask16(0xffff) : rest <= 16 ? 0 : __mmask16((1u << (rest - 16)) - 1);
      const float* row = a + r * lda + k;
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, row + 16), _mm512_maskz_loadu_ps(lo, row));
      const int n = std::min(16, (rest + 1) / 2);
      _mm512_mask_storeu_epi32(dst + r * pairs + k / 2, __mmask16((1u << n) - 1), reinterpret_cast<__m512i>(v));
    }
}

// Rows × 32 columns of C from pairs: a's pair p of row r at a[r·a_row + p·a_pair], b's pairs
// [pairs × n]. alpha scales the product (C = alpha·A·B, or C += alpha·A·B).
template <int Rows, bool Accumulate>
void block(int pairs, const std::uint32_t* a, std::int64_t a_row, std::int64_t a_pair, const std::uint32_t* b, int n,
           float* c, std::int64_t ldc, float alpha) {
  const bool scaled = alpha != 1.0f;
  __m512 acc[Rows][2];
  for (int r = 0; r < Rows; ++r) {
    acc[r][0] = Accumulate && !scaled ? _mm512_loadu_ps(c + r * ldc) : _mm512_setzero_ps();
    acc[r][1] = Accumulate && !scaled ? _mm512_loadu_ps(c + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int p = 0; p < pairs; ++p) {
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + p * n));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + p * n + 16));
    for (int r = 0; r < Rows; ++r) {
      const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(int(a[r * a_row + p * a_pair])));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int h = 0; h < 2; ++h) {
      float* at = c + r * ldc + 16 * h;
      __m512 x = acc[r][h];
      if (scaled)
        x = Accumulate ? _mm512_fmadd_ps(_mm512_set1_ps(alpha), x, _mm512_loadu_ps(at))
                       : _mm512_mul_ps(_mm512_set1_ps(alpha), x);
      _mm512_storeu_ps(at, x);
    }
}

template <bool Accumulate>
void blocks(int M, int N, int pairs, const std::uint32_t* a, std::int64_t a_row, std::int64_t a_pair,
            const std::uint32_t* b, float* c, std::int64_t ldc, float alpha) {
  constexpr int kRows = 6;
  for (int n = 0; n < N; n += 32) {
    int m = 0;
    for (; m + kRows <= M; m += kRows)
      block<kRows, Accumulate>(pairs, a + m * a_row, a_row, a_pair, b + n, N, c + m * ldc + n, ldc, alpha);
    const std::uint32_t* a_rest = a + m * a_row;
    float* c_rest = c + m * ldc + n;
    switch (M - m) {
      case 5: block<5, Accumulate>(pairs, a_rest, a_row, a_pair, b + n, N, c_rest, ldc, alpha); break;
      case 4: block<4, Accumulate>(pairs, a_rest, a_row, a_pair, b + n, N, c_rest, ldc, alpha); break;
      case 3: block<3, Accumulate>(pairs, a_rest, a_row, a_pair, b + n, N, c_rest, ldc, alpha); break;
      case 2: block<2, Accumulate>(pairs, a_rest, a_row, a_pair, b + n, N, c_rest, ldc, alpha); break;
      case 1: block<1, Accumulate>(pairs, a_rest, a_row, a_pair, b + n, N, c_rest, ldc, alpha); break;
      default: break;
    }
  }
}

}  // namespace dot_bf16

struct Avx512Bf16Isa : Avx512Isa {
  static constexpr bool dot_bf16 = true;
  using Exact = Avx512Isa;  // the float32 GEMMs, for products whose bf16 rounding would not hold the bar

  // gemm()'s contract (see gemm.hpp) with bf16 operands: both are packed into bf16 pairs per call,
  // in per-thread buffers that grow to the largest tile once (the GEMM has no scratch of its own).
  template <bool Accumulate, bool TransposeA>
  static void tile_gemm(int M, int N, int K, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
                        float* c, std::int64_t ldc, float alpha) {
    thread_local std::vector<std::uint32_t> a_pairs, b_pairs;
    const int pairs = (K + 1) / 2;
    b_pairs.resize(std::size_t(pairs) * N);
    dot_bf16::pack_row_pairs(b, ldb, K, N, b_pairs.data());
    if constexpr (TransposeA) {
      // a is [K × M] with pitch lda >= M rounded up to 16 (the tiles are padded): pair its rows.
      const int m16 = (M + 15) / 16 * 16;
      a_pairs.resize(std::size_t(pairs) * m16);
      dot_bf16::pack_row_pairs(a, lda, K, m16, a_pairs.data());
      dot_bf16::blocks<Accumulate>(M, N, pairs, a_pairs.data(), 1, m16, b_pairs.data(), c, ldc, alpha);
    } else {
      a_pairs.resize(std::size_t(pairs) * M);
      dot_bf16::pack_column_pairs(a, lda, M, K, a_pairs.data());
      dot_bf16::blocks<Accumulate>(M, N, pairs, a_pairs.data(), pairs, 1, b_pairs.data(), c, ldc, alpha);
    }
  }
};

}  // namespace dattn::cpu
