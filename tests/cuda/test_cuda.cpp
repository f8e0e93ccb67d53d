// GPU tests of the CUDA backend against the float64 reference (a plain program, no GoogleTest, so
// that it builds on the GPU machine too). Each case draws a random problem (SPEC.md's features:
// both modes, causal, partial segments, r = w, H < G, key padding, dropout, fused-QKV and random
// strided layouts; spread scores), runs dattn::forward and dattn::backward on the GPU with every output buffer
// poisoned (NaN bytes), and compares out, lse, dq, dk, dv with Backend::reference on float64
// copies of the same rounded inputs at SPEC.md's bars. It also checks that no byte outside the
// output views changed and that the inputs are untouched.
//
// Ring cases run the whole call as the one-pass ring steps of P ranks (ring_forward_step,
// ring_step_gradients) and compare the merged results with the same reference.
//
// Usage: dattn-test-cuda [--cases N] [--seed S] [--max-n N] [--threads T] [--head-dims 16,64,...]
//                        [--fixed-only | --random-only | --passes-only | --spread-only] [--block-sparse]
//                        [--verbose]
//                        [--cuda-kernels auto|sm80|sm90]
// --block-sparse makes every random case a block-sparse one (for the sanitizers' few cases).
// --passes-only runs small cases whose forward blocks work through several query tiles (the
// sanitizers' check of LaunchOptions::sm90_forward_passes), and the refusal and NaN checks;
// --spread-only the same with small spread-score cases (the sm90 forward's rare path of the running
// max, for the sanitizers).
// --cuda-kernels picks the kernel generation (LaunchOptions::cuda_kernels; ring steps always run the
// automatic choice); every case line and the summary name the generations that ran.
// Prints a line per case (ok or FAIL, the kernel generations that ran it: forward/backward, the
// forward's and the backward's "sm90 tma" where its producer loaded by TMA, a DATTN_SM90_TMA build's
// path for the calls it covers), the failures' details, and "N passed, M failed"; exit 0 when all passed, 77 without
// a GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "../case_config.hpp"
#include "dattn/dattn.hpp"
#include "host_data.hpp"

namespace {

using namespace dattn_gpu_test;
using dattn_test::block_sparse_config_of;
using dattn_test::config_of;

dattn::CudaKernels g_cuda_kernels = dattn::CudaKernels::automatic;  // --cuda-kernels

const char* generation_name(dattn::CudaKernels k) {
  return k == dattn::CudaKernels::sm90 ? "sm90" : k == dattn::CudaKernels::sm80 ? "sm80" : "automatic";
}

// ---- a case ----
struct Case {
  std::uint64_t seed = 0;
  DType dtype = DType::bfloat16;
  bool tf32 = false;
  std::int64_t B = 1, N = 1, H = 1, D = 64;
  std::int64_t Hkv = 0;  // key/value heads (grouped-query heads: a divisor of H); 0 means H
  std::vector<std::int64_t> w{1}, r{1};
  dattn::Mode mode = dattn::Mode::grouped;
  bool causal = false;
  std::optional<double> scale;
  std::vector<std::uint8_t> padding;  // empty or [B*N]
  double dropout_p = 0;
  std::uint64_t dropout_seed = 0, dropout_offset = 0;
  bool fused_qkv = false, strided = false;
  bool hilbert = false;  // attend in the plain-sequence Hilbert order (position_index on the device)
  int ring_ranks = 0;    // > 0: the whole call as the ring steps of this many ranks (one-pass form)
  bool zigzag = false;
  // Block-sparse attention (w, r unused): a random mask of `density` over blocks of block_size,
  // [mask_heads, nb, nb] (mask_heads 1: shared by the heads).
  std::int64_t block_size = 0, mask_heads = 1;
  double density = 0;
  // Spread scores (spread > 0): key rows scaled by `spread`, either every other run of 128 positions
  // (steps) or one row in 32 (hot keys), so that a later key tile's scores pass a row's running max
  // by far more than the forward's margin (the sm90 forward's rare path of the running-max softmax).
  double spread = 0;
  bool hot_keys = false;
};

std::string describe(const Case& c) {
  std::ostringstream s;
  s << "seed=" << c.seed << " dtype=" << dattn::dtype_name(c.dtype) << (c.tf32 ? "(tf32)" : "") << " B=" << c.B
    << " N=" << c.N << " H=" << c.H << " D=" << c.D;
  if (c.Hkv) s << " Hkv=" << c.Hkv;
  s << " w=[";
  for (std::size_t i = 0; i < c.w.size(); ++i) s << (i ? "," : "") << c.w[i];
  s << "] r=[";
  for (std::size_t i = 0; i < c.r.size(); ++i) s << (i ? "," : "") << c.r[i];
  s << "] mode=" << (c.mode == dattn::Mode::grouped ? "grouped" : "longnet") << " causal=" << c.causal;
  if (c.scale) s << " scale=" << *c.scale;
  if (!c.padding.empty()) {
    std::int64_t padded = 0;
    for (auto x : c.padding) padded += x;
    s << " padding=" << padded << "/" << c.padding.size();
  }
  if (c.dropout_p > 0) s << " dropout=" << c.dropout_p << " dseed=" << c.dropout_seed << " doff=" << c.dropout_offset;
  if (c.fused_qkv) s << " fused_qkv";
  if (c.strided) s << " strided";
  if (c.hilbert) s << " hilbert";
  if (c.ring_ranks) s << " ring P=" << c.ring_ranks << (c.zigzag ? " zigzag" : " contiguous");
  if (c.block_size) s << " block-sparse block=" << c.block_size << " density=" << c.density << " mask_heads=" << c.mask_heads;
  if (c.spread > 0) s << " spread=" << c.spread << (c.hot_keys ? " hot keys" : " steps");
  return s.str();
}

std::vector<std::int64_t> g_head_dims{16, 32, 64, 80, 96, 128};
bool g_all_block_sparse = false;

// Turns c into a block-sparse case: a block size from tiny to larger than the kernels' tiles, a
// mask density from empty to full. Ring cases keep every rank's chunks on block boundaries.
void make_block_sparse(Case& c, Rng& rng) {
  static const std::int64_t sizes[] = {1, 5, 16, 17, 33, 64, 64, 100, 128, 128, 200};
  static const double densities[] = {0.0, 0.1, 0.3, 0.5, 0.8, 1.0};
  c.block_size = sizes[rng() % std::size(sizes)];
  if (c.block_size < 16) c.N = std::min<std::int64_t>(c.N, 96);  // one tile per block: keep it small
  c.density = densities[rng() % std::size(densities)];
  c.mask_heads = chance(rng, 0.5) ? 1 : c.H;
  if (c.ring_ranks > 0) {
    const std::int64_t unit = (c.zigzag ? 2 * c.ring_ranks : c.ring_ranks) * c.block_size;
    c.N = std::max(unit, c.N / unit * unit);
  }
  if (!c.padding.empty()) c.padding.resize(std::size_t(c.B * c.N), 0);
}

// A head dim the sm90 TMA loads take (64 or 128) drawn from --head-dims, or `current` where it has none.
std::int64_t tma_head_dim(std::int64_t current, Rng& rng) {
  std::vector<std::int64_t> dims;
  for (std::int64_t d : g_head_dims)
    if (d == 64 || d == 128) dims.push_back(d);
  return dims.empty() ? current : dims[rng() % dims.size()];
}

// Turns c into a call of the shape the sm90 forward's TMA loads cover (builds with DATTN_SM90_TMA):
// 16-bit data, head dim 64 or 128 (where --head-dims has one), the dilated walk over whole
// sequences (no ring steps or block mask), N a multiple of every dilation rate (a rate drawn as
// r = w above 4 becomes min(w, 4), keeping N small). Layouts, GQA, padding, dropout, mode,
// causality, segment lengths and the Hilbert order (the TMA instances' cp.async gather) stay as
// drawn.
void make_tma_shaped(Case& c, Rng& rng) {
  c.dtype = chance(rng, 0.5) ? DType::bfloat16 : DType::float16;
  c.tf32 = false;
  c.D = tma_head_dim(c.D, rng);
  c.ring_ranks = 0;
  c.zigzag = false;
  c.block_size = 0;
  std::int64_t multiple = 1;
  for (std::size_t i = 0; i < c.r.size(); ++i) {
    if (c.r[i] > 4) c.r[i] = std::min<std::int64_t>(c.w[i], 4);
    multiple = std::lcm(multiple, c.r[i]);
  }
  c.N = (c.N + multiple - 1) / multiple * multiple;
  if (!c.padding.empty()) c.padding.resize(std::size_t(c.B * c.N), 0);
}

// The case's random block mask on the host (the device copy is mask.to_device).
dattn::BlockSparseMask block_mask_of(const Case& c) {
  const std::int64_t nb = (c.N + c.block_size - 1) / c.block_size;
  dattn::Tensor dense = dattn::Tensor::zeros({c.mask_heads, nb, nb}, DType::boolean);
  Rng rng(c.seed ^ 0x5eed);
  for (std::int64_t i = 0; i < dense.numel(); ++i) dense.data<std::uint8_t>()[i] = chance(rng, c.density);
  return dattn::BlockSparseMask::from_dense(dense.view());
}

Case random_case(Rng& rng, std::int64_t max_n) {
  static const DType dtypes[] = {DType::bfloat16, DType::float16, DType::float32, DType::float32};
  Case c;
  c.seed = rng();
  const int dt = int(rng() % 4);
  c.dtype = dtypes[dt];
  c.tf32 = dt == 3;
  c.B = uniform(rng, 1, 2);
  c.H = uniform(rng, 1, 4);
  c.D = g_head_dims[rng() % g_head_dims.size()];
  const int n_kind = int(rng() % 20);
  c.N = n_kind == 0 ? 1 : n_kind < 3 ? uniform(rng, 2, 8) : n_kind < 15 ? uniform(rng, 2, std::min<std::int64_t>(max_n, 160))
                                                                          : uniform(rng, 2, max_n);
  const auto G = std::size_t(uniform(rng, 1, 4));
  c.w.assign(G, 1);
  c.r.assign(G, 1);
  for (std::size_t i = 0; i < G; ++i) {
    const int kind = int(rng() % 10);
    const std::int64_t w = kind == 0 ? uniform(rng, c.N + 1, c.N + 40)
                           : kind == 1 ? c.N
                           : kind == 2 ? uniform(rng, 1, 4)
                                       : uniform(rng, 1, std::max<std::int64_t>(1, c.N));
    c.w[i] = w;
    c.r[i] = chance(rng, 0.1) ? w : uniform(rng, 1, std::min<std::int64_t>(w, 4));
  }
  c.mode = chance(rng, 0.5) ? dattn::Mode::grouped : dattn::Mode::longnet;
  c.causal = chance(rng, 0.5);
  if (chance(rng, 0.2)) c.scale = std::uniform_real_distribution<double>(0.5, 2.0)(rng) / std::sqrt(double(c.D));
  const int pad_kind = int(rng() % 10);
  if (pad_kind >= 5) {
    c.padding.assign(std::size_t(c.B * c.N), 0);
    if (pad_kind < 8) {
      const double p = std::vector<double>{0.1, 0.3, 0.7}[rng() % 3];
      for (auto& x : c.padding) x = chance(rng, p);
    } else if (pad_kind == 8) {  // a padded prefix
      for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t n = 0, k = uniform(rng, 0, c.N); n < k; ++n) c.padding[std::size_t(b * c.N + n)] = 1;
    } else {
      std::fill(c.padding.begin(), c.padding.end(), 1);
    }
  }
  if (chance(rng, 0.25)) {
    c.dropout_p = std::uniform_real_distribution<double>(0.001, 0.499)(rng);
    c.dropout_seed = rng();
    c.dropout_offset = chance(rng, 0.3) ? rng() : 0;
  }
  c.fused_qkv = chance(rng, 0.25);
  c.strided = chance(rng, 0.35);
  c.hilbert = !g_all_block_sparse && chance(rng, 0.25);
  if (!c.hilbert && chance(rng, 0.25)) {
    c.ring_ranks = int(uniform(rng, 1, 4));
    c.zigzag = chance(rng, 0.5);
    const std::int64_t unit = c.zigzag ? 2 * c.ring_ranks : c.ring_ranks;
    c.N = std::max(unit, c.N / unit * unit);
    if (!c.padding.empty()) c.padding.resize(std::size_t(c.B * c.N), 0);
  }
  if (!c.hilbert && (g_all_block_sparse || chance(rng, 0.3))) make_block_sparse(c, rng);
  // A fifth of the cases are calls the TMA loads cover; of the rest most are not (fp32, other head
  // dims, a rate that does not divide N, ring steps, block masks).
  if (!g_all_block_sparse && chance(rng, 0.2)) make_tma_shaped(c, rng);
  if (c.dtype != DType::float32 && chance(rng, 0.15)) {  // the running max is the 16-bit kernels'
    c.spread = std::uniform_real_distribution<double>(4.0, 8.0)(rng);
    c.hot_keys = chance(rng, 0.5);
  }
  // Grouped-query heads (not with a fused qkv buffer), ring steps among them.
  if (c.H > 1 && !c.fused_qkv && chance(rng, 0.3)) {
    std::vector<std::int64_t> divisors;
    for (std::int64_t d = 1; d < c.H; ++d)
      if (c.H % d == 0) divisors.push_back(d);
    c.Hkv = divisors[rng() % divisors.size()];
  }
  return c;
}

