// Decoding with a cache for a few new tokens (forward_with_kvcache, Tn <= kCudaDecodeMaxTokens):
// flash-decoding's split over the keys. At Tn = 1 each (head, branch) has one query row, so the
// forward kernels' blocks of 64 to 192 query rows are nearly empty and each scans its up to
// ceil(w / r) keys alone (a B = 1 step keeps a few dozen blocks busy on 132 SMs). The work is
// memory-bound instead: every selected K and V row is read once and used by a few query rows. So
//   1. decode_split_kernel: a block per (sequence, branch, kv head, head class, segment, key chunk,
//      row group) reads one chunk of the keys its class selects (rows start + o + j·r of the segment,
//      r·Hkv·D elements apart, each row as 16-byte loads; the call's new tokens' rows from k_new,
//      v_new), computes scores and an online softmax in fp32 on the CUDA cores, and writes the
//      chunk's normalised output and log-sum-exp to scratch;
//   2. decode_merge_kernel: a block per (sequence, token, query head) merges the chunks of every
//      branch that selects its token by their log-sum-exps (SPEC.md's longnet merge, which over the
//      one branch of a grouped-mode head is that branch's softmax, then the 1/G) and writes out and
//      lse exactly where the forward kernels would (0 and -inf where no branch selects the token),
//      and writes k_new, v_new into the caches (every read of the caches is done by then: a step is
//      two launches, without a third to append first).
// A head class is the query heads of one kv head that select the same keys in a branch, so that a
// block reads each K, V row once for all of them: grouped mode, the kv head's heads in the branch's
// group (one offset, i mod r); longnet mode, those with the same h mod r (every r-th head).
// Scratch ([B, Tn, H, branch slots, chunks] partial outputs and log-sum-exps, fp32) is allocated per
// call (cudaMallocAsync, from the device's current memory pool) and freed with cudaFreeAsync, both
// in order on the call's stream: no synchronisation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/cuda_attention.hpp"
#include "cuda/device_guard.hpp"
#include "cuda/work.cuh"
#include "dattn/decode.hpp"
#include "head_dims.hpp"
#include "dattn/error.hpp"

