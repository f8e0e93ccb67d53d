// dattn-bench-gpu: times the CUDA backend on docs/benchmarks.md's configurations after checking it.
//
// For each (config, dtype): random normal inputs on the device (a Philox fill, never zeros),
// correctness first (seed: the whole forward and backward against the float64 reference;
// long configs: out and lse of sampled rows against a float64 recomputation of just those rows),
// then CUDA-event timings: forward, and forward+backward (forward then backward, as
// `out.sum().backward()` includes the forward), median [min-max] of --repeats after --warmup,
// rotating among input sets so that the inputs of small configs do not sit in L2.
// Prints a markdown table (stdout) and writes --json FILE; stderr also gets, per row, the host's time
// inside the calls (fwd_host_us, fwdbwd_host_us in the JSON: validation, planning, launches).
//
// Configs seed, long64k, long256k; NAME-hilbert and NAME-identity run NAME through a Hilbert order
// (dattn::hilbert_sequence_order) or the identity index map (LaunchOptions::position_index).
// Usage: dattn-bench-gpu [--configs seed,long256k] [--dtypes bf16,fp16,fp32,tf32] [--repeats N]
//                        [--warmup N] [--json FILE] [--cuda-kernels auto,sm80,sm90] [--no-workspace]
//                        [--sm90-forward-rows 0,128,192] [--sm90-backward-dq auto,atomic,blocks]
//                        [--sm90-forward-passes 0,1,2,3] [--sm90-backward-passes N]
// --no-workspace: the backward gets no delta workspace (a C++ caller's default; the kernels then
// compute delta themselves) instead of the one the Python package passes.
// --cuda-kernels times each listed kernel generation (LaunchOptions::cuda_kernels); the
// implementation column names the generations that ran (forward/backward).
// --sm90-forward-rows 0,128,192 times each listed block shape of the sm90 forward
// (LaunchOptions::sm90_forward_rows; 0 = chosen per call, the default).
// --sm90-forward-passes 0,1,2,3 times each listed number of query tiles a block of the sm90 forward
// works through (LaunchOptions::sm90_forward_passes; 0 = chosen per call, the default).
// --sm90-backward-passes N: LaunchOptions::sm90_backward_passes for every run (0, the default,
// chooses per call; 1 or 2 force the own key tiles a dk/dv block with dQ by atomics works through).
// --sm90-backward-dq auto,atomic,blocks times each listed way of the sm90 backward's dQ
// (LaunchOptions::sm90_backward_dq); peak MB adds the high-water mark of the device's memory pool
// during the timed calls (the atomic dQ's scratch).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "dattn/dattn.hpp"

