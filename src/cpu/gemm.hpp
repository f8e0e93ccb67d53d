// The one GEMM every tile product uses: C[M×N] (+)= op(A)·B[K×N] with B and C row-major fp32 and
// op(A) = A[M×K] row-major or, with TransposeA, the transpose of a row-major A[K×M]. N is a
// multiple of 2·width (buffers are padded). Register blocks of 6 rows × 2 vectors. alpha scales
// the product: C = alpha·op(A)·B, or C += alpha·op(A)·B. An ISA with bf16 dot products brings
// its own tile GEMM (I::tile_gemm), which this one forwards to.
#pragma once

#include <cstdint>

namespace dattn::cpu {

template <class I, int Rows, bool Accumulate, bool TransposeA>
void gemm_block(int K, const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float* c,
                std::int64_t ldc, float alpha) {
  constexpr int W = I::width;
  const bool scaled = alpha != 1.0f;
  typename I::reg acc[Rows][2];
  for (int r = 0; r < Rows; ++r) {
    acc[r][0] = Accumulate && !scaled ? I::load(c + r * ldc) : I::zero();
    acc[r][1] = Accumulate && !scaled ? I::load(c + r * ldc + W) : I::zero();
  }
  for (int k = 0; k < K; ++k) {
    const typename I::reg b0 = I::load(b + k * ldb), b1 = I::load(b + k * ldb + W);
    for (int r = 0; r < Rows; ++r) {
      const typename I::reg x = I::set1(TransposeA ? a[k * lda + r] : a[r * lda + k]);
      acc[r][0] = I::fmadd(x, b0, acc[r][0]);
      acc[r][1] = I::fmadd(x, b1, acc[r][1]);
    }
  }
  if (scaled)
    for (int r = 0; r < Rows; ++r)
      for (int h = 0; h < 2; ++h)
        acc[r][h] = Accumulate ? I::fmadd(I::set1(alpha), acc[r][h], I::load(c + r * ldc + h * W))
                               : I::mul(I::set1(alpha), acc[r][h]);
  for (int r = 0; r < Rows; ++r) {
    I::store(c + r * ldc, acc[r][0]);
    I::store(c + r * ldc + W, acc[r][1]);
  }
}

template <class I, bool Accumulate, bool TransposeA = false>
void gemm(int M, int N, int K, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
          float* c, std::int64_t ldc, float alpha = 1.0f) {
  if constexpr (requires { I::dot_bf16; }) {
    return I::template tile_gemm<Accumulate, TransposeA>(M, N, K, a, lda, b, ldb, c, ldc, alpha);
  }
  constexpr int kRows = 6, kCols = 2 * I::width;
  for (int n = 0; n < N; n += kCols) {
    int m = 0;
    for (; m + kRows <= M; m += kRows)
      gemm_block<I, kRows, Accumulate, TransposeA>(K, a + (TransposeA ? m : m * lda), lda, b + n, ldb, c + m * ldc + n, ldc, alpha);
    const float* a_rest = a + (TransposeA ? m : m * lda);
    float* c_rest = c + m * ldc + n;
    switch (M - m) {
      case 5: gemm_block<I, 5, Accumulate, TransposeA>(K, a_rest, lda, b + n, ldb, c_rest, ldc, alpha); break;
      case 4: gemm_block<I, 4, Accumulate, TransposeA>(K, a_rest, lda, b + n, ldb, c_rest, ldc, alpha); break;
      case 3: gemm_block<I, 3, Accumulate, TransposeA>(K, a_rest, lda, b + n, ldb, c_rest, ldc, alpha); break;
      case 2: gemm_block<I, 2, Accumulate, TransposeA>(K, a_rest, lda, b + n, ldb, c_rest, ldc, alpha); break;
      case 1: gemm_block<I, 1, Accumulate, TransposeA>(K, a_rest, lda, b + n, ldb, c_rest, ldc, alpha); break;
      default: break;
    }
  }
}

}  // namespace dattn::cpu
