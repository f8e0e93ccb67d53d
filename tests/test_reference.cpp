// The float64 reference's gradients against central finite differences of its forward, with
// loss = sum(out * G) for a random G.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "cases.hpp"
#include "dattn/hilbert.hpp"

namespace dattn_test {
namespace {

using dattn::Mode;

double loss(const Problem64& p, const Case& c) {
  const Tensor out = Tensor::empty({c.B, c.N, c.H, c.D}, DType::float64);
  const Tensor lse = Tensor::empty({c.B, c.H, c.N}, DType::float32);
  dattn::forward(p.config, p.q, p.k, p.v, out, lse, p.options);
  return std::inner_product(out.data<double>(), out.data<double>() + out.numel(), p.g.data<double>(), 0.0);
}

void check_gradients(const Case& c) {
  SCOPED_TRACE(describe(c));
  Problem64 p = make_problem64(c);
  const std::vector<std::int64_t> shape{c.B, c.N, c.H, c.D}, kv_shape{c.B, c.N, c.Hkv(), c.D};
  const Tensor out = Tensor::empty(shape, DType::float64), lse = Tensor::empty({c.B, c.H, c.N}, DType::float32);
  dattn::forward(p.config, p.q, p.k, p.v, out, lse, p.options);
  const Tensor dq = Tensor::empty(shape, DType::float64), dk = Tensor::empty(kv_shape, DType::float64),
               dv = Tensor::empty(kv_shape, DType::float64);
  dattn::backward(p.config, p.q, p.k, p.v, out, lse, p.g, dq, dk, dv, p.options);

  const double eps = 1e-5;
  const std::pair<const Tensor*, const Tensor*> pairs[] = {{&p.q, &dq}, {&p.k, &dk}, {&p.v, &dv}};
  const char* names[] = {"dq", "dk", "dv"};
  for (int t = 0; t < 3; ++t) {
    const Tensor numeric = Tensor::empty(t == 0 ? shape : kv_shape, DType::float64);
    double* x = pairs[t].first->data<double>();
    for (std::int64_t i = 0; i < numeric.numel(); ++i) {
      const double saved = x[i];
      x[i] = saved + eps;
      const double plus = loss(p, c);
      x[i] = saved - eps;
      const double minus = loss(p, c);
      x[i] = saved;
      numeric.data<double>()[i] = (plus - minus) / (2 * eps);
    }
    // Relative L2 error, with a floor (RMS 1e-3, where gradients of N(0, 1) inputs are O(1)) so a
    // gradient that is 0 mathematically is held to an absolute RMS of 1e-9, above the central
    // difference's own round-off (~1e-16 |loss| / eps).
    double diff2 = 0, ref2 = 0;
    for (std::int64_t i = 0; i < numeric.numel(); ++i) {
      const double a = pairs[t].second->data<double>()[i], n = numeric.data<double>()[i];
      diff2 += (a - n) * (a - n);
      ref2 += n * n;
    }
    const double floor = 1e-3 * std::sqrt(double(numeric.numel()));
    EXPECT_LE(std::sqrt(diff2) / std::max(std::sqrt(ref2), floor), 1e-6)
        << names[t] << ": ||analytic - numeric|| = " << std::sqrt(diff2) << ", ||numeric|| = " << std::sqrt(ref2);
  }
}

Case base_case(Mode mode) {
  Case c;
  c.seed = 7;
  c.B = 2, c.N = 11, c.H = 3, c.D = 3;
  c.w = {4, 8}, c.r = {1, 2};
  c.mode = mode;
  return c;
}

class ReferenceGradients : public ::testing::TestWithParam<Mode> {};

TEST_P(ReferenceGradients, PartialSegments) { check_gradients(base_case(GetParam())); }

TEST_P(ReferenceGradients, Causal) {
  Case c = base_case(GetParam());
  c.causal = true;
  check_gradients(c);
}

TEST_P(ReferenceGradients, KeyPaddingWithEmptyRows) {
  Case c = base_case(GetParam());
  c.causal = true;
  c.padding = {1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0,   // causal rows 0 and 1 see nothing
               1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};  // batch 1 fully padded
  check_gradients(c);
}

TEST_P(ReferenceGradients, FewerHeadsThanBranches) {
  Case c = base_case(GetParam());
  c.H = GetParam() == Mode::grouped ? 1 : 2;
  c.w = {3, 5, 7}, c.r = {1, 2, 3};
  check_gradients(c);
}

TEST_P(ReferenceGradients, SegmentsLongerThanNAndRateEqualsSegment) {
  Case c = base_case(GetParam());
  c.N = 13, c.w = {5, 20, 6}, c.r = {5, 3, 1};
  c.scale = 0.7;
  check_gradients(c);
}

TEST_P(ReferenceGradients, DropoutWithFixedSeed) {
  Case c = base_case(GetParam());
  c.dropout_p = 0.3, c.dropout_seed = 0x123456789abcdefull, c.dropout_offset = 5;
  check_gradients(c);
  c.causal = true;
  check_gradients(c);
}

TEST_P(ReferenceGradients, PositionIndexOrder) {
  Case c = base_case(GetParam());
  c.N = 10, c.causal = true, c.order = dattn::hilbert_sequence_order(10);
  check_gradients(c);
  c.order = {3, 7, 0, 9, 1, 4, 8, 2, 6, 5};
  c.dropout_p = 0.2, c.dropout_seed = 99;
  check_gradients(c);
}

// Grouped-query heads: dk, dv of a key/value head sum over the query heads that read it.
TEST_P(ReferenceGradients, GroupedQueryHeads) {
  for (const std::int64_t kv_heads : {1, 2}) {
    Case c = base_case(GetParam());
    c.H = 4, c.kv_heads = kv_heads, c.causal = kv_heads == 2;
    c.dropout_p = 0.2, c.dropout_seed = 11;
    check_gradients(c);
  }
}

TEST_P(ReferenceGradients, RandomSmallConfigs) {
  Rng rng(GetParam() == Mode::grouped ? 2024 : 2025);
  CaseLimits limits;
  limits.max_n = 14, limits.max_h = 3, limits.max_d = 5;
  for (int i = 0; i < 12; ++i) {
    Case c = random_case(rng, limits);
    c.mode = GetParam();
    check_gradients(c);
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, ReferenceGradients, ::testing::Values(Mode::grouped, Mode::longnet),
                         [](const auto& info) { return std::string(info.param == Mode::grouped ? "grouped" : "longnet"); });

}  // namespace
}  // namespace dattn_test