namespace dattn::cuda {
namespace {

using detail::DilatedParams;

constexpr int kThreads = 128, kWarps = kThreads / 32;
constexpr int kMaxRows = 8;  // query rows a split block holds in registers (more: row groups)
// Chunks are sized so that, with every class selected and every cache full, a launch has about
// this many blocks per SM (about what fits at once: the one-row instances take ~96 registers a
// thread), each at most kMaxChunkBytes of K and V: short blocks, so that the last ones to start
// (a launch of uniform blocks ends in a partial wave) finish soon after the rest; more, shorter
// blocks cost a block's setup and a partial to merge each.
constexpr int kTargetBlocksPerSm = 8;
constexpr int kMaxChunkBytes = 64 * 1024;

constexpr int pow2_at_least(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

__host__ __device__ std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// The split kernel's thread layout for storage type T, head dim D and kRows query rows: a key row
// is kChunks 16-byte loads, one per lane of a group of kLanes lanes (the lanes past kChunks idle,
// at D = 80 and 96); the block's kSlots lane groups each take kKeys keys per pass, all loads of a
// pass issued before their first use.
template <class T, int D, int kRows>
struct SplitShape {
  static constexpr int kElems = 16 / int(sizeof(T));  // elements per 16-byte load
  static constexpr int kChunks = D / kElems;
  static constexpr int kLanes = pow2_at_least(kChunks);
  static constexpr int kSlots = kThreads / kLanes;
  static constexpr int kKeys = kRows <= 2 ? 4 : 2;  // more rows, more registers: fewer keys in flight
  static constexpr int kKeysPerPass = kSlots * kKeys;
  static_assert(kChunks * kElems == D && kLanes <= 32, "a row is whole 16-byte loads of one warp");
};

// One branch's share of a sequence's blocks in the split launch: the sequence's blocks
// [block_begin, block_begin + blocks) decode to (kv head, class, segment, chunk, row group) with the
// row group fastest, so that the blocks that read the same keys for different query rows run side
// by side (the second reads hit L2).
struct SplitBranch {
  int branch = 0;  // index into DilatedParams::branches
  int block_begin = 0;
  int kv_head_first = 0, kv_heads = 0;  // the kv heads that serve some query head of the branch
  int classes = 1;     // head classes per kv head
  int segments = 1;    // segments the Tn queries may meet
  int chunks = 1;      // key chunks of the longest segment
  int row_groups = 1;  // blocks of kRows query rows a class's queries of one segment may need
};

struct DecodePlan {
  int num_branches = 0;
  SplitBranch branches[detail::kMaxBranches];
  // The launch is sequence-outermost: block i is block i mod blocks_per_sequence of sequence
  // i / blocks_per_sequence, so a sequence's branches run close together. In longnet mode they
  // select overlapping rows of a head (the rate-2r branch's keys are among the rate-r branch's
  // where the offsets agree): at B = 64 a step reads 1.6 times its distinct rows, the repeats
  // from L2 while the sequence's blocks are in flight together, from memory if another branch's
  // blocks for every sequence came between.
  int blocks_per_sequence = 0;
  int chunk_keys = 0;    // keys per chunk: a multiple of the kernel's keys per pass
  int branch_slots = 1;  // scratch slots per (b, t, h): G in longnet mode, 1 in grouped (one branch a head)
  int max_chunks = 1;    // chunks per slot
  // Scratch, entry ((b·Tn + t)·H + h)·branch_slots + slot)·max_chunks + chunk: the chunk's output
  // (normalised by its own softmax sum, D floats) and log-sum-exp (base 2, of the scaled scores).
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
  // The call's new keys and values (k_new, v_new [B, Tn, Hkv, D]; data nullptr: none, the caches
  // hold every key): the split kernel reads positions L - Tn .. L - 1 there, and the merge kernel,
  // after every read of the caches in stream order, writes them into the caches' rows. So a step
  // is two launches, not three.
  detail::Operand k_new, v_new;
};

// k_new and v_new as the kernels read them (data nullptr: the call brings no new rows).
struct NewRows {
  detail::Operand k, v;
};

// The query heads of kv head `kv_head` that select the same keys in branch `br` (head class `c`):
// first + i·step for i < count, all with offset `offset`.
struct HeadClass {
  int first = 0, step = 1, count = 0;
  std::int64_t offset = 0;
};

__device__ __forceinline__ HeadClass head_class(const DilatedParams& p, const detail::Branch& br, int kv_head, int c) {
  const int group = int(p.heads / p.kv_heads), lo = kv_head * group, hi = lo + group;
  HeadClass hc;
  if (br.offset_from_head) {  // longnet: head lo + c and every r-th after it (one head when r >= group)
    hc.first = lo + c;
    hc.step = int(imin(br.dilation_rate, group));
    hc.count = hc.first < hi ? (hi - hc.first + hc.step - 1) / hc.step : 0;
    hc.offset = hc.first % br.dilation_rate;
  } else {  // grouped: the kv head's heads among the branch's group
    hc.first = max(lo, br.first_head);
    hc.count = max(0, min(hi, br.first_head + br.head_count) - hc.first);
    hc.offset = br.group_offset;
  }
  return hc;
}

// A 16-byte load as fp32 values (bf16 widens by a shift; fp16 by cvt).
template <class T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&x)[16 / sizeof(T)]) {
  const std::uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      x[i] = __uint_as_float(words[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      x[2 * i] = __uint_as_float(words[i] << 16);
      x[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    } else {
      __half2 h;
      static_assert(sizeof(h) == sizeof(words[i]));
      memcpy(&h, &words[i], sizeof(h));
      const float2 f = __half22float2(h);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
}

template <class T, int D, int kRows>
__global__ void __launch_bounds__(kThreads)
    decode_split_kernel(const __grid_constant__ DilatedParams p, const __grid_constant__ DecodePlan plan) {
  using Shape = SplitShape<T, D, kRows>;
  constexpr int kElems = Shape::kElems, kLanes = Shape::kLanes, kSlots = Shape::kSlots, kKeys = Shape::kKeys;
  __shared__ float warp_out[kWarps][kRows][D];
  __shared__ float warp_max[kWarps][kRows], warp_sum[kWarps][kRows];

  // The block's work.
  const std::int64_t b = int(blockIdx.x) / plan.blocks_per_sequence;
  const int in_sequence = int(blockIdx.x) % plan.blocks_per_sequence;
  int e = 0;
  while (e + 1 < plan.num_branches && in_sequence >= plan.branches[e + 1].block_begin) ++e;
  const SplitBranch& sb = plan.branches[e];
  int local = in_sequence - sb.block_begin;
  const int row_group = local % sb.row_groups;
  local /= sb.row_groups;
  const int chunk = local % sb.chunks;
  local /= sb.chunks;
  const int segment_index = local % sb.segments;
  local /= sb.segments;
  const int head_class_index = local % sb.classes;
  local /= sb.classes;
  const int kv_head = sb.kv_head_first + local;

  // The sequence's queries are its last Tn positions; the segment is the one segment_index after
  // the first query's.
  const detail::Branch& br = p.branches[sb.branch];
  const std::int64_t Tn = p.seqlen, L = p.key_lengths[b] + p.key_length_offset, query_begin = L - Tn;
  if (query_begin < 0) return;  // L < Tn: refused by validation (undefined behaviour without it)
  const std::int64_t w = br.segment_length, r = br.dilation_rate;
  const std::int64_t start = (query_begin / w + segment_index) * w;
  if (start >= L) return;
  const HeadClass hc = head_class(p, br, kv_head, head_class_index);
  if (hc.count == 0) return;
  // The class's queries in the segment (positions first_key + i·r among the last Tn) as rows
  // token-major, and this block's row group of them.
  const std::int64_t first_key = start + hc.offset;
  const Side tokens = select_side(first_key, r, imax(start, query_begin), start + imin(w, L - start), 0);
  const int rows = int(tokens.length) * hc.count, row_begin = row_group * kRows;
  if (row_begin >= rows) return;
  const int rows_here = min(kRows, rows - row_begin);
  // Keys first_key + j·r for j up to the last row's position (causal), this block's chunk of them.
  const int first_token_key = int((tokens.first - first_key) / r);  // the key index of the first query
  const int keys = first_token_key + (row_begin + rows_here - 1) / hc.count + 1;
  const int key_begin = chunk * plan.chunk_keys;
  if (key_begin >= keys) return;
  const int key_end = min(key_begin + plan.chunk_keys, keys);

  const int lane = int(threadIdx.x) % kLanes, slot = int(threadIdx.x) / kLanes;
  const bool loads = lane < Shape::kChunks;
  float q[kRows][kElems], acc[kRows][kElems], row_max[kRows], row_sum[kRows];
  int last_key[kRows];  // the row's last visible key (-1 for rows past rows_here)
  const float scale = p.scale * kLog2e;  // scores in base 2
#pragma unroll
  for (int m = 0; m < kRows; ++m) {
    const int row = row_begin + m, token = row / hc.count, head = hc.first + row % hc.count * hc.step;
    last_key[m] = m < rows_here ? first_token_key + token : -1;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (m < rows_here && loads)
      raw = *reinterpret_cast<const uint4*>(row_pointer<T>(p.q, b, head, tokens.first + token * r - query_begin) +
                                            lane * kElems);
    unpack<T>(raw, q[m]);
#pragma unroll
    for (int i = 0; i < kElems; ++i) {
      q[m][i] *= scale;
      acc[m][i] = 0.0f;
    }
    row_max[m] = neg_inf();
    row_sum[m] = 0.0f;
  }

  // Key j is cache row first_key + j·r, or for positions from query_begin on (keys from first_new on)
  // row first_key + j·r - query_begin of k_new, v_new where the call brings them.
  const T* k_base = static_cast<const T*>(p.k.data) + b * p.k.batch_stride + kv_head * p.k.head_stride +
                    first_key * p.k.row_stride + lane * kElems;
  const T* v_base = static_cast<const T*>(p.v.data) + b * p.v.batch_stride + kv_head * p.v.head_stride +
                    first_key * p.v.row_stride + lane * kElems;
  const std::int64_t k_step = r * p.k.row_stride, v_step = r * p.v.row_stride;
  const bool new_rows = plan.k_new.data != nullptr;
  const int first_new = new_rows ? int(imax(0, ceil_div(query_begin - first_key, r))) : INT_MAX;
  const T* k_new_base = static_cast<const T*>(plan.k_new.data) + b * plan.k_new.batch_stride +
                        kv_head * plan.k_new.head_stride + lane * kElems;
  const T* v_new_base = static_cast<const T*>(plan.v_new.data) + b * plan.v_new.batch_stride +
                        kv_head * plan.v_new.head_stride + lane * kElems;

  // Passes of kSlots·kKeys keys, the same bounds in every thread (the shuffles need whole warps):
  // key pass + u·kSlots + slot for u < kKeys, zeros past the chunk.
  for (int pass = key_begin; pass < key_end; pass += Shape::kKeysPerPass) {
    uint4 k_raw[kKeys], v_raw[kKeys];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      const int j = pass + u * kSlots + slot;
      k_raw[u] = v_raw[u] = make_uint4(0, 0, 0, 0);
      if (loads && j < key_end) {
        const std::int64_t t = first_key + std::int64_t(j) * r - query_begin;  // the new token's index, if j >= first_new
        const bool from_new = j >= first_new;
        k_raw[u] = __ldg(reinterpret_cast<const uint4*>(from_new ? k_new_base + t * plan.k_new.row_stride : k_base + j * k_step));
        v_raw[u] = __ldg(reinterpret_cast<const uint4*>(from_new ? v_new_base + t * plan.v_new.row_stride : v_base + j * v_step));
      }
    }
    float k[kKeys][kElems], v[kKeys][kElems];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      unpack<T>(k_raw[u], k[u]);
      unpack<T>(v_raw[u], v[u]);
    }
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      if (m >= rows_here) break;  // uniform over the block
      float s[kKeys], tile_max = neg_inf();
#pragma unroll
      for (int u = 0; u < kKeys; ++u) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kElems; ++i) dot = fmaf(q[m][i], k[u][i], dot);
#pragma unroll
        for (int offset = kLanes / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        const int j = pass + u * kSlots + slot;
        s[u] = j < key_end && j <= last_key[m] ? dot : neg_inf();
        tile_max = fmaxf(tile_max, s[u]);
      }
      // Online softmax (a NaN score is skipped by fmaxf and makes the sum, so the row, NaN).
      const float new_max = fmaxf(row_max[m], tile_max);
      const float base = softmax_base(new_max);
      const float correction = fast_exp2(row_max[m] - base);
      row_max[m] = new_max;
      row_sum[m] *= correction;
#pragma unroll
      for (int i = 0; i < kElems; ++i) acc[m][i] *= correction;
#pragma unroll
      for (int u = 0; u < kKeys; ++u) {
        const float prob = fast_exp2(s[u] - base);
        row_sum[m] += prob;
#pragma unroll
        for (int i = 0; i < kElems; ++i) acc[m][i] = fmaf(prob, v[u][i], acc[m][i]);
      }
    }
  }

