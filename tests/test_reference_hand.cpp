// The float64 reference against attention written out by hand from SPEC.md.
#include <cmath>
#include <limits>

#include "cases.hpp"

namespace dattn_test {
namespace {

using dattn::Mode;
constexpr double kInf = std::numeric_limits<double>::infinity();

struct Row {
  std::vector<double> out;
  double lse = -kInf;
};

// softmax(scale q.k) v over a multiset of keys; keep(j) is the dropout factor of key j.
template <class Keep>
Row attend(const Problem64& p, std::int64_t b, std::int64_t h, std::int64_t i, const std::vector<std::int64_t>& keys,
           Keep keep) {
  const std::int64_t D = p.q.view().shape[3];
  const double scale = p.config.scale.value_or(1 / std::sqrt(double(D)));
  Row row{std::vector<double>(std::size_t(D), 0.0), -kInf};
  if (keys.empty()) return row;
  std::vector<double> s;
  double m = -kInf, sum = 0;
  for (std::int64_t j : keys) {
    double dot = 0;
    for (std::int64_t d = 0; d < D; ++d) dot += at(p.q, b, i, h, d) * at(p.k, b, j, h, d);
    s.push_back(scale * dot);
    m = std::max(m, s.back());
  }
  for (double x : s) sum += std::exp(x - m);
  row.lse = m + std::log(sum);
  for (std::size_t n = 0; n < keys.size(); ++n)
    for (std::int64_t d = 0; d < D; ++d)
      row.out[std::size_t(d)] += std::exp(s[n] - row.lse) * keep(keys[n]) * at(p.v, b, keys[n], h, d);
  return row;
}
Row attend(const Problem64& p, std::int64_t b, std::int64_t h, std::int64_t i, const std::vector<std::int64_t>& keys) {
  return attend(p, b, h, i, keys, [](std::int64_t) { return 1.0; });
}

struct Result {
  Tensor out, lse;
};

Result run_reference(const Problem64& p, const Case& c) {
  Result r{Tensor::empty({c.B, c.N, c.H, c.D}, DType::float64), Tensor::empty({c.B, c.H, c.N}, DType::float32)};
  dattn::forward(p.config, p.q, p.k, p.v, r.out, r.lse, p.options);
  return r;
}

void expect_row(const Result& r, std::int64_t b, std::int64_t h, std::int64_t i, const Row& want, double out_scale = 1) {
  for (std::size_t d = 0; d < want.out.size(); ++d)
    EXPECT_NEAR(at(r.out, b, i, h, std::int64_t(d)), want.out[d] * out_scale, 1e-12) << b << ' ' << h << ' ' << i << ' ' << d;
  const double lse = at(r.lse, b, h, i);
  if (want.lse == -kInf) {
    EXPECT_EQ(lse, -kInf) << b << ' ' << h << ' ' << i;
  } else {
    EXPECT_NEAR(lse, want.lse, 1e-6 * std::max(1.0, std::fabs(want.lse))) << b << ' ' << h << ' ' << i;
  }
}

std::vector<std::int64_t> range(std::int64_t begin, std::int64_t end, std::int64_t step = 1) {
  std::vector<std::int64_t> x;
  for (std::int64_t i = begin; i < end; i += step) x.push_back(i);
  return x;
}

TEST(ReferenceByHand, OneSegmentRateOneIsSoftmaxAttention) {
  for (Mode mode : {Mode::grouped, Mode::longnet})
    for (bool causal : {false, true})
      for (std::int64_t w : {9, 14}) {
        Case c;
        c.seed = 3, c.B = 2, c.N = 9, c.H = 2, c.D = 5, c.w = {w}, c.r = {1}, c.mode = mode, c.causal = causal;
        const Problem64 p = make_problem64(c);
        const Result r = run_reference(p, c);
        for (std::int64_t b = 0; b < c.B; ++b)
          for (std::int64_t h = 0; h < c.H; ++h)
            for (std::int64_t i = 0; i < c.N; ++i) expect_row(r, b, h, i, attend(p, b, h, i, range(0, causal ? i + 1 : c.N)));
      }
}

TEST(ReferenceByHand, GroupedZerosOutsideTheGroupsSelectionAndDividesByG) {
  // H = 3, G = 2: heads 0, 1 form group 0 (w 4, r 2, offset 0), head 2 group 1 (w 6, r 3, offset 1).
  Case c;
  c.seed = 4, c.B = 1, c.N = 10, c.H = 3, c.D = 4, c.w = {4, 6}, c.r = {2, 3};
  const Problem64 p = make_problem64(c);
  const Result r = run_reference(p, c);
  for (std::int64_t h = 0; h < 3; ++h) {
    const std::int64_t w = h < 2 ? 4 : 6, rate = h < 2 ? 2 : 3, offset = h < 2 ? 0 : 1;
    for (std::int64_t i = 0; i < c.N; ++i) {
      const std::int64_t start = i / w * w;
      if ((i - start) % rate != offset) {
        expect_row(r, 0, h, i, Row{std::vector<double>(4, 0.0), -kInf});
      } else {
        expect_row(r, 0, h, i, attend(p, 0, h, i, range(start + offset, std::min(start + w, c.N), rate)), 0.5);
      }
    }
  }
}

TEST(ReferenceByHand, LongnetIsOneSoftmaxOverEveryBranchsKeys) {
  // H = 2; branch 0: w 4, r 1; branch 1: w 8, r 2 with offset h mod 2. Keys repeat across branches.
  Case c;
  c.seed = 5, c.B = 1, c.N = 10, c.H = 2, c.D = 3, c.w = {4, 8}, c.r = {1, 2}, c.mode = Mode::longnet;
  const Problem64 p = make_problem64(c);
  const Result r = run_reference(p, c);
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t i = 0; i < c.N; ++i) {
      std::vector<std::int64_t> keys = range(i / 4 * 4, std::min(i / 4 * 4 + 4, c.N));
      const std::int64_t start = i / 8 * 8;
      if ((i - start) % 2 == h)
        for (std::int64_t j : range(start + h, std::min(start + 8, c.N), 2)) keys.push_back(j);
      expect_row(r, 0, h, i, attend(p, 0, h, i, keys));
    }
  // Positions no branch selects: w {6, 6}, r {3, 2}, head 0 -> branch selections {0, 3} and {0, 2, 4}.
  c.N = 6, c.H = 1, c.w = {6, 6}, c.r = {3, 2};
  const Problem64 p2 = make_problem64(c);
  const Result r2 = run_reference(p2, c);
  for (std::int64_t i = 0; i < 6; ++i) {
    std::vector<std::int64_t> keys;
    if (i % 3 == 0) keys.insert(keys.end(), {0, 3});
    if (i % 2 == 0) keys.insert(keys.end(), {0, 2, 4});
    expect_row(r2, 0, 0, i, attend(p2, 0, 0, i, keys));
  }
}

TEST(ReferenceByHand, RowsWithEveryKeyPaddedGiveZeroAndMinusInf) {
  for (Mode mode : {Mode::grouped, Mode::longnet}) {
    Case c;
    c.seed = 6, c.B = 2, c.N = 8, c.H = 2, c.D = 4, c.w = {8}, c.r = {1}, c.mode = mode, c.causal = true;
    c.padding = {1, 1, 0, 1, 0, 0, 0, 0, /* batch 1: */ 1, 1, 1, 1, 1, 1, 1, 1};
    const Problem64 p = make_problem64(c);
    const Result r = run_reference(p, c);
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t i = 0; i < c.N; ++i) {
        std::vector<std::int64_t> keys;
        for (std::int64_t j = 0; j <= i; ++j)
          if (!c.padding[std::size_t(j)]) keys.push_back(j);
        expect_row(r, 0, h, i, attend(p, 0, h, i, keys));
        expect_row(r, 1, h, i, Row{std::vector<double>(4, 0.0), -kInf});
      }
    // No gradient reaches padded keys or empty rows.
    const std::vector<std::int64_t> shape{c.B, c.N, c.H, c.D};
    const Tensor dq = Tensor::empty(shape, DType::float64), dk = Tensor::empty(shape, DType::float64),
                 dv = Tensor::empty(shape, DType::float64);
    dattn::LaunchOptions o;
    o.backend = dattn::Backend::reference;
    dattn::backward(p.config, p.q, p.k, p.v, r.out, r.lse, p.g, dq, dk, dv, o);
    for (std::int64_t b = 0; b < 2; ++b)
      for (std::int64_t i = 0; i < c.N; ++i)
        for (std::int64_t h = 0; h < 2; ++h)
          for (std::int64_t d = 0; d < c.D; ++d) {
            if (b == 1 || i < 2) {
              EXPECT_EQ(at(dq, b, i, h, d), 0.0);
            }
            if (c.padding[std::size_t(b * c.N + i)]) {
              EXPECT_EQ(at(dk, b, i, h, d), 0.0);
              EXPECT_EQ(at(dv, b, i, h, d), 0.0);
            }
          }
  }
}

