// Dilated attention: forward and backward, dispatched on device and dtype.
//
// q, out, dout, dq: [B, N, H, D]; k, v, dk, dv: [B, N, Hkv, D] with H % Hkv == 0 (grouped-query
// heads: query head h reads key/value head h / (H / Hkv); Hkv = H without); any strides with
// stride(D) == 1. Grouped-query heads run on CPU tensors so far.
// lse: [B, H, N] float32. See docs/semantics.md for exactly what is computed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "dattn/config.hpp"
#include "dattn/tensor.hpp"

namespace dattn {

enum class Backend : std::uint8_t {
  automatic,  // the fused kernels; float64 inputs run the reference
  reference,  // the plain float64-capable loops of src/reference (the tests' ground truth)
  fused,      // the fused kernels only; float64 is an error
};

// One step of ring attention: q, out and lse hold the local rows [query_position,
// query_position + N) of a sequence of global_length rows (segments are cut by global
// positions); k and v (and key_padding_mask) hold the rows [key_begin, key_end). forward writes
// the attention of the local queries over just those keys: out normalised over them and their
// lse (0 and -inf where a query sees none of them). merge_partial combines steps into the result;
// ring_query_gradients and ring_key_gradients below are the backward.
struct RingStep {
  std::int64_t query_position = 0;  // global position of local row 0
  std::int64_t global_length = 0;
  std::int64_t key_begin = 0;
  std::int64_t key_end = 0;
};

struct LaunchOptions {
  Backend backend = Backend::automatic;
  void* stream = nullptr;  // cudaStream_t for CUDA tensors; must stay null for CPU tensors
  // CUDA backward: device memory of at least backward_workspace_bytes(q) bytes lets the backward
  // compute each row's delta = rowsum(dout∘out) once, in a pass before the kernel, instead of in
  // every block that reads the row (faster: 13.7 against 15.2 ms forward+backward at long256k on an
  // H100). Without it the blocks compute it. Unused elsewhere.
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
  std::optional<RingStep> ring_step;  // forward only (the ring backward has its own calls); CPU only for now
  // Attend in this order: [N] int64, curve position -> original row (dattn/hilbert.hpp makes
  // Hilbert orders). Results stay in the original order; causal compares original positions.
  std::optional<TensorView> position_index;
  // A device position_index is checked to be a permutation on every call, which copies it to the
  // host and synchronises the stream; true skips that for a map the caller knows to be one (made
  // by dattn/hilbert.hpp's functions, say). A host map is always checked (no synchronisation).
  bool position_index_checked = false;
  CudaKernels cuda_kernels = CudaKernels::automatic;  // CUDA tensors: which kernel generation runs
  // The sm90 forward's query rows per block: 0 chooses per call (at head dim 64, 192 rows where the
  // GPU stays as full as with 128, else 128; 128 at head dim 128); 128 or 192 (head dim 64 only)
  // force one, for tests and benchmarks. Only for calls the sm90 forward runs.
  int sm90_forward_rows = 0;
  // The query tiles a block of the sm90 forward works through one after another: 0 chooses per call
  // (two where the forward's TMA instances run the dilated walk without causality, rows in order or
  // under an index map, every launch has at least four blocks per SM and the GPU's rounds of blocks
  // come out fewer in all, so that a block's next tile loads while it finishes the last; else one);
  // 1, 2 or 3 force one, for tests and benchmarks (more than 1 only where the automatic choice could
  // pick two, 3 at head dim 64 only).
  int sm90_forward_passes = 0;
  // The own (key) tiles a dk/dv block of the sm90 backward with dQ by atomics works through one
  // after another: 0 chooses per call (two where the backward loads by TMA on the dilated walk
  // without causality at head dim 64 and every launch has at least four blocks per SM; else one);
  // 1 or 2 force one, for tests and benchmarks (2 only where the automatic choice could pick it).
  int sm90_backward_passes = 0;
  // How the sm90 backward forms dQ (BackwardDq): atomic or dq_blocks force one, for tests,
  // benchmarks and bitwise-reproducible gradients (dq_blocks, accepted by every backward).
  BackwardDq sm90_backward_dq = BackwardDq::automatic;
};

// The CUDA kernel generation (sm80 or sm90) that forward (backward: `backward` true) runs for
// CUDA tensors of q's dtype, head dim and device under options.cuda_kernels; an error where that
// request cannot run (or q is not a CUDA tensor, or the build has no CUDA backend).
CudaKernels cuda_kernel_generation(const TensorView& q, bool backward, const LaunchOptions& options = {});

// The CUDA kernel generations this build has: none without the CUDA backend, sm80, and sm90 where
// it was built with DATTN_SM90.
std::vector<CudaKernels> cuda_kernel_generations_built();

// Whether forward with these arguments (CUDA tensors) runs the sm90 forward whose producer loads by
// TMA: in builds with DATTN_SM90_TMA (the default with the sm90 kernels), for the calls it covers
// (README.md; under an index map these instances' producer gathers the rows by cp.async); false
// elsewhere. Validates the arguments as forward does; for tests and benchmarks that name the path
// a call took.
bool cuda_forward_uses_tma(const DilatedConfig& config, const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& out, const TensorView& lse, const LaunchOptions& options = {});

// Whether backward with these arguments (CUDA tensors) runs the sm90 backward whose producer loads
// Q, K, V and dO by TMA: in builds with DATTN_SM90_TMA, for the calls the forward's TMA loads cover
// with dout laid out as they need, but for an index map's (cp.async); false elsewhere. Validates
// the arguments as backward does.
bool cuda_backward_uses_tma(const DilatedConfig& config, const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& out, const TensorView& lse, const TensorView& dout, const TensorView& dq,
                            const TensorView& dk, const TensorView& dv, const LaunchOptions& options = {});

void forward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
             const TensorView& v, const TensorView& out, const TensorView& lse,
             const LaunchOptions& options = {});

