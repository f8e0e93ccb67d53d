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

// The positions one side (queries or keys) of a block's group selects: first + j·stride for
// j < length. A tensor row is original(position) − row_offset: a ring step's tensors hold the
// slice of rows that starts at row_offset.
struct Side {
  std::int64_t first = 0, length = 0, row_offset = 0;
};

struct BlockWork {
  int branch = 0, role = 0;
  bool accumulate = false;         // the job's: add into what is there (see Job)
  std::int64_t batch = 0, head = 0;  // head: a query head (k, v, dk, dv: operand_head maps it)
  std::int64_t stride = 1;         // dilation rate r
  Side query, key;                 // equal except in ring steps
  std::int64_t causal_shift = 0;   // causal: key j is visible to query i iff j <= i + causal_shift
  std::int64_t tile_begin = 0;     // own rows [tile_begin, tile_begin + tile_rows) of own().length
  int tile_rows = 0;
  std::int64_t region_begin = 0, region_end = 0;  // positions this block writes (not in ring steps)
  const std::int64_t* index = nullptr;            // Hilbert order: position -> original row, or none
  std::int64_t seqlen = 0;
  std::int64_t mask_entry = 0;  // block-sparse: the own block's CSR row (or transposed column) index
  int group = 0;                // the plan's group (batch, head, segment of the branch); Job::group_begin
  bool dq_accumulate = false;   // the job's
  // Own rows: queries (forward, dq blocks) or keys (dk/dv blocks).
  __device__ const Side& own() const { return role == kDkDvRole ? key : query; }
  // The original position (dropout's and causality's) at an attention position. Positions past
  // the sequence (of padded tile columns, whose addresses are formed but never read) stay as they
  // are: the index has no entry for them.
  __device__ std::int64_t original(std::int64_t pos) const { return index && pos < seqlen ? __ldg(index + pos) : pos; }
  __device__ std::int64_t position(const Side& s, std::int64_t j) const { return original(s.first + j * stride); }
  __device__ std::int64_t row(const Side& s, std::int64_t j) const { return position(s, j) - s.row_offset; }
  // position() and row() in 32-bit arithmetic, for the tiles' inner loops (CUDA calls hold N <= 2^30
  // rows).
  __device__ int original32(int pos) const { return index && pos < int(seqlen) ? int(__ldg(index + pos)) : pos; }
  __device__ int position32(const Side& s, int j) const { return original32(int(s.first) + j * int(stride)); }
  __device__ int row32(const Side& s, int j) const { return position32(s, j) - int(s.row_offset); }
};