  // The slots' softmax states merged: within a warp by shuffles (lanes kLanes, 2·kLanes, ... apart
  // hold the same elements of other slots), then across warps in shared memory.
#pragma unroll
  for (int offset = kLanes; offset < 32; offset *= 2)
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      const float other_max = __shfl_xor_sync(0xffffffffu, row_max[m], offset);
      const float other_sum = __shfl_xor_sync(0xffffffffu, row_sum[m], offset);
      const float new_max = fmaxf(row_max[m], other_max), base = softmax_base(new_max);
      const float mine = fast_exp2(row_max[m] - base), theirs = fast_exp2(other_max - base);
      row_sum[m] = row_sum[m] * mine + other_sum * theirs;
#pragma unroll
      for (int i = 0; i < kElems; ++i)
        acc[m][i] = acc[m][i] * mine + __shfl_xor_sync(0xffffffffu, acc[m][i], offset) * theirs;
      row_max[m] = new_max;
    }
  const int warp = int(threadIdx.x) / 32;
  if (int(threadIdx.x) % 32 < kLanes) {  // the warp's first slot
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      if (loads)
#pragma unroll
        for (int i = 0; i < kElems; ++i) warp_out[warp][m][lane * kElems + i] = acc[m][i];
      if (lane == 0) warp_max[warp][m] = row_max[m], warp_sum[warp][m] = row_sum[m];
    }
  }
  __syncthreads();
  const int slot_of_branch = plan.branch_slots == 1 ? 0 : sb.branch;
  for (int x = int(threadIdx.x); x < rows_here * D; x += kThreads) {
    const int m = x / D, d = x % D;
    float block_max = neg_inf();
#pragma unroll
    for (int i = 0; i < kWarps; ++i) block_max = fmaxf(block_max, warp_max[i][m]);
    const float base = softmax_base(block_max);
    float sum = 0.0f, value = 0.0f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) {
      const float weight = fast_exp2(warp_max[i][m] - base);
      sum += warp_sum[i][m] * weight;
      value += warp_out[i][m][d] * weight;
    }
    const int row = row_begin + m, token = row / hc.count, head = hc.first + row % hc.count * hc.step;
    const std::int64_t t = tokens.first + std::int64_t(token) * r - query_begin;
    const std::int64_t entry = (((b * Tn + t) * p.heads + head) * plan.branch_slots + slot_of_branch) * plan.max_chunks + chunk;
    // A row that sees no key of this chunk: sum 0 (the merge reads no such chunk).
    plan.partial_out[entry * D + d] = sum == 0.0f ? 0.0f : value / sum;
    if (d == 0) plan.partial_lse[entry] = sum == 0.0f ? neg_inf() : base + __log2f(sum);
  }
}

