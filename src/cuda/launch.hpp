// What the host tells a launch: the jobs (one per branch and role) whose blocks it runs, and the
// per-instance tile shapes. Host and device code both include this; it holds no device code.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "params.hpp"

namespace dattn::cuda {

// What a kernel instance walks (a compile-time switch, so that each carries only its own work):
// dilated attention's groups; the same through an index map (Hilbert order: every row address and
// causal comparison goes through the map); block-sparse attention's allowed blocks.
enum class Walk { dilated, indexed, sparse };

// A divisor d (1 <= d < 2^31) with what divides by it in a multiply and a shift: n / d =
// (n · multiplier) >> shift for every 0 <= n < 2^31, with multiplier = floor(2^(31+l) / d) + 1 and
// 2^(l-1) < d <= 2^l (Granlund and Montgomery 1994, theorem 4.2: then 2^(31+l) < multiplier·d <=
// 2^(31+l) + 2^l). A block's decode divides by the job's extents and the branch's rate while the
// block's other threads wait (quotient and modulo in work.cuh), and a 32-bit division is ~15 dependent
// instructions with a MUFU.RCP.
struct FastDivisor {
  int value = 1;
  std::uint32_t multiplier = 0x80000001u;
  int shift = 31;
  FastDivisor() = default;
  explicit FastDivisor(std::int64_t d) : value(int(d)) {
    int l = 0;
    while ((std::int64_t(1) << l) < d) ++l;
    multiplier = std::uint32_t((std::uint64_t(1) << (31 + l)) / std::uint64_t(d) + 1);
    shift = 31 + l;
  }
};

enum Role : int {
  kForwardRole = 0,
  kDkDvRole = 1,  // backward: a block owns keys, loops over the query tiles that see them
  kDqRole = 2,    // backward: a block owns queries, loops over the key tiles they see
};

// Blocks [block_begin, block_begin + tiles·segments·head_count·batch) of a launch work on one
// branch in one role; a block decodes to (batch, head, segment, tile) with the tile fastest, head
// head_first + i·head_step for i < head_count (a step above 1: one query head of each key/value
// head group, so that no two blocks of a launch write the same dk, dv rows).
struct Job {
  int branch = 0;
  int role = kForwardRole;
  int tiles = 1;          // tiles of the longest segment of the branch
  int segments = 1;       // segments that hold own rows (a ring step's own rows meet a few)
  int first_segment = 0;
  int block_begin = 0;
  int head_first = 0, head_count = 1, head_step = 1;
  // longnet mode after the first branch, ring steps, and dk/dv of grouped-query heads after the
  // first launch: merge into out/lse (forward) or add into the gradients instead of writing, and
  // leave unselected rows alone.
  bool accumulate = false;
  // The sm90 backward with dQ from the dk/dv blocks (params.dq_scratch): the job's first group
  // (a (batch, head, segment) of the branch: `tiles` consecutive blocks) among the plan's, and
  // whether dq is added into (the launch's accumulate: dk, dv also add after the first head phase).
  int group_begin = 0;
  bool dq_accumulate = false;
  // tiles, segments, head_count and the branch's dilation rate as divisors (set_divisors).
  FastDivisor by_tiles, by_segments, by_heads, by_rate;
};

struct LaunchPlan {
  int num_jobs = 0;
  int total_blocks = 0;
  // The sm90 forward's TMA instances on the dilated walk: query tiles a block works through one
  // after another (1 to Sm90ForwardShape::kQBuffers; the plan's blocks then hold passes · kBlockM
  // rows), so that the next tile's query rows and first key tiles load while the consumers finish
  // the last (other kernels: 1).
  int passes = 1;
  Job jobs[2 * detail::kMaxBranches];
};

// Tile shapes. T is the storage type (float, __half, __nv_bfloat16); S the number of bf16 planes
// fp32 values are split into (1 for 16-bit storage).
template <int D, int S>
struct ForwardShape {
  static constexpr int kWarps = 4, kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // query rows per block (16 per warp)
  static constexpr int kBlockN = 64;           // keys per tile
  static constexpr int kStages = S == 1 ? 2 : 1;
  static constexpr int kStride = D + 8;        // shared-memory row, in 16-bit elements
  static constexpr int kQPlane = kBlockM * kStride, kKvPlane = kBlockN * kStride;
  static constexpr int kQElems = S * kQPlane, kKvElems = S * kKvPlane;  // one tile, all planes
  // K, V tiles, then per stage the key bias and (causal under an index map) the keys' positions.
  static constexpr std::size_t kSmemBytes =
      std::size_t(kQElems + 2 * kStages * kKvElems) * 2 + std::size_t(2 * kStages * kBlockN) * 4;
};

template <int D, int S>
struct BackwardShape {
  static constexpr int kWarps = (S > 1 && D > 64) ? 2 : 4, kThreads = 32 * kWarps;
  static constexpr int kBlockOwn = 16 * kWarps;        // own rows (keys for dk/dv, queries for dq)
  static constexpr int kBlockOther = D > 64 ? 32 : 64;  // rows of the other side per step
  static constexpr int kStages = S == 1 ? 2 : 1;
  static constexpr int kStride = D + 8;
  static constexpr int kOwnPlane = kBlockOwn * kStride, kOtherPlane = kBlockOther * kStride;
  static constexpr int kOwnElems = S * kOwnPlane, kOtherElems = S * kOtherPlane;
  // own: three tiles (K, V, - or Q, dO, O); other: per stage three tiles (Q, dO, O or K, V, -).
  static constexpr int kFloatsOwn = 2 * kBlockOwn, kFloatsOther = 3 * kBlockOther;
  static constexpr std::size_t kSmemBytes = std::size_t(3 * kOwnElems + 3 * kStages * kOtherElems) * 2 +
                                            std::size_t(kFloatsOwn + kStages * kFloatsOther) * 4;
};

// The sm90 forward (wgmma, 16-bit types): a producer warpgroup loads tiles into a ring of stages,
// consumer warpgroups of 64 query rows each share every key tile.
// Three consumers at head dim 64 (each key tile serves 192 query rows: 1.15x faster at long256k),
// or two where 192-row blocks would leave SMs idle (sm90_forward_block); two at 128, whose
// accumulators need the registers. Tma: the producer loads by TMA (cp.async.bulk.tensor, one thread
// issues a tile's copies; builds with DATTN_SM90_TMA, calls sm90_tma_covers admits) instead of
// row-by-row cp.async.
template <int D, int Consumers, bool Tma = false>
struct Sm90ForwardShape {
  static constexpr int kHeadDim = D, kConsumers = Consumers, kThreads = 128 * (kConsumers + 1);
  static constexpr bool kTma = Tma;
  static constexpr int kBlockM = 64 * kConsumers;  // query rows per block
  static constexpr int kBlockN = 128;              // keys per tile
  static constexpr int kStages = D <= 64 ? 4 : 2;
  // setmaxnreg: the producer gives registers to the consumers. A block starts with its launch
  // bounds' share of the SM's 65536 (one block per SM: 128 a thread at 512 threads, 168 at 384);
  // the producer drops to kProducerRegisters and the consumers take what that frees (multiples of
  // 8, at most 256). The cp.async producer's row arithmetic needs 56: 152 for three consumers, 224
  // for two. The TMA producer (one thread issues the copies; the others write the key bias, then
  // zero_unselected) needs 32: 160 for three consumers, 232 for two. ptxas 13.0 -v of the TMA
  // instances (head dim 64 with 2 and 3 consumers, 128 with 2; bf16 and fp16): 128 registers (3
  // consumers) or 168 (2), the launch share, 152 bytes stack frame (the block's work, as in the
  // cp.async instances), 0 bytes spill; at 24 the producer's zero_unselected spills 16-24 bytes.
  // The overlapped schedule (the next tile's S before this tile's P·V) at three consumers spills 76
  // bytes into 160 registers and still measured 2.5 % faster at long256k (b29d5c5).
  static constexpr int kLaunchRegisters = 65536 / kThreads / 8 * 8;
  // The producer's registers: 56 where it gathers rows by cp.async (the cp.async instances, and the
  // TMA instances under an index map), 32 where one thread issues TMA copies.
  template <bool Gathers>
  static constexpr int kProducerRegisters = Gathers ? 56 : 32;
  template <bool Gathers>
  static constexpr int kConsumerRegisters =
      (kLaunchRegisters * kThreads - 128 * kProducerRegisters<Gathers>) / (128 * kConsumers) / 8 * 8 > 256
          ? 256
          : (kLaunchRegisters * kThreads - 128 * kProducerRegisters<Gathers>) / (128 * kConsumers) / 8 * 8;
  static_assert(kConsumerRegisters<true> == (kConsumers == 3 ? 152 : 224), "the gathering producer's split");
  static constexpr int kQBytes = kBlockM * D * 2, kKvBytes = kBlockN * D * 2;
  // Query tiles, one per pass (LaunchPlan::passes): three at head dim 64 (210 KB of shared memory
  // in all), two at 128 (three would take 227.3 KB, past the 227 KB a block may have).
  static constexpr int kQBuffers = Tma ? (D <= 64 ? 3 : 2) : 1;
  static constexpr int kWorkBytes = Tma ? 256 : 0;  // the block's decoded work (TMA instances)
  // 1024 bytes to align the tiles (wgmma's swizzle), Q, per stage K and V, the key bias and the
  // keys' positions, then three barriers per stage (full, keys, empty) and the decoded work.
  static constexpr std::size_t kSmemBytes = 1024 + kQBuffers * kQBytes + 2 * kStages * kKvBytes +
                                            2 * kStages * kBlockN * 4 + 3 * kStages * 8 + kWorkBytes;
  static_assert(kSmemBytes <= 227 * 1024, "a block's shared memory on sm_90");
};

// The sm90 backward (wgmma, 16-bit types): the forward's block shape, 128 own rows (keys for dk/dv
// blocks, queries for dq blocks; 64 per consumer warpgroup) against 64-row tiles of the other side.
template <int D>
struct Sm90BackwardShape {
  static constexpr int kConsumers = 2, kThreads = 128 * (kConsumers + 1);
  static constexpr int kBlockOwn = 64 * kConsumers;
  static constexpr int kBlockOther = 64;
  static constexpr int kStages = 2;
  // A consumer of a dk/dv block holds dK and dV (D/2 registers each) and Sᵀ, dPᵀ (32 each).
  static constexpr int kProducerRegisters = 56, kConsumerRegisters = 224;
  static constexpr int kOwnBytes = kBlockOwn * D * 2, kOtherBytes = kBlockOther * D * 2;
  // dQ by atomics: two buffers of dSᵀ (the block's keys × a tile of queries, 16-bit).
  static constexpr int kScoresGradientBytes = kBlockOwn * kBlockOther * 2;
  // ... and per consumer a float32 tile of dQ (64 queries × 64 columns) staged for the bulk reduction.
  static constexpr int kDqStagingBytes = kBlockOther * 64 * 4;
  static constexpr int kWorkBytes = 256;  // the block's decoded work
  // Own tiles (and their keys' bias), one pair per pass (LaunchPlan::passes of a dk/dv block with
  // dQ by atomics): two at head dim 64.
  static constexpr int kOwnBuffers = D <= 64 ? 2 : 1;
  // 1024 bytes to align the tiles, the own tiles, per stage the other side's two tiles, the two
  // dSᵀ buffers and dQ staging tiles, per stage three float columns, the own keys' bias, three
  // barriers per stage, then the decoded work.
  static constexpr std::size_t kSmemBytes = 1024 + kOwnBuffers * 2 * kOwnBytes + 2 * kStages * kOtherBytes +
                                            2 * kScoresGradientBytes + kConsumers * kDqStagingBytes +
                                            (3 * kStages * kBlockOther + kOwnBuffers * kBlockOwn) * 4 +
                                            3 * kStages * 8 + kWorkBytes;
  static_assert(kSmemBytes <= 227 * 1024, "a block's shared memory on sm_90");
};

template <class T, int D, int S>
void launch_forward(const detail::DilatedParams& params, const LaunchPlan& plan, cudaStream_t stream);
template <class T, int D, int Consumers, bool Tma = false>
void launch_forward_sm90(const detail::DilatedParams& params, const LaunchPlan& plan, cudaStream_t stream);
template <class T, int D, int S>
void launch_backward(const detail::DilatedParams& params, const LaunchPlan& plan, cudaStream_t stream);
template <class T, int D, bool Tma = false>
void launch_backward_sm90(const detail::DilatedParams& params, const LaunchPlan& plan, cudaStream_t stream);

}  // namespace dattn::cuda
