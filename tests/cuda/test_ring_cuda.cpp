// GPU tests of the ring engine (dattn::ring_forward / ring_backward on CUDA tensors): P ranks, each
// with its shard on the device and its own stream, run the ring; the gathered out, lse, dq, dk, dv
// are compared with the float64 reference of the whole sequence at SPEC.md's bars. Random
// configurations: both layouts and modes, causal, key padding, dropout, segments shorter than,
// equal to and longer than N/P, bf16 and fp32, grouped-query heads (k, v and dk, dv with Hkv < H
// heads, which travel as they are); and block-sparse masks (random density, shared or per head,
// blocks that tile each rank's rows). Before them (in-process ranks), the bytes each rank sends
// under grouped-query heads: Hkv / H of what H heads of keys would take.
//
// Usage: dattn-test-ring-cuda [--cases N] [--seed S] [--nccl]
//   default: P = 1..4 in-process ranks (threads, make_in_process_group) on GPU 0
//   --nccl:  one rank per GPU over NCCL (ncclCommInitAll in this process), P = the GPU count
// Prints one line per case and "N passed, M failed"; exit 0 when all passed, 77 without the GPUs.
#include <cuda_runtime.h>
#ifdef DATTN_WITH_NCCL
#include <nccl.h>
#endif

#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <sstream>
#include <thread>

#include "../case_config.hpp"
#include "dattn/dattn.hpp"
#include "host_data.hpp"

