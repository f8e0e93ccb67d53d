// The Hilbert curve generator: the normative orders of shared/hilbert_orders.json, bijection on
// every grid up to 64×64, the classic curve on power-of-two squares, unit steps.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "harness.hpp"

namespace dattn_test {
namespace {

// Parsed with a JSON library, not a regex: libstdc++'s regex recurses once per character and
// overflows the stack (under ASan) on the 4096-entry lists.
TEST(HilbertTest, ReproducesEveryNormativeOrder) {
  std::ifstream file(DATTN_SHARED_DIR "/hilbert_orders.json");
  if (!file) GTEST_SKIP() << "shared/hilbert_orders.json not found beside the repository (" DATTN_SHARED_DIR ")";
  const nlohmann::json orders = nlohmann::json::parse(file);
  ASSERT_TRUE(orders.contains("grids") && orders.contains("sequences"));
  int checked = 0;
  for (const auto& [key, expected] : orders["grids"].items()) {
    const std::size_t x = key.find('x');
    ASSERT_NE(x, std::string::npos) << key;
    const std::int64_t h = std::stoll(key.substr(0, x)), w = std::stoll(key.substr(x + 1));
    EXPECT_EQ(dattn::hilbert_grid_order(h, w), expected.get<std::vector<std::int64_t>>()) << key;
    ++checked;
  }
  for (const auto& [key, expected] : orders["sequences"].items()) {
    EXPECT_EQ(dattn::hilbert_sequence_order(std::stoll(key)), expected.get<std::vector<std::int64_t>>()) << "N = " << key;
    ++checked;
  }
  EXPECT_GT(checked, 250);
}

TEST(HilbertTest, BijectionWithNeighbourStepsOnEveryGridUpTo64) {
  for (std::int64_t h = 1; h <= 64; ++h)
    for (std::int64_t w = 1; w <= 64; ++w) {
      const auto order = dattn::hilbert_grid_order(h, w);
      ASSERT_EQ(std::int64_t(order.size()), h * w);
      std::vector<bool> seen(std::size_t(h * w), false);
      std::int64_t diagonal = 0;
      for (std::size_t i = 0; i < order.size(); ++i) {
        ASSERT_TRUE(order[i] >= 0 && order[i] < h * w && !seen[std::size_t(order[i])]) << h << "x" << w;
        seen[std::size_t(order[i])] = true;
        if (i == 0) continue;
        const std::int64_t dr = std::llabs(order[i] / w - order[i - 1] / w), dc = std::llabs(order[i] % w - order[i - 1] % w);
        ASSERT_LE(std::max(dr, dc), 1) << h << "x" << w << " jumps at step " << i;
        diagonal += dr + dc == 2;
      }
      EXPECT_EQ(order[0], 0);
      EXPECT_LE(diagonal, h * w / 4 + 1) << h << "x" << w;
    }
}

// The classic Hilbert curve, index -> (x, y), by the usual rotate-and-flip construction.
std::pair<std::int64_t, std::int64_t> classic(std::int64_t n, std::int64_t d) {
  std::int64_t x = 0, y = 0;
  for (std::int64_t s = 1; s < n; s *= 2) {
    const std::int64_t rx = 1 & (d / 2), ry = 1 & (d ^ rx);
    if (ry == 0) {
      if (rx == 1) x = s - 1 - x, y = s - 1 - y;
      std::swap(x, y);
    }
    x += s * rx;
    y += s * ry;
    d /= 4;
  }
  return {x, y};
}

TEST(HilbertTest, ClassicCurveOnPowerOfTwoSquares) {
  for (std::int64_t n : {1, 2, 4, 8, 16, 32, 64}) {
    const auto order = dattn::hilbert_grid_order(n, n);
    // The classic curve from the origin, in one of its two orientations (mirror images in x = y).
    bool as_xy = true, as_yx = true;
    for (std::int64_t d = 0; d < n * n; ++d) {
      const auto [x, y] = classic(n, d);
      as_xy = as_xy && order[std::size_t(d)] == y * n + x;
      as_yx = as_yx && order[std::size_t(d)] == x * n + y;
    }
    EXPECT_TRUE(as_xy || as_yx) << n << "x" << n;
  }
}

TEST(HilbertTest, IdentityOrderEqualsPlainDilatedAttentionExactly) {
  Rng rng(11);
  const std::vector<std::int64_t> shape{2, 45, 3, 16};
  Buffer q = contiguous(shape, DType::float32), k = contiguous(shape, DType::float32), v = contiguous(shape, DType::float32);
  for (const Buffer* b : {&q, &k, &v}) fill_normal(b->view(), rng);
  dattn::DilatedConfig config;
  config.segment_lengths = {8, 32};
  config.dilation_rates = {1, 4};
  config.causal = true;
  Tensor identity = Tensor::empty({45}, DType::int64);
  for (std::int64_t i = 0; i < 45; ++i) identity.data<std::int64_t>()[i] = i;
  Tensor out = Tensor::empty(shape, DType::float32), lse = Tensor::empty({2, 3, 45}, DType::float32);
  Tensor out_map = Tensor::empty(shape, DType::float32), lse_map = Tensor::empty({2, 3, 45}, DType::float32);
  dattn::forward(config, q.view(), k.view(), v.view(), out, lse);
  dattn::forward(config, q.view(), k.view(), v.view(), out_map, lse_map, {.position_index = identity.view()});
  EXPECT_EQ(std::memcmp(out.data<float>(), out_map.data<float>(), out.nbytes()), 0);
  EXPECT_EQ(std::memcmp(lse.data<float>(), lse_map.data<float>(), lse.nbytes()), 0);
}

}  // namespace
}  // namespace dattn_test
