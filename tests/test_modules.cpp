// The C++ multi-head modules: gradients by central finite differences (float64), the module
// against the same math composed here with the same weights, fused against unfused, float32
// against float64, and the errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "harness.hpp"

namespace dattn_test {
namespace {

using dattn::ForwardOptions;
using dattn::Linear;
using dattn::MultiheadConfig;
using dattn::MultiheadDilatedAttention;

MultiheadConfig config(bool fused, dattn::Mode mode, DType dtype) {
  MultiheadConfig c;
  c.embed_dim = 12;
  c.num_heads = 3;
  c.segment_lengths = {4, 8};
  c.dilation_rates = {1, 2};
  c.mode = mode;
  c.fused_qkv = fused;
  c.dtype = dtype;
  return c;
}

Tensor random(const std::vector<std::int64_t>& shape, DType dtype, Rng& rng) {
  Tensor t = Tensor::empty(shape, dtype);
  fill_normal(t.view(), rng);
  return t;
}

// Nonzero biases and LayerNorm shift, so their gradients are exercised.
void randomize_biases(MultiheadDilatedAttention& m, Rng& rng) {
  for (Linear* l : {&m.q_proj, &m.k_proj, &m.v_proj, &m.qkv_proj, &m.out_proj})
    if (l->bias && l->bias->value.data<std::byte>()) fill_normal(l->bias->value.view(), rng);
  fill_normal(m.norm_bias.value.view(), rng);
}

double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) s += a.data<double>()[i] * b.data<double>()[i];
  return s;
}

class ModuleGradientTest : public ::testing::TestWithParam<std::tuple<bool, bool, dattn::Mode>> {};

TEST_P(ModuleGradientTest, MatchesFiniteDifferences) {
  const auto [fused, self, mode] = GetParam();
  Rng rng(5);
  MultiheadDilatedAttention m(config(fused, mode, DType::float64), 9);
  randomize_biases(m, rng);
  const std::int64_t B = 2, N = 11, E = 12;
  Tensor x = random({B, N, E}, DType::float64, rng), y = random({B, N, E}, DType::float64, rng),
         z = random({B, N, E}, DType::float64, rng), w = random({B, N, E}, DType::float64, rng);
  ForwardOptions options;
  options.causal = true;
  auto loss = [&] { return dot(self ? m.forward(x, x, x, options) : m.forward(x, y, z, options), w); };
  MultiheadDilatedAttention::Saved saved;
  self ? m.forward(x, x, x, options, &saved) : m.forward(x, y, z, options, &saved);
  m.zero_grad();
  const auto grads = m.backward(saved, w);
  auto check = [&](const char* name, Tensor& param, const Tensor& grad) {
    for (int k = 0; k < 12; ++k) {
      const std::int64_t i = (k * 7919) % param.numel();
      double& p = param.data<double>()[i];
      const double old = p, h = 1e-6;
      p = old + h;
      const double up = loss();
      p = old - h;
      const double down = loss();
      p = old;
      const double fd = (up - down) / (2 * h);
      EXPECT_NEAR(grad.data<double>()[i], fd, 1e-6 * std::max(1.0, std::fabs(fd))) << name << "[" << i << "]";
    }
  };
  check("query", x, grads.query);
  if (!self) {
    check("key", y, grads.key);
    check("value", z, grads.value);
  }
  Linear& first = fused ? m.qkv_proj : m.q_proj;
  check("q weight", first.weight.value, first.weight.grad);
  check("q bias", first.bias->value, first.bias->grad);
  if (!fused) check("v weight", m.v_proj.weight.value, m.v_proj.weight.grad);
  check("out weight", m.out_proj.weight.value, m.out_proj.weight.grad);
  check("norm weight", m.norm_weight.value, m.norm_weight.grad);
  check("norm bias", m.norm_bias.value, m.norm_bias.grad);
}

INSTANTIATE_TEST_SUITE_P(All, ModuleGradientTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool(),
                                            ::testing::Values(dattn::Mode::grouped, dattn::Mode::longnet)));

// y = x Wᵀ + b in float64, by loops.
Tensor linear(const Tensor& x, const double* weight, const double* bias, std::int64_t out_features) {
  const std::int64_t rows = x.numel() / x.view().shape[x.view().rank - 1], in = x.view().shape[x.view().rank - 1];
  Tensor y = Tensor::empty({rows, out_features}, DType::float64);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t o = 0; o < out_features; ++o) {
      double s = bias ? bias[o] : 0.0;
      for (std::int64_t i = 0; i < in; ++i) s += x.data<double>()[r * in + i] * weight[o * in + i];
      y.data<double>()[r * out_features + o] = s;
    }
  return y;
}