namespace {

using namespace dattn_gpu_test;
using dattn::Layout;
using dattn::Tensor;
using dattn::TensorView;
using dattn_test::block_sparse_config_of;
using dattn_test::config_of;

struct Case {
  int P = 2;
  Layout layout = Layout::contiguous;
  bool causal = false, padding = false;
  dattn::Mode mode = dattn::Mode::grouped;
  DType dtype = DType::bfloat16;
  std::int64_t B = 1, N = 64, H = 2, D = 64;
  std::int64_t Hkv = 2;  // k, v, dk, dv heads (a divisor of H; H without grouped-query heads)
  double dropout_p = 0;
  std::uint64_t dropout_seed = 20261207;  // the same for every case
  std::vector<std::int64_t> w, r;
  std::int64_t block_size = 0;  // > 0: block-sparse attention with a random mask (w, r unused)
  double density = 0;
  std::int64_t mask_heads = 1;
};

std::string describe(const Case& c) {
  std::ostringstream s;
  s << "P=" << c.P << " N=" << c.N << " B=" << c.B << " H=" << c.H;
  if (c.Hkv != c.H) s << " Hkv=" << c.Hkv;
  s << " D=" << c.D << " w=[";
  for (std::size_t i = 0; i < c.w.size(); ++i) s << (i ? "," : "") << c.w[i] << "/" << c.r[i];
  s << "] " << (c.layout == Layout::zigzag ? "zigzag" : "contiguous") << " "
    << (c.mode == dattn::Mode::grouped ? "grouped" : "longnet") << " causal=" << c.causal << " padding=" << c.padding
    << " " << dattn::dtype_name(c.dtype);
  if (c.dropout_p > 0) s << " dropout=" << c.dropout_p;
  if (c.block_size) s << " block-sparse block=" << c.block_size << " density=" << c.density << " mask_heads=" << c.mask_heads;
  return s.str();
}

Case random_case(Rng& rng, int ranks) {
  Case c;
  c.P = ranks > 0 ? ranks : int(uniform(rng, 1, 4));
  c.layout = chance(rng, 0.5) ? Layout::zigzag : Layout::contiguous;
  c.causal = chance(rng, 0.5);
  c.padding = chance(rng, 0.3);
  c.mode = chance(rng, 0.5) ? dattn::Mode::longnet : dattn::Mode::grouped;
  c.dtype = chance(rng, 0.5) ? DType::bfloat16 : DType::float32;
  const std::int64_t unit = c.layout == Layout::zigzag ? 2 * c.P : c.P;
  c.N = unit * uniform(rng, 1, 320 / unit);
  c.B = uniform(rng, 1, 2);
  c.H = uniform(rng, 1, 6);
  c.Hkv = c.H;
  if (c.H > 1 && chance(rng, 0.4)) {  // grouped-query heads: a proper divisor of H (1: multi-query)
    std::vector<std::int64_t> divisors;
    for (std::int64_t d = 1; d < c.H; ++d)
      if (c.H % d == 0) divisors.push_back(d);
    c.Hkv = divisors[rng() % divisors.size()];
  }
  c.dropout_p = chance(rng, 0.25) ? 0.2 : 0.0;
  c.D = 64;  // the ring moves rows of any D; the head dims are dattn-test-cuda's
  const std::int64_t G = uniform(rng, 1, 3);
  for (std::int64_t g = 0; g < G; ++g) {
    const std::int64_t w = std::max<std::int64_t>(1, (c.N / c.P) * uniform(rng, 1, 3) / 2 + uniform(rng, 0, 4));
    c.w.push_back(w);
    c.r.push_back(uniform(rng, 1, std::min<std::int64_t>(w, 4)));
  }
  if (chance(rng, 0.35)) {
    static const std::int64_t sizes[] = {16, 32, 48, 64};
    static const double densities[] = {0.1, 0.3, 0.6, 1.0};
    c.block_size = sizes[rng() % 4];
    c.density = densities[rng() % 4];
    c.mask_heads = chance(rng, 0.5) ? 1 : c.H;
    const std::int64_t step = unit * c.block_size;
    c.N = step * uniform(rng, 1, std::max<std::int64_t>(1, 768 / step));
  }
  return c;
}

dattn::BlockSparseMask random_block_mask(const Case& c, Rng& rng) {
  const std::int64_t nb = c.N / c.block_size;
  Tensor dense = Tensor::zeros({c.mask_heads, nb, nb}, DType::boolean);
  for (std::int64_t i = 0; i < dense.numel(); ++i) dense.data<std::uint8_t>()[i] = chance(rng, c.density);
  return dattn::BlockSparseMask::from_dense(dense.view());
}

Tensor random_tensor(const std::vector<std::int64_t>& shape, DType dtype, Rng& rng) {
  Tensor t = Tensor::empty(shape, dtype);
  std::normal_distribution<double> normal;
  for (std::int64_t i = 0; i < t.numel(); ++i) store(t.data<std::byte>(), dtype, i, normal(rng));
  return t;
}

Tensor to_f64(const TensorView& x) {
  Tensor t = Tensor::empty({x.shape.begin(), x.shape.begin() + x.rank}, DType::float64);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = load(x.data, x.dtype, i);
  return t;
}

// Relative L2 error; a reference at round-off (RMS <= 1e-12: a gradient that is 0 mathematically)
// holds the result to RMS <= tol instead.
double rel_l2(const TensorView& x, const Tensor& ref, double tol) {
  double num = 0, den = 0;
  for (std::int64_t i = 0; i < ref.numel(); ++i) {
    const double a = load(x.data, x.dtype, i), b = ref.data<double>()[i];
    if (!std::isfinite(a)) return INFINITY;
    num += (a - b) * (a - b), den += b * b;
  }
  const double count = double(ref.numel());
  if (std::sqrt(den / count) <= 1e-12) return std::sqrt(num / count) <= tol ? 0 : std::sqrt(num / count);
  return std::sqrt(num / den);
}

std::string lse_problem(const TensorView& x, const TensorView& ref, double tol) {
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    const double a = x.ptr<float>()[i], b = ref.ptr<float>()[i];
    const bool ok = std::isinf(b) ? (std::isinf(a) && a < 0) : std::fabs(a - b) <= tol * std::max(1.0, std::fabs(b));
    if (!ok) return "lse[" + std::to_string(i) + "] = " + std::to_string(a) + ", reference " + std::to_string(b);
  }
  return "";
}

// A device copy of a host tensor, freed with the object.
struct DeviceTensor {
  void* data = nullptr;
  Tensor host;
  DeviceTensor(const Tensor& like, int device) : host(Tensor::empty(shape_of(like), like.view().dtype)) {
    std::memcpy(host.data<std::byte>(), like.data<std::byte>(), like.nbytes());
    CUDA_OK(cudaMalloc(&data, std::max<std::size_t>(like.nbytes(), 16)));
    CUDA_OK(cudaMemcpy(data, host.data<std::byte>(), host.nbytes(), cudaMemcpyHostToDevice));
    device_ = device;
  }
  ~DeviceTensor() { cudaFree(data); }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
  TensorView view() const { return dattn::make_view(data, host.view().dtype, shape_of(host), {}, {dattn::DeviceType::cuda, device_}); }
  Tensor download() {
    CUDA_OK(cudaMemcpy(host.data<std::byte>(), data, host.nbytes(), cudaMemcpyDeviceToHost));
    return std::move(host);
  }
  static std::vector<std::int64_t> shape_of(const Tensor& t) {
    const TensorView v = t.view();
    return {v.shape.begin(), v.shape.begin() + v.rank};
  }