__device__ __forceinline__ std::int64_t imin(std::int64_t a, std::int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ std::int64_t imax(std::int64_t a, std::int64_t b) { return a > b ? a : b; }

// a / b and a mod b of nonnegative values, in 32-bit arithmetic where both fit (every CUDA call's
// tiles, heads and local positions; a ring's global positions may not): a 64-bit division is a
// call of ~70 dependent instructions, and a block's decode, which thread 0 makes while the block's
// other threads wait at its first barrier, holds a dozen. Other values divide in 64 bits.
__device__ __forceinline__ std::int64_t quotient(std::int64_t a, std::int64_t b) {
  return ((a | b) >> 31) == 0 ? std::int64_t(std::uint32_t(a) / std::uint32_t(b)) : a / b;
}
__device__ __forceinline__ std::int64_t modulo(std::int64_t a, std::int64_t b) { return a - quotient(a, b) * b; }
// The same by a FastDivisor: a multiply and a shift where 0 <= a < 2^31 (decode's values), else a
// 64-bit division (a ring's global positions, a negative difference).
__device__ __forceinline__ std::int64_t quotient(std::int64_t a, const FastDivisor& b) {
  return (a >> 31) == 0 ? std::int64_t((std::uint64_t(std::uint32_t(a)) * b.multiplier) >> b.shift) : a / b.value;
}
__device__ __forceinline__ std::int64_t modulo(std::int64_t a, const FastDivisor& b) { return a - quotient(a, b) * b.value; }
__device__ __forceinline__ std::int64_t divisor_value(std::int64_t b) { return b; }
__device__ __forceinline__ std::int64_t divisor_value(const FastDivisor& b) { return b.value; }

// The positions of [lo, hi) that a branch selecting first + j·r picks, tensor rows from offset.
// rate: the dilation rate r, an int64 or a FastDivisor.
template <class Rate>
__device__ __forceinline__ Side select_side(std::int64_t first, const Rate& rate, std::int64_t lo, std::int64_t hi,
                                            std::int64_t offset) {
  const std::int64_t r = divisor_value(rate);
  Side s;
  s.first = lo <= first ? first : first + quotient(lo - first + r - 1, rate) * r;
  s.length = s.first < hi ? quotient(hi - s.first + r - 1, rate) : 0;
  s.row_offset = offset;
  return s;
}

// Decodes blockIdx.x into the block's work. Segments are cut by global positions; the block's
// queries are those of [query_position, query_position + seqlen) in its segment, its keys those
// of [key_begin, key_end) (both the whole segment except in ring steps). Returns false for a block
// with nothing to do: past the last tile of a short segment, or with no own rows in a ring step.
template <int kBlock>
__device__ __forceinline__ bool decode_block(const detail::DilatedParams& p, const LaunchPlan& plan, int block,
                                             BlockWork& work) {
  int j = 0;
  while (j + 1 < plan.num_jobs && block >= plan.jobs[j + 1].block_begin) ++j;
  const Job& job = plan.jobs[j];
  const detail::Branch& br = p.branches[job.branch];
  std::int64_t local = block - job.block_begin;
  std::int64_t tile = modulo(local, job.by_tiles);
  local = quotient(local, job.by_tiles);
  work.group = job.group_begin + int(local);
  work.dq_accumulate = job.dq_accumulate;
  if (p.causal) tile = job.tiles - 1 - tile;  // the longest causal tiles first
  std::int64_t segment = job.first_segment + modulo(local, job.by_segments);
  local = quotient(local, job.by_segments);
  work.branch = job.branch;
  work.index = p.position_index;
  work.seqlen = p.seqlen;
  work.role = job.role;
  work.accumulate = job.accumulate;
  work.head = job.head_first + modulo(local, job.by_heads) * job.head_step;
  work.batch = quotient(local, job.by_heads);
  const std::int64_t w = br.segment_length, r = br.dilation_rate;
  const std::int64_t o = br.offset_from_head ? modulo(work.head, job.by_rate) : br.group_offset;
  // The sequence: its length, where its rows start in the tensors, its query and key positions.
  std::int64_t length = p.global_length, row_base = 0, query_begin = p.query_position;
  std::int64_t query_end = p.query_position + p.seqlen, key_begin = p.key_begin, key_end = p.key_end;
  if (p.cu_seqlens != nullptr) {
    // A packed batch: sequence `batch` is tensor rows [row_base, row_base + its length), positions
    // counted from its start (the plan covers max_seqlen; segments past the sequence do nothing).
    row_base = p.cu_seqlens[work.batch];
    length = p.cu_seqlens[work.batch + 1] - row_base;
  }
  if (p.key_lengths != nullptr) {
    // Decoding with a cache: the queries are the last seqlen of the sequence's first L positions,
    // the keys all L (cache rows = positions); the plan counts segments from the queries' first.
    length = key_end = p.key_lengths[work.batch] + p.key_length_offset;
    query_begin = length - p.seqlen;
    query_end = length;
    key_begin = 0;
    segment += quotient(query_begin, w);
  }
  const std::int64_t start = segment * w, end = imin(start + w, length), first = start + o;
  if (start >= length) return false;
  work.stride = r;
  work.query = select_side(first, job.by_rate, imax(start, query_begin), imin(end, query_end), query_begin - row_base);
  work.key = select_side(first, job.by_rate, imax(start, key_begin), imin(end, key_end), key_begin - row_base);
  work.causal_shift = quotient(work.query.first - work.key.first, job.by_rate);  // exact: both are first mod r
  const std::int64_t own_length = work.own().length;
  // Nothing to add (a ring step, a later branch or head phase), unless the dk/dv blocks form dQ by
  // atomics and dq is written, not added: then they still zero dq's rows of the segment.
  const bool writes_dq = p.dq_scratch != nullptr && work.role == kDkDvRole && !job.dq_accumulate;
  if (own_length == 0 && job.accumulate && !writes_dq) return false;
  const std::int64_t tiles_here = own_length > 0 ? quotient(own_length + kBlock - 1, kBlock) : 1;
  if (tile >= tiles_here) return false;
  work.tile_begin = tile * kBlock;
  work.tile_rows = int(imin(kBlock, own_length - work.tile_begin));
  if (work.tile_rows < 0) work.tile_rows = 0;
  // The positions this block writes, within its side's range (the queries of a decode call are the
  // last positions only; every other call's own range covers the segment).
  const bool keys_own = work.role == kDkDvRole;
  work.region_begin = imax(tile == 0 ? start : first + tile * kBlock * r, keys_own ? key_begin : query_begin);
  work.region_end = imin(tile + 1 == tiles_here ? end : first + (tile + 1) * kBlock * r, keys_own ? key_end : query_end);
  return true;
}

// Block-sparse attention (p.block_size > 0): a block owns one tile of one block of its side
// (query blocks for the forward and dq blocks, key blocks for dk/dv blocks), decoded from blockIdx.x
// as for dilated attention with the blocks in place of segments. Both sides have stride 1; the
// other side spans the step's whole range, and other_tiles() picks the allowed blocks from it.
template <int kBlock>
__device__ __forceinline__ bool decode_sparse_block(const detail::DilatedParams& p, const LaunchPlan& plan, int block,
                                                    BlockWork& work) {
  const Job& job = plan.num_jobs > 1 && block >= plan.jobs[1].block_begin ? plan.jobs[1] : plan.jobs[0];
  std::int64_t local = block - job.block_begin;
  const std::int64_t tile = modulo(local, job.by_tiles);
  local = quotient(local, job.by_tiles);
  std::int64_t own_block = modulo(local, job.by_segments);
  local = quotient(local, job.by_segments);
  // Causal: later query blocks see more keys, earlier key blocks more queries; the longest first.
  if (p.causal && job.role != kDkDvRole) own_block = job.segments - 1 - own_block;
  own_block += job.first_segment;
  work.role = job.role;
  work.accumulate = job.accumulate;
  work.seqlen = p.seqlen;
  work.head = job.head_first + modulo(local, job.by_heads) * job.head_step;
  work.batch = quotient(local, job.by_heads);
  work.stride = 1;
  const std::int64_t bs = p.block_size, mask_head = p.block_mask_heads == 1 ? 0 : work.head;
  const std::int64_t own_first = own_block * bs;
  Side queries{p.query_position, p.seqlen, p.query_position}, keys{p.key_begin, p.key_end - p.key_begin, p.key_begin};
  if (job.role == kDkDvRole) {
    keys = {own_first, imin(bs, p.key_end - own_first), p.key_begin};
    work.mask_entry = mask_head * (p.key_blocks + 1) + own_block;
  } else {
    queries = {own_first, imin(bs, p.query_position + p.seqlen - own_first), p.query_position};
    work.mask_entry = mask_head * (p.query_blocks + 1) + own_block;
  }
  work.query = queries;
  work.key = keys;
  work.causal_shift = queries.first - keys.first;
  work.tile_begin = tile * kBlock;
  work.tile_rows = int(imin(kBlock, work.own().length - work.tile_begin));
  if (work.tile_rows <= 0) return false;
  work.region_begin = work.own().first + work.tile_begin;  // every row is selected: nothing to zero
  work.region_end = work.region_begin + work.tile_rows;
  return true;
}

// The decode of an instance's walk for the plan's block `block` (blockIdx.x, or a ticket). Only the
// indexed walk keeps the index map, so that the others' row arithmetic has no lookup in it.
template <int kBlock, Walk kWalk>
__device__ __forceinline__ bool decode(const detail::DilatedParams& p, const LaunchPlan& plan, BlockWork& work,
                                       int block = int(blockIdx.x)) {
  if constexpr (kWalk == Walk::sparse) {
    return decode_sparse_block<kBlock>(p, plan, block, work);
  } else {
    const bool run = decode_block<kBlock>(p, plan, block, work);
    if constexpr (kWalk == Walk::dilated) work.index = nullptr;
    return run;
  }
}

__device__ __forceinline__ const std::int64_t* lower_bound(const std::int64_t* first, const std::int64_t* last,
                                                           std::int64_t value) {
  while (first < last) {
    const std::int64_t* mid = first + (last - first) / 2;
    if (*mid < value) first = mid + 1;
    else last = mid;
  }
  return first;
}

// The rows of the other side a block visits, as tiles of kRows (indices into that side). Dilated
// attention: [begin, end). Block-sparse attention: the allowed blocks of the own block, each cut
// into tiles; a tile of a block's short end (or past the sequence) has fewer or no valid rows.
template <int kRows, bool kSparse>
struct OtherTiles;

template <int kRows>
struct OtherTiles<kRows, false> {
  int count = 0;
  std::int64_t begin = 0, end = 0;
  __device__ std::int64_t start(int it) const { return begin + std::int64_t(it) * kRows; }
  __device__ int valid(int it) const { return int(imin(kRows, end - start(it))); }
};

template <int kRows>
struct OtherTiles<kRows, true> {
  int count = 0, tiles_per_block = 1;
  std::int64_t end = 0;                  // the side's length
  const std::int64_t* blocks = nullptr;  // allowed block indices, ascending
  std::int64_t block_size = 0, side_first = 0;
  __device__ std::int64_t start(int it) const {
    return blocks[it / tiles_per_block] * block_size - side_first + std::int64_t(it % tiles_per_block) * kRows;
  }
  __device__ int valid(int it) const {
    const std::int64_t j0 = start(it);
    const std::int64_t stop = imin(end, (blocks[it / tiles_per_block] + 1) * block_size - side_first);
    return int(imax(0, imin(kRows, stop - j0)));
  }
};

// The other side's tiles of a block's work. Causal attention skips what lies wholly past the
// diagonal (keys after the own queries, queries before the own keys).
template <int kRows, Walk kWalk>
__device__ __forceinline__ OtherTiles<kRows, kWalk == Walk::sparse> other_tiles(const detail::DilatedParams& p,
                                                                              const BlockWork& w) {
  OtherTiles<kRows, kWalk == Walk::sparse> tiles;
  const bool keys_own = w.role == kDkDvRole;
  const Side& other = keys_own ? w.query : w.key;
  if constexpr (kWalk != Walk::sparse) {
    const std::int64_t shift = w.causal_shift;
    const bool skip = p.causal && kWalk == Walk::dilated;  // an index map breaks the order of positions
    tiles.end = other.length;
    if (skip && keys_own) tiles.begin = imax(0, w.tile_begin - shift) / kRows * kRows;
    if (skip && !keys_own) tiles.end = imin(other.length, w.tile_begin + w.tile_rows + shift);
    tiles.count = tiles.end > tiles.begin ? int((tiles.end - tiles.begin + kRows - 1) / kRows) : 0;
  } else {
    const std::int64_t bs = p.block_size;
    const std::int64_t* offsets = keys_own ? p.block_column_offsets : p.block_row_offsets;
    const std::int64_t* entries = keys_own ? p.block_rows : p.block_columns;
    const std::int64_t* first = entries + offsets[w.mask_entry];
    const std::int64_t* last = entries + offsets[w.mask_entry + 1];
    std::int64_t lo = quotient(other.first, bs), hi = quotient(other.first + other.length + bs - 1, bs);  // the step's blocks
    const Side& own = w.own();
    if (p.causal && keys_own) lo = imax(lo, quotient(own.first + w.tile_begin, bs));
    if (p.causal && !keys_own) hi = imin(hi, quotient(own.first + w.tile_begin + w.tile_rows - 1, bs) + 1);
    first = lower_bound(first, last, lo);
    last = lower_bound(first, last, hi);
    tiles.blocks = first;
    tiles.block_size = bs;
    tiles.side_first = other.first;
    tiles.end = other.length;
    tiles.tiles_per_block = int((bs + kRows - 1) / kRows);
    tiles.count = int(last - first) * tiles.tiles_per_block;
  }
  return tiles;
}

// The head of operand x that query head `head` reads or writes (grouped-query heads: k, v, dk, dv
// have one head per head_group query heads). 32-bit division: head counts fit in int (a launch's blocks do), and
// a 64-bit one is a call whose registers made the sm90 backward spill twice as much.
__device__ __forceinline__ std::int64_t operand_head(const detail::Operand& x, std::int64_t head) {
  return x.head_group == 1 ? head : std::int64_t(std::uint32_t(head) / std::uint32_t(x.head_group));
}

template <class T>
__device__ __forceinline__ T* row_pointer(const detail::Operand& x, std::int64_t batch, std::int64_t head,
                                          std::int64_t position) {
  return static_cast<T*>(x.data) + batch * x.batch_stride + position * x.row_stride +
         operand_head(x, head) * x.head_stride;
}

__device__ __forceinline__ float* lse_pointer(const detail::DilatedParams& p, std::int64_t batch, std::int64_t head,
                                              std::int64_t position) {
  return p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride + position * p.lse_row_stride;
}

// The given softmax correction (a ring step's, or the backward's delta pass): [B, H, N] contiguous
// over the local query rows; a packed batch's is [H, T] over tensor rows (its blocks' batch index
// is a sequence's).
__device__ __forceinline__ const float* delta_pointer(const detail::DilatedParams& p, std::int64_t batch,
                                                      std::int64_t head, std::int64_t row) {
  if (p.cu_seqlens != nullptr) return p.softmax_delta + head * p.packed_rows + row;
  return p.softmax_delta + (batch * p.heads + head) * p.seqlen + row;
}

// The additive bias of a tile's `rows` key columns starting at side index j0 (0, or -inf for the
// columns past `valid` and the padded keys), written by the first `rows` threads; and, given
// `positions`, the columns' original positions (causal attention under an index map compares them).
__device__ __forceinline__ void key_bias(const detail::DilatedParams& p, const BlockWork& w, std::int64_t j0, int valid,
                                         int rows, float* bias, int* positions = nullptr) {
  const int c = threadIdx.x;
  if (c >= rows) return;
  bool keep = c < valid;
  if (keep && p.key_padding_mask != nullptr)
    keep = p.key_padding_mask[w.batch * p.mask_batch_stride + std::int64_t(w.row32(w.key, int(j0) + c)) * p.mask_row_stride] == 0;
  bias[c] = keep ? 0.0f : neg_inf();
  if (positions) positions[c] = keep ? w.position32(w.key, int(j0) + c) : 0;
}

// Dropout keep bits of one warp's 16-row score tile in accumulator layout: bit 4n+e belongs to
// element [n][e], whose row is row1 for e >= 2 (else row0) and whose column is
// col0 + 8n + 2t + (e & 1) (indices into the sides). Rows are queries, or keys when rows_are_keys.
// The decision takes original global positions, so ring steps draw the single call's masks. A
// rolled loop, so that Philox appears once in the code.
template <int kTiles>
__device__ __forceinline__ std::uint32_t dropout_bits(const detail::DilatedParams& p, const BlockWork& w,
                                                      std::int64_t row0, std::int64_t row1, std::int64_t col0,
                                                      bool rows_are_keys) {
  static_assert(kTiles * 4 <= 32);
  const std::int64_t batch_head = (p.dropout_batch_base + w.batch) * p.heads + w.head;
  const int t = threadIdx.x % 4;
  std::uint32_t bits = 0;
#pragma unroll 1
  for (int idx = 0; idx < kTiles * 4; ++idx) {
    const int n = idx >> 2, e = idx & 3;
    const std::int64_t row = (e >> 1) ? row1 : row0, col = col0 + n * 8 + 2 * t + (e & 1);
    const std::int64_t query = w.position(w.query, rows_are_keys ? col : row);
    const std::int64_t key = w.position(w.key, rows_are_keys ? row : col);
    // The specified keep decision (dattn::dropout_keep, docs/semantics.md), with the word picked without indexing an array.
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

// ---- tile loads: rows [j0, j0 + kRows) of one side of a group into shared memory ----
// Two layouts of a 16-bit tile: rows padded to D + 8 elements (the mma.sync kernels' ldmatrix
// reads), or the 128-byte swizzle that Hopper's wgmma reads: D/64 column blocks one after another,
// each kRows rows of 128 bytes, the 16-byte chunk c of row r at chunk c ^ (r mod 8) of its row (the
// eight rows of a core matrix then cover every bank; wgmma undoes the swizzle in hardware from
// address bits 4–9, so the tile starts on a 1024-byte boundary).
enum class TileLayout { padded, swizzled };

template <TileLayout kLayout, int kRows, int D>
__device__ __forceinline__ std::uint32_t tile_offset(int row, int chunk) {  // bytes; chunk of 16 bytes
  if constexpr (kLayout == TileLayout::padded) return std::uint32_t((row * (D + 8) + chunk * 8) * 2);
  else return std::uint32_t((chunk / 8) * kRows * 128 + row * 128 + (((chunk % 8) ^ (row % 8)) << 4));
}

// 16-bit storage: cp.async, rows past `valid` zero-filled (never garbage: 0·NaN would poison P·V).
// fp32 storage: loaded through registers and split into S bf16 planes.
template <class T, int S, int kRows, int D, int kThreads, TileLayout kLayout = TileLayout::padded>
__device__ __forceinline__ void load_rows(std::uint16_t* smem, int plane_elems, const detail::Operand& x,
                                          const BlockWork& w, const Side& side, std::int64_t j0, int valid) {
  constexpr int kStride = D + 8;
  const T* base = static_cast<const T*>(x.data) + w.batch * x.batch_stride + operand_head(x, w.head) * x.head_stride;
  const int first = int(j0);
  if constexpr (sizeof(T) == 2) {
    constexpr int kChunks = D / 8;  // 16-byte chunks per row
    const std::uint32_t smem_base = smem_address(smem);
#pragma unroll
    for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
      const int row = c / kChunks, col = (c % kChunks) * 8;
      const bool ok = row < valid;
      const T* src = ok ? base + std::int64_t(w.row32(side, first + row)) * x.row_stride + col : base;
      cp_async_16(smem_base + tile_offset<kLayout, kRows, D>(row, col / 8), src, ok);
    }
  } else {
    static_assert(kLayout == TileLayout::padded, "fp32 tiles are split into padded bf16 planes");
    constexpr int kChunks = D / 4;
#pragma unroll 4
    for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
      const int row = c / kChunks, col = (c % kChunks) * 4;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row < valid)
        v = *reinterpret_cast<const float4*>(base + std::int64_t(w.row32(side, first + row)) * x.row_stride + col);
      std::uint32_t lo[S], hi[S];
      split2<S>(v.x, v.y, lo);
      split2<S>(v.z, v.w, hi);
#pragma unroll
      for (int q = 0; q < S; ++q)
        *reinterpret_cast<uint2*>(smem + q * plane_elems + row * kStride + col) = make_uint2(lo[q], hi[q]);
    }
  }
}