// A block per (b, t, h) query row: the partials of every branch that selects the row's position
// for the head, merged by their log-sum-exps; out = output_scale · the merged output (1/G in
// grouped mode), lse = the merged log-sum-exp (natural log); 0 and -inf where none selects it.
// A row can have dozens of partials (B = 1 cuts each branch's keys into many chunks): groups of
// D/4 threads (a float4 each) take every kGroups-th partial, each group its own online merge,
// so that several partials' loads are in flight at once; the groups are merged at the end.
template <class T, int D>
__global__ void __launch_bounds__(kThreads)
    decode_merge_kernel(const __grid_constant__ DilatedParams p, const __grid_constant__ DecodePlan plan) {
  constexpr int kPerGroup = D / 4, kGroups = kThreads / kPerGroup;
  __shared__ float group_out[kGroups][D];
  __shared__ float group_max[kGroups], group_sum[kGroups];
  const std::int64_t H = p.heads, Tn = p.seqlen, row = blockIdx.x;
  const int head = int(row % H);
  const std::int64_t t = row / H % Tn, b = row / (H * Tn);
  const std::int64_t position = p.key_lengths[b] + p.key_length_offset - Tn + t;
  const int group = int(threadIdx.x) / kPerGroup, column = int(threadIdx.x) % kPerGroup * 4;

  float row_max = neg_inf(), row_sum = 0.0f, acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int i = 0; i < p.num_branches && position >= 0 && group < kGroups; ++i) {  // position < 0: L < Tn
    // The branch's chunks that hold keys of the position (those up to it), as the split launch cut them.
    const detail::Branch& br = p.branches[i];
    if (head < br.first_head || head >= br.first_head + br.head_count) continue;
    const std::int64_t r = br.dilation_rate, offset = br.offset_from_head ? head % r : br.group_offset;
    const std::int64_t in_segment = position % br.segment_length;
    if (in_segment % r != offset) continue;  // the branch does not select the position
    const int chunks = int(imin(ceil_div((in_segment - offset) / r + 1, plan.chunk_keys), plan.max_chunks));
    const std::int64_t first = (row * plan.branch_slots + (plan.branch_slots == 1 ? 0 : i)) * plan.max_chunks;
#pragma unroll 4
    for (int c = group; c < chunks; c += kGroups) {
      const float lse = plan.partial_lse[first + c];
      const float4 x = *reinterpret_cast<const float4*>(plan.partial_out + (first + c) * D + column);
      // Online merge (a NaN log-sum-exp is skipped by fmaxf and makes the sum, so the row, NaN).
      const float new_max = fmaxf(row_max, lse), base = softmax_base(new_max);
      const float old_weight = fast_exp2(row_max - base), weight = fast_exp2(lse - base);
      row_sum = row_sum * old_weight + weight;
      acc[0] = acc[0] * old_weight + weight * x.x;
      acc[1] = acc[1] * old_weight + weight * x.y;
      acc[2] = acc[2] * old_weight + weight * x.z;
      acc[3] = acc[3] * old_weight + weight * x.w;
      row_max = new_max;
    }
  }
  if (group < kGroups) {
#pragma unroll
    for (int k = 0; k < 4; ++k) group_out[group][column + k] = acc[k];
    if (column == 0) group_max[group] = row_max, group_sum[group] = row_sum;
  }
  __syncthreads();
  float merged_max = neg_inf();
