// The sm90 forward (Hopper, sm_90a, 16-bit types): the sm80 kernel's walk and arithmetic (decode,
// other_tiles, score_tile, write_forward_rows) with the two products on warpgroup MMA. A block owns
// 128 selected query rows of one group, 64 per warpgroup; each key tile of 128 rows goes through
// shared memory once for both warpgroups, loaded by cp.async two stages deep into wgmma's swizzled
// layout. S = Q·Kᵀ reads Q and K from shared memory; O += P·V takes P from registers (the
// accumulator layout of S is the A-fragment layout, so P never touches shared memory) and V from
// shared memory MN-major. Every walk (dilated, index map, block-sparse) loads rows one by one, so
// one kernel serves them all.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/forward_kernel.cuh"
#include "cuda/forward_tile.cuh"
#include "cuda/launch.hpp"
#include "cuda/sm90/wgmma.cuh"
#include "cuda/work.cuh"

namespace dattn::cuda::sm90 {

template <int N>
using Flat = float[N];

// S = Q·Kᵀ for the warpgroup's 64 rows against one key tile: D/16 steps of k16, both operands
// K-major (a step advances 32 bytes inside the swizzled row, a 64-column block 128 bytes a row).
template <class T, int D, int BM, int BN>
__device__ __forceinline__ void scores(float (&s)[BN / 8][4], std::uint32_t q_tile, std::uint32_t k_tile) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const std::uint32_t column = (kk % 4) * 32;  // inside the 64-column block kk / 4
    const std::uint64_t a = descriptor(q_tile + (kk / 4) * BM * 128 + column, 16, 1024);
    const std::uint64_t b = descriptor(k_tile + (kk / 4) * BN * 128 + column, 16, 1024);
    Wgmma<T, BN>::ss(reinterpret_cast<Flat<BN / 2>&>(s), a, b, kk > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_registers(reinterpret_cast<Flat<BN / 2>&>(s));
}

// O += P·V: BN/16 steps of k16 keys. P's fragment for keys [16kk, 16kk + 16) is the thread's score
// registers of column blocks 2kk and 2kk + 1; V is MN-major (rows are keys): a step advances 16
// rows (2048 bytes), and the head dim's 64-column blocks lie BN rows apart.
template <class T, int D, int BN>
__device__ __forceinline__ void accumulate_pv(float (&acc)[D / 8][4], const float (&p)[BN / 8][4],
                                              std::uint32_t v_tile) {
  using M = MmaType<T>;
  std::uint32_t a[BN / 16][4];
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    a[kk][0] = pack2<M>(p[2 * kk][0], p[2 * kk][1]);
    a[kk][1] = pack2<M>(p[2 * kk][2], p[2 * kk][3]);
    a[kk][2] = pack2<M>(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[kk][3] = pack2<M>(p[2 * kk + 1][2], p[2 * kk + 1][3]);
  }
  fence_registers(reinterpret_cast<Flat<D / 2>&>(acc));
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)
    Wgmma<T, D>::rs(reinterpret_cast<Flat<D / 2>&>(acc), a[kk], descriptor(v_tile + kk * 16 * 128, BN * 128, 1024), 1);
  wgmma_commit();
  wgmma_wait<0>();
  fence_registers(reinterpret_cast<Flat<D / 2>&>(acc));
}

