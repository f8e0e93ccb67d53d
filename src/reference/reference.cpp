// Dilated attention written for reading, not speed: double precision, one query row at a time,
// straight from docs/semantics.md. The forward computes each branch's softmax and combines them as the
// mode says (grouped: 1/G, longnet: the LSE merge); the backward uses the equivalent single
// softmax over a multiset of keys (a key once per branch that selects it with the query).
#include "reference/reference.hpp"

#include <cmath>
#include <limits>
#include <vector>

#include "reference/softmax.hpp"

namespace dattn::reference {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

struct Dilated {
  const DilatedConfig& config;
  Problem P;
  int G;

  Dilated(const DilatedConfig& c, const TensorView& q, const TensorView& k, const std::int64_t* order,
          std::int64_t dropout_batch_base)
      : config(c),
        P{q.shape[0], q.shape[1], q.shape[2], q.shape[3], c.scale.value_or(1.0 / std::sqrt(double(q.shape[3]))),
          c.causal, c.key_padding_mask, c.dropout_p, c.dropout_seed, c.dropout_offset, order,
          q.shape[2] / k.shape[2], dropout_batch_base},
        G(int(c.segment_lengths.size())) {}

  // Grouped: head h belongs to the one group i whose contiguous head range holds it.
  int group_of_head(std::int64_t h) const {
    std::int64_t first = 0;
    for (int i = 0; i < G; ++i) {
      const std::int64_t count = P.H / G + (i < P.H % G ? 1 : 0);
      if (h < first + count) return i;
      first += count;
    }
    return -1;
  }

  std::vector<int> branches_of_head(std::int64_t h) const {
    if (config.mode == Mode::grouped) return {group_of_head(h)};
    std::vector<int> all;
    for (int i = 0; i < G; ++i) all.push_back(i);
    return all;
  }

  // The positions branch i selects, for head h, in the segment that holds position p
  // (empty if the branch does not select p).
  std::vector<std::int64_t> selected_with(int i, std::int64_t h, std::int64_t p) const {
    const std::int64_t w = config.segment_lengths[i], r = config.dilation_rates[i];
    const std::int64_t offset = config.mode == Mode::grouped ? i % r : h % r;
    const std::int64_t start = p / w * w, end = std::min(start + w, P.N);
    std::vector<std::int64_t> positions;
    if ((p - start) % r != offset) return positions;
    for (std::int64_t x = start + offset; x < end; x += r) positions.push_back(x);
    return positions;
  }

  // Keys query p of head h attends to in branch i: selected in p's segment, visible.
  std::vector<std::int64_t> keys(int i, std::int64_t b, std::int64_t h, std::int64_t p) const {
    std::vector<std::int64_t> result;
    for (std::int64_t key : selected_with(i, h, p))
      if (P.visible(b, p, key)) result.push_back(key);
    return result;
  }

  std::vector<std::int64_t> all_keys(std::int64_t b, std::int64_t h, std::int64_t p) const {
    std::vector<std::int64_t> result;
    for (int i : branches_of_head(h))
      for (std::int64_t key : keys(i, b, h, p)) result.push_back(key);
    return result;
  }

  double output_scale() const { return config.mode == Mode::grouped ? 1.0 / G : 1.0; }
};

}  // namespace

void forward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
             const TensorView& v, const TensorView& out, const TensorView& lse,
             const std::int64_t* position_index, std::int64_t dropout_batch_base) {
  const Dilated A(config, q, k, position_index, dropout_batch_base);
  const Problem& P = A.P;
  for (std::int64_t b = 0; b < P.B; ++b)
    for (std::int64_t h = 0; h < P.H; ++h)
      for (std::int64_t p = 0; p < P.N; ++p) {
        // Each branch's softmax attention at p, then the mode's combination.
        double merged_lse = kNegInf;
        std::vector<double> merged(P.D, 0.0);
        for (int i : A.branches_of_head(h)) {
          if (A.selected_with(i, h, p).empty()) continue;
          const std::vector<std::int64_t> keys = A.keys(i, b, h, p);
          std::vector<double> scores;
          for (std::int64_t key : keys) scores.push_back(P.score(q, k, b, h, p, key));
          const double branch_lse = log_sum_exp(scores);
          if (branch_lse == kNegInf) continue;  // nothing to attend to: contributes nothing
          std::vector<double> branch_out(P.D, 0.0);
          for (std::size_t j = 0; j < keys.size(); ++j) {
            const double prob = std::exp(scores[j] - branch_lse) * P.dropout_factor(b, h, p, keys[j]);
            for (std::int64_t d = 0; d < P.D; ++d) branch_out[d] += prob * load(v, b, P.original(keys[j]), P.kv_head(h), d);
          }
          if (config.mode == Mode::grouped) {
            merged_lse = branch_lse;
            for (std::int64_t d = 0; d < P.D; ++d) merged[d] = branch_out[d] / A.G;
          } else {
            const double new_lse = std::max(merged_lse, branch_lse) +
                                   std::log1p(std::exp(-std::fabs(merged_lse - branch_lse)));
            const double old_weight = merged_lse == kNegInf ? 0.0 : std::exp(merged_lse - new_lse);
            const double new_weight = std::exp(branch_lse - new_lse);
            for (std::int64_t d = 0; d < P.D; ++d)
              merged[d] = merged[d] * old_weight + branch_out[d] * new_weight;
            merged_lse = new_lse;
          }
        }
        const std::int64_t row = P.original(p);
        for (std::int64_t d = 0; d < P.D; ++d) store(out, b, row, h, d, merged[d]);
        lse.ptr<float>()[b * lse.strides[0] + h * lse.strides[1] + row * lse.strides[2]] = float(merged_lse);
      }
}

void backward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
              const TensorView& v, const TensorView& dout, const TensorView& dq,
              const TensorView& dk, const TensorView& dv, const std::int64_t* position_index,
              std::int64_t dropout_batch_base) {
  const Dilated A(config, q, k, position_index, dropout_batch_base);
  multiset_backward(
      A.P, [&](std::int64_t b, std::int64_t h, std::int64_t p) { return A.all_keys(b, h, p); }, A.output_scale(), q, k,
      v, dout, dq, dk, dv);
}

}  // namespace dattn::reference