#pragma unroll 8
  for (int g = 0; g < kGroups; ++g) merged_max = fmaxf(merged_max, group_max[g]);
  const float base = softmax_base(merged_max);
  float sum = 0.0f;
#pragma unroll 8
  for (int g = 0; g < kGroups; ++g) sum += group_sum[g] * fast_exp2(group_max[g] - base);
  const float factor = sum == 0.0f ? 0.0f : p.output_scale / sum;  // a NaN sum makes the row NaN
  T* out = row_pointer<T>(p.out, b, head, t);
  for (int d = int(threadIdx.x); d < D; d += kThreads) {
    float value = 0.0f;
#pragma unroll 8
    for (int g = 0; g < kGroups; ++g) value += group_out[g][d] * fast_exp2(group_max[g] - base);
    out[d] = from_float<T>(value * factor);
  }
  if (threadIdx.x == 0) *lse_pointer(p, b, head, t) = sum == 0.0f ? neg_inf() : (base + __log2f(sum)) * kLn2;
  // The new token's key and value rows into the caches (block (b, t, h) for kv head h < Hkv).
  if (plan.k_new.data != nullptr && head < p.kv_heads && position >= 0) {
    const T* k_from = static_cast<const T*>(plan.k_new.data) + b * plan.k_new.batch_stride + t * plan.k_new.row_stride +
                      head * plan.k_new.head_stride;
    const T* v_from = static_cast<const T*>(plan.v_new.data) + b * plan.v_new.batch_stride + t * plan.v_new.row_stride +
                      head * plan.v_new.head_stride;
    T* k_to = static_cast<T*>(p.k.data) + b * p.k.batch_stride + position * p.k.row_stride + head * p.k.head_stride;
    T* v_to = static_cast<T*>(p.v.data) + b * p.v.batch_stride + position * p.v.row_stride + head * p.v.head_stride;
    for (int d = int(threadIdx.x); d < D; d += kThreads) {
      k_to[d] = k_from[d];
      v_to[d] = v_from[d];
    }
  }
}

