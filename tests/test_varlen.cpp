// Packed variable-length batches: the fused kernels against the float64 reference, the reference
// against its definition (each sequence as a batch of one: a padded batch whose padding is
// masked gives the same rows), sequences of length 0 and 1, GQA, dropout, and every validation
// error raised before anything is written.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "harness.hpp"

namespace dattn_test {
namespace {

using dattn::PackedSequences;

struct VarlenCase {
  std::vector<std::int64_t> lengths;
  std::int64_t H = 2, Hkv = 2, D = 8;
  dattn::DilatedConfig config;
};

std::int64_t total(const VarlenCase& c) {
  std::int64_t t = 0;
  for (std::int64_t n : c.lengths) t += n;
  return t;
}

Tensor offsets_of(const std::vector<std::int64_t>& lengths) {
  Tensor cu = Tensor::empty({std::int64_t(lengths.size()) + 1}, DType::int32);
  cu.data<std::int32_t>()[0] = 0;
  for (std::size_t b = 0; b < lengths.size(); ++b)
    cu.data<std::int32_t>()[b + 1] = cu.data<std::int32_t>()[b] + std::int32_t(lengths[b]);
  return cu;
}

std::string describe(const VarlenCase& c) {
  std::string s = "lengths={";
  for (std::int64_t n : c.lengths) s += std::to_string(n) + ",";
  s += "} H=" + std::to_string(c.H) + " Hkv=" + std::to_string(c.Hkv) + " D=" + std::to_string(c.D) + " w={";
  for (std::size_t i = 0; i < c.config.segment_lengths.size(); ++i)
    s += std::to_string(c.config.segment_lengths[i]) + "/" + std::to_string(c.config.dilation_rates[i]) + ",";
  s += std::string("} mode=") + (c.config.mode == dattn::Mode::grouped ? "grouped" : "longnet") +
       " causal=" + std::to_string(c.config.causal) + " dropout=" + std::to_string(c.config.dropout_p);
  return s;
}

VarlenCase random_case(Rng& rng) {
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  VarlenCase c;
  const int B = 1 + pick(rng) % 4;
  for (int b = 0; b < B; ++b) {
    const int kind = pick(rng) % 6;  // lengths 0 and 1 often
    c.lengths.push_back(kind == 0 ? 0 : kind == 1 ? 1 : 2 + pick(rng) % 60);
  }
  c.Hkv = 1 + pick(rng) % 2;
  c.H = c.Hkv * (1 + pick(rng) % 3);
  c.D = std::vector<std::int64_t>{1, 7, 16, 33}[pick(rng) % 4];
  const int G = 1 + pick(rng) % 3;
  for (int i = 0; i < G; ++i) {
    const std::int64_t w = 1 + pick(rng) % 24;
    c.config.segment_lengths.push_back(w);
    c.config.dilation_rates.push_back(1 + pick(rng) % std::min<std::int64_t>(w, 4));
  }
  c.config.mode = pick(rng) % 2 ? dattn::Mode::longnet : dattn::Mode::grouped;
  c.config.causal = pick(rng) % 2;
  if (pick(rng) % 3 == 0) c.config.dropout_p = 0.3, c.config.dropout_seed = rng();
  return c;
}

// out, lse, dq, dk, dv of a packed call.
struct Results {
  Tensor out, lse, dq, dk, dv;
};

Results run_packed(const VarlenCase& c, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                   dattn::Backend backend) {
  const std::int64_t T = total(c);
  const Tensor cu = offsets_of(c.lengths);
  const PackedSequences packed{cu, *std::max_element(c.lengths.begin(), c.lengths.end())};
  const DType dtype = q.view().dtype;
  Results r{Tensor::empty({T, c.H, c.D}, dtype), Tensor::empty({c.H, T}, DType::float32),
            Tensor::empty({T, c.H, c.D}, dtype), Tensor::empty({T, c.Hkv, c.D}, dtype),
            Tensor::empty({T, c.Hkv, c.D}, dtype)};
  const dattn::LaunchOptions options{.backend = backend};
  dattn::forward_varlen(c.config, packed, q, k, v, r.out, r.lse, options);
  dattn::backward_varlen(c.config, packed, q, k, v, r.out, r.lse, dout, r.dq, r.dk, r.dv, options);
  return r;
}

class VarlenTest : public ::testing::TestWithParam<DType> {};

TEST_P(VarlenTest, FusedMatchesReference) {
  Rng rng(1600 + int(GetParam()));
  for (int i = 0; i < 40; ++i) {
    const VarlenCase c = random_case(rng);
    SCOPED_TRACE(describe(c));
    const std::int64_t T = total(c);
    if (T == 0) continue;
    Tensor q = Tensor::empty({T, c.H, c.D}, GetParam()), k = Tensor::empty({T, c.Hkv, c.D}, GetParam()),
           v = Tensor::empty({T, c.Hkv, c.D}, GetParam()), dout = Tensor::empty({T, c.H, c.D}, GetParam());
    for (const Tensor* t : {&q, &k, &v, &dout}) fill_normal(*t, rng);
    const Results fused = run_packed(c, q, k, v, dout, dattn::Backend::fused);
    const Results ref = run_packed(c, to_f64(q), to_f64(k), to_f64(v), to_f64(dout), dattn::Backend::reference);
    const Tolerance tol = tolerance(GetParam());
    EXPECT_TRUE(close_rel_l2("out", fused.out, ref.out, tol.rel_l2));
    EXPECT_TRUE(lse_close(fused.lse, ref.lse, tol.lse));
    EXPECT_TRUE(close_rel_l2("dq", fused.dq, ref.dq, tol.rel_l2, ZeroReference::cancellation));
    EXPECT_TRUE(close_rel_l2("dk", fused.dk, ref.dk, tol.rel_l2, ZeroReference::cancellation));
    EXPECT_TRUE(close_rel_l2("dv", fused.dv, ref.dv, tol.rel_l2));
  }
}

INSTANTIATE_TEST_SUITE_P(All, VarlenTest, ::testing::Values(DType::float32, DType::bfloat16, DType::float16),
                         [](const auto& info) { return std::string(dattn::dtype_name(info.param)); });

// The definition: sequence b alone is row b of a padded batch [B, max, H, D] whose padding keys
// are masked (dropout then uses the same b and positions); rows past a sequence's end are ignored.
TEST(VarlenReference, EqualsPaddedBatchRowByRow) {
  Rng rng(16);
  for (int i = 0; i < 25; ++i) {
    const VarlenCase c = random_case(rng);
    SCOPED_TRACE(describe(c));
    const std::int64_t T = total(c), B = std::int64_t(c.lengths.size());
    const std::int64_t M = std::max<std::int64_t>(1, *std::max_element(c.lengths.begin(), c.lengths.end()));
    if (T == 0) continue;
    Tensor q = Tensor::empty({T, c.H, c.D}, DType::float64), k = Tensor::empty({T, c.Hkv, c.D}, DType::float64),
           v = Tensor::empty({T, c.Hkv, c.D}, DType::float64), dout = Tensor::empty({T, c.H, c.D}, DType::float64);
    for (const Tensor* t : {&q, &k, &v, &dout}) fill_normal(*t, rng);
    const Results packed = run_packed(c, q, k, v, dout, dattn::Backend::reference);

    Tensor pq = Tensor::zeros({B, M, c.H, c.D}, DType::float64), pk = Tensor::zeros({B, M, c.Hkv, c.D}, DType::float64),
           pv = Tensor::zeros({B, M, c.Hkv, c.D}, DType::float64), pg = Tensor::zeros({B, M, c.H, c.D}, DType::float64);
    Tensor padding = Tensor::zeros({B, M}, DType::boolean);
    std::int64_t start = 0;
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t n = c.lengths[std::size_t(b)];
      for (std::int64_t j = n; j < M; ++j) padding.data<std::uint8_t>()[b * M + j] = 1;
      for (const auto& [from, to] : {std::pair{&q, &pq}, {&k, &pk}, {&v, &pv}, {&dout, &pg}}) {
        const std::int64_t row = from->view().shape[1] * c.D;
        std::copy_n(from->data<double>() + start * row, n * row, to->data<double>() + b * M * row);
      }
      start += n;
    }
    dattn::DilatedConfig config = c.config;
    config.key_padding_mask = padding.view();
    Tensor out = Tensor::empty({B, M, c.H, c.D}, DType::float64), lse = Tensor::empty({B, c.H, M}, DType::float32);
    Tensor dq = Tensor::empty({B, M, c.H, c.D}, DType::float64), dk = Tensor::empty({B, M, c.Hkv, c.D}, DType::float64),
           dv = Tensor::empty({B, M, c.Hkv, c.D}, DType::float64);
    dattn::forward(config, pq, pk, pv, out, lse);
    dattn::backward(config, pq, pk, pv, out, lse, pg, dq, dk, dv);
    start = 0;
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t j = 0; j < c.lengths[std::size_t(b)]; ++j) {
        for (std::int64_t h = 0; h < c.H; ++h) {
          const float a = packed.lse.data<float>()[h * T + start + j], e = lse.data<float>()[(b * c.H + h) * M + j];
          EXPECT_TRUE(a == e || std::fabs(a - e) <= 1e-6 * std::max(1.0f, std::fabs(e))) << "lse " << b << " " << j;
        }
        for (const auto& [x, y, heads] : {std::tuple{&packed.out, &out, c.H}, {&packed.dq, &dq, c.H},
                                          {&packed.dk, &dk, c.Hkv}, {&packed.dv, &dv, c.Hkv}})
          for (std::int64_t e = 0; e < heads * c.D; ++e)
            EXPECT_NEAR(x->data<double>()[(start + j) * heads * c.D + e], y->data<double>()[(b * M + j) * heads * c.D + e],
                        1e-10);
      }
      start += c.lengths[std::size_t(b)];
    }
  }
}