// load_rows of two operands at the same rows (K and V, Q and dO): the row arithmetic, and an index
// map's lookups, once for both.
template <class T, int S, int kRows, int D, int kThreads, TileLayout kLayout = TileLayout::padded>
__device__ __forceinline__ void load_row_pair(std::uint16_t* smem_a, std::uint16_t* smem_b, int plane_elems,
                                              const detail::Operand& a, const detail::Operand& b, const BlockWork& w,
                                              const Side& side, std::int64_t j0, int valid) {
  if constexpr (sizeof(T) != 2) {  // fp32: the split into planes is the work, not the addresses
    load_rows<T, S, kRows, D, kThreads>(smem_a, plane_elems, a, w, side, j0, valid);
    load_rows<T, S, kRows, D, kThreads>(smem_b, plane_elems, b, w, side, j0, valid);
  } else {
    constexpr int kChunks = D / 8;
    const T* base_a = static_cast<const T*>(a.data) + w.batch * a.batch_stride + operand_head(a, w.head) * a.head_stride;
    const T* base_b = static_cast<const T*>(b.data) + w.batch * b.batch_stride + operand_head(b, w.head) * b.head_stride;
    const std::uint32_t to_a = smem_address(smem_a), to_b = smem_address(smem_b);
    const int first = int(j0);
    if constexpr (kThreads % kChunks == 0 && kRows % (kThreads / kChunks) == 0) {
      if (w.index == nullptr) {
        // Rows in arithmetic progression (no index map): a thread keeps its 16-byte column and
        // steps its two source pointers by kRowStep rows, one add each per copy instead of the row
        // arithmetic (the producer's instructions are issue slots the consumers lack).
        constexpr int kRowStep = kThreads / kChunks;
        const int row0 = threadIdx.x / kChunks, col = threadIdx.x % kChunks * 8;
        const std::int64_t r0 = w.row32(side, first + row0), step = std::int64_t(kRowStep) * w.stride;
        const T* src_a = base_a + r0 * a.row_stride + col;
        const T* src_b = base_b + r0 * b.row_stride + col;
        const std::int64_t step_a = step * a.row_stride, step_b = step * b.row_stride;
#pragma unroll
        for (int i = 0; i < kRows / kRowStep; ++i) {
          const int row = row0 + i * kRowStep;
          const bool ok = row < valid;
          const std::uint32_t at = tile_offset<kLayout, kRows, D>(row, col / 8);
          cp_async_16(to_a + at, ok ? src_a : base_a, ok);
          cp_async_16(to_b + at, ok ? src_b : base_b, ok);
          src_a += step_a;
          src_b += step_b;
        }
        return;
      }
    }
#pragma unroll
    for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
      const int row = c / kChunks, col = (c % kChunks) * 8;
      const bool ok = row < valid;
      const std::int64_t r = ok ? w.row32(side, first + row) : 0;
      const std::uint32_t at = tile_offset<kLayout, kRows, D>(row, col / 8);
      cp_async_16(to_a + at, base_a + r * a.row_stride + col, ok);
      cp_async_16(to_b + at, base_b + r * b.row_stride + col, ok);
    }
  }
}