TEST(ModuleTest, EqualsTheSameMathComposedByHand) {
  Rng rng(6);
  MultiheadDilatedAttention m(config(false, dattn::Mode::grouped, DType::float64), 3);
  randomize_biases(m, rng);
  const std::int64_t B = 2, N = 10, E = 12, H = 3, D = 4;
  Tensor x = random({B, N, E}, DType::float64, rng);
  const Tensor out = m.forward(x, x, x);

  const Tensor q = linear(x, m.q_proj.weight.value.data<double>(), m.q_proj.bias->value.data<double>(), E);
  const Tensor k = linear(x, m.k_proj.weight.value.data<double>(), m.k_proj.bias->value.data<double>(), E);
  const Tensor v = linear(x, m.v_proj.weight.value.data<double>(), m.v_proj.bias->value.data<double>(), E);
  auto heads = [&](const Tensor& t) { return dattn::make_view(t.data<double>(), DType::float64, {B, N, H, D}); };
  Tensor attention = Tensor::empty({B, N, H, D}, DType::float64), lse = Tensor::empty({B, H, N}, DType::float32);
  dattn::DilatedConfig c;
  c.segment_lengths = {4, 8};
  c.dilation_rates = {1, 2};
  dattn::forward(c, heads(q), heads(k), heads(v), attention, lse, {.backend = dattn::Backend::reference});
  Tensor normed = Tensor::empty({B * N, E}, DType::float64);
  for (std::int64_t r = 0; r < B * N; ++r) {
    double mean = 0, var = 0;
    for (std::int64_t e = 0; e < E; ++e) mean += attention.data<double>()[r * E + e] / E;
    for (std::int64_t e = 0; e < E; ++e) var += std::pow(attention.data<double>()[r * E + e] - mean, 2) / E;
    for (std::int64_t e = 0; e < E; ++e)
      normed.data<double>()[r * E + e] = (attention.data<double>()[r * E + e] - mean) / std::sqrt(var + 1e-5) *
                                             m.norm_weight.value.data<double>()[e] +
                                         m.norm_bias.value.data<double>()[e];
  }
  const Tensor expected =
      linear(normed, m.out_proj.weight.value.data<double>(), m.out_proj.bias->value.data<double>(), E);
  for (std::int64_t i = 0; i < out.numel(); ++i)
    EXPECT_NEAR(out.data<double>()[i], expected.data<double>()[i], 1e-12) << i;
}

TEST(ModuleTest, FusedEqualsUnfusedWithTheSameWeights) {
  Rng rng(8);
  for (DType dtype : {DType::float64, DType::float32}) {
    MultiheadDilatedAttention plain(config(false, dattn::Mode::longnet, dtype), 1);
    MultiheadDilatedAttention fused(config(true, dattn::Mode::longnet, dtype), 2);
    randomize_biases(plain, rng);
    const std::size_t slice = plain.q_proj.weight.value.nbytes(), bias = plain.q_proj.bias->value.nbytes();
    const Linear* parts[3] = {&plain.q_proj, &plain.k_proj, &plain.v_proj};
    for (int i = 0; i < 3; ++i) {
      std::memcpy(fused.qkv_proj.weight.value.data<std::byte>() + i * slice, parts[i]->weight.value.data<std::byte>(), slice);
      std::memcpy(fused.qkv_proj.bias->value.data<std::byte>() + i * bias, parts[i]->bias->value.data<std::byte>(), bias);
    }
    std::memcpy(fused.out_proj.weight.value.data<std::byte>(), plain.out_proj.weight.value.data<std::byte>(), slice);
    std::memcpy(fused.out_proj.bias->value.data<std::byte>(), plain.out_proj.bias->value.data<std::byte>(), bias);
    std::memcpy(fused.norm_bias.value.data<std::byte>(), plain.norm_bias.value.data<std::byte>(), bias);
    Tensor x = random({2, 9, 12}, dtype, rng);
    const Tensor a = plain.forward(x, x, x), b = fused.forward(x, x, x);
    EXPECT_TRUE(close_rel_l2("fused vs unfused", b.view(), to_f64(a.view()), dtype == DType::float64 ? 1e-13 : 1e-6));
  }
}

TEST(ModuleTest, Float32MatchesFloat64WithTheSameWeights) {
  Rng rng(10);
  MultiheadDilatedAttention m64(config(true, dattn::Mode::grouped, DType::float64), 4);
  MultiheadDilatedAttention m32(config(true, dattn::Mode::grouped, DType::float32), 4);
  randomize_biases(m64, rng);
  auto copy = [](const Tensor& from, Tensor& to) {
    for (std::int64_t i = 0; i < from.numel(); ++i) to.data<float>()[i] = float(from.data<double>()[i]);
  };
  copy(m64.qkv_proj.weight.value, m32.qkv_proj.weight.value);
  copy(m64.qkv_proj.bias->value, m32.qkv_proj.bias->value);
  copy(m64.out_proj.weight.value, m32.out_proj.weight.value);
  copy(m64.out_proj.bias->value, m32.out_proj.bias->value);
  copy(m64.norm_bias.value, m32.norm_bias.value);
  Tensor x32 = random({2, 13, 12}, DType::float32, rng);
  const Tensor x64 = to_f64(x32.view());
  const Tensor y32 = m32.forward(x32, x32, x32), y64 = m64.forward(x64, x64, x64);
  EXPECT_TRUE(close_rel_l2("float32 module", y32.view(), y64, 1e-5));
}

TEST(ModuleTest, ErrorsNameTheArgument) {
  using ::testing::HasSubstr;
  MultiheadConfig bad = config(false, dattn::Mode::grouped, DType::float32);
  bad.num_heads = 5;
  EXPECT_THAT(error_message([&] { MultiheadDilatedAttention m(bad); }), HasSubstr("divisible"));
  MultiheadDilatedAttention m(config(false, dattn::Mode::grouped, DType::float32));
  Tensor wrong = Tensor::zeros({2, 5, 10}, DType::float32), x = Tensor::zeros({2, 5, 12}, DType::float32);
  EXPECT_THAT(error_message([&] { m.forward(wrong, wrong, wrong); }), HasSubstr("query"));
  Tensor x64 = Tensor::zeros({2, 5, 12}, DType::float64);
  EXPECT_THAT(error_message([&] { m.forward(x, x64, x); }), HasSubstr("key has dtype"));
}

}  // namespace
}  // namespace dattn_test