// The workspace the backward can use (LaunchOptions::workspace): B·H·N float32 for CUDA tensors, 0
// for CPU ones.
std::size_t backward_workspace_bytes(const TensorView& q);

// `out` and `lse` are those forward wrote for the same inputs.
void backward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
              const TensorView& v, const TensorView& out, const TensorView& lse,
              const TensorView& dout, const TensorView& dq, const TensorView& dk,
              const TensorView& dv, const LaunchOptions& options = {});

// out, lse += one ring step's partial result, by the log-sum-exp merge:
// lse' = log(e^lse + e^step_lse), out' = e^(lse − lse')·out + e^(step_lse − lse')·step_out.
// Start from out = 0 and lse = -inf. Accumulate in float32 (any float dtype is accepted).
void merge_partial(const TensorView& out, const TensorView& lse, const TensorView& step_out,
                   const TensorView& step_lse);

// Ring backward. With the merged lse of a rank's local queries (from its forward steps), two
// sweeps over the key ranges, adding into float32 accumulators that start at 0:
// 1. ring_query_gradients, once per key range: sum_gk += Σ_j G_j·k_j and sum_pk += Σ_j P_j·k_j
//    ([B, N, H, D]), delta += Σ_j G_j ([B, H, N], contiguous), with G = P∘Z∘dP; then
//    ring_finish_query_gradients writes dq = scale·(sum_gk − delta·sum_pk).
// 2. ring_key_gradients, once per key range: dk, dv ([B, Nk, Hkv, D]) += that range's gradients,
//    with the final delta. Only the attention of the step's (query, key) pairs contributes.
struct RingQueryGradients {
  TensorView sum_gk, sum_pk, delta;
};
void ring_query_gradients(const DilatedConfig& config, const RingStep& step, const TensorView& q,
                          const TensorView& k, const TensorView& v, const TensorView& dout,
                          const TensorView& lse, const RingQueryGradients& sums);
void ring_finish_query_gradients(const DilatedConfig& config, const RingQueryGradients& sums, const TensorView& dq);
void ring_key_gradients(const DilatedConfig& config, const RingStep& step, const TensorView& q,
                        const TensorView& k, const TensorView& v, const TensorView& dout,
                        const TensorView& lse, const TensorView& delta, const TensorView& dk,
                        const TensorView& dv);

// The ring's one-pass steps (CPU and CUDA; the GPU ring uses these, FlashAttention's ring form).
// ring_forward_step: out (float32 [B, N, H, D]) and lse += the step's attention of q over k, v by
// the log-sum-exp merge: forward and merge_partial in one (on CUDA in the kernel's epilogue, with
// no per-step output). Start from out = 0, lse = -inf.
// ring_step_gradients: with the merged lse and delta = rowsum(dout∘out) over D ([B, H, N] float32,
// contiguous; out the final output), dq (float32 [B, N, H, D]) += the step's scale·dS·k and dk, dv
// (float32 [B, Nk, Hkv, D]) += scale·dSᵀ·q and (P∘Z)ᵀ·dout, where dS = P∘(Z∘dP − delta). Summed over
// every key range, dq, dk, dv are the gradients of the whole call. stream: a cudaStream_t for CUDA
// tensors (null: the default stream), null for CPU tensors.
void ring_forward_step(const DilatedConfig& config, const RingStep& step, const TensorView& q, const TensorView& k,
                       const TensorView& v, const TensorView& out, const TensorView& lse, void* stream = nullptr);
void ring_step_gradients(const DilatedConfig& config, const RingStep& step, const TensorView& q, const TensorView& k,
                         const TensorView& v, const TensorView& dout, const TensorView& lse, const TensorView& delta,
                         const TensorView& dq, const TensorView& dk, const TensorView& dv, void* stream = nullptr);

// Forward FLOPs as docs/benchmarks.md counts them (4·B·H_i·pairs·D summed over branches and segments).
double forward_flops(const DilatedConfig& config, std::int64_t batch, std::int64_t seqlen,
                     std::int64_t heads, std::int64_t head_dim);

}  // namespace dattn
