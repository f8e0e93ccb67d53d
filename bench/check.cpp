#include "check.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <cstring>
#include <set>
#include <stdexcept>

namespace dattn_bench {
namespace {

using dattn::DType;
using dattn::Tensor;
using dattn::TensorView;

constexpr double kInf = std::numeric_limits<double>::infinity();

double load(const TensorView& t, std::int64_t i) {
  switch (t.dtype) {
    case DType::float32: return t.ptr<float>()[i];
    case DType::float64: return t.ptr<double>()[i];
    case DType::bfloat16: return dattn::bfloat16_to_float(t.ptr<std::uint16_t>()[i]);
    case DType::float16: return dattn::float16_to_float(t.ptr<std::uint16_t>()[i]);
    default: break;  // not an attention dtype
  }
  return 0;
}

std::int64_t offset4(const TensorView& t, std::int64_t b, std::int64_t n, std::int64_t h, std::int64_t d) {
  return b * t.strides[0] + n * t.strides[1] + h * t.strides[2] + d * t.strides[3];
}

std::uint64_t splitmix64(std::uint64_t& x) {
  std::uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Squared-error accumulator of one tensor.
struct L2 {
  double err2 = 0, ref2 = 0;
  void add(double x, double ref) {
    err2 += (x - ref) * (x - ref);
    ref2 += ref * ref;
  }
  void merge(const L2& o) {
    err2 += o.err2;
    ref2 += o.ref2;
  }
  double rel() const {
    if (std::isnan(err2)) return kInf;
    if (ref2 == 0) return err2 == 0 ? 0.0 : kInf;
    return std::sqrt(err2 / ref2);
  }
};

double lse_error(double x, double ref) {
  if (std::isnan(x)) return kInf;
  if (ref == -kInf || x == -kInf) return x == ref ? 0.0 : kInf;
  return std::fabs(x - ref) / std::max(1.0, std::fabs(ref));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
Problem scaled_down(const Problem& p, std::int64_t factor) {
  Problem r = p;
  r.N = std::max<std::int64_t>(1, (p.N + factor - 1) / factor);
  for (std::size_t i = 0; i < p.config.segment_lengths.size(); ++i) {
    r.config.segment_lengths[i] = std::max<std::int64_t>(1, p.config.segment_lengths[i] / factor);
    r.config.dilation_rates[i] = std::min(p.config.dilation_rates[i], r.config.segment_lengths[i]);
  }
  return r;
}

std::int64_t reduction_factor(const Problem& p, double max_pairs) {
  std::int64_t min_rows = std::numeric_limits<std::int64_t>::max();
  for (std::size_t i = 0; i < p.config.segment_lengths.size(); ++i)
    min_rows = std::min(min_rows, std::min(p.config.segment_lengths[i], p.N) / p.config.dilation_rates[i]);
  std::int64_t factor = 1;
  while (scaled_down(p, factor).pairs() > max_pairs && min_rows / (factor * 2) >= 16) factor *= 2;
  return factor;
}

// ---------------------------------------------------------------------------------------------
double Errors::max_rel() const { return std::max({out, dq, dk, dv}); }

double l2_bar(DType dtype) {
  switch (dtype) {
    case DType::float32: return 1e-5;
    case DType::bfloat16: return 1.5e-2;
    case DType::float16: return 3e-3;
    default: return 0;
  }
}

double lse_bar(DType dtype) { return dtype == DType::float32 ? 1e-5 : 1e-3; }

bool Errors::passes(DType dtype, std::string* why) const {
  auto fail = [&](const std::string& s) {
    if (why) *why = s;
    return false;
  };
  if (!finite) return fail("NaN or Inf in the outputs");
  const double bar = l2_bar(dtype);
  const char* names[] = {"out", "dq", "dk", "dv"};
  const double values[] = {out, dq, dk, dv};
  for (int i = 0; i < 4; ++i)
    if (!(values[i] <= bar))
      return fail(std::string(names[i]) + " rel. L2 error " + std::to_string(values[i]) + " > " +
                  std::to_string(bar));
  if (!(lse <= lse_bar(dtype)))
    return fail("lse error " + std::to_string(lse) + " > " + std::to_string(lse_bar(dtype)));
  return true;
}

// ---------------------------------------------------------------------------------------------
void fill_normal(const Tensor& t, std::uint64_t seed) {
  const std::int64_t n = t.numel();
  constexpr std::int64_t kChunk = 1 << 16;
  const std::int64_t chunks = (n + kChunk - 1) / kChunk;
  const TensorView view = t.view();
#pragma omp parallel for schedule(static)
  for (std::int64_t c = 0; c < chunks; ++c) {
    std::uint64_t state = seed * 0x100000001B3ull + std::uint64_t(c) * 0x9E3779B97F4A7C15ull;
    const std::int64_t end = std::min(n, (c + 1) * kChunk);
    for (std::int64_t i = c * kChunk; i < end; i += 2) {
      // Box-Muller from two uniforms: u1 in (0, 1] (24 bits), u2 in [0, 1).
      const std::uint64_t bits = splitmix64(state);
      const float u1 = (float(bits >> 40) + 1.0f) * 0x1.0p-24f;
      const float u2 = float((bits >> 16) & 0xFFFFFFu) * 0x1.0p-24f;
      const float radius = std::sqrt(-2.0f * std::log(u1));
      const float angle = 6.2831853f * u2;
      const float pair[2] = {radius * std::cos(angle), radius * std::sin(angle)};
      for (int j = 0; j < 2 && i + j < end; ++j) {
        switch (view.dtype) {
          case DType::float32: view.ptr<float>()[i + j] = pair[j]; break;
          case DType::float64: view.ptr<double>()[i + j] = pair[j]; break;
          case DType::bfloat16: view.ptr<std::uint16_t>()[i + j] = dattn::float_to_bfloat16(pair[j]); break;
          case DType::float16: view.ptr<std::uint16_t>()[i + j] = dattn::float_to_float16(pair[j]); break;
          default: break;  // not an attention dtype
        }
      }
    }
  }
}

void fill_nan(const Tensor& t) {
  // All bits set is a NaN in float32, float64, bfloat16 and float16.
  std::memset(t.view().data, 0xFF, t.nbytes());
}

bool all_finite(const Tensor& t) {
  const std::int64_t n = t.numel();
  const TensorView view = t.view();
  bool ok = true;
#pragma omp parallel for reduction(&& : ok) schedule(static)
  for (std::int64_t i = 0; i < n; ++i) ok = ok && std::isfinite(load(view, i));
  return ok;
}

CallTensors CallTensors::make(const Problem& p, DType dtype, std::uint64_t seed) {
  CallTensors t;
  const auto shape = p.qkv_shape();
  t.q = Tensor::empty(shape, dtype);
  t.k = Tensor::empty(shape, dtype);
  t.v = Tensor::empty(shape, dtype);
  t.dout = Tensor::empty(shape, dtype);
  fill_normal(t.q, seed * 4 + 1);
  fill_normal(t.k, seed * 4 + 2);
  fill_normal(t.v, seed * 4 + 3);
  fill_normal(t.dout, seed * 4 + 4);
  // Outputs start as NaN, so a row a kernel forgets to write fails the checks.
  t.out = Tensor::empty(shape, dtype);
  t.dq = Tensor::empty(shape, dtype);
  t.dk = Tensor::empty(shape, dtype);
  t.dv = Tensor::empty(shape, dtype);
  t.lse = Tensor::empty({p.B, p.H, p.N}, DType::float32);
  for (const Tensor* x : {&t.out, &t.dq, &t.dk, &t.dv, &t.lse}) fill_nan(*x);
  return t;
}

Tensor to_float64(const Tensor& t) {
  Tensor r = Tensor::empty(std::vector<std::int64_t>(t.view().shape.begin(), t.view().shape.begin() + t.view().rank),
                           DType::float64);
  const std::int64_t n = t.numel();
  for (std::int64_t i = 0; i < n; ++i) r.data<double>()[i] = load(t.view(), i);
  return r;
}

double rel_l2(const Tensor& x, const Tensor& ref) {
  L2 acc;
  const std::int64_t n = x.numel();
  for (std::int64_t i = 0; i < n; ++i) acc.add(load(x.view(), i), ref.data<double>()[i]);
  return acc.rel();
}

// ---------------------------------------------------------------------------------------------
namespace {

double lse_max_error(const Tensor& x, const Tensor& ref) {
  double worst = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i)
    worst = std::max(worst, lse_error(x.data<float>()[i], ref.data<float>()[i]));
  return worst;
}

// View of batch b and heads {j, j + c, j + 2c, ...} (count heads) of a contiguous [B, N, H, D].
TensorView sub_view(const Tensor& t, std::int64_t b, std::int64_t j, std::int64_t c, std::int64_t count) {
  const TensorView& v = t.view();
  auto* base = static_cast<std::byte*>(v.data) +
               (b * v.strides[0] + j * v.strides[2]) * std::int64_t(dattn::dtype_size(v.dtype));
  return dattn::make_view(base, v.dtype, {1, v.shape[1], count, v.shape[3]},
                          {v.strides[0], v.strides[1], v.strides[2] * c, 1});
}

// Same for a contiguous lse [B, H, N].
TensorView sub_lse(const Tensor& t, std::int64_t b, std::int64_t j, std::int64_t c, std::int64_t count) {
  const TensorView& v = t.view();
  float* base = v.ptr<float>() + b * v.strides[0] + j * v.strides[1];
  return dattn::make_view(base, DType::float32, {1, count, v.shape[2]}, {v.strides[0], v.strides[1] * c, 1});
}

}  // namespace

void scale_tensor(const Tensor& t, double factor) {
  const TensorView v = t.view();
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const float x = float(load(v, i) * factor);
    switch (v.dtype) {
      case DType::float32: v.ptr<float>()[i] = x; break;
      case DType::float64: v.ptr<double>()[i] = load(v, i) * factor; break;
      case DType::bfloat16: v.ptr<std::uint16_t>()[i] = dattn::float_to_bfloat16(x); break;
      case DType::float16: v.ptr<std::uint16_t>()[i] = dattn::float_to_float16(x); break;
      default: break;  // not an attention dtype
    }
  }
}

ReducedCheck reduced_check(const Problem& full, DType dtype, const dattn::LaunchOptions& options,
                           double max_pairs, std::uint64_t seed, double perturb) {
  ReducedCheck result;
  result.factor = reduction_factor(full, max_pairs);
  result.problem = scaled_down(full, result.factor);
  const Problem& p = result.problem;

  CallTensors t = CallTensors::make(p, dtype, seed);
  dattn::forward(p.config, t.q, t.k, t.v, t.out, t.lse, options);
  dattn::backward(p.config, t.q, t.k, t.v, t.out, t.lse, t.dout, t.dq, t.dk, t.dv, options);
  if (perturb != 0) {
    scale_tensor(t.out, 1 + perturb);
    scale_tensor(t.dk, 1 + perturb);
  }

  // The reference on float64 copies of the same values, split into independent jobs: each
  // batch, and in grouped mode with equal head groups, each set of one head per group.
  const Tensor q = to_float64(t.q), k = to_float64(t.k), v = to_float64(t.v), dout = to_float64(t.dout);
  const auto shape = p.qkv_shape();
  const Tensor out = Tensor::empty(shape, DType::float64), dq = Tensor::empty(shape, DType::float64),
               dk = Tensor::empty(shape, DType::float64), dv = Tensor::empty(shape, DType::float64),
               lse = Tensor::empty({p.B, p.H, p.N}, DType::float32);
  const std::int64_t G = std::int64_t(p.config.segment_lengths.size());
  const bool split_heads = p.config.mode == dattn::Mode::grouped && p.H % G == 0 && p.H > G;
  const std::int64_t subsets = split_heads ? p.H / G : 1;
  const std::int64_t heads_per_job = split_heads ? G : p.H;
  const std::int64_t jobs = p.B * subsets;
  dattn::LaunchOptions ref_options;
  ref_options.backend = dattn::Backend::reference;
  std::string job_error;
  const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t job = 0; job < jobs; ++job) {
    const std::int64_t b = job / subsets, j = job % subsets;
    const std::int64_t c = split_heads ? subsets : 1;
    try {
      auto view = [&](const Tensor& x) { return sub_view(x, b, j, c, heads_per_job); };
      const TensorView lse_view = sub_lse(lse, b, j, c, heads_per_job);
      dattn::forward(p.config, view(q), view(k), view(v), view(out), lse_view, ref_options);
      dattn::backward(p.config, view(q), view(k), view(v), view(out), lse_view, view(dout), view(dq),
                      view(dk), view(dv), ref_options);
    } catch (const std::exception& e) {
#pragma omp critical
      job_error = e.what();
    }
  }
  result.reference_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!job_error.empty()) throw std::runtime_error("reference failed: " + job_error);

