// Written for reading, not speed: double precision, one query row at a time, straight from SPEC.md.
#include "reference/reference.hpp"

#include <cmath>
#include <limits>
#include <vector>

#include "dattn/philox.hpp"

namespace dattn::reference {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

double load(const TensorView& t, std::int64_t b, std::int64_t n, std::int64_t h, std::int64_t d) {
  const std::int64_t i = b * t.strides[0] + n * t.strides[1] + h * t.strides[2] + d * t.strides[3];
  switch (t.dtype) {
    case DType::float32: return t.ptr<float>()[i];
    case DType::float64: return t.ptr<double>()[i];
    case DType::bfloat16: return bfloat16_to_float(t.ptr<std::uint16_t>()[i]);
    case DType::float16: return float16_to_float(t.ptr<std::uint16_t>()[i]);
    case DType::boolean:
    case DType::int64: break;
  }
  return 0;
}

void store(const TensorView& t, std::int64_t b, std::int64_t n, std::int64_t h, std::int64_t d, double x) {
  const std::int64_t i = b * t.strides[0] + n * t.strides[1] + h * t.strides[2] + d * t.strides[3];
  switch (t.dtype) {
    case DType::float32: t.ptr<float>()[i] = float(x); break;
    case DType::float64: t.ptr<double>()[i] = x; break;
    case DType::bfloat16: t.ptr<std::uint16_t>()[i] = float_to_bfloat16(float(x)); break;
    case DType::float16: t.ptr<std::uint16_t>()[i] = float_to_float16(float(x)); break;
    case DType::boolean:
    case DType::int64: break;
  }
}

// Positions p below are positions of the attended sequence; under a Hilbert index map the
// sequence is the tensors' rows in curve order, and original(p) is the row of the tensors.
struct Problem {
  const DilatedConfig& config;
  const std::int64_t* order;  // curve position -> original position, or null for the identity
  std::int64_t B, N, H, D;
  double scale;
  int G;

  Problem(const DilatedConfig& c, const TensorView& q, const std::int64_t* position_index)
      : config(c), order(position_index), B(q.shape[0]), N(q.shape[1]), H(q.shape[2]), D(q.shape[3]),
        scale(c.scale.value_or(1.0 / std::sqrt(double(q.shape[3])))),
        G(int(c.segment_lengths.size())) {}

  std::int64_t original(std::int64_t p) const { return order ? order[p] : p; }

