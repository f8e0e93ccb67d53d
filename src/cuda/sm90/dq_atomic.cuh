// dQ by atomics in the sm90 backward (BackwardDq::atomic; backward_kernel.cuh): the dk/dv blocks'
// dSᵀ through shared memory and the dQ = dS·K product, the float32 scratch slots they add into by
// bulk reductions, and the conversion of a slot into dq by the group's last block.
#pragma once

#include "cuda/backward_tile.cuh"
#include "cuda/sm90/forward_kernel.cuh"

namespace dattn::cuda::sm90 {

// dQ by atomics. The thread's dSᵀ fragments (pack_probabilities of its 2 keys × BO queries) into
// a shared buffer of the block's 128 keys × BO queries, queries along the 128-byte swizzled row:
// dS as wgmma's MN-major A operand (chunk n of row k lands at chunk n ^ (k mod 8), k mod 8 = g).
template <int BO>
__device__ __forceinline__ void store_scores_gradient(unsigned char* buffer, const std::uint32_t (&ds)[BO / 16][4],
                                                      int key_row) {
  static_assert(BO == 64, "one 128-byte row of queries per key");
  const int g = key_row % 8, t = threadIdx.x % 4;
#pragma unroll
  for (int kk = 0; kk < BO / 16; ++kk)
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // registers 2·half (key row) and 2·half + 1 (row + 8)
      const int chunk = 2 * kk + half;
      unsigned char* row = buffer + key_row * 128 + ((chunk ^ g) << 4) + 4 * t;
      *reinterpret_cast<std::uint32_t*>(row) = ds[kk][2 * half];
      *reinterpret_cast<std::uint32_t*>(row + 8 * 128) = ds[kk][2 * half + 1];
    }
}

// Issues dQ = dS·K for a tile of 64 queries against the block's 128 keys: both operands MN-major
// (keys along the rows), 16 keys (2048 bytes) a step; k_columns is the 64-column block of K.
template <class T, int BW>
__device__ __forceinline__ void issue_dq(float (&dq)[8][4], std::uint32_t scores_gradient, std::uint32_t k_columns) {
  const std::uint64_t ds = descriptor(scores_gradient, BW * 128, 1024), k = descriptor(k_columns, BW * 128, 1024);
#pragma unroll
  for (int kk = 0; kk < BW / 16; ++kk)
    Wgmma<T, 64>::ss_mn(reinterpret_cast<Flat<32>&>(dq), advanced(ds, kk * 16 * 128), advanced(k, kk * 16 * 128), kk > 0);
}

// A group's dQ scratch slot: float32 rows of the group's queries in column blocks of 64 (a block's
// rows contiguous, so that a tile of 64 rows × 64 columns is one 16 KB range), the 16-byte pieces of
// a row XOR-swizzled (piece k at k ^ scratch_swizzle(r)) so that staging a tile in shared memory in
// the same layout is free of bank conflicts. Row r of a tile has r mod 16 of its slot row (tiles
// start at multiples of 64).
__device__ __forceinline__ int scratch_swizzle(int r) { return 2 * ((r & 1) | ((r >> 2) & 2)); }
__device__ __forceinline__ std::int64_t scratch_offset(std::int64_t rows, std::int64_t r, int piece) {
  return piece / 16 * rows * 64 + r * 64 + ((piece % 16) ^ scratch_swizzle(int(r % 16))) * 4;
}

// The thread's part of a tile's dQ (64 queries × 64 columns) as 16-byte pieces: lanes t and t ^ 1
// (same g) swap halves, so that each holds 4 columns of one row: even t row g, odd t row g + 8 of
// its warp's 16. f(row, piece of the row's 16, value) for each of the 8.
template <class F>
__device__ __forceinline__ void for_dq_pieces(const float (&dq)[8][4], F&& f) {
  const int warp = threadIdx.x / 32 % 4, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const bool even = t % 2 == 0;
  const int row = warp * 16 + g + (even ? 0 : 8);
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    const float x = __shfl_xor_sync(0xffffffffu, even ? dq[n][2] : dq[n][0], 1);
    const float y = __shfl_xor_sync(0xffffffffu, even ? dq[n][3] : dq[n][1], 1);
    f(row, 2 * n + t / 2, even ? make_float4(dq[n][0], dq[n][1], x, y) : make_float4(x, y, dq[n][2], dq[n][3]));
  }
}

// Adds a tile's dQ (64 queries from index j0, valid of them real; column block `block`) into the
// group's slot: staged in the consumer's shared tile (in the slot's swizzled layout) and added by
// one bulk reduction that the warpgroup's first thread issues. (Measured on the H100 at long256k:
// float4 atomicAdd from every thread cost 2 ms more per fwd+bwd.) Between two tiles that thread
// waits until the previous reduction has read the staging tile.
__device__ __forceinline__ void add_dq(const detail::DilatedParams& p, float* slot, float* staging,
                                       const float (&dq)[8][4], std::int64_t j0, int valid, int block) {
  const std::int64_t rows = p.dq_scratch_rows;
  const int id = 2 + int(threadIdx.x / 128);  // the warpgroup's named barrier, 3 or 4 (1, 2: both consumers)
  const bool leader = threadIdx.x % 128 == 0;
  if (leader) bulk_wait_read();
  named_barrier_sync(id, 128);
  for_dq_pieces(dq, [&](int row, int piece, float4 v) {
    *reinterpret_cast<float4*>(staging + scratch_offset(64, row, piece)) = v;
  });
  fence_async_shared();
  named_barrier_sync(id, 128);
  if (leader && valid > 0) {
    bulk_reduce_add(slot + scratch_offset(rows, j0, block * 16), staging, valid * 64 * 4);
    bulk_commit();
  }
}