 private:
  int device_ = 0;
};

// One rank's part of the call: shards to the device, the ring forward and backward, results back.
struct RankResult {
  Tensor out, lse, dq, dk, dv;
  std::string error;
};

RankResult run_rank(const Case& c, dattn::Communicator& comm, int device, const std::vector<const Tensor*>& inputs,
                    const Tensor* mask, const dattn::BlockSparseMask* block_mask) {
  RankResult result;
  try {
    CUDA_OK(cudaSetDevice(device));
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const int rank = comm.rank();
    auto shard = [&](const Tensor& t, int dim) { return dattn::shard_sequence(t.view(), rank, c.P, c.layout, dim); };
    DeviceTensor q(shard(*inputs[0], 1), device), k(shard(*inputs[1], 1), device), v(shard(*inputs[2], 1), device),
        dout(shard(*inputs[3], 1), device);
    const std::int64_t n = c.N / c.P;
    DeviceTensor out(Tensor::zeros({c.B, n, c.H, c.D}, c.dtype), device), lse(Tensor::zeros({c.B, c.H, n}, DType::float32), device);
    DeviceTensor dq(Tensor::zeros({c.B, n, c.H, c.D}, c.dtype), device),
        dk(Tensor::zeros({c.B, n, c.Hkv, c.D}, c.dtype), device), dv(Tensor::zeros({c.B, n, c.Hkv, c.D}, c.dtype), device);
    std::optional<DeviceTensor> mask_device;
    dattn::DilatedConfig config = config_of(c);
    if (mask) {
      mask_device.emplace(shard(*mask, 1), device);
      config.key_padding_mask = mask_device->view();
    }
    if (block_mask) {
      const dattn::BlockSparseConfig sparse = block_sparse_config_of(c.block_size, config);
      const dattn::BlockSparseMask on_device = block_mask->to_device({dattn::DeviceType::cuda, device});
      dattn::ring_forward(comm, sparse, on_device, c.layout, c.N, q.view(), k.view(), v.view(), out.view(), lse.view(),
                          nullptr, stream);
      dattn::ring_backward(comm, sparse, on_device, c.layout, c.N, q.view(), k.view(), v.view(), out.view(), lse.view(),
                           dout.view(), dq.view(), dk.view(), dv.view(), nullptr, stream);
    } else {
      dattn::ring_forward(comm, config, c.layout, c.N, q.view(), k.view(), v.view(), out.view(), lse.view(), nullptr,
                          stream);
      dattn::ring_backward(comm, config, c.layout, c.N, q.view(), k.view(), v.view(), out.view(), lse.view(),
                           dout.view(), dq.view(), dk.view(), dv.view(), nullptr, stream);
    }
    CUDA_OK(cudaStreamSynchronize(stream));
    CUDA_OK(cudaStreamDestroy(stream));
    result.out = out.download(), result.lse = lse.download();
    result.dq = dq.download(), result.dk = dk.download(), result.dv = dv.download();
  } catch (const std::exception& e) {
    result.error = e.what();
  }
  return result;
}