  Errors& e = result.errors;
  e.finite = all_finite(t.out) && all_finite(t.dq) && all_finite(t.dk) && all_finite(t.dv);
  e.out = rel_l2(t.out, out);
  e.dq = rel_l2(t.dq, dq);
  e.dk = rel_l2(t.dk, dk);
  e.dv = rel_l2(t.dv, dv);
  e.lse = lse_max_error(t.lse, lse);
  e.rows_checked = p.B * p.H * p.N;

  // The spot checker must agree with the reference (it is what checks the full-size runs).
  const SpotChecker spot(p, q, k, v, dout);
  const Errors self = spot.check(out, lse, dq, dk, dv, seed + 17);
  result.spot_self_check = std::max(self.max_rel(), self.lse);
  if (!(self.max_rel() <= 1e-9 && self.lse <= 1e-6 && self.finite))
    throw CheckerBroken("dattn-bench's spot checker disagrees with the reference on " + p.name +
                           " (N=" + std::to_string(p.N) + "): out " + std::to_string(self.out) + ", dq " +
                           std::to_string(self.dq) + ", dk " + std::to_string(self.dk) + ", dv " +
                           std::to_string(self.dv) + ", lse " + std::to_string(self.lse));
  return result;
}

// ---------------------------------------------------------------------------------------------
SpotChecker::SpotChecker(const Problem& problem, const TensorView& q, const TensorView& k,
                         const TensorView& v, const TensorView& dout)
    : p_(problem), q_(q), k_(k), v_(v), dout_(dout) {
  scale_ = problem.config.scale.value_or(1.0 / std::sqrt(double(problem.D)));
  out_scale_ = problem.config.mode == dattn::Mode::grouped
                   ? 1.0 / double(problem.config.segment_lengths.size())
                   : 1.0;
  if (problem.config.key_padding_mask || problem.config.dropout_p != 0.0)
    throw std::invalid_argument("SpotChecker: key padding and dropout are not supported");
}

