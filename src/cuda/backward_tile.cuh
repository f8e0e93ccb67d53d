// The backward's per-tile arithmetic, shared by the kernel generations (sm80's mma.sync kernel and
// sm90's wgmma kernel): both hold a warp's 16 own rows (two per thread: row g and row g + 8 of the
// warp, lane = 4g + t) against a tile of BO rows of the other side in the accumulator layout,
// element [n][e] being column 8n + 2t + (e & 1) of own row e >> 1.
#pragma once

#include <cstdint>

#include "cuda/launch.hpp"
#include "cuda/mma.cuh"
#include "cuda/work.cuh"

namespace dattn::cuda {

// A probability this close to 1 leaves the rest of its row below fp32 resolution, so its dS =
// P·(dP − delta) is 0 up to rounding (exactly 0 when the row attends one key): it is set to 0, so
// that a row attending a single key gets the exactly-zero gradient the reference gives it.
inline constexpr float kSingleKey = 0.99999f;

// What both roles' tiles start from: the thread's dropout bits (own rows own[0], own[1] against the
// columns from side index c0), and whether causality compares original positions (under an index
// map) or side indices (side order is position order).
struct TileMasks {
  bool dropout, causal_by_position, causal_by_order;
  std::uint32_t keep;
};

template <int BO, Walk kWalk>
__device__ __forceinline__ TileMasks tile_masks(const detail::DilatedParams& p, const BlockWork& w,
                                                const std::int64_t (&own)[2], std::int64_t c0, bool keys_own) {
  TileMasks m;
  m.dropout = p.dropout_p > 0.0f;
  m.causal_by_position = kWalk == Walk::indexed && p.causal;
  m.causal_by_order = p.causal && !m.causal_by_position;
  m.keep = m.dropout ? dropout_bits<BO / 8>(p, w, own[0], own[1], c0, keys_own) : 0u;
  return m;
}

// A dk/dv block's tile: own rows are the warp's keys kj, columns the BO queries from side index j0
// (valid_q of them real). In: st = K·Qᵀ and dpt = V·dOᵀ, raw. Out: st = P∘Z (for dV += st·dO) and
// dpt = dS = P∘(Z∘dP − delta) (for dK += dpt·Q). lse, delta and (causal under an index map) the
// queries' positions are per column; own_bias is 0 for a valid, unpadded key.
template <int BO, Walk kWalk>
__device__ __forceinline__ void key_tile_gradients(const detail::DilatedParams& p, const BlockWork& w,
                                                   float (&st)[BO / 8][4], float (&dpt)[BO / 8][4],
                                                   const std::int64_t (&kj)[2], const float (&own_bias)[2],
                                                   const int (&key_position)[2], std::int64_t j0, int valid_q,
                                                   const float* lse, const float* delta, const int* query_position) {
  const int t = threadIdx.x % 4;
  const float scale_log2 = p.scale * kLog2e;
  const auto [dropout, causal_by_position, causal_by_order, keep] = tile_masks<BO, kWalk>(p, w, kj, j0, true);
  // Causal: query column col sees key row r iff col >= first[r]; else every column is in range.
  const int first[2] = {causal_by_order ? int(imax(-1, kj[0] - w.causal_shift - j0)) : 0,
                        causal_by_order ? int(imax(-1, kj[1] - w.causal_shift - j0)) : 0};
  // Every column a valid query that attends something (no padding: each attends itself), no
  // causality or dropout, both own keys valid: no masks to apply, the same values with fewer
  // instructions.
  if (!dropout && !p.causal && p.key_padding_mask == nullptr && valid_q == BO && own_bias[0] == 0.0f &&
      own_bias[1] == 0.0f) {
#pragma unroll
    for (int n = 0; n < BO / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n * 8 + 2 * t + (e & 1);
        const float prob = fast_exp2(st[n][e] * scale_log2 - lse[col] * kLog2e);
        dpt[n][e] = prob >= kSingleKey ? 0.0f : prob * (dpt[n][e] * p.output_scale - delta[col]);
        st[n][e] = prob;
      }
    return;
  }
#pragma unroll
  for (int n = 0; n < BO / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1, col = n * 8 + 2 * t + (e & 1);
      const float row_lse = lse[col];
      const bool valid = col < valid_q && own_bias[r] == 0.0f && row_lse != neg_inf() && col >= first[r] &&
                         !(causal_by_position && query_position[col] < key_position[r]);
      const float prob = valid ? fast_exp2(st[n][e] * scale_log2 - row_lse * kLog2e) : 0.0f;
      const float z = !dropout ? 1.0f : (keep >> (4 * n + e)) & 1u ? p.dropout_rescale : 0.0f;
      dpt[n][e] = prob >= kSingleKey ? 0.0f : prob * (dpt[n][e] * p.output_scale * z - delta[col]);
      st[n][e] = prob * z;
    }
}

// A dq block's tile: own rows are the warp's queries qi (lse2: their lse in log2 units, +inf for a
// row that attends nothing; delta theirs), columns the BO keys from side index k0 (valid_k of them
// real; bias 0 for a valid, unpadded key; key_position for causal attention under an index map).
// In: s = Q·Kᵀ and dp = dO·Vᵀ, raw. Out: s = dS (for dQ += s·K).
template <int BO, Walk kWalk>
__device__ __forceinline__ void query_tile_gradients(const detail::DilatedParams& p, const BlockWork& w,
                                                     float (&s)[BO / 8][4], const float (&dp)[BO / 8][4],
                                                     const std::int64_t (&qi)[2], const float (&lse2)[2],
                                                     const float (&delta)[2], const int (&query_position)[2],
                                                     std::int64_t k0, int valid_k, const float* bias,
                                                     const int* key_position) {
  const int t = threadIdx.x % 4;
  const float scale_log2 = p.scale * kLog2e;
  const auto [dropout, causal_by_position, causal_by_order, keep] = tile_masks<BO, kWalk>(p, w, qi, k0, false);
  // Causal: key column col is visible to query row r iff col <= last[r]; else every column is.
  const int last[2] = {causal_by_order ? int(imin(BO, qi[0] + w.causal_shift - k0)) : BO,
                       causal_by_order ? int(imin(BO, qi[1] + w.causal_shift - k0)) : BO};
  // Every key of the tile valid and unpadded, no causality or dropout: no masks to apply (a row
  // that attends nothing has lse2 = +inf, so its probabilities are 0 either way).
  if (!dropout && !p.causal && p.key_padding_mask == nullptr && valid_k == BO) {
#pragma unroll
    for (int n = 0; n < BO / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float prob = fast_exp2(s[n][e] * scale_log2 - lse2[r]);
        s[n][e] = prob >= kSingleKey ? 0.0f : prob * (dp[n][e] * p.output_scale - delta[r]);
      }
    return;
  }
#pragma unroll
  for (int n = 0; n < BO / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1, col = n * 8 + 2 * t + (e & 1);
      const bool valid = bias[col] == 0.0f && col <= last[r] &&
                         !(causal_by_position && key_position[col] > query_position[r]);
      const float prob = valid ? fast_exp2(s[n][e] * scale_log2 - lse2[r]) : 0.0f;
      const float z = !dropout ? 1.0f : (keep >> (4 * n + e)) & 1u ? p.dropout_rescale : 0.0f;
      s[n][e] = prob >= kSingleKey ? 0.0f : prob * (dp[n][e] * p.output_scale * z - delta[r]);
    }
}

// The rows' lse in log2 units (+inf for a row that attends nothing, so that every probability is
// 0) and, given, their softmax delta; own[r] is false for rows past the block's tile.
__device__ __forceinline__ void query_rows_lse(const detail::DilatedParams& p, const BlockWork& w,
                                               const std::int64_t (&qi)[2], float (&lse2)[2], float (&delta)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool own = qi[r] < w.tile_begin + w.tile_rows;
    const std::int64_t row = own ? w.row(w.query, qi[r]) : 0;
    const float x = own ? *lse_pointer(p, w.batch, w.head, row) : neg_inf();
    lse2[r] = x == neg_inf() ? pos_inf() : x * kLog2e;
    delta[r] = p.softmax_delta != nullptr && own ? *delta_pointer(p, w.batch, w.head, row) : 0.0f;
  }
}