// ---- host mirrors of device buffers with arbitrary layouts ----
// One device allocation and its host mirror; views index into it.
struct Buffer {
  DType dtype;
  std::int64_t elements = 0;
  std::vector<unsigned char> host;
  void* device = nullptr;
  Buffer(DType t, std::int64_t n) : dtype(t), elements(n), host(std::size_t(n) * dattn::dtype_size(t), 0xff) {
    CUDA_OK(cudaMalloc(&device, std::max<std::size_t>(host.size(), 16)));
  }
  ~Buffer() { cudaFree(device); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void upload(cudaStream_t s) { CUDA_OK(cudaMemcpyAsync(device, host.data(), host.size(), cudaMemcpyHostToDevice, s)); }
  void download(cudaStream_t s) { CUDA_OK(cudaMemcpyAsync(host.data(), device, host.size(), cudaMemcpyDeviceToHost, s)); }
};

struct View {
  Buffer* buffer = nullptr;
  std::int64_t offset = 0;  // elements
  std::vector<std::int64_t> shape, strides;
  std::int64_t at(const std::vector<std::int64_t>& idx) const {
    std::int64_t o = offset;
    for (std::size_t d = 0; d < idx.size(); ++d) o += idx[d] * strides[d];
    return o;
  }
  dattn::TensorView device_view() const {
    return dattn::make_view(static_cast<unsigned char*>(buffer->device) + offset * std::int64_t(dattn::dtype_size(buffer->dtype)),
                            buffer->dtype, shape, strides, dattn::Device{dattn::DeviceType::cuda, 0});
  }
};

// A view of `shape` in a fresh buffer: contiguous, or a random memory order of the dims (the last
// stays innermost when unit_last), padded extents and a base offset, every stride but the unit one
// a multiple of `align` elements.
View make_buffer(std::vector<std::unique_ptr<Buffer>>& owner, const std::vector<std::int64_t>& shape, DType t,
                 bool random, bool unit_last, std::int64_t align, Rng& rng) {
  const int rank = int(shape.size());
  std::vector<int> order(static_cast<std::size_t>(rank));  // memory order, innermost first
  for (int d = 0; d < rank; ++d) order[std::size_t(d)] = rank - 1 - d;
  std::vector<std::int64_t> padded(shape);
  std::int64_t offset = 0;
  if (random) {
    std::shuffle(order.begin() + (unit_last ? 1 : 0), order.end(), rng);
    if (!unit_last) std::shuffle(order.begin(), order.end(), rng);
    for (auto& e : padded) e += uniform(rng, 0, 2);
    offset = align * uniform(rng, 0, 3);
  }
  std::vector<std::int64_t> strides(static_cast<std::size_t>(rank));
  std::int64_t running = 1;
  for (int i = 0; i < rank; ++i) {
    const int d = order[std::size_t(i)];
    strides[std::size_t(d)] = running;
    running *= padded[std::size_t(d)];
    if (i == 0) running = (running + align - 1) / align * align;
  }
  if (unit_last && strides[std::size_t(rank - 1)] != 1) throw std::logic_error("layout");
  owner.push_back(std::make_unique<Buffer>(t, offset + running));
  return View{owner.back().get(), offset, shape, strides};
}

// q, k, v (or dq, dk, dv) as select(2, i) of one [B, N, 3, H, D] buffer with padded rows.
std::vector<View> make_fused(std::vector<std::unique_ptr<Buffer>>& owner, const Case& c, DType t, std::int64_t align,
                             Rng& rng) {
  const std::int64_t row = (3 * c.H * c.D + align * uniform(rng, 0, 2) + align - 1) / align * align;
  owner.push_back(std::make_unique<Buffer>(t, c.B * c.N * row));
  std::vector<View> views;
  for (int i = 0; i < 3; ++i)
    views.push_back(View{owner.back().get(), i * c.H * c.D, {c.B, c.N, c.H, c.D}, {c.N * row, row, c.D, 1}});
  return views;
}

// Case::spread: key row n's factor.
double spread_factor(const Case& c, std::int64_t n) {
  if (c.spread <= 0) return 1;
  const bool scaled = c.hot_keys ? n % 32 == 7 : n / 128 % 2 == 1;
  return scaled ? c.spread : 1;
}

void fill_normal(const View& v, Rng& rng) {
  std::normal_distribution<double> normal;
  for_each_index(v.shape, [&](const std::vector<std::int64_t>& i) { store(v.buffer->host.data(), v.buffer->dtype, v.at(i), normal(rng)); });
}

dattn::Tensor to_f64(const View& v) {
  dattn::Tensor t = dattn::Tensor::empty(v.shape, DType::float64);
  std::int64_t k = 0;
  for_each_index(v.shape, [&](const std::vector<std::int64_t>& i) { t.data<double>()[k++] = load(v.buffer->host.data(), v.buffer->dtype, v.at(i)); });
  return t;
}

// ---- checks ----
struct Tolerance {
  double rel, lse;
};
Tolerance tolerance(const Case& c) {
  if (c.dtype == DType::float32) return c.tf32 ? Tolerance{3e-3, 3e-3} : Tolerance{1e-5, 1e-5};
  if (c.dtype == DType::bfloat16) return {1.5e-2, 1e-3};
  return {3e-3, 1e-3};
}

// Relative L2 error, or +inf for NaN/Inf. As tests/harness.cpp: where the reference is exactly 0
// the result must be exactly 0 (else +inf); a reference at float64 round-off (RMS <= 1e-12, a
// gradient that is 0 mathematically but not bit-exactly) holds the result to RMS <= tol instead,
// reported as RMS / tol * tol (so that "<= tol" decides either way). With `cancellation` (dq, dk)
// an exactly-0 reference is held to the same RMS bar: their Σ_j dS_j·k of a query whose keys are
// all one key (in longnet mode: one key in every branch) is 0 in float64 only when rounding happens
// to make Σ_j P_j exactly 1.
double rel_l2(const View& x, const dattn::Tensor& ref, double tol, bool cancellation) {
  double num = 0, den = 0;
  bool finite = true;
  std::int64_t k = 0;
  for_each_index(x.shape, [&](const std::vector<std::int64_t>& i) {
    const double a = load(x.buffer->host.data(), x.buffer->dtype, x.at(i)), b = ref.data<double>()[k++];
    if (!std::isfinite(a)) finite = false;
    num += (a - b) * (a - b);
    den += b * b;
  });
  if (!finite) return std::numeric_limits<double>::infinity();
  if (den == 0 && !cancellation) return num == 0 ? 0 : std::numeric_limits<double>::infinity();
  const double count = double(k);
  if (std::sqrt(den / count) <= 1e-12) return std::sqrt(num / count) <= tol ? 0 : std::sqrt(num / count);
  return std::sqrt(num / den);
}

std::string lse_problem(const View& x, const dattn::Tensor& ref, double tol, double& worst) {
  std::int64_t k = 0, bad = 0;
  std::string first;
  worst = 0;
  for_each_index(x.shape, [&](const std::vector<std::int64_t>& i) {
    const double a = load(x.buffer->host.data(), DType::float32, x.at(i)), b = ref.data<double>()[k++];
    bool ok;
    if (std::isinf(b) && b < 0) ok = std::isinf(a) && a < 0;
    else {
      ok = std::isfinite(a) && std::fabs(a - b) <= tol * std::max(1.0, std::fabs(b));
      if (std::isfinite(a)) worst = std::max(worst, std::fabs(a - b) / std::max(1.0, std::fabs(b)));
    }
    if (!ok && bad++ == 0) {
      std::ostringstream s;
      s << "lse[" << i[0] << "," << i[1] << "," << i[2] << "] = " << a << ", reference " << b;
      first = s.str();
    }
  });
  return bad ? std::to_string(bad) + " lse element(s) wrong; first " + first : "";
}

// Bytes of the buffers outside the views must still hold the 0xff poison.
std::string changed_outside(const std::vector<View>& views) {
  Buffer* b = views[0].buffer;
  const std::size_t es = dattn::dtype_size(b->dtype);
  std::vector<char> inside(std::size_t(b->elements), 0);
  for (const View& v : views)
    for_each_index(v.shape, [&](const std::vector<std::int64_t>& i) { inside[std::size_t(v.at(i))] = 1; });
  for (std::int64_t e = 0; e < b->elements; ++e)
    if (!inside[std::size_t(e)])
      for (std::size_t k = 0; k < es; ++k)
        if (b->host[std::size_t(e) * es + k] != 0xff) return "element " + std::to_string(e) + " outside the views changed";
  return "";
}

// A fresh float32 buffer of `shape` (contiguous) holding `value` everywhere.
View filled(std::vector<std::unique_ptr<Buffer>>& owner, const std::vector<std::int64_t>& shape, float value) {
  std::int64_t n = 1;
  for (auto e : shape) n *= e;
  owner.push_back(std::make_unique<Buffer>(DType::float32, n));
  std::fill_n(reinterpret_cast<float*>(owner.back()->host.data()), n, value);
  std::vector<std::int64_t> strides(shape.size(), 1);
  for (int d = int(shape.size()) - 2; d >= 0; --d) strides[std::size_t(d)] = strides[std::size_t(d) + 1] * shape[std::size_t(d) + 1];
  return View{owner.back().get(), 0, shape, strides};
}

// The whole call as c.ring_ranks ranks would run it: every (query chunk, key chunk) pair through
// ring_forward_step into float32 out and lse, then ring_step_gradients with the merged lse and
// delta = rowsum(dout∘out) into float32 dq, dk, dv. Returns {out, lse, dq, dk, dv} (downloaded).
std::vector<View> run_ring_steps(const Case& c, const dattn::DilatedConfig& config,
                                 const dattn::BlockSparseMask* block_mask, const std::vector<View>& qkv,
                                 const View& dout, const std::optional<View>& mask,
                                 std::vector<std::unique_ptr<Buffer>>& owner, cudaStream_t stream) {
  const std::int64_t B = c.B, N = c.N, H = c.H, D = c.D, Hkv = c.Hkv ? c.Hkv : c.H;
  const dattn::Layout layout = c.zigzag ? dattn::Layout::zigzag : dattn::Layout::contiguous;
  View out = filled(owner, {B, N, H, D}, 0.0f), lse = filled(owner, {B, H, N}, -INFINITY);
  View dq = filled(owner, {B, N, H, D}, 0.0f), dk = filled(owner, {B, N, Hkv, D}, 0.0f),
       dv = filled(owner, {B, N, Hkv, D}, 0.0f);
  for (View* v : {&out, &lse, &dq, &dk, &dv}) v->buffer->upload(stream);
  auto each_pair = [&](auto&& fn) {
    for (int rank = 0; rank < c.ring_ranks; ++rank)
      for (const auto& [q0, q1] : dattn::ring_rows(N, c.ring_ranks, rank, layout))
        for (int source = 0; source < c.ring_ranks; ++source)
          for (const auto& [k0, k1] : dattn::ring_rows(N, c.ring_ranks, source, layout)) {
            dattn::DilatedConfig step_config = config;
            if (mask) step_config.key_padding_mask = mask->device_view().narrow(1, k0, k1 - k0);
            fn(step_config, dattn::RingStep{q0, N, k0, k1}, q0, q1, k0, k1);
          }
  };
  auto rows = [](const View& v, std::int64_t a, std::int64_t b) { return v.device_view().narrow(1, a, b - a); };
  each_pair([&](const dattn::DilatedConfig& sc, dattn::RingStep step, std::int64_t q0, std::int64_t q1, std::int64_t k0,
                std::int64_t k1) {
    const auto args = std::tuple{step, rows(qkv[0], q0, q1), rows(qkv[1], k0, k1), rows(qkv[2], k0, k1),
                                 rows(out, q0, q1), lse.device_view().narrow(2, q0, q1 - q0), stream};
    if (block_mask) {
      const dattn::BlockSparseConfig sparse = block_sparse_config_of(c.block_size, sc);
      std::apply([&](auto&&... a) { dattn::block_sparse_ring_forward_step(sparse, *block_mask, a...); }, args);
    } else {
      std::apply([&](auto&&... a) { dattn::ring_forward_step(sc, a...); }, args);
    }
  });
  out.buffer->download(stream);
  lse.buffer->download(stream);
  CUDA_OK(cudaStreamSynchronize(stream));
  // delta = rowsum(dout∘out) per query chunk, [B, H, n] contiguous, as a rank computes it.
  std::vector<View> deltas;
  for (int rank = 0; rank < c.ring_ranks; ++rank)
    for (const auto& [q0, q1] : dattn::ring_rows(N, c.ring_ranks, rank, layout)) {
      View delta = filled(owner, {B, H, q1 - q0}, 0.0f);
      auto* d = reinterpret_cast<float*>(delta.buffer->host.data());
      const auto* o = reinterpret_cast<const float*>(out.buffer->host.data());
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t i = q0; i < q1; ++i)
            for (std::int64_t e = 0; e < D; ++e)
              d[(b * H + h) * (q1 - q0) + i - q0] +=
                  float(load(dout.buffer->host.data(), dout.buffer->dtype, dout.at({b, i, h, e}))) * o[((b * N + i) * H + h) * D + e];
      delta.buffer->upload(stream);
      deltas.push_back(delta);
    }
  std::size_t chunk = 0;
  std::int64_t previous_q0 = -1;
  each_pair([&](const dattn::DilatedConfig& sc, dattn::RingStep step, std::int64_t q0, std::int64_t q1, std::int64_t k0,
                std::int64_t k1) {
    // each_pair visits a query chunk's pairs together, in ring_rows order
    if (q0 != previous_q0 && previous_q0 >= 0) ++chunk;
    previous_q0 = q0;
    const auto args = std::tuple{step, rows(qkv[0], q0, q1), rows(qkv[1], k0, k1), rows(qkv[2], k0, k1),
                                 rows(dout, q0, q1), lse.device_view().narrow(2, q0, q1 - q0),
                                 deltas[chunk].device_view(), rows(dq, q0, q1), rows(dk, k0, k1), rows(dv, k0, k1),
                                 stream};
    if (block_mask) {
      const dattn::BlockSparseConfig sparse = block_sparse_config_of(c.block_size, sc);
      std::apply([&](auto&&... a) { dattn::block_sparse_ring_step_gradients(sparse, *block_mask, a...); }, args);
    } else {
      std::apply([&](auto&&... a) { dattn::ring_step_gradients(sc, a...); }, args);
    }
  });
  return {out, lse, dq, dk, dv};
}

