// Dilated attention's API: validate, fill DilatedParams (with the branch table), dispatch on
// device and dtype.
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include "cpu/cpu_attention.hpp"
#ifdef DATTN_WITH_CUDA
#include "cuda/cuda_attention.hpp"
#endif
#include "dattn/attention.hpp"
#include "dattn/error.hpp"
#include "params.hpp"
#include "params_of.hpp"
#include "reference/reference.hpp"
#include "validate.hpp"

namespace dattn {
namespace {

using detail::DilatedParams;

detail::CommonSettings settings_of(const DilatedConfig& config) {
  return {config.causal,      config.scale,        config.key_padding_mask, config.dropout_p,
          config.dropout_seed, config.dropout_offset, config.use_tf32};
}

void check(const DilatedConfig& config, const TensorView& q, const TensorView& k, const TensorView& v,
           const TensorView& out, const TensorView& lse, const LaunchOptions& options) {
  detail::check_config(config);
  detail::check_inputs(settings_of(config), q, k, v, out, lse, options);
}

}  // namespace

detail::DilatedParams detail::dilated_params(const DilatedConfig& config, const TensorView& q, const TensorView& k,
                                             const TensorView& v, const TensorView& out, const TensorView& lse,
                                             const LaunchOptions& options) {
  DilatedParams p = detail::base_params(settings_of(config), q, k, v, out, lse, options);
  p.mode = config.mode;
  p.causal = config.causal;
  p.use_tf32 = config.use_tf32;
  p.scale = float(config.scale.value_or(1.0 / std::sqrt(double(p.head_dim))));

  const int groups = int(config.segment_lengths.size());
  p.num_branches = groups;
  p.output_scale = config.mode == Mode::grouped ? 1.0f / float(groups) : 1.0f;
  int first_head = 0;
  for (int i = 0; i < groups; ++i) {
    detail::Branch& b = p.branches[i];
    b.segment_length = config.segment_lengths[i];
    b.dilation_rate = config.dilation_rates[i];
    if (config.mode == Mode::grouped) {
      b.offset_from_head = false;
      b.group_offset = i % b.dilation_rate;
      b.first_head = first_head;
      b.head_count = int(p.heads / groups + (i < p.heads % groups ? 1 : 0));
      first_head += b.head_count;
    } else {
      b.offset_from_head = true;
      b.first_head = 0;
      b.head_count = int(p.heads);
    }
  }

  return p;
}

void forward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
             const TensorView& v, const TensorView& out, const TensorView& lse,
             const LaunchOptions& options) {
  check(config, q, k, v, out, lse, options);
  if (detail::use_reference(options, q.dtype)) {
    reference::forward(config, q, k, v, out, lse, detail::position_index_of(options));
    return;
  }
  const DilatedParams params = detail::dilated_params(config, q, k, v, out, lse, options);
#ifdef DATTN_WITH_CUDA
  if (q.device.type == DeviceType::cuda) return cuda::forward(params);
#endif
  cpu::forward(params);
}

void backward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
              const TensorView& v, const TensorView& out, const TensorView& lse,
              const TensorView& dout, const TensorView& dq, const TensorView& dk,
              const TensorView& dv, const LaunchOptions& options) {
  check(config, q, k, v, out, lse, options);
  if (options.ring_step)
    throw Error("options.ring_step is set for backward; the ring step backward is not implemented yet");
  detail::check_gradients(q, k, dout, dq, dk, dv);
  if (detail::use_reference(options, q.dtype)) {
    reference::backward(config, q, k, v, dout, dq, dk, dv, detail::position_index_of(options));
    return;
  }
  DilatedParams p = detail::dilated_params(config, q, k, v, out, lse, options);
  detail::set_gradients(p, dout, dq, dk, dv);
#ifdef DATTN_WITH_CUDA
  if (q.device.type == DeviceType::cuda) {
    detail::set_backward_workspace(p, q, out, dout, options);
    return cuda::backward(p);
  }
#endif
  cpu::backward(p);
}

std::size_t backward_workspace_bytes(const TensorView& q) {
  if (q.device.type != DeviceType::cuda || q.rank != 4) return 0;
  return std::size_t(q.shape[0] * q.shape[1] * q.shape[2]) * sizeof(float);
}

CudaKernels cuda_kernel_generation(const TensorView& q, bool backward, const LaunchOptions& options) {
  if (q.device.type != DeviceType::cuda || q.rank != 4)
    throw Error("q is not a [B, N, H, D] CUDA tensor; expected one (the kernel generation is a CUDA choice)");
#ifdef DATTN_WITH_CUDA
  DilatedParams p;
  p.q.data = q.data;
  p.dtype = q.dtype;
  p.head_dim = q.shape[3];
  p.cuda_kernels = options.cuda_kernels;
  return cuda::kernel_generation(p, backward);
#else
  (void)backward;
  (void)options;
  throw Error("this build of dattn has no CUDA backend; expected one built with DATTN_CUDA=ON");
#endif
}

