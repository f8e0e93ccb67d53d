// The fused forward: one launch computes every branch and head (longnet mode: one launch per
// branch, each merging into out/lse by the softmax denominators). A block owns 64 selected query
// rows of one group (16 per warp), streams the group's key tiles through shared memory (two
// stages of cp.async for 16-bit data), keeps an online softmax in registers and writes out and
// lse at the original positions, with the grouped mode's 1/G and the zeros and -inf of the
// unselected rows of its region in the same pass.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/launch.hpp"
#include "cuda/mma.cuh"
#include "cuda/work.cuh"

namespace dattn::cuda {

template <class T>
using MmaType = std::conditional_t<std::is_same_v<T, __half>, __half, __nv_bfloat16>;

// Rows of [region_begin, region_end) that the block's branch does not select (the block's own
// side): out (or the gradients) 0, lse -inf. Not in ring steps, which only add.
template <class T, int D, int kThreads>
__device__ __forceinline__ void zero_unselected(const detail::DilatedParams& p, const BlockWork& w,
                                                const detail::Operand* a, const detail::Operand* b, bool lse) {
  constexpr int kChunks = D * int(sizeof(T)) / 16;
  const Side& own = w.own();
  const std::int64_t rows = w.region_end - w.region_begin;
  if (w.stride == 1 && w.region_begin == own.first + w.tile_begin && rows == w.tile_rows) return;
  for (std::int64_t c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const std::int64_t position = w.region_begin + c / kChunks;
    const std::int64_t rel = position - own.first;
    if (rel >= 0 && rel % w.stride == 0 && rel / w.stride < own.length) continue;
    const int chunk = int(c % kChunks);
    const std::int64_t row = w.original(position);
    zero_row_chunk(row_pointer<T>(*a, w.batch, w.head, row), chunk);
    if (b) zero_row_chunk(row_pointer<T>(*b, w.batch, w.head, row), chunk);
    if (lse && chunk == 0) *lse_pointer(p, w.batch, w.head, row) = neg_inf();
  }
}

template <class T, int D, int S, Walk kWalk>
__global__ void __launch_bounds__(ForwardShape<D, S>::kThreads)
    forward_kernel(const __grid_constant__ detail::DilatedParams p, const __grid_constant__ LaunchPlan plan) {
  using Shape = ForwardShape<D, S>;
  using M = MmaType<T>;
  constexpr int BM = Shape::kBlockM, BN = Shape::kBlockN, kStride = Shape::kStride, kRowBytes = kStride * 2;
  constexpr int kThreads = Shape::kThreads, kStages = Shape::kStages;
  static_assert(kThreads >= BN, "key_bias takes a thread per key column");

  extern __shared__ __align__(16) unsigned char smem[];
  std::uint16_t* sQ = reinterpret_cast<std::uint16_t*>(smem);
  std::uint16_t* sK = sQ + Shape::kQElems;  // [stage][plane][row][kStride]
  std::uint16_t* sV = sK + kStages * Shape::kKvElems;
  float* sBias = reinterpret_cast<float*>(sV + kStages * Shape::kKvElems);  // [stage][BN]
  int* sKeyPosition = reinterpret_cast<int*>(sBias + kStages * BN);         // [stage][BN]

  BlockWork w;
  if (!decode<BM, kWalk>(p, plan, w)) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const std::int64_t qi[2] = {w.tile_begin + warp * 16 + g, w.tile_begin + warp * 16 + g + 8};

  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.0f, 0.0f};