struct Result {
  bool ok = true;
  std::string message;
  std::string kernels;  // the kernel generations that ran: forward/backward, e.g. "sm90/sm80"
  double worst[5] = {0, 0, 0, 0, 0};  // out, lse, dq, dk, dv
};

Result run_case(const Case& c, cudaStream_t stream) {
  Result result;
  Rng rng(c.seed);
  std::vector<std::unique_ptr<Buffer>> owner;
  const std::int64_t es = std::int64_t(dattn::dtype_size(c.dtype)), align = 16 / es;
  const std::vector<std::int64_t> bnhd{c.B, c.N, c.H, c.D}, bhn{c.B, c.H, c.N};
  const std::vector<std::int64_t> bnkd{c.B, c.N, c.Hkv ? c.Hkv : c.H, c.D};  // k, v, dk, dv
  auto attention_views = [&](bool fused) {
    if (fused) return make_fused(owner, c, c.dtype, align, rng);
    std::vector<View> v;
    for (int i = 0; i < 3; ++i) v.push_back(make_buffer(owner, i == 0 ? bnhd : bnkd, c.dtype, c.strided, true, align, rng));
    return v;
  };
  std::vector<View> qkv = attention_views(c.fused_qkv);
  for (const View& v : qkv) fill_normal(v, rng);
  if (c.spread > 0)
    for_each_index(qkv[1].shape, [&](const std::vector<std::int64_t>& i) {
      unsigned char* host = qkv[1].buffer->host.data();
      store(host, c.dtype, qkv[1].at(i), load(host, c.dtype, qkv[1].at(i)) * spread_factor(c, i[1]));
    });
  View out = make_buffer(owner, bnhd, c.dtype, c.strided, true, align, rng);
  View lse = make_buffer(owner, bhn, DType::float32, c.strided, false, 1, rng);
  View dout = make_buffer(owner, bnhd, c.dtype, c.strided, true, align, rng);
  fill_normal(dout, rng);
  std::vector<View> grads = attention_views(c.fused_qkv);
  std::optional<View> mask;
  if (!c.padding.empty()) {
    mask = make_buffer(owner, {c.B, c.N}, DType::boolean, c.strided, false, 1, rng);
    std::size_t k = 0;
    for_each_index(mask->shape, [&](const std::vector<std::int64_t>& i) { mask->buffer->host[std::size_t(mask->at(i))] = c.padding[k++]; });
  }
  for (auto& b : owner) b->upload(stream);
  const std::vector<unsigned char> qkv_before = qkv[0].buffer->host;

  dattn::DilatedConfig config = config_of(c);
  if (mask) config.key_padding_mask = mask->device_view();

  dattn::LaunchOptions options;
  options.stream = stream;
  options.cuda_kernels = c.ring_ranks > 0 ? dattn::CudaKernels::automatic : g_cuda_kernels;  // ring steps: automatic
  dattn::LaunchOptions backward_options = options;
  // Half the cases give the backward its workspace (delta in a pass of its own), half not (the
  // kernels compute it in the blocks).
  std::unique_ptr<Buffer> workspace;
  if (c.ring_ranks == 0 && c.seed % 2 == 0) {
    workspace = std::make_unique<Buffer>(DType::float32, c.B * c.H * c.N);
    backward_options.workspace = workspace->device;
    backward_options.workspace_bytes = dattn::backward_workspace_bytes(qkv[0].device_view());
  }
  result.kernels = std::string(generation_name(dattn::cuda_kernel_generation(qkv[0].device_view(), false, options))) +
                   "/" + generation_name(dattn::cuda_kernel_generation(qkv[0].device_view(), true, backward_options));
  // The sm90 forward at head dim 64 has two block shapes; small cases would choose 128 rows, so a
  // third of them force each (the rest choose).
  if (result.kernels.starts_with("sm90") && c.D == 64 && c.ring_ranks == 0 && c.seed % 3 != 0) {
    options.sm90_forward_rows = c.seed % 3 == 1 ? 128 : 192;
    result.kernels.insert(4, " rows " + std::to_string(options.sm90_forward_rows));
  }
  // The sm90 backward's dQ: half the dilated cases by atomics (named in the kernels column), the
  // rest by dq blocks (the default).
  if (result.kernels.ends_with("/sm90") && c.block_size == 0 && c.ring_ranks == 0 && c.seed / 3 % 2 == 1) {
    options.sm90_backward_dq = dattn::BackwardDq::atomic;
    result.kernels += " dQ atomic";
  }
  std::unique_ptr<Buffer> index_device;
  dattn::Tensor index_host;
  if (c.hilbert) {
    const std::vector<std::int64_t> order = dattn::hilbert_sequence_order(c.N);
    index_host = dattn::Tensor::empty({c.N}, DType::int64);
    std::copy(order.begin(), order.end(), index_host.data<std::int64_t>());
    index_device = std::make_unique<Buffer>(DType::int64, c.N);
    std::memcpy(index_device->host.data(), order.data(), order.size() * sizeof(std::int64_t));
    index_device->upload(stream);
    options.position_index = View{index_device.get(), 0, {c.N}, {1}}.device_view();
  }
  std::optional<dattn::BlockSparseMask> block_mask, block_mask_device;
  if (c.block_size > 0) {
    block_mask = block_mask_of(c);
    block_mask_device = block_mask->to_device(qkv[0].device_view().device);
  }
  // The sm90 forward's producer: " tma" where it loads by TMA (builds with DATTN_SM90_TMA), e.g.
  // "sm90 tma rows 192/sm90"; the others load row by row with cp.async.
  const dattn::TensorView q_view = qkv[0].device_view(), k_view = qkv[1].device_view(), v_view = qkv[2].device_view();
  const bool tma = c.ring_ranks == 0 &&
                   (block_mask ? dattn::cuda_block_sparse_forward_uses_tma(block_sparse_config_of(c.block_size, config),
                                                                           *block_mask_device, q_view, k_view, v_view,
                                                                           out.device_view(), lse.device_view(), options)
                               : dattn::cuda_forward_uses_tma(config, q_view, k_view, v_view, out.device_view(),
                                                              lse.device_view(), options));
  if (tma) result.kernels.insert(4, " tma");
  // Several query tiles a forward block (the TMA instances' dilated walk without causality, rows in
  // order or under an index map): small cases would choose one, so half of those that admit them
  // force two or, at head dim 64, three (" 2 passes", " 3 passes").
  if (tma && !block_mask && !c.causal && c.seed % 4 >= 2) {
    options.sm90_forward_passes = c.seed % 4 == 3 && c.D == 64 ? 3 : 2;
    result.kernels.insert(result.kernels.find('/'), " " + std::to_string(options.sm90_forward_passes) + " passes");
  }
  auto attention_forward = [&](const auto&... a) {
    if (block_mask) dattn::block_sparse_forward(block_sparse_config_of(c.block_size, config), *block_mask_device, a...);
    else dattn::forward(config, a...);
  };
  auto attention_backward = [&](const auto&... a) {
    if (block_mask) dattn::block_sparse_backward(block_sparse_config_of(c.block_size, config), *block_mask_device, a...);
    else dattn::backward(config, a...);
  };
  if (c.ring_ranks > 0) {
    const std::vector<View> ring = run_ring_steps(c, config, block_mask ? &*block_mask_device : nullptr, qkv, dout,
                                                  mask, owner, stream);
    out = ring[0];
    lse = ring[1];
    grads = {ring[2], ring[3], ring[4]};
  } else {
    attention_forward(qkv[0].device_view(), qkv[1].device_view(), qkv[2].device_view(), out.device_view(),
                      lse.device_view(), options);
    options.workspace = backward_options.workspace;
    options.workspace_bytes = backward_options.workspace_bytes;
    options.cuda_kernels = backward_options.cuda_kernels;
    // The sm90 backward's producer: " tma" after the backward's generation where it loads by TMA,
    // e.g. "sm90 tma rows 192/sm90 tma dQ atomic".
    const dattn::TensorView dout_view = dout.device_view(), dq_view = grads[0].device_view(),
                            dk_view = grads[1].device_view(), dv_view = grads[2].device_view();
    const bool backward_tma =
        block_mask ? dattn::cuda_block_sparse_backward_uses_tma(block_sparse_config_of(c.block_size, config),
                                                                *block_mask_device, q_view, k_view, v_view,
                                                                out.device_view(), lse.device_view(), dout_view,
                                                                dq_view, dk_view, dv_view, options)
                   : dattn::cuda_backward_uses_tma(config, q_view, k_view, v_view, out.device_view(), lse.device_view(),
                                                   dout_view, dq_view, dk_view, dv_view, options);
    if (backward_tma) result.kernels.insert(result.kernels.find("/sm90") + 5, " tma");
    // Two key tiles a dk/dv block (dQ by atomics on the TMA loads' dilated walk without causality,
    // head dim 64): forced where the forward's passes are (" 2 passes" after the backward's name).
    if (backward_tma && options.sm90_backward_dq == dattn::BackwardDq::atomic && !block_mask &&
        !options.position_index && !c.causal && c.D == 64 && c.seed % 4 >= 2) {
      options.sm90_backward_passes = 2;
      result.kernels += " 2 passes";
    }
    attention_backward(qkv[0].device_view(), qkv[1].device_view(), qkv[2].device_view(), out.device_view(),
                       lse.device_view(), dout.device_view(), grads[0].device_view(), grads[1].device_view(),
                       grads[2].device_view(), options);
    CUDA_OK(cudaStreamSynchronize(stream));  // before the workspace goes
  }
  for (auto& b : owner) b->download(stream);
  CUDA_OK(cudaStreamSynchronize(stream));

  // The reference on float64 copies of the same rounded inputs (a mask on the host).
  const dattn::Tensor q64 = to_f64(qkv[0]), k64 = to_f64(qkv[1]), v64 = to_f64(qkv[2]), g64 = to_f64(dout);
  dattn::Tensor out64 = dattn::Tensor::empty(bnhd, DType::float64), lse64 = dattn::Tensor::empty(bhn, DType::float32);
  dattn::Tensor dq64 = dattn::Tensor::empty(bnhd, DType::float64), dk64 = dattn::Tensor::empty(bnkd, DType::float64),
                dv64 = dattn::Tensor::empty(bnkd, DType::float64);
  dattn::Tensor mask_host;
  dattn::DilatedConfig ref_config = config;
  if (mask) {
    mask_host = dattn::Tensor::empty({c.B, c.N}, DType::boolean);
    std::memcpy(mask_host.data<std::uint8_t>(), c.padding.data(), c.padding.size());
    ref_config.key_padding_mask = mask_host.view();
  }
  dattn::LaunchOptions ref_options;
  ref_options.backend = dattn::Backend::reference;
  if (c.hilbert) ref_options.position_index = index_host.view();
  // lse in float64 precision: the reference writes float32 lse; recompute the float64 one from
  // out64's run is not exposed, so compare against the float32-rounded reference lse.
  if (block_mask) {
    const dattn::BlockSparseConfig sc = block_sparse_config_of(c.block_size, ref_config);
    dattn::block_sparse_forward(sc, *block_mask, q64, k64, v64, out64, lse64, ref_options);
    dattn::block_sparse_backward(sc, *block_mask, q64, k64, v64, out64, lse64, g64, dq64, dk64, dv64, ref_options);
  } else {
    dattn::forward(ref_config, q64, k64, v64, out64, lse64, ref_options);
    dattn::backward(ref_config, q64, k64, v64, out64, lse64, g64, dq64, dk64, dv64, ref_options);
  }
  dattn::Tensor lse_ref = dattn::Tensor::empty(bhn, DType::float64);
  for (std::int64_t i = 0; i < lse64.numel(); ++i) lse_ref.data<double>()[i] = lse64.data<float>()[i];

  const Tolerance tol = tolerance(c);
  std::ostringstream problems;
  const struct {
    const char* name;
    const View* view;
    const dattn::Tensor* ref;
    int slot;
    bool cancellation;
  } checks[] = {{"out", &out, &out64, 0, false},
                {"dq", &grads[0], &dq64, 2, true},
                {"dk", &grads[1], &dk64, 3, true},
                {"dv", &grads[2], &dv64, 4, false}};
  for (const auto& ch : checks) {
    const double e = rel_l2(*ch.view, *ch.ref, tol.rel, ch.cancellation);
    result.worst[ch.slot] = e;
    if (!(e <= tol.rel)) problems << ch.name << " relative L2 error " << e << " > " << tol.rel << "; ";
  }
  if (std::string m = lse_problem(lse, lse_ref, tol.lse, result.worst[1]); !m.empty()) problems << m << "; ";
  for (const auto& [name, views] : {std::pair<const char*, std::vector<View>>{"out", {out}}, {"lse", {lse}},
                                    {"grads", c.fused_qkv ? grads : std::vector<View>{grads[0]}}})
    if (std::string m = changed_outside(views); !m.empty()) problems << name << ": " << m << "; ";
  if (!c.fused_qkv && !c.ring_ranks)
    for (int i = 1; i < 3; ++i)
      if (std::string m = changed_outside({grads[std::size_t(i)]}); !m.empty()) problems << "grad " << i << ": " << m << "; ";
  if (qkv[0].buffer->host != qkv_before) problems << "q (or the fused qkv buffer) changed; ";
  result.message = problems.str();
  result.ok = result.message.empty();
  return result;
}

