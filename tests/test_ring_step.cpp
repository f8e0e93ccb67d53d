// Ring steps in one process: every rank's local queries attend to every rank's keys one step at a
// time, merge_partial combines the steps, and the result must equal attention over the whole
// sequence (the contract of SPEC.md "Ring (sequence-parallel) attention"); likewise the ring
// backward's two sweeps against the whole sequence's gradients, and the one-pass form
// (ring_forward_step, ring_step_gradients) against both.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <tuple>

#include "case_config.hpp"
#include "harness.hpp"

namespace dattn_test {
namespace {

// Rank p's rows as [begin, end) ranges (the library's ring_rows; its own tests pin the layouts).
std::vector<std::pair<std::int64_t, std::int64_t>> chunks_of(std::int64_t N, int P, int p, bool zigzag) {
  return dattn::ring_rows(N, P, p, zigzag ? dattn::Layout::zigzag : dattn::Layout::contiguous);
}

struct RingCase {
  std::int64_t B, N, H, D;
  std::vector<std::int64_t> w, r;
  dattn::Mode mode;
  bool causal, zigzag, padding;
  int P;
  double dropout_p;
  std::int64_t kv_heads = 0;  // k, v heads (grouped-query heads); 0 means H
  std::uint64_t dropout_seed = 77;  // the same for every case
};

void run(const RingCase& c, DType dtype, Rng& rng) {
  SCOPED_TRACE(::testing::Message() << "N=" << c.N << " P=" << c.P << " H=" << c.H << " kv_heads=" << c.kv_heads
                                    << " zigzag=" << c.zigzag << " causal=" << c.causal
                                    << " mode=" << int(c.mode) << " w[0]=" << c.w[0] << " dtype=" << dattn::dtype_name(dtype));
  const std::vector<std::int64_t> shape{c.B, c.N, c.H, c.D}, kv_shape{c.B, c.N, c.kv_heads ? c.kv_heads : c.H, c.D};
  Buffer q = contiguous(shape, dtype), k = contiguous(kv_shape, dtype), v = contiguous(kv_shape, dtype);
  for (const Buffer* b : {&q, &k, &v}) fill_normal(b->view(), rng);
  const dattn::DilatedConfig config = config_of(c);
  Tensor padding = Tensor::zeros({c.B, c.N}, DType::boolean);
  std::uniform_real_distribution<double> uniform;
  if (c.padding)
    for (std::int64_t i = 0; i < padding.numel(); ++i) padding.data<std::uint8_t>()[i] = uniform(rng) < 0.2;

  // The whole sequence at once.
  dattn::DilatedConfig whole = config;
  if (c.padding) whole.key_padding_mask = padding.view();
  Tensor expected = Tensor::empty(shape, dtype), expected_lse = Tensor::empty({c.B, c.H, c.N}, DType::float32);
  dattn::forward(whole, q.view(), k.view(), v.view(), expected, expected_lse);

  Tensor merged = Tensor::zeros(shape, DType::float32), merged_lse = Tensor::empty({c.B, c.H, c.N}, DType::float32);
  for (std::int64_t i = 0; i < merged_lse.numel(); ++i) merged_lse.data<float>()[i] = -INFINITY;
  for (int rank = 0; rank < c.P; ++rank)
    for (const auto& [q0, q1] : chunks_of(c.N, c.P, rank, c.zigzag))
      for (int source = 0; source < c.P; ++source)
        for (const auto& [k0, k1] : chunks_of(c.N, c.P, source, c.zigzag)) {
          dattn::DilatedConfig step_config = config;
          const Tensor step_padding = Tensor::empty({c.B, k1 - k0}, DType::boolean);
          if (c.padding) {
            for (std::int64_t b = 0; b < c.B; ++b)
              for (std::int64_t n = k0; n < k1; ++n)
                step_padding.data<std::uint8_t>()[b * (k1 - k0) + n - k0] = padding.data<std::uint8_t>()[b * c.N + n];
            step_config.key_padding_mask = step_padding.view();
          }
          Tensor out = Tensor::empty({c.B, q1 - q0, c.H, c.D}, dtype), lse = Tensor::empty({c.B, c.H, q1 - q0}, DType::float32);
          dattn::LaunchOptions options;
          options.ring_step = dattn::RingStep{q0, c.N, k0, k1};
          dattn::forward(step_config, q.view().narrow(1, q0, q1 - q0), k.view().narrow(1, k0, k1 - k0),
                         v.view().narrow(1, k0, k1 - k0), out, lse, options);
          dattn::merge_partial(merged.view().narrow(1, q0, q1 - q0), merged_lse.view().narrow(2, q0, q1 - q0), out, lse);
        }
  // The merge works in float32 while the whole-sequence call rounds once, so compare both to
  // the float64 reference at the dtype's bar.
  Tensor ref = Tensor::empty(shape, DType::float64), ref_lse = Tensor::empty({c.B, c.H, c.N}, DType::float32);
  dattn::forward(whole, to_f64(q.view()), to_f64(k.view()), to_f64(v.view()), ref, ref_lse);
  const Tolerance tol = tolerance(dtype);
  EXPECT_TRUE(close_rel_l2("merged out", merged.view(), ref, tol.rel_l2));
  EXPECT_TRUE(lse_close(merged_lse.view(), ref_lse, tol.lse));
  EXPECT_TRUE(close_rel_l2("whole out", expected.view(), ref, tol.rel_l2));

  // Backward: per rank, the query sweep over every key range, then the key sweep, with the
  // merged lse; dk and dv go back to the rows' owners (here: one global accumulator).
  Buffer dout = contiguous(shape, dtype);
  fill_normal(dout.view(), rng);
  Tensor dq = Tensor::empty(shape, dtype), dk = Tensor::zeros(kv_shape, DType::float32),
         dv = Tensor::zeros(kv_shape, DType::float32);
  auto step_config = [&](std::int64_t k0, std::int64_t k1, Tensor& holder) {
    dattn::DilatedConfig s = config;
    if (c.padding) {
      holder = Tensor::empty({c.B, k1 - k0}, DType::boolean);
      for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t n = k0; n < k1; ++n)
          holder.data<std::uint8_t>()[b * (k1 - k0) + n - k0] = padding.data<std::uint8_t>()[b * c.N + n];
      s.key_padding_mask = holder.view();
    }
    return s;
  };
  for (int rank = 0; rank < c.P; ++rank)
    for (const auto& [q0, q1] : chunks_of(c.N, c.P, rank, c.zigzag)) {
      const std::int64_t n = q1 - q0;
      Tensor sum_gk = Tensor::zeros({c.B, n, c.H, c.D}, DType::float32), sum_pk = Tensor::zeros({c.B, n, c.H, c.D}, DType::float32);
      Tensor delta = Tensor::zeros({c.B, c.H, n}, DType::float32);
      // The rank's lse: its rows of the merged lse, made contiguous.
      Tensor lse = Tensor::empty({c.B, c.H, n}, DType::float32);
      for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t h = 0; h < c.H; ++h)
          for (std::int64_t i = 0; i < n; ++i)
            lse.data<float>()[(b * c.H + h) * n + i] = merged_lse.data<float>()[(b * c.H + h) * c.N + q0 + i];
      const dattn::RingQueryGradients sums{sum_gk, sum_pk, delta};
      for (int source = 0; source < c.P; ++source)
        for (const auto& [k0, k1] : chunks_of(c.N, c.P, source, c.zigzag)) {
          Tensor holder;
          dattn::ring_query_gradients(step_config(k0, k1, holder), dattn::RingStep{q0, c.N, k0, k1},
                                      q.view().narrow(1, q0, q1 - q0), k.view().narrow(1, k0, k1 - k0),
                                      v.view().narrow(1, k0, k1 - k0), dout.view().narrow(1, q0, q1 - q0), lse, sums);
        }
      dattn::ring_finish_query_gradients(config, sums, dq.view().narrow(1, q0, q1 - q0));
      for (int source = 0; source < c.P; ++source)
        for (const auto& [k0, k1] : chunks_of(c.N, c.P, source, c.zigzag)) {
          Tensor holder;
          dattn::ring_key_gradients(step_config(k0, k1, holder), dattn::RingStep{q0, c.N, k0, k1},
                                    q.view().narrow(1, q0, q1 - q0), k.view().narrow(1, k0, k1 - k0),
                                    v.view().narrow(1, k0, k1 - k0), dout.view().narrow(1, q0, q1 - q0), lse, delta,
                                    dk.view().narrow(1, k0, k1 - k0), dv.view().narrow(1, k0, k1 - k0));
        }
    }
  Tensor dq64 = Tensor::empty(shape, DType::float64), dk64 = Tensor::empty(kv_shape, DType::float64),
         dv64 = Tensor::empty(kv_shape, DType::float64);
  dattn::backward(whole, to_f64(q.view()), to_f64(k.view()), to_f64(v.view()), ref, ref_lse, to_f64(dout.view()), dq64,
                  dk64, dv64);
  EXPECT_TRUE(close_rel_l2("ring dq", dq.view(), dq64, tol.rel_l2, ZeroReference::cancellation));
  EXPECT_TRUE(close_rel_l2("ring dk", dk.view(), dk64, tol.rel_l2, ZeroReference::cancellation));
  EXPECT_TRUE(close_rel_l2("ring dv", dv.view(), dv64, tol.rel_l2));

