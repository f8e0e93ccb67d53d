// How a launch's thread blocks map onto dilated attention's work (the GPU form of
// src/cpu/work.hpp). A block owns one tile of one group: the rows one branch selects in one
// segment of one (batch, head), tile t being selected rows [t·kBlock, (t+1)·kBlock). It also owns
// the region of original rows around its tile (the unselected rows between, before the first and
// after the last selected row), so that the rows no branch selects are written in the same pass.
#pragma once

#include <cstdint>

#include "cuda/launch.hpp"
#include "cuda/mma.cuh"
#include "dattn/philox.hpp"
#include "params.hpp"

namespace dattn::cuda {

struct BlockWork {
  int branch = 0, role = 0;
  std::int64_t batch = 0, head = 0;
  std::int64_t stride = 1;       // dilation rate r
  std::int64_t first = 0;        // original position of the segment's first selected row
  std::int64_t length = 0;       // L: rows the branch selects in the segment
  std::int64_t tile_begin = 0;   // own rows [tile_begin, tile_begin + tile_rows) of [0, L)
  int tile_rows = 0;
  std::int64_t region_begin = 0, region_end = 0;  // positions this block writes
  const std::int64_t* index = nullptr;            // Hilbert order: position -> original row, or none
  std::int64_t seqlen = 0;
  __device__ std::int64_t position(std::int64_t j) const { return first + j * stride; }
  // The row of the tensors (and the position dropout and padding use) at an attention position.
  // Positions past the sequence (of padded tile columns, whose addresses are formed but never read)
  // stay as they are: the index has no entry for them.
  __device__ std::int64_t original(std::int64_t pos) const { return index && pos < seqlen ? index[pos] : pos; }
  __device__ std::int64_t row(std::int64_t j) const { return original(position(j)); }
};

__device__ __forceinline__ std::int64_t imin(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ std::int64_t selected_count(std::int64_t segment_length, std::int64_t offset,
                                                       std::int64_t stride) {
  return offset < segment_length ? (segment_length - offset + stride - 1) / stride : 0;
}

// Decodes blockIdx.x into the block's work. Returns false for a block past the last tile of a
// short (partial) segment: it has nothing to do.
template <int kBlock>
__device__ __forceinline__ bool decode_block(const detail::DilatedParams& p, const LaunchPlan& plan,
                                             BlockWork& work) {
  const int block = int(blockIdx.x);
  int j = 0;
  while (j + 1 < plan.num_jobs && block >= plan.jobs[j + 1].block_begin) ++j;
  const Job& job = plan.jobs[j];
  const detail::Branch& br = p.branches[job.branch];
  std::int64_t local = block - job.block_begin;
  std::int64_t tile = local % job.tiles;
  local /= job.tiles;
  if (p.causal) tile = job.tiles - 1 - tile;  // the longest causal tiles first
  const std::int64_t segment = local % job.segments;
  local /= job.segments;
  work.branch = job.branch;
  work.index = p.position_index;
  work.seqlen = p.seqlen;
  work.role = job.role;
  work.head = br.first_head + local % br.head_count;
  work.batch = local / br.head_count;
  const std::int64_t w = br.segment_length, r = br.dilation_rate;
  const std::int64_t o = br.offset_from_head ? work.head % r : br.group_offset;
  const std::int64_t start = segment * w, end = imin(start + w, p.seqlen);
  work.stride = r;
  work.first = start + o;
  work.length = selected_count(end - start, o, r);
  const std::int64_t tiles_here = work.length > 0 ? (work.length + kBlock - 1) / kBlock : 1;
  if (tile >= tiles_here) return false;
  work.tile_begin = tile * kBlock;
  work.tile_rows = int(imin(kBlock, work.length - work.tile_begin));
  if (work.tile_rows < 0) work.tile_rows = 0;
  work.region_begin = tile == 0 ? start : work.first + tile * kBlock * r;
  work.region_end = tile + 1 == tiles_here ? end : work.first + (tile + 1) * kBlock * r;
  return true;
}

template <class T>
__device__ __forceinline__ T* row_pointer(const detail::Operand& x, std::int64_t batch, std::int64_t head,
                                          std::int64_t position) {
  return static_cast<T*>(x.data) + batch * x.batch_stride + position * x.row_stride + head * x.head_stride;
}

__device__ __forceinline__ float* lse_pointer(const detail::DilatedParams& p, std::int64_t batch, std::int64_t head,
                                              std::int64_t position) {
  return p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride + position * p.lse_row_stride;
}

__device__ __forceinline__ bool key_padded(const detail::DilatedParams& p, std::int64_t batch, std::int64_t position) {
  return p.key_padding_mask != nullptr &&
         p.key_padding_mask[batch * p.mask_batch_stride + position * p.mask_row_stride] != 0;
}

// Dropout keep bits of one warp's 16-row score tile in accumulator layout: bit 4n+e belongs to
// element [n][e], whose row is row1 for e >= 2 (else row0) and whose column is
// col0 + 8n + 2t + (e & 1) (group indices). Rows are queries, or keys when rows_are_keys. A rolled
// loop, so that Philox appears once in the code.
template <int kTiles>
__device__ __forceinline__ std::uint32_t dropout_bits(const detail::DilatedParams& p, const BlockWork& w,
                                                      std::int64_t row0, std::int64_t row1, std::int64_t col0,
                                                      bool rows_are_keys) {
  static_assert(kTiles * 4 <= 32);
  const std::int64_t batch_head = w.batch * p.heads + w.head;
  const int t = threadIdx.x % 4;
  std::uint32_t bits = 0;
#pragma unroll 1
  for (int idx = 0; idx < kTiles * 4; ++idx) {
    const int n = idx >> 2, e = idx & 3;
    const std::int64_t row = (e >> 1) ? row1 : row0, col = col0 + n * 8 + 2 * t + (e & 1);
    const std::int64_t query = w.row(rows_are_keys ? col : row), key = w.row(rows_are_keys ? row : col);
    // SPEC.md's keep decision (dattn::dropout_keep), with the word picked without indexing an array.
    const PhiloxWords words = philox4x32_10({{std::uint32_t(key >> 2), std::uint32_t(query), std::uint32_t(batch_head),
                                              std::uint32_t(p.dropout_offset)}},
                                            std::uint32_t(p.dropout_seed), std::uint32_t(p.dropout_seed >> 32));
    const int word = int(key & 3);
    const std::uint32_t u = word == 0 ? words.w[0] : word == 1 ? words.w[1] : word == 2 ? words.w[2] : words.w[3];
    bits |= std::uint32_t(u >= p.dropout_threshold) << idx;
  }
  return bits;
}

// ---- storage element <-> float ----
template <class T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}
template <class T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

// Stores two consecutive elements (x0 at dst[0], x1 at dst[1]), plus old_weight times what is
// there unless old_weight is 0 (then dst is not read: it may hold anything).
template <class T>
__device__ __forceinline__ void store2(T* dst, float x0, float x1, float old_weight) {
  if constexpr (std::is_same_v<T, float>) {
    float2 v = make_float2(x0, x1);
    if (old_weight != 0.0f) {
      const float2 old = *reinterpret_cast<const float2*>(dst);
      v.x += old_weight * old.x;
      v.y += old_weight * old.y;
    }
    *reinterpret_cast<float2*>(dst) = v;
  } else {
    if (old_weight != 0.0f) {
      x0 += old_weight * to_float(dst[0]);
      x1 += old_weight * to_float(dst[1]);
    }
    *reinterpret_cast<std::uint32_t*>(dst) = pack2<T>(x0, x1);
  }
}

// Writes zeros over the D elements of a row (16-byte stores; rows are 16-byte aligned).
template <class T>
__device__ __forceinline__ void zero_row_chunk(T* row, int chunk) {
  reinterpret_cast<uint4*>(row)[chunk] = make_uint4(0, 0, 0, 0);
}

// ---- tile loads: rows [j0, j0 + kRows) of a group into shared memory ----
// 16-bit storage: cp.async, rows past `valid` zero-filled (never garbage: 0·NaN would poison P·V).
// fp32 storage: loaded through registers and split into S bf16 planes.
template <class T, int S, int kRows, int D, int kThreads>
__device__ __forceinline__ void load_rows(std::uint16_t* smem, int plane_elems, const detail::Operand& x,
                                          const BlockWork& w, std::int64_t j0, int valid) {
  constexpr int kStride = D + 8;
  if constexpr (sizeof(T) == 2) {
    constexpr int kChunks = D / 8;  // 16-byte chunks per row
    const std::uint32_t base = smem_address(smem);
#pragma unroll
    for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
      const int row = c / kChunks, col = (c % kChunks) * 8;
      const bool ok = row < valid;
      const T* src = row_pointer<const T>(x, w.batch, w.head, w.row(ok ? j0 + row : w.tile_begin)) + col;
      cp_async_16(base + (row * kStride + col) * 2, ok ? src : static_cast<const T*>(x.data), ok);
    }
  } else {
    constexpr int kChunks = D / 4;
#pragma unroll 4
    for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
      const int row = c / kChunks, col = (c % kChunks) * 4;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row < valid)
        v = *reinterpret_cast<const float4*>(row_pointer<const float>(x, w.batch, w.head, w.row(j0 + row)) + col);
      std::uint32_t lo[S], hi[S];
      split2<S>(v.x, v.y, lo);
      split2<S>(v.z, v.w, hi);
#pragma unroll
      for (int q = 0; q < S; ++q)
        *reinterpret_cast<uint2*>(smem + q * plane_elems + row * kStride + col) = make_uint2(lo[q], hi[q]);
    }
  }
}

}  // namespace dattn::cuda
