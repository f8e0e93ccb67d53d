// Fused dilated attention on the CPU, templated over the ISA vocabulary I and storage type T.
// Forward: flash-style online softmax over key tiles. Backward (FlashAttention-2 from the saved
// lse): a dk/dv pass over key regions and a dq pass over query regions, so no two threads write
// the same row and no probabilities are stored. Every tile is read by stride from q/k/v.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/gemm.hpp"
#include "cpu/tile.hpp"
#include "cpu/work.hpp"
#include "dattn/philox.hpp"
#include "params.hpp"

namespace dattn::cpu {

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <class I>
constexpr int padded(std::int64_t n) {
  constexpr int step = 2 * I::width;
  return int((n + step - 1) / step * step);
}

// Per-thread scratch, allocated once per call and thread: a few tiles plus the item's state.
template <class I>
struct Scratch {
  int padded_d;
  std::vector<float> buffer;
  float *q_rows, *q_cols, *k_rows, *k_cols, *v_rows, *v_cols, *do_rows, *do_cols;
  float *scores, *grad_scores, *row_lse, *row_delta, *key_bias, *dropout_row;
  float *acc, *acc2, *row_max, *row_sum;

  Scratch(int head_dim, std::int64_t state_rows) : padded_d(padded<I>(head_dim)) {
    const std::int64_t T = kTileRows, tile = T * padded_d;
    buffer.assign(std::size_t(8 * tile + 2 * T * T + 4 * T + state_rows * (2 * padded_d + 2)), 0.0f);
    float* next = buffer.data();
    auto take = [&](std::int64_t n) { float* p = next; next += n; return p; };
    q_rows = take(tile), q_cols = take(tile), k_rows = take(tile), k_cols = take(tile);
    v_rows = take(tile), v_cols = take(tile), do_rows = take(tile), do_cols = take(tile);
    scores = take(T * T), grad_scores = take(T * T);
    row_lse = take(T), row_delta = take(T), key_bias = take(T), dropout_row = take(T);
    acc = take(state_rows * padded_d), acc2 = take(state_rows * padded_d);
    row_max = take(state_rows), row_sum = take(state_rows);
  }
};

// Everything one group needs to address rows: original positions and element pointers.
template <class I, class T>
struct GroupView {
  const detail::DilatedParams& p;
  const WorkItem& item;
  const Group& g;

