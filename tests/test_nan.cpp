// A NaN in the inputs is never hidden: where the float64 reference's out, lse or gradient is
// NaN, so is the fused kernel's, for every (dtype, SIMD path). A NaN score does not pass for a
// masked one (out 0, lse -inf), the mistake a max that skips NaN makes.
#include <cmath>

#include "fused_runner.hpp"

namespace dattn_test {
namespace {

using dattn::Backend;
using dattn::LaunchOptions;
using dattn::Tensor;

enum class Poisoned { q, k, v };

bool row_has_nan(const TensorView& t, std::int64_t b, std::int64_t n, std::int64_t h) {
  for (std::int64_t d = 0; d < t.shape[3]; ++d)
    if (std::isnan(at(t, b, n, h, d))) return true;
  return false;
}

// Counts the rows the reference makes NaN and reports every row where the kernel differs:
// `exact` requires the same rows, otherwise the kernel may add NaN rows (a NaN value times a
// probability of 0 inside a tile) but may not drop one.
struct NanRows {
  int reference_rows = 0;
  std::string problems;
  void compare(const char* name, const TensorView& got, const TensorView& ref, bool exact) {
    for (std::int64_t b = 0; b < ref.shape[0]; ++b)
      for (std::int64_t n = 0; n < ref.shape[1]; ++n)
        for (std::int64_t h = 0; h < ref.shape[2]; ++h) {
          const bool want = row_has_nan(ref, b, n, h), have = row_has_nan(got, b, n, h);
          reference_rows += want;
          if (want != have && (want || exact))
            problems += std::string(name) + "[" + std::to_string(b) + ", " + std::to_string(n) + ", " +
                        std::to_string(h) + "]: " + (want ? "finite, the reference NaN\n" : "NaN, the reference finite\n");
        }
  }
};

class NanTest : public FusedTest {};

TEST_P(NanTest, PropagatesLikeTheReference) {
  Rng rng(0x4A4E0000ull + 16 * std::uint64_t(dtype()) + std::uint64_t(isa()));
  int nan_rows = 0;
  for (int i = 0; i < 60; ++i) {
    Case c = random_case(rng, CaseLimits{.max_n = 40});
    c.strided = c.fused_qkv = c.fused_dqkv = false;  // contiguous q, k, v below
    c.kv_heads = 0;                                   // with H heads each
    const auto poisoned = Poisoned(i % 3);
    const std::vector<std::int64_t> bnhd{c.B, c.N, c.H, c.D}, bhn{c.B, c.H, c.N};
    Rng draw(c.seed);
    const Tensor q = Tensor::empty(bnhd, dtype()), k = Tensor::empty(bnhd, dtype()), v = Tensor::empty(bnhd, dtype());
    for (const Tensor* t : {&q, &k, &v}) fill_normal(t->view(), draw);
    // One NaN element. A poisoned key comes without padding: a padded key's NaN score meets the
    // -inf bias inside the tile and may poison rows the reference never lets it reach.
    const std::int64_t b = std::int64_t(draw() % c.B), n = std::int64_t(draw() % c.N),
                       h = std::int64_t(draw() % c.H), d = std::int64_t(draw() % c.D);
    if (poisoned != Poisoned::q) c.padding.clear();
    const Tensor& target = poisoned == Poisoned::q ? q : poisoned == Poisoned::k ? k : v;
    store(target.view(), ((b * c.N + n) * c.H + h) * c.D + d, std::nan(""));

    std::optional<Tensor> mask;
    if (!c.padding.empty()) {
      mask = Tensor::empty({c.B, c.N}, DType::boolean);
      for (std::int64_t j = 0; j < c.B * c.N; ++j) mask->view().ptr<std::uint8_t>()[j] = c.padding[std::size_t(j)];
    }
    const dattn::DilatedConfig config = config_of(c, mask ? std::optional(mask->view()) : std::nullopt);
    LaunchOptions fused, reference;
    fused.backend = Backend::fused;
    reference.backend = Backend::reference;
    std::optional<Tensor> order;
    if (!c.order.empty()) {
      order = Tensor::empty({c.N}, DType::int64);
      std::copy(c.order.begin(), c.order.end(), order->view().ptr<std::int64_t>());
      fused.position_index = reference.position_index = order->view();
    }

    const Tensor out = Tensor::empty(bnhd, dtype()), lse = Tensor::empty(bhn, DType::float32);
    dattn::forward(config, q, k, v, out, lse, fused);
    const Tensor q64 = to_f64(q), k64 = to_f64(k), v64 = to_f64(v);
    const Tensor out64 = Tensor::empty(bnhd, DType::float64), lse64 = Tensor::empty(bhn, DType::float32);
    dattn::forward(config, q64, k64, v64, out64, lse64, reference);

    const Tensor dout = Tensor::empty(bnhd, dtype());
    fill_normal(dout.view(), draw);
    const Tensor dq = Tensor::empty(bnhd, dtype()), dk = Tensor::empty(bnhd, dtype()), dv = Tensor::empty(bnhd, dtype());
    dattn::backward(config, q, k, v, out, lse, dout, dq, dk, dv, fused);
    const Tensor dq64 = Tensor::empty(bnhd, DType::float64), dk64 = Tensor::empty(bnhd, DType::float64),
                 dv64 = Tensor::empty(bnhd, DType::float64);
    dattn::backward(config, q64, k64, v64, out64, lse64, to_f64(dout.view()), dq64, dk64, dv64, reference);

    NanRows rows;
    // A NaN in q or k reaches out through the scores alone, row by row: the same rows exactly.
    rows.compare("out", out, out64, poisoned != Poisoned::v);
    for (std::int64_t bb = 0; bb < c.B; ++bb)
      for (std::int64_t hh = 0; hh < c.H; ++hh)
        for (std::int64_t nn = 0; nn < c.N; ++nn) {
          const float got = lse.view().ptr<float>()[(bb * c.H + hh) * c.N + nn];
          const float want = lse64.view().ptr<float>()[(bb * c.H + hh) * c.N + nn];
          if (std::isnan(want) && !std::isnan(got))
            rows.problems += "lse[" + std::to_string(bb) + ", " + std::to_string(hh) + ", " + std::to_string(nn) +
                             "] = " + std::to_string(got) + ", the reference NaN\n";
        }
    nan_rows += rows.reference_rows;
    rows.compare("dq", dq, dq64, false);
    rows.compare("dk", dk, dk64, false);
    rows.compare("dv", dv, dv64, false);
    EXPECT_EQ(rows.problems, "") << describe(c) << " with a NaN in " << "qkv"[int(poisoned)] << "[" << b << ", "
                                 << n << ", " << h << ", " << d << "]";
  }
  EXPECT_GT(nan_rows, 60) << "the NaN reached too few rows of the reference to test anything";
}

DATTN_INSTANTIATE_FUSED(NanTest);

}  // namespace
}  // namespace dattn_test
