// Block-sparse attention: the fused kernels against the float64 reference on random masks of
// every density (shared and per head, empty and full rows), odd block sizes and lengths, causal,
// key padding and dropout; the CSR form, its transpose, the named patterns and the errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "harness.hpp"

namespace dattn_test {
namespace {

using dattn::BlockSparseConfig;
using dattn::BlockSparseMask;

struct SparseCase {
  std::int64_t B, N, H, D, block;
  double density;
  bool per_head, causal, padding;
  double dropout_p;
  std::int64_t kv_heads = 0;  // k, v heads (grouped-query heads); 0 means H
};

void run_case(const SparseCase& c, DType dtype, Rng& rng) {
  SCOPED_TRACE(::testing::Message() << "B=" << c.B << " N=" << c.N << " H=" << c.H << " D=" << c.D
                                    << " block=" << c.block << " density=" << c.density << " per_head=" << c.per_head
                                    << " causal=" << c.causal << " padding=" << c.padding << " p=" << c.dropout_p
                                    << " kv_heads=" << c.kv_heads
                                    << " dtype=" << dattn::dtype_name(dtype));
  const std::vector<std::int64_t> shape{c.B, c.N, c.H, c.D}, kv_shape{c.B, c.N, c.kv_heads ? c.kv_heads : c.H, c.D};
  const std::int64_t nb = (c.N + c.block - 1) / c.block;
  Tensor dense = c.per_head ? Tensor::zeros({c.H, nb, nb}, DType::boolean) : Tensor::zeros({nb, nb}, DType::boolean);
  std::uniform_real_distribution<double> uniform;
  for (std::int64_t i = 0; i < dense.numel(); ++i) dense.data<std::uint8_t>()[i] = uniform(rng) < c.density;
  const BlockSparseMask mask = BlockSparseMask::from_dense(dense);

  BlockSparseConfig config;
  config.block_size = c.block;
  config.causal = c.causal;
  config.dropout_p = c.dropout_p;
  config.dropout_seed = rng();
  Tensor padding = Tensor::zeros({c.B, c.N}, DType::boolean);
  if (c.padding) {
    for (std::int64_t i = 0; i < padding.numel(); ++i) padding.data<std::uint8_t>()[i] = uniform(rng) < 0.25;
    config.key_padding_mask = padding.view();
  }
  Buffer q = random_strided(shape, dtype, rng), k = random_strided(kv_shape, dtype, rng),
         v = random_strided(kv_shape, dtype, rng);
  Buffer dout = random_strided(shape, dtype, rng);
  for (const Buffer* b : {&q, &k, &v, &dout}) fill_normal(b->view(), rng);
  Buffer out = random_strided(shape, dtype, rng), lse = random_strided({c.B, c.H, c.N}, DType::float32, rng, false);
  Buffer dq = random_strided(shape, dtype, rng), dk = random_strided(kv_shape, dtype, rng),
         dv = random_strided(kv_shape, dtype, rng);
  for (const Buffer* b : {&out, &lse, &dq, &dk, &dv}) poison(*b);
  dattn::LaunchOptions fused{.backend = dattn::Backend::fused};
  dattn::block_sparse_forward(config, mask, q.view(), k.view(), v.view(), out.view(), lse.view(), fused);
  dattn::block_sparse_backward(config, mask, q.view(), k.view(), v.view(), out.view(), lse.view(), dout.view(),
                               dq.view(), dk.view(), dv.view(), fused);

  const Tensor q64 = to_f64(q.view()), k64 = to_f64(k.view()), v64 = to_f64(v.view()), do64 = to_f64(dout.view());
  Tensor out64 = Tensor::empty(shape, DType::float64), lse64 = Tensor::empty({c.B, c.H, c.N}, DType::float32);
  Tensor dq64 = Tensor::empty(shape, DType::float64), dk64 = Tensor::empty(kv_shape, DType::float64),
         dv64 = Tensor::empty(kv_shape, DType::float64);
  dattn::block_sparse_forward(config, mask, q64, k64, v64, out64, lse64);
  dattn::block_sparse_backward(config, mask, q64, k64, v64, out64, lse64, do64, dq64, dk64, dv64);
  const Tolerance tol = tolerance(dtype);
  EXPECT_TRUE(close_rel_l2("out", out.view(), out64, tol.rel_l2));
  EXPECT_TRUE(lse_close(lse.view(), lse64, tol.lse));
  EXPECT_TRUE(close_rel_l2("dq", dq.view(), dq64, tol.rel_l2, ZeroReference::cancellation));
  EXPECT_TRUE(close_rel_l2("dk", dk.view(), dk64, tol.rel_l2, ZeroReference::cancellation));
  EXPECT_TRUE(close_rel_l2("dv", dv.view(), dv64, tol.rel_l2));
}

class BlockSparseTest : public ::testing::TestWithParam<DType> {};

TEST_P(BlockSparseTest, MatchesReferenceOnRandomMasks) {
  Rng rng(20261125 + int(GetParam()));
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  const std::int64_t dims[] = {1, 8, 16, 33, 64, 80};
  const double densities[] = {0.0, 0.1, 0.4, 0.8, 1.0};
  for (int i = 0; i < 60; ++i) {
    SparseCase c;
    c.B = 1 + pick(rng) % 2;
    c.N = 1 + pick(rng) % 150;
    c.H = 1 + pick(rng) % 3;
    c.D = dims[pick(rng) % 6];
    c.block = 1 + pick(rng) % 70;
    c.density = densities[pick(rng) % 5];
    c.per_head = pick(rng) % 2;
    c.causal = pick(rng) % 2;
    c.padding = pick(rng) % 3 == 0;
    c.dropout_p = pick(rng) % 4 == 0 ? 0.3 : 0.0;
    run_case(c, GetParam(), rng);
  }
}

TEST_P(BlockSparseTest, GroupedQueryHeads) {  // k, v with Hkv heads; per-head masks follow the query head
  Rng rng(1616);
  for (const auto& [H, kv_heads] : {std::pair{4, 1}, std::pair{4, 2}, std::pair{6, 3}, std::pair{2, 1}})
    for (const bool per_head : {false, true}) {
      SparseCase c{2, 97, H, 16, 13, 0.5, per_head, per_head, !per_head, per_head ? 0.0 : 0.25};
      c.kv_heads = kv_heads;
      run_case(c, GetParam(), rng);
    }
}

TEST_P(BlockSparseTest, LongRowsSpanSeveralChunks) {  // rows with more keys than one 256-row chunk
  Rng rng(7);
  run_case({1, 600, 2, 32, 128, 0.7, true, true, true, 0.0}, GetParam(), rng);
  run_case({1, 530, 1, 16, 300, 1.0, false, false, false, 0.2}, GetParam(), rng);
}

INSTANTIATE_TEST_SUITE_P(All, BlockSparseTest, ::testing::Values(DType::float32, DType::bfloat16, DType::float16),
                         [](const auto& info) { return std::string(dattn::dtype_name(info.param)); });

// Ring steps (query chunk × key chunk, block-aligned) equal the whole call: forward merged by
// log-sum-exp, backward by the two sweeps of the ring backward.
TEST(BlockSparseRingStepTest, StepsMergeToTheWholeSequence) {
  Rng rng(404);
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  std::uniform_real_distribution<double> uniform;
  for (int i = 0; i < 20; ++i) {
    const std::int64_t B = 1 + pick(rng) % 2, H = 1 + pick(rng) % 3, D = 8 * (1 + pick(rng) % 3);
    const std::int64_t block = 1 + pick(rng) % 9, P = 1 + pick(rng) % 4, chunk = block * (1 + pick(rng) % 4);
    const std::int64_t N = P * chunk - (pick(rng) % 2 ? pick(rng) % block : 0);  // a partial last block sometimes
    const std::int64_t nb = (N + block - 1) / block;
    const bool per_head = pick(rng) % 2;
    Tensor dense = per_head ? Tensor::zeros({H, nb, nb}, DType::boolean) : Tensor::zeros({nb, nb}, DType::boolean);
    const double density = uniform(rng);
    for (std::int64_t e = 0; e < dense.numel(); ++e) dense.data<std::uint8_t>()[e] = uniform(rng) < density;
    const BlockSparseMask mask = BlockSparseMask::from_dense(dense);
    BlockSparseConfig config;
    config.block_size = block;
    config.causal = pick(rng) % 2;
    config.dropout_p = pick(rng) % 3 == 0 ? 0.3 : 0.0;
    config.dropout_seed = rng();
    Tensor padding = Tensor::zeros({B, N}, DType::boolean);
    const bool padded = pick(rng) % 2;
    for (std::int64_t e = 0; e < padding.numel(); ++e) padding.data<std::uint8_t>()[e] = padded && uniform(rng) < 0.2;
    SCOPED_TRACE(::testing::Message() << "case " << i << ": N=" << N << " P=" << P << " block=" << block
                                      << " causal=" << config.causal << " p=" << config.dropout_p);
    const std::vector<std::int64_t> shape{B, N, H, D};
    Tensor q = Tensor::empty(shape, DType::float32), k = Tensor::empty(shape, DType::float32),
           v = Tensor::empty(shape, DType::float32);
    for (const Tensor* t : {&q, &k, &v}) fill_normal(t->view(), rng);
    BlockSparseConfig whole_config = config;
    if (padded) whole_config.key_padding_mask = padding.view();
    Tensor out = Tensor::empty(shape, DType::float32), lse = Tensor::empty({B, H, N}, DType::float32);
    dattn::block_sparse_forward(whole_config, mask, q, k, v, out, lse);

    Tensor merged = Tensor::zeros(shape, DType::float32), merged_lse = Tensor::empty({B, H, N}, DType::float32);
    for (std::int64_t e = 0; e < merged_lse.numel(); ++e) merged_lse.data<float>()[e] = -INFINITY;
    for (std::int64_t q0 = 0; q0 < N; q0 += chunk)
      for (std::int64_t k0 = 0; k0 < N; k0 += chunk) {
        const std::int64_t nq = std::min(chunk, N - q0), nk = std::min(chunk, N - k0);
        BlockSparseConfig step_config = config;
        if (padded) step_config.key_padding_mask = padding.view().narrow(1, k0, nk);
        Tensor part = Tensor::empty({B, nq, H, D}, DType::float32), part_lse = Tensor::empty({B, H, nq}, DType::float32);
        dattn::LaunchOptions options;
        options.ring_step = dattn::RingStep{q0, N, k0, k0 + nk};
        dattn::block_sparse_forward(step_config, mask, q.view().narrow(1, q0, nq), k.view().narrow(1, k0, nk),
                                    v.view().narrow(1, k0, nk), part, part_lse, options);
        dattn::merge_partial(merged.view().narrow(1, q0, nq), merged_lse.view().narrow(2, q0, nq), part, part_lse);
      }
    EXPECT_TRUE(close_rel_l2("out", merged.view(), to_f64(out.view()), 1e-5));
    for (std::int64_t e = 0; e < lse.numel(); ++e) {
      const float a = merged_lse.data<float>()[e], b = lse.data<float>()[e];
      ASSERT_TRUE(a == b || std::abs(a - b) <= 1e-5f * std::max(1.0f, std::abs(b))) << "lse[" << e << "] " << a << " vs " << b;
    }

    // The backward as ring steps: a query sweep (sums, then dq), a key sweep (dk, dv accumulators).
    Tensor dout = Tensor::empty(shape, DType::float32);
    fill_normal(dout.view(), rng);
    Tensor ring_dq = Tensor::empty(shape, DType::float32), ring_dk = Tensor::zeros(shape, DType::float32),
           ring_dv = Tensor::zeros(shape, DType::float32);
    for (std::int64_t q0 = 0; q0 < N; q0 += chunk) {
      const std::int64_t nq = std::min(chunk, N - q0);
      Tensor chunk_lse = Tensor::empty({B, H, nq}, DType::float32), delta = Tensor::zeros({B, H, nq}, DType::float32);
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t r = 0; r < nq; ++r)
            chunk_lse.data<float>()[(b * H + h) * nq + r] = merged_lse.data<float>()[(b * H + h) * N + q0 + r];
      Tensor sum_gk = Tensor::zeros({B, nq, H, D}, DType::float32), sum_pk = Tensor::zeros({B, nq, H, D}, DType::float32);
      auto keys = [&](auto&& call) {
        for (std::int64_t k0 = 0; k0 < N; k0 += chunk) {
          const std::int64_t nk = std::min(chunk, N - k0);
          BlockSparseConfig step_config = config;
          if (padded) step_config.key_padding_mask = padding.view().narrow(1, k0, nk);
          call(step_config, dattn::RingStep{q0, N, k0, k0 + nk}, k0, nk);
        }
      };
      keys([&](const BlockSparseConfig& c, const dattn::RingStep& step, std::int64_t k0, std::int64_t nk) {
        dattn::block_sparse_ring_query_gradients(c, mask, step, q.view().narrow(1, q0, nq), k.view().narrow(1, k0, nk),
                                                 v.view().narrow(1, k0, nk), dout.view().narrow(1, q0, nq), chunk_lse,
                                                 {sum_gk, sum_pk, delta});
      });
      dattn::block_sparse_ring_finish_query_gradients(config, {sum_gk, sum_pk, delta}, ring_dq.view().narrow(1, q0, nq));
      keys([&](const BlockSparseConfig& c, const dattn::RingStep& step, std::int64_t k0, std::int64_t nk) {
        dattn::block_sparse_ring_key_gradients(c, mask, step, q.view().narrow(1, q0, nq), k.view().narrow(1, k0, nk),
                                               v.view().narrow(1, k0, nk), dout.view().narrow(1, q0, nq), chunk_lse,
                                               delta, ring_dk.view().narrow(1, k0, nk), ring_dv.view().narrow(1, k0, nk));
      });
    }
    // Against the float64 reference (the whole float32 call is itself only within the bar of it).
    const Tensor q64 = to_f64(q.view()), k64 = to_f64(k.view()), v64 = to_f64(v.view());
    Tensor out64 = Tensor::empty(shape, DType::float64), lse64 = Tensor::empty({B, H, N}, DType::float32);
    Tensor dq64 = Tensor::empty(shape, DType::float64), dk64 = Tensor::empty(shape, DType::float64),
           dv64 = Tensor::empty(shape, DType::float64);
    dattn::block_sparse_forward(whole_config, mask, q64, k64, v64, out64, lse64);
    dattn::block_sparse_backward(whole_config, mask, q64, k64, v64, out64, lse64, to_f64(dout.view()), dq64, dk64, dv64);
    EXPECT_TRUE(close_rel_l2("dq", ring_dq.view(), dq64, 1e-5, ZeroReference::cancellation));
    EXPECT_TRUE(close_rel_l2("dk", ring_dk.view(), dk64, 1e-5, ZeroReference::cancellation));
    EXPECT_TRUE(close_rel_l2("dv", ring_dv.view(), dv64, 1e-5));
  }
}

TEST(BlockSparseRingStepTest, MisalignedStepsAndBackwardStepsAreRefused) {
  const std::int64_t N = 32;
  const BlockSparseMask mask = BlockSparseMask::from_dense(dattn::local_window_pattern(4, 16, 8));
  BlockSparseConfig config;
  config.block_size = 8;
  Tensor x = Tensor::zeros({1, N, 1, 8}, DType::float32), lse = Tensor::empty({1, 1, 12}, DType::float32);
  const TensorView q = x.view().narrow(1, 4, 12);
  dattn::LaunchOptions options;
  options.ring_step = dattn::RingStep{4, N, 0, 16};
  EXPECT_THAT(error_message([&] { dattn::block_sparse_forward(config, mask, q, x.view().narrow(1, 0, 16),
                                                              x.view().narrow(1, 0, 16), q, lse, options); }),
              ::testing::HasSubstr("do not lie on blocks of 8"));
  options.ring_step = dattn::RingStep{8, N, 0, 16};
  const TensorView q8 = x.view().narrow(1, 8, 8), k16 = x.view().narrow(1, 0, 16);
  Tensor lse8 = Tensor::empty({1, 1, 8}, DType::float32), g = Tensor::zeros({1, 8, 1, 8}, DType::float32),
         gk = Tensor::zeros({1, 16, 1, 8}, DType::float32), gv = Tensor::zeros({1, 16, 1, 8}, DType::float32);
  EXPECT_THAT(error_message([&] { dattn::block_sparse_backward(config, mask, q8, k16, k16, g, lse8, g, g, gk, gv, options); }),
              ::testing::HasSubstr("expected no ring_step (a ring backward step is block_sparse_ring_query_gradients"));
}

TEST(BlockSparseMaskTest, CsrAndTransposeAgreeWithDense) {
  Rng rng(3);
  std::uniform_real_distribution<double> uniform;
  Tensor dense = Tensor::zeros({2, 5, 4}, DType::boolean);
  for (std::int64_t i = 0; i < dense.numel(); ++i) dense.data<std::uint8_t>()[i] = uniform(rng) < 0.5;
  const BlockSparseMask mask = BlockSparseMask::from_dense(dense);
  std::int64_t count = 0;
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t qb = 0; qb < 5; ++qb)
      for (std::int64_t kb = 0; kb < 4; ++kb) {
        const bool set = dense.data<std::uint8_t>()[(h * 5 + qb) * 4 + kb];
        EXPECT_EQ(mask.allowed(h, qb, kb), set);
        count += set;
        // the transpose lists qb under kb exactly when the pair is allowed
        const auto& offsets = mask.column_offsets();
        const auto* begin = mask.rows().data() + offsets[h * 5 + kb];
        const auto* end = mask.rows().data() + offsets[h * 5 + kb + 1];
        EXPECT_EQ(std::find(begin, end, qb) != end, set);
      }
  EXPECT_EQ(mask.allowed_pairs(), count);
  const BlockSparseMask csr = BlockSparseMask::from_csr(1, 3, 3, {0, 2, 2, 3}, {0, 2, 1});
  EXPECT_TRUE(csr.allowed(0, 0, 2));
  EXPECT_FALSE(csr.allowed(0, 1, 1));
  EXPECT_TRUE(csr.allowed(0, 2, 1));
}

