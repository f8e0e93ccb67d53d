// Dilated attention: forward and backward, dispatched on device and dtype.
//
// q, k, v, out, dout, dq, dk, dv: [B, N, H, D], any strides with stride(D) == 1.
// lse: [B, H, N] float32. See SPEC.md for exactly what is computed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "dattn/config.hpp"
#include "dattn/tensor.hpp"

namespace dattn {

enum class Backend : std::uint8_t {
  automatic,  // the fused kernels; float64 inputs run the reference
  reference,  // the plain float64-capable loops of src/reference (the tests' ground truth)
  fused,      // the fused kernels only; float64 is an error
};

// One step of ring attention: the local rows are part of a longer sequence, and only keys in
// [key_begin, key_end) are seen. Partial results (unnormalised out plus lse) are merged by the caller.
struct RingStep {
  std::int64_t query_position = 0;  // global position of local row 0
  std::int64_t global_length = 0;
  std::int64_t key_begin = 0;
  std::int64_t key_end = 0;
};

struct LaunchOptions {
  Backend backend = Backend::automatic;
  void* stream = nullptr;  // cudaStream_t for CUDA tensors; must stay null for CPU tensors
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
  std::optional<RingStep> ring_step;          // not implemented yet: an error if set
  // Attend in this order: [N] int64, curve position -> original row (dattn/hilbert.hpp makes
  // Hilbert orders). Results stay in the original order; causal compares original positions.
  std::optional<TensorView> position_index;
};

void forward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
             const TensorView& v, const TensorView& out, const TensorView& lse,
             const LaunchOptions& options = {});

// `out` and `lse` are those forward wrote for the same inputs.
void backward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
              const TensorView& v, const TensorView& out, const TensorView& lse,
              const TensorView& dout, const TensorView& dq, const TensorView& dk,
              const TensorView& dv, const LaunchOptions& options = {});

// Forward FLOPs as PERF.md counts them (4·B·H_i·pairs·D summed over branches and segments).
double forward_flops(const DilatedConfig& config, std::int64_t batch, std::int64_t seqlen,
                     std::int64_t heads, std::int64_t head_dim);

}  // namespace dattn