bool cuda_forward_uses_tma(const DilatedConfig& config, const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& out, const TensorView& lse, const LaunchOptions& options) {
  detail::require_cuda_query(q);
  check(config, q, k, v, out, lse, options);
#ifdef DATTN_WITH_CUDA
  if (detail::use_reference(options, q.dtype)) return false;
  return cuda::forward_uses_tma(detail::dilated_params(config, q, k, v, out, lse, options));
#else
  throw Error("this build of dattn has no CUDA backend; expected one built with DATTN_CUDA=ON");
#endif
}

bool cuda_backward_uses_tma(const DilatedConfig& config, const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& out, const TensorView& lse, const TensorView& dout, const TensorView& dq,
                            const TensorView& dk, const TensorView& dv, const LaunchOptions& options) {
  detail::require_cuda_query(q);
  check(config, q, k, v, out, lse, options);
  detail::check_gradients(q, k, dout, dq, dk, dv);
#ifdef DATTN_WITH_CUDA
  if (detail::use_reference(options, q.dtype)) return false;
  DilatedParams p = detail::dilated_params(config, q, k, v, out, lse, options);
  detail::set_gradients(p, dout, dq, dk, dv);
  return cuda::backward_uses_tma(p);
#else
  throw Error("this build of dattn has no CUDA backend; expected one built with DATTN_CUDA=ON");
#endif
}

std::vector<CudaKernels> cuda_kernel_generations_built() {
#if defined(DATTN_WITH_SM90)
  return {CudaKernels::sm80, CudaKernels::sm90};
#elif defined(DATTN_WITH_CUDA)
  return {CudaKernels::sm80};
#else
  return {};
#endif
}

void merge_partial(const TensorView& out, const TensorView& lse, const TensorView& step_out,
                   const TensorView& step_lse) {
  detail::check_merge(out, lse, step_out, step_lse);
  const std::int64_t B = out.shape[0], N = out.shape[1], H = out.shape[2], D = out.shape[3];
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t n = 0; n < N; ++n) {
        float& total = lse.ptr<float>()[b * lse.strides[0] + h * lse.strides[1] + n * lse.strides[2]];
        const float part = step_lse.ptr<float>()[b * step_lse.strides[0] + h * step_lse.strides[1] + n * step_lse.strides[2]];
        if (part == -INFINITY) continue;  // the step saw no key of this row
        const float merged = total == -INFINITY ? part : std::max(total, part) + std::log1p(std::exp(-std::fabs(total - part)));
        const float keep = total == -INFINITY ? 0.0f : std::exp(total - merged), add = std::exp(part - merged);
        for (std::int64_t d = 0; d < D; ++d) {
          const std::int64_t at = b * out.strides[0] + n * out.strides[1] + h * out.strides[2] + d;
          const std::int64_t at_step = b * step_out.strides[0] + n * step_out.strides[1] + h * step_out.strides[2] + d;
          detail::store_float(out, at, keep * detail::load_float(out, at) + add * detail::load_float(step_out, at_step));
        }
        total = merged;
      }
}

void ring_query_gradients(const DilatedConfig& config, const RingStep& step, const TensorView& q, const TensorView& k,
                          const TensorView& v, const TensorView& dout, const TensorView& lse,
                          const RingQueryGradients& sums) {
  const LaunchOptions options{.ring_step = step};
  check(config, q, k, v, dout, lse, options);
  detail::check_accumulator("sum_gk", sums.sum_gk, q, q.shape[1]);
  detail::check_accumulator("sum_pk", sums.sum_pk, q, q.shape[1]);
  detail::check_delta(sums.delta, q);
  if (q.device.type != DeviceType::cpu) throw Error("ring backward steps run on cpu tensors so far; q is on " + device_name(q.device));
  DilatedParams p = detail::dilated_params(config, q, k, v, dout, lse, options);
  detail::set_ring_query_pass(p, dout, sums);
  cpu::backward(p);
}

void ring_finish_query_gradients(const DilatedConfig& config, const RingQueryGradients& sums, const TensorView& dq) {
  detail::finish_query_gradients(config.scale, sums, dq);
}

void ring_key_gradients(const DilatedConfig& config, const RingStep& step, const TensorView& q, const TensorView& k,
                        const TensorView& v, const TensorView& dout, const TensorView& lse, const TensorView& delta,
                        const TensorView& dk, const TensorView& dv) {
  const LaunchOptions options{.ring_step = step};
  check(config, q, k, v, dout, lse, options);
  detail::check_delta(delta, q);
  detail::check_accumulator("dk", dk, k, k.shape[1]);
  detail::check_accumulator("dv", dv, k, k.shape[1]);
  if (q.device.type != DeviceType::cpu) throw Error("ring backward steps run on cpu tensors so far; q is on " + device_name(q.device));
  DilatedParams p = detail::dilated_params(config, q, k, v, dout, lse, options);
  detail::set_ring_key_pass(p, dout, delta, dk, dv);
  cpu::backward(p);
}