std::vector<int> SpotChecker::branches_of_head(std::int64_t h) const {
  const int G = int(p_.config.segment_lengths.size());
  std::vector<int> result;
  if (p_.config.mode == dattn::Mode::longnet) {
    for (int i = 0; i < G; ++i) result.push_back(i);
    return result;
  }
  std::int64_t first = 0;
  for (int i = 0; i < G; ++i) {
    const std::int64_t count = p_.H / G + (i < p_.H % G ? 1 : 0);
    if (h >= first && h < first + count) result.push_back(i);
    first += count;
  }
  return result;
}

std::int64_t SpotChecker::offset(int branch, std::int64_t h) const {
  const std::int64_t r = p_.config.dilation_rates[branch];
  return p_.config.mode == dattn::Mode::grouped ? branch % r : h % r;
}

std::vector<std::int64_t> SpotChecker::selected_with(int branch, std::int64_t h, std::int64_t p) const {
  const std::int64_t w = p_.config.segment_lengths[branch], r = p_.config.dilation_rates[branch];
  const std::int64_t o = offset(branch, h);
  const std::int64_t start = p / w * w, end = std::min(start + w, p_.N);
  std::vector<std::int64_t> positions;
  if ((p - start) % r != o) return positions;
  for (std::int64_t x = start + o; x < end; x += r) positions.push_back(x);
  return positions;
}

