// Validation in one place: every error names the argument and the expected value. Kernels
// below the API assume what is checked here.
#include "validate.hpp"

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "dattn/attention.hpp"
#include "dattn/error.hpp"
#include "dattn/philox.hpp"
#include "head_dims.hpp"
#ifdef DATTN_WITH_CUDA
#include "cuda/cuda_attention.hpp"
#include "cuda/ring_kernels.hpp"
#endif

namespace dattn::detail {
namespace {

constexpr std::int64_t kMaxCpuHeadDim = 256;

std::string str(std::int64_t x) { return std::to_string(x); }

}  // namespace

void check_config(const DilatedConfig& config) {
  const auto& w = config.segment_lengths;
  const auto& r = config.dilation_rates;
  if (w.empty()) throw Error("segment_lengths is empty; expected at least one segment length");
  if (w.size() != r.size())
    throw Error("segment_lengths has " + str(w.size()) + " entries but dilation_rates has " +
                str(r.size()) + "; expected equal lengths");
  if (w.size() > std::size_t(detail::kMaxBranches))
    throw Error("segment_lengths has " + str(w.size()) + " entries; at most " +
                str(detail::kMaxBranches) + " branches are supported");
  for (std::size_t i = 0; i < w.size(); ++i) {
    const std::string pair = "(segment_lengths[" + str(i) + "] = " + str(w[i]) +
                             ", dilation_rates[" + str(i) + "] = " + str(r[i]) + ")";
    if (w[i] < 1) throw Error("segment length must be >= 1 in " + pair);
    if (r[i] < 1 || r[i] > w[i])
      throw Error("dilation rate must be in [1, segment length] in " + pair);
  }
}

void check_attention_tensor(const char* name, const TensorView& t, const TensorView& like) {
  if (t.data == nullptr) throw Error(std::string(name) + " is null; expected a [B, N, H, D] tensor");
  if (t.rank != 4)
    throw Error(std::string(name) + " has rank " + str(t.rank) + "; expected rank 4 [B, N, H, D]");
  if (t.dtype != like.dtype)
    throw Error(std::string(name) + " has dtype " + dtype_name(t.dtype) + "; expected " +
                dtype_name(like.dtype) + " (the dtype of q)");
  if (!(t.device == like.device))
    throw Error(std::string(name) + " is on " + device_name(t.device) + "; expected " +
                device_name(like.device) + " (the device of q)");
  for (int d = 0; d < 4; ++d)
    if (t.shape[d] != like.shape[d])
      throw Error(std::string(name) + " has shape " + t.shape_string() + "; expected " +
                  like.shape_string() + " (the shape of q; k, v, dk and dv may have Hkv heads)");
  if (t.strides[3] != 1)
    throw Error(std::string(name) + " has stride " + str(t.strides[3]) +
                " along D; expected 1 (the head dim must be contiguous)");
}

void check_head_dim(const TensorView& q) {
  const std::int64_t D = q.shape[3];
  if (q.device.type == DeviceType::cuda) {
    if (!is_cuda_head_dim(D))
      throw Error("head dim D = " + str(D) + " is not supported on the GPU; expected one of " + cuda_head_dims_text());
  } else if (D > kMaxCpuHeadDim) {
    throw Error("head dim D = " + str(D) + " is not supported on the CPU; expected 1 <= D <= " + str(kMaxCpuHeadDim));
  }
}

void require_cuda_query(const TensorView& q) {
  if (q.device.type != DeviceType::cuda) throw Error("q is not a CUDA tensor; expected one (the TMA loads are a CUDA path)");
}

// docs/semantics.md "Tensors": GPU kernels load 16 bytes at a time.
void check_cuda_alignment(const char* name, const TensorView& t) {
  const std::int64_t element = std::int64_t(dtype_size(t.dtype));
  if (reinterpret_cast<std::uintptr_t>(t.data) % 16 != 0)
    throw Error(std::string(name) + " has a base pointer not aligned to 16 bytes; expected 16-byte alignment on the GPU");
  for (int d = 0; d + 1 < t.rank; ++d)
    if ((t.strides[d] * element) % 16 != 0)
      throw Error(std::string(name) + " has stride " + str(t.strides[d]) + " along dim " + str(d) +
                  "; expected a multiple of 16 bytes (" + str(16 / element) + " elements) on the GPU");
}

void check_lse(const TensorView& lse, const TensorView& q) {
  if (lse.data == nullptr) throw Error("lse is null; expected a [B, H, N] float32 tensor");
  if (lse.rank != 3 || lse.shape[0] != q.shape[0] || lse.shape[1] != q.shape[2] ||
      lse.shape[2] != q.shape[1])
    throw Error("lse has shape " + lse.shape_string() + "; expected [" + str(q.shape[0]) + ", " +
                str(q.shape[2]) + ", " + str(q.shape[1]) + "] ([B, H, N])");
  if (lse.dtype != DType::float32)
    throw Error(std::string("lse has dtype ") + dtype_name(lse.dtype) + "; expected float32");
  if (!(lse.device == q.device))
    throw Error("lse is on " + device_name(lse.device) + "; expected " + device_name(q.device));
}

// A position index map must be a permutation of [0, N): anything else would read or write
// rows twice or never.
// An index on a GPU is checked by the CUDA layer, which copies it to the host.
void check_position_index(const TensorView& index, const TensorView& q) {
  if (index.data == nullptr) throw Error("position_index is null; expected an [N] int64 permutation or none");
  if (index.rank != 1 || index.shape[0] != q.shape[1])
    throw Error("position_index has shape " + index.shape_string() + "; expected [" + str(q.shape[1]) + "] ([N])");
  if (index.dtype != DType::int64)
    throw Error(std::string("position_index has dtype ") + dtype_name(index.dtype) + "; expected int64");
  if (index.device != q.device)
    throw Error("position_index is on " + device_name(index.device) + "; expected " + device_name(q.device) +
                " (the device of q)");
  if (index.strides[0] != 1) throw Error("position_index has stride " + str(index.strides[0]) + "; expected 1");
  if (index.device.type != DeviceType::cpu) return;
  std::vector<bool> seen(std::size_t(q.shape[1]), false);
  for (std::int64_t i = 0; i < q.shape[1]; ++i) {
    const std::int64_t row = index.ptr<std::int64_t>()[i];
    if (row < 0 || row >= q.shape[1] || seen[std::size_t(row)])
      throw Error("position_index[" + str(i) + "] = " + str(row) + "; expected a permutation of [0, " +
                  str(q.shape[1]) + ")");
    seen[std::size_t(row)] = true;
  }
}

// A ring step's local queries and key range lie inside the global sequence; returns the number
// of key rows.
std::int64_t check_ring_step(const RingStep& step, const TensorView& q) {
  const std::int64_t local = q.shape[1];
  if (step.global_length < 1 || step.query_position < 0 || step.query_position + local > step.global_length)
    throw Error("ring_step: query rows [" + str(step.query_position) + ", " + str(step.query_position + local) +
                ") must lie in [0, global_length = " + str(step.global_length) + ")");
  if (step.key_begin < 0 || step.key_end <= step.key_begin || step.key_end > step.global_length)
    throw Error("ring_step: key rows [" + str(step.key_begin) + ", " + str(step.key_end) +
                ") must be non-empty and lie in [0, global_length = " + str(step.global_length) + ")");
  return step.key_end - step.key_begin;
}

std::int64_t check_kv_heads(const TensorView& q, const TensorView& k) {
  if (k.rank != 4 || k.data == nullptr) return q.shape[2];  // check_attention_tensor names it
  const std::int64_t H = q.shape[2], kv_heads = k.shape[2];
  if (kv_heads < 1 || H % kv_heads != 0)
    throw Error("k has " + str(kv_heads) + " heads and q has H = " + str(H) +
                "; expected a number of key/value heads Hkv that divides H (grouped-query heads)");
  return kv_heads;
}

void check_inputs(const CommonSettings& settings, const TensorView& q, const TensorView& k, const TensorView& v,
                  const TensorView& out, const TensorView& lse, const LaunchOptions& options) {
  if (settings.scale && !std::isfinite(*settings.scale))
    throw Error("scale = " + std::to_string(*settings.scale) + "; expected a finite number");
  if (!(settings.dropout_p >= 0.0 && settings.dropout_p < 1.0))
    throw Error("dropout_p = " + std::to_string(settings.dropout_p) + "; expected 0 <= dropout_p < 1");
  if (q.data == nullptr) throw Error("q is null; expected a [B, N, H, D] tensor");
  if (q.rank != 4) throw Error("q has rank " + str(q.rank) + "; expected rank 4 [B, N, H, D]");
  for (int d = 0; d < 4; ++d)
    if (q.shape[d] < 1) throw Error("q has shape " + q.shape_string() + "; every extent must be >= 1");
  if (q.dtype == DType::boolean)
    throw Error("q has dtype bool; expected float32, bfloat16, float16 or float64");
  check_attention_tensor("q", q, q);
  // k and v hold the sequence's rows, or in a ring step the step's key rows, and Hkv heads.
  TensorView key_like = q;
  if (options.ring_step) key_like.shape[1] = check_ring_step(*options.ring_step, q);
  key_like.shape[2] = check_kv_heads(q, k);
  check_attention_tensor("k", k, key_like);
  check_attention_tensor("v", v, key_like);

  const bool reference = options.backend == Backend::reference ||
                         (options.backend == Backend::automatic && q.dtype == DType::float64);
  if (q.dtype == DType::float64 && !reference)
    throw Error("q has dtype float64, which only Backend::reference computes; expected float32, "
                "bfloat16 or float16 for the fused kernels");
  if (q.device.type == DeviceType::cuda) {
#ifndef DATTN_WITH_CUDA
    throw Error("q is on " + device_name(q.device) +
                ", but this build has no CUDA backend; expected cpu tensors (rebuild with DATTN_CUDA=ON)");
#endif
    if (reference) throw Error("Backend::reference runs on the CPU; expected cpu tensors for it");
    const std::int64_t rows = options.ring_step ? options.ring_step->global_length : q.shape[1];
    if (rows > (std::int64_t(1) << 30))  // the kernels' row arithmetic is 32-bit
      throw Error("the sequence has " + str(rows) + " rows; expected at most 2^30 on the GPU");
    check_head_dim(q);
    for (const auto& [name, t] : {std::pair{"q", &q}, {"k", &k}, {"v", &v}}) check_cuda_alignment(name, *t);
  } else {
    check_head_dim(q);
    if (options.stream != nullptr)
      throw Error("stream is set for cpu tensors; expected nullptr (streams are for CUDA tensors)");
    // The sm90 kernels' block options: 0 (chosen per call) is the only value without CUDA kernels.
    for (const auto& [name, value, picks] :
         {std::tuple{"sm90_forward_rows", options.sm90_forward_rows, "a CUDA kernel's block shape"},
          {"sm90_forward_passes", options.sm90_forward_passes, "how a CUDA kernel's blocks walk the queries"},
          {"sm90_backward_passes", options.sm90_backward_passes, "how a CUDA kernel's blocks walk the keys"}})
      if (value != 0)
        throw Error(std::string("options.") + name + " = " + str(value) + " for cpu tensors; expected 0 (it picks " +
                    picks + ")");
    if (options.sm90_backward_dq == BackwardDq::atomic)
      throw Error("options.sm90_backward_dq = atomic for cpu tensors; expected automatic or dq_blocks (atomic is a "
                  "way of the CUDA sm90 backward)");
  }

  if (settings.key_padding_mask) {
    const TensorView& m = *settings.key_padding_mask;
    if (m.data == nullptr) throw Error("key_padding_mask is null; expected a [B, N] bool tensor or no mask");
    if (m.rank != 2 || m.shape[0] != q.shape[0] || m.shape[1] != key_like.shape[1])
      throw Error("key_padding_mask has shape " + m.shape_string() + "; expected [" + str(q.shape[0]) +
                  ", " + str(key_like.shape[1]) + "] ([B, N] of the keys)");
    if (m.dtype != DType::boolean)
      throw Error(std::string("key_padding_mask has dtype ") + dtype_name(m.dtype) + "; expected bool");
    if (!(m.device == q.device))
      throw Error("key_padding_mask is on " + device_name(m.device) + "; expected " + device_name(q.device));
  }
  if (options.position_index) {
    if (options.ring_step) throw Error("options.position_index and options.ring_step are both set; expected one");
    check_position_index(*options.position_index, q);
  }
  if (options.ring_step && reference)
    throw Error("options.ring_step is set for Backend::reference; expected the fused kernels (the reference "
                "computes whole sequences)");
  check_attention_tensor("out", out, q);
  check_lse(lse, q);
  if (q.device.type == DeviceType::cuda) check_cuda_alignment("out", out);
}

void check_gradients(const TensorView& q, const TensorView& k, const TensorView& dout, const TensorView& dq,
                     const TensorView& dk, const TensorView& dv) {
  for (const auto& [name, t, like] : {std::tuple{"dout", &dout, &q}, {"dq", &dq, &q}, {"dk", &dk, &k}, {"dv", &dv, &k}}) {
    check_attention_tensor(name, *t, *like);
    if (q.device.type == DeviceType::cuda) check_cuda_alignment(name, *t);
  }
}

Operand operand(const TensorView& t) {
  return {t.data, t.strides[0], t.strides[1], t.strides[2]};
}

DilatedParams base_params(const CommonSettings& settings, const TensorView& q, const TensorView& k,
                          const TensorView& v, const TensorView& out, const TensorView& lse,
                          const LaunchOptions& options) {
  DilatedParams p;
  p.q = operand(q);
  p.k = operand(k);
  p.v = operand(v);
  p.out = operand(out);
  p.lse = lse.ptr<float>();
  p.lse_batch_stride = lse.strides[0];
  p.lse_head_stride = lse.strides[1];
  p.lse_row_stride = lse.strides[2];
  p.batch = q.shape[0];
  p.seqlen = q.shape[1];
  p.heads = q.shape[2];
  p.kv_heads = k.shape[2];
  p.k.head_group = p.v.head_group = p.heads / p.kv_heads;
  p.head_dim = q.shape[3];
  p.dtype = q.dtype;
  p.causal = settings.causal;
  p.use_tf32 = settings.use_tf32;
  p.scale = float(settings.scale.value_or(1.0 / std::sqrt(double(p.head_dim))));
  if (settings.key_padding_mask) {
    p.key_padding_mask = settings.key_padding_mask->ptr<std::uint8_t>();
    p.mask_batch_stride = settings.key_padding_mask->strides[0];
    p.mask_row_stride = settings.key_padding_mask->strides[1];
  }
  p.dropout_p = float(settings.dropout_p);
  p.dropout_threshold = dropout_threshold(settings.dropout_p);
  p.dropout_rescale = float(1.0 / (1.0 - settings.dropout_p));
  p.dropout_seed = settings.dropout_seed;
  p.dropout_offset = settings.dropout_offset;

  if (options.position_index) p.position_index = options.position_index->ptr<std::int64_t>();
  p.position_index_checked = options.position_index_checked;
  p.stream = options.stream;
  p.cuda_kernels = options.cuda_kernels;
  p.sm90_forward_rows = options.sm90_forward_rows;
  p.sm90_forward_passes = options.sm90_forward_passes;
  p.sm90_backward_passes = options.sm90_backward_passes;
  p.sm90_backward_dq = options.sm90_backward_dq;
  p.workspace = options.workspace;
  p.workspace_bytes = options.workspace_bytes;
  p.global_length = p.seqlen;
  p.key_begin = 0;
  p.key_end = p.seqlen;
  if (options.ring_step) {
    p.query_position = options.ring_step->query_position;
    p.global_length = options.ring_step->global_length;
    p.key_begin = options.ring_step->key_begin;
    p.key_end = options.ring_step->key_end;
  }
  return p;
}

void set_gradients(DilatedParams& p, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                   const TensorView& dv) {
  p.dout = operand(dout);
  p.dq = operand(dq);
  p.dk = operand(dk);
  p.dv = operand(dv);
  p.dk.head_group = p.dv.head_group = p.heads / p.kv_heads;
}

const std::int64_t* position_index_of(const LaunchOptions& options) {
  return options.position_index ? options.position_index->ptr<std::int64_t>() : nullptr;
}

bool use_reference(const LaunchOptions& options, DType dtype) {
  return options.backend == Backend::reference ||
         (options.backend == Backend::automatic && dtype == DType::float64);
}

void check_merge(const TensorView& out, const TensorView& lse, const TensorView& step_out,
                 const TensorView& step_lse) {
  if (out.data == nullptr || out.rank != 4) throw Error("out has shape " + out.shape_string() + "; expected [B, N, H, D]");
  if (out.dtype != DType::float32 && out.dtype != DType::bfloat16 && out.dtype != DType::float16)
    throw Error(std::string("out has dtype ") + dtype_name(out.dtype) + "; expected float32, bfloat16 or float16");
  if (out.device.type != DeviceType::cpu) throw Error("out is on " + device_name(out.device) + "; expected cpu");
  TensorView like = out;  // the accumulator may be wider than the steps' dtype
  like.dtype = step_out.dtype;
  if (step_out.dtype != DType::float32 && step_out.dtype != DType::bfloat16 && step_out.dtype != DType::float16)
    throw Error(std::string("step_out has dtype ") + dtype_name(step_out.dtype) + "; expected float32, bfloat16 or float16");
  check_attention_tensor("step_out", step_out, like);
  if (out.strides[3] != 1) throw Error("out has stride " + str(out.strides[3]) + " along D; expected 1");
  check_lse(lse, out);
  check_lse(step_lse, out);
}

float load_float(const TensorView& t, std::int64_t offset) {
  switch (t.dtype) {
    case DType::bfloat16: return bfloat16_to_float(t.ptr<std::uint16_t>()[offset]);
    case DType::float16: return float16_to_float(t.ptr<std::uint16_t>()[offset]);
    default: return t.ptr<float>()[offset];
  }
}

void store_float(const TensorView& t, std::int64_t offset, float x) {
  switch (t.dtype) {
    case DType::bfloat16: t.ptr<std::uint16_t>()[offset] = float_to_bfloat16(x); break;
    case DType::float16: t.ptr<std::uint16_t>()[offset] = float_to_float16(x); break;
    default: t.ptr<float>()[offset] = x;
  }
}

// A float32 accumulator of the given [B, rows, H, D] shape with stride 1 along D.
void check_accumulator(const char* name, const TensorView& t, const TensorView& q, std::int64_t rows) {
  TensorView like = q;
  like.dtype = DType::float32;
  like.shape[1] = rows;
  if (t.dtype != DType::float32)
    throw Error(std::string(name) + " has dtype " + dtype_name(t.dtype) + "; expected float32 (an accumulator)");
  check_attention_tensor(name, t, like);
}

void check_delta(const TensorView& delta, const TensorView& q) {
  check_lse(delta, q);
  if (delta.strides[2] != 1 || delta.strides[1] != q.shape[1] || delta.strides[0] != q.shape[1] * q.shape[2])
    throw Error("delta has strides that are not contiguous; expected a contiguous [B, H, N] float32 tensor");
}

void finish_query_gradients(std::optional<double> scale, const RingQueryGradients& sums, const TensorView& dq) {
  const TensorView& e = sums.sum_gk;
  if (e.rank != 4) throw Error("sum_gk has shape " + e.shape_string() + "; expected [B, N, H, D]");
  check_accumulator("sum_gk", e, e, e.shape[1]);
  check_accumulator("sum_pk", sums.sum_pk, e, e.shape[1]);
  check_delta(sums.delta, e);
  TensorView like = e;
  like.dtype = dq.dtype;
  check_attention_tensor("dq", dq, like);
  const double s = scale.value_or(1.0 / std::sqrt(double(e.shape[3])));
  for (std::int64_t b = 0; b < e.shape[0]; ++b)
    for (std::int64_t n = 0; n < e.shape[1]; ++n)
      for (std::int64_t h = 0; h < e.shape[2]; ++h) {
        const float delta = sums.delta.ptr<float>()[(b * e.shape[2] + h) * e.shape[1] + n];
        for (std::int64_t d = 0; d < e.shape[3]; ++d) {
          const auto at = [&](const TensorView& t) { return b * t.strides[0] + n * t.strides[1] + h * t.strides[2] + d; };
          const float g = e.ptr<float>()[at(e)], f = sums.sum_pk.ptr<float>()[at(sums.sum_pk)];
          store_float(dq, at(dq), float(s) * (g - delta * f));
        }
      }
}

void add_query_gradients(std::optional<double> scale, const RingQueryGradients& sums, const TensorView& dq) {
  const TensorView& g = sums.sum_gk;
  const std::int64_t B = g.shape[0], N = g.shape[1], H = g.shape[2], D = g.shape[3];
  const double s = scale.value_or(1.0 / std::sqrt(double(D)));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t h = 0; h < H; ++h) {
        const float delta = sums.delta.ptr<float>()[(b * H + h) * N + n];
        const float* gk = g.ptr<float>() + ((b * N + n) * H + h) * D;
        const float* pk = sums.sum_pk.ptr<float>() + ((b * N + n) * H + h) * D;
        float* y = dq.ptr<float>() + b * dq.strides[0] + n * dq.strides[1] + h * dq.strides[2];
        for (std::int64_t d = 0; d < D; ++d) y[d] += float(s) * (gk[d] - delta * pk[d]);
      }
}