namespace {

#define CUDA_OK(x)                                                                                   \
  do {                                                                                               \
    const cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) throw std::runtime_error(std::string(#x) + ": " + cudaGetErrorString(e_)); \
  } while (0)

enum class Order { row_major, hilbert, identity };

struct Config {
  std::string name;
  std::int64_t B, N, H, D;
  std::vector<std::int64_t> w, r;
  Order order = Order::row_major;  // NAME-hilbert, NAME-identity: through that index map
};

Config config_by_name(const std::string& name) {
  for (const auto& [suffix, order] : {std::pair{"-hilbert", Order::hilbert}, {"-identity", Order::identity}}) {
    const std::string tail = suffix;
    if (name.size() > tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0) {
      Config c = config_by_name(name.substr(0, name.size() - tail.size()));
      c.name = name;
      c.order = order;
      return c;
    }
  }
  if (name == "seed") return {name, 2, 2048, 12, 64, {512, 1024, 2048}, {1, 2, 4}};
  if (name == "long64k") return {name, 1, 65536, 12, 64, {2048, 4096, 8192, 16384}, {1, 2, 4, 8}};
  if (name == "long256k") return {name, 1, 262144, 12, 64, {2048, 4096, 8192, 16384}, {1, 2, 4, 8}};
  throw std::invalid_argument("unknown config " + name + "; expected seed, long64k or long256k, optionally with "
                              "-hilbert or -identity");
}

// The config's index map (curve position -> original row), empty in row-major order.
std::vector<std::int64_t> index_map(const Config& c) {
  if (c.order == Order::hilbert) return dattn::hilbert_sequence_order(c.N);
  std::vector<std::int64_t> index;
  if (c.order == Order::identity)
    for (std::int64_t i = 0; i < c.N; ++i) index.push_back(i);
  return index;
}

struct DtypeChoice {
  std::string label;
  dattn::DType dtype;
  bool tf32;
};

DtypeChoice dtype_by_name(const std::string& n) {
  if (n == "bf16") return {"bf16", dattn::DType::bfloat16, false};
  if (n == "fp16") return {"fp16", dattn::DType::float16, false};
  if (n == "fp32") return {"fp32", dattn::DType::float32, false};
  if (n == "tf32") return {"fp32 (use_tf32)", dattn::DType::float32, true};
  throw std::invalid_argument("unknown dtype " + n);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// ---- device fill: normal draws from Philox (Box-Muller) ----
__global__ void fill_normal_kernel(void* data, std::int64_t n, int kind, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) {
    const dattn::PhiloxWords w = dattn::philox4x32_10({{std::uint32_t(i), std::uint32_t(i >> 32), 7, 0}},
                                                      std::uint32_t(seed), std::uint32_t(seed >> 32));
    const float u1 = (float(w.w[0]) + 1.0f) * 2.3283064e-10f, u2 = float(w.w[1]) * 2.3283064e-10f;
    const float x = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    if (kind == 0) static_cast<float*>(data)[i] = x;
    else if (kind == 1) {
      const __nv_bfloat16 b = __float2bfloat16_rn(x);
      static_cast<__nv_bfloat16*>(data)[i] = b;
    } else {
      static_cast<__half*>(data)[i] = __float2half_rn(x);
    }
  }
}

void fill_normal(void* data, std::int64_t n, dattn::DType t, std::uint64_t seed) {
  const int kind = t == dattn::DType::float32 ? 0 : t == dattn::DType::bfloat16 ? 1 : 2;
  fill_normal_kernel<<<1024, 256>>>(data, n, kind, seed);
  CUDA_OK(cudaGetLastError());
}

double host_value(const std::vector<unsigned char>& bytes, dattn::DType t, std::int64_t i) {
  if (t == dattn::DType::float32) {
    float f;
    std::memcpy(&f, bytes.data() + i * 4, 4);
    return f;
  }
  std::uint16_t b;
  std::memcpy(&b, bytes.data() + i * 2, 2);
  return t == dattn::DType::bfloat16 ? dattn::bfloat16_to_float(b) : dattn::float16_to_float(b);
}

struct Tensors {
  std::int64_t elements = 0;
  std::size_t bytes = 0;
  std::vector<void*> q, k, v, dout;  // one per rotation set
  void *out = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr;
  float* lse = nullptr;
  float* workspace = nullptr;  // the backward's delta, [B, H, N] float32
  std::int64_t* index = nullptr;  // the config's index map, [N] int64 (row-major order: none)
  std::size_t total_bytes = 0;
  ~Tensors() {
    for (auto* vec : {&q, &k, &v, &dout})
      for (void* p : *vec) cudaFree(p);
    for (void* p : {out, dq, dk, dv, static_cast<void*>(lse), static_cast<void*>(workspace), static_cast<void*>(index)})
      cudaFree(p);
  }
};

struct Timing {
  double median = 0, min = 0, max = 0;
  double host_us = 0;  // median host time of the call itself (until it returns, before the GPU finishes)
};
Timing summarise(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t.front(), t.back()};
}

std::string fmt(const char* f, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

// JSON has no inf or nan.
std::string num(double x) { return std::isfinite(x) ? fmt("%.6g", x) : std::string("null"); }

// Relative L2 error of a device tensor against a float64 host tensor (inf for NaN/Inf).
double rel_l2(const void* device, dattn::DType t, const dattn::Tensor& ref) {
  const std::int64_t n = ref.numel();
  std::vector<unsigned char> host(std::size_t(n) * dattn::dtype_size(t));
  CUDA_OK(cudaMemcpy(host.data(), device, host.size(), cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double a = host_value(host, t, i), b = ref.data<double>()[i];
    if (!std::isfinite(a)) return INFINITY;
    num += (a - b) * (a - b);
    den += b * b;
  }
  return den == 0 ? (num == 0 ? 0 : INFINITY) : std::sqrt(num / den);
}

// out and lse of `samples` random rows against float64 recomputation (grouped mode, not causal,
// no mask, no dropout: docs/benchmarks.md's configurations); under an index map the positions are
// curve positions, each the tensor row index[position].
void check_sampled_rows(const Config& c, dattn::DType t, const Tensors& x, const std::vector<std::int64_t>& index,
                        double& out_err, double& lse_err) {
  auto original = [&](std::int64_t pos) { return index.empty() ? pos : index[std::size_t(pos)]; };
  const std::size_t es = dattn::dtype_size(t);
  const std::int64_t G = std::int64_t(c.w.size());
  std::mt19937_64 rng(1);
  double num = 0, den = 0;
  lse_err = 0;
  std::vector<unsigned char> row(std::size_t(c.D) * es), krow(row.size()), vrow(row.size());
  for (int s = 0; s < 48; ++s) {
    const std::int64_t b = std::int64_t(rng() % std::uint64_t(c.B)), h = std::int64_t(rng() % std::uint64_t(c.H));
    std::int64_t first = 0, branch = 0;
    for (std::int64_t i = 0; i < G; ++i) {
      const std::int64_t count = c.H / G + (i < c.H % G ? 1 : 0);
      if (h < first + count) {
        branch = i;
        break;
      }
      first += count;
    }
    const std::int64_t w = c.w[std::size_t(branch)], r = c.r[std::size_t(branch)], o = branch % r;
    const std::int64_t segment = std::int64_t(rng() % std::uint64_t(c.N / w));
    const std::int64_t L = (w - o + r - 1) / r, j = std::int64_t(rng() % std::uint64_t(L));
    const std::int64_t p = segment * w + o + j * r;
    auto fetch = [&](const void* base, std::int64_t pos, std::vector<unsigned char>& dst) {
      const std::int64_t off = ((b * c.N + original(pos)) * c.H + h) * c.D;
      CUDA_OK(cudaMemcpy(dst.data(), static_cast<const unsigned char*>(base) + off * std::int64_t(es), dst.size(),
                         cudaMemcpyDeviceToHost));
    };
    fetch(x.q[0], p, row);
    std::vector<double> qv(static_cast<std::size_t>(c.D)), acc(static_cast<std::size_t>(c.D), 0.0), scores(static_cast<std::size_t>(L));
    for (std::int64_t d = 0; d < c.D; ++d) qv[std::size_t(d)] = host_value(row, t, d);
    const double scale = 1.0 / std::sqrt(double(c.D));
    double mx = -INFINITY;
    for (std::int64_t kj = 0; kj < L; ++kj) {
      fetch(x.k[0], segment * w + o + kj * r, krow);
      double sdot = 0;
      for (std::int64_t d = 0; d < c.D; ++d) sdot += qv[std::size_t(d)] * host_value(krow, t, d);
      scores[std::size_t(kj)] = sdot * scale;
      mx = std::max(mx, sdot * scale);
    }
    double sum = 0;
    for (std::int64_t kj = 0; kj < L; ++kj) {
      const double e = std::exp(scores[std::size_t(kj)] - mx);
      sum += e;
      fetch(x.v[0], segment * w + o + kj * r, vrow);
      for (std::int64_t d = 0; d < c.D; ++d) acc[std::size_t(d)] += e * host_value(vrow, t, d);
    }
    fetch(x.out, p, row);
    for (std::int64_t d = 0; d < c.D; ++d) {
      const double ref = acc[std::size_t(d)] / sum / double(G), got = host_value(row, t, d);
      num += (got - ref) * (got - ref);
      den += ref * ref;
      if (!std::isfinite(got)) num = INFINITY;
    }
    float lse_got;
    CUDA_OK(cudaMemcpy(&lse_got, x.lse + (b * c.H + h) * c.N + original(p), 4, cudaMemcpyDeviceToHost));
    const double lse_ref = mx + std::log(sum);
    lse_err = std::max(lse_err, std::isfinite(lse_got) ? std::fabs(lse_got - lse_ref) / std::max(1.0, std::fabs(lse_ref)) : INFINITY);
  }
  out_err = std::sqrt(num / den);
}

struct Row {
  std::string impl, config, dtype;
  double flops = 0;
  Timing fwd, fwdbwd;
  double peak_mb = 0;
  double err_out = 0, err_lse = 0, err_grad = -1;
  bool correct = true;
};

dattn::CudaKernels kernels_by_name(const std::string& n) {
  if (n == "auto") return dattn::CudaKernels::automatic;
  if (n == "sm80") return dattn::CudaKernels::sm80;
  if (n == "sm90") return dattn::CudaKernels::sm90;
  throw std::invalid_argument("unknown kernel generation " + n + "; expected auto, sm80 or sm90");
}

dattn::BackwardDq backward_dq_by_name(const std::string& n) {
  if (n == "auto") return dattn::BackwardDq::automatic;
  if (n == "atomic") return dattn::BackwardDq::atomic;
  if (n == "blocks") return dattn::BackwardDq::dq_blocks;
  throw std::invalid_argument("unknown sm90 backward dQ " + n + "; expected auto, atomic or blocks");
}

Row run(const Config& c, const DtypeChoice& dt, const std::string& kernels, int sm90_rows, int sm90_passes,
        int backward_passes, const std::string& dq_path, bool workspace, int warmup, int repeats) {
  Row row;
  row.config = c.name;
  row.dtype = dt.label;
  dattn::DilatedConfig config;
  config.segment_lengths = c.w;
  config.dilation_rates = c.r;
  config.use_tf32 = dt.tf32;
  row.flops = dattn::forward_flops(config, c.B, c.N, c.H, c.D);

  Tensors x;
  x.elements = c.B * c.N * c.H * c.D;
  x.bytes = std::size_t(x.elements) * dattn::dtype_size(dt.dtype);
  const std::size_t lse_bytes = std::size_t(c.B * c.H * c.N) * 4;
  // Enough input sets that one rotation is larger than L2 (50 MB on an H100), at most 8.
  const int sets = int(std::clamp<std::size_t>((200u << 20) / (4 * x.bytes) + 1, 1, 8));
  for (int s = 0; s < sets; ++s)
    for (auto* vec : {&x.q, &x.k, &x.v, &x.dout}) {
      void* p = nullptr;
      CUDA_OK(cudaMalloc(&p, x.bytes));
      fill_normal(p, x.elements, dt.dtype, 1000 * std::uint64_t(s) + vec->size() + 17 * std::uint64_t(vec == &x.k) +
                                              31 * std::uint64_t(vec == &x.v) + 57 * std::uint64_t(vec == &x.dout));
      vec->push_back(p);
    }
  for (void** p : {&x.out, &x.dq, &x.dk, &x.dv}) CUDA_OK(cudaMalloc(p, x.bytes));
  CUDA_OK(cudaDeviceSynchronize());  // the fills ran on the legacy stream; the calls run on another
  CUDA_OK(cudaMalloc(&x.lse, lse_bytes));
  CUDA_OK(cudaMalloc(&x.workspace, lse_bytes));
  // What a framework would hold for one forward+backward: q, k, v, out, lse, dout, dq, dk, dv and
  // the backward's workspace (as the Python package passes it; dattn allocates nothing else).
  row.peak_mb = double(8 * x.bytes + 2 * lse_bytes) / double(1 << 20);

  const dattn::Device dev{dattn::DeviceType::cuda, 0};
  auto view = [&](void* p) { return dattn::make_view(p, dt.dtype, {c.B, c.N, c.H, c.D}, {}, dev); };
  const dattn::TensorView lse = dattn::make_view(x.lse, dattn::DType::float32, {c.B, c.H, c.N}, {}, dev);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  dattn::LaunchOptions options;
  options.stream = stream;
  options.cuda_kernels = kernels_by_name(kernels);
  options.sm90_forward_rows = sm90_rows;
  options.sm90_forward_passes = sm90_passes;
  options.sm90_backward_passes = backward_passes;
  options.sm90_backward_dq = backward_dq_by_name(dq_path);
  // An index map (the -hilbert and -identity configs): on the device, vouched for (no check per call).
  std::vector<std::int64_t> index = index_map(c);
  if (!index.empty()) {
    CUDA_OK(cudaMalloc(&x.index, index.size() * sizeof(std::int64_t)));
    CUDA_OK(cudaMemcpy(x.index, index.data(), index.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice));
    options.position_index = dattn::make_view(x.index, dattn::DType::int64, {c.N}, {}, dev);
    options.position_index_checked = true;
  }
  dattn::LaunchOptions backward_options = options;
  if (workspace) {
    backward_options.workspace = x.workspace;
    backward_options.workspace_bytes = lse_bytes;
  }
  row.impl = workspace ? "dattn CUDA" : "dattn CUDA (no workspace)";
  for (const dattn::LaunchOptions* o : {&options, &backward_options}) {
    row.impl += std::string(o == &options ? " " : "/") +
                (dattn::cuda_kernel_generation(view(x.q[0]), o != &options, *o) == dattn::CudaKernels::sm90 ? "sm90" : "sm80");
    // The sm90 forward whose producer loads by TMA (builds with DATTN_SM90_TMA).
    if (o == &options && dattn::cuda_forward_uses_tma(config, view(x.q[0]), view(x.k[0]), view(x.v[0]), view(x.out), lse, options))
      row.impl += " tma";
  }
  if (sm90_rows > 0) row.impl += " (" + std::to_string(sm90_rows) + "-row forward blocks)";
  if (sm90_passes > 0) row.impl += " (" + std::to_string(sm90_passes) + "-pass forward blocks)";
  if (backward_passes > 0) row.impl += " (" + std::to_string(backward_passes) + "-pass backward blocks)";
  if (dq_path != "auto") row.impl += " (dQ " + dq_path + ")";
  auto forward = [&](int s) { dattn::forward(config, view(x.q[s]), view(x.k[s]), view(x.v[s]), view(x.out), lse, options); };
  auto backward = [&](int s) {
    dattn::backward(config, view(x.q[s]), view(x.k[s]), view(x.v[s]), view(x.out), lse, view(x.dout[s]), view(x.dq),
                    view(x.dk), view(x.dv), backward_options);
  };

  // Correctness first.
  forward(0);
  backward(0);
  CUDA_OK(cudaStreamSynchronize(stream));
  const double tol = dt.dtype == dattn::DType::bfloat16 ? 1.5e-2 : dt.dtype == dattn::DType::float16 ? 3e-3 : dt.tf32 ? 3e-3 : 1e-5;
  const double lse_tol = dt.dtype == dattn::DType::float32 ? (dt.tf32 ? 3e-3 : 1e-5) : 1e-3;
  if (c.N * c.B <= 8192) {
    auto host64 = [&](const void* p) {
      std::vector<unsigned char> bytes(x.bytes);
      CUDA_OK(cudaMemcpy(bytes.data(), p, x.bytes, cudaMemcpyDeviceToHost));
      dattn::Tensor t = dattn::Tensor::empty({c.B, c.N, c.H, c.D}, dattn::DType::float64);
      for (std::int64_t i = 0; i < x.elements; ++i) t.data<double>()[i] = host_value(bytes, dt.dtype, i);
      return t;
    };
    const dattn::Tensor q = host64(x.q[0]), k = host64(x.k[0]), v = host64(x.v[0]), g = host64(x.dout[0]);
    dattn::Tensor out = dattn::Tensor::empty({c.B, c.N, c.H, c.D}, dattn::DType::float64);
    dattn::Tensor lse_ref = dattn::Tensor::empty({c.B, c.H, c.N}, dattn::DType::float32);
    dattn::Tensor dq = dattn::Tensor::empty({c.B, c.N, c.H, c.D}, dattn::DType::float64);
    dattn::Tensor dk = dattn::Tensor::empty({c.B, c.N, c.H, c.D}, dattn::DType::float64);
    dattn::Tensor dv = dattn::Tensor::empty({c.B, c.N, c.H, c.D}, dattn::DType::float64);
    dattn::LaunchOptions ref;
    ref.backend = dattn::Backend::reference;
    if (!index.empty()) ref.position_index = dattn::make_view(index.data(), dattn::DType::int64, {c.N}, {}, {});
    dattn::DilatedConfig ref_config = config;
    dattn::forward(ref_config, q, k, v, out, lse_ref, ref);
    dattn::backward(ref_config, q, k, v, out, lse_ref, g, dq, dk, dv, ref);
    row.err_out = rel_l2(x.out, dt.dtype, out);
    row.err_grad = std::max({rel_l2(x.dq, dt.dtype, dq), rel_l2(x.dk, dt.dtype, dk), rel_l2(x.dv, dt.dtype, dv)});
    std::vector<float> lse_got(std::size_t(c.B * c.H * c.N));
    CUDA_OK(cudaMemcpy(lse_got.data(), x.lse, lse_bytes, cudaMemcpyDeviceToHost));
    row.err_lse = 0;
    for (std::size_t i = 0; i < lse_got.size(); ++i) {
      const double a = lse_got[i], b = lse_ref.data<float>()[i];
      row.err_lse = std::max(row.err_lse, std::isinf(b) ? (a == b ? 0.0 : INFINITY) : std::fabs(a - b) / std::max(1.0, std::fabs(b)));
    }
    row.correct = row.err_out <= tol && row.err_grad <= tol && row.err_lse <= lse_tol;
  } else {
    check_sampled_rows(c, dt.dtype, x, index, row.err_out, row.err_lse);
    row.correct = row.err_out <= tol && row.err_lse <= lse_tol;
  }

  cudaEvent_t start, stop;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  // The GPU time between events around the call (the host's launch latency counted: each call
  // starts on an idle GPU), and the host's own time in the call (what Python's calls add to).
  auto time = [&](auto&& body) {
    std::vector<double> ms, host_us;
    for (int i = 0; i < warmup + repeats; ++i) {
      const int s = i % sets;
      CUDA_OK(cudaEventRecord(start, stream));
      const auto host_start = std::chrono::steady_clock::now();
      body(s);
      const auto host_end = std::chrono::steady_clock::now();
      CUDA_OK(cudaEventRecord(stop, stream));
      CUDA_OK(cudaEventSynchronize(stop));
      float t = 0;
      CUDA_OK(cudaEventElapsedTime(&t, start, stop));
      if (i >= warmup) {
        ms.push_back(t);
        host_us.push_back(std::chrono::duration<double, std::micro>(host_end - host_start).count());
      }
    }
    Timing timing = summarise(ms);
    timing.host_us = summarise(host_us).median;
    return timing;
  };
  cudaMemPool_t pool;
  CUDA_OK(cudaDeviceGetMemPool(&pool, 0));
  std::uint64_t pool_high = 0;
  CUDA_OK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &pool_high));
  row.fwd = time([&](int s) { forward(s); });
  row.fwdbwd = time([&](int s) {
    forward(s);
    backward(s);
  });
  CUDA_OK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &pool_high));
  row.peak_mb += double(pool_high) / double(1 << 20);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
  return row;
}

}  // namespace