// The most query rows of one head class in one segment: its heads times the Tn queries' positions
// with its offset there (at most ceil(min(Tn, w) / r)).
std::int64_t class_rows(const DilatedParams& p, const detail::Branch& br) {
  const std::int64_t group = p.heads / p.kv_heads, r = br.dilation_rate;
  const std::int64_t heads =
      br.offset_from_head ? ceil_div(group, std::min(r, group)) : std::min<std::int64_t>(group, br.head_count);
  return heads * ceil_div(std::min(p.seqlen, br.segment_length), r);
}

// The split launch's blocks per branch, and the chunk size: grid and chunks depend on B, Tn, H,
// Hkv, the branches and the caches' rows (cache_rows = Nmax), never on the lengths in
// cache_seqlens (on the device); blocks past a sequence's keys return at once.
DecodePlan make_plan(const DilatedParams& p, std::int64_t cache_rows, int rows_per_block, int keys_per_pass,
                     int max_chunk_keys, int multiprocessors, std::int64_t& blocks) {
  DecodePlan plan;
  const std::int64_t group = p.heads / p.kv_heads, Tn = p.seqlen;
  std::int64_t units[detail::kMaxBranches] = {}, keys[detail::kMaxBranches] = {}, upper_keys = 0;
  for (int i = 0; i < p.num_branches; ++i) {
    const detail::Branch& br = p.branches[i];
    if (br.head_count == 0) continue;  // grouped mode with H < G: an empty group
    const std::int64_t w = br.segment_length, r = br.dilation_rate;
    SplitBranch& sb = plan.branches[plan.num_branches];
    sb.branch = i;
    sb.kv_head_first = int(br.first_head / group);
    sb.kv_heads = int((br.first_head + br.head_count - 1) / group) - sb.kv_head_first + 1;
    sb.classes = int(br.offset_from_head ? std::min(group, r) : 1);
    sb.segments = int(std::min({Tn, (Tn - 1) / w + 2, ceil_div(cache_rows, w)}));
    sb.row_groups = int(ceil_div(class_rows(p, br), rows_per_block));
    units[plan.num_branches] = std::int64_t(sb.kv_heads) * sb.classes * sb.segments * sb.row_groups;  // a sequence's
    keys[plan.num_branches] = ceil_div(std::min(w, cache_rows), r);
    upper_keys += p.batch * units[plan.num_branches] * keys[plan.num_branches];
    ++plan.num_branches;
  }
  // As if every class were selected and every cache full: kTargetBlocksPerSm blocks per SM, whole
  // passes each, at most kMaxChunkBytes of K and V.
  const std::int64_t target = std::int64_t(multiprocessors) * kTargetBlocksPerSm;
  const std::int64_t most = std::max<std::int64_t>(keys_per_pass, max_chunk_keys / keys_per_pass * keys_per_pass);
  const std::int64_t chunk = std::clamp<std::int64_t>(
      ceil_div(ceil_div(upper_keys, target), keys_per_pass) * keys_per_pass, keys_per_pass, most);
  plan.chunk_keys = int(chunk);
  plan.branch_slots = p.mode == Mode::longnet ? p.num_branches : 1;
  std::int64_t per_sequence = 0;
  for (int e = 0; e < plan.num_branches; ++e) {
    SplitBranch& sb = plan.branches[e];
    sb.chunks = int(ceil_div(keys[e], chunk));
    sb.block_begin = int(per_sequence);
    per_sequence += units[e] * sb.chunks;
    plan.max_chunks = std::max(plan.max_chunks, sb.chunks);
  }
  // One check covers the grid and the int block_begin above (each at most a sequence's blocks).
  blocks = p.batch * per_sequence;
  if (std::max(blocks, per_sequence) > INT_MAX)
    throw Error("decoding needs more than 2^31 thread blocks in one launch; expected a smaller B, H or cache");
  plan.blocks_per_sequence = int(per_sequence);
  return plan;
}

