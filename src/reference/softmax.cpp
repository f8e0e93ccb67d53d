#include "reference/softmax.hpp"

#include <cmath>
#include <limits>

#include "dattn/philox.hpp"

namespace dattn::reference {
namespace {
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
}

double load(const TensorView& t, std::int64_t b, std::int64_t n, std::int64_t h, std::int64_t d) {
  const std::int64_t i = b * t.strides[0] + n * t.strides[1] + h * t.strides[2] + d * t.strides[3];
  switch (t.dtype) {
    case DType::float32: return t.ptr<float>()[i];
    case DType::float64: return t.ptr<double>()[i];
    case DType::bfloat16: return bfloat16_to_float(t.ptr<std::uint16_t>()[i]);
    case DType::float16: return float16_to_float(t.ptr<std::uint16_t>()[i]);
    case DType::boolean:
    case DType::int64:
    case DType::int32: break;
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
    case DType::int64:
    case DType::int32: break;
  }
}

double log_sum_exp(const std::vector<double>& x) {
  // A NaN score makes the row's softmax NaN (std::max would skip it, and an all-NaN row would
  // pass for one that attends to nothing).
  double m = kNegInf;
  for (double s : x) {
    if (std::isnan(s)) return s;
    m = std::max(m, s);
  }
  if (m == kNegInf) return kNegInf;
  double sum = 0;
  for (double s : x) sum += std::exp(s - m);
  return m + std::log(sum);
}

bool Problem::padded(std::int64_t b, std::int64_t p) const {
  if (!key_padding_mask) return false;
  const TensorView& m = *key_padding_mask;
  return m.ptr<std::uint8_t>()[b * m.strides[0] + original(p) * m.strides[1]] != 0;
}

double Problem::dropout_factor(std::int64_t b, std::int64_t h, std::int64_t query, std::int64_t key) const {
  if (dropout_p == 0.0) return 1.0;
  const bool keep = dropout_keep(dropout_seed, dropout_offset, (batch_base + b) * H + h, original(query), original(key),
                                 dropout_threshold(dropout_p));
  return keep ? 1.0 / (1.0 - dropout_p) : 0.0;
}

double Problem::score(const TensorView& q, const TensorView& k, std::int64_t b, std::int64_t h, std::int64_t query,
                      std::int64_t key) const {
  double dot = 0;
  for (std::int64_t d = 0; d < D; ++d) dot += load(q, b, original(query), h, d) * load(k, b, original(key), kv_head(h), d);
  return scale * dot;
}

void multiset_forward(const Problem& P, const KeySets& keys_of, double output_scale, const TensorView& q,
                      const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse) {
  for (std::int64_t b = 0; b < P.B; ++b)
    for (std::int64_t h = 0; h < P.H; ++h)
      for (std::int64_t p = 0; p < P.N; ++p) {
        const std::vector<std::int64_t> keys = keys_of(b, h, p);
        std::vector<double> scores;
        for (std::int64_t key : keys) scores.push_back(P.score(q, k, b, h, p, key));
        const double row_lse = log_sum_exp(scores);
        std::vector<double> row(P.D, 0.0);
        for (std::size_t j = 0; row_lse != kNegInf && j < keys.size(); ++j) {
          const double prob = std::exp(scores[j] - row_lse) * P.dropout_factor(b, h, p, keys[j]);
          for (std::int64_t d = 0; d < P.D; ++d) row[d] += prob * load(v, b, P.original(keys[j]), P.kv_head(h), d);
        }
        const std::int64_t at = P.original(p);
        for (std::int64_t d = 0; d < P.D; ++d) store(out, b, at, h, d, output_scale * row[d]);
        lse.ptr<float>()[b * lse.strides[0] + h * lse.strides[1] + at * lse.strides[2]] = float(row_lse);
      }
}

void multiset_backward(const Problem& P, const KeySets& keys_of, double output_scale, const TensorView& q,
                       const TensorView& k, const TensorView& v, const TensorView& dout, const TensorView& dq,
                       const TensorView& dk, const TensorView& dv) {
  for (std::int64_t b = 0; b < P.B; ++b)
    for (std::int64_t g = 0; g < P.H / P.kv_group; ++g) {
      // Indexed by position in the attended sequence; stored at original rows at the end. dk, dv of
      // key/value head g sum over the query heads that read it.
      std::vector<double> grad_k(P.N * P.D, 0.0), grad_v(P.N * P.D, 0.0);
      for (std::int64_t h = g * P.kv_group; h < (g + 1) * P.kv_group; ++h) {
        std::vector<double> grad_q(P.N * P.D, 0.0);
        for (std::int64_t p = 0; p < P.N; ++p) {
          const std::vector<std::int64_t> keys = keys_of(b, h, p);
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
            const double factor = P.dropout_factor(b, h, p, keys[j]);
            prob[j] = std::exp(scores[j] - row_lse);
            double dot = 0;
            for (std::int64_t d = 0; d < P.D; ++d) dot += grad_out[d] * load(v, b, P.original(keys[j]), g, d);
            grad_prob[j] = factor * dot;
            delta += prob[j] * grad_prob[j];
            for (std::int64_t d = 0; d < P.D; ++d) grad_v[keys[j] * P.D + d] += prob[j] * factor * grad_out[d];
          }
          for (std::size_t j = 0; j < keys.size(); ++j) {
            const double grad_score = prob[j] * (grad_prob[j] - delta) * P.scale;
            for (std::int64_t d = 0; d < P.D; ++d) {
              grad_q[p * P.D + d] += grad_score * load(k, b, P.original(keys[j]), g, d);
              grad_k[keys[j] * P.D + d] += grad_score * load(q, b, P.original(p), h, d);
            }
          }
        }
        for (std::int64_t n = 0; n < P.N; ++n)
          for (std::int64_t d = 0; d < P.D; ++d) store(dq, b, P.original(n), h, d, grad_q[n * P.D + d]);
      }
      for (std::int64_t n = 0; n < P.N; ++n)
        for (std::int64_t d = 0; d < P.D; ++d) {
          store(dk, b, P.original(n), g, d, grad_k[n * P.D + d]);
          store(dv, b, P.original(n), g, d, grad_v[n * P.D + d]);
        }
    }
}

}  // namespace dattn::reference