  // The one-pass form the GPU ring uses: ring_forward_step merges as it goes, and one sweep of
  // ring_step_gradients with delta = rowsum(dout∘out) gives all three gradients.
  Tensor out1 = Tensor::zeros(shape, DType::float32), lse1 = Tensor::empty({c.B, c.H, c.N}, DType::float32);
  for (std::int64_t i = 0; i < lse1.numel(); ++i) lse1.data<float>()[i] = -INFINITY;
  Tensor dq1 = Tensor::zeros(shape, DType::float32), dk1 = Tensor::zeros(kv_shape, DType::float32),
         dv1 = Tensor::zeros(kv_shape, DType::float32);
  auto each_step = [&](auto&& fn) {
    for (int rank = 0; rank < c.P; ++rank)
      for (const auto& [q0, q1] : chunks_of(c.N, c.P, rank, c.zigzag))
        for (int source = 0; source < c.P; ++source)
          for (const auto& [k0, k1] : chunks_of(c.N, c.P, source, c.zigzag)) {
            Tensor holder;
            fn(step_config(k0, k1, holder), dattn::RingStep{q0, c.N, k0, k1}, q0, q1, k0, k1);
          }
  };
  each_step([&](const dattn::DilatedConfig& s, dattn::RingStep step, std::int64_t q0, std::int64_t q1, std::int64_t k0,
                std::int64_t k1) {
    dattn::ring_forward_step(s, step, q.view().narrow(1, q0, q1 - q0), k.view().narrow(1, k0, k1 - k0),
                             v.view().narrow(1, k0, k1 - k0), out1.view().narrow(1, q0, q1 - q0),
                             lse1.view().narrow(2, q0, q1 - q0));
  });
  EXPECT_TRUE(close_rel_l2("one-pass out", out1.view(), ref, tol.rel_l2));
  EXPECT_TRUE(lse_close(lse1.view(), ref_lse, tol.lse));
  each_step([&](const dattn::DilatedConfig& s, dattn::RingStep step, std::int64_t q0, std::int64_t q1, std::int64_t k0,
                std::int64_t k1) {
    const std::int64_t n = q1 - q0;
    Tensor lse = Tensor::empty({c.B, c.H, n}, DType::float32), delta = Tensor::zeros({c.B, c.H, n}, DType::float32);
    for (std::int64_t b = 0; b < c.B; ++b)
      for (std::int64_t h = 0; h < c.H; ++h)
        for (std::int64_t i = 0; i < n; ++i) {
          lse.data<float>()[(b * c.H + h) * n + i] = lse1.data<float>()[(b * c.H + h) * c.N + q0 + i];
          for (std::int64_t d = 0; d < c.D; ++d) {
            const std::int64_t at = ((b * c.N + q0 + i) * c.H + h) * c.D + d;
            delta.data<float>()[(b * c.H + h) * n + i] += float(load(dout.view(), at)) * out1.data<float>()[at];
          }
        }
    dattn::ring_step_gradients(s, step, q.view().narrow(1, q0, n), k.view().narrow(1, k0, k1 - k0),
                               v.view().narrow(1, k0, k1 - k0), dout.view().narrow(1, q0, n), lse, delta,
                               dq1.view().narrow(1, q0, n), dk1.view().narrow(1, k0, k1 - k0),
                               dv1.view().narrow(1, k0, k1 - k0));
  });
  EXPECT_TRUE(close_rel_l2("one-pass dq", dq1.view(), dq64, tol.rel_l2, ZeroReference::cancellation));
  EXPECT_TRUE(close_rel_l2("one-pass dk", dk1.view(), dk64, tol.rel_l2, ZeroReference::cancellation));
  EXPECT_TRUE(close_rel_l2("one-pass dv", dv1.view(), dv64, tol.rel_l2));
}