// The scratch bytes of the call's plan; with `launch`, also its kernels (scratch from
// p.workspace when it holds them, else allocated in stream order).
template <class T, int D, int kRows>
std::size_t launch_decode(const DilatedParams& p, std::int64_t cache_rows, int multiprocessors, const NewRows& rows_new,
                          bool launch) {
  using Shape = SplitShape<T, D, kRows>;
  const auto stream = static_cast<cudaStream_t>(p.stream);
  std::int64_t blocks = 0;
  DecodePlan plan = make_plan(p, cache_rows, kRows, Shape::kKeysPerPass, kMaxChunkBytes / int(2 * D * sizeof(T)),
                              multiprocessors, blocks);
  const std::int64_t rows = p.batch * p.seqlen * p.heads, entries = rows * plan.branch_slots * plan.max_chunks;
  if (rows > INT_MAX)
    throw Error("decoding needs more than 2^31 thread blocks in one launch; expected a smaller B, Tn or H");
  const std::size_t bytes = std::size_t(entries) * (D + 1) * sizeof(float);
  if (!launch) return bytes;
  // The caller's workspace, or scratch in stream order from the device's current memory pool:
  // allocated before the kernels, freed after the merge on the same stream (nothing waits on the
  // host; how long the pool keeps the memory is the application's setting).
  const bool given = p.workspace != nullptr && p.workspace_bytes >= bytes;
  void* scratch = given ? p.workspace : nullptr;
  if (const cudaError_t e = given ? cudaSuccess : cudaMallocAsync(&scratch, bytes, stream); e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("dattn: decode scratch of " + std::to_string(bytes) +
                             " bytes (cudaMallocAsync) failed: " + cudaGetErrorString(e));
  }
  plan.partial_out = static_cast<float*>(scratch);
  plan.k_new = rows_new.k;
  plan.v_new = rows_new.v;
  plan.partial_lse = plan.partial_out + entries * D;
  if (blocks > 0) decode_split_kernel<T, D, kRows><<<unsigned(blocks), kThreads, 0, stream>>>(p, plan);
  decode_merge_kernel<T, D><<<unsigned(rows), kThreads, 0, stream>>>(p, plan);
  const cudaError_t launched = cudaGetLastError();
  if (!given) cudaFreeAsync(scratch, stream);
  if (launched != cudaSuccess)
    throw std::runtime_error(std::string("dattn: decode launch failed: ") + cudaGetErrorString(launched));
  return bytes;
}