// The part of delta = rowsum(dO∘O) of the row at index j of `side` that part `part` of kParts adds
// (D / kParts elements from global memory, 16 bytes at a time; the caller sums the parts). For
// backward calls without a given delta (no workspace): the sm90 kernels compute it in the block.
template <class T, int D, int kParts>
__device__ __forceinline__ float row_delta_part(const detail::DilatedParams& p, const BlockWork& w, const Side& side,
                                                std::int64_t j, int part) {
  constexpr int kElems = D / kParts;
  static_assert(kElems % 8 == 0, "16-byte loads");
  const std::int64_t row = w.row(side, j);
  const T* dout = row_pointer<T>(p.dout, w.batch, w.head, row) + part * kElems;
  const T* out = row_pointer<T>(p.out, w.batch, w.head, row) + part * kElems;
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < kElems; c += 8) {
    const uint4 gv = *reinterpret_cast<const uint4*>(dout + c), ov = *reinterpret_cast<const uint4*>(out + c);
    const T* g = reinterpret_cast<const T*>(&gv);
    const T* o = reinterpret_cast<const T*>(&ov);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += to_float(g[i]) * to_float(o[i]);
  }
  return sum;
}

// Writes (or, accumulating, adds into) the warp's own rows of one or two gradients: row r of the
// thread is own index rows[r] of side `side`; values are scaled by scale_a and scale_b.
template <class T, int D>
__device__ __forceinline__ void write_gradient_rows(const detail::DilatedParams& p, const BlockWork& w,
                                                    const Side& side, const std::int64_t (&rows)[2], bool accumulate,
                                                    const detail::Operand& a, const float (&acc_a)[D / 8][4],
                                                    float scale_a, const detail::Operand* b,
                                                    const float (*acc_b)[D / 8][4], float scale_b) {
  const int t = threadIdx.x % 4;
  const float old_weight = accumulate ? 1.0f : 0.0f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= w.tile_begin + w.tile_rows) continue;
    const std::int64_t row = w.row(side, rows[r]);
    auto store = [&](auto* a_row, auto* b_row) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        store2(a_row + n * 8 + 2 * t, acc_a[n][2 * r] * scale_a, acc_a[n][2 * r + 1] * scale_a, old_weight);
        if (b_row)
          store2(b_row + n * 8 + 2 * t, (*acc_b)[n][2 * r] * scale_b, (*acc_b)[n][2 * r + 1] * scale_b, old_weight);
      }
    };
    if (p.float32_outputs)
      store(row_pointer<float>(a, w.batch, w.head, row), b ? row_pointer<float>(*b, w.batch, w.head, row) : nullptr);
    else
      store(row_pointer<T>(a, w.batch, w.head, row), b ? row_pointer<T>(*b, w.batch, w.head, row) : nullptr);
  }
}

}  // namespace dattn::cuda
