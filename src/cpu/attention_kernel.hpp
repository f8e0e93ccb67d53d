// Fused dilated attention on the CPU, templated over the ISA vocabulary I and storage type T.
// Forward: flash-style online softmax over key tiles. Backward (FlashAttention-2 from the saved
// lse): a dk/dv pass over key regions and a dq pass over query regions, so no two threads write
// the same row and no probabilities are stored. Tiles are read by stride straight from q/k/v.
//
// A group's own rows (queries in forward and dq, keys in dk/dv) are packed once per chunk of
// kChunkRows; each tile of the other side is packed once and used by every tile of the chunk.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/gemm.hpp"
#include "cpu/tile.hpp"
#include "cpu/work.hpp"
#include "dattn/philox.hpp"
#include "params.hpp"

namespace dattn::cpu {

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();
inline constexpr float kPosInf = std::numeric_limits<float>::infinity();

template <class I>
constexpr int padded(std::int64_t n) {
  constexpr int step = 2 * I::width;
  return int((n + step - 1) / step * step);
}

// Row pitch of the transposed own buffers: a power-of-two pitch (1 KiB) would map a column's
// elements to a few L1 sets and thrash; 16 extra floats spread them.
inline constexpr std::int64_t kOwnPitch = kChunkRows + 16;

// Per-thread scratch, allocated once per call and thread. "own" buffers hold a chunk of the
// group's own rows transposed ([Dp × kOwnPitch], zero-padded); "tile" buffers one tile of the
// other side as rows ([n × Dp]). Every product reads these directly, so nothing is transposed
// per tile.
template <class I>
struct Scratch {
  int padded_d;
  std::vector<float> buffer;
  float *own_a, *own_b, *own_lse, *own_delta, *own_bias;
  float *tile_rows_a, *tile_rows_b, *tile_lse, *tile_delta, *tile_bias;
  float *column_max, *column_shift, *column_correction;
  float *scores, *grad_scores, *dropout_row;
  float *acc, *acc2, *row_max, *row_sum, *row_delta;
  float *own_rows, *chunk_dk, *chunk_dv;  // the one-pass backward's key chunk (rows) and its gradients
  std::vector<std::int64_t> query_original, key_original;  // a causal tile pair's original positions

  Scratch(int head_dim, std::int64_t state_rows)
      : padded_d(padded<I>(head_dim)), query_original(kTileRows), key_original(kTileRows) {
    const std::int64_t C = kChunkRows, T = kTileRows, Dp = padded_d;
    buffer.assign(std::size_t(2 * kOwnPitch * Dp + 3 * C + 2 * T * Dp + 6 * T + 2 * T * T + T + state_rows * (2 * Dp + 3) +
                              3 * C * Dp),
                  0.0f);
    float* next = buffer.data();
    auto take = [&](std::int64_t n) { float* p = next; next += n; return p; };
    own_a = take(kOwnPitch * Dp), own_b = take(kOwnPitch * Dp), own_lse = take(C), own_delta = take(C), own_bias = take(C);
    tile_rows_a = take(T * Dp), tile_rows_b = take(T * Dp);
    tile_lse = take(T), tile_delta = take(T), tile_bias = take(T);
    column_max = take(T), column_shift = take(T), column_correction = take(T);
    scores = take(T * T), grad_scores = take(T * T), dropout_row = take(T);
    acc = take(state_rows * Dp), acc2 = take(state_rows * Dp);
    row_max = take(state_rows), row_sum = take(state_rows), row_delta = take(state_rows);
    own_rows = take(C * Dp), chunk_dk = take(C * Dp), chunk_dv = take(C * Dp);
  }
};

// One side of a group (its own rows, or the rows they meet): row j sits at position
// first + j·stride of the attended sequence (curve order under a Hilbert index map) and at
// original(j) of the tensors. Masks, dropout and causality use original positions.
template <class I, class T>
struct SideView {
  const detail::DilatedParams& p;
  const WorkItem& item;
  std::int64_t first, stride;
  std::int64_t row_base;  // the position held by row 0 of this side's tensors (ring steps)