// Runs case c over P communicators (one thread each) and checks the gathered results.
std::string run_case(const Case& c, std::vector<std::unique_ptr<dattn::Communicator>>& comms, bool one_gpu_each,
                     Rng& rng) {
  const std::vector<std::int64_t> shape{c.B, c.N, c.H, c.D}, kv_shape{c.B, c.N, c.Hkv, c.D};
  const Tensor q = random_tensor(shape, c.dtype, rng), k = random_tensor(kv_shape, c.dtype, rng),
               v = random_tensor(kv_shape, c.dtype, rng), dout = random_tensor(shape, c.dtype, rng);
  Tensor mask = Tensor::zeros({c.B, c.N}, DType::boolean);
  if (c.padding)
    for (std::int64_t i = 0; i < mask.numel(); ++i) mask.data<std::uint8_t>()[i] = chance(rng, 0.2);
  std::optional<dattn::BlockSparseMask> block_mask;
  if (c.block_size) block_mask = random_block_mask(c, rng);
  std::vector<RankResult> results(std::size_t(c.P));
  std::vector<std::thread> threads;
  for (int p = 0; p < c.P; ++p)
    threads.emplace_back([&, p] {
      results[std::size_t(p)] = run_rank(c, *comms[std::size_t(p)], one_gpu_each ? p : 0, {&q, &k, &v, &dout},
                                         c.padding ? &mask : nullptr, block_mask ? &*block_mask : nullptr);
    });
  for (auto& t : threads) t.join();
  for (const RankResult& r : results)
    if (!r.error.empty()) return "exception: " + r.error;

  // The float64 reference of the whole sequence.
  const dattn::DilatedConfig config = config_of(c, c.padding ? std::optional(mask.view()) : std::nullopt);
  const Tensor q64 = to_f64(q.view()), k64 = to_f64(k.view()), v64 = to_f64(v.view()), g64 = to_f64(dout.view());
  Tensor out64 = Tensor::empty(shape, DType::float64), lse64 = Tensor::empty({c.B, c.H, c.N}, DType::float32);
  Tensor dq64 = Tensor::empty(shape, DType::float64), dk64 = Tensor::empty(kv_shape, DType::float64),
         dv64 = Tensor::empty(kv_shape, DType::float64);
  if (block_mask) {
    const dattn::BlockSparseConfig sparse = block_sparse_config_of(c.block_size, config);
    dattn::block_sparse_forward(sparse, *block_mask, q64, k64, v64, out64, lse64);
    dattn::block_sparse_backward(sparse, *block_mask, q64, k64, v64, out64, lse64, g64, dq64, dk64, dv64);
  } else {
    dattn::forward(config, q64, k64, v64, out64, lse64);
    dattn::backward(config, q64, k64, v64, out64, lse64, g64, dq64, dk64, dv64);
  }

  auto gather = [&](Tensor RankResult::*field, int dim) {
    std::vector<TensorView> parts;
    for (const RankResult& r : results) parts.push_back((r.*field).view());
    return dattn::unshard_sequence(parts, c.layout, dim);
  };
  const double bar = c.dtype == DType::bfloat16 ? 1.5e-2 : 1e-5, lse_bar = c.dtype == DType::bfloat16 ? 1e-3 : 1e-5;
  std::ostringstream problems;
  const struct {
    const char* name;
    Tensor RankResult::*field;
    const Tensor* ref;
  } checks[] = {{"out", &RankResult::out, &out64}, {"dq", &RankResult::dq, &dq64}, {"dk", &RankResult::dk, &dk64},
                {"dv", &RankResult::dv, &dv64}};
  for (const auto& ch : checks) {
    const Tensor got = gather(ch.field, 1);
    const double e = rel_l2(got.view(), *ch.ref, bar);
    if (!(e <= bar)) problems << ch.name << " relative L2 error " << e << " > " << bar << "; ";
  }
  const Tensor lse = gather(&RankResult::lse, 2);
  if (std::string m = lse_problem(lse.view(), lse64.view(), lse_bar); !m.empty()) problems << m << "; ";
  return problems.str();
}

