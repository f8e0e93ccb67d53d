// The forward's per-tile arithmetic, shared by the kernel generations (sm80's mma.sync kernel and
// sm90's wgmma kernel): both hold a warp's 16 query rows (two per thread: qi[0] = row g and
// qi[1] = row g + 8 of the warp, lane = 4g + t) in the accumulator layout, element [n][e] being
// column 8n + 2t + (e & 1) of row qi[e >> 1].
#pragma once

#include <cstdint>

#include "cuda/launch.hpp"
#include "cuda/mma.cuh"
#include "cuda/work.cuh"

namespace dattn::cuda {

// Rows of [region_begin, region_end) that the block's branch does not select (the block's own
// side): out (or the gradients) 0, lse -inf. Not in ring steps, which only add. A row's 16-byte
// chunks go to neighbouring threads, so the selection test is made once per row and thread, and
// without a division: a thread's rows step by kRowsPerPass, so its row's index j among the selected
// and (row - first) mod stride follow from the previous row's (ncu at long64k: the divisions and
// 64-bit row addresses made zeroing a third of the forward producer's time, past its last tile).
// Under an index map a row is a lookup in global memory: done one row at a time, each lookup waits a
// whole load latency, and a rate-8 block zeroes 7/8 of its region. So kLookahead passes' rows are
// looked up first, every lookup issued before any is used (read-only loads, at a valid position
// for every row), then stored (ncu at long64k, identity map: with each lookup used as it came, the
// producer's zeroing held 7 % of the forward's samples, past its last tile).
template <class T, int D, int kThreads>
__device__ __forceinline__ void zero_unselected(const detail::DilatedParams& p, const BlockWork& w,
                                                const detail::Operand* a, const detail::Operand* b, bool lse) {
  constexpr int kChunks = D * int(sizeof(T)) / 16;
  constexpr int kRowsPerPass = kThreads / kChunks;  // threads past kRowsPerPass * kChunks idle
  constexpr int kLookahead = 8;
  static_assert(kRowsPerPass > 0, "a row's chunks within one block");
  const Side& own = w.own();
  // 32-bit arithmetic (CUDA calls hold N <= 2^30 rows).
  const int rows = int(w.region_end - w.region_begin);
  if (w.stride == 1 && w.region_begin == own.first + w.tile_begin && rows == w.tile_rows) return;
  const int stride = int(w.stride), length = int(own.length), first = int(own.first - w.region_begin);
  const int region_begin = int(w.region_begin), row_offset = int(own.row_offset);
  const int chunk = int(threadIdx.x) % kChunks, pass_row = int(threadIdx.x) / kChunks;
  if (pass_row >= kRowsPerPass) return;
  // Row r is selected iff r - first = j·stride with 0 <= j < length; j = floor((r - first) / stride)
  // and m = (r - first) - j·stride in [0, stride), for this thread's first row, then stepped.
  const int step_j = kRowsPerPass / stride, step_m = kRowsPerPass - step_j * stride;
  const int rel = pass_row - first;
  int j = rel >= 0 ? rel / stride : -((stride - 1 - rel) / stride);
  int m = rel - j * stride;
  T* const base_a = row_pointer<T>(*a, w.batch, w.head, 0);
  T* const base_b = b ? row_pointer<T>(*b, w.batch, w.head, 0) : nullptr;
  float* const base_lse = lse ? lse_pointer(p, w.batch, w.head, 0) : nullptr;
  for (int r0 = pass_row; r0 < rows; r0 += kRowsPerPass * kLookahead) {
    bool zero[kLookahead];  // false for selected rows and rows past the region
    int row[kLookahead];    // positions, then tensor rows
#pragma unroll
    for (int i = 0; i < kLookahead; ++i) {
      const int r = r0 + i * kRowsPerPass;
      const bool selected = m == 0 && j >= 0 && j < length;
      zero[i] = r < rows && !selected;
      row[i] = region_begin + (zero[i] ? r : 0);
      j += step_j;
      m += step_m;
      if (m >= stride) {
        m -= stride;
        ++j;
      }
    }
#pragma unroll
    for (int i = 0; i < kLookahead; ++i) row[i] = w.original32(row[i]);
#pragma unroll
    for (int i = 0; i < kLookahead; ++i) row[i] = zero[i] ? row[i] - row_offset : -1;
#pragma unroll
    for (int i = 0; i < kLookahead; ++i) {
      if (row[i] < 0) continue;
      zero_row_chunk(base_a + std::int64_t(row[i]) * a->row_stride, chunk);
      if (b) zero_row_chunk(base_b + std::int64_t(row[i]) * b->row_stride, chunk);
      if (lse && chunk == 0) base_lse[std::int64_t(row[i]) * p.lse_row_stride] = neg_inf();
    }
  }
}

// The max and the sum of a thread's BN/4 scores of row r (of 2) in a tile, in four independent
// chains: one running max or sum is a chain of BN/4 dependent instructions that the warp waits
// out one by one (a full tree would hold more registers than the consumers have to spare).
template <int BN>
__device__ __forceinline__ float row_max_of(const float (&s)[BN / 8][4], int r) {
  static_assert(BN % 32 == 0, "four chains of whole column blocks");
  float m[4] = {neg_inf(), neg_inf(), neg_inf(), neg_inf()};
#pragma unroll
  for (int n = 0; n < BN / 8; ++n) m[n % 4] = fmaxf(m[n % 4], fmaxf(s[n][2 * r], s[n][2 * r + 1]));
  return fmaxf(fmaxf(m[0], m[1]), fmaxf(m[2], m[3]));
}
template <int BN>
__device__ __forceinline__ float row_sum_of(const float (&s)[BN / 8][4], int r) {
  float m[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < BN / 8; ++n) m[n % 4] += s[n][2 * r] + s[n][2 * r + 1];
  return (m[0] + m[1]) + (m[2] + m[3]);
}

// log2 of the largest probability the online softmax lets a row's stale max give (score_tile).
inline constexpr float kRescaleMargin = 8.0f;

// Scales a tile of BN keys (starting at side index k0) into the log2 domain and masks it (the key
// bias: padding and columns past the group; causality). Returns the factor the exponentiation still
// owes the scores: with every key of the tile valid and unpadded (the bias all zeros) and a positive
// scale the raw scores stay as they are and the scale goes into the exp2's FFMA (1 otherwise).
template <int BN, Walk kWalk>
__device__ __forceinline__ float mask_scores(const detail::DilatedParams& p, const BlockWork& w,
                                             float (&s)[BN / 8][4], std::int64_t k0, std::int64_t warp_row0,
                                             const std::int64_t (&qi)[2], const int (&query_position)[2],
                                             const float* bias, const int* key_position, float scale_log2,
                                             bool masked_columns) {
  const int t = threadIdx.x % 4;
  const bool fold = !masked_columns && scale_log2 > 0.0f;
  if (masked_columns) {
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = s[n][e] * scale_log2 + bias[n * 8 + 2 * t + (e & 1)];
  } else if (!fold) {
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= scale_log2;
  }
  const float factor = fold ? scale_log2 : 1.0f;
  if (kWalk == Walk::indexed && p.causal) {  // an index map: causality by original positions
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (key_position[n * 8 + 2 * t + (e & 1)] > query_position[e >> 1]) s[n][e] = neg_inf();
  } else if (p.causal && k0 + BN - 1 > warp_row0 + w.causal_shift) {  // a tile on the diagonal
    const int last[2] = {int(qi[0] + w.causal_shift - k0), int(qi[1] + w.causal_shift - k0)};  // last visible
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (n * 8 + 2 * t + (e & 1) > last[e >> 1]) s[n][e] = neg_inf();
  }
  return factor;
}

// Row r's (of the thread's 2) probabilities exp2(score · factor - base), in place of its scores.
template <int BN>
__device__ __forceinline__ void exponentiate_row(float (&s)[BN / 8][4], int r, float factor, float base) {
#pragma unroll
  for (int n = 0; n < BN / 8; ++n) {
    s[n][2 * r] = fast_exp2(fmaf(s[n][2 * r], factor, -base));
    s[n][2 * r + 1] = fast_exp2(fmaf(s[n][2 * r + 1], factor, -base));
  }
}

// The tile's probabilities dropped out and rescaled (dropout on).
template <int BN>
__device__ __forceinline__ void drop_out(const detail::DilatedParams& p, const BlockWork& w, float (&s)[BN / 8][4],
                                         std::int64_t k0, const std::int64_t (&qi)[2]) {
#pragma unroll
  for (int half = 0; half < (BN + 63) / 64; ++half) {  // dropout_bits covers 64 columns at most
    constexpr int kBlocks = BN < 64 ? BN / 8 : 8;
    const std::uint32_t keep = dropout_bits<kBlocks>(p, w, qi[0], qi[1], k0 + 64 * half, false);
#pragma unroll
    for (int n = 0; n < kBlocks; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[kBlocks * half + n][e] *= (keep >> (4 * n + e)) & 1u ? p.dropout_rescale : 0.0f;
  }
}

// One tile of BN keys starting at side index k0 against the warp's rows (the first of them is
// warp_row0): mask_scores, then update the online softmax (row_max, row_sum, and the factor each
// row's output accumulator is to be multiplied by) and leave the tile's probabilities in s, dropped
// out and rescaled when dropout is on.
template <int BN, Walk kWalk>
__device__ __forceinline__ void score_tile(const detail::DilatedParams& p, const BlockWork& w, float (&s)[BN / 8][4],
                                           float (&correction)[2], float (&row_max)[2], float (&row_sum)[2],
                                           std::int64_t k0, std::int64_t warp_row0, const std::int64_t (&qi)[2],
                                           const int (&query_position)[2], const float* bias,
                                           const int* key_position, float scale_log2,
                                           bool masked_columns = true) {
  const float factor =
      mask_scores<BN, kWalk>(p, w, s, k0, warp_row0, qi, query_position, bias, key_position, scale_log2, masked_columns);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = row_max_of<BN>(s, r);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // The running max moves only when the tile's passes it by more than kRescaleMargin: below that
    // the probabilities stay under 2^kRescaleMargin (float32 sums, 16-bit P hold them with the same
    // relative precision) and the correction is exactly 1, so rescale_rows skips the warp's
    // accumulators. With the exact max the rows of a warp rescaled in most tiles of a long segment
    // (ncu at long64k: one FMUL for every two score elements went to rescaling). Not under dropout:
    // its 1 / (1 - p) on top could take a float16 P past 65504.
    const float tile_max = mx * factor;
    const float margin = p.dropout_p > 0.0f ? 0.0f : kRescaleMargin;
    const float new_max = tile_max > row_max[r] + margin ? tile_max : row_max[r];
    const float base = softmax_base(new_max);
    correction[r] = fast_exp2(row_max[r] - base);
    row_max[r] = new_max;
    exponentiate_row<BN>(s, r, factor, base);
    row_sum[r] = row_sum[r] * correction[r] + row_sum_of<BN>(s, r);
  }
  if (p.dropout_p > 0.0f) drop_out<BN>(p, w, s, k0, qi);
}

// score_tile without the tile's max, for a tile after the first (no dropout): the probabilities are
// taken against the running max as it stands, which score_tile's margin lets them pass by up to
// 2^kRescaleMargin. Whether they stayed under that is known from the row sums the softmax needs anyway
// (a thread's sum of a row's probabilities bounds each of them): true when every row of the warp
// did (row_sum updated, the correction 1); false when one did not, or a row's max is still -inf (every
// score so far masked: its sums come out NaN or inf), or a score is NaN. The warp's scores are then
// lost, and the caller computes them again and takes them through score_tile. ncu at long64k: the
// tile max (FMNMX chains and two shuffles a row) and the rescale test took a tenth of the forward.
template <int BN, Walk kWalk>
__device__ __forceinline__ bool score_tile_at_running_max(const detail::DilatedParams& p, const BlockWork& w,
                                                          float (&s)[BN / 8][4], const float (&row_max)[2],
                                                          float (&row_sum)[2], std::int64_t k0, std::int64_t warp_row0,
                                                          const std::int64_t (&qi)[2], const int (&query_position)[2],
                                                          const float* bias, const int* key_position,
                                                          float scale_log2, bool masked_columns) {
  constexpr float kLimit = float(1 << int(kRescaleMargin));
  const float factor =
      mask_scores<BN, kWalk>(p, w, s, k0, warp_row0, qi, query_position, bias, key_position, scale_log2, masked_columns);
  float sum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    exponentiate_row<BN>(s, r, factor, row_max[r]);
    sum[r] = row_sum_of<BN>(s, r);
  }
  if (!__all_sync(0xffffffffu, sum[0] < kLimit && sum[1] < kLimit)) return false;
  row_sum[0] += sum[0];
  row_sum[1] += sum[1];
  return true;
}

