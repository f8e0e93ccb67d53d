// The one-pass backward of whole grouped-mode segments (float32, every segment selecting at least
// 64 rows): gradients against the float64 reference on random configurations with long segments,
// causal, key padding, dropout, strided (fused QKV) inputs, and Hilbert or random index maps.
#include <gtest/gtest.h>

#include <algorithm>


#include "harness.hpp"

namespace dattn_test {
namespace {

TEST(SegmentBackwardTest, MatchesReferenceOnLongSegments) {
  Rng rng(31);
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  std::uniform_real_distribution<double> uniform;
  for (int i = 0; i < 18; ++i) {
    const std::int64_t B = 1 + pick(rng) % 2, H = 2 + pick(rng) % 3, D = 8 * (1 + pick(rng) % 4);
    dattn::DilatedConfig config;
    // Segments dividing N and selecting at least 64 rows each, so the one-pass path applies.
    const std::int64_t N = i >= 15 ? 640 : std::int64_t(128) * (2 + pick(rng) % 3);
    const int G = 1 + pick(rng) % int(std::min<std::int64_t>(3, H));
    for (int g = 0; g < G; ++g) {
      const std::int64_t w = N >> (pick(rng) % 2);
      config.segment_lengths.push_back(w);
      config.dilation_rates.push_back(1 + pick(rng) % (w / 64));
    }
    config.causal = pick(rng) % 2;
    if (i >= 15) {  // one causal segment of more than one chunk of rows (kChunkRows = 256)
      config.segment_lengths = {N};
      config.dilation_rates = {1};
      config.causal = true;
    }
    config.dropout_p = pick(rng) % 3 == 0 ? 0.2 : 0.0;
    config.dropout_seed = rng();
    Tensor padding = Tensor::zeros({B, N}, DType::boolean);
    if (pick(rng) % 2) {
      for (std::int64_t e = 0; e < padding.numel(); ++e) padding.data<std::uint8_t>()[e] = uniform(rng) < 0.2;
      config.key_padding_mask = padding.view();
    }
    SCOPED_TRACE(::testing::Message() << "case " << i << ": N=" << N << " H=" << H << " D=" << D << " G=" << G
                                      << " causal=" << config.causal << " p=" << config.dropout_p);
    const std::vector<std::int64_t> shape{B, N, H, D};
    Buffer qkv = fused_qkv(B, N, H, D, DType::float32, rng);
    Buffer dout = random_strided(shape, DType::float32, rng);
    fill_normal(qkv.view(0), rng);
    fill_normal(qkv.view(1), rng);
    fill_normal(qkv.view(2), rng);
    fill_normal(dout.view(), rng);
    Buffer out = random_strided(shape, DType::float32, rng), lse = random_strided({B, H, N}, DType::float32, rng, false);
    Buffer dq = random_strided(shape, DType::float32, rng), dk = random_strided(shape, DType::float32, rng),
           dv = random_strided(shape, DType::float32, rng);
    for (const Buffer* b : {&out, &lse, &dq, &dk, &dv}) poison(*b);
    const TensorView q = qkv.view(0), k = qkv.view(1), v = qkv.view(2);
    // Every third case attends in Hilbert order, every third in a random order (index maps).
    Tensor order = Tensor::empty({N}, DType::int64);
    std::vector<std::int64_t> rows = dattn::hilbert_sequence_order(N);
    if (i % 3 == 2) std::shuffle(rows.begin(), rows.end(), rng);
    std::copy(rows.begin(), rows.end(), order.data<std::int64_t>());
    dattn::LaunchOptions options;
    if (i % 3 != 0) options.position_index = order.view();
    SCOPED_TRACE(::testing::Message() << "index map: " << (i % 3 == 0 ? "none" : i % 3 == 1 ? "Hilbert" : "random"));
    dattn::forward(config, q, k, v, out.view(), lse.view(), options);
    dattn::backward(config, q, k, v, out.view(), lse.view(), dout.view(), dq.view(), dk.view(), dv.view(), options);

    const Tensor q64 = to_f64(q), k64 = to_f64(k), v64 = to_f64(v);
    Tensor out64 = Tensor::empty(shape, DType::float64), lse64 = Tensor::empty({B, H, N}, DType::float32);
    Tensor dq64 = Tensor::empty(shape, DType::float64), dk64 = Tensor::empty(shape, DType::float64),
           dv64 = Tensor::empty(shape, DType::float64);
    dattn::forward(config, q64, k64, v64, out64, lse64, options);
    dattn::backward(config, q64, k64, v64, out64, lse64, to_f64(dout.view()), dq64, dk64, dv64, options);
    EXPECT_TRUE(close_rel_l2("out", out.view(), out64, 1e-5));
    EXPECT_TRUE(close_rel_l2("dq", dq.view(), dq64, 1e-5, ZeroReference::cancellation));
    EXPECT_TRUE(close_rel_l2("dk", dk.view(), dk64, 1e-5, ZeroReference::cancellation));
    EXPECT_TRUE(close_rel_l2("dv", dv.view(), dv64, 1e-5));
  }
}

// Grouped-query heads on the one-pass path: every query head's dk, dv go to their own rows and are
// summed per key/value head.
TEST(SegmentBackwardTest, GroupedQueryHeads) {
  Rng rng(32);
  for (const std::int64_t kv_heads : {2, 1})
    for (const bool causal : {false, true}) {
      const std::int64_t B = 2, N = 256, H = 4, D = 16;
      dattn::DilatedConfig config;
      config.segment_lengths = {256, 128}, config.dilation_rates = {1, 2}, config.causal = causal;
      SCOPED_TRACE(::testing::Message() << "Hkv=" << kv_heads << " causal=" << causal);
      const std::vector<std::int64_t> shape{B, N, H, D}, kv_shape{B, N, kv_heads, D};
      Buffer q = random_strided(shape, DType::float32, rng), k = random_strided(kv_shape, DType::float32, rng),
             v = random_strided(kv_shape, DType::float32, rng), dout = random_strided(shape, DType::float32, rng);
      for (const Buffer* b : {&q, &k, &v, &dout}) fill_normal(b->view(), rng);
      Tensor out = Tensor::empty(shape, DType::float32), lse = Tensor::empty({B, H, N}, DType::float32);
      Tensor dq = Tensor::empty(shape, DType::float32), dk = Tensor::empty(kv_shape, DType::float32),
             dv = Tensor::empty(kv_shape, DType::float32);
      dattn::forward(config, q.view(), k.view(), v.view(), out, lse);
      dattn::backward(config, q.view(), k.view(), v.view(), out, lse, dout.view(), dq, dk, dv);
      const Tensor q64 = to_f64(q.view()), k64 = to_f64(k.view()), v64 = to_f64(v.view());
      Tensor out64 = Tensor::empty(shape, DType::float64), lse64 = Tensor::empty({B, H, N}, DType::float32);
      Tensor dq64 = Tensor::empty(shape, DType::float64), dk64 = Tensor::empty(kv_shape, DType::float64),
             dv64 = Tensor::empty(kv_shape, DType::float64);
      dattn::forward(config, q64, k64, v64, out64, lse64);
      dattn::backward(config, q64, k64, v64, out64, lse64, to_f64(dout.view()), dq64, dk64, dv64);
      EXPECT_TRUE(close_rel_l2("out", out, out64, 1e-5));
      EXPECT_TRUE(close_rel_l2("dq", dq, dq64, 1e-5, ZeroReference::cancellation));
      EXPECT_TRUE(close_rel_l2("dk", dk, dk64, 1e-5, ZeroReference::cancellation));
      EXPECT_TRUE(close_rel_l2("dv", dv, dv64, 1e-5));
    }
}

}  // namespace
}  // namespace dattn_test