// Several query tiles a forward block (LaunchOptions::sm90_forward_passes, which run_case forces
// where seed % 4 >= 2 and the call admits it: two, or three at head dim 64 where seed % 4 == 3).
// Groups of 512 and 900 selected rows (small: 600, 150 and 576, for the sanitizers), so that blocks
// hold whole later tiles, partial ones or none; padding, dropout, strides, grouped-query heads and
// longnet mode among them; 4010 and 4011 as 4002 and 4007 in the Hilbert order (an index map: the
// TMA instances' cp.async gather). Seeds 4002, 4006 and 4011 choose the block rows or force 128,
// 4003, 4007 and 4010 force 128 or 192 (run_case: seed % 3).
std::vector<Case> passes_cases(bool small) {
  std::vector<Case> cases;
  for (DType t : {DType::bfloat16, DType::float16})
    for (std::int64_t d : g_head_dims)
      for (const std::uint64_t case_seed : {4002, 4003, 4006, 4007, 4010, 4011}) {
        if (d != 64 && d != 128) continue;
        const bool two_branches = case_seed < 4006 || case_seed == 4010;
        Case c;
        c.seed = case_seed;
        c.dtype = t;
        c.D = d;
        c.B = small ? 1 : 2;
        c.H = small ? 2 : 4;
        c.N = two_branches ? (small ? 600 : 1024) : (small ? 576 : 900);
        c.w = two_branches ? std::vector<std::int64_t>{small ? 600 : 512, small ? 300 : 1024}
                           : std::vector<std::int64_t>{c.N};
        c.r = two_branches ? std::vector<std::int64_t>{1, 2} : std::vector<std::int64_t>{1};
        c.mode = case_seed % 2 ? dattn::Mode::longnet : dattn::Mode::grouped;
        c.hilbert = case_seed >= 4010;
        if (case_seed == 4003 || case_seed == 4007 || case_seed == 4011) {
          c.padding.assign(std::size_t(c.B * c.N), 0);
          for (std::size_t i = 0; i < c.padding.size(); i += 7) c.padding[i] = 1;
          c.dropout_p = 0.2;
          c.dropout_seed = 5;
          c.strided = true;
        }
        if (case_seed == 4006) c.Hkv = small ? 1 : 2;
        cases.push_back(c);
      }
  return cases;
}