// acc (a warp's rows of the output accumulator) times the rows' softmax corrections; skipped (a
// warp-uniform branch) when no row of the warp moved its max (score_tile moves it rarely).
template <int D>
__device__ __forceinline__ void rescale_rows(float (&acc)[D / 8][4], const float (&correction)[2]) {
  if (!__any_sync(0xffffffffu, correction[0] != 1.0f || correction[1] != 1.0f)) return;
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] *= correction[e >> 1];
}

// The thread's two rows' totals over their four threads: 1 / sum (0 for a row that attends to
// nothing) and the row's lse (natural log, -inf for such a row).
__device__ __forceinline__ void row_totals(const float (&row_max)[2], const float (&row_sum)[2], float (&inv)[2],
                                           float (&lse_row)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const bool attended = sum != 0.0f;  // a NaN sum (a NaN score) makes the row NaN, not empty
    inv[r] = attended ? 1.0f / sum : 0.0f;
    lse_row[r] = attended ? (row_max[r] + __log2f(sum)) * kLn2 : neg_inf();
  }
}

// The epilogue of a block: normalise the warp's rows and write out and lse (or merge them into what
// earlier branches wrote). The zeros and -inf of the unselected rows are zero_unselected's.
template <class T, int D>
__device__ __forceinline__ void write_forward_rows(const detail::DilatedParams& p, const BlockWork& w,
                                                   const float (&acc)[D / 8][4],
                                                   const float (&row_max)[2], const float (&row_sum)[2],
                                                   const std::int64_t (&qi)[2]) {
  const int t = threadIdx.x % 4;
  float lse_row[2], inv[2], old_lse[2] = {neg_inf(), neg_inf()};
  bool valid[2];
  row_totals(row_max, row_sum, inv, lse_row);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    valid[r] = qi[r] < w.tile_begin + w.tile_rows;
    if (w.accumulate && valid[r]) old_lse[r] = *lse_pointer(p, w.batch, w.head, w.row(w.query, qi[r]));
  }
  __syncwarp();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!valid[r]) continue;
    const std::int64_t row = w.row(w.query, qi[r]);
    float old_weight = 0.0f, new_weight = p.output_scale * inv[r], lse_new = lse_row[r];
    if (w.accumulate) {
      if (lse_row[r] == neg_inf()) continue;  // this branch adds nothing to the row
      if (old_lse[r] != neg_inf()) {
        const float mx = fmaxf(old_lse[r], lse_row[r]);
        lse_new = mx + logf(expf(old_lse[r] - mx) + expf(lse_row[r] - mx));
        old_weight = expf(old_lse[r] - lse_new);
        new_weight *= expf(lse_row[r] - lse_new);
      }
    }
    auto store = [&](auto* dst) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        store2(dst + n * 8 + 2 * t, acc[n][2 * r] * new_weight, acc[n][2 * r + 1] * new_weight, old_weight);
    };
    if (p.float32_outputs) store(row_pointer<float>(p.out, w.batch, w.head, row));
    else store(row_pointer<T>(p.out, w.batch, w.head, row));
    if (t == 0) *lse_pointer(p, w.batch, w.head, row) = lse_new;
  }
}


}  // namespace dattn::cuda