TEST(ReferenceByHand, DropoutScalesKeptProbabilitiesAndLeavesLse) {
  Case c;
  c.seed = 8, c.B = 2, c.N = 12, c.H = 3, c.D = 4, c.w = {12}, c.r = {1};
  c.dropout_p = 0.4, c.dropout_seed = 0xfeedbeefcafe1234ull, c.dropout_offset = 3;
  const Problem64 p = make_problem64(c);
  const Result r = run_reference(p, c);
  const std::uint32_t threshold = dattn::dropout_threshold(c.dropout_p);
  int dropped = 0;
  for (std::int64_t b = 0; b < c.B; ++b)
    for (std::int64_t h = 0; h < c.H; ++h)
      for (std::int64_t i = 0; i < c.N; ++i) {
        const auto keep = [&](std::int64_t j) {
          const bool k = dattn::dropout_keep(c.dropout_seed, c.dropout_offset, b * c.H + h, i, j, threshold);
          dropped += !k;
          return k ? 1 / (1 - c.dropout_p) : 0.0;
        };
        expect_row(r, b, h, i, attend(p, b, h, i, range(0, c.N), keep));
      }
  EXPECT_GT(dropped, 0);
}

TEST(ReferenceByHand, PositionIndexCutsSegmentsInCurveOrderAndCausalUsesOriginalRows) {
  // order = 7, 6, ..., 0: segment 0 (w 4) holds rows 7, 6, 5, 4; offset 0 (r 2) selects rows 7, 5.
  Case c;
  c.seed = 10, c.B = 1, c.N = 8, c.H = 1, c.D = 3, c.w = {4}, c.r = {2}, c.causal = true;
  c.order = {7, 6, 5, 4, 3, 2, 1, 0};
  const Problem64 p = make_problem64(c);
  const Result r = run_reference(p, c);
  expect_row(r, 0, 0, 7, attend(p, 0, 0, 7, {7, 5}));
  expect_row(r, 0, 0, 5, attend(p, 0, 0, 5, {5}));  // row 7 comes later in the original order
  expect_row(r, 0, 0, 3, attend(p, 0, 0, 3, {3, 1}));
  expect_row(r, 0, 0, 1, attend(p, 0, 0, 1, {1}));
  for (std::int64_t i : {0, 2, 4, 6}) expect_row(r, 0, 0, i, Row{std::vector<double>(3, 0.0), -kInf});
}

