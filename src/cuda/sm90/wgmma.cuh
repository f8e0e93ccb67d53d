// Hopper's warpgroup matrix multiply (wgmma, sm_90a) for the sm90 kernels: shared-memory matrix
// descriptors of the 128-byte swizzled tiles the loads write (TileLayout::swizzled, work.cuh),
// and the instructions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace dattn::cuda::sm90 {

// A descriptor of the 128-byte swizzled layout (layout type 1). K-major operands (Q and K: the
// reduction runs along the row): the leading offset is unused, the stride offset is 1024 bytes
// from one group of 8 rows to the next. MN-major operands (V: the reduction runs over the rows):
// the stride offset is 1024 bytes from one group of 8 rows (keys) to the next, the leading offset
// the distance between 64-column blocks.
__device__ __forceinline__ std::uint64_t descriptor(std::uint32_t smem_address, std::uint32_t leading_bytes,
                                                    std::uint32_t stride_bytes) {
  // Fields of 14 bits in units of 16 bytes. Shared memory ends below 256 KB, so address / 16 needs
  // no mask: two instructions per descriptor in the consumers' loops, the rest is constant.
  const std::uint32_t lo = (smem_address >> 4) | (((leading_bytes >> 4) & 0x3fff) << 16);
  const std::uint32_t hi = ((stride_bytes >> 4) & 0x3fff) | (1u << 30);
  return (std::uint64_t(hi) << 32) | lo;
}

// The descriptor of the same layout `bytes` further on (a multiple of 16): the address field is the
// low word's 14 low bits, address / 16 < 2^14 there and after, so one 32-bit add moves it without a
// carry into the leading offset above. A step of a product then costs one add where a descriptor
// made from its address costs a shift, an or and an add (ncu at long64k: about four uniform
// instructions per wgmma, a fifth of the forward consumers' instructions in their loop).
__device__ __forceinline__ std::uint64_t advanced(std::uint64_t d, std::uint32_t bytes) {
  return (d & 0xffffffff00000000ull) | std::uint32_t(std::uint32_t(d) + (bytes >> 4));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving reads or writes of accumulator registers across an asynchronous
// wgmma (it sees the asm statement, not the hardware that writes them later).
template <int N>
__device__ __forceinline__ void fence_registers(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// wgmma.mma_async m64nNk16 with float32 accumulators, 16-bit inputs of type T. One warpgroup
// issues it; its result registers follow the accumulator layout: register 4·n + e of a thread
// (lane = 4g + t of warp w in the warpgroup) holds row 16w + g + 8·(e / 2), column 8n + 2t + e % 2.
template <class T, int N>
struct Wgmma;

#include "cuda/sm90/wgmma_instructions.inc"

}  // namespace dattn::cuda::sm90