  std::int64_t position(std::int64_t j) const { return g.first_position + j * g.stride; }
  const T* row(const detail::Operand& x, std::int64_t j) const {
    return static_cast<const T*>(x.data) + item.batch * x.batch_stride + position(j) * x.row_stride +
           item.head * x.head_stride;
  }
  std::int64_t row_step(const detail::Operand& x) const { return g.stride * x.row_stride; }
  // Index in the per-thread state of group row j, and the state-row step between group rows.
  std::int64_t state(std::int64_t j) const { return (position(j) - item.state_base) / item.state_stride; }
  std::int64_t state_step() const { return g.stride / item.state_stride; }
  bool padded_key(std::int64_t j) const {
    return p.key_padding_mask &&
           p.key_padding_mask[item.batch * p.mask_batch_stride + position(j) * p.mask_row_stride] != 0;
  }
  float dropout(std::int64_t query_j, std::int64_t key_j) const {
    return dropout_keep(p.dropout_seed, p.dropout_offset, item.batch * p.heads + item.head, position(query_j),
                        position(key_j), p.dropout_threshold)
               ? p.dropout_rescale
               : 0.0f;
  }
  float* lse_at(std::int64_t j) const {
    return p.lse + item.batch * p.lse_batch_stride + item.head * p.lse_head_stride + position(j) * p.lse_row_stride;
  }
};

// 0 for a usable key, -inf for a padded one or a padding column of the tile.
template <class I, class T>
void key_bias(const GroupView<I, T>& view, std::int64_t k0, int keys, int padded_keys, float* bias) {
  for (int c = 0; c < padded_keys; ++c) bias[c] = c < keys && !view.padded_key(k0 + c) ? 0.0f : kNegInf;
}

// One query tile against one key tile: scores -> online softmax -> acc += P·V.
template <class I, class T>
void forward_tile(const GroupView<I, T>& view, Scratch<I>& s, std::int64_t q0, int queries, std::int64_t k0, int keys) {
  const detail::DilatedParams& p = view.p;
  const int D = int(p.head_dim), Dp = s.padded_d, Kp = padded<I>(keys);
  pack_columns<I>(view.row(p.k, k0), view.row_step(p.k), keys, Kp, D, Dp, 1.0f, s.k_cols, Kp);
  pack_rows<I>(view.row(p.v, k0), view.row_step(p.v), keys, D, Dp, 1.0f, s.v_rows, Dp);
  key_bias(view, k0, keys, Kp, s.key_bias);
  gemm<I, false>(queries, Kp, Dp, s.q_rows, Dp, s.k_cols, Kp, s.scores, Kp);

  const std::int64_t state0 = view.state(q0), step = view.state_step();
  for (int i = 0; i < queries; ++i) {
    float* row = s.scores + i * Kp;
    typename I::reg row_max = I::set1(kNegInf);
    for (int c = 0; c < Kp; c += I::width) {
      const typename I::reg x = I::add(I::load(row + c), I::load(s.key_bias + c));
      I::store(row + c, x);
      row_max = I::max(row_max, x);
    }
    float tile_max = I::reduce_max(row_max);
    if (p.causal && q0 + i - k0 + 1 < keys) {  // keys past the query (index order is position order)
      std::fill(row + std::max<std::int64_t>(0, q0 + i - k0 + 1), row + Kp, kNegInf);
      tile_max = kNegInf;
      for (int c = 0; c < Kp; ++c) tile_max = std::max(tile_max, row[c]);
    }
    float& m = s.row_max[state0 + i * step];
    float& l = s.row_sum[state0 + i * step];
    const float new_max = std::max(m, tile_max);
    if (new_max == kNegInf) {
      std::fill(row, row + Kp, 0.0f);
      continue;
    }
    const typename I::reg shift = I::set1(new_max);
    typename I::reg sum = I::zero();
    for (int c = 0; c < Kp; c += I::width) {
      const typename I::reg e = I::exp(I::sub(I::load(row + c), shift));
      I::store(row + c, e);
      sum = I::add(sum, e);
    }
    const float correction = std::exp(m - new_max);
    l = l * correction + I::reduce_add(sum);
    m = new_max;
    if (correction != 1.0f) {
      float* acc_row = s.acc + (state0 + i * step) * Dp;
      for (int d = 0; d < Dp; ++d) acc_row[d] *= correction;
    }
    if (p.dropout_p > 0.0f)
      for (int c = 0; c < keys; ++c) row[c] *= view.dropout(q0 + i, k0 + c);
  }
  gemm<I, true>(queries, Dp, keys, s.scores, Kp, s.v_rows, Dp, s.acc + state0 * Dp, step * Dp);
}

template <class I, class T>
void forward_group(const GroupView<I, T>& view, Scratch<I>& s) {
  const detail::DilatedParams& p = view.p;
  const int D = int(p.head_dim);
  for (std::int64_t q0 = view.g.begin; q0 < view.g.end; q0 += kTileRows) {
    const int queries = int(std::min<std::int64_t>(kTileRows, view.g.end - q0));
    pack_rows<I>(view.row(p.q, q0), view.row_step(p.q), queries, D, s.padded_d, p.scale, s.q_rows, s.padded_d);
    const std::int64_t key_end = p.causal ? std::min(view.g.length, q0 + queries) : view.g.length;
    for (std::int64_t k0 = 0; k0 < key_end; k0 += kTileRows)
      forward_tile(view, s, q0, queries, k0, int(std::min<std::int64_t>(kTileRows, key_end - k0)));
  }
}

// Writes every row of the item's region: state rows that saw a key, zeros and -inf elsewhere.
// `write` gets (row position, state index or -1).
template <class Fn>
void for_each_region_row(const WorkItem& item, Fn&& write) {
  for (std::int64_t row = item.region_begin; row < item.region_end; ++row) {
    const std::int64_t offset = row - item.state_base;
    const bool in_state = offset >= 0 && offset % item.state_stride == 0 && offset / item.state_stride < item.state_rows;
    write(row, in_state ? offset / item.state_stride : -1);
  }
}

template <class I, class T>
void store_row(const detail::Operand& x, const WorkItem& item, std::int64_t row, const float* values, float scale, int D) {
  T* dst = static_cast<T*>(x.data) + item.batch * x.batch_stride + row * x.row_stride + item.head * x.head_stride;
  for (int d = 0; d < D; ++d) Convert<I>::store(values ? scale * values[d] : 0.0f, dst + d);
}

template <class I, class T>
void forward_item(const detail::DilatedParams& p, const WorkItem& item, Scratch<I>& s) {
  const int Dp = s.padded_d, D = int(p.head_dim);
  std::fill(s.acc, s.acc + item.state_rows * Dp, 0.0f);
  std::fill(s.row_max, s.row_max + item.state_rows, kNegInf);
  std::fill(s.row_sum, s.row_sum + item.state_rows, 0.0f);
  for_each_group(p, item, [&](const Group& g) { forward_group(GroupView<I, T>{p, item, g}, s); });
  for_each_region_row(item, [&](std::int64_t row, std::int64_t state) {
    const bool attended = state >= 0 && s.row_sum[state] > 0.0f;
    store_row<I, T>(p.out, item, row, attended ? s.acc + state * Dp : nullptr,
                    attended ? p.output_scale / s.row_sum[state] : 0.0f, D);
    p.lse[item.batch * p.lse_batch_stride + item.head * p.lse_head_stride + row * p.lse_row_stride] =
        attended ? s.row_max[state] + std::log(s.row_sum[state]) : kNegInf;
  });
}

// Packs a query tile for the backward: q (scaled, rows and columns), output_scale·dout (rows and
// columns), delta = rowsum(dout ∘ out), and lse, with +inf for rows past the tile and rows that
// attend to nothing, so that exp(S − lse) is 0 there.
template <class I, class T>
void pack_backward_queries(const GroupView<I, T>& view, Scratch<I>& s, std::int64_t q0, int queries) {
  const detail::DilatedParams& p = view.p;
  const int D = int(p.head_dim), Dp = s.padded_d, Qp = padded<I>(queries);
  pack_rows<I>(view.row(p.q, q0), view.row_step(p.q), queries, D, Dp, p.scale, s.q_rows, Dp);
  pack_columns<I>(view.row(p.q, q0), view.row_step(p.q), queries, Qp, D, Dp, p.scale, s.q_cols, Qp);
  pack_rows<I>(view.row(p.dout, q0), view.row_step(p.dout), queries, D, Dp, p.output_scale, s.do_rows, Dp);
  pack_columns<I>(view.row(p.dout, q0), view.row_step(p.dout), queries, Qp, D, Dp, p.output_scale, s.do_cols, Qp);
  for (int i = 0; i < Qp; ++i) {
    if (i >= queries) {
      s.row_lse[i] = std::numeric_limits<float>::infinity();
      s.row_delta[i] = 0.0f;
      continue;
    }
    const T* o = view.row(p.out, q0 + i);
    const T* g = view.row(p.dout, q0 + i);
    float delta = 0.0f;
    for (int d = 0; d < D; ++d) delta += Convert<I>::load(o[d]) * Convert<I>::load(g[d]);
    s.row_delta[i] = delta;
    const float lse = *view.lse_at(q0 + i);
    s.row_lse[i] = lse == kNegInf ? std::numeric_limits<float>::infinity() : lse;  // so exp gives 0
  }
}

// The backward's probabilities, P = exp(S − lse), masked pairs 0, and dS = P ∘ (Z∘dP − delta):
// `prob` (holding S) becomes P∘Z and `grad` (holding dP) becomes dS. One tile row per query.
template <class I, class T>
void softmax_gradient_query_rows(const GroupView<I, T>& view, Scratch<I>& s, std::int64_t q0, int queries,
                                 std::int64_t k0, int keys, int padded_keys) {
  const detail::DilatedParams& p = view.p;
  for (int i = 0; i < queries; ++i) {
    float* prob = s.scores + i * padded_keys;
    float* grad = s.grad_scores + i * padded_keys;
    const float lse = s.row_lse[i];
    if (lse == std::numeric_limits<float>::infinity()) {  // a query that attends to nothing
      std::fill(prob, prob + padded_keys, 0.0f);
      std::fill(grad, grad + padded_keys, 0.0f);
      continue;
    }
    if (p.dropout_p > 0.0f)
      for (int c = 0; c < keys; ++c) grad[c] *= (s.dropout_row[c] = view.dropout(q0 + i, k0 + c));
    const typename I::reg shift = I::set1(lse), delta = I::set1(s.row_delta[i]);
    for (int c = 0; c < padded_keys; c += I::width) {
      const typename I::reg pr = I::exp(I::sub(I::add(I::load(prob + c), I::load(s.key_bias + c)), shift));
      I::store(prob + c, pr);
      I::store(grad + c, I::mul(pr, I::sub(I::load(grad + c), delta)));
    }
    if (p.causal)  // keys past the query
      for (std::int64_t c = std::max<std::int64_t>(0, q0 + i - k0 + 1); c < keys; ++c) prob[c] = grad[c] = 0.0f;
    if (p.dropout_p > 0.0f)
      for (int c = 0; c < keys; ++c) prob[c] *= s.dropout_row[c];
  }
}

// The same with one tile row per key and one column per query (lse and delta per column).
template <class I, class T>
void softmax_gradient_key_rows(const GroupView<I, T>& view, Scratch<I>& s, std::int64_t k0, int keys,
                               std::int64_t q0, int queries, int padded_queries) {
  const detail::DilatedParams& p = view.p;
  for (int i = 0; i < keys; ++i) {
    float* prob = s.scores + i * padded_queries;
    float* grad = s.grad_scores + i * padded_queries;
    if (s.key_bias[i] != 0.0f) {  // a padded key takes part in nothing
      std::fill(prob, prob + padded_queries, 0.0f);
      std::fill(grad, grad + padded_queries, 0.0f);
      continue;
    }
    if (p.dropout_p > 0.0f)
      for (int c = 0; c < queries; ++c) grad[c] *= (s.dropout_row[c] = view.dropout(q0 + c, k0 + i));
    for (int c = 0; c < padded_queries; c += I::width) {
      const typename I::reg pr = I::exp(I::sub(I::load(prob + c), I::load(s.row_lse + c)));
      I::store(prob + c, pr);
      I::store(grad + c, I::mul(pr, I::sub(I::load(grad + c), I::load(s.row_delta + c))));
    }
    if (p.causal)  // queries before the key
      for (std::int64_t c = 0; c < std::min<std::int64_t>(queries, k0 + i - q0); ++c) prob[c] = grad[c] = 0.0f;
    if (p.dropout_p > 0.0f)
      for (int c = 0; c < queries; ++c) prob[c] *= s.dropout_row[c];
  }
}

// dq pass: for a query tile, over its key tiles, dQ += dS·K.
template <class I, class T>
void dq_group(const GroupView<I, T>& view, Scratch<I>& s) {
  const detail::DilatedParams& p = view.p;
  const int D = int(p.head_dim), Dp = s.padded_d;
  for (std::int64_t q0 = view.g.begin; q0 < view.g.end; q0 += kTileRows) {
    const int queries = int(std::min<std::int64_t>(kTileRows, view.g.end - q0));
    pack_backward_queries(view, s, q0, queries);
    const std::int64_t key_end = p.causal ? std::min(view.g.length, q0 + queries) : view.g.length;
    float* dq = s.acc + view.state(q0) * Dp;
    const std::int64_t ldc = view.state_step() * Dp;
    for (std::int64_t k0 = 0; k0 < key_end; k0 += kTileRows) {
      const int keys = int(std::min<std::int64_t>(kTileRows, key_end - k0)), Kp = padded<I>(keys);
      pack_columns<I>(view.row(p.k, k0), view.row_step(p.k), keys, Kp, D, Dp, 1.0f, s.k_cols, Kp);
      pack_columns<I>(view.row(p.v, k0), view.row_step(p.v), keys, Kp, D, Dp, 1.0f, s.v_cols, Kp);
      pack_rows<I>(view.row(p.k, k0), view.row_step(p.k), keys, D, Dp, 1.0f, s.k_rows, Dp);
      key_bias(view, k0, keys, Kp, s.key_bias);
      gemm<I, false>(queries, Kp, Dp, s.q_rows, Dp, s.k_cols, Kp, s.scores, Kp);
      gemm<I, false>(queries, Kp, Dp, s.do_rows, Dp, s.v_cols, Kp, s.grad_scores, Kp);
      softmax_gradient_query_rows(view, s, q0, queries, k0, keys, Kp);
      gemm<I, true>(queries, Dp, keys, s.grad_scores, Kp, s.k_rows, Dp, dq, ldc);
    }
  }
}

// dk/dv pass: for a key tile, over the query tiles that see it, dV += (P∘Z)ᵀ·dO and dK += dSᵀ·Q.
template <class I, class T>
void dkdv_group(const GroupView<I, T>& view, Scratch<I>& s) {
  const detail::DilatedParams& p = view.p;
  const int D = int(p.head_dim), Dp = s.padded_d;
  for (std::int64_t k0 = view.g.begin; k0 < view.g.end; k0 += kTileRows) {
    const int keys = int(std::min<std::int64_t>(kTileRows, view.g.end - k0));
    pack_rows<I>(view.row(p.k, k0), view.row_step(p.k), keys, D, Dp, 1.0f, s.k_rows, Dp);
    pack_rows<I>(view.row(p.v, k0), view.row_step(p.v), keys, D, Dp, 1.0f, s.v_rows, Dp);
    key_bias(view, k0, keys, padded<I>(keys), s.key_bias);
    float* dk = s.acc + view.state(k0) * Dp;
    float* dv = s.acc2 + view.state(k0) * Dp;
    const std::int64_t ldc = view.state_step() * Dp;
    for (std::int64_t q0 = p.causal ? k0 : 0; q0 < view.g.length; q0 += kTileRows) {
      const int queries = int(std::min<std::int64_t>(kTileRows, view.g.length - q0)), Qp = padded<I>(queries);
      pack_backward_queries(view, s, q0, queries);
      gemm<I, false>(keys, Qp, Dp, s.k_rows, Dp, s.q_cols, Qp, s.scores, Qp);
      gemm<I, false>(keys, Qp, Dp, s.v_rows, Dp, s.do_cols, Qp, s.grad_scores, Qp);
      softmax_gradient_key_rows(view, s, k0, keys, q0, queries, Qp);
      gemm<I, true>(keys, Dp, queries, s.scores, Qp, s.do_rows, Dp, dv, ldc);
      gemm<I, true>(keys, Dp, queries, s.grad_scores, Qp, s.q_rows, Dp, dk, ldc);
    }
  }
}

template <class I, class T>
void dq_item(const detail::DilatedParams& p, const WorkItem& item, Scratch<I>& s) {
  const int Dp = s.padded_d;
  std::fill(s.acc, s.acc + item.state_rows * Dp, 0.0f);
  for_each_group(p, item, [&](const Group& g) { dq_group(GroupView<I, T>{p, item, g}, s); });
  for_each_region_row(item, [&](std::int64_t row, std::int64_t state) {
    store_row<I, T>(p.dq, item, row, state >= 0 ? s.acc + state * Dp : nullptr, p.scale, int(p.head_dim));
  });
}

template <class I, class T>
void dkdv_item(const detail::DilatedParams& p, const WorkItem& item, Scratch<I>& s) {
  const int Dp = s.padded_d;
  std::fill(s.acc, s.acc + item.state_rows * Dp, 0.0f);
  std::fill(s.acc2, s.acc2 + item.state_rows * Dp, 0.0f);
  for_each_group(p, item, [&](const Group& g) { dkdv_group(GroupView<I, T>{p, item, g}, s); });
  for_each_region_row(item, [&](std::int64_t row, std::int64_t state) {
    store_row<I, T>(p.dk, item, row, state >= 0 ? s.acc + state * Dp : nullptr, 1.0f, int(p.head_dim));
    store_row<I, T>(p.dv, item, row, state >= 0 ? s.acc2 + state * Dp : nullptr, 1.0f, int(p.head_dim));
  });
}

// Runs `body(item, scratch)` over all work items with dynamic scheduling, longest first.
template <class I, class Body>
void run_items(const detail::DilatedParams& p, Body&& body) {
  const std::vector<WorkItem> items = make_work_items(p);
  std::int64_t state_rows = 0;
  for (const WorkItem& item : items) state_rows = std::max(state_rows, item.state_rows);
#pragma omp parallel
  {
    Scratch<I> scratch(int(p.head_dim), state_rows);
#pragma omp for schedule(dynamic, 1)
    for (std::size_t i = 0; i < items.size(); ++i) body(items[i], scratch);
  }
}

template <class I, class T>
void forward_typed(const detail::DilatedParams& p) {
  run_items<I>(p, [&](const WorkItem& item, Scratch<I>& s) { forward_item<I, T>(p, item, s); });
}

template <class I, class T>
void backward_typed(const detail::DilatedParams& p) {
  run_items<I>(p, [&](const WorkItem& item, Scratch<I>& s) { dkdv_item<I, T>(p, item, s); });
  run_items<I>(p, [&](const WorkItem& item, Scratch<I>& s) { dq_item<I, T>(p, item, s); });
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