// Spread scores (Case::spread) on every sm90 forward path, 16-bit types at the TMA head dims: the
// dilated walk (TMA), causal, in longnet mode, in the Hilbert order (the index map's gather), a
// block mask, a rate that does not divide N (the cp.async instances, no running max) and a padded
// prefix longer than a key tile (rows whose max is still -inf after the first tile). small: half the
// length (for the sanitizers; a segment of 256 still has a scaled key tile after a plain one).
std::vector<Case> spread_cases(bool small) {
  std::vector<Case> cases;
  std::uint64_t seed = 5000;
  for (DType t : {DType::bfloat16, DType::float16})
    for (std::int64_t d : g_head_dims)
      for (int variant = 0; variant < 6; ++variant) {
        if (d != 64 && d != 128) continue;
        Case c;
        c.seed = seed++;
        c.dtype = t;
        c.D = d;
        c.B = 1;
        c.H = 2;
        c.N = small ? 512 : 1024;
        c.w = {c.N / 2, c.N};
        c.r = {1, 2};
        c.spread = variant % 2 ? 6.0 : 5.0;
        c.hot_keys = variant % 2 == 1 || variant == 2;  // the Hilbert order scatters the steps
        c.causal = variant == 1 || variant == 2 || variant == 3;
        c.mode = variant == 1 ? dattn::Mode::longnet : dattn::Mode::grouped;
        if (variant == 2) c.hilbert = true;
        if (variant == 3) {
          c.block_size = 128;
          c.density = 0.5;
        }
        if (variant == 4) {
          c.N -= small ? 12 : 24;  // a multiple of neither 3 nor 128
          c.w = {c.N * 3 / 10, c.N};
          c.r = {1, 3};
        }
        if (variant == 5) {
          c.w = {c.N};
          c.r = {1};
          c.padding.assign(std::size_t(c.B * c.N), 0);
          std::fill_n(c.padding.begin(), small ? 150 : 300, 1);
        }
        cases.push_back(c);
      }
  return cases;
}

// Fixed cases: PERF.md's shapes scaled down and features one at a time, every dtype and head dim.
std::vector<Case> fixed_cases() {
  std::vector<Case> cases;
  std::uint64_t seed = 1000;
  for (DType t : {DType::bfloat16, DType::float16, DType::float32})
    for (std::int64_t d : g_head_dims)
      for (int variant = 0; variant < 4; ++variant) {
        Case c;
        c.seed = seed++;
        c.dtype = t;
        c.D = d;
        c.B = 2;
        c.H = 6;
        c.N = variant == 3 ? 700 : 512;
        c.w = {128, 256, 512};
        c.r = {1, 2, 4};
        c.mode = variant == 1 ? dattn::Mode::longnet : dattn::Mode::grouped;
        c.causal = variant >= 2;
        if (variant == 3) {
          c.w = {100, 300, 1000};
          c.r = {1, 3, 5};
          c.padding.assign(std::size_t(c.B * c.N), 0);
          for (std::size_t i = 0; i < c.padding.size(); i += 7) c.padding[i] = 1;
          c.dropout_p = 0.2;
          c.dropout_seed = 42 + std::uint64_t(d);
          c.strided = true;
        }
        cases.push_back(c);
      }
  // Ring steps: 4 ranks, both layouts and modes; the bfloat16 ones of variants 1 and 3 with
  // grouped-query heads (Hkv = 3 and 2 of H = 6).
  for (DType t : {DType::bfloat16, DType::float32})
    for (int variant = 0; variant < 4; ++variant) {
      Case c;
      c.seed = seed++;
      c.dtype = t;
      c.B = 2;
      c.H = 6;
      c.N = 1024;
      c.w = {128, 512, 1024};
      c.r = {1, 2, 4};
      c.ring_ranks = 4;
      c.zigzag = variant % 2;
      c.causal = variant >= 2;
      c.mode = variant == 1 || variant == 2 ? dattn::Mode::longnet : dattn::Mode::grouped;
      if (variant == 3) {
        c.w = {100, 300, 1000};
        c.r = {1, 3, 5};
        c.padding.assign(std::size_t(c.B * c.N), 0);
        for (std::size_t i = 0; i < c.padding.size(); i += 7) c.padding[i] = 1;
        c.dropout_p = 0.2;
        c.dropout_seed = 7;
      }
      if (t == DType::bfloat16 && variant % 2 == 1) c.Hkv = variant == 1 ? 3 : 2;
      cases.push_back(c);
    }
  for (DType t : {DType::bfloat16, DType::float16, DType::float32})  // Hilbert order, both modes, causal too
    for (const dattn::Mode mode : {dattn::Mode::grouped, dattn::Mode::longnet}) {
      Case c;
      c.seed = seed++;
      c.dtype = t;
      c.B = 2;
      c.H = 6;
      c.N = 700;
      c.w = {100, 300, 1000};
      c.r = {1, 3, 5};
      c.mode = mode;
      c.hilbert = true;
      c.causal = t != DType::float16;
      c.dropout_p = mode == dattn::Mode::longnet ? 0.2 : 0.0;
      c.dropout_seed = 7;
      c.padding.assign(std::size_t(c.B * c.N), 0);
      for (std::size_t i = 0; i < c.padding.size(); i += 5) c.padding[i] = 1;
      cases.push_back(c);
    }
  // Grouped-query heads where a later branch's last segment selects nothing (N mod w below its
  // offset: branch 1's heads 4-7 take offset 1 of [256, 257)): the backward's later head phases
  // must still write dq's rows there. Seeds 3001 and 3003: the dq blocks, then dQ by atomics.
  for (DType t : {DType::bfloat16, DType::float16})
    for (const std::uint64_t case_seed : {3001, 3003}) {
      Case c;
      c.seed = case_seed;
      c.dtype = t;
      c.B = 2;
      c.H = 8;
      c.Hkv = 2;
      c.N = 257;
      c.w = {128, 256};
      c.r = {1, 2};
      c.causal = case_seed == 3003;
      cases.push_back(c);
    }
  for (DType t : {DType::bfloat16, DType::float16, DType::float32})  // block-sparse, PERF.md's shapes scaled down
    for (int variant = 0; variant < 4; ++variant) {
      Case c;
      c.seed = seed++;
      c.dtype = t;
      c.B = 2;
      c.H = 4;
      c.N = variant == 1 ? 1000 : 1024;
      c.block_size = variant == 1 ? 128 : 64;
      c.density = variant == 1 ? 0.5 : 0.3;
      c.mask_heads = variant == 1 ? c.H : 1;
      c.causal = variant >= 1;
      if (variant == 1) {
        c.padding.assign(std::size_t(c.B * c.N), 0);
        for (std::size_t i = 0; i < c.padding.size(); i += 7) c.padding[i] = 1;
        c.dropout_p = 0.2;
        c.dropout_seed = 11;
        c.strided = true;
      }
      if (variant >= 2) {
        c.ring_ranks = 4;
        c.zigzag = variant == 3;
        if (t == DType::float16 && variant == 3) c.Hkv = 1;  // multi-query heads in ring steps
      }
      cases.push_back(c);
    }
  Case tf32 = cases[cases.size() - 22];
  tf32.tf32 = true;
  cases.push_back(tf32);
  for (const Case& c : passes_cases(false)) cases.push_back(c);
  // Long groups (2048 selected rows, PERF.md's long configs' length): fp32 accumulation over many
  // key tiles must stay within the 1e-5 bar.
  for (DType t : {DType::float32, DType::bfloat16}) {
    Case c;
    c.seed = seed++;
    c.dtype = t;
    c.B = 1;
    c.H = 2;
    c.D = std::find(g_head_dims.begin(), g_head_dims.end(), 64) != g_head_dims.end() ? 64 : g_head_dims[0];
    c.N = 4096;
    c.w = {2048, 4096};
    c.r = {1, 2};
    c.mode = t == DType::float32 ? dattn::Mode::grouped : dattn::Mode::longnet;
    cases.push_back(c);
  }
  for (const Case& c : spread_cases(false)) cases.push_back(c);
  return cases;
}

