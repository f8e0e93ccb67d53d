// Hopper's tensor memory accelerator (TMA) for the sm90 forward's producer (builds with
// DATTN_SM90_TMA): bulk tensor copies from global to shared memory described by a tensor map
// (tensor_maps.hpp), which complete bytes on an mbarrier's transaction count.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "cuda/mma.cuh"

namespace dattn::cuda::sm90 {

// Makes the barriers' initialisation visible to the async proxy (TMA's complete_tx), before the
// block's threads sync.
__device__ __forceinline__ void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// Arrive (one of the barrier's count) and expect `bytes` more of asynchronous copies in this phase:
// the phase completes when the count's arrivals and the bytes have all come.
__device__ __forceinline__ void barrier_arrive_expect_tx(std::uint64_t* barrier, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(barrier)), "r"(bytes)
               : "memory");
}

// Expect `bytes` more of asynchronous copies in this phase, without arriving (the thread arrives
// later, e.g. when its cp.async copies land): the phase cannot complete before that arrival.
__device__ __forceinline__ void barrier_expect_tx(std::uint64_t* barrier, std::uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(barrier)), "r"(bytes)
               : "memory");
}

// Fetches a tensor map (a __grid_constant__ kernel parameter) into the descriptor cache.
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<std::uint64_t>(map)) : "memory");
}

// Copies the box of a 5-D map at coordinates (c0..c4) (elements, innermost first) to shared memory
// at `to` (laid out and swizzled as the map says); its bytes complete on `barrier`. Coordinates past
// the map's extents read zeros.
__device__ __forceinline__ void tma_load_5d(std::uint32_t to, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                           int c4, std::uint64_t* barrier) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, "
      "%6}], [%7];\n" ::"r"(to),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(smem_address(barrier))
      : "memory");
}

}  // namespace dattn::cuda::sm90
