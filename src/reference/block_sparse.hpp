// Block-sparse attention, plainly: each query row's softmax over every visible key of its
// allowed blocks. dropout_batch_base: the dropout counter's b of batch row 0 (a varlen sequence's index).
#pragma once

#include "dattn/block_sparse.hpp"

namespace dattn::reference {

void block_sparse_forward(const BlockSparseConfig& config, const BlockSparseMask& mask, const TensorView& q,
                          const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                          std::int64_t dropout_batch_base = 0);
void block_sparse_backward(const BlockSparseConfig& config, const BlockSparseMask& mask, const TensorView& q,
                           const TensorView& k, const TensorView& v, const TensorView& dout, const TensorView& dq,
                           const TensorView& dk, const TensorView& dv, std::int64_t dropout_batch_base = 0);

}  // namespace dattn::reference