  const std::int64_t shift = w.causal_shift;
  const auto tiles = other_tiles<BN, kWalk>(p, w);
  // Causal attention under an index map compares original positions, element by element.
  const bool causal_by_position = kWalk == Walk::indexed && p.causal;
  const int query_position[2] = {causal_by_position ? w.position32(w.query, int(qi[0])) : 0,
                                 causal_by_position ? w.position32(w.query, int(qi[1])) : 0};
  if (w.tile_rows > 0 && tiles.count > 0) {
    const int num_tiles = tiles.count;
    auto load_kv = [&](int tile, int stage) {
      const std::int64_t k0 = tiles.start(tile);
      const int valid = tiles.valid(tile);
      load_row_pair<T, S, BN, D, kThreads>(sK + stage * Shape::kKvElems, sV + stage * Shape::kKvElems, Shape::kKvPlane,
                                           p.k, p.v, w, w.key, k0, valid);
      key_bias(p, w, k0, valid, BN, sBias + stage * BN, causal_by_position ? sKeyPosition + stage * BN : nullptr);
    };
    load_rows<T, S, BM, D, kThreads>(sQ, Shape::kQPlane, p.q, w, w.query, w.tile_begin, w.tile_rows);
    load_kv(0, 0);
    cp_async_commit();

    std::uint32_t qf[S == 1 ? D / 16 : 1][4];
    const float scale_log2 = p.scale * kLog2e;
    const bool dropout = p.dropout_p > 0.0f;
    for (int it = 0; it < num_tiles; ++it) {
      const int stage = kStages == 2 ? it % 2 : 0;
      if constexpr (kStages == 2) {
        if (it + 1 < num_tiles) load_kv(it + 1, (it + 1) % 2);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        if (it > 0) load_kv(it, 0);
      }
      __syncthreads();

      float s[BN / 8][4];
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      const std::uint32_t k_base = smem_address(sK + stage * Shape::kKvElems);
      if constexpr (S == 1) {
        if (it == 0) {
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk)
            ldmatrix_x4(qf[kk], smem_address(sQ) + ((warp * 16 + lane % 16) * kStride + kk * 16 + (lane / 16) * 8) * 2);
        }
        gemm_nt_reg<M, D, BN>(s, qf, k_base, kRowBytes);
      } else {
        gemm_nt<M, S, D, BN>(s, smem_address(sQ + warp * 16 * kStride), k_base, Shape::kQPlane * 2,
                             Shape::kKvPlane * 2, kRowBytes);
      }

      // Scale into the log2 domain, mask (padding, past the group, causal), online softmax.
      const std::int64_t k0 = tiles.start(it);
      const float* bias = sBias + stage * BN;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = s[n][e] * scale_log2 + bias[n * 8 + 2 * t + (e & 1)];
      if (causal_by_position) {
        const int* key_position = sKeyPosition + stage * BN;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (key_position[n * 8 + 2 * t + (e & 1)] > query_position[e >> 1]) s[n][e] = neg_inf();
      } else if (p.causal && k0 + BN - 1 > w.tile_begin + warp * 16 + shift) {  // a tile on the diagonal
        const int last[2] = {int(qi[0] + shift - k0), int(qi[1] + shift - k0)};  // the last visible column
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (n * 8 + 2 * t + (e & 1) > last[e >> 1]) s[n][e] = neg_inf();
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = neg_inf();
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float new_max = fmaxf(row_max[r], mx);
        const float base = new_max == neg_inf() ? 0.0f : new_max;
        const float correction = fast_exp2(row_max[r] - base);
        row_max[r] = new_max;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
          s[n][2 * r] = fast_exp2(s[n][2 * r] - base);
          s[n][2 * r + 1] = fast_exp2(s[n][2 * r + 1] - base);
          sum += s[n][2 * r] + s[n][2 * r + 1];
        }
        row_sum[r] = row_sum[r] * correction + sum;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          acc[n][2 * r] *= correction;
          acc[n][2 * r + 1] *= correction;
        }
      }
      if (dropout) {
        const std::uint32_t keep = dropout_bits<BN / 8>(p, w, qi[0], qi[1], k0, false);
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[n][e] *= (keep >> (4 * n + e)) & 1u ? p.dropout_rescale : 0.0f;
      }
      gemm_pn<M, S, BN, D>(acc, s, smem_address(sV + stage * Shape::kKvElems), Shape::kKvPlane * 2, kRowBytes);
      __syncthreads();
    }
  }

  // Epilogue: normalise, write out and lse (or merge them into what earlier branches wrote).
  float lse_row[2], inv[2], old_lse[2] = {neg_inf(), neg_inf()};
  bool valid[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const bool attended = sum != 0.0f;  // a NaN sum (a NaN score) makes the row NaN, not empty
    inv[r] = attended ? 1.0f / sum : 0.0f;
    lse_row[r] = attended ? (row_max[r] + __log2f(sum)) * kLn2 : neg_inf();
    valid[r] = qi[r] < w.tile_begin + w.tile_rows;
    if (plan.accumulate && valid[r]) old_lse[r] = *lse_pointer(p, w.batch, w.head, w.row(w.query, qi[r]));
  }
  __syncwarp();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!valid[r]) continue;
    const std::int64_t row = w.row(w.query, qi[r]);
    float old_weight = 0.0f, new_weight = p.output_scale * inv[r], lse_new = lse_row[r];
    if (plan.accumulate) {
      if (lse_row[r] == neg_inf()) continue;  // this branch adds nothing to the row
      if (old_lse[r] != neg_inf()) {
        const float mx = fmaxf(old_lse[r], lse_row[r]);
        lse_new = mx + logf(expf(old_lse[r] - mx) + expf(lse_row[r] - mx));
        old_weight = expf(old_lse[r] - lse_new);
        new_weight *= expf(lse_row[r] - lse_new);
      }
    }
    auto store = [&](auto* dst) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        store2(dst + n * 8 + 2 * t, acc[n][2 * r] * new_weight, acc[n][2 * r + 1] * new_weight, old_weight);
    };
    if (p.float32_outputs) store(row_pointer<float>(p.out, w.batch, w.head, row));
    else store(row_pointer<T>(p.out, w.batch, w.head, row));
    if (t == 0) *lse_pointer(p, w.batch, w.head, row) = lse_new;
  }
  if (!plan.accumulate) zero_unselected<T, D, kThreads>(p, w, &p.out, nullptr, true);
}

inline void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("dattn: ") + what + " launch failed: " + cudaGetErrorString(e));
}

template <class T, int D, int S>
void launch_forward(const detail::DilatedParams& params, const LaunchPlan& plan, cudaStream_t stream) {
  using Shape = ForwardShape<D, S>;
  auto kernel = params.block_size > 0              ? forward_kernel<T, D, S, Walk::sparse>
                : params.position_index != nullptr ? forward_kernel<T, D, S, Walk::indexed>
                                                   : forward_kernel<T, D, S, Walk::dilated>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kSmemBytes)) != cudaSuccess)
    check_launch("forward (shared memory attribute)");
  kernel<<<plan.total_blocks, Shape::kThreads, Shape::kSmemBytes, stream>>>(params, plan);
  check_launch("forward");
}

}  // namespace dattn::cuda