// Under grouped-query heads the CUDA ring moves k, v (and, back, dk, dv) with their Hkv heads: P = 4
// in-process ranks, N = 64, H = 4 query heads, one segment over the whole sequence (every rank
// needs every key of the 3 others). Each rank sends 3 · 16 rows · Hkv heads of k and v (bf16) in
// the forward; in the backward those again and their float32 gradients back. Returns the problems.
std::string grouped_query_bytes_problems() {
  constexpr int P = 4;
  constexpr std::int64_t B = 1, N = 64, H = 4, D = 64, n = N / P;
  std::ostringstream problems;
  for (const std::int64_t Hkv : {4, 2, 1}) {
    std::vector<dattn::RingStats> forward(P), backward(P);
    std::vector<std::string> errors(P);
    auto group = dattn::make_in_process_group(P);
    std::vector<std::thread> threads;
    for (int rank = 0; rank < P; ++rank)
      threads.emplace_back([&, rank] {
        try {
          CUDA_OK(cudaSetDevice(0));
          cudaStream_t stream;
          CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
          const Tensor rows = Tensor::zeros({B, n, H, D}, DType::bfloat16), kv_rows = Tensor::zeros({B, n, Hkv, D}, DType::bfloat16);
          DeviceTensor q(rows, 0), k(kv_rows, 0), v(kv_rows, 0), dout(rows, 0), out(rows, 0), dq(rows, 0), dk(kv_rows, 0),
              dv(kv_rows, 0), lse(Tensor::zeros({B, H, n}, DType::float32), 0);
          dattn::DilatedConfig config;
          config.segment_lengths = {N};
          config.dilation_rates = {1};
          dattn::Communicator& comm = *group[std::size_t(rank)];
          dattn::ring_forward(comm, config, Layout::contiguous, N, q.view(), k.view(), v.view(), out.view(), lse.view(),
                              &forward[std::size_t(rank)], stream);
          dattn::ring_backward(comm, config, Layout::contiguous, N, q.view(), k.view(), v.view(), out.view(), lse.view(),
                               dout.view(), dq.view(), dk.view(), dv.view(), &backward[std::size_t(rank)], stream);
          CUDA_OK(cudaStreamSynchronize(stream));
          CUDA_OK(cudaStreamDestroy(stream));
        } catch (const std::exception& e) {
          errors[std::size_t(rank)] = e.what();
        }
      });
    for (auto& t : threads) t.join();
    const std::int64_t entries = 3 * n * Hkv;
    const std::int64_t keys = entries * 2 * D * 2, gradients = entries * 2 * D * 4;  // k, v bf16; dk, dv float32
    for (int rank = 0; rank < P; ++rank) {
      const dattn::RingStats &f = forward[std::size_t(rank)], &b = backward[std::size_t(rank)];
      if (!errors[std::size_t(rank)].empty()) {
        problems << "Hkv=" << Hkv << " rank " << rank << ": exception: " << errors[std::size_t(rank)] << "; ";
        continue;
      }
      if (f.bytes_sent != keys || f.bytes_received != keys || b.bytes_sent != keys + gradients ||
          b.bytes_received != keys + gradients)
        problems << "Hkv=" << Hkv << " rank " << rank << ": forward sent " << f.bytes_sent << " received "
                 << f.bytes_received << ", backward sent " << b.bytes_sent << " received " << b.bytes_received
                 << "; expected " << keys << " and " << keys + gradients << "; ";
    }
  }
  return problems.str();
}

}  // namespace

int main(int argc, char** argv) {
  int cases = 40;
  std::uint64_t seed = 20261125;
  bool nccl = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--cases" && i + 1 < argc) cases = std::atoi(argv[++i]);
    else if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--nccl") nccl = true;
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  std::vector<std::unique_ptr<dattn::Communicator>> fixed;
#ifdef DATTN_WITH_NCCL
  std::vector<ncclComm_t> nccl_comms;
#endif
  if (nccl) {
#ifdef DATTN_WITH_NCCL
    if (devices < 2) {
      std::printf("--nccl needs 2 or more GPUs, found %d: skipped\n", devices);
      return 77;
    }
    nccl_comms.resize(std::size_t(devices));
    std::vector<int> list(static_cast<std::size_t>(devices));
    for (int d = 0; d < devices; ++d) list[std::size_t(d)] = d;
    if (ncclCommInitAll(nccl_comms.data(), devices, list.data()) != ncclSuccess) {
      std::printf("ncclCommInitAll failed\n");
      return 1;
    }
    for (auto& comm : nccl_comms) fixed.push_back(dattn::make_nccl_communicator(&comm));
#else
    std::printf("--nccl: this build has no NCCL (DATTN_NCCL=ON)\n");
    return 2;
#endif
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device: %s x %d, %s\n", prop.name, devices, nccl ? "NCCL, one rank per GPU" : "in-process ranks on GPU 0");
  std::fflush(stdout);
  Rng rng(seed);
  int passed = 0, failed = 0;
  if (!nccl) {
    const std::string problems = grouped_query_bytes_problems();
    (problems.empty() ? passed : failed)++;
    std::printf("%s bytes under grouped-query heads (P=4 N=64 H=4, Hkv=4,2,1): k, v and dk, dv travel with Hkv heads%s%s\n",
                problems.empty() ? "ok" : "FAIL", problems.empty() ? "" : "\n    ", problems.c_str());
    std::fflush(stdout);
  }
  for (int i = 0; i < cases; ++i) {
    const Case c = random_case(rng, nccl ? devices : 0);
    std::vector<std::unique_ptr<dattn::Communicator>> group;
    if (!nccl) group = dattn::make_in_process_group(c.P);
    const std::string problems = run_case(c, nccl ? fixed : group, nccl, rng);
    (problems.empty() ? passed : failed)++;
    std::printf("%s case %d: %s%s%s\n", problems.empty() ? "ok" : "FAIL", i, describe(c).c_str(),
                problems.empty() ? "" : "\n    ", problems.c_str());
    std::fflush(stdout);
  }
  fixed.clear();
#ifdef DATTN_WITH_NCCL
  for (auto& comm : nccl_comms) ncclCommDestroy(comm);
#endif
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