// Grouped-query heads: the steps' dk, dv (accumulated per key range) sum over the query heads.
TEST(RingStepTest, GroupedQueryHeads) {
  Rng rng(16);
  for (const auto& [H, kv_heads, P, zigzag] : {std::tuple{4, 2, 2, false}, std::tuple{4, 1, 3, true},
                                               std::tuple{6, 3, 2, true}}) {
    RingCase c{2, 24 * std::int64_t(P), H, 16, {8, 20}, {1, 3}, dattn::Mode::grouped, true, zigzag, true, P, 0.2};
    c.kv_heads = kv_heads;
    run(c, DType::float32, rng);
    c.mode = dattn::Mode::longnet, c.causal = false;
    run(c, DType::bfloat16, rng);
  }
}

TEST(RingStepTest, MergedStepsEqualWholeSequenceAttention) {
  Rng rng(42);
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  for (int i = 0; i < 40; ++i) {
    RingCase c;
    c.P = 1 + pick(rng) % 4;
    c.zigzag = pick(rng) % 2;
    const std::int64_t unit = c.zigzag ? 2 * c.P : c.P;
    c.N = unit * (1 + pick(rng) % (60 / unit + 1));
    c.B = 1 + pick(rng) % 2;
    c.H = 1 + pick(rng) % 4;
    c.D = 8 * (1 + pick(rng) % 4);
    const int G = 1 + pick(rng) % 3;
    for (int g = 0; g < G; ++g) {
      // segments shorter than, equal to and longer than N/P, and not dividing it
      const std::int64_t w = std::max<std::int64_t>(1, (c.N / c.P) * (1 + pick(rng) % 3) / 2 + pick(rng) % 5);
      c.w.push_back(w);
      c.r.push_back(1 + pick(rng) % std::min<std::int64_t>(w, 4));
    }
    c.mode = pick(rng) % 2 ? dattn::Mode::longnet : dattn::Mode::grouped;
    c.causal = pick(rng) % 2;
    c.padding = pick(rng) % 3 == 0;
    c.dropout_p = pick(rng) % 4 == 0 ? 0.2 : 0.0;
    if (c.H > 1 && pick(rng) % 3 == 0) c.kv_heads = c.H % 2 == 0 && pick(rng) % 2 ? c.H / 2 : 1;  // GQA, MQA
    run(c, i % 3 == 0 ? DType::bfloat16 : DType::float32, rng);
  }
}

TEST(RingStepTest, ErrorsNameTheArgument) {
  using ::testing::HasSubstr;
  Tensor q = Tensor::zeros({1, 8, 1, 4}, DType::float32), k = Tensor::zeros({1, 4, 1, 4}, DType::float32);
  Tensor lse = Tensor::zeros({1, 1, 8}, DType::float32);
  dattn::DilatedConfig config;
  config.segment_lengths = {4};
  config.dilation_rates = {1};
  auto message = [&](dattn::RingStep step) {
    try {
      dattn::forward(config, q, k, k, q, lse, {.ring_step = step});
    } catch (const dattn::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(message({4, 8, 0, 4}), HasSubstr("query rows"));
  EXPECT_THAT(message({0, 16, 4, 4}), HasSubstr("key rows"));
  EXPECT_THAT(message({0, 16, 0, 6}), HasSubstr("k has shape"));
  EXPECT_EQ(message({0, 16, 12, 16}), "no error");
}

}  // namespace
}  // namespace dattn_test