TEST(BlockSparseMaskTest, NamedPatterns) {
  const Tensor local = dattn::local_window_pattern(5, 256, 64);  // half = 2
  EXPECT_TRUE(local.data<std::uint8_t>()[0 * 5 + 2]);
  EXPECT_FALSE(local.data<std::uint8_t>()[0 * 5 + 3]);
  const Tensor sparse = dattn::dilated_sparse_pattern(8, {1, 4});
  EXPECT_TRUE(sparse.data<std::uint8_t>()[5 * 8 + 1]);
  EXPECT_FALSE(sparse.data<std::uint8_t>()[5 * 8 + 2]);
  const Tensor global = dattn::global_local_pattern(6, 0, 2, 64);
  EXPECT_TRUE(global.data<std::uint8_t>()[5 * 6 + 1]);
  EXPECT_TRUE(global.data<std::uint8_t>()[1 * 6 + 5]);
  EXPECT_FALSE(global.data<std::uint8_t>()[4 * 6 + 3]);
  const Tensor dilated = dattn::dilated_pattern(320, {128, 256}, {1, 2}, 64);  // 5 blocks
  EXPECT_TRUE(dilated.data<std::uint8_t>()[1 * 5 + 3]);   // branch 1: blocks 1 and 3 of segment [0, 4)
  EXPECT_FALSE(dilated.data<std::uint8_t>()[0 * 5 + 2]);
  EXPECT_TRUE(dilated.data<std::uint8_t>()[4 * 5 + 4]);   // partial last segment
}

