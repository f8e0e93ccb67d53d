// The checks themselves: each must reject what it is meant to reject.
#include <cmath>
#include <limits>

#include "fused_runner.hpp"

namespace dattn_test {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN(), kInf = std::numeric_limits<double>::infinity();

Tensor filled(std::vector<double> values) {
  Tensor t = Tensor::empty({std::int64_t(values.size())}, DType::float64);
  std::copy(values.begin(), values.end(), t.data<double>());
  return t;
}

TEST(Harness, RelativeL2) {
  const Tensor ref = filled({1, -2, 3}), near = filled({1, -2, 3 + 1e-6}), far = filled({1, -2, 3.01});
  EXPECT_TRUE(close_rel_l2("x", near, ref, 1e-5));
  EXPECT_FALSE(close_rel_l2("x", far, ref, 1e-5));
  EXPECT_FALSE(close_rel_l2("x", filled({1, kNaN, 3}), ref, 1e9));
  EXPECT_FALSE(close_rel_l2("x", filled({1, kInf, 3}), ref, 1e9));
  EXPECT_TRUE(close_rel_l2("x", filled({0, 0, 0}), filled({0, 0, 0}), 1e-5));
  EXPECT_FALSE(close_rel_l2("x", filled({0, 1e-30, 0}), filled({0, 0, 0}), 1e-5));  // exactly 0 required
  EXPECT_TRUE(close_rel_l2("x", filled({0, 1e-7, 0}), filled({0, 1e-17, 0}), 1e-5));  // round-off zero
  EXPECT_FALSE(close_rel_l2("x", filled({0, 1e-3, 0}), filled({0, 1e-17, 0}), 1e-5));
}

TEST(Harness, Lse) {
  const Tensor ref = filled({-kInf, 2.0, -300.0});
  EXPECT_TRUE(lse_close(ref, ref, 0));
  EXPECT_TRUE(lse_close(filled({-kInf, 2.0 + 1e-5, -300.0 + 1e-3}), ref, 1e-5));
  EXPECT_FALSE(lse_close(filled({-kInf, 2.0 + 3e-5, -300.0}), ref, 1e-5));
  EXPECT_FALSE(lse_close(filled({-1e30, 2.0, -300.0}), ref, 1e-5));  // must be -inf exactly
  EXPECT_FALSE(lse_close(filled({-kInf, -kInf, -300.0}), ref, 1e-5));
  EXPECT_FALSE(lse_close(filled({-kInf, kNaN, -300.0}), ref, 1e-5));
}

TEST(Harness, WritesOutsideViewsAreSeen) {
  Rng rng(1);
  for (int i = 0; i < 20; ++i) {
    const Buffer b = random_strided({2, 3, 4, 5}, DType::bfloat16, rng);
    poison(b);
    const auto before = snapshot(b);
    fill_normal(b.view(), rng);
    EXPECT_EQ(changed_outside_views(b, before), "");
    const std::int64_t elements = b.mem->numel();
    const std::int64_t base = (static_cast<char*>(b.view().data) - static_cast<char*>(b.mem->view().data)) / 2;
    if (elements > b.view().numel()) {  // padded: some element is outside the view
      std::vector<char> inside(std::size_t(elements), 0);
      for_each_offset(b.view(), [&](std::int64_t o) { inside[std::size_t(base + o)] = 1; });
      for (std::int64_t e = 0; e < elements; ++e)
        if (!inside[std::size_t(e)]) {
          b.mem->data<std::uint16_t>()[e] = 0;
          break;
        }
      EXPECT_NE(changed_outside_views(b, before), "");
    }
  }
}

TEST(Harness, FusedQkvViewsDoNotOverlap) {
  Rng rng(2);
  const Buffer b = fused_qkv(2, 5, 3, 7, DType::float32, rng);
  poison(b);
  for (const TensorView& v : b.views) fill_normal(v, rng);
  std::int64_t nan = 0;
  for (std::int64_t e = 0; e < b.mem->numel(); ++e) nan += std::isnan(b.mem->data<float>()[e]);
  EXPECT_EQ(b.mem->numel() - nan, 3 * 2 * 5 * 3 * 7);
}

TEST(Harness, CasesAreDescribedCompletely) {
  Rng rng(3);
  const Case c = random_case(rng);
  const std::string d = describe(c);
  for (const char* field : {"seed=", "B=", "N=", "H=", "D=", "kv_heads=", "w={", "r={", "mode=", "causal=", "scale=", "dropout_p=",
                            "dropout_seed=", "dropout_offset=", "fused_qkv=", "fused_dqkv=", "strided=", "padding="})
    EXPECT_NE(d.find(field), std::string::npos) << field;
}

}  // namespace
}  // namespace dattn_test