  std::int64_t position(std::int64_t j) const { return first + j * stride; }
  std::int64_t original(std::int64_t j) const {
    return p.position_index ? p.position_index[position(j)] : position(j);
  }
  const T* row(const detail::Operand& x, std::int64_t j) const {
    return static_cast<const T*>(x.data) + item.batch * x.batch_stride + (original(j) - row_base) * x.row_stride +
           item.head / x.head_group * x.head_stride;
  }
  // Index in the per-thread state of row j (own side only), and the state-row step between rows.
  std::int64_t state(std::int64_t j) const { return (position(j) - item.state_base) / item.state_stride; }
  std::int64_t state_step() const { return stride / item.state_stride; }
  bool padded_key(std::int64_t j) const {
    return p.key_padding_mask &&
           p.key_padding_mask[item.batch * p.mask_batch_stride + (original(j) - row_base) * p.mask_row_stride] != 0;
  }
  float lse(std::int64_t j) const {
    return p.lse[item.batch * p.lse_batch_stride + item.head * p.lse_head_stride +
                 (original(j) - row_base) * p.lse_row_stride];
  }
  // Rows [j0, j0 + n) of x, times scale, as a tile of rows [n × Dp].
  void pack_tile(const detail::Operand& x, std::int64_t j0, int n, float scale, float* rows) const {
    const int D = int(p.head_dim);
    pack_rows<I>([&](int i) { return row(x, j0 + i); }, n, D, padded<I>(D), scale, rows, padded<I>(D));
  }
  // The same transposed into an own buffer [Dp × kOwnPitch].
  void pack_own(const detail::Operand& x, std::int64_t j0, int n, float scale, float* cols) const {
    const int D = int(p.head_dim);
    pack_columns<I>([&](int i) { return row(x, j0 + i); }, n, padded<I>(n), D, padded<I>(D), scale, cols, kOwnPitch);
  }
};

// Where the GEMMs round their operands to bf16 (I::dot_bf16), q·scale and dout·output_scale
// would be rounded once more than the bf16 inputs (up to 2^-9 relative, as much as SPEC's lse
// bar): there q and dout are packed unscaled and the scales multiply the float32 products.
struct OperandScales {
  float q, dout;              // applied when packing
  float q_product, dout_product;  // applied to every product with a q or dout operand
};
template <class I>
OperandScales operand_scales(const detail::DilatedParams& p) {
  if constexpr (requires { I::dot_bf16; }) return {1.0f, 1.0f, p.scale, p.output_scale};
  else return {p.scale, p.output_scale, 1.0f, 1.0f};
}

// The ISA whose GEMMs keep float32 operands: I itself unless I rounds them to bf16 (I::Exact).
template <class I>
struct ExactGemm {
  using type = I;
};
template <class I>
  requires requires { typename I::Exact; }
struct ExactGemm<I> {
  using type = typename I::Exact;
};

// 0 for a usable key, -inf for a padded key or a padding column.
template <class I, class T>
void pack_key_bias(const SideView<I, T>& keys_view, std::int64_t j0, int keys, int padded_keys, float* bias) {
  for (int c = 0; c < padded_keys; ++c) bias[c] = c < keys && !keys_view.padded_key(j0 + c) ? 0.0f : kNegInf;
}

// lse of each query (+inf where it attends to nothing and past the tile, so that exp(S − lse) is 0
// there) and its delta = Σ_j P_j·Z_j·dP_j from the dq pass's first sweep (zero for the dq pass's
// own sweeps, which compute it).
template <class I, class T>
void pack_lse_delta(const SideView<I, T>& queries_view, std::int64_t j0, int queries, int padded_queries, float* lse,
                    float* delta, bool with_delta) {
  const detail::DilatedParams& p = queries_view.p;
  const WorkItem& item = queries_view.item;
  for (int i = 0; i < padded_queries; ++i) {
    if (i >= queries) {
      lse[i] = kPosInf;
      delta[i] = 0.0f;
      continue;
    }
    const std::int64_t row = queries_view.original(j0 + i) - queries_view.row_base;
    delta[i] = with_delta ? p.softmax_delta[(item.batch * p.heads + item.head) * p.seqlen + row] : 0.0f;
    const float x = queries_view.lse(j0 + i);
    lse[i] = x == kNegInf ? kPosInf : x;
  }
}

enum class CausalPair { unmasked, skipped, masked };

// Records the original positions of a (query tile, key tile) pair in the scratch (for causal
// masks and dropout) and says how causality affects the pair: no key after any query, every key
// after every query, or a mix.
template <class I, class T>
CausalPair record_pair(const SideView<I, T>& queries_view, std::int64_t q0, int queries,
                       const SideView<I, T>& keys_view, std::int64_t k0, int keys, Scratch<I>& s) {
  const detail::DilatedParams& p = queries_view.p;
  if (!p.causal && p.dropout_p == 0.0f) return CausalPair::unmasked;
  for (int i = 0; i < queries; ++i) s.query_original[i] = queries_view.original(q0 + i);
  for (int i = 0; i < keys; ++i) s.key_original[i] = keys_view.original(k0 + i);
  if (!p.causal) return CausalPair::unmasked;
  const auto [query_min, query_max] = std::minmax_element(s.query_original.begin(), s.query_original.begin() + queries);
  const auto [key_min, key_max] = std::minmax_element(s.key_original.begin(), s.key_original.begin() + keys);
  if (*key_min > *query_max) return CausalPair::skipped;
  return *key_max <= *query_min ? CausalPair::unmasked : CausalPair::masked;
}

// The dropout factor of the recorded pair (query c, key i): 0 if dropped, 1/(1-p) if kept.
template <class I>
float dropout_factor(const detail::DilatedParams& p, const WorkItem& item, const Scratch<I>& s, int c, int i) {
  return dropout_keep(p.dropout_seed, p.dropout_offset, (p.dropout_batch_base + item.batch) * p.heads + item.head,
                      s.query_original[c], s.key_original[i], p.dropout_threshold)
             ? p.dropout_rescale
             : 0.0f;
}

// Index bounds for causal loops without an index map, where index order is position order: the
// other-side index where the diagonal meets own index 0.
inline constexpr std::int64_t kNoDiagonal = std::numeric_limits<std::int64_t>::min();
template <class I, class T>
std::int64_t causal_diagonal(const SideView<I, T>& own, const SideView<I, T>& other) {
  if (!own.p.causal || own.p.position_index) return kNoDiagonal;
  return (own.first - other.first) / own.stride;
}

// One key tile against one query tile, keys as rows: Sᵀ = K·Qᵀ, masks, the online softmax update
// of each query (column), then acc += P·V.
template <class I, class T>
void forward_tile(const SideView<I, T>& queries_view, Scratch<I>& s, const float* q_cols, std::int64_t q0,
                  int queries, int keys, bool causal_masked) {
  using reg = typename I::reg;
  const detail::DilatedParams& p = queries_view.p;
  const int Dp = s.padded_d, Qp = padded<I>(queries);
  gemm<I, false>(keys, Qp, Dp, s.tile_rows_a, Dp, q_cols, kOwnPitch, s.scores, Qp, operand_scales<I>(p).q_product);
  for (int i = 0; i < keys; ++i) {
    float* row = s.scores + i * Qp;
    if (s.tile_bias[i] != 0.0f)
      std::fill(row, row + Qp, kNegInf);
    else if (causal_masked)  // queries before the key
      for (int c = 0; c < queries; ++c)
        if (s.key_original[i] > s.query_original[c]) row[c] = kNegInf;
  }
  for (int c = 0; c < Qp; c += I::width) {
    reg column = I::set1(kNegInf);
    for (int i = 0; i < keys; ++i) column = I::max(column, I::load(s.scores + i * Qp + c));
    I::store(s.column_max + c, column);
  }
  const std::int64_t state0 = queries_view.state(q0), state_step = queries_view.state_step();
  for (int c = 0; c < Qp; ++c) {
    if (c >= queries) {  // padding columns: exp(S − inf) = 0
      s.column_shift[c] = kPosInf;
      continue;
    }
    float& m = s.row_max[state0 + c * state_step];
    const float new_max = std::max(m, s.column_max[c]);
    s.column_shift[c] = new_max == kNegInf ? 0.0f : new_max;
    s.column_correction[c] = std::exp(m - s.column_shift[c]);
    m = new_max;
  }
  for (int c = 0; c < Qp; c += I::width) {
    const reg shift = I::load(s.column_shift + c);
    reg sum = I::zero();
    for (int i = 0; i < keys; ++i) {
      const reg e = I::exp(I::sub(I::load(s.scores + i * Qp + c), shift));
      I::store(s.scores + i * Qp + c, e);
      sum = I::add(sum, e);
    }
    I::store(s.column_max + c, sum);  // now the column sums
  }
  for (int c = 0; c < queries; ++c) {
    const std::int64_t state = state0 + c * state_step;
    const float correction = s.column_correction[c];
    s.row_sum[state] = s.row_sum[state] * correction + s.column_max[c];
    if (correction != 1.0f)
      for (float *acc = s.acc + state * Dp, *end = acc + Dp; acc != end; ++acc) *acc *= correction;
  }
  if (p.dropout_p > 0.0f)
    for (int i = 0; i < keys; ++i)
      for (int c = 0; c < queries; ++c) s.scores[i * Qp + c] *= dropout_factor(p, queries_view.item, s, c, i);
  gemm<I, true, true>(queries, Dp, keys, s.scores, Qp, s.tile_rows_b, Dp, s.acc + state0 * Dp, state_step * Dp);
}

// The amx_bf16 group loops, with queries as rows (amx_attention.hpp).
template <class I, class T>
void forward_group_amx(const SideView<I, T>& own, const SideView<I, T>& other, const Group& g, Scratch<I>& s);
template <class I, class T>
void dq_group_amx(const SideView<I, T>& own, const SideView<I, T>& other, const Group& g, Scratch<I>& s);
template <class I, class T>
void dkdv_group_amx(const SideView<I, T>& own, const SideView<I, T>& other, const Group& g, Scratch<I>& s);

// Forward over one group: own side queries, other side keys.
template <class I, class T>
void forward_group(const SideView<I, T>& own, const SideView<I, T>& other, const Group& g, Scratch<I>& s) {
  const detail::DilatedParams& p = own.p;
  const std::int64_t diagonal = causal_diagonal(own, other);
  for (std::int64_t c0 = g.begin; c0 < g.end; c0 += kChunkRows) {
    const int chunk = int(std::min(kChunkRows, g.end - c0));
    own.pack_own(p.q, c0, chunk, operand_scales<I>(p).q, s.own_a);
    const std::int64_t key_end =
        diagonal == kNoDiagonal ? g.other_length : std::clamp<std::int64_t>(diagonal + c0 + chunk, 0, g.other_length);
    for (std::int64_t k0 = 0; k0 < key_end; k0 += kTileRows) {
      const int keys = int(std::min(kTileRows, key_end - k0));
      other.pack_tile(p.k, k0, keys, 1.0f, s.tile_rows_a);
      other.pack_tile(p.v, k0, keys, 1.0f, s.tile_rows_b);
      pack_key_bias(other, k0, keys, keys, s.tile_bias);
      for (std::int64_t q0 = c0; q0 < c0 + chunk; q0 += kTileRows) {
        const int queries = int(std::min(kTileRows, c0 + chunk - q0));
        const CausalPair pair = record_pair(own, q0, queries, other, k0, keys, s);
        if (pair == CausalPair::skipped) continue;
        forward_tile(own, s, s.own_a + (q0 - c0), q0, queries, keys, pair == CausalPair::masked);
      }
    }
  }
}

// The backward's probabilities for a tile with one row per query: `scores` (holding S) becomes
// P∘Z and `grad_scores` (holding dP) becomes dS = P ∘ (Z∘dP − delta). Masked pairs give 0.
template <class I>
void softmax_gradient_query_rows(const detail::DilatedParams& p, const WorkItem& item, Scratch<I>& s,
                                 const float* key_bias, const float* lse, const float* delta, int queries, int keys,
                                 int padded_keys, bool causal_masked) {
  for (int i = 0; i < queries; ++i) {
    float* prob = s.scores + i * padded_keys;
    float* grad = s.grad_scores + i * padded_keys;
    if (p.dropout_p > 0.0f)
      for (int c = 0; c < keys; ++c) grad[c] *= (s.dropout_row[c] = dropout_factor(p, item, s, i, c));
    const typename I::reg shift = I::set1(lse[i]), correction = I::set1(delta[i]);
    for (int c = 0; c < padded_keys; c += I::width) {
      const typename I::reg pr = I::exp(I::sub(I::add(I::load(prob + c), I::load(key_bias + c)), shift));
      I::store(prob + c, pr);
      I::store(grad + c, I::mul(pr, I::sub(I::load(grad + c), correction)));
    }
    if (causal_masked)  // keys after the query
      for (int c = 0; c < keys; ++c)
        if (s.key_original[c] > s.query_original[i]) prob[c] = grad[c] = 0.0f;
    if (p.dropout_p > 0.0f)
      for (int c = 0; c < keys; ++c) prob[c] *= s.dropout_row[c];
  }
}

// The same with one row per key and one column per query (lse and delta per column), except that
// `scores` becomes the undropped P (the dq pass's F = Σ_j P_j·k_j).
template <class I>
void softmax_gradient_key_rows(const detail::DilatedParams& p, const WorkItem& item, Scratch<I>& s,
                               const float* key_bias, const float* lse, const float* delta, int keys, int queries,
                               int padded_queries, bool causal_masked) {
  for (int i = 0; i < keys; ++i) {
    float* prob = s.scores + i * padded_queries;
    float* grad = s.grad_scores + i * padded_queries;
    if (key_bias[i] != 0.0f) {  // a padded key takes part in nothing
      std::fill(prob, prob + padded_queries, 0.0f);
      std::fill(grad, grad + padded_queries, 0.0f);
      continue;
    }
    if (p.dropout_p > 0.0f)
      for (int c = 0; c < queries; ++c) grad[c] *= (s.dropout_row[c] = dropout_factor(p, item, s, c, i));
    for (int c = 0; c < padded_queries; c += I::width) {
      const typename I::reg pr = I::exp(I::sub(I::load(prob + c), I::load(lse + c)));
      I::store(prob + c, pr);
      I::store(grad + c, I::mul(pr, I::sub(I::load(grad + c), I::load(delta + c))));
    }
    if (causal_masked)  // queries before the key
      for (int c = 0; c < queries; ++c)
        if (s.key_original[i] > s.query_original[c]) prob[c] = grad[c] = 0.0f;
  }
}

// dq pass over one group (own side queries), keys as rows: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ give
// G = P∘Z∘dP. Since dS = P∘(Z∘dP − delta) with delta = Σ_j G_j, one sweep accumulates
// E = Σ_j G_j·k_j, F = Σ_j P_j·k_j and delta, and dq = scale·(E − delta·F) at the end: delta comes
// from the same float32 P and dP as the rest (a query with one key gets dq = 0 exactly), not
// from the rounded out, and no second sweep is needed. E and F take float32 GEMMs even where the
// others round to bf16: E − delta·F cancels where a query has few keys, and bf16 rounding of G and
// P (up to 2^-9 each) grew past the bf16 bar there (dq relative L2 up to 2.4e-2 on random cases).
template <class I, class T>
void dq_group(const SideView<I, T>& own, const SideView<I, T>& other, const Group& g, Scratch<I>& s) {
  const detail::DilatedParams& p = own.p;
  const int Dp = s.padded_d;
  const OperandScales scales = operand_scales<I>(p);
  const std::int64_t diagonal = causal_diagonal(own, other);
  for (std::int64_t c0 = g.begin; c0 < g.end; c0 += kChunkRows) {
    const int chunk = int(std::min(kChunkRows, g.end - c0));
    own.pack_own(p.q, c0, chunk, scales.q, s.own_a);
    own.pack_own(p.dout, c0, chunk, scales.dout, s.own_b);
    pack_lse_delta(own, c0, chunk, padded<I>(chunk), s.own_lse, s.own_delta, false);  // delta 0: dS becomes G
    const std::int64_t key_end =
        diagonal == kNoDiagonal ? g.other_length : std::clamp<std::int64_t>(diagonal + c0 + chunk, 0, g.other_length);
    for (std::int64_t k0 = 0; k0 < key_end; k0 += kTileRows) {
      const int keys = int(std::min(kTileRows, key_end - k0));
      other.pack_tile(p.k, k0, keys, 1.0f, s.tile_rows_a);
      other.pack_tile(p.v, k0, keys, 1.0f, s.tile_rows_b);
      pack_key_bias(other, k0, keys, keys, s.tile_bias);
      for (std::int64_t q0 = c0; q0 < c0 + chunk; q0 += kTileRows) {
        const int queries = int(std::min(kTileRows, c0 + chunk - q0)), Qp = padded<I>(queries);
        const CausalPair pair = record_pair(own, q0, queries, other, k0, keys, s);
        if (pair == CausalPair::skipped) continue;
        const std::int64_t at = q0 - c0, state = own.state(q0), ldc = own.state_step() * Dp;
        gemm<I, false>(keys, Qp, Dp, s.tile_rows_a, Dp, s.own_a + at, kOwnPitch, s.scores, Qp, scales.q_product);
        gemm<I, false>(keys, Qp, Dp, s.tile_rows_b, Dp, s.own_b + at, kOwnPitch, s.grad_scores, Qp,
                       scales.dout_product);
        softmax_gradient_key_rows(p, own.item, s, s.tile_bias, s.own_lse + at, s.own_delta + at, keys, queries, Qp,
                                  pair == CausalPair::masked);
        for (int c = 0; c < Qp; c += I::width) {  // delta += column sums of G
          typename I::reg sum = I::zero();
          for (int i = 0; i < keys; ++i) sum = I::add(sum, I::load(s.grad_scores + i * Qp + c));
          I::store(s.column_max + c, sum);
        }
        for (int c = 0; c < queries; ++c) s.row_delta[state + c * own.state_step()] += s.column_max[c];
        using Exact = typename ExactGemm<I>::type;
        gemm<Exact, true, true>(queries, Dp, keys, s.grad_scores, Qp, s.tile_rows_a, Dp, s.acc + state * Dp, ldc);
        gemm<Exact, true, true>(queries, Dp, keys, s.scores, Qp, s.tile_rows_a, Dp, s.acc2 + state * Dp, ldc);
      }
    }
  }
}

// dk/dv pass over one group (own side keys), queries as rows: S = Q·Kᵀ, dP = dO·Vᵀ, then
// dV += (P∘Z)ᵀ·dO and dK += dSᵀ·Q over the query tiles that see each key tile.
template <class I, class T>
void dkdv_group(const SideView<I, T>& own, const SideView<I, T>& other, const Group& g, Scratch<I>& s) {
  const detail::DilatedParams& p = own.p;
  const int Dp = s.padded_d;
  const OperandScales scales = operand_scales<I>(p);
  const std::int64_t diagonal = causal_diagonal(own, other);
  for (std::int64_t c0 = g.begin; c0 < g.end; c0 += kChunkRows) {
    const int chunk = int(std::min(kChunkRows, g.end - c0));
    own.pack_own(p.k, c0, chunk, 1.0f, s.own_a);
    own.pack_own(p.v, c0, chunk, 1.0f, s.own_b);
    pack_key_bias(own, c0, chunk, padded<I>(chunk), s.own_bias);
    const std::int64_t query_begin = diagonal == kNoDiagonal ? 0 : std::max<std::int64_t>(0, diagonal + c0);
    for (std::int64_t q0 = query_begin; q0 < g.other_length; q0 += kTileRows) {
      const int queries = int(std::min(kTileRows, g.other_length - q0));
      other.pack_tile(p.q, q0, queries, scales.q, s.tile_rows_a);
      other.pack_tile(p.dout, q0, queries, scales.dout, s.tile_rows_b);
      pack_lse_delta(other, q0, queries, queries, s.tile_lse, s.tile_delta, true);
      for (std::int64_t k0 = c0; k0 < c0 + chunk; k0 += kTileRows) {
        const int keys = int(std::min(kTileRows, c0 + chunk - k0)), Kp = padded<I>(keys);
        const CausalPair pair = record_pair(other, q0, queries, own, k0, keys, s);
        if (pair == CausalPair::skipped) continue;
        const std::int64_t at = k0 - c0, state = own.state(k0) * Dp, ldc = own.state_step() * Dp;
        gemm<I, false>(queries, Kp, Dp, s.tile_rows_a, Dp, s.own_a + at, kOwnPitch, s.scores, Kp, scales.q_product);
        gemm<I, false>(queries, Kp, Dp, s.tile_rows_b, Dp, s.own_b + at, kOwnPitch, s.grad_scores, Kp,
                       scales.dout_product);
        softmax_gradient_query_rows(p, own.item, s, s.own_bias + at, s.tile_lse, s.tile_delta, queries, keys, Kp,
                                    pair == CausalPair::masked);
        gemm<I, true, true>(keys, Dp, queries, s.scores, Kp, s.tile_rows_b, Dp, s.acc2 + state, ldc,
                            scales.dout_product);
        gemm<I, true, true>(keys, Dp, queries, s.grad_scores, Kp, s.tile_rows_a, Dp, s.acc + state, ldc,
                            scales.q_product);
      }
    }
  }
}

// Calls body(own side, other side, group) for every group of the item.
template <class I, class T, class Body>
void for_each_group_view(const detail::DilatedParams& p, const WorkItem& item, Body&& body) {
  const std::int64_t own_base = own_rows(p, item.key_side).begin, other_base = other_rows(p, item.key_side).begin;
  for_each_group(p, item, [&](const Group& g) {
    body(SideView<I, T>{p, item, g.own_first, g.stride, own_base},
         SideView<I, T>{p, item, g.other_first, g.stride, other_base}, g);
  });
}

// The one-pass backward of a whole grouped-mode segment (float32 inputs): the item owns the
// segment's queries and keys, so dq (the state), dk and dv (per key chunk) accumulate without
// races in 5 GEMMs per tile pair. delta = rowsum(dout ∘ out) from the float32 out: exact to
// float32 rounding, which only matters where a row has few keys (such segments take the two-pass
// path, see use_segment_backward).
template <class I, class T>
void segment_backward_item(const detail::DilatedParams& p, const WorkItem& item, Scratch<I>& s) {
  const int Dp = s.padded_d, D = int(p.head_dim);
  std::fill(s.acc, s.acc + item.state_rows * Dp, 0.0f);
  for_each_group_view<I, T>(p, item, [&](const SideView<I, T>& own, const SideView<I, T>& other, const Group& g) {
    const std::int64_t L = g.other_length;
    for (std::int64_t j = 0; j < L; ++j) {  // delta of every query of the segment
      const T* o = other.row(p.out, j);
      const T* d = other.row(p.dout, j);
      float sum = 0.0f;
      for (int e = 0; e < D; ++e) sum += Convert<I>::load(o[e]) * Convert<I>::load(d[e]);
      s.row_delta[j] = sum;
    }
    for (std::int64_t c0 = 0; c0 < L; c0 += kChunkRows) {
      const int chunk = int(std::min(kChunkRows, L - c0));
      own.pack_own(p.k, c0, chunk, 1.0f, s.own_a);
      own.pack_own(p.v, c0, chunk, 1.0f, s.own_b);
      pack_rows<I>([&](int i) { return own.row(p.k, c0 + i); }, chunk, D, Dp, 1.0f, s.own_rows, Dp);
      pack_key_bias(own, c0, chunk, padded<I>(chunk), s.own_bias);
      std::fill(s.chunk_dk, s.chunk_dk + chunk * Dp, 0.0f);
      std::fill(s.chunk_dv, s.chunk_dv + chunk * Dp, 0.0f);
      // Causal: queries before the chunk see none of its keys, unless an index map reorders them.
      for (std::int64_t q0 = p.causal && !p.position_index ? c0 : 0; q0 < L; q0 += kTileRows) {
        const int queries = int(std::min(kTileRows, L - q0));
        other.pack_tile(p.q, q0, queries, p.scale, s.tile_rows_a);
        other.pack_tile(p.dout, q0, queries, p.output_scale, s.tile_rows_b);
        pack_lse_delta(other, q0, queries, queries, s.tile_lse, s.tile_delta, false);
        for (int i = 0; i < queries; ++i) s.tile_delta[i] = s.row_delta[q0 + i];
        for (std::int64_t k0 = c0; k0 < c0 + chunk; k0 += kTileRows) {
          const int keys = int(std::min(kTileRows, c0 + chunk - k0)), Kp = padded<I>(keys);
          const CausalPair pair = record_pair(other, q0, queries, own, k0, keys, s);
          if (pair == CausalPair::skipped) continue;
          const std::int64_t at = k0 - c0;
          gemm<I, false>(queries, Kp, Dp, s.tile_rows_a, Dp, s.own_a + at, kOwnPitch, s.scores, Kp);
          gemm<I, false>(queries, Kp, Dp, s.tile_rows_b, Dp, s.own_b + at, kOwnPitch, s.grad_scores, Kp);
          softmax_gradient_query_rows(p, item, s, s.own_bias + at, s.tile_lse, s.tile_delta, queries, keys, Kp,
                                      pair == CausalPair::masked);
          gemm<I, true, true>(keys, Dp, queries, s.scores, Kp, s.tile_rows_b, Dp, s.chunk_dv + at * Dp, Dp);
          gemm<I, true, true>(keys, Dp, queries, s.grad_scores, Kp, s.tile_rows_a, Dp, s.chunk_dk + at * Dp, Dp);
          gemm<I, true>(queries, Dp, keys, s.grad_scores, Kp, s.own_rows + at * Dp, Dp, s.acc + q0 * Dp, Dp);
        }
      }
      for (int i = 0; i < chunk; ++i) {
        const std::int64_t row = own.original(c0 + i);
        store_row<I, T>(p.dk, item, row, s.chunk_dk + i * Dp, 1.0f, D);
        store_row<I, T>(p.dv, item, row, s.chunk_dv + i * Dp, 1.0f, D);
      }
    }
  });
  for_each_region_row(p, item, [&](std::int64_t row, std::int64_t state) {
    store_row<I, T>(p.dq, item, row, state >= 0 ? s.acc + state * Dp : nullptr, p.scale, D);
    if (state < 0) {  // rows the branch does not select get no gradient
      store_row<I, T>(p.dk, item, row, nullptr, 0.0f, D);
      store_row<I, T>(p.dv, item, row, nullptr, 0.0f, D);
    }
  });
}

// The one-pass backward serves plain float32 grouped calls whose segments select enough rows
// that no row is left with only a few keys by the segment itself.
inline constexpr std::int64_t kSegmentBackwardMinRows = 64;

// Calls write(row of the tensors, state index or -1) for every row of the item's region, so that
// rows no branch selects are written too.
template <class Fn>
void for_each_region_row(const detail::DilatedParams& p, const WorkItem& item, Fn&& write) {
  const std::int64_t base = own_rows(p, item.key_side).begin;
  for (std::int64_t position = item.region_begin; position < item.region_end; ++position) {
    const std::int64_t offset = position - item.state_base;
    const bool in_state = offset >= 0 && offset % item.state_stride == 0 && offset / item.state_stride < item.state_rows;
    write((p.position_index ? p.position_index[position] : position) - base, in_state ? offset / item.state_stride : -1);
  }
}

// x[row] += scale·values for a float32 accumulator (ring backward steps).
template <class I>
void accumulate_row(const detail::Operand& x, const WorkItem& item, std::int64_t row, const float* values, float scale,
                    int D) {
  if (!values) return;
  float* dst = static_cast<float*>(x.data) + item.batch * x.batch_stride + row * x.row_stride +
               item.head / x.head_group * x.head_stride;
  for (int d = 0; d < D; ++d) dst[d] += scale * values[d];
}

template <class I, class T>
void store_row(const detail::Operand& x, const WorkItem& item, std::int64_t row, const float* values, float scale, int D) {
  T* dst = static_cast<T*>(x.data) + item.batch * x.batch_stride + row * x.row_stride +
               item.head / x.head_group * x.head_stride;
  for (int d = 0; d < D; ++d) Convert<I>::store(values ? scale * values[d] : 0.0f, dst + d);
}

template <class I, class T>
void forward_item(const detail::DilatedParams& p, const WorkItem& item, Scratch<I>& s) {
  const int Dp = s.padded_d, D = int(p.head_dim);
  std::fill(s.acc, s.acc + item.state_rows * Dp, 0.0f);
  std::fill(s.row_max, s.row_max + item.state_rows, kNegInf);
  std::fill(s.row_sum, s.row_sum + item.state_rows, 0.0f);
  for_each_group_view<I, T>(p, item, [&](const auto& own, const auto& other, const Group& g) {
    if constexpr (requires { I::amx_tiles; }) forward_group_amx(own, other, g, s);
    else forward_group(own, other, g, s);
  });
  for_each_region_row(p, item, [&](std::int64_t row, std::int64_t state) {
    // A NaN sum (a NaN score in the row) counts as attended, so the row's out and lse are NaN.
    const bool attended = state >= 0 && s.row_sum[state] != 0.0f;
    store_row<I, T>(p.out, item, row, attended ? s.acc + state * Dp : nullptr,
                    attended ? p.output_scale / s.row_sum[state] : 0.0f, D);
    p.lse[item.batch * p.lse_batch_stride + item.head * p.lse_head_stride + row * p.lse_row_stride] =
        attended ? s.row_max[state] + std::log(s.row_sum[state]) : kNegInf;
  });
}

// dq for the item's rows, and their softmax deltas into p.softmax_delta for the dk/dv pass.
template <class I, class T>
void dq_item(const detail::DilatedParams& p, const WorkItem& item, Scratch<I>& s) {
  const int Dp = s.padded_d, D = int(p.head_dim);
  std::fill(s.acc, s.acc + item.state_rows * Dp, 0.0f);
  std::fill(s.acc2, s.acc2 + item.state_rows * Dp, 0.0f);
  std::fill(s.row_delta, s.row_delta + item.state_rows, 0.0f);
  for_each_group_view<I, T>(p, item, [&](const auto& own, const auto& other, const Group& g) {
    if constexpr (requires { I::amx_tiles; }) dq_group_amx(own, other, g, s);
    else dq_group(own, other, g, s);
  });
  float* delta = p.softmax_delta + (item.batch * p.heads + item.head) * p.seqlen;
  if (p.accumulate) {  // a ring step: add E, F and delta for the caller to finish
    for_each_region_row(p, item, [&](std::int64_t row, std::int64_t state) {
      if (state < 0) return;
      accumulate_row<I>(p.dq, item, row, s.acc + state * Dp, 1.0f, D);
      accumulate_row<I>(p.dq_correction, item, row, s.acc2 + state * Dp, 1.0f, D);
      delta[row] += s.row_delta[state];
    });
    return;
  }
  for_each_region_row(p, item, [&](std::int64_t row, std::int64_t state) {
    if (state >= 0) {  // E − delta·F, in place
      float* e = s.acc + state * Dp;
      const float* f = s.acc2 + state * Dp;
      for (int d = 0; d < D; ++d) e[d] -= s.row_delta[state] * f[d];
    }
    store_row<I, T>(p.dq, item, row, state >= 0 ? s.acc + state * Dp : nullptr, p.scale, D);
    delta[row] = state >= 0 ? s.row_delta[state] : 0.0f;
  });
}

template <class I, class T>
void dkdv_item(const detail::DilatedParams& p, const WorkItem& item, Scratch<I>& s) {
  const int Dp = s.padded_d;
  std::fill(s.acc, s.acc + item.state_rows * Dp, 0.0f);
  std::fill(s.acc2, s.acc2 + item.state_rows * Dp, 0.0f);
  for_each_group_view<I, T>(p, item, [&](const auto& own, const auto& other, const Group& g) {
    if constexpr (requires { I::amx_tiles; }) dkdv_group_amx(own, other, g, s);
    else dkdv_group(own, other, g, s);
  });
  for_each_region_row(p, item, [&](std::int64_t row, std::int64_t state) {
    if (p.accumulate) {  // a ring step
      accumulate_row<I>(p.dk, item, row, state >= 0 ? s.acc + state * Dp : nullptr, 1.0f, int(p.head_dim));
      accumulate_row<I>(p.dv, item, row, state >= 0 ? s.acc2 + state * Dp : nullptr, 1.0f, int(p.head_dim));
      return;
    }
    store_row<I, T>(p.dk, item, row, state >= 0 ? s.acc + state * Dp : nullptr, 1.0f, int(p.head_dim));
    store_row<I, T>(p.dv, item, row, state >= 0 ? s.acc2 + state * Dp : nullptr, 1.0f, int(p.head_dim));
  });
}

// Per-thread state of an ISA (AMX's tile configuration), set up for one parallel region: every
// GEMM runs inside one, and nothing of the state outlives the call.
template <class I>
struct ThreadState {
  ThreadState() {
    if constexpr (requires { I::begin_thread(); }) I::begin_thread();
  }
  ~ThreadState() {
    if constexpr (requires { I::end_thread(); }) I::end_thread();
  }
  ThreadState(const ThreadState&) = delete;
  ThreadState& operator=(const ThreadState&) = delete;
};

// Runs body(item, scratch) over all work items, dynamically scheduled, longest first.
template <class I, class Body>
void run_item_list(const detail::DilatedParams& p, const std::vector<WorkItem>& items, Body&& body) {
  std::int64_t state_rows = 0;
  for (const WorkItem& item : items) state_rows = std::max(state_rows, item.state_rows);
#pragma omp parallel
  {
    const ThreadState<I> thread_state;
    Scratch<I> scratch(int(p.head_dim), state_rows);
#pragma omp for schedule(dynamic, 1)
    for (std::size_t i = 0; i < items.size(); ++i) body(items[i], scratch);
  }
}

template <class I, class Body>
void run_items(const detail::DilatedParams& p, bool key_side, Body&& body) {
  run_item_list<I>(p, make_work_items(p, key_side), body);
}

template <class I, class T>
void forward_typed(const detail::DilatedParams& p) {
  run_items<I>(p, false, [&](const WorkItem& item, Scratch<I>& s) { forward_item<I, T>(p, item, s); });
}

// The dq pass runs first: it computes each row's softmax delta, which the dk/dv pass reads.
template <class I, class T>
void backward_typed(const detail::DilatedParams& params) {
  if constexpr (std::is_same_v<T, float>)
    if (segment_backward_applies(params, kSegmentBackwardMinRows)) {
      run_item_list<I>(params, make_segment_items(params),
                       [&](const WorkItem& item, Scratch<I>& s) { segment_backward_item<I, T>(params, item, s); });
      return;  // the one-pass backward keeps its deltas per item: no [B, H, N] buffer
    }
  std::vector<float> softmax_delta;
  detail::DilatedParams p = params;
  if (!p.softmax_delta) {
    softmax_delta.resize(std::size_t(p.batch * p.heads * p.seqlen));
    p.softmax_delta = softmax_delta.data();
  }
  if (p.run_query_pass) run_items<I>(p, false, [&](const WorkItem& item, Scratch<I>& s) { dq_item<I, T>(p, item, s); });
  if (p.run_key_pass) run_items<I>(p, true, [&](const WorkItem& item, Scratch<I>& s) { dkdv_item<I, T>(p, item, s); });
}

template <class I>
void forward_isa(const detail::DilatedParams& p) {
  switch (p.dtype) {
    case DType::float32: return forward_typed<I, float>(p);
    case DType::bfloat16: return forward_typed<I, BFloat16>(p);
    case DType::float16: return forward_typed<I, Float16>(p);
    default: return;  // the API layer admits no other dtype here
  }
}

template <class I>
void backward_isa(const detail::DilatedParams& p) {
  switch (p.dtype) {
    case DType::float32: return backward_typed<I, float>(p);
    case DType::bfloat16: return backward_typed<I, BFloat16>(p);
    case DType::float16: return backward_typed<I, Float16>(p);
    default: return;
  }
}

}  // namespace dattn::cpu