// Under an index map, the tensor row of row threadIdx.x of tile `it` (0 past the tiles or the tile's
// valid rows): gather_row_pair's `my_row`, looked up a tile ahead by the producers.
template <class Tiles>
__device__ __forceinline__ int gathered_row(const BlockWork& w, const Side& side, const Tiles& tiles, int num_tiles,
                                            int it) {
  const int t = int(threadIdx.x);
  return it < num_tiles && t < tiles.valid(it) ? w.row32(side, int(tiles.start(it)) + t) : 0;
}

// An index map's rows of two operands (K and V, Q and dO; kPair false: of a alone) by cp.async into
// swizzled tiles of kRows rows: thread t looked tile row row0 + t up beforehand (`my_row`, its tensor
// row, 0 past `valid`; a lookup a tile ahead hides its latency), warp w copies tile rows row0 +
// [32w, 32w + 32) (those below kRows), and each pass a row's 16-byte
// chunks go to neighbouring lanes, which take the row from its lane by a shuffle (one lookup per row
// instead of one per chunk). Rows past `valid` zero-filled (their copies read row 0, a valid address,
// and write zeros). The producer warpgroup's 128 threads.
// The copy's cost is the producer's instructions (ncu at long64k: its consumers wait for it), so a
// copy's address is one multiply-add where the row strides fit 32 bits of bytes (every tensor below
// 4 GiB a row), and its shared-memory offset an immediate past a few registers: the swizzle takes
// row % 8, which repeats every 8 rows (1024 bytes).
template <class T, int kRows, int D, bool kPair = true>
__device__ __forceinline__ void gather_row_pair(std::uint16_t* smem_a, std::uint16_t* smem_b, const detail::Operand& a,
                                                const detail::Operand& b, const BlockWork& w, int valid, int my_row,
                                                int row0 = 0) {
  static_assert(sizeof(T) == 2 && kRows % 32 == 0, "16-bit rows, whole warps' rows");
  constexpr int kChunks = D / 8, kRowsPerPass = 32 / kChunks, kPasses = 32 / kRowsPerPass;
  constexpr int kPeriod = 8 / kRowsPerPass;  // passes per 8 rows
  static_assert(kRowsPerPass * kPeriod == 8, "a pass's rows divide 8");
  const int warp_row0 = row0 + int(threadIdx.x) / 32 * 32, lane = int(threadIdx.x) % 32, chunk = lane % kChunks;
  if (warp_row0 >= kRows) return;
  // This thread's chunk of row 0 of each operand's (batch, head), in bytes.
  const char* base_a = reinterpret_cast<const char*>(static_cast<const T*>(a.data) + w.batch * a.batch_stride +
                                                     operand_head(a, w.head) * a.head_stride + chunk * 8);
  const char* base_b = reinterpret_cast<const char*>(static_cast<const T*>(b.data) + w.batch * b.batch_stride +
                                                     operand_head(b, w.head) * b.head_stride + chunk * 8);
  std::uint32_t to[kPeriod];
#pragma unroll
  for (int i = 0; i < kPeriod; ++i)
    to[i] = tile_offset<TileLayout::swizzled, kRows, D>(warp_row0 + i * kRowsPerPass + lane / kChunks, chunk);
  const std::uint32_t to_a = smem_address(smem_a), to_b = smem_address(smem_b);
  const std::int64_t stride_a = a.row_stride * std::int64_t(sizeof(T)), stride_b = b.row_stride * std::int64_t(sizeof(T));
  // Widened exactly: uint32 x uint32 -> uint64 (one IMAD.WIDE.U32 with the base), or int64.
  auto copy = [&](auto stride_a_here, auto stride_b_here) {
    using Wide = std::conditional_t<std::is_same_v<decltype(stride_a_here), std::uint32_t>, std::uint64_t, std::int64_t>;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int local = i * kRowsPerPass + lane / kChunks;
      const std::uint32_t from = std::uint32_t(__shfl_sync(0xffffffffu, my_row, local));
      const std::uint32_t at = to[i % kPeriod] + (i / kPeriod) * 1024;
      const bool ok = warp_row0 + local < valid;
      cp_async_16(to_a + at, base_a + Wide(from) * stride_a_here, ok);
      if constexpr (kPair) cp_async_16(to_b + at, base_b + Wide(from) * stride_b_here, ok);
    }
  };
  constexpr std::int64_t kFits = 0xffffffffLL;
  if (stride_a >= 0 && stride_a <= kFits && stride_b >= 0 && stride_b <= kFits)  // uniform
    copy(std::uint32_t(stride_a), std::uint32_t(stride_b));
  else
    copy(stride_a, stride_b);
}

// An index map's kRows rows of one operand from own row j0 on (a query tile) by gather_row_pair:
// thread t looks up tile rows t, t + 128, ... first, every lookup issued before the first copy
// (load_rows looks a row up before each copy and waits one load latency per copy, at the block's
// start). The producer warpgroup's 128 threads.
template <class T, int kRows, int D>
__device__ __forceinline__ void gather_rows(std::uint16_t* smem, const detail::Operand& x, const BlockWork& w,
                                           const Side& side, std::int64_t j0, int valid) {
  constexpr int kBlocks = (kRows + 127) / 128;
  const int t = int(threadIdx.x);
  int my_row[kBlocks];
#pragma unroll
  for (int b = 0; b < kBlocks; ++b)
    my_row[b] = b * 128 + t < imin(kRows, valid) ? w.row32(side, int(j0) + b * 128 + t) : 0;
#pragma unroll
  for (int b = 0; b < kBlocks; ++b) gather_row_pair<T, kRows, D, false>(smem, smem, x, x, w, valid, my_row[b], b * 128);
}

}  // namespace dattn::cuda
