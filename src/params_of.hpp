// DilatedParams of a validated call, for the entry points that run it in parts (packed batches,
// decoding): dilated attention's (branch table) and block-sparse attention's (the mask's CSR).
#pragma once

#include "dattn/attention.hpp"
#include "dattn/block_sparse.hpp"
#include "params.hpp"

namespace dattn::detail {

DilatedParams dilated_params(const DilatedConfig& config, const TensorView& q, const TensorView& k,
                             const TensorView& v, const TensorView& out, const TensorView& lse,
                             const LaunchOptions& options);
DilatedParams block_sparse_params(const BlockSparseConfig& config, const BlockSparseMask& mask, const TensorView& q,
                                  const TensorView& k, const TensorView& v, const TensorView& out,
                                  const TensorView& lse, const LaunchOptions& options);

}  // namespace dattn::detail
