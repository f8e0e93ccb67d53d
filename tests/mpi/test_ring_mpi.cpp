// Ring attention over MPI: every rank holds its rows, runs ring_forward and ring_backward
// (dilated configurations, then random block-sparse masks), and checks its rows against
// whole-sequence attention computed locally (small sizes) at the SPEC bars. Rank 0 prints
// "N passed, M failed"; the exit status is nonzero on any failure.
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>

#include "dattn/dattn.hpp"

namespace {

using dattn::DType;
using dattn::Layout;
using dattn::Tensor;
using dattn::TensorView;

double relative_error(const TensorView& x, const TensorView& ref) {  // x float32 or bf16, ref float64
  double diff = 0, norm = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    const double a = x.dtype == DType::float32 ? x.ptr<float>()[i] : dattn::bfloat16_to_float(x.ptr<std::uint16_t>()[i]);
    const double r = ref.ptr<double>()[i];
    if (!std::isfinite(a)) return INFINITY;
    diff += (a - r) * (a - r);
    norm += r * r;
  }
  // A reference that is 0 up to round-off (dq, dk of rows whose keys are one key: Σ_j P_j = 1)
  // holds x to RMS <= the bar instead, as tests/harness.hpp's ZeroReference::cancellation.
  const double count = double(x.numel());
  if (std::sqrt(norm / count) <= 1e-12) return std::sqrt(diff / count);
  return std::sqrt(diff / norm);
}

