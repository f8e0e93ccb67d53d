// The README's example: dilated attention on q/k/v views of one fused QKV buffer, forward and
// backward, checked against the float64 reference on a small size.
#include <dattn/dattn.hpp>

#include <cmath>
#include <cstdio>
#include <random>

int main() {
  dattn::DilatedConfig config;
  config.segment_lengths = {64, 128, 256};
  config.dilation_rates = {1, 2, 4};

  const std::int64_t B = 1, N = 256, H = 6, D = 32;
  auto qkv = dattn::Tensor::empty({B, N, 3, H, D}, dattn::DType::float32);
  auto dout = dattn::Tensor::empty({B, N, H, D}, dattn::DType::float32);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (std::int64_t i = 0; i < qkv.numel(); ++i) qkv.data<float>()[i] = normal(rng);
  for (std::int64_t i = 0; i < dout.numel(); ++i) dout.data<float>()[i] = normal(rng);
  const auto q = qkv.view().select(2, 0), k = qkv.view().select(2, 1), v = qkv.view().select(2, 2);

  auto out = dattn::Tensor::empty({B, N, H, D}, dattn::DType::float32);
  auto lse = dattn::Tensor::empty({B, H, N}, dattn::DType::float32);
  auto dq = dattn::Tensor::empty({B, N, H, D}, dattn::DType::float32);
  auto dk = dattn::Tensor::empty({B, N, H, D}, dattn::DType::float32);
  auto dv = dattn::Tensor::empty({B, N, H, D}, dattn::DType::float32);
  dattn::forward(config, q, k, v, out, lse);
  dattn::backward(config, q, k, v, out, lse, dout, dq, dk, dv);

  auto ref_out = dattn::Tensor::empty({B, N, H, D}, dattn::DType::float32);
  auto ref_lse = dattn::Tensor::empty({B, H, N}, dattn::DType::float32);
  dattn::forward(config, q, k, v, ref_out, ref_lse, {.backend = dattn::Backend::reference});
  double err = 0, norm = 0;
  for (std::int64_t i = 0; i < out.numel(); ++i) {
    const double x = out.data<float>()[i], r = ref_out.data<float>()[i];
    err += (x - r) * (x - r);
    norm += r * r;
  }
  const double relative = std::sqrt(err / norm);
  std::printf("dattn example: relative error of out vs reference %.2e\n", relative);
  return relative < 1e-5 ? 0 : 1;
}