TEST(ReferenceByHand, StridedLowPrecisionInputsReadTheSameValues) {
  // The reference reads any dtype and strides: a float32 fused-QKV view gives the float64 answer.
  Case c;
  c.seed = 9, c.B = 2, c.N = 10, c.H = 3, c.D = 5, c.w = {4, 6}, c.r = {2, 1}, c.mode = Mode::longnet, c.causal = true;
  Rng rng(c.seed);
  const Buffer qkv = fused_qkv(c.B, c.N, c.H, c.D, DType::float32, rng);
  for (const TensorView& t : qkv.views) fill_normal(t, rng);
  const Problem64 p = make_problem64(c);
  const dattn::LaunchOptions& o = p.options;
  const Tensor out32 = Tensor::empty({c.B, c.N, c.H, c.D}, DType::float32), lse32 = Tensor::empty({c.B, c.H, c.N}, DType::float32);
  dattn::forward(p.config, qkv.view(0), qkv.view(1), qkv.view(2), out32, lse32, o);
  const Tensor q = to_f64(qkv.view(0)), k = to_f64(qkv.view(1)), v = to_f64(qkv.view(2));
  const Tensor out64 = Tensor::empty({c.B, c.N, c.H, c.D}, DType::float64), lse64 = Tensor::empty({c.B, c.H, c.N}, DType::float32);
  dattn::forward(p.config, q, k, v, out64, lse64, o);
  EXPECT_TRUE(close_rel_l2("out", out32, out64, 1e-7));
  EXPECT_TRUE(lse_close(lse32, lse64, 0));
}

}  // namespace
}  // namespace dattn_test