Tensor to_f64(const Tensor& t) {
  Tensor out = Tensor::empty({t.view().shape[0], t.view().shape[1], t.view().shape[2], t.view().shape[3]}, DType::float64);
  for (std::int64_t i = 0; i < t.numel(); ++i)
    out.data<double>()[i] = t.view().dtype == DType::float32 ? t.data<float>()[i]
                                                            : dattn::bfloat16_to_float(t.data<std::uint16_t>()[i]);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  auto comm = dattn::make_mpi_communicator();
  const int P = comm->size(), rank = comm->rank();
  int passed = 0, failed = 0;
  std::mt19937_64 rng(99);  // the same on every rank: the same problems
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  // This rank's rows of the ring's results against the float64 whole-sequence reference.
  auto check = [&](int i, std::int64_t N, Layout layout, DType dtype, const Tensor* got, const Tensor* ref) {
    auto shard = [&](const Tensor& global) { return dattn::shard_sequence(global.view(), rank, P, layout); };
    const double bar = dtype == DType::float32 ? 1e-5 : 1.5e-2;
    double errors[4];
    bool ok = true;
    for (int j = 0; j < 4; ++j) ok = (errors[j] = relative_error(got[j], shard(ref[j]))) <= bar && ok;
    int all_ok = ok;
    MPI_Allreduce(MPI_IN_PLACE, &all_ok, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    (all_ok ? passed : failed)++;
    if (!ok)
      std::fprintf(stderr, "rank %d case %d (N=%ld, P=%d, %s): errors out %.2e dq %.2e dk %.2e dv %.2e > %.1e\n", rank, i,
                   long(N), P, layout == Layout::zigzag ? "zigzag" : "contiguous", errors[0], errors[1], errors[2],
                   errors[3], bar);
  };
  for (int i = 0; i < 16; ++i) {
    const Layout layout = i % 2 ? Layout::zigzag : Layout::contiguous;
    const std::int64_t unit = layout == Layout::zigzag ? 2 * P : P;
    const std::int64_t B = 1 + pick(rng) % 2, N = unit * (1 + pick(rng) % (64 / unit + 1)), H = 1 + pick(rng) % 3, D = 16;
    const DType dtype = i % 4 == 3 ? DType::bfloat16 : DType::float32;
    dattn::DilatedConfig config;
    for (int g = 0; g < 1 + pick(rng) % 3; ++g) {
      const std::int64_t w = std::max<std::int64_t>(1, (N / P) * (1 + pick(rng) % 4) / 2 + pick(rng) % 3);
      config.segment_lengths.push_back(w);
      config.dilation_rates.push_back(1 + pick(rng) % std::min<std::int64_t>(w, 3));
    }
    config.mode = pick(rng) % 2 ? dattn::Mode::longnet : dattn::Mode::grouped;
    config.causal = pick(rng) % 2;
    const std::vector<std::int64_t> shape{B, N, H, D};
    Tensor q = Tensor::empty(shape, dtype), k = Tensor::empty(shape, dtype), v = Tensor::empty(shape, dtype),
           dout = Tensor::empty(shape, dtype);
    std::normal_distribution<float> normal;
    for (Tensor* t : {&q, &k, &v, &dout})
      for (std::int64_t e = 0; e < t->numel(); ++e) {
        const float x = normal(rng);
        if (dtype == DType::float32) t->data<float>()[e] = x;
        else t->data<std::uint16_t>()[e] = dattn::float_to_bfloat16(x);
      }
    auto shard = [&](const Tensor& global) { return dattn::shard_sequence(global.view(), rank, P, layout); };
    const Tensor lq = shard(q), lk = shard(k), lv = shard(v), ldout = shard(dout);
    const std::int64_t n = lq.view().shape[1];
    Tensor out = Tensor::empty({B, n, H, D}, dtype), lse = Tensor::empty({B, H, n}, DType::float32);
    Tensor dq = Tensor::empty({B, n, H, D}, dtype), dk = Tensor::empty({B, n, H, D}, dtype), dv = Tensor::empty({B, n, H, D}, dtype);
    dattn::ring_forward(*comm, config, layout, N, lq, lk, lv, out, lse);
    dattn::ring_backward(*comm, config, layout, N, lq, lk, lv, out, lse, ldout, dq, dk, dv);

    Tensor ref = Tensor::empty(shape, DType::float64), ref_lse = Tensor::empty({B, H, N}, DType::float32);
    Tensor dq64 = Tensor::empty(shape, DType::float64), dk64 = Tensor::empty(shape, DType::float64),
           dv64 = Tensor::empty(shape, DType::float64);
    const Tensor q64 = to_f64(q), k64 = to_f64(k), v64 = to_f64(v);
    dattn::forward(config, q64, k64, v64, ref, ref_lse);
    dattn::backward(config, q64, k64, v64, ref, ref_lse, to_f64(dout), dq64, dk64, dv64);
    const Tensor got[] = {std::move(out), std::move(dq), std::move(dk), std::move(dv)};
    const Tensor refs[] = {std::move(ref), std::move(dq64), std::move(dk64), std::move(dv64)};
    check(i, N, layout, dtype, got, refs);
  }
  for (int i = 16; i < 24; ++i) {  // block-sparse masks on the same ring
    const Layout layout = i % 2 ? Layout::zigzag : Layout::contiguous;
    const std::int64_t parts = layout == Layout::zigzag ? 2 * P : P, block = 1 + pick(rng) % 4;
    const std::int64_t B = 1 + pick(rng) % 2, N = parts * block * (1 + pick(rng) % 3), H = 1 + pick(rng) % 3, D = 16;
    const std::int64_t nb = N / block;
    Tensor dense = Tensor::zeros({nb, nb}, DType::boolean);
    for (std::int64_t e = 0; e < dense.numel(); ++e) dense.data<std::uint8_t>()[e] = pick(rng) % 3 == 0;
    const dattn::BlockSparseMask mask = dattn::BlockSparseMask::from_dense(dense);
    dattn::BlockSparseConfig config;
    config.block_size = block;
    config.causal = pick(rng) % 2;
    const std::vector<std::int64_t> shape{B, N, H, D};
    Tensor q = Tensor::empty(shape, DType::float32), k = Tensor::empty(shape, DType::float32),
           v = Tensor::empty(shape, DType::float32), dout = Tensor::empty(shape, DType::float32);
    std::normal_distribution<float> normal;
    for (Tensor* t : {&q, &k, &v, &dout})
      for (std::int64_t e = 0; e < t->numel(); ++e) t->data<float>()[e] = normal(rng);
    auto shard = [&](const Tensor& global) { return dattn::shard_sequence(global.view(), rank, P, layout); };
    const Tensor lq = shard(q), lk = shard(k), lv = shard(v), ldout = shard(dout);
    const std::int64_t n = lq.view().shape[1];
    Tensor out = Tensor::empty({B, n, H, D}, DType::float32), lse = Tensor::empty({B, H, n}, DType::float32);
    Tensor dq = Tensor::empty({B, n, H, D}, DType::float32), dk = Tensor::empty({B, n, H, D}, DType::float32),
           dv = Tensor::empty({B, n, H, D}, DType::float32);
    dattn::ring_forward(*comm, config, mask, layout, N, lq, lk, lv, out, lse);
    dattn::ring_backward(*comm, config, mask, layout, N, lq, lk, lv, out, lse, ldout, dq, dk, dv);
    Tensor ref = Tensor::empty(shape, DType::float64), ref_lse = Tensor::empty({B, H, N}, DType::float32);
    Tensor dq64 = Tensor::empty(shape, DType::float64), dk64 = Tensor::empty(shape, DType::float64),
           dv64 = Tensor::empty(shape, DType::float64);
    const Tensor q64 = to_f64(q), k64 = to_f64(k), v64 = to_f64(v);
    dattn::block_sparse_forward(config, mask, q64, k64, v64, ref, ref_lse);
    dattn::block_sparse_backward(config, mask, q64, k64, v64, ref, ref_lse, to_f64(dout), dq64, dk64, dv64);
    const Tensor got[] = {std::move(out), std::move(dq), std::move(dk), std::move(dv)};
    const Tensor refs[] = {std::move(ref), std::move(dq64), std::move(dk64), std::move(dv64)};
    check(i, N, layout, DType::float32, got, refs);
  }
  if (rank == 0) std::printf("%d passed, %d failed\n", passed, failed);
  MPI_Finalize();
  return failed == 0 ? 0 : 1;
}
