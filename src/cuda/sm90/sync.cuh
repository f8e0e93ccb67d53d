// Synchronisation of the sm90 kernels' warp-specialised blocks: shared-memory barriers (mbarrier)
// between the producer warpgroup that loads tiles and the consumer warpgroups that use them, the
// proxy fence that makes cp.async's writes visible to wgmma, and register reallocation.
#pragma once

#include <cstdint>

#include "cuda/mma.cuh"

namespace dattn::cuda::sm90 {

// A barrier in shared memory that completes a phase when `count` threads have arrived.
__device__ __forceinline__ void barrier_init(std::uint64_t* barrier, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(barrier)), "r"(count) : "memory");
}

// Arrive (release: this thread's earlier shared-memory writes are seen by whoever waits on the phase).
__device__ __forceinline__ void barrier_arrive(std::uint64_t* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(barrier)) : "memory");
}

// Arrive when this thread's cp.async copies issued so far have landed: the arrival counts toward
// the barrier's count (noinc), so each thread arrives once per phase.
__device__ __forceinline__ void cp_async_arrive(std::uint64_t* barrier) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_address(barrier)) : "memory");
}

// Wait until the phase of parity `parity` has completed (acquire).
__device__ __forceinline__ void barrier_wait(std::uint64_t* barrier, int parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n"
      "}\n" ::"r"(smem_address(barrier)),
      "r"(parity)
      : "memory");
}

// Orders this thread's generic-proxy shared-memory writes (cp.async, plain stores) before later
// async-proxy reads (wgmma's operand fetches).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// The same between generic-proxy accesses of global memory and async-proxy ones (bulk reductions).
__device__ __forceinline__ void fence_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }

// Named barriers (ids 1-15; 0 is __syncthreads'): a phase completes when `threads` threads have
// arrived, those that sync waiting for it and those that only arrive going on.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// named_barrier_sync that also returns to every thread whether any of them passed `predicate`
// true (a flag handed over by the barrier itself, no shared memory).
__device__ __forceinline__ bool named_barrier_any(int id, int threads, bool predicate) {
  int any;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.b32 p, %1, 0;\n bar.red.or.pred q, %2, %3, p;\n selp.b32 %0, 1, 0, q;\n}\n"
      : "=r"(any)
      : "r"(int(predicate)), "r"(id), "r"(threads)
      : "memory");
  return any != 0;
}

// Bulk reduction (the TMA unit, no tensor map): global[0, bytes) += shared[0, bytes) in float32, both
// 16-byte aligned, bytes a multiple of 16; one thread issues it and tracks it as a bulk group.
__device__ __forceinline__ void bulk_reduce_add(float* global, const float* shared, int bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(global),
               "r"(smem_address(shared)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until the issuing thread's bulk groups have read their shared memory (it may be rewritten).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// Waits until they are complete (their global writes done).
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// Register reallocation between warpgroups (the kernel starts with a register cap: launch bounds
// with one block per SM).
template <int kRegisters>
__device__ __forceinline__ void registers_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void registers_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

}  // namespace dattn::cuda::sm90