// kRows: the fewest of 1, 2, 4, 8 that hold a class's rows (more rows: row groups).
template <class T, int D>
std::size_t launch_rows(const DilatedParams& p, std::int64_t cache_rows, int multiprocessors, const NewRows& rows_new,
                        bool launch) {
  std::int64_t rows = 1;
  for (int i = 0; i < p.num_branches; ++i)
    if (p.branches[i].head_count > 0) rows = std::max(rows, class_rows(p, p.branches[i]));
  if (rows <= 1) return launch_decode<T, D, 1>(p, cache_rows, multiprocessors, rows_new, launch);
  if (rows <= 2) return launch_decode<T, D, 2>(p, cache_rows, multiprocessors, rows_new, launch);
  if (rows <= 4) return launch_decode<T, D, 4>(p, cache_rows, multiprocessors, rows_new, launch);
  return launch_decode<T, D, kMaxRows>(p, cache_rows, multiprocessors, rows_new, launch);
}

bool head_dim_built(std::int64_t d) {
#ifdef DATTN_CUDA_MINIMAL
  return d == 64;
#else
  return detail::is_cuda_head_dim(d);
#endif
}

template <class T>
std::size_t launch_head_dim(const DilatedParams& p, std::int64_t cache_rows, int multiprocessors, const NewRows& rows_new,
                            bool launch) {
  switch (p.head_dim) {
#ifndef DATTN_CUDA_MINIMAL
    case 16: return launch_rows<T, 16>(p, cache_rows, multiprocessors, rows_new, launch);
    case 32: return launch_rows<T, 32>(p, cache_rows, multiprocessors, rows_new, launch);
    case 80: return launch_rows<T, 80>(p, cache_rows, multiprocessors, rows_new, launch);
    case 96: return launch_rows<T, 96>(p, cache_rows, multiprocessors, rows_new, launch);
    case 128: return launch_rows<T, 128>(p, cache_rows, multiprocessors, rows_new, launch);
#endif
    case 64: return launch_rows<T, 64>(p, cache_rows, multiprocessors, rows_new, launch);
    default: throw Error("head dim D = " + std::to_string(p.head_dim) + " has no CUDA decode kernel in this build");
  }
}

}  // namespace

bool decode_covers(const DilatedParams& p) {
  const bool dtype = p.dtype == DType::bfloat16 || p.dtype == DType::float16 || p.dtype == DType::float32;
  return p.key_lengths != nullptr && p.seqlen <= kCudaDecodeMaxTokens && p.cuda_kernels == CudaKernels::automatic &&
         dtype && head_dim_built(p.head_dim) && p.causal && p.block_size == 0 && p.cu_seqlens == nullptr &&
         p.position_index == nullptr && p.key_padding_mask == nullptr && p.dropout_p == 0.0f && !p.float32_outputs;
}

namespace {

// decode and decode_scratch_bytes: the plan (the device's multiprocessors size the chunks), and
// with `launch` its kernels.
std::size_t run_decode(const DilatedParams& p, std::int64_t cache_rows, const NewRows& rows_new, bool launch) {
  const DeviceGuard on(p.q.data);  // q's device is the current one
  const int multiprocessors = multiprocessor_count();
  switch (p.dtype) {
    case DType::bfloat16: return launch_head_dim<__nv_bfloat16>(p, cache_rows, multiprocessors, rows_new, launch);
    case DType::float16: return launch_head_dim<__half>(p, cache_rows, multiprocessors, rows_new, launch);
    case DType::float32: return launch_head_dim<float>(p, cache_rows, multiprocessors, rows_new, launch);
    default: throw Error(std::string("dtype ") + dtype_name(p.dtype) + " has no CUDA decode kernel; expected float32, bfloat16 or float16");
  }
}

}  // namespace

void decode(const DilatedParams& p, std::int64_t cache_rows, const TensorView* k_new, const TensorView* v_new) {
  NewRows rows_new;
  if (k_new != nullptr) {
    rows_new.k = {k_new->data, k_new->strides[0], k_new->strides[1], k_new->strides[2], 1};
    rows_new.v = {v_new->data, v_new->strides[0], v_new->strides[1], v_new->strides[2], 1};
  }
  run_decode(p, cache_rows, rows_new, true);
}

std::size_t decode_scratch_bytes(const DilatedParams& p, std::int64_t cache_rows) {
  return run_decode(p, cache_rows, NewRows{}, false);
}

}  // namespace dattn::cuda
