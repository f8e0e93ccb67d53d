// Pieces every reference variant shares: element access in double, and softmax attention of
// each query over an explicit multiset of keys, forward and backward. k, v (and dk, dv) may have
// fewer heads than q (grouped-query heads): query head h reads key/value head h / kv_group.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "dattn/tensor.hpp"

namespace dattn::reference {

double load(const TensorView& t, std::int64_t b, std::int64_t n, std::int64_t h, std::int64_t d);
void store(const TensorView& t, std::int64_t b, std::int64_t n, std::int64_t h, std::int64_t d, double x);
double log_sum_exp(const std::vector<double>& x);

// Positions p are positions of the attended sequence; under an index map (Hilbert order) that
// sequence is the tensors' rows in map order and original(p) the tensors' row.
struct Problem {
  std::int64_t B, N, H, D;
  double scale;
  bool causal;
  const std::optional<TensorView>& key_padding_mask;
  double dropout_p;
  std::uint64_t dropout_seed, dropout_offset;
  const std::int64_t* order;  // position -> original row, or null for the identity
  std::int64_t kv_group = 1;      // query heads per key/value head: head h reads k, v head h / kv_group
  std::int64_t batch_base = 0;    // the dropout counter's b of batch row 0 (a varlen sequence's index)

  std::int64_t kv_head(std::int64_t h) const { return h / kv_group; }

  std::int64_t original(std::int64_t p) const { return order ? order[p] : p; }
  bool padded(std::int64_t b, std::int64_t p) const;
  // Causality and key padding, in original positions.
  bool visible(std::int64_t b, std::int64_t query, std::int64_t key) const {
    return !padded(b, key) && (!causal || original(key) <= original(query));
  }
  // 0 if the probability of (query, key) is dropped, 1/(1-p) if kept, 1 without dropout.
  double dropout_factor(std::int64_t b, std::int64_t h, std::int64_t query, std::int64_t key) const;
  double score(const TensorView& q, const TensorView& k, std::int64_t b, std::int64_t h, std::int64_t query,
               std::int64_t key) const;
};

// The keys (positions) query p of head h in batch b attends to; a key may appear more than once.
using KeySets = std::function<std::vector<std::int64_t>(std::int64_t b, std::int64_t h, std::int64_t p)>;

// out = output_scale · softmax over the multiset, lse of the undropped softmax; 0 and -inf for an
// empty set.
void multiset_forward(const Problem& P, const KeySets& keys, double output_scale, const TensorView& q,
                      const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse);
void multiset_backward(const Problem& P, const KeySets& keys, double output_scale, const TensorView& q,
                       const TensorView& k, const TensorView& v, const TensorView& dout, const TensorView& dq,
                       const TensorView& dk, const TensorView& dv);

}  // namespace dattn::reference