__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <class T, int D, Walk kWalk>
__global__ void __launch_bounds__(Sm90ForwardShape<D>::kThreads, Sm90ForwardShape<D>::kMinBlocks)
    forward_kernel(const __grid_constant__ detail::DilatedParams p, const __grid_constant__ LaunchPlan plan) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = Sm90ForwardShape<D>;
  constexpr int BM = Shape::kBlockM, BN = Shape::kBlockN, kThreads = Shape::kThreads;
  constexpr TileLayout kSwizzled = TileLayout::swizzled;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - smem_address(smem_raw) % 1024) % 1024);
  unsigned char* sQ = smem;
  unsigned char* sK = sQ + Shape::kQBytes;  // [stage][BN rows, swizzled]
  unsigned char* sV = sK + Shape::kStages * Shape::kKvBytes;
  float* sBias = reinterpret_cast<float*>(sV + Shape::kStages * Shape::kKvBytes);  // [stage][BN]
  int* sKeyPosition = reinterpret_cast<int*>(sBias + Shape::kStages * BN);         // [stage][BN]

  BlockWork w;
  if (!decode<BM, kWalk>(p, plan, w)) return;
  const int warpgroup = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, g = threadIdx.x % 32 / 4;
  const std::int64_t warp_row0 = w.tile_begin + warpgroup * 64 + warp * 16;
  const std::int64_t qi[2] = {warp_row0 + g, warp_row0 + g + 8};

  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.0f, 0.0f};

  const auto tiles = other_tiles<BN, kWalk>(p, w);
  const bool causal_by_position = kWalk == Walk::indexed && p.causal;
  const int query_position[2] = {causal_by_position ? w.position32(w.query, int(qi[0])) : 0,
                                 causal_by_position ? w.position32(w.query, int(qi[1])) : 0};
  if (w.tile_rows > 0 && tiles.count > 0) {
    auto load_kv = [&](int tile, int stage) {
      const std::int64_t k0 = tiles.start(tile);
      const int valid = tiles.valid(tile);
      load_row_pair<T, 1, BN, D, kThreads, kSwizzled>(reinterpret_cast<std::uint16_t*>(sK + stage * Shape::kKvBytes),
                                                      reinterpret_cast<std::uint16_t*>(sV + stage * Shape::kKvBytes), 0,
                                                      p.k, p.v, w, w.key, k0, valid);
      key_bias(p, w, k0, valid, BN, sBias + stage * BN, causal_by_position ? sKeyPosition + stage * BN : nullptr);
    };
    load_rows<T, 1, BM, D, kThreads, kSwizzled>(reinterpret_cast<std::uint16_t*>(sQ), 0, p.q, w, w.query, w.tile_begin,
                                               w.tile_rows);
    load_kv(0, 0);
    cp_async_commit();

    const float scale_log2 = p.scale * kLog2e;
    const std::uint32_t q_tile = smem_address(sQ) + warpgroup * 64 * 128;
    for (int it = 0; it < tiles.count; ++it) {
      const int stage = it % 2;
      if (it + 1 < tiles.count) load_kv(it + 1, (it + 1) % 2);
      cp_async_commit();
      cp_async_wait<1>();
      fence_async_shared();  // cp.async wrote through the generic proxy; wgmma reads through the async one
      __syncthreads();

      float s[BN / 8][4];
      scores<T, D, BM, BN>(s, q_tile, smem_address(sK + stage * Shape::kKvBytes));
      float correction[2];
      score_tile<BN, kWalk>(p, w, s, correction, row_max, row_sum, tiles.start(it), warp_row0, qi, query_position,
                            sBias + stage * BN, sKeyPosition + stage * BN, scale_log2);
      rescale_rows<D>(acc, correction);
      accumulate_pv<T, D, BN>(acc, s, smem_address(sV + stage * Shape::kKvBytes));
      __syncthreads();  // the stage is refilled by the next iteration's prefetch
    }
  }
  write_forward_rows<T, D>(p, plan, w, acc, row_max, row_sum, qi);
  if (!plan.accumulate) zero_unselected<T, D, kThreads>(p, w, &p.out, nullptr, true);
#endif
}

}  // namespace dattn::cuda::sm90

namespace dattn::cuda {

template <class T, int D>
void launch_forward_sm90(const detail::DilatedParams& params, const LaunchPlan& plan, cudaStream_t stream) {
  using Shape = Sm90ForwardShape<D>;
  auto kernel = params.block_size > 0              ? sm90::forward_kernel<T, D, Walk::sparse>
                : params.position_index != nullptr ? sm90::forward_kernel<T, D, Walk::indexed>
                                                   : sm90::forward_kernel<T, D, Walk::dilated>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kSmemBytes)) != cudaSuccess)
    check_launch("sm90 forward (shared memory attribute)");
  kernel<<<plan.total_blocks, Shape::kThreads, Shape::kSmemBytes, stream>>>(params, plan);
  check_launch("sm90 forward");
}

}  // namespace dattn::cuda