// What the CUDA backend refuses must fail with a clear error, not run: a device index map that is not
// a permutation, and a block mask on the host. Returns the number of checks that failed.
int check_refusals() {
  std::vector<std::unique_ptr<Buffer>> owner;
  Rng rng(5);
  const std::int64_t N = 64;
  std::vector<View> t;
  for (int i = 0; i < 4; ++i) t.push_back(make_buffer(owner, {1, N, 2, 64}, DType::bfloat16, false, true, 8, rng));
  View lse = make_buffer(owner, {1, 2, N}, DType::float32, false, false, 1, rng);
  auto index = std::make_unique<Buffer>(DType::int64, N);
  auto* order = reinterpret_cast<std::int64_t*>(index->host.data());
  for (std::int64_t i = 0; i < N; ++i) order[i] = (i * 7) % N;  // a permutation (7 and 64 coprime)
  for (auto& b : owner) b->upload(nullptr);
  int failures = 0;
  auto expect_error = [&](const char* what, const char* needle, int forward_passes = 0, bool causal = false) {
    index->upload(nullptr);
    dattn::DilatedConfig config;
    config.segment_lengths = {32};
    config.dilation_rates = {1};
    config.causal = causal;
    dattn::LaunchOptions options;
    options.cuda_kernels = g_cuda_kernels;
    options.position_index = View{index.get(), 0, {N}, {1}}.device_view();
    options.sm90_forward_passes = forward_passes;
    std::string message;
    try {
      dattn::forward(config, t[0].device_view(), t[1].device_view(), t[2].device_view(), t[3].device_view(),
                     lse.device_view(), options);
    } catch (const dattn::Error& e) {
      message = e.what();
    }
    const bool ok = message.find(needle) != std::string::npos;
    std::printf("%s refusal: %s -> %s\n", ok ? "ok" : "FAIL", what, message.empty() ? "(no error)" : message.c_str());
    failures += !ok;
  };
  {  // a block mask on the host with CUDA tensors
    const dattn::Tensor dense = dattn::Tensor::zeros({1, 1}, DType::boolean);
    dattn::BlockSparseConfig config;
    std::string message;
    try {
      dattn::block_sparse_forward(config, dattn::BlockSparseMask::from_dense(dense.view()), t[0].device_view(),
                                  t[1].device_view(), t[2].device_view(), t[3].device_view(), lse.device_view());
    } catch (const dattn::Error& e) {
      message = e.what();
    }
    const bool ok = message.find("to_device") != std::string::npos;
    std::printf("%s refusal: host block mask -> %s\n", ok ? "ok" : "FAIL", message.empty() ? "(no error)" : message.c_str());
    failures += !ok;
  }
  // two query tiles a block where an index map walks the rows causally (a later tile sees more
  // keys; the sm80 kernels: none at all)
  expect_error("sm90_forward_passes = 2 under a causal index map", "options.sm90_forward_passes = 2", 2, true);
  order[3] = order[4];
  expect_error("index map with a repeated row", "expected a permutation");
  CUDA_OK(cudaDeviceSynchronize());
  return failures;
}

// A small random case for the packed-batch and decode checks: dtype by turn (bf16, fp16, fp32),
// H <= 4 with a random divisor as Hkv, a head dim of the build, up to three branches of segments
// <= 256 and rates <= 4, either mode.
Case draw_small_case(int i, Rng& rng) {
  Case c;
  c.dtype = std::vector<DType>{DType::bfloat16, DType::float16, DType::float32}[std::size_t(i % 3)];
  c.H = uniform(rng, 1, 4);
  c.D = g_head_dims[rng() % g_head_dims.size()];
  std::vector<std::int64_t> divisors;
  for (std::int64_t d = 1; d <= c.H; ++d)
    if (c.H % d == 0) divisors.push_back(d);
  c.Hkv = divisors[rng() % divisors.size()];
  const auto G = std::size_t(uniform(rng, 1, 3));
  c.w.assign(G, 1);
  c.r.assign(G, 1);
  for (std::size_t g = 0; g < G; ++g) {
    c.w[g] = uniform(rng, 1, 256);
    c.r[g] = uniform(rng, 1, std::min<std::int64_t>(c.w[g], 4));
  }
  c.mode = chance(rng, 0.5) ? dattn::Mode::grouped : dattn::Mode::longnet;
  return c;
}

// Packed batches (cu_seqlens on the device) against the reference of each sequence on its own:
// random lengths (0 and 1 among them, partial segments), grouped-query heads, causal, dropout,
// both modes, every dtype; forward and backward in one launch each (per key/value phase). Every
// other case is shaped for the sm90 TMA loads (16-bit data, head dim 64 or 128, the last sequence
// grown so that T is a multiple of 12, of every rate <= 4): their boxes reach into the next
// sequence's rows, which must count for nothing.
int check_packed_batches(int count, std::uint64_t seed) {
  int failures = 0, tma_forward = 0, tma_backward = 0, several_passes = 0;
  Rng rng(seed);
  for (int i = 0; i < count; ++i) {
    std::vector<std::unique_ptr<Buffer>> owner;
    Case c = draw_small_case(i, rng);  // also for the tolerance and the description
    const bool tma_shaped = i % 2 == 1;
    if (tma_shaped) {
      if (c.dtype == DType::float32) c.dtype = DType::bfloat16;
      c.D = tma_head_dim(c.D, rng);
    }
    const std::int64_t B = uniform(rng, 1, 4);
    std::vector<std::int32_t> cu{0};
    for (std::int64_t b = 0; b < B; ++b) {
      const int kind = int(rng() % 6);
      cu.push_back(cu.back() + std::int32_t(kind == 0 ? 0 : kind == 1 ? 1 : uniform(rng, 2, 300)));
    }
    if (cu.back() == 0) cu.back() = 1;
    if (tma_shaped) cu.back() = (cu.back() + 11) / 12 * 12;
    std::int64_t longest = 0;
    for (std::int64_t b = 0; b < B; ++b) longest = std::max<std::int64_t>(longest, cu[std::size_t(b + 1)] - cu[std::size_t(b)]);
    const std::int64_t T = cu.back(), max_seqlen = longest + uniform(rng, 0, 5);
    c.B = B, c.N = max_seqlen;
    c.causal = chance(rng, 0.5);
    if (chance(rng, 0.25)) c.dropout_p = 0.2, c.dropout_seed = rng();
    const dattn::DilatedConfig config = config_of(c);

    const std::int64_t align = 16 / std::int64_t(dattn::dtype_size(c.dtype));
    const std::vector<std::int64_t> thd{T, c.H, c.D}, tkd{T, c.Hkv, c.D};
    std::vector<View> t;  // q, k, v, out, dout, dq, dk, dv
    for (int j = 0; j < 8; ++j)
      t.push_back(make_buffer(owner, j == 1 || j == 2 || j == 6 || j == 7 ? tkd : thd, c.dtype, false, true, align, rng));
    for (int j : {0, 1, 2, 4}) fill_normal(t[std::size_t(j)], rng);
    const View lse = make_buffer(owner, {c.H, T}, DType::float32, false, false, 1, rng);
    owner.push_back(std::make_unique<Buffer>(DType::int32, B + 1));
    Buffer& offsets = *owner.back();
    std::memcpy(offsets.host.data(), cu.data(), cu.size() * sizeof(std::int32_t));
    for (auto& b : owner) b->upload(nullptr);
    const View cu_view{&offsets, 0, {B + 1}, {1}};
    const dattn::PackedSequences packed{cu_view.device_view(), max_seqlen};
    const auto device = [&](int j) { return t[std::size_t(j)].device_view(); };
    std::string error, dq_path;
    try {
      dattn::LaunchOptions options;  // the sm90 forward's two block shapes at head dim 64, in turn
      const dattn::TensorView q4 = dattn::make_view(device(0).data, c.dtype, {1, T, c.H, c.D}, {}, device(0).device);
      const bool sm90 = dattn::cuda_kernel_generation(q4, false, {}) == dattn::CudaKernels::sm90;
      if (c.D == 64 && sm90) options.sm90_forward_rows = i % 2 ? 128 : 192;
      if (sm90 && i % 3 != 0) {  // two checks in three
        options.sm90_backward_dq = dattn::BackwardDq::atomic;
        dq_path = " dQ atomic";
      }
      if (dattn::cuda_varlen_forward_uses_tma(config, packed, device(0), device(1), device(2), device(3),
                                              lse.device_view(), options)) {
        dq_path += " [fwd tma]", ++tma_forward;
        if (!c.causal && i % 4 >= 2) {
          options.sm90_forward_passes = i % 4 == 3 && c.D == 64 ? 3 : 2;
          dq_path += " [" + std::to_string(options.sm90_forward_passes) + " passes]", ++several_passes;
        }
      }
      if (dattn::cuda_varlen_backward_uses_tma(config, packed, device(0), device(1), device(2), device(3),
                                               lse.device_view(), device(4), device(5), device(6), device(7), options))
        dq_path += " [bwd tma]", ++tma_backward;
      dattn::forward_varlen(config, packed, device(0), device(1), device(2), device(3), lse.device_view(), options);
      // Every other check gives the backward its workspace ([H, T] delta in a pass of its own).
      std::unique_ptr<Buffer> workspace;
      if (i % 4 < 2 && T > 0) {
        workspace = std::make_unique<Buffer>(DType::float32, c.H * T);
        options.workspace = workspace->device;
        options.workspace_bytes = std::size_t(c.H * T) * sizeof(float);
      }
      dattn::backward_varlen(config, packed, device(0), device(1), device(2), device(3), lse.device_view(), device(4),
                             device(5), device(6), device(7), options);
      CUDA_OK(cudaStreamSynchronize(nullptr));  // before the workspace goes
    } catch (const std::exception& e) {
      error = e.what();
    }
    for (auto& b : owner) b->download(nullptr);
    CUDA_OK(cudaDeviceSynchronize());

    std::ostringstream problems;
    if (!error.empty()) problems << "error: " << error;
    if (error.empty()) {
      std::vector<dattn::Tensor> ref;
      for (int j = 0; j < 8; ++j) ref.push_back(to_f64(t[std::size_t(j)]));
      dattn::Tensor lse64 = dattn::Tensor::empty({c.H, T}, DType::float32);
      dattn::Tensor cu_host = dattn::Tensor::empty({B + 1}, DType::int32);
      std::memcpy(cu_host.data<std::int32_t>(), cu.data(), cu.size() * sizeof(std::int32_t));
      const dattn::PackedSequences packed_host{cu_host.view(), max_seqlen};
      dattn::LaunchOptions reference;
      reference.backend = dattn::Backend::reference;
      dattn::forward_varlen(config, packed_host, ref[0], ref[1], ref[2], ref[3], lse64, reference);
      dattn::backward_varlen(config, packed_host, ref[0], ref[1], ref[2], ref[3], lse64, ref[4], ref[5], ref[6], ref[7],
                             reference);
      const Tolerance tol = tolerance(c);
      const char* names[] = {"", "", "", "out", "", "dq", "dk", "dv"};
      for (int j : {3, 5, 6, 7}) {
        const double e = rel_l2(t[std::size_t(j)], ref[std::size_t(j)], tol.rel, j == 5 || j == 6);
        if (!(e <= tol.rel)) problems << names[j] << " relative L2 error " << e << " > " << tol.rel << "; ";
      }
      dattn::Tensor lse_ref = dattn::Tensor::empty({c.H, T}, DType::float64);
      for (std::int64_t k = 0; k < lse64.numel(); ++k) lse_ref.data<double>()[k] = lse64.data<float>()[k];
      double worst = 0;
      if (std::string m = lse_problem(lse, lse_ref, tol.lse, worst); !m.empty()) problems << m << "; ";
    }
    std::ostringstream lengths;
    for (std::int64_t b = 0; b < B; ++b) lengths << (b ? "," : "") << cu[std::size_t(b + 1)] - cu[std::size_t(b)];
    const bool ok = problems.str().empty();
    std::printf("%s packed batch lengths=[%s] max_seqlen=%lld %s%s\n%s", ok ? "ok  " : "FAIL", lengths.str().c_str(),
                static_cast<long long>(max_seqlen), describe(c).c_str(), dq_path.c_str(),
                ok ? "" : ("     " + problems.str() + "\n").c_str());
    failures += !ok;
  }
  std::printf("packed batches: %d of %d forwards and %d backwards on the TMA loads (%d forwards with several query "
              "tiles a block)\n",
              tma_forward, count, tma_backward, several_passes);
  return failures;
}

