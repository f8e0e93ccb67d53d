// Validation and the parts of DilatedParams every attention variant fills the same way.
#pragma once

#include <cstdint>
#include <optional>

#include "dattn/attention.hpp"
#include "dattn/config.hpp"
#include "dattn/tensor.hpp"
#include "params.hpp"

namespace dattn::detail {

// The settings every variant shares (causality, scale, key padding, dropout).
struct CommonSettings {
  bool causal = false;
  std::optional<double> scale;
  std::optional<TensorView> key_padding_mask;
  double dropout_p = 0.0;
  std::uint64_t dropout_seed = 0, dropout_offset = 0;
  bool use_tf32 = false;
};

void check_config(const DilatedConfig& config);
// t is a [B, N, H, D] tensor like `like` (shape, dtype, device) with stride 1 along D.
void check_attention_tensor(const char* name, const TensorView& t, const TensorView& like);
void check_lse(const TensorView& lse, const TensorView& q);
// q's head dim D against what its device's kernels compute (the GPU's instance list, the CPU's
// bound); 16-byte alignment of a tensor on the GPU (its kernels load 16 bytes at a time).
void check_head_dim(const TensorView& q);
void check_cuda_alignment(const char* name, const TensorView& t);
// The cuda_*_uses_tma queries: q must be a CUDA tensor (the TMA loads are a CUDA path).
void require_cuda_query(const TensorView& q);
Operand operand(const TensorView& t);
// The key/value heads Hkv of k (H % Hkv == 0, else an error naming both).
std::int64_t check_kv_heads(const TensorView& q, const TensorView& k);
// q, k, v, out and lse, the settings and the options; throws dattn::Error naming what is wrong.
void check_inputs(const CommonSettings& settings, const TensorView& q, const TensorView& k, const TensorView& v,
                  const TensorView& out, const TensorView& lse, const LaunchOptions& options);
// dout, dq like q; dk, dv like k (Hkv heads).
void check_gradients(const TensorView& q, const TensorView& k, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                     const TensorView& dv);

DilatedParams base_params(const CommonSettings& settings, const TensorView& q, const TensorView& k,
                          const TensorView& v, const TensorView& out, const TensorView& lse,
                          const LaunchOptions& options);
void set_gradients(DilatedParams& p, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                   const TensorView& dv);

const std::int64_t* position_index_of(const LaunchOptions& options);

// merge_partial's arguments: out and step_out alike [B, N, H, D] float tensors on the CPU, lse and
// step_lse [B, H, N] float32.
void check_merge(const TensorView& out, const TensorView& lse, const TensorView& step_out, const TensorView& step_lse);
float load_float(const TensorView& t, std::int64_t offset);
void store_float(const TensorView& t, std::int64_t offset, float x);
bool use_reference(const LaunchOptions& options, DType dtype);
// ring_step_gradients on CUDA: gradients added into float32 dq, dk, dv with the given delta (out is
// not read).
void set_step_gradients(DilatedParams& p, const TensorView& dout, const TensorView& delta, const TensorView& dq,
                        const TensorView& dk, const TensorView& dv);
// A CUDA backward with a large enough workspace: the delta pass into it (else each kernel block
// computes delta itself).
void set_backward_workspace(DilatedParams& p, const TensorView& q, const TensorView& out, const TensorView& dout,
                            const LaunchOptions& options);

// Ring backward steps: float32 accumulators [B, rows, H, D], the contiguous [B, H, N] delta, and
// dq = scale·(sum_gk − delta·sum_pk) at the end of the query sweep.
void check_accumulator(const char* name, const TensorView& t, const TensorView& q, std::int64_t rows);
void check_delta(const TensorView& delta, const TensorView& q);
void finish_query_gradients(std::optional<double> scale, const RingQueryGradients& sums, const TensorView& dq);
// The one-pass step's share of dq (float32 accumulator): dq += scale·(sum_gk − delta·sum_pk) with
// the final delta (sums.delta), the step's sums contiguous.
void add_query_gradients(std::optional<double> scale, const RingQueryGradients& sums, const TensorView& dq);
// The params of a ring backward step: the query sweep (sums accumulated) or the key sweep (dk, dv).
void set_ring_query_pass(DilatedParams& p, const TensorView& dout, const RingQueryGradients& sums);
void set_ring_key_pass(DilatedParams& p, const TensorView& dout, const TensorView& delta, const TensorView& dk,
                       const TensorView& dv);

}  // namespace dattn::detail