TEST(BlockSparseMaskTest, ErrorsNameTheArgument) {
  using ::testing::HasSubstr;
  EXPECT_THAT(error_message([] { dattn::dilated_pattern(256, {100}, {1}, 64); }), HasSubstr("multiple of block_size"));
  EXPECT_THAT(error_message([] { BlockSparseMask::from_csr(1, 2, 2, {0, 1}, {0}); }), HasSubstr("row_offsets"));
  EXPECT_THAT(error_message([] { BlockSparseMask::from_csr(1, 1, 2, {0, 2}, {1, 0}); }), HasSubstr("sorted"));
  Tensor wrong = Tensor::zeros({2, 2}, DType::float32);
  EXPECT_THAT(error_message([&] { BlockSparseMask::from_dense(wrong); }), HasSubstr("dtype"));
  const BlockSparseMask mask = BlockSparseMask::from_dense(Tensor::zeros({3, 3}, DType::boolean));
  Tensor q = Tensor::zeros({1, 10, 1, 4}, DType::float32), lse = Tensor::zeros({1, 1, 10}, DType::float32);
  BlockSparseConfig config;
  config.block_size = 5;  // 2 blocks, the mask has 3
  EXPECT_THAT(error_message([&] { dattn::block_sparse_forward(config, mask, q, q, q, q, lse); }), HasSubstr("blocks"));
  config.block_size = 0;
  EXPECT_THAT(error_message([&] { dattn::block_sparse_forward(config, mask, q, q, q, q, lse); }), HasSubstr("block_size"));
}

}  // namespace
}  // namespace dattn_test
