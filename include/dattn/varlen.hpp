// Packed variable-length batches: the batch as concatenated sequences, each attended alone, as a
// batch of one of its own length (segments, offsets, causality and block positions restart at
// its first token; dropout uses the sequence index as the batch index and positions inside the
// sequence). CPU and CUDA tensors (block-sparse packed batches: CPU only so far; CUDA refuses them).
//
// q, out: [T, H, D]; k, v: [T, Hkv, D] (H % Hkv == 0); lse: [H, T] float32; dq, dk, dv like q, k, v.
// Any strides with stride 1 along D.
#pragma once

#include <cstdint>
#include <vector>

#include "dattn/attention.hpp"
#include "dattn/block_sparse.hpp"
#include "dattn/config.hpp"
#include "dattn/tensor.hpp"

namespace dattn {

struct PackedSequences {
  // int32 [B + 1] on q's device: 0 first, non-decreasing, last = T; sequence b is rows
  // [cu_seqlens[b], cu_seqlens[b + 1]). A zero-length sequence is allowed and produces nothing.
  TensorView cu_seqlens;
  std::int64_t max_seqlen = 0;  // >= the longest sequence
  // false skips the check of cu_seqlens' values (order, last = T, max_seqlen): undefined
  // behaviour on bad values.
  bool validate = true;
};

// Dilated attention (both modes) of each sequence. config.key_padding_mask must be empty and
// options may not set ring_step or position_index. CUDA backward: options.workspace of at least
// backward_workspace_bytes of q's [1, T, H, D] (T·H float32) serves delta as in dattn::backward.
void forward_varlen(const DilatedConfig& config, const PackedSequences& sequences, const TensorView& q,
                    const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                    const LaunchOptions& options = {});
void backward_varlen(const DilatedConfig& config, const PackedSequences& sequences, const TensorView& q,
                     const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                     const TensorView& dout, const TensorView& dq, const TensorView& dk, const TensorView& dv,
                     const LaunchOptions& options = {});

// Whether forward_varlen (backward_varlen) with these arguments (CUDA tensors) runs the sm90 kernels
// whose producer loads by TMA (as dattn::cuda_forward_uses_tma): builds with DATTN_SM90_TMA, 16-bit
// data of head dim 64 or 128, T a multiple of every dilation rate, tensors laid out as a map needs
// them; false elsewhere (the cp.async producer). Validates the arguments as forward_varlen
// (backward_varlen) does; for tests and benchmarks that name the path a call took.
bool cuda_varlen_forward_uses_tma(const DilatedConfig& config, const PackedSequences& sequences, const TensorView& q,
                                  const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                                  const LaunchOptions& options = {});
bool cuda_varlen_backward_uses_tma(const DilatedConfig& config, const PackedSequences& sequences, const TensorView& q,
                                   const TensorView& k, const TensorView& v, const TensorView& out,
                                   const TensorView& lse, const TensorView& dout, const TensorView& dq,
                                   const TensorView& dk, const TensorView& dv, const LaunchOptions& options = {});

// A named block pattern of docs/semantics.md ("Block-sparse attention"), made for each sequence's length.
struct SparsePattern {
  enum class Kind : std::uint8_t { local_window, dilated_sparse, global_local, dilated };
  Kind kind = Kind::local_window;
  std::int64_t window = 256;                   // local_window, global_local
  std::int64_t global_blocks = 1;              // global_local
  std::vector<std::int64_t> rates{1, 2, 4};    // dilated_sparse
  std::vector<std::int64_t> segment_lengths;   // dilated (multiples of block_size)
  std::vector<std::int64_t> dilation_rates;    // dilated
};
// The pattern's mask for a sequence of seqlen >= 1 tokens in blocks of block_size (shared by all heads).
BlockSparseMask pattern_mask(const SparsePattern& pattern, std::int64_t seqlen, std::int64_t block_size);

// Block-sparse attention of each sequence with the pattern's mask for its length.
// config.key_padding_mask must be empty.
void block_sparse_forward_varlen(const BlockSparseConfig& config, const SparsePattern& pattern,
                                 const PackedSequences& sequences, const TensorView& q, const TensorView& k,
                                 const TensorView& v, const TensorView& out, const TensorView& lse,
                                 const LaunchOptions& options = {});
void block_sparse_backward_varlen(const BlockSparseConfig& config, const SparsePattern& pattern,
                                  const PackedSequences& sequences, const TensorView& q, const TensorView& k,
                                  const TensorView& v, const TensorView& out, const TensorView& lse,
                                  const TensorView& dout, const TensorView& dq, const TensorView& dk,
                                  const TensorView& dv, const LaunchOptions& options = {});

}  // namespace dattn