TEST(Varlen, ZeroAndOneLengthSequences) {
  Rng rng(3);
  VarlenCase c;
  c.lengths = {0, 1, 0, 5, 1, 0};
  c.H = 4, c.Hkv = 2, c.D = 16;
  c.config.segment_lengths = {2, 4}, c.config.dilation_rates = {1, 2};
  c.config.causal = true;
  const std::int64_t T = total(c);
  Tensor q = Tensor::empty({T, c.H, c.D}, DType::float32), k = Tensor::empty({T, c.Hkv, c.D}, DType::float32),
         v = Tensor::empty({T, c.Hkv, c.D}, DType::float32), dout = Tensor::empty({T, c.H, c.D}, DType::float32);
  for (const Tensor* t : {&q, &k, &v, &dout}) fill_normal(*t, rng);
  const Results fused = run_packed(c, q, k, v, dout, dattn::Backend::fused);
  const Results ref = run_packed(c, to_f64(q), to_f64(k), to_f64(v), to_f64(dout), dattn::Backend::reference);
  EXPECT_TRUE(close_rel_l2("out", fused.out, ref.out, 1e-5));
  EXPECT_TRUE(lse_close(fused.lse, ref.lse, 1e-5));
  EXPECT_TRUE(close_rel_l2("dk", fused.dk, ref.dk, 1e-5, ZeroReference::cancellation));
  // The one-token sequence (row 0) attends to itself in branch 0 (offset 0, heads 0 and 1): out = v / G.
  EXPECT_NEAR(fused.out.data<float>()[0], v.data<float>()[0] / 2, 1e-6);
  EXPECT_EQ(fused.out.data<float>()[2 * c.D], 0.0f);  // head 2: branch 1 (offset 1) selects no row 0

  // Only empty sequences: nothing to compute, nothing written.
  c.lengths = {0, 0};
  const Tensor cu = offsets_of(c.lengths);
  const Tensor empty = Tensor::empty({0, c.H, c.D}, DType::float32), empty_kv = Tensor::empty({0, c.Hkv, c.D}, DType::float32);
  const Tensor empty_lse = Tensor::empty({c.H, 0}, DType::float32);
  EXPECT_NO_THROW(dattn::forward_varlen(c.config, {cu, 0}, empty, empty_kv, empty_kv, empty, empty_lse));
}