std::vector<std::int64_t> SpotChecker::keys_of(std::int64_t h, std::int64_t p) const {
  std::vector<std::int64_t> keys;
  for (int i : branches_of_head(h))
    for (std::int64_t key : selected_with(i, h, p))
      if (!p_.config.causal || key <= p) keys.push_back(key);
  return keys;
}

std::vector<std::int64_t> SpotChecker::queries_of(std::int64_t h, std::int64_t k) const {
  std::vector<std::int64_t> queries;
  for (int i : branches_of_head(h))
    for (std::int64_t query : selected_with(i, h, k))
      if (!p_.config.causal || query >= k) queries.push_back(query);
  return queries;
}

namespace {

// Rows of one (batch, head) converted to float64, [N][D] each.
struct HeadRows {
  std::vector<double> q, k, v, dout;
};

double dot(const double* a, const double* b, std::int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  std::int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    s0 += a[d] * b[d];
    s1 += a[d + 1] * b[d + 1];
    s2 += a[d + 2] * b[d + 2];
    s3 += a[d + 3] * b[d + 3];
  }
  for (; d < n; ++d) s0 += a[d] * b[d];
  return (s0 + s1) + (s2 + s3);
}

}  // namespace

Errors SpotChecker::check(const TensorView& out, const TensorView& lse, const TensorView& dq,
                          const TensorView& dk, const TensorView& dv, std::uint64_t seed) const {
  std::mt19937_64 rng(seed);
  const std::int64_t D = p_.D, N = p_.N;
  const int G = int(p_.config.segment_lengths.size());

  struct Sample {
    std::int64_t b, h;
    std::vector<std::int64_t> query_rows, key_rows;
  };
  std::vector<Sample> samples;
  auto pick = [&](const std::vector<std::int64_t>& from, std::size_t count) {
    std::vector<std::int64_t> chosen;
    if (from.empty()) return chosen;
    std::set<std::int64_t> seen{from.front(), from.back()};
    while (seen.size() < std::min(count, from.size())) seen.insert(from[rng() % from.size()]);
    return std::vector<std::int64_t>(seen.begin(), seen.end());
  };
  std::int64_t first_head = 0;
  for (int i = 0; i < G; ++i) {
    std::int64_t head_lo = 0, head_count = p_.H;
    if (p_.config.mode == dattn::Mode::grouped) {
      head_count = p_.H / G + (i < p_.H % G ? 1 : 0);
      head_lo = first_head;
      first_head += head_count;
    }
    if (head_count == 0) continue;
    Sample s;
    s.b = std::int64_t(rng() % std::uint64_t(p_.B));
    s.h = head_lo + std::int64_t(rng() % std::uint64_t(head_count));
    const std::int64_t w = p_.config.segment_lengths[i], r = p_.config.dilation_rates[i];
    const std::int64_t segments = (N + w - 1) / w;
    const std::int64_t seg = i == 0 ? segments - 1 : std::int64_t(rng() % std::uint64_t(segments));
    const std::int64_t start = seg * w, end = std::min(start + w, N), o = offset(i, s.h);
    std::vector<std::int64_t> selected, unselected;
    for (std::int64_t x = start; x < end; ++x) ((x - start) % r == o ? selected : unselected).push_back(x);
    s.query_rows = pick(selected, 12);
    s.key_rows = pick(selected, 6);
    for (std::int64_t x : pick(unselected, 2)) s.query_rows.push_back(x);
    for (std::int64_t x : pick(unselected, 1)) s.key_rows.push_back(x);
    // In longnet mode a key row needs every query of every branch's segment and each of those
    // rows all of its keys: keep that to the first sample.
    if (p_.config.mode == dattn::Mode::longnet && !samples.empty()) s.key_rows.clear();
    samples.push_back(std::move(s));
  }

  // Float64 copies of the sampled heads.
  std::unordered_map<std::int64_t, HeadRows> heads;
  for (const Sample& s : samples) {
    HeadRows& rows = heads[s.b * p_.H + s.h];
    if (!rows.q.empty()) continue;
    for (auto* pair : {&rows.q, &rows.k, &rows.v, &rows.dout}) pair->resize(std::size_t(N * D));
#pragma omp parallel for schedule(static)
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t d = 0; d < D; ++d) {
        const std::size_t i = std::size_t(n * D + d);
        rows.q[i] = load(q_, offset4(q_, s.b, n, s.h, d));
        rows.k[i] = load(k_, offset4(k_, s.b, n, s.h, d));
        rows.v[i] = load(v_, offset4(v_, s.b, n, s.h, d));
        rows.dout[i] = load(dout_, offset4(dout_, s.b, n, s.h, d));
      }
  }

  // One query row: lse, delta = dO·out, and optionally out and dq.
  auto query_row = [&](const HeadRows& rows, std::int64_t h, std::int64_t p, double* out_row, double* dq_row,
                       RowStats* stats) {
    const std::vector<std::int64_t> keys = keys_of(h, p);
    const double* qp = &rows.q[std::size_t(p * D)];
    const double* dop = &rows.dout[std::size_t(p * D)];
    if (out_row) std::fill(out_row, out_row + D, 0.0);
    if (dq_row) std::fill(dq_row, dq_row + D, 0.0);
    if (keys.empty()) {
      *stats = {-kInf, 0.0};
      return;
    }
    std::vector<double> score(keys.size()), dprob(keys.size());
    double m = -kInf;
    for (std::size_t j = 0; j < keys.size(); ++j) {
      score[j] = scale_ * dot(qp, &rows.k[std::size_t(keys[j] * D)], D);
      dprob[j] = out_scale_ * dot(dop, &rows.v[std::size_t(keys[j] * D)], D);
      m = std::max(m, score[j]);
    }
    double sum = 0;
    for (double s : score) sum += std::exp(s - m);
    const double row_lse = m + std::log(sum);
    double delta = 0;
    for (std::size_t j = 0; j < keys.size(); ++j) {
      score[j] = std::exp(score[j] - row_lse);  // now the probability
      delta += score[j] * dprob[j];
    }
    if (out_row)
      for (std::size_t j = 0; j < keys.size(); ++j) {
        const double* vj = &rows.v[std::size_t(keys[j] * D)];
        for (std::int64_t d = 0; d < D; ++d) out_row[d] += out_scale_ * score[j] * vj[d];
      }
    if (dq_row)
      for (std::size_t j = 0; j < keys.size(); ++j) {
        const double* kj = &rows.k[std::size_t(keys[j] * D)];
        const double g = scale_ * score[j] * (dprob[j] - delta);
        for (std::int64_t d = 0; d < D; ++d) dq_row[d] += g * kj[d];
      }
    *stats = {row_lse, delta};
  };

  L2 e_out, e_dq, e_dk, e_dv;
  double e_lse = 0;
  bool finite = true;
  std::int64_t rows_checked = 0;
  auto compare_row = [&](L2& acc, const TensorView& t, std::int64_t b, std::int64_t n, std::int64_t h,
                         const double* ref) {
    for (std::int64_t d = 0; d < D; ++d) {
      const double x = load(t, offset4(t, b, n, h, d));
      if (!std::isfinite(x)) finite = false;
      acc.add(x, ref[d]);
    }
  };

  for (const Sample& s : samples) {
    const HeadRows& rows = heads.at(s.b * p_.H + s.h);
    // Query rows.
    const std::int64_t nq = std::int64_t(s.query_rows.size());
    std::vector<double> ref_out(std::size_t(nq * D)), ref_dq(std::size_t(nq * D));
    std::vector<RowStats> stats(static_cast<std::size_t>(nq));
#pragma omp parallel for schedule(dynamic, 1)
    for (std::int64_t i = 0; i < nq; ++i)
      query_row(rows, s.h, s.query_rows[std::size_t(i)], &ref_out[std::size_t(i * D)], &ref_dq[std::size_t(i * D)],
                &stats[std::size_t(i)]);
    for (std::int64_t i = 0; i < nq; ++i) {
      const std::int64_t p = s.query_rows[std::size_t(i)];
      compare_row(e_out, out, s.b, p, s.h, &ref_out[std::size_t(i * D)]);
      compare_row(e_dq, dq, s.b, p, s.h, &ref_dq[std::size_t(i * D)]);
      const double x = lse.ptr<float>()[s.b * lse.strides[0] + s.h * lse.strides[1] + p * lse.strides[2]];
      e_lse = std::max(e_lse, lse_error(x, stats[std::size_t(i)].lse));
      ++rows_checked;
    }

    // Key rows: every query that attends to them, with its lse and delta.
    if (s.key_rows.empty()) continue;
    std::vector<std::vector<std::int64_t>> attending;
    std::set<std::int64_t> needed;
    for (std::int64_t key : s.key_rows) {
      attending.push_back(queries_of(s.h, key));
      needed.insert(attending.back().begin(), attending.back().end());
    }
    const std::vector<std::int64_t> needed_rows(needed.begin(), needed.end());
    std::vector<RowStats> needed_stats(needed_rows.size());
#pragma omp parallel for schedule(dynamic, 8)
    for (std::int64_t i = 0; i < std::int64_t(needed_rows.size()); ++i)
      query_row(rows, s.h, needed_rows[std::size_t(i)], nullptr, nullptr, &needed_stats[std::size_t(i)]);
    std::unordered_map<std::int64_t, RowStats> by_row;
    for (std::size_t i = 0; i < needed_rows.size(); ++i) by_row[needed_rows[i]] = needed_stats[i];

    for (std::size_t r = 0; r < s.key_rows.size(); ++r) {
      const std::int64_t key = s.key_rows[r];
      std::vector<double> ref_dk(std::size_t(D), 0.0), ref_dv(std::size_t(D), 0.0);
      const double* kk = &rows.k[std::size_t(key * D)];
      const double* vk = &rows.v[std::size_t(key * D)];
      for (std::int64_t query : attending[r]) {
        const RowStats& st = by_row.at(query);
        const double* qq = &rows.q[std::size_t(query * D)];
        const double* dq_row = &rows.dout[std::size_t(query * D)];
        const double prob = std::exp(scale_ * dot(qq, kk, D) - st.lse);
        const double dprob = out_scale_ * dot(dq_row, vk, D);
        const double g = scale_ * prob * (dprob - st.delta);
        for (std::int64_t d = 0; d < D; ++d) {
          ref_dv[std::size_t(d)] += prob * out_scale_ * dq_row[d];
          ref_dk[std::size_t(d)] += g * qq[d];
        }
      }
      compare_row(e_dk, dk, s.b, key, s.h, ref_dk.data());
      compare_row(e_dv, dv, s.b, key, s.h, ref_dv.data());
      ++rows_checked;
    }
  }

  Errors e;
  e.out = e_out.rel();
  e.dq = e_dq.rel();
  e.dk = e_dk.rel();
  e.dv = e_dv.rel();
  e.lse = e_lse;
  e.finite = finite;
  e.rows_checked = rows_checked;
  return e;
}

}  // namespace dattn_bench