// dQ by atomics: the job of group `group` of the plan.
__device__ __forceinline__ const Job& job_of_group(const LaunchPlan& plan, int group) {
  int j = 0;
  while (j + 1 < plan.num_jobs && group >= plan.jobs[j + 1].group_begin) ++j;
  return plan.jobs[j];
}

// The work of group `group`, decoded from its first block (tile 0); false where the group has
// nothing to write.
template <int D>
__device__ __forceinline__ bool group_work(const detail::DilatedParams& p, const LaunchPlan& plan, int group,
                                           BlockWork& w) {
  const Job& job = job_of_group(plan, group);
  const int first_block = job.block_begin + (group - job.group_begin) * job.tiles + (p.causal ? job.tiles - 1 : 0);
  constexpr int BW = Sm90BackwardShape<D>::kBlockOwn;  // rows a block, times the plan's passes
  return plan.passes == 2 ? decode_block<2 * BW>(p, plan, first_block, w) : decode_block<BW>(p, plan, first_block, w);
}

// Writes (or adds into) dq the group's query rows from its slot, times the scale, and zeroes the
// slot for its next group. The kThreads threads (`thread` counts them) load 4 pieces each before
// storing, so that the loads' latencies overlap.
template <class T, int D, int kThreads>
__device__ __forceinline__ void dq_rows_from_slot(const detail::DilatedParams& p, const BlockWork& w, float* slot,
                                                  int thread) {
  constexpr int kUnroll = 4;
  const float old_weight = w.dq_accumulate ? 1.0f : 0.0f;
  const std::int64_t pieces = w.query.length * (D / 4);
  for (std::int64_t i0 = thread; i0 < pieces; i0 += kThreads * kUnroll) {
    float4 x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const std::int64_t i = i0 + u * kThreads, r = i / (D / 4);
      const int piece = int(i % (D / 4));
      // The adds' sums live in L2; this SM's L1 may hold lines of an earlier group's use of the slot.
      x[u] = i < pieces ? __ldcg(reinterpret_cast<const float4*>(slot + scratch_offset(p.dq_scratch_rows, r, piece)))
                        : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const std::int64_t i = i0 + u * kThreads, r = i / (D / 4);
      const int piece = int(i % (D / 4));
      if (i >= pieces) break;
      *reinterpret_cast<float4*>(slot + scratch_offset(p.dq_scratch_rows, r, piece)) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      const std::int64_t row = w.row(w.query, r);
      auto store = [&](auto* dq_row) {
        store2(dq_row + piece * 4, x[u].x * p.scale, x[u].y * p.scale, old_weight);
        store2(dq_row + piece * 4 + 2, x[u].z * p.scale, x[u].w * p.scale, old_weight);
      };
      if (p.float32_outputs) store(row_pointer<float>(p.dq, w.batch, w.head, row));
      else store(row_pointer<T>(p.dq, w.batch, w.head, row));
    }
  }
}

// dQ by atomics, converted in the backward kernel (p.dq_counters: per slot the blocks
// arrived, then the conversions done). Group g takes slot g mod S, which it may use once the
// slot's previous group (g − S) has converted it: its conversions done reach g / S. Every block
// of the group waits for that before it adds (or arrives), and the block that arrives last writes
// dq from the slot, zeroes it and hands it on. A block only ever waits for blocks of lower ticket
// (backward_kernel), which are running or done, so the wait ends.
__device__ __forceinline__ void wait_for_slot(const detail::DilatedParams& p, int group) {
  const int slot = group % p.dq_slots, generation = group / p.dq_slots;
  const int* done = p.dq_counters + p.dq_slots + slot;
  for (;;) {
    int seen;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(seen) : "l"(done) : "memory");
    if (seen >= generation) break;
    __nanosleep(200);
  }
}

// Run by the two consumer warpgroups (the threads that added; the producer's registers are too few
// for the conversion), synchronised by named barrier 5; their first thread arrives, and the
// barrier tells them all whether it was the group's last. (A flag in shared memory, stored by that
// thread before a bar.sync and read after it, was reported as a race by compute-sanitizer's
// racecheck.)
template <class T, int D>
__device__ __forceinline__ void arrive_and_convert(const detail::DilatedParams& p, const LaunchPlan& plan,
                                                   int group) {
  const int slot = group % p.dq_slots, thread = int(threadIdx.x) - 128;
  const bool leader = thread == 0;
  __threadfence();  // this thread's adds, before the arrival (bulk reductions: waited for by their issuer)
  named_barrier_sync(5, 256);
  bool last = false;
  if (leader) {
    __threadfence();
    last = atomicAdd(p.dq_counters + slot, 1) == job_of_group(plan, group).tiles - 1;
    if (last) __threadfence();  // acquire the other blocks' adds
  }
  if (!named_barrier_any(5, 256, last)) return;
  BlockWork w;
  float* slot_data = p.dq_scratch + std::int64_t(slot) * p.dq_scratch_rows * D;
  if (group_work<D>(p, plan, group, w))
    dq_rows_from_slot<T, D, 256>(p, w, slot_data, thread);
  __threadfence();
  named_barrier_sync(5, 256);
  if (leader) {
    p.dq_counters[slot] = 0;
    __threadfence();
    atomicExch(p.dq_counters + p.dq_slots + slot, group / p.dq_slots + 1);  // release the slot
  }
}

}  // namespace dattn::cuda::sm90
