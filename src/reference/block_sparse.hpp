// Block-sparse attention, plainly: each query row's softmax over every visible key of its
// allowed blocks.
#pragma once

#include "dattn/block_sparse.hpp"

namespace dattn::reference {

void block_sparse_forward(const BlockSparseConfig& config, const BlockSparseMask& mask, const TensorView& q,
                          const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse);
void block_sparse_backward(const BlockSparseConfig& config, const BlockSparseMask& mask, const TensorView& q,
                           const TensorView& k, const TensorView& v, const TensorView& dout, const TensorView& dq,
                           const TensorView& dk, const TensorView& dv);

}  // namespace dattn::reference