// Decoding with a cache on the GPU against the reference (the same call on float64 host copies,
// Backend::reference): B sequences with caches of random fill (empty and one-token caches, lengths
// at, just before and past a branch's segment boundaries among them), grouped-query heads, both
// modes, with new keys appended or already counted, segments longer than the cache. Even cases take
// Tn <= kCudaDecodeMaxTokens (half of them Tn = 1): the split-KV decode kernels; odd cases a larger
// Tn (up to past a segment): the forward kernels. Each line names the path that ran. Checks out,
// lse and the whole caches after the call (appended rows exactly, the rest untouched).
int check_decode(int count, std::uint64_t seed) {
  int failures = 0, split_cases = 0;
  Rng rng(seed);
  for (int i = 0; i < count; ++i) {
    std::vector<std::unique_ptr<Buffer>> owner;
    Case c = draw_small_case(i / 2, rng);  // also for the tolerance and the description (dtypes by turn on each path)
    c.causal = true;
    const std::int64_t small = dattn::kCudaDecodeMaxTokens;
    const bool split = i % 2 == 0;
    const std::int64_t B = uniform(rng, 1, 3);
    const std::int64_t Tn = split ? (chance(rng, 0.5) ? 1 : uniform(rng, 2, small)) : uniform(rng, small + 1, 300);
    const bool append = chance(rng, 0.5);
    const std::int64_t Nmax = Tn + uniform(rng, 0, 600);
    if (chance(rng, 0.25)) {  // a segment longer than the cache
      const std::size_t g = std::size_t(rng() % c.w.size());
      c.w[g] = Nmax + uniform(rng, 1, 300);
      c.r[g] = uniform(rng, 1, 4);
    }
    std::vector<std::int32_t> seqlens;
    for (std::int64_t b = 0; b < B; ++b) {
      // L = seqlens[b] (+ Tn when appending) in [Tn, Nmax]: a sixth of them an empty or one-token
      // cache (L = Tn or Tn + 1), a third at a multiple of a branch's segment length or one off it.
      std::int64_t L = uniform(rng, Tn, Nmax);
      if (chance(rng, 0.17)) {
        L = std::min(Nmax, Tn + uniform(rng, 0, 1));
      } else if (chance(rng, 0.4)) {
        const std::int64_t w = c.w[rng() % c.w.size()], edge = (L / w) * w + uniform(rng, -1, 1);
        L = std::clamp<std::int64_t>(edge, Tn, Nmax);
      }
      seqlens.push_back(std::int32_t(append ? L - Tn : L));
    }
    c.B = B, c.N = Nmax;
    const dattn::DilatedConfig config = config_of(c);

    const std::int64_t align = 16 / std::int64_t(dattn::dtype_size(c.dtype));
    std::vector<View> t;  // q, k_cache, v_cache, k_new, v_new, out
    for (int j = 0; j < 6; ++j) {
      const std::vector<std::int64_t> shape{B, j == 1 || j == 2 ? Nmax : Tn, j == 0 || j == 5 ? c.H : c.Hkv, c.D};
      t.push_back(make_buffer(owner, shape, c.dtype, chance(rng, 0.5), true, align, rng));
      if (j < 5) fill_normal(t.back(), rng);
    }
    const View lse = make_buffer(owner, {B, c.H, Tn}, DType::float32, false, false, 1, rng);
    owner.push_back(std::make_unique<Buffer>(DType::int32, B));
    Buffer& lengths = *owner.back();
    std::memcpy(lengths.host.data(), seqlens.data(), seqlens.size() * sizeof(std::int32_t));
    for (auto& b : owner) b->upload(nullptr);
    const View lengths_view{&lengths, 0, {B}, {1}};
    const auto device = [&](int j) { return t[std::size_t(j)].device_view(); };
    dattn::KeyValueCache cache{device(1), device(2), lengths_view.device_view(), std::nullopt, std::nullopt, true};
    if (append) cache.k_new = device(3), cache.v_new = device(4);
    std::vector<dattn::Tensor> ref;  // float64 copies before the call
    for (int j = 0; j < 6; ++j) ref.push_back(to_f64(t[std::size_t(j)]));
    std::string error, path, size_problem;
    try {
      // The path the call takes (dattn/decode.hpp): the split-KV kernels for a few tokens, else
      // the forward kernels of the automatic generation.
      path = split ? "split-KV"
                   : dattn::cuda_kernel_generation(device(0), false, {}) == dattn::CudaKernels::sm90 ? "sm90 forward"
                                                                                                    : "sm80 forward";
      // Every other split-KV call gets its scratch as a workspace (the rest allocate it in stream order).
      dattn::LaunchOptions options;
      std::unique_ptr<Buffer> workspace;
      const std::size_t scratch = dattn::decode_workspace_bytes(config, cache, device(0));
      if (split != (scratch > 0))
        size_problem = "decode_workspace_bytes = " + std::to_string(scratch) + " on the " + path + " path; ";
      if (scratch > 0 && i % 4 == 0) {
        workspace = std::make_unique<Buffer>(DType::float32, std::int64_t(scratch / 4));
        options.workspace = workspace->device;
        options.workspace_bytes = scratch;
        path += " (workspace)";
      }
      dattn::forward_with_kvcache(config, cache, device(0), device(5), lse.device_view(), options);
      CUDA_OK(cudaDeviceSynchronize());  // before the workspace goes
    } catch (const std::exception& e) {
      error = e.what();
    }
    for (auto& b : owner) b->download(nullptr);
    CUDA_OK(cudaDeviceSynchronize());

    std::ostringstream problems;
    problems << size_problem;
    if (!error.empty()) problems << "error: " << error;
    if (error.empty()) {
      dattn::Tensor lse32 = dattn::Tensor::empty({B, c.H, Tn}, DType::float32);
      dattn::Tensor lengths_host = dattn::Tensor::empty({B}, DType::int32);
      std::memcpy(lengths_host.data<std::int32_t>(), seqlens.data(), seqlens.size() * sizeof(std::int32_t));
      dattn::KeyValueCache host{ref[1].view(), ref[2].view(), lengths_host.view(), std::nullopt, std::nullopt, true};
      if (append) host.k_new = ref[3].view(), host.v_new = ref[4].view();
      dattn::LaunchOptions reference;
      reference.backend = dattn::Backend::reference;
      dattn::forward_with_kvcache(config, host, ref[0].view(), ref[5].view(), lse32.view(), reference);
      const Tolerance tol = tolerance(c);
      const double e = rel_l2(t[5], ref[5], tol.rel, false);
      if (!(e <= tol.rel)) problems << "out relative L2 error " << e << " > " << tol.rel << "; ";
      dattn::Tensor lse_ref = dattn::Tensor::empty({B, c.H, Tn}, DType::float64);
      for (std::int64_t k = 0; k < lse32.numel(); ++k) lse_ref.data<double>()[k] = lse32.data<float>()[k];
      double worst = 0;
      if (std::string m = lse_problem(lse, lse_ref, tol.lse, worst); !m.empty()) problems << m << "; ";
      for (int j : {1, 2})  // the caches: appended rows copied exactly, every other row as it was
        if (rel_l2(t[std::size_t(j)], ref[std::size_t(j)], 0.0, false) != 0.0)
          problems << (j == 1 ? "k_cache" : "v_cache") << " differs from the reference's after the call; ";
    }
    std::ostringstream fill;
    for (std::int64_t b = 0; b < B; ++b) fill << (b ? "," : "") << seqlens[std::size_t(b)];
    const bool ok = problems.str().empty();
    split_cases += split;
    std::printf("%s decode [%s] cache_seqlens=[%s] Tn=%lld Nmax=%lld%s %s\n%s", ok ? "ok  " : "FAIL", path.c_str(),
                fill.str().c_str(), static_cast<long long>(Tn), static_cast<long long>(Nmax),
                append ? " k_new" : "", describe(c).c_str(), ok ? "" : ("     " + problems.str() + "\n").c_str());
    failures += !ok;
  }
  std::printf("decode: %d cases on the split-KV kernels (Tn <= %lld), %d on the forward kernels\n", split_cases,
              static_cast<long long>(dattn::kCudaDecodeMaxTokens), count - split_cases);
  return failures;
}

// Whether some branch of head `head` selects position `n` (SPEC.md's dilated selection, whole
// sequence, no index map): where the NaN check places its NaN on purpose.
bool selects(const dattn::DilatedConfig& config, std::int64_t H, std::int64_t head, std::int64_t n) {
  const std::int64_t G = std::int64_t(config.segment_lengths.size());
  std::int64_t group_begin = 0;
  for (std::int64_t i = 0; i < G; ++i) {
    const std::int64_t group_heads = H / G + (i < H % G ? 1 : 0);
    const bool takes_part = config.mode == dattn::Mode::longnet || (head >= group_begin && head < group_begin + group_heads);
    group_begin += group_heads;
    const std::int64_t w = config.segment_lengths[std::size_t(i)], r = config.dilation_rates[std::size_t(i)];
    const std::int64_t offset = (config.mode == dattn::Mode::longnet ? head : i) % r;
    if (takes_part && (n % w) % r == offset) return true;
  }
  return false;
}

