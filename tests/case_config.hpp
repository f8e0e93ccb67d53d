// A test case's call configuration, shared by the CPU tests and the GPU test programs so that
// every program turns its cases into calls the same way. It needs only the library: the GPU
// programs build without GoogleTest and the CPU tests' harness. Each program has its own Case type
// (the GPU cases add dtypes and ring ranks, the ring cases have no scale), so these take any type
// with the fields below.
#pragma once

#include <cstdint>
#include <optional>

#include "dattn/block_sparse.hpp"
#include "dattn/config.hpp"

namespace dattn_test {

// c's segment lengths w, dilation rates r, mode, causality and dropout (dropout_p, dropout_seed),
// with `mask` as the key padding mask. scale, dropout_offset and tf32 are copied where c's type
// has them; a type without them keeps DilatedConfig's defaults.
template <class Case>
dattn::DilatedConfig config_of(const Case& c, const std::optional<dattn::TensorView>& mask = std::nullopt) {
  dattn::DilatedConfig config;
  config.segment_lengths = c.w;
  config.dilation_rates = c.r;
  config.mode = c.mode;
  config.causal = c.causal;
  config.key_padding_mask = mask;
  config.dropout_p = c.dropout_p;
  config.dropout_seed = c.dropout_seed;
  if constexpr (requires { c.scale; }) config.scale = c.scale;
  if constexpr (requires { c.dropout_offset; }) config.dropout_offset = c.dropout_offset;
  if constexpr (requires { c.tf32; }) config.use_tf32 = c.tf32;
  return config;
}

// The block-sparse call of blocks of block_size with config's causality, scale, key padding and
// dropout (its segments and rates give way to the block mask).
inline dattn::BlockSparseConfig block_sparse_config_of(std::int64_t block_size, const dattn::DilatedConfig& config) {
  dattn::BlockSparseConfig sparse;
  sparse.block_size = block_size;
  sparse.causal = config.causal;
  sparse.scale = config.scale;
  sparse.key_padding_mask = config.key_padding_mask;
  sparse.dropout_p = config.dropout_p;
  sparse.dropout_seed = config.dropout_seed;
  sparse.dropout_offset = config.dropout_offset;
  return sparse;
}

}  // namespace dattn_test
