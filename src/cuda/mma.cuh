// Warp-level building blocks of the CUDA kernels: mma.sync m16n8k16 (bf16 / fp16 in, fp32
// accumulate), ldmatrix fragment loads, cp.async tile copies and the split of fp32 values into
// bf16 planes (the exact and fast fp32 paths run on the same tensor-core code: x = hi + mid + lo).
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"), with g = lane / 4 and t = lane % 4:
//   A (16×16, row major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16×8, column)    : b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C (16×8, fp32)      : c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// so the accumulators of two neighbouring 8-column tiles are, once packed to 16 bits, exactly the
// A fragment of one 16-deep k step (the probabilities never leave registers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace dattn::cuda {

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
// The exponent base of a running softmax max: the max, or 0 while it is -inf (every score so far
// masked), so that exp2(score - base) gives 0 for those scores instead of exp2(-inf + inf) = NaN.
__device__ __forceinline__ float softmax_base(float max) { return max == neg_inf() ? 0.0f : max; }

// 2^x with the hardware unit (relative error ~2^-22); exp2(-inf) = 0, NaN stays NaN. Results below
// 2^-126 flush to 0 (ftz: one MUFU instruction; without it the compiler adds a range test and two
// rescaling multiplies around every exp2), far below what a probability next to the row's maximum
// (1) contributes to a softmax.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ std::uint32_t smem_address(const void* p) {
  return std::uint32_t(__cvta_generic_to_shared(p));
}