// A NaN in q or k: out and lse are NaN in exactly the rows where the float64 reference's are
// (a NaN score must not pass for a masked one), and no gradient the reference makes NaN is finite.
// Each mode places the NaN twice on purpose: in a row its head's branches select (the reference
// has NaN rows, the kernel must have the same) and in one they all skip (no NaN may appear).
int check_nan_propagation() {
  int failures = 0;
  for (const DType dtype : {DType::bfloat16, DType::float32})
    for (const dattn::Mode mode : {dattn::Mode::grouped, dattn::Mode::longnet})
      for (const bool causal : {false, true})
        for (const int poisoned : {0, 1})
          for (const bool selected : {true, false}) {
            std::vector<std::unique_ptr<Buffer>> owner;
            Rng rng(31 + 2 * int(mode) + 4 * causal + 8 * poisoned + 16 * selected);
            const std::int64_t B = 1, N = 96, H = 2, D = 64;
            dattn::DilatedConfig config;
            // Rates 2 and 3: in both modes each head has rows that no branch of it selects.
            config.segment_lengths = {32, 96};
            config.dilation_rates = {2, 3};
            config.mode = mode;
            config.causal = causal;
            const std::int64_t head = uniform(rng, 0, H - 1);
            std::vector<std::int64_t> rows;
            for (std::int64_t n = 0; n < N; ++n)
              if (selects(config, H, head, n) == selected) rows.push_back(n);
            const std::int64_t row = rows[std::size_t(uniform(rng, 0, std::int64_t(rows.size()) - 1))];
            std::vector<View> t;  // q, k, v, out, dout, dq, dk, dv
            for (int i = 0; i < 8; ++i) t.push_back(make_buffer(owner, {B, N, H, D}, dtype, false, true, 8, rng));
            const View lse = make_buffer(owner, {B, H, N}, DType::float32, false, false, 1, rng);
            for (int i : {0, 1, 2, 4}) fill_normal(t[std::size_t(i)], rng);
            store(t[std::size_t(poisoned)].buffer->host.data(), dtype, t[std::size_t(poisoned)].at({0, row, head, 5}),
                  std::nan(""));
            for (auto& b : owner) b->upload(nullptr);
            const auto device = [&](int i) { return t[std::size_t(i)].device_view(); };
            dattn::LaunchOptions options;
            options.cuda_kernels = g_cuda_kernels;
            const bool tma =
                dattn::cuda_forward_uses_tma(config, device(0), device(1), device(2), device(3), lse.device_view(), options);
            dattn::forward(config, device(0), device(1), device(2), device(3), lse.device_view(), options);
            // Causal checks give the backward a workspace (delta in a pass of its own), the others not.
            std::unique_ptr<Buffer> workspace;
            if (causal) {
              workspace = std::make_unique<Buffer>(DType::float32, B * H * N);
              options.workspace = workspace->device;
              options.workspace_bytes = dattn::backward_workspace_bytes(device(0));
            }
            dattn::backward(config, device(0), device(1), device(2), device(3), lse.device_view(), device(4),
                            device(5), device(6), device(7), options);
            for (auto& b : owner) b->download(nullptr);
            CUDA_OK(cudaDeviceSynchronize());
            dattn::LaunchOptions reference;
            reference.backend = dattn::Backend::reference;
            std::vector<dattn::Tensor> ref;
            for (int i = 0; i < 8; ++i) ref.push_back(to_f64(t[std::size_t(i)]));
            const dattn::Tensor lse64 = dattn::Tensor::empty({B, H, N}, DType::float32);
            dattn::forward(config, ref[0], ref[1], ref[2], ref[3], lse64, reference);
            dattn::backward(config, ref[0], ref[1], ref[2], ref[3], lse64, ref[4], ref[5], ref[6], ref[7], reference);
            std::ostringstream problems;
            int reference_rows = 0;
            for (int i : {3, 5, 6, 7})
              for (std::int64_t n = 0; n < N; ++n)
                for (std::int64_t h = 0; h < H; ++h) {
                  bool want = false, have = false;
                  for (std::int64_t d = 0; d < D; ++d) {
                    want |= std::isnan(ref[std::size_t(i)].data<double>()[(n * H + h) * D + d]);
                    have |= std::isnan(
                        load(t[std::size_t(i)].buffer->host.data(), dtype, t[std::size_t(i)].at({0, n, h, d})));
                  }
                  if (i == 3) {
                    reference_rows += want;
                    const bool lse_want = std::isnan(lse64.data<float>()[h * N + n]);
                    const bool lse_have = std::isnan(load(lse.buffer->host.data(), DType::float32, lse.at({0, h, n})));
                    if (lse_want != lse_have) problems << " lse[" << h << ", " << n << "]";
                  }
                  const char* names[] = {"", "", "", "out", "", "dq", "dk", "dv"};
                  // An unselected NaN must reach nothing; a selected one may spread to more
                  // gradient rows than the reference's (a NaN value times a probability of 0).
                  if (want != have && (want || i == 3 || !selected))
                    problems << " " << names[i] << "[" << n << ", " << h << "]";
                }
            // The reference itself must agree with the placement, or the check tests nothing.
            const bool placement_ok = selected ? reference_rows > 0 : reference_rows == 0;
            const bool ok = problems.str().empty() && placement_ok;
            std::printf("%s NaN in %c[%lld, %lld] (%s row), %s %s%s%s: %d reference NaN rows%s%s\n", ok ? "ok" : "FAIL",
                        "qk"[poisoned], static_cast<long long>(row), static_cast<long long>(head),
                        selected ? "a selected" : "an unselected", dattn::dtype_name(dtype),
                        mode == dattn::Mode::grouped ? "grouped" : "longnet", causal ? " causal" : "",
                        tma ? " [sm90 tma]" : "", reference_rows,
                        problems.str().empty() ? "" : "; differs at", problems.str().c_str());
            failures += !ok;
          }
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  int num_cases = 300, threads = int(std::max(1u, std::min(16u, std::thread::hardware_concurrency())));
  std::uint64_t seed = 20251125;
  std::int64_t max_n = 600;
  bool fixed_only = false, random_only = false, passes_only = false, spread_only = false, verbose = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    if (a == "--cases") num_cases = std::atoi(next());
    else if (a == "--seed") seed = std::strtoull(next(), nullptr, 10);
    else if (a == "--max-n") max_n = std::atoll(next());
    else if (a == "--threads") threads = std::atoi(next());
    else if (a == "--fixed-only") fixed_only = true;
    else if (a == "--random-only") random_only = true;
    else if (a == "--passes-only") passes_only = true;
    else if (a == "--spread-only") spread_only = true;
    else if (a == "--verbose") verbose = true;
    else if (a == "--block-sparse") g_all_block_sparse = true;
    else if (a == "--cuda-kernels") {
      const std::string k = next();
      if (k != "auto" && k != "sm80" && k != "sm90") {
        std::fprintf(stderr, "--cuda-kernels %s: expected auto, sm80 or sm90\n", k.c_str());
        return 2;
      }
      g_cuda_kernels = k == "sm80" ? dattn::CudaKernels::sm80 : k == "sm90" ? dattn::CudaKernels::sm90 : dattn::CudaKernels::automatic;
    }
    else if (a == "--head-dims") {
      g_head_dims.clear();
      std::stringstream list(next());
      for (std::string item; std::getline(list, item, ',');) g_head_dims.push_back(std::atoll(item.c_str()));
    }
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
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);

  std::vector<Case> cases;
  if (passes_only) cases = passes_cases(true), fixed_only = true;
  else if (spread_only) cases = spread_cases(true), fixed_only = true;
  else if (!random_only) cases = fixed_cases();
  if (!fixed_only) {
    Rng rng(seed);
    for (int i = 0; i < num_cases; ++i) cases.push_back(random_case(rng, max_n));
  }

  std::atomic<int> next{0}, passed{0}, failed{0};
  std::mutex print;
  std::map<std::string, int> kernels_ran;  // "forward/backward" generations -> cases
  double worst[4][5] = {};  // per kind (bf16, fp16, fp32, tf32): out, lse, dq, dk, dv
  auto kind_of = [](const Case& c) { return c.dtype == DType::bfloat16 ? 0 : c.dtype == DType::float16 ? 1 : c.tf32 ? 3 : 2; };
  auto worker = [&]() {
    CUDA_OK(cudaSetDevice(0));
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    for (int i; (i = next++) < int(cases.size());) {
      Result r;
      try {
        r = run_case(cases[std::size_t(i)], stream);
      } catch (const std::exception& e) {
        r.ok = false;
        r.message = std::string("exception: ") + e.what();
      }
      std::lock_guard<std::mutex> lock(print);
      (r.ok ? passed : failed)++;
      kernels_ran[r.kernels.empty() ? "none (exception)" : r.kernels]++;
      // Every case names the kernel generations (forward/backward) that ran it.
      std::printf("%s case %d [%s]: %s\n", r.ok ? "ok" : "FAIL", i, r.kernels.c_str(),
                  describe(cases[std::size_t(i)]).c_str());
      if (!r.ok || verbose) std::printf("    %s\n", r.message.c_str());
      if (verbose && r.ok)
        std::printf("    errors out %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n", r.worst[0], r.worst[1], r.worst[2],
                    r.worst[3], r.worst[4]);
      if (r.ok)
        for (int k = 0; k < 5; ++k)
          worst[kind_of(cases[std::size_t(i)])][k] = std::max(worst[kind_of(cases[std::size_t(i)])][k], r.worst[k]);
      std::fflush(stdout);
    }
    cudaStreamDestroy(stream);
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(worker);
  for (auto& t : pool) t.join();
  const char* kinds[] = {"bfloat16", "float16", "float32", "float32 tf32"};
  for (int k = 0; k < 4; ++k)
    std::printf("worst passing errors %-13s out %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n", kinds[k], worst[k][0],
                worst[k][1], worst[k][2], worst[k][3], worst[k][4]);
  for (const auto& [kernels, count] : kernels_ran)
    std::printf("kernel generations forward/backward %s: %d cases\n", kernels.c_str(), count);
  failed += check_refusals();
  failed += check_nan_propagation();
  if (!fixed_only) failed += check_packed_batches(random_only ? 4 : 24, seed + 7);
  if (!fixed_only) failed += check_decode(random_only ? 4 : 32, seed + 11);
  std::printf("%d passed, %d failed\n", passed.load(), failed.load());
  return failed == 0 ? 0 : 1;
}
