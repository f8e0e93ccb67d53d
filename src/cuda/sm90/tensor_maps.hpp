// TMA tensor maps of the sm90 forward (builds with DATTN_SM90_TMA, the default with the sm90
// kernels). A branch of dilation rate r selects rows o + j·r of a segment, so its rows are a strided
// view of the [B, N, H, D] tensor: one 5-D map per (operand q/k/v, branch) with
//   dims    (D,   H or Hkv,     r,            N / r,            B)
//   strides (1,   head_stride,  row_stride,   r · row_stride,   batch_stride)   (elements; bytes in the map)
// addresses selected row j of a group whose first tensor row is `first` at coordinates
// (column, head, first mod r, first / r + j, batch), without a gather. A packed batch's maps span
// its T rows as a batch of one (dims (D, H, r, T / r, 1)): a sequence's rows are tensor rows
// cu_seqlens[b] + position, batch coordinate 0. A box of (64 columns, 1, 1,
// rows, 1) with 128-byte swizzling lands in shared memory as TileLayout::swizzled (work.cuh) lays
// out one 64-column block: row i at i·128 bytes, its 16-byte chunk c at chunk c ^ (i mod 8) (TMA's
// swizzle XORs address bits 4-6 with bits 7-9, and the tiles start on 1024-byte boundaries); head
// dim 128 is two boxes, the second block kRows·128 bytes on. Rows past N (T) are zero-filled by TMA
// (r divides N, so row first / r + j lies inside the map exactly when its row lies before N);
// K and V rows of the next segment (or packed sequence) that a box reaches are real data, which the
// producer overwrites with zeros (produce_tma); the query box's rows past the block's own are left
// as they come (their rows of S, P and O are never written out).
//
// Host and device include this; the encoding and the predicate (host) are in tensor_maps.cu.
#pragma once

#include <cuda.h>

#include "cuda/launch.hpp"
#include "params.hpp"

namespace dattn::cuda {

// The maps of one launch's branches, by branch index (the branches the launch does not run are
// left zero; CUtensorMap is 128-byte aligned). A __grid_constant__ kernel parameter: 6 KiB beside
// DilatedParams and LaunchPlan, 10.3 KiB in all (kernel parameters may take 32 KiB since CUDA 12.1).
struct ForwardTensorMaps {
  CUtensorMap q[detail::kMaxBranches];
  CUtensorMap k[detail::kMaxBranches];
  CUtensorMap v[detail::kMaxBranches];
};

// The sm90 backward's maps, by branch index: q, k, v and dout (boxes of 64 rows, the other side's
// tile; the own side's 128 rows are two boxes). 8 KiB.
struct BackwardTensorMaps {
  CUtensorMap q[detail::kMaxBranches];
  CUtensorMap k[detail::kMaxBranches];
  CUtensorMap v[detail::kMaxBranches];
  CUtensorMap dout[detail::kMaxBranches];
};

// The cp.async instances' stand-in.
struct NoTensorMaps {};

#ifdef __CUDACC__
// A block's batch coordinate in the maps: its sequence, or 0 in a packed batch (one map of T rows).
__device__ __forceinline__ int map_batch_coordinate(const detail::DilatedParams& p, std::int64_t batch) {
  return p.cu_seqlens != nullptr ? 0 : int(batch);
}
#endif

// Whether the TMA forward instances cover a call: dilated attention's walk, its walk under an index
// map (a Hilbert order: its rows lie anywhere, and these instances' producer gathers them by
// cp.async, with no maps), or block-sparse attention's with blocks of a multiple of 128 rows (a
// rate-1 branch's rows: the key tiles of an allowed block are contiguous rows),
// whole sequences or a packed batch's (no cache, no ring step), 16-bit data of head dim 64 or 128,
// and, but for an index map, every branch's dilation rate dividing N (a packed batch's T;
// block-sparse: rate 1) and q, k, v as a map needs them (16-byte aligned bases, every
// stride of more than one row, head or batch a positive multiple of 16 bytes below 2^40). The
// caller has chosen the sm90 kernels. Defined in builds with DATTN_SM90_TMA only (forward_uses_tma,
// dispatch.cu, is false in the others).
bool sm90_tma_covers(const detail::DilatedParams& p);

// Whether the sm90 backward's producer loads Q, K, V and dO by TMA: the calls sm90_tma_covers
// admits but an index map's (its rows come by cp.async), with dout as a map needs it too.
bool sm90_backward_tma_covers(const detail::DilatedParams& p);

// Encodes the backward's maps of the branches that `plan` runs, boxes of `rows` rows (the other
// side's tile).
void encode_backward_maps(const detail::DilatedParams& p, const LaunchPlan& plan, int rows, BackwardTensorMaps& maps);

// Encodes the maps of the branches that `plan` runs: boxes of query_rows rows for q, key_rows for
// k and v. Throws std::runtime_error where the driver refuses one (sm90_tma_covers admitted the
// call, so that is a bug) or has no cuTensorMapEncodeTiled.
void encode_forward_maps(const detail::DilatedParams& p, const LaunchPlan& plan, int query_rows, int key_rows,
                         ForwardTensorMaps& maps);

#if defined(DATTN_SM90_TMA_ROWS)
// The forward under an index map (DATTN_SM90_TMA_ROWS, experimental): whether q, k and v have maps of
// rate 1 (whole sequences, no packed batch; encode_forward_maps with boxes of one row makes them),
// which the TMA instances' producer issues row by row (produce_tma_rows) in place of its gather.
bool sm90_row_maps_fit(const detail::DilatedParams& p);
#endif

}  // namespace dattn::cuda
