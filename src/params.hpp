// The one struct the API layer fills and every kernel (CPU, CUDA) reads. Plain data only:
// raw pointers, element strides, sizes and the per-branch table, so kernels never see TensorView.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dattn/config.hpp"
#include "dattn/tensor.hpp"

namespace dattn::detail {

inline constexpr int kMaxBranches = 16;

// A [B, N, H, D] operand: element (b, n, h, d) lives at data + b*batch_stride + n*row_stride +
// h*head_stride + d.
struct Operand {
  void* data = nullptr;
  std::int64_t batch_stride = 0;
  std::int64_t row_stride = 0;
  std::int64_t head_stride = 0;
  // Query heads per head of this operand: query head h reads head h / head_group. 1 for q, out,
  // dout, dq; H / Hkv for k, v, dk, dv under grouped-query heads.
  std::int64_t head_group = 1;
};

struct Branch {
  std::int64_t segment_length = 0;
  std::int64_t dilation_rate = 1;
  // grouped: every head of the branch uses offset (branch index mod r); longnet: head mod r.
  bool offset_from_head = false;
  std::int64_t group_offset = 0;
  int first_head = 0;  // heads [first_head, first_head + head_count) take part in this branch
  int head_count = 0;
};

struct DilatedParams {
  Operand q, k, v, out;
  Operand dout, dq, dk, dv;  // backward only
  float* lse = nullptr;      // [B, H, N]
  std::int64_t lse_batch_stride = 0, lse_head_stride = 0, lse_row_stride = 0;

  std::int64_t batch = 0, seqlen = 0, heads = 0, head_dim = 0;
  // Grouped-query heads: k, v (and dk, dv) have kv_heads heads, H % kv_heads == 0; query head h
  // reads key/value head h / (heads / kv_heads). Equal to heads without GQA.
  std::int64_t kv_heads = 0;
  std::int64_t kv_head(std::int64_t query_head) const { return query_head / (heads / kv_heads); }
  DType dtype = DType::float32;
  Mode mode = Mode::grouped;
  bool causal = false;
  float scale = 1.0f;
  float output_scale = 1.0f;  // 1/G in grouped mode, 1 in longnet mode
  bool use_tf32 = false;      // float32 on the GPU: the named fast path (docs/semantics.md's tf32 bar)

  int num_branches = 0;
  Branch branches[kMaxBranches];

  const std::uint8_t* key_padding_mask = nullptr;  // [B, N], nonzero = padding
  std::int64_t mask_batch_stride = 0, mask_row_stride = 0;

  float dropout_p = 0.0f;
  std::uint32_t dropout_threshold = 0;  // keep iff Philox word >= threshold
  float dropout_rescale = 1.0f;         // 1 / (1 - p)
  std::uint64_t dropout_seed = 0, dropout_offset = 0;

  // Backward scratch [B, H, N] (contiguous): each row's softmax correction Σ_j P_j·Z_j·dP_j,
  // written by the dq pass and read by the dk/dv pass. Owned by the backend, or by the caller of
  // a ring backward step.
  float* softmax_delta = nullptr;

  // Ring backward steps: run only the query pass or only the key pass, and add into float32
  // accumulators instead of writing: dq += Σ_j G_j·k_j, dq_correction += Σ_j P_j·k_j,
  // softmax_delta += Σ_j G_j (query pass); dk, dv += (key pass, softmax_delta read).
  bool run_query_pass = true, run_key_pass = true;
  bool accumulate = false;
  Operand dq_correction;
  // GPU ring steps (ring_forward_step, ring_step_gradients): out, or dq, dk, dv, are float32
  // accumulators the step merges (by lse) or adds into, whatever the input dtype; the backward
  // reads softmax_delta instead of computing rowsum(dout∘out).
  bool float32_outputs = false;

  // GPU launch state (CUDA backend).
  CudaKernels cuda_kernels = CudaKernels::automatic;
  int sm90_forward_rows = 0;    // 0: chosen per call (dispatch.cu)
  int sm90_forward_passes = 0;  // 0: chosen per call (dispatch.cu)
  int sm90_backward_passes = 0;  // 0: chosen per call (dispatch.cu)
  BackwardDq sm90_backward_dq = BackwardDq::automatic;
  // The sm90 backward with dQ by atomics (dispatch.cu): dq_slots slots of float32 scratch,
  // dq_scratch_rows × D each, group g using slot g mod dq_slots (zero between groups), and
  // [2 · dq_slots + 1] counters: per slot the blocks arrived and the conversions done, then the
  // blocks' tickets (zero at each launch).
  float* dq_scratch = nullptr;
  std::int64_t dq_scratch_rows = 0;
  int* dq_counters = nullptr;
  int dq_slots = 0;
  void* stream = nullptr;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;

  // Ring steps (and, equal to the whole sequence, every other call): the local query rows are
  // positions [query_position, query_position + seqlen) of a sequence of global_length rows, and
  // k, v hold positions [key_begin, key_end). Segments are cut by global positions.
  std::int64_t query_position = 0;
  std::int64_t global_length = 0;
  std::int64_t key_begin = 0, key_end = 0;
  // Whether the queries and keys are the whole sequence (no ring step's ranges).
  bool whole_sequence() const {
    return query_position == 0 && global_length == seqlen && key_begin == 0 && key_end == seqlen;
  }
  // Packed variable-length batch: the operands are [T, H or Hkv, D] (batch_stride 0), sequence b
  // is rows [cu_seqlens[b], cu_seqlens[b + 1]) and `batch` counts sequences; each is attended
  // alone, as a batch of one of its own length. null: every sequence has seqlen rows.
  const std::int32_t* cu_seqlens = nullptr;  // [batch + 1], on the host for the CPU kernels
  std::int64_t max_seqlen = 0;               // >= the longest sequence
  std::int64_t packed_rows = 0;              // T, the packed tensors' rows (softmax_delta is [H, T])
  // The dropout counter's batch index b of batch row 0 (a varlen sequence run on its own passes
  // its index in the packed batch).
  std::int64_t dropout_batch_base = 0;
  // Decoding with a cache: batch b's keys are rows [0, key_lengths[b]) of k, v ([B, Nmax, Hkv, D]
  // caches) and its seqlen queries the last positions key_lengths[b] - seqlen .. key_lengths[b] - 1
  // of that sequence (causal). null: the key range is [key_begin, key_end) for every batch.
  const std::int32_t* key_lengths = nullptr;  // [batch], on the host for the CPU kernels, else on the device
  // Added to every key_lengths[b] (the CUDA kernels read cache_seqlens itself, and a call that
  // appends its Tn new tokens first attends Tn positions more).
  std::int64_t key_length_offset = 0;
  const std::int64_t* position_index = nullptr;  // Hilbert: curve position -> original position
  bool position_index_checked = false;           // a device map the caller vouches for (no check)
  // Block-sparse attention (block_size > 0, no branches): CSR of the allowed key blocks of each
  // query block and its transpose, per head or shared (block_mask_heads == 1).
  std::int64_t block_size = 0, query_blocks = 0, key_blocks = 0, block_mask_heads = 0;
  const std::int64_t* block_row_offsets = nullptr;     // [block_mask_heads][query_blocks + 1]
  const std::int64_t* block_columns = nullptr;
  const std::int64_t* block_column_offsets = nullptr;  // [block_mask_heads][key_blocks + 1]
  const std::int64_t* block_rows = nullptr;
};

}  // namespace dattn::detail