TEST(Varlen, ErrorsBeforeAnythingIsWritten) {
  const std::int64_t T = 10, H = 2, D = 4;
  Tensor q = Tensor::zeros({T, H, D}, DType::float32), out = Tensor::zeros({T, H, D}, DType::float32);
  Tensor lse = Tensor::zeros({H, T}, DType::float32);
  for (std::int64_t i = 0; i < out.numel(); ++i) out.data<float>()[i] = 7.0f;
  dattn::DilatedConfig config;
  config.segment_lengths = {4}, config.dilation_rates = {1};
  auto call = [&](const TensorView& cu, std::int64_t max_seqlen, const dattn::DilatedConfig& cfg, const TensorView& k) {
    return error_message([&] { dattn::forward_varlen(cfg, {cu, max_seqlen}, q, k, k, out, lse); });
  };
  auto offsets = [](std::vector<std::int32_t> values) {
    Tensor t = Tensor::empty({std::int64_t(values.size())}, DType::int32);
    std::copy(values.begin(), values.end(), t.data<std::int32_t>());
    return t;
  };
  const Tensor good = offsets({0, 4, 10});
  EXPECT_EQ(call(good, 6, config, q), "no error");
  for (std::int64_t i = 0; i < out.numel(); ++i) out.data<float>()[i] = 7.0f;
  EXPECT_THAT(call(offsets({1, 4, 10}), 6, config, q), ::testing::HasSubstr("cu_seqlens[0] = 1; expected 0"));
  EXPECT_THAT(call(offsets({0, 6, 4, 10}), 6, config, q), ::testing::HasSubstr("cu_seqlens[2] = 4 < cu_seqlens[1] = 6"));
  EXPECT_THAT(call(offsets({0, 4, 9}), 6, config, q), ::testing::HasSubstr("cu_seqlens[2] = 9; expected T = 10"));
  EXPECT_THAT(call(good, 5, config, q), ::testing::HasSubstr("max_seqlen = 5"));
  EXPECT_THAT(call(offsets({0}), 6, config, q), ::testing::HasSubstr("cu_seqlens has shape [1]"));
  const Tensor wide = Tensor::zeros({3}, DType::int64);
  EXPECT_THAT(call(wide, 6, config, q), ::testing::HasSubstr("cu_seqlens has dtype int64; expected int32"));
  dattn::DilatedConfig padded = config;
  const Tensor mask = Tensor::zeros({1, T}, DType::boolean);
  padded.key_padding_mask = mask.view();
  EXPECT_THAT(call(good, 6, padded, q), ::testing::HasSubstr("key_padding_mask is set for a packed batch"));
  const Tensor k3 = Tensor::zeros({T, 3, D}, DType::float32);
  EXPECT_THAT(call(good, 6, config, k3), ::testing::HasSubstr("k has 3 heads and q has H = 2"));
  const Tensor k4 = Tensor::zeros({1, T, H, D}, DType::float32);
  EXPECT_THAT(call(good, 6, config, k4), ::testing::HasSubstr("k has rank 4; expected rank 3 [T, Hkv, D]"));
  for (std::int64_t i = 0; i < out.numel(); ++i) ASSERT_EQ(out.data<float>()[i], 7.0f) << "out written before an error";
}

