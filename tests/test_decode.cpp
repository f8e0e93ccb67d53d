// Decoding with a key/value cache: the fused kernels against the float64 reference (which
// computes causal attention over the first L positions and keeps the last Tn rows) and against
// the fused whole-sequence call, for Tn = 1 and Tn > 1 (also longer than a segment), caches empty,
// at, just before and across segment boundaries, GQA, both modes, with and without k_new; and
// every validation error raised before the cache or out is written.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "harness.hpp"

namespace dattn_test {
namespace {

using dattn::KeyValueCache;

struct DecodeCase {
  std::int64_t B = 1, Tn = 1, H = 2, Hkv = 1, D = 8, Nmax = 80;
  std::vector<std::int32_t> cached;  // cache_seqlens
  bool with_new = true;
  dattn::DilatedConfig config;
};

std::string describe(const DecodeCase& c) {
  std::string s = "B=" + std::to_string(c.B) + " Tn=" + std::to_string(c.Tn) + " H=" + std::to_string(c.H) +
                  " Hkv=" + std::to_string(c.Hkv) + " D=" + std::to_string(c.D) + " new=" + std::to_string(c.with_new) +
                  " cached={";
  for (auto n : c.cached) s += std::to_string(n) + ",";
  s += "} w/r={";
  for (std::size_t i = 0; i < c.config.segment_lengths.size(); ++i)
    s += std::to_string(c.config.segment_lengths[i]) + "/" + std::to_string(c.config.dilation_rates[i]) + ",";
  return s + "} mode=" + (c.config.mode == dattn::Mode::grouped ? "grouped" : "longnet");
}

DecodeCase random_case(Rng& rng) {
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  DecodeCase c;
  c.B = 1 + pick(rng) % 3;
  c.Hkv = 1 + pick(rng) % 2;
  c.H = c.Hkv * (1 + pick(rng) % 4);
  c.D = std::vector<std::int64_t>{1, 8, 16, 33}[pick(rng) % 4];
  const int G = 1 + pick(rng) % 3;
  for (int i = 0; i < G; ++i) {
    const std::int64_t w = std::vector<std::int64_t>{1, 4, 8, 12, 32, 100}[pick(rng) % 6];
    c.config.segment_lengths.push_back(w);
    c.config.dilation_rates.push_back(1 + pick(rng) % std::min<std::int64_t>(w, 4));
  }
  c.config.mode = pick(rng) % 2 ? dattn::Mode::longnet : dattn::Mode::grouped;
  c.config.causal = true;
  const int tn_kind = pick(rng) % 4;
  c.Tn = tn_kind < 2 ? 1 : tn_kind == 2 ? 2 + pick(rng) % 6 : 13 + pick(rng) % 30;  // also longer than a segment
  c.with_new = pick(rng) % 3 != 0;
  const std::int64_t w0 = c.config.segment_lengths[0];
  for (std::int64_t b = 0; b < c.B; ++b) {
    std::int64_t L;  // the sequence's length after this step
    switch (pick(rng) % 5) {
      case 0: L = c.Tn; break;                                                  // an empty cache before the step
      case 1: L = std::max(c.Tn, (1 + pick(rng) % 3) * w0); break;               // ends at a segment boundary
      case 2: L = std::max(c.Tn, (1 + pick(rng) % 3) * w0 + 1); break;           // one past a boundary
      case 3: L = std::max(c.Tn, (1 + pick(rng) % 3) * w0 - 1); break;           // one before a boundary
      default: L = c.Tn + pick(rng) % (c.Nmax - c.Tn + 1);
    }
    L = std::min(L, c.Nmax);
    c.cached.push_back(std::int32_t(c.with_new ? L - c.Tn : L));
  }
  return c;
}

struct Decoded {
  Tensor k_cache, v_cache, out, lse;
};

// One step on copies of the caches (so the same inputs can run twice).
Decoded decode(const DecodeCase& c, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_new,
               const Tensor& v_new, const Tensor& cached, DType dtype, dattn::Backend backend) {
  auto copy = [&](const Tensor& t) {
    Tensor x = dtype == DType::float64 ? to_f64(t) : Tensor::empty({t.view().shape[0], t.view().shape[1],
                                                                    t.view().shape[2], t.view().shape[3]}, dtype);
    if (dtype != DType::float64) std::memcpy(x.data<void>(), t.data<void>(), t.nbytes());
    return x;
  };
  Decoded r{copy(k_cache), copy(v_cache), Tensor::empty({c.B, c.Tn, c.H, c.D}, dtype),
            Tensor::empty({c.B, c.H, c.Tn}, DType::float32)};
  const Tensor q_in = copy(q), k_in = copy(k_new), v_in = copy(v_new);
  KeyValueCache cache{.k_cache = r.k_cache, .v_cache = r.v_cache, .cache_seqlens = cached};
  if (c.with_new) cache.k_new = k_in.view(), cache.v_new = v_in.view();
  dattn::forward_with_kvcache(c.config, cache, q_in, r.out, r.lse, {.backend = backend});
  return r;
}

class DecodeTest : public ::testing::TestWithParam<DType> {};

TEST_P(DecodeTest, FusedMatchesReferenceAndTheWholeSequence) {
  Rng rng(4200 + int(GetParam()));
  for (int i = 0; i < 60; ++i) {
    const DecodeCase c = random_case(rng);
    SCOPED_TRACE(describe(c));
    const DType dtype = GetParam();
    Tensor q = Tensor::empty({c.B, c.Tn, c.H, c.D}, dtype), k_cache = Tensor::empty({c.B, c.Nmax, c.Hkv, c.D}, dtype),
           v_cache = Tensor::empty({c.B, c.Nmax, c.Hkv, c.D}, dtype), k_new = Tensor::empty({c.B, c.Tn, c.Hkv, c.D}, dtype),
           v_new = Tensor::empty({c.B, c.Tn, c.Hkv, c.D}, dtype);
    for (const Tensor* t : {&q, &k_cache, &v_cache, &k_new, &v_new}) fill_normal(*t, rng);
    Tensor cached = Tensor::empty({c.B}, DType::int32);
    std::copy(c.cached.begin(), c.cached.end(), cached.data<std::int32_t>());

    const Decoded fused = decode(c, q, k_cache, v_cache, k_new, v_new, cached, dtype, dattn::Backend::fused);
    const Decoded ref = decode(c, q, k_cache, v_cache, k_new, v_new, cached, DType::float64, dattn::Backend::reference);
    const Tolerance tol = tolerance(dtype);
    EXPECT_TRUE(close_rel_l2("out", fused.out, ref.out, tol.rel_l2));
    EXPECT_TRUE(lse_close(fused.lse, ref.lse, tol.lse));
    EXPECT_TRUE(close_rel_l2("k_cache", fused.k_cache, ref.k_cache, 0.0));  // the new keys written, nothing else
    for (std::int64_t b = 0; c.with_new && b < c.B; ++b) {
      for (std::int64_t e = 0; e < c.Tn * c.Hkv * c.D; ++e) {
        ASSERT_EQ(load(fused.v_cache, (b * c.Nmax + c.cached[std::size_t(b)]) * c.Hkv * c.D + e),
                  load(v_new, b * c.Tn * c.Hkv * c.D + e));
      }
    }

    // The fused whole-sequence call over each sequence's first L positions gives the same rows.
    for (std::int64_t b = 0; b < c.B; ++b) {
      const std::int64_t L = c.cached[std::size_t(b)] + (c.with_new ? c.Tn : 0);
      Tensor q_full = Tensor::zeros({1, L, c.H, c.D}, dtype), out_full = Tensor::empty({1, L, c.H, c.D}, dtype);
      Tensor lse_full = Tensor::empty({1, c.H, L}, DType::float32);
      const std::size_t row = std::size_t(c.H * c.D) * dattn::dtype_size(dtype);
      std::memcpy(static_cast<char*>(q_full.data<void>()) + (L - c.Tn) * row,
                  static_cast<char*>(q.data<void>()) + b * c.Tn * row, c.Tn * row);
      const TensorView k = fused.k_cache.view().narrow(0, b, 1).narrow(1, 0, L);
      const TensorView v = fused.v_cache.view().narrow(0, b, 1).narrow(1, 0, L);
      dattn::forward(c.config, q_full, k, v, out_full, lse_full);
      EXPECT_TRUE(close_rel_l2("out vs whole sequence", fused.out.view().narrow(0, b, 1),
                               out_full.view().narrow(1, L - c.Tn, c.Tn), tol.rel_l2));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, DecodeTest, ::testing::Values(DType::float32, DType::bfloat16, DType::float16),
                         [](const auto& info) { return std::string(dattn::dtype_name(info.param)); });

// A new token reads only the keys its branches select in its own segments: every other row of the
// cache may hold NaN (earlier segments, rows past L) without reaching the result.
TEST(Decode, ReadsOnlyTheTokensSegments) {
  Rng rng(9);
  for (const auto mode : {dattn::Mode::grouped, dattn::Mode::longnet}) {
    DecodeCase c;
    c.B = 1, c.Tn = 1, c.H = 4, c.Hkv = 2, c.D = 16, c.Nmax = 200, c.cached = {150};
    c.config.segment_lengths = {16, 64}, c.config.dilation_rates = {1, 4}, c.config.mode = mode, c.config.causal = true;
    Tensor q = Tensor::empty({1, 1, c.H, c.D}, DType::float32), k_cache = Tensor::empty({1, c.Nmax, c.Hkv, c.D}, DType::float32),
           v_cache = Tensor::empty({1, c.Nmax, c.Hkv, c.D}, DType::float32), k_new = Tensor::empty({1, 1, c.Hkv, c.D}, DType::float32),
           v_new = Tensor::empty({1, 1, c.Hkv, c.D}, DType::float32);
    for (const Tensor* t : {&q, &k_cache, &v_cache, &k_new, &v_new}) fill_normal(*t, rng);
    Tensor cached = Tensor::empty({1}, DType::int32);
    cached.data<std::int32_t>()[0] = 150;
    const Decoded ref = decode(c, q, k_cache, v_cache, k_new, v_new, cached, DType::float64, dattn::Backend::reference);
    const std::int64_t row = c.Hkv * c.D;  // position 150's segments start at 144 (w = 16) and 128 (w = 64)
    for (const Tensor* t : {&k_cache, &v_cache}) {
      std::fill_n(t->data<float>(), 128 * row, std::numeric_limits<float>::quiet_NaN());
      std::fill_n(t->data<float>() + 151 * row, (c.Nmax - 151) * row, std::numeric_limits<float>::quiet_NaN());
    }
    const Decoded fused = decode(c, q, k_cache, v_cache, k_new, v_new, cached, DType::float32, dattn::Backend::fused);
    EXPECT_TRUE(close_rel_l2("out", fused.out, ref.out, 1e-5));
    EXPECT_TRUE(lse_close(fused.lse, ref.lse, 1e-5));
  }
}

TEST(Decode, WorkspaceBytesAreZeroOnTheCpu) {  // the split-KV kernels' scratch is a CUDA matter
  dattn::DilatedConfig config;
  config.segment_lengths = {16, 64}, config.dilation_rates = {1, 4}, config.causal = true;
  Tensor q = Tensor::empty({2, 1, 4, 16}, DType::float32), cache = Tensor::empty({2, 100, 2, 16}, DType::float32);
  Tensor lengths = Tensor::zeros({2}, DType::int32);
  const dattn::KeyValueCache kv{cache.view(), cache.view(), lengths.view()};
  EXPECT_EQ(dattn::decode_workspace_bytes(config, kv, q.view()), 0u);
  config.causal = false;
  EXPECT_THROW(dattn::decode_workspace_bytes(config, kv, q.view()), dattn::Error);
}

TEST(Decode, ErrorsBeforeTheCacheOrOutIsWritten) {
  const std::int64_t B = 2, Tn = 3, H = 4, Hkv = 2, D = 8, Nmax = 10;
  Rng rng(1);
  Tensor q = Tensor::empty({B, Tn, H, D}, DType::float32), out = Tensor::zeros({B, Tn, H, D}, DType::float32);
  Tensor lse = Tensor::zeros({B, H, Tn}, DType::float32);
  Tensor k_cache = Tensor::empty({B, Nmax, Hkv, D}, DType::float32), v_cache = Tensor::empty({B, Nmax, Hkv, D}, DType::float32);
  Tensor k_new = Tensor::empty({B, Tn, Hkv, D}, DType::float32), v_new = Tensor::empty({B, Tn, Hkv, D}, DType::float32);
  for (const Tensor* t : {&q, &k_cache, &v_cache, &k_new, &v_new}) fill_normal(*t, rng);
  const std::vector<float> k_before(k_cache.data<float>(), k_cache.data<float>() + k_cache.numel());
  Tensor cached = Tensor::empty({B}, DType::int32);
  dattn::DilatedConfig config;
  config.segment_lengths = {4, 8}, config.dilation_rates = {1, 2}, config.causal = true;
  auto call = [&](std::vector<std::int32_t> lengths, bool with_new, const dattn::DilatedConfig& cfg = {}) {
    std::copy(lengths.begin(), lengths.end(), cached.data<std::int32_t>());
    KeyValueCache cache{.k_cache = k_cache, .v_cache = v_cache, .cache_seqlens = cached};
    if (with_new) cache.k_new = k_new.view(), cache.v_new = v_new.view();
    return error_message([&] {
      dattn::forward_with_kvcache(cfg.segment_lengths.empty() ? config : cfg, cache, q, out, lse);
    });
  };
  using ::testing::HasSubstr;
  EXPECT_THAT(call({8, 2}, true), HasSubstr("cache_seqlens[0] = 8 gives L = 11; expected 0 <= L <= Nmax = 10"));
  EXPECT_THAT(call({3, -1}, true), HasSubstr("cache_seqlens[1] = -1"));
  EXPECT_THAT(call({3, 2}, false), HasSubstr("cache_seqlens[1] = 2 < Tn = 3"));
  dattn::DilatedConfig other = config;
  other.causal = false;
  EXPECT_THAT(call({3, 3}, false, other), HasSubstr("causal by definition"));
  other = config, other.dropout_p = 0.1;
  EXPECT_THAT(call({3, 3}, false, other), HasSubstr("dropout_p"));
  KeyValueCache half{.k_cache = k_cache, .v_cache = v_cache, .cache_seqlens = cached, .k_new = k_new.view()};
  EXPECT_THAT(error_message([&] { dattn::forward_with_kvcache(config, half, q, out, lse); }),
              HasSubstr("k_new is set but v_new is not"));
  const Tensor wrong_heads = Tensor::zeros({B, Nmax, 3, D}, DType::float32);
  KeyValueCache three{.k_cache = wrong_heads, .v_cache = wrong_heads, .cache_seqlens = cached};
  EXPECT_THAT(error_message([&] { dattn::forward_with_kvcache(config, three, q, out, lse); }),
              HasSubstr("k has 3 heads and q has H = 4"));
  const Tensor wide = Tensor::zeros({B}, DType::int64);
  KeyValueCache int64_lengths{.k_cache = k_cache, .v_cache = v_cache, .cache_seqlens = wide};
  EXPECT_THAT(error_message([&] { dattn::forward_with_kvcache(config, int64_lengths, q, out, lse); }),
              HasSubstr("cache_seqlens has dtype int64; expected int32"));
  const Tensor short_new = Tensor::zeros({B, Tn - 1, Hkv, D}, DType::float32);
  KeyValueCache bad_new{.k_cache = k_cache, .v_cache = v_cache, .cache_seqlens = cached, .k_new = short_new.view(),
                        .v_new = short_new.view()};
  EXPECT_THAT(error_message([&] { dattn::forward_with_kvcache(config, bad_new, q, out, lse); }), HasSubstr("k_new has shape"));
  for (std::int64_t e = 0; e < k_cache.numel(); ++e) ASSERT_EQ(k_cache.data<float>()[e], k_before[std::size_t(e)]);
  for (std::int64_t e = 0; e < out.numel(); ++e) ASSERT_EQ(out.data<float>()[e], 0.0f);
  EXPECT_EQ(call({3, 7}, true), "no error");
  EXPECT_EQ(cached.data<std::int32_t>()[1], 7);  // cache_seqlens is never modified
}

}  // namespace
}  // namespace dattn_test