int main(int argc, char** argv) try {
  std::vector<std::string> configs{"seed", "long256k"}, dtypes{"bf16", "fp16", "fp32", "tf32"}, kernels{"auto"};
  std::vector<std::string> sm90_rows{"0"}, sm90_passes{"0"}, dq_paths{"auto"};
  int warmup = 5, repeats = 20, backward_passes = 0;
  std::string json_path;
  bool workspace = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--configs") configs = split(next());
    else if (a == "--dtypes") dtypes = split(next());
    else if (a == "--warmup") warmup = std::atoi(next().c_str());
    else if (a == "--repeats") repeats = std::atoi(next().c_str());
    else if (a == "--json") json_path = next();
    else if (a == "--cuda-kernels") kernels = split(next());
    else if (a == "--no-workspace") workspace = false;
    else if (a == "--sm90-forward-rows") sm90_rows = split(next());
    else if (a == "--sm90-forward-passes") sm90_passes = split(next());
    else if (a == "--sm90-backward-passes") backward_passes = std::atoi(next().c_str());
    else if (a == "--sm90-backward-dq") dq_paths = split(next());
    else throw std::invalid_argument("unknown argument " + a);
  }
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::fprintf(stderr, "device: %s\n", prop.name);
  std::vector<Row> rows;
  for (const std::string& cn : configs)
    for (const std::string& dn : dtypes)
      for (const std::string& kn : kernels)
        for (const std::string& rn : sm90_rows)
          for (const std::string& pn : sm90_passes)
            for (const std::string& dqn : dq_paths) {
              const Config c = config_by_name(cn);
              const DtypeChoice dt = dtype_by_name(dn);
              std::fprintf(stderr, "dattn %s %s (%s kernels, sm90 forward rows %s, passes %s, dQ %s) ...\n", cn.c_str(),
                           dt.label.c_str(), kn.c_str(), rn.c_str(), pn.c_str(), dqn.c_str());
              rows.push_back(run(c, dt, kn, std::atoi(rn.c_str()), std::atoi(pn.c_str()), backward_passes, dqn, workspace,
                                 warmup, cn == "seed" ? std::max(repeats, 50) : repeats));
            }
  std::printf("| implementation | config | dtype | fwd ms [min-max] | fwd TFLOP/s | fwd+bwd ms [min-max] | fwd+bwd TFLOP/s | peak MB | error out / lse / grads |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    const std::string err = fmt("%.1e", r.err_out) + " / " + fmt("%.1e", r.err_lse) + " / " +
                            (r.err_grad < 0 ? std::string("(sampled)") : fmt("%.1e", r.err_grad));
    if (!r.correct) {
      std::printf("| %s | %s | %s | WRONG | — | WRONG | — | — | %s |\n", r.impl.c_str(), r.config.c_str(), r.dtype.c_str(),
                  err.c_str());
      continue;
    }
    std::printf("| %s | %s | %s | %.3f [%.3f-%.3f] | %.1f | %.3f [%.3f-%.3f] | %.1f | %.0f | %s |\n", r.impl.c_str(), r.config.c_str(),
                r.dtype.c_str(), r.fwd.median, r.fwd.min, r.fwd.max, r.flops / r.fwd.median / 1e9, r.fwdbwd.median,
                r.fwdbwd.min, r.fwdbwd.max, 3.5 * r.flops / r.fwdbwd.median / 1e9, r.peak_mb, err.c_str());
    std::fprintf(stderr, "%s %s %s: host time in the calls (median) fwd %.1f us, fwd+bwd %.1f us\n", r.impl.c_str(),
                 r.config.c_str(), r.dtype.c_str(), r.fwd.host_us, r.fwdbwd.host_us);
  }
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << "{\"device\": \"" << prop.name << "\", \"rows\": [\n";
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      f << "  {\"impl\": \"" << r.impl << "\", \"config\": \"" << r.config << "\", \"dtype\": \"" << r.dtype
        << "\", \"correct\": " << (r.correct ? "true" : "false") << ", \"flops\": " << r.flops
        << ", \"fwd_ms\": " << r.fwd.median << ", \"fwd_min\": " << r.fwd.min << ", \"fwd_max\": " << r.fwd.max
        << ", \"fwdbwd_ms\": " << r.fwdbwd.median << ", \"fwdbwd_min\": " << r.fwdbwd.min << ", \"fwdbwd_max\": " << r.fwdbwd.max
        << ", \"fwd_host_us\": " << r.fwd.host_us << ", \"fwdbwd_host_us\": " << r.fwdbwd.host_us
        << ", \"peak_mb\": " << r.peak_mb << ", \"err_out\": " << num(r.err_out) << ", \"err_lse\": " << num(r.err_lse)
        << ", \"err_grad\": " << num(r.err_grad) << "}" << (i + 1 < rows.size() ? ",\n" : "\n");
    }
    f << "]}\n";
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "dattn-bench-gpu: %s\n", e.what());
  return 1;
}