// Block-sparse attention with a named pattern per sequence: fused vs reference, and the reference
// vs each sequence alone with the pattern's mask for its length.
TEST(VarlenBlockSparse, MatchesReferenceAndPerSequenceCalls) {
  Rng rng(1616);
  const std::vector<dattn::SparsePattern> patterns = {
      {dattn::SparsePattern::Kind::local_window, 16, 1, {}, {}, {}},
      {dattn::SparsePattern::Kind::dilated_sparse, 0, 0, {1, 3}, {}, {}},
      {dattn::SparsePattern::Kind::global_local, 16, 1, {}, {}, {}},
      {dattn::SparsePattern::Kind::dilated, 0, 0, {}, {8, 16}, {1, 2}}};
  for (const auto& pattern : patterns)
    for (const DType dtype : {DType::float32, DType::bfloat16}) {
      const std::vector<std::int64_t> lengths{37, 0, 1, 64, 9};
      const std::int64_t T = 111, H = 4, Hkv = 2, D = 16, block = 8;
      dattn::BlockSparseConfig config;
      config.block_size = block, config.causal = dtype == DType::float32;
      config.dropout_p = dtype == DType::bfloat16 ? 0.2 : 0.0, config.dropout_seed = 5;
      const Tensor cu = offsets_of(lengths);
      Tensor q = Tensor::empty({T, H, D}, dtype), k = Tensor::empty({T, Hkv, D}, dtype), v = Tensor::empty({T, Hkv, D}, dtype),
             g = Tensor::empty({T, H, D}, dtype);
      for (const Tensor* t : {&q, &k, &v, &g}) fill_normal(*t, rng);
      auto run = [&](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, dattn::Backend backend) {
        const DType type = q.view().dtype;
        Results r{Tensor::empty({T, H, D}, type), Tensor::empty({H, T}, DType::float32), Tensor::empty({T, H, D}, type),
                  Tensor::empty({T, Hkv, D}, type), Tensor::empty({T, Hkv, D}, type)};
        const dattn::LaunchOptions options{.backend = backend};
        dattn::block_sparse_forward_varlen(config, pattern, {cu, 64}, q, k, v, r.out, r.lse, options);
        dattn::block_sparse_backward_varlen(config, pattern, {cu, 64}, q, k, v, r.out, r.lse, g, r.dq, r.dk, r.dv, options);
        return r;
      };
      const Results fused = run(q, k, v, g, dattn::Backend::fused);
      const Results ref = run(to_f64(q), to_f64(k), to_f64(v), to_f64(g), dattn::Backend::reference);
      const Tolerance tol = tolerance(dtype);
      SCOPED_TRACE("pattern " + std::to_string(int(pattern.kind)) + " " + dattn::dtype_name(dtype));
      EXPECT_TRUE(close_rel_l2("out", fused.out, ref.out, tol.rel_l2));
      EXPECT_TRUE(lse_close(fused.lse, ref.lse, tol.lse));
      EXPECT_TRUE(close_rel_l2("dq", fused.dq, ref.dq, tol.rel_l2, ZeroReference::cancellation));
      EXPECT_TRUE(close_rel_l2("dk", fused.dk, ref.dk, tol.rel_l2, ZeroReference::cancellation));
      EXPECT_TRUE(close_rel_l2("dv", fused.dv, ref.dv, tol.rel_l2));
      if (config.dropout_p > 0) continue;  // a lone call would use batch index 0 for every sequence
      std::int64_t start = 0;
      for (const std::int64_t n : lengths) {
        if (n > 0) {
          const Tensor q1 = to_f64(q.view().narrow(0, start, n)), k1 = to_f64(k.view().narrow(0, start, n)),
                       v1 = to_f64(v.view().narrow(0, start, n));
          const TensorView q4 = dattn::make_view(q1.view().data, DType::float64, {1, n, H, D});
          const TensorView k4 = dattn::make_view(k1.view().data, DType::float64, {1, n, Hkv, D});
          const TensorView v4 = dattn::make_view(v1.view().data, DType::float64, {1, n, Hkv, D});
          Tensor out = Tensor::empty({1, n, H, D}, DType::float64), lse = Tensor::empty({1, H, n}, DType::float32);
          dattn::block_sparse_forward(config, dattn::pattern_mask(pattern, n, block), q4, k4, v4, out, lse);
          for (std::int64_t e = 0; e < n * H * D; ++e)
            ASSERT_NEAR(ref.out.data<double>()[start * H * D + e], out.data<double>()[e], 1e-12);
        }
        start += n;
      }
    }
}

TEST(VarlenBlockSparse, PatternErrors) {
  dattn::SparsePattern dilated{dattn::SparsePattern::Kind::dilated, 0, 0, {}, {12}, {1}};
  EXPECT_THAT(error_message([&] { dattn::pattern_mask(dilated, 40, 8); }), ::testing::HasSubstr("12"));
  EXPECT_THAT(error_message([&] { dattn::pattern_mask({}, 0, 8); }), ::testing::HasSubstr("seqlen = 0"));
}

}  // namespace
}  // namespace dattn_test
