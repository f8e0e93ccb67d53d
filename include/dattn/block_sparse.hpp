// Block-sparse attention (docs/semantics.md "Block-sparse attention"): tokens cut into blocks of
// block_size; a block mask says which (query block, key block) pairs are computed, and each row
// is one softmax over all its allowed keys. Work grows with the allowed pairs, never with N².
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "dattn/attention.hpp"
#include "dattn/tensor.hpp"

namespace dattn {

// A block mask in CSR form by query block, with its transpose by key block (which the backward's
// dk/dv pass walks), built once and reused by every call. Shared by all heads (heads() == 1) or
// one per head.
class BlockSparseMask {
 public:
  // mask: bool [query_blocks, key_blocks] or [heads, query_blocks, key_blocks], any strides.
  static BlockSparseMask from_dense(const TensorView& mask);
  // row_offsets: heads × (query_blocks + 1) offsets into column_indices, each head's offsets
  // starting at 0; column_indices sorted and unique within a row.
  static BlockSparseMask from_csr(std::int64_t heads, std::int64_t query_blocks, std::int64_t key_blocks,
                                  std::vector<std::int64_t> row_offsets, std::vector<std::int64_t> column_indices);

  std::int64_t heads() const { return heads_; }
  std::int64_t query_blocks() const { return query_blocks_; }
  std::int64_t key_blocks() const { return key_blocks_; }
  std::int64_t allowed_pairs() const { return std::int64_t(columns_.size()); }
  bool allowed(std::int64_t head, std::int64_t query_block, std::int64_t key_block) const;

  // CSR by query block (head h's row qb: columns_[row_offsets_[h·(nqb+1) + qb] ...]) and by key block.
  const std::vector<std::int64_t>& row_offsets() const { return row_offsets_; }
  const std::vector<std::int64_t>& columns() const { return columns_; }
  const std::vector<std::int64_t>& column_offsets() const { return column_offsets_; }
  const std::vector<std::int64_t>& rows() const { return rows_; }

  // A copy whose CSR and transpose also live in a CUDA device's memory (one upload, freed with the
  // last copy): calls with CUDA tensors take a mask on their device, so no call copies the mask.
  BlockSparseMask to_device(const Device& device) const;
  Device device() const { return device_; }
  // The arrays above in the memory of device() (the host vectors' data on the CPU).
  struct Arrays {
    const std::int64_t *row_offsets, *columns, *column_offsets, *rows;
  };
  Arrays arrays() const;

