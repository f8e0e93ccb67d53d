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
#include "cuda/forward_tile.cuh"
#include "cuda/work.cuh"

namespace dattn::cuda {

template <class T>
using MmaType = std::conditional_t<std::is_same_v<T, __half>, __half, __nv_bfloat16>;

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
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
  const std::int64_t qi[2] = {w.tile_begin + warp * 16 + g, w.tile_begin + warp * 16 + g + 8};

  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.0f, 0.0f};

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

      const std::int64_t k0 = tiles.start(it);
      float correction[2];
      score_tile<BN, kWalk>(p, w, s, correction, row_max, row_sum, k0, w.tile_begin + warp * 16, qi, query_position,
                            sBias + stage * BN, sKeyPosition + stage * BN, scale_log2);
      rescale_rows<D>(acc, correction);
      gemm_pn<M, S, BN, D>(acc, s, smem_address(sV + stage * Shape::kKvElems), Shape::kKvPlane * 2, kRowBytes);
      __syncthreads();
    }
  }

  write_forward_rows<T, D>(p, w, acc, row_max, row_sum, qi);
  if (!w.accumulate) zero_unselected<T, D, kThreads>(p, w, &p.out, nullptr, true);
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