// ---- mma ----
template <class M>
__device__ __forceinline__ void mma_16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                          std::uint32_t b1) {
  if constexpr (std::is_same_v<M, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---- ldmatrix ----
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// ---- cp.async ----
// Copies 16 bytes, or writes 16 zero bytes when !valid (the source is then not read).
__device__ __forceinline__ void cp_async_16(std::uint32_t smem, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(bytes));
}
// Copies 4 bytes (zeros when !valid).
__device__ __forceinline__ void cp_async_4(std::uint32_t smem, const void* gmem, bool valid) {
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- packing and splitting ----
template <class M>
__device__ __forceinline__ std::uint32_t pack2(float x0, float x1) {
  if constexpr (std::is_same_v<M, __half>) {
    const __half2 h = __floats2half2_rn(x0, x1);
    return *reinterpret_cast<const std::uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    return *reinterpret_cast<const std::uint32_t*>(&h);
  }
}

template <class M>
__device__ __forceinline__ float smem_value(std::uint16_t bits) {
  if constexpr (std::is_same_v<M, __half>) return __half2float(__ushort_as_half(bits));
  else return __uint_as_float(std::uint32_t(bits) << 16);
}

__device__ __forceinline__ float bf16_low(std::uint32_t x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf16_high(std::uint32_t x) { return __uint_as_float(x & 0xffff0000u); }

// Splits (x0, x1) into S bf16 planes: plane p holds the rounding of what the planes before it
// left over, so hi + mid + lo reproduces an fp32 value to about 2^-24 relative.
template <int S>
__device__ __forceinline__ void split2(float x0, float x1, std::uint32_t (&planes)[S]) {
#pragma unroll
  for (int p = 0; p < S; ++p) {
    planes[p] = pack2<__nv_bfloat16>(x0, x1);
    x0 -= bf16_low(planes[p]);
    x1 -= bf16_high(planes[p]);
  }
}

// Products (i, j) of plane i of A with plane j of B kept by an S-plane split: i + j < S. S = 1 is
// the plain 16-bit product; S = 2 drops terms of 2^-16 relative (3 products); S = 3 drops terms
// of 2^-24 (6 products), the fp32-exact path.
template <int S>
struct SplitPairs {
  static_assert(S >= 1 && S <= 3);
  static constexpr int count = S == 1 ? 1 : S == 2 ? 3 : 6;
  // Smaller terms first. S = 2: (1,0) (0,1) (0,0); S = 3: (2,0) (1,1) (0,2) (1,0) (0,1) (0,0).
  __device__ static constexpr int a(int x) { return S == 1 ? 0 : S == 2 ? (x == 0 ? 1 : 0) : (x == 0 ? 2 : x == 1 || x == 3 ? 1 : 0); }
  __device__ static constexpr int b(int x) { return S == 1 ? 0 : S == 2 ? (x == 1 ? 1 : 0) : (x == 2 ? 2 : x == 1 || x == 4 ? 1 : 0); }
};

// ---- warp GEMMs on 16 rows ----
// Shared-memory tiles hold `S` planes of 16-bit rows, `row_bytes` apart (padded by 16 bytes so
// that ldmatrix's eight rows fall in distinct banks), planes `plane_bytes` apart.

// acc[N/8] += A · Bᵀ: A is 16 rows × K from shared memory (row major), B is N rows × K (row
// major, i.e. the column operand as stored). Used for Q·Kᵀ, dO·Vᵀ, K·Qᵀ, V·dOᵀ.
template <class M, int S, int K, int N>
__device__ __forceinline__ void gemm_nt(float (&acc)[N / 8][4], std::uint32_t a_base, std::uint32_t b_base,
                                        int plane_a, int plane_b, int row_bytes) {
  const int lane = threadIdx.x % 32;
  const std::uint32_t a_off = (lane % 16) * row_bytes + (lane / 16) * 16;
  const std::uint32_t b_off = ((lane % 8) + (lane / 16) * 8) * row_bytes + ((lane / 8) % 2) * 16;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    std::uint32_t a[S][4];
#pragma unroll
    for (int p = 0; p < S; ++p) ldmatrix_x4(a[p], a_base + p * plane_a + a_off + kk * 32);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      std::uint32_t b[S][4];
#pragma unroll
      for (int p = 0; p < S; ++p) ldmatrix_x4(b[p], b_base + p * plane_b + b_off + np * 16 * row_bytes + kk * 32);
#pragma unroll
      for (int x = 0; x < SplitPairs<S>::count; ++x) {
        const int i = SplitPairs<S>::a(x), j = SplitPairs<S>::b(x);
        mma_16816<M>(acc[2 * np], a[i], b[j][0], b[j][1]);
        mma_16816<M>(acc[2 * np + 1], a[i], b[j][2], b[j][3]);
      }
    }
  }
}

// The same with A's 16-bit fragments already in registers (the forward's Q tile).
template <class M, int K, int N>
__device__ __forceinline__ void gemm_nt_reg(float (&acc)[N / 8][4], const std::uint32_t (&a)[K / 16][4],
                                            std::uint32_t b_base, int row_bytes) {
  const int lane = threadIdx.x % 32;
  const std::uint32_t b_off = ((lane % 8) + (lane / 16) * 8) * row_bytes + ((lane / 8) % 2) * 16;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      std::uint32_t b[4];
      ldmatrix_x4(b, b_base + b_off + np * 16 * row_bytes + kk * 32);
      mma_16816<M>(acc[2 * np], a[kk], b[0], b[1]);
      mma_16816<M>(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

// acc[N/8] += P · B: P is 16 rows × K fp32 in accumulator layout (K/8 tiles), packed (and split)
// on the fly; B is K rows × N from shared memory (row major: keys × head dim). Used for P·V,
// Pᵀ·dO, dSᵀ·Q, dS·K. With split planes (S > 1, the fp32 paths) each call sums into fresh
// registers that are then added to acc with an IEEE add: the tensor cores' fp32 accumulation
// truncates, and a chain of thousands of them (one per k step over a 2048-key group) drifts past
// the fp32 bar, while a chain of K/16·6 per call does not.
template <class M, int S>
__device__ __forceinline__ void pack_a(const float (&p0)[4], const float (&p1)[4], std::uint32_t (&a)[S][4]) {
  if constexpr (S == 1) {
    a[0][0] = pack2<M>(p0[0], p0[1]);
    a[0][1] = pack2<M>(p0[2], p0[3]);
    a[0][2] = pack2<M>(p1[0], p1[1]);
    a[0][3] = pack2<M>(p1[2], p1[3]);
  } else {
    std::uint32_t t[S];
    split2<S>(p0[0], p0[1], t);
#pragma unroll
    for (int q = 0; q < S; ++q) a[q][0] = t[q];
    split2<S>(p0[2], p0[3], t);
#pragma unroll
    for (int q = 0; q < S; ++q) a[q][1] = t[q];
    split2<S>(p1[0], p1[1], t);
#pragma unroll
    for (int q = 0; q < S; ++q) a[q][2] = t[q];
    split2<S>(p1[2], p1[3], t);
#pragma unroll
    for (int q = 0; q < S; ++q) a[q][3] = t[q];
  }
}

template <class M, int S, int K, int N>
__device__ __forceinline__ void gemm_pn(float (&acc)[N / 8][4], const float (&p)[K / 8][4], std::uint32_t b_base,
                                        int plane_b, int row_bytes) {
  const int lane = threadIdx.x % 32;
  const std::uint32_t b_off = (lane % 16) * row_bytes + (lane / 16) * 16;
  if constexpr (S == 1) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      std::uint32_t a[1][4];
      pack_a<M, 1>(p[2 * kk], p[2 * kk + 1], a);
#pragma unroll
      for (int dp = 0; dp < N / 16; ++dp) {
        std::uint32_t b[4];
        ldmatrix_x4_trans(b, b_base + b_off + kk * 16 * row_bytes + dp * 32);
        mma_16816<M>(acc[2 * dp], a[0], b[0], b[1]);
        mma_16816<M>(acc[2 * dp + 1], a[0], b[2], b[3]);
      }
    }
  } else {
    std::uint32_t a[K / 16][S][4];
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) pack_a<M, S>(p[2 * kk], p[2 * kk + 1], a[kk]);
#pragma unroll
    for (int dp = 0; dp < N / 16; ++dp) {
      float t0[4] = {0.f, 0.f, 0.f, 0.f}, t1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kk = 0; kk < K / 16; ++kk) {
        std::uint32_t b[S][4];
#pragma unroll
        for (int q = 0; q < S; ++q)
          ldmatrix_x4_trans(b[q], b_base + q * plane_b + b_off + kk * 16 * row_bytes + dp * 32);
#pragma unroll
        for (int x = 0; x < SplitPairs<S>::count; ++x) {
          const int i = SplitPairs<S>::a(x), j = SplitPairs<S>::b(x);
          mma_16816<M>(t0, a[kk][i], b[j][0], b[j][1]);
          mma_16816<M>(t1, a[kk][i], b[j][2], b[j][3]);
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[2 * dp][e] += t0[e];
        acc[2 * dp + 1][e] += t1[e];
      }
    }
  }
}

// Σ_d A[row, d]·B[row, d] for the rows g and g+8 of a 16-row tile pair (the diagonal of A·Bᵀ),
// through the same tensor-core path as gemm_nt: where B's row equals a row that gemm_nt meets
// as its column operand, the two results are bit-identical (the backward's delta against dP).
template <class M, int S, int K>
__device__ __forceinline__ void diagonal_dot(float (&out)[2], std::uint32_t a_base, std::uint32_t b_base, int plane_a,
                                             int plane_b, int row_bytes) {
  float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  gemm_nt<M, S, K, 16>(c, a_base, b_base, plane_a, plane_b, row_bytes);
  const int g = (threadIdx.x % 32) / 4;
  // (g, g) sits in tile 0 at thread (g, g/2), element g%2; (g+8, g+8) in tile 1, element 2 + g%2.
  const float upper = g % 2 == 0 ? c[0][0] : c[0][1], lower = g % 2 == 0 ? c[1][2] : c[1][3];
  out[0] = __shfl_sync(0xffffffffu, upper, g * 4 + g / 2);
  out[1] = __shfl_sync(0xffffffffu, lower, g * 4 + g / 2);
}

}  // namespace dattn::cuda