 private:
  void build_transpose();
  Device device_{};
  std::shared_ptr<const std::int64_t> device_data_;  // row_offsets, columns, column_offsets, rows, packed
  std::int64_t heads_ = 0, query_blocks_ = 0, key_blocks_ = 0;
  std::vector<std::int64_t> row_offsets_, columns_;  // global indices into columns_
  std::vector<std::int64_t> column_offsets_, rows_;  // the transpose
};

struct BlockSparseConfig {
  std::int64_t block_size = 64;
  bool causal = false;
  std::optional<double> scale;                 // default 1/sqrt(D)
  std::optional<TensorView> key_padding_mask;  // [B, N] boolean, true = padding
  double dropout_p = 0.0;
  std::uint64_t dropout_seed = 0;
  std::uint64_t dropout_offset = 0;
};

// q, out: [B, N, H, D]; k, v: [B, N, Hkv, D] (H % Hkv == 0, as for dilated attention); lse:
// [B, H, N]. The mask has ceil(N / block_size) query and key blocks and 1 or H (query) heads, and lies on q's device (CUDA tensors: BlockSparseMask::to_device). The forward also runs ring steps (options.ring_step, as for dilated
// attention: the mask then covers global_length, and the query and key ranges start and end on
// block boundaries); merge_partial combines them; the backward's ring steps are below.
void block_sparse_forward(const BlockSparseConfig& config, const BlockSparseMask& mask, const TensorView& q,
                          const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                          const LaunchOptions& options = {});
// Whether block_sparse_forward with these arguments (CUDA tensors) runs the sm90 forward whose
// producer loads by TMA (as dattn::cuda_forward_uses_tma: builds with DATTN_SM90_TMA, calls it
// covers; ring steps do not); validates the arguments as block_sparse_forward does.
bool cuda_block_sparse_forward_uses_tma(const BlockSparseConfig& config, const BlockSparseMask& mask,
                                        const TensorView& q, const TensorView& k, const TensorView& v,
                                        const TensorView& out, const TensorView& lse, const LaunchOptions& options = {});
void block_sparse_backward(const BlockSparseConfig& config, const BlockSparseMask& mask, const TensorView& q,
                           const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                           const TensorView& dout, const TensorView& dq, const TensorView& dk, const TensorView& dv,
                           const LaunchOptions& options = {});
// Whether block_sparse_backward with these arguments runs the sm90 backward whose producer loads by
// TMA (as dattn::cuda_backward_uses_tma); validates the arguments as block_sparse_backward does.
bool cuda_block_sparse_backward_uses_tma(const BlockSparseConfig& config, const BlockSparseMask& mask,
                                         const TensorView& q, const TensorView& k, const TensorView& v,
                                         const TensorView& out, const TensorView& lse, const TensorView& dout,
                                         const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                         const LaunchOptions& options = {});

// Ring backward steps of block-sparse attention: ring_query_gradients, ring_finish_query_gradients
// and ring_key_gradients of dattn/attention.hpp with a block mask (block-aligned steps, CPU).
void block_sparse_ring_query_gradients(const BlockSparseConfig& config, const BlockSparseMask& mask,
                                       const RingStep& step, const TensorView& q, const TensorView& k,
                                       const TensorView& v, const TensorView& dout, const TensorView& lse,
                                       const RingQueryGradients& sums);
void block_sparse_ring_finish_query_gradients(const BlockSparseConfig& config, const RingQueryGradients& sums,
                                              const TensorView& dq);
void block_sparse_ring_key_gradients(const BlockSparseConfig& config, const BlockSparseMask& mask, const RingStep& step,
                                     const TensorView& q, const TensorView& k, const TensorView& v,
                                     const TensorView& dout, const TensorView& lse, const TensorView& delta,
                                     const TensorView& dk, const TensorView& dv);

// The one-pass ring steps of dattn/attention.hpp (ring_forward_step, ring_step_gradients) with a
// block mask (block-aligned steps; CPU, or CUDA with the mask on q's device, on `stream`).
void block_sparse_ring_forward_step(const BlockSparseConfig& config, const BlockSparseMask& mask, const RingStep& step,
                                    const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView& out, const TensorView& lse, void* stream = nullptr);
void block_sparse_ring_step_gradients(const BlockSparseConfig& config, const BlockSparseMask& mask,
                                      const RingStep& step, const TensorView& q, const TensorView& k,
                                      const TensorView& v, const TensorView& dout, const TensorView& lse,
                                      const TensorView& delta, const TensorView& dq, const TensorView& dk,
                                      const TensorView& dv, void* stream = nullptr);

// The named patterns of docs/semantics.md, as dense bool masks [num_blocks, num_blocks] shared by all heads.
Tensor local_window_pattern(std::int64_t num_blocks, std::int64_t window, std::int64_t block_size);
Tensor dilated_sparse_pattern(std::int64_t num_blocks, const std::vector<std::int64_t>& rates = {1, 2, 4});
Tensor global_local_pattern(std::int64_t num_blocks, std::int64_t window, std::int64_t global_blocks,
                            std::int64_t block_size);
// Blocks of a sequence of seqlen tokens; every segment length must be a multiple of block_size.
Tensor dilated_pattern(std::int64_t seqlen, const std::vector<std::int64_t>& segment_lengths,
                       const std::vector<std::int64_t>& dilation_rates, std::int64_t block_size);

// FLOPs of one forward (4·B·H·allowed token pairs·D, causal pairs counted exactly).
double block_sparse_forward_flops(const BlockSparseMask& mask, std::int64_t block_size, bool causal,
                                  std::int64_t batch, std::int64_t seqlen, std::int64_t heads, std::int64_t head_dim);

}  // namespace dattn