  // Grouped: head h belongs to the one group i whose contiguous head range holds it.
  int group_of_head(std::int64_t h) const {
    std::int64_t first = 0;
    for (int i = 0; i < G; ++i) {
      const std::int64_t count = H / G + (i < H % G ? 1 : 0);
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
    const std::int64_t start = p / w * w, end = std::min(start + w, N);
    std::vector<std::int64_t> positions;
    if ((p - start) % r != offset) return positions;
    for (std::int64_t x = start + offset; x < end; x += r) positions.push_back(x);
    return positions;
  }

  bool padded(std::int64_t b, std::int64_t key) const {
    if (!config.key_padding_mask) return false;
    const TensorView& m = *config.key_padding_mask;
    return m.ptr<std::uint8_t>()[b * m.strides[0] + key * m.strides[1]] != 0;
  }

  // Dropout factor of one probability: 0 if dropped, 1/(1-p) if kept, 1 without dropout.
  double dropout_factor(std::int64_t b, std::int64_t h, std::int64_t query, std::int64_t key) const {
    if (config.dropout_p == 0.0) return 1.0;
    const bool keep = dropout_keep(config.dropout_seed, config.dropout_offset, b * H + h, query, key,
                                   dropout_threshold(config.dropout_p));
    return keep ? 1.0 / (1.0 - config.dropout_p) : 0.0;
  }

  // Keys that query p of head h attends to in branch i: selected, same segment, not padded, and
  // with causal, not after the query in original positions.
  std::vector<std::int64_t> keys(int i, std::int64_t b, std::int64_t h, std::int64_t p) const {
    std::vector<std::int64_t> result;
    for (std::int64_t key : selected_with(i, h, p))
      if (!padded(b, original(key)) && (!config.causal || original(key) <= original(p))) result.push_back(key);
    return result;
  }

  double score(const TensorView& q, const TensorView& k, std::int64_t b, std::int64_t h,
               std::int64_t p, std::int64_t key) const {
    double dot = 0;
    for (std::int64_t d = 0; d < D; ++d) dot += load(q, b, original(p), h, d) * load(k, b, original(key), h, d);
    return scale * dot;
  }
};

double log_sum_exp(const std::vector<double>& x) {
  double m = kNegInf;
  for (double s : x) m = std::max(m, s);
  if (m == kNegInf) return kNegInf;
  double sum = 0;
  for (double s : x) sum += std::exp(s - m);
  return m + std::log(sum);
}

}  // namespace

void forward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
             const TensorView& v, const TensorView& out, const TensorView& lse,
             const std::int64_t* position_index) {
  const Problem P(config, q, position_index);
  for (std::int64_t b = 0; b < P.B; ++b)
    for (std::int64_t h = 0; h < P.H; ++h)
      for (std::int64_t p = 0; p < P.N; ++p) {
        // Each branch's softmax attention at p, then the mode's combination.
        double merged_lse = kNegInf;
        std::vector<double> merged(P.D, 0.0);
        for (int i : P.branches_of_head(h)) {
          if (i < 0) continue;  // an empty head group (H < G) never happens for an existing head
          if (P.selected_with(i, h, p).empty()) continue;
          const std::vector<std::int64_t> keys = P.keys(i, b, h, p);
          std::vector<double> scores;
          for (std::int64_t key : keys) scores.push_back(P.score(q, k, b, h, p, key));
          const double branch_lse = log_sum_exp(scores);
          if (branch_lse == kNegInf) continue;  // nothing to attend to: contributes nothing
          std::vector<double> branch_out(P.D, 0.0);
          for (std::size_t j = 0; j < keys.size(); ++j) {
            const double prob =
                std::exp(scores[j] - branch_lse) * P.dropout_factor(b, h, P.original(p), P.original(keys[j]));
            for (std::int64_t d = 0; d < P.D; ++d) branch_out[d] += prob * load(v, b, P.original(keys[j]), h, d);
          }
          if (config.mode == Mode::grouped) {
            merged_lse = branch_lse;
            for (std::int64_t d = 0; d < P.D; ++d) merged[d] = branch_out[d] / P.G;
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
              const TensorView& dk, const TensorView& dv, const std::int64_t* position_index) {
  // Both modes are one softmax per query over a multiset of keys (a key once per branch that
  // selects it together with the query); grouped mode has one branch per head and scales by 1/G.
  const Problem P(config, q, position_index);
  const double output_scale = config.mode == Mode::grouped ? 1.0 / P.G : 1.0;
  for (std::int64_t b = 0; b < P.B; ++b)
    for (std::int64_t h = 0; h < P.H; ++h) {
      // Indexed by position in the attended sequence; stored at original rows at the end.
      std::vector<double> grad_q(P.N * P.D, 0.0), grad_k(P.N * P.D, 0.0), grad_v(P.N * P.D, 0.0);
      for (std::int64_t p = 0; p < P.N; ++p) {
        std::vector<std::int64_t> keys;
        for (int i : P.branches_of_head(h))
          if (i >= 0)
            for (std::int64_t key : P.keys(i, b, h, p)) keys.push_back(key);
        std::vector<double> scores;
        for (std::int64_t key : keys) scores.push_back(P.score(q, k, b, h, p, key));
        const double row_lse = log_sum_exp(scores);
        if (row_lse == kNegInf) continue;
        std::vector<double> grad_out(P.D);
        for (std::int64_t d = 0; d < P.D; ++d) grad_out[d] = output_scale * load(dout, b, P.original(p), h, d);
        // dP_j = Z_j (dO · v_j); dS_j = P_j (dP_j - sum_l P_l dP_l)
        std::vector<double> prob(keys.size()), grad_prob(keys.size());
        double delta = 0;
        for (std::size_t j = 0; j < keys.size(); ++j) {
          const double factor = P.dropout_factor(b, h, P.original(p), P.original(keys[j]));
          prob[j] = std::exp(scores[j] - row_lse);
          double dot = 0;
          for (std::int64_t d = 0; d < P.D; ++d) dot += grad_out[d] * load(v, b, P.original(keys[j]), h, d);
          grad_prob[j] = factor * dot;
          delta += prob[j] * grad_prob[j];
          for (std::int64_t d = 0; d < P.D; ++d) grad_v[keys[j] * P.D + d] += prob[j] * factor * grad_out[d];
        }
        for (std::size_t j = 0; j < keys.size(); ++j) {
          const double grad_score = prob[j] * (grad_prob[j] - delta) * P.scale;
          for (std::int64_t d = 0; d < P.D; ++d) {
            grad_q[p * P.D + d] += grad_score * load(k, b, P.original(keys[j]), h, d);
            grad_k[keys[j] * P.D + d] += grad_score * load(q, b, P.original(p), h, d);
          }
        }
      }
      for (std::int64_t n = 0; n < P.N; ++n)
        for (std::int64_t d = 0; d < P.D; ++d) {
          store(dq, b, P.original(n), h, d, grad_q[n * P.D + d]);
          store(dk, b, P.original(n), h, d, grad_k[n * P.D + d]);
          store(dv, b, P.original(n), h, d, grad_v[n * P.D + d]);
        }
    }
}

}  // namespace dattn::reference