void ring_forward_step(const DilatedConfig& config, const RingStep& step, const TensorView& q, const TensorView& k,
                       const TensorView& v, const TensorView& out, const TensorView& lse, void* stream) {
  const LaunchOptions options{.stream = stream, .ring_step = step};
  detail::check_accumulator("out", out, q, q.shape[1]);
  TensorView like_q_out = out;  // check() compares out with q: give it q's dtype
  like_q_out.dtype = q.dtype;
  check(config, q, k, v, like_q_out, lse, options);
#ifdef DATTN_WITH_CUDA
  if (q.device.type == DeviceType::cuda) {
    DilatedParams p = detail::dilated_params(config, q, k, v, out, lse, options);
    p.float32_outputs = true;
    return cuda::forward(p);
  }
#endif
  Tensor part = Tensor::empty({q.shape[0], q.shape[1], q.shape[2], q.shape[3]}, q.dtype);
  Tensor part_lse = Tensor::empty({q.shape[0], q.shape[2], q.shape[1]}, DType::float32);
  forward(config, q, k, v, part, part_lse, options);
  merge_partial(out, lse, part, part_lse);
}

void ring_step_gradients(const DilatedConfig& config, const RingStep& step, const TensorView& q, const TensorView& k,
                         const TensorView& v, const TensorView& dout, const TensorView& lse, const TensorView& delta,
                         const TensorView& dq, const TensorView& dk, const TensorView& dv, void* stream) {
  const LaunchOptions options{.stream = stream, .ring_step = step};
  check(config, q, k, v, dout, lse, options);
  detail::check_delta(delta, q);
  detail::check_accumulator("dq", dq, q, q.shape[1]);
  detail::check_accumulator("dk", dk, k, k.shape[1]);
  detail::check_accumulator("dv", dv, k, k.shape[1]);
#ifdef DATTN_WITH_CUDA
  if (q.device.type == DeviceType::cuda) {
    DilatedParams p = detail::dilated_params(config, q, k, v, dout, lse, options);
    detail::set_step_gradients(p, dout, delta, dq, dk, dv);
    return cuda::backward(p);
  }
#endif
  // The CPU's two passes, per step: the query pass's sums give dq's share with the final delta
  // (dq = scale·(Σ G·k − delta·Σ P·k) is linear in the steps); the key pass adds dk, dv.
  const std::int64_t B = q.shape[0], N = q.shape[1], H = q.shape[2], D = q.shape[3];
  Tensor sum_gk = Tensor::zeros({B, N, H, D}, DType::float32), sum_pk = Tensor::zeros({B, N, H, D}, DType::float32);
  Tensor step_delta = Tensor::zeros({B, H, N}, DType::float32);
  ring_query_gradients(config, step, q, k, v, dout, lse, {sum_gk, sum_pk, step_delta});
  detail::add_query_gradients(config.scale, {sum_gk, sum_pk, delta}, dq);
  ring_key_gradients(config, step, q, k, v, dout, lse, delta, dk, dv);
}

double forward_flops(const DilatedConfig& config, std::int64_t batch, std::int64_t seqlen,
                     std::int64_t heads, std::int64_t head_dim) {
  detail::check_config(config);
  for (const auto& [name, extent] : {std::pair{"batch", batch}, std::pair{"seqlen", seqlen}, std::pair{"heads", heads},
                                     std::pair{"head_dim", head_dim}})
    if (extent < 1) throw Error(std::string(name) + " = " + std::to_string(extent) + "; expected >= 1");
  const int groups = int(config.segment_lengths.size());
  double flops = 0;
  for (int i = 0; i < groups; ++i) {
    const std::int64_t w = config.segment_lengths[i], r = config.dilation_rates[i];
    const std::int64_t branch_heads =
        config.mode == Mode::grouped ? heads / groups + (i < heads % groups ? 1 : 0) : heads;
    for (int h = 0; h < (config.mode == Mode::grouped ? 1 : int(branch_heads)); ++h) {
      const std::int64_t offset = config.mode == Mode::grouped ? i % r : h % r;
      const double head_factor = config.mode == Mode::grouped ? double(branch_heads) : 1.0;
      for (std::int64_t start = 0; start < seqlen; start += w) {
        const std::int64_t length = std::min(w, seqlen - start);
        const std::int64_t selected = offset < length ? (length - offset + r - 1) / r : 0;
        const double pairs = config.causal ? double(selected) * (selected + 1) / 2 : double(selected) * selected;
        flops += 4.0 * double(batch) * head_factor * pairs * double(head_dim);
      }
    }
  }
  return flops;
}

}  // namespace dattn