void set_ring_query_pass(DilatedParams& p, const TensorView& dout, const RingQueryGradients& sums) {
  p.dout = operand(dout);
  p.dq = operand(sums.sum_gk);
  p.dq_correction = operand(sums.sum_pk);
  p.softmax_delta = sums.delta.ptr<float>();
  p.accumulate = true;
  p.run_key_pass = false;
}

void set_ring_key_pass(DilatedParams& p, const TensorView& dout, const TensorView& delta, const TensorView& dk,
                       const TensorView& dv) {
  p.dout = operand(dout);
  p.dk = operand(dk);
  p.dv = operand(dv);
  p.dk.head_group = p.dv.head_group = p.heads / p.kv_heads;
  p.softmax_delta = delta.ptr<float>();
  p.accumulate = true;
  p.run_query_pass = false;
}

void set_step_gradients(DilatedParams& p, const TensorView& dout, const TensorView& delta, const TensorView& dq,
                        const TensorView& dk, const TensorView& dv) {
  set_gradients(p, dout, dq, dk, dv);
  p.out = {};  // not read: delta is given
  p.softmax_delta = delta.ptr<float>();
  p.float32_outputs = true;
}

void set_backward_workspace(DilatedParams& p, const TensorView& q, const TensorView& out, const TensorView& dout,
                            const LaunchOptions& options) {
#ifdef DATTN_WITH_CUDA
  if (options.workspace == nullptr || options.workspace_bytes < backward_workspace_bytes(q)) return;
  if (reinterpret_cast<std::uintptr_t>(options.workspace) % 4 != 0)
    throw Error("options.workspace is not 4-byte aligned; expected float32-aligned device memory");
  cuda::check_supported(p);  // before the workspace is written
  p.softmax_delta = static_cast<float*>(options.workspace);
  cuda::row_dot(dout, out, p.softmax_delta, options.stream);
#else
  (void)p, (void)q, (void)out, (void)dout, (void)options;
#endif
}

}  // namespace dattn::detail
