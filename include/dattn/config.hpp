// What a dilated attention call computes (docs/semantics.md "Dilated attention — configuration").
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "dattn/tensor.hpp"

namespace dattn {

enum class Mode : std::uint8_t {
  grouped,  // heads split into G groups, group i uses branch i, outputs divided by G
  longnet,  // every head in every branch, branches merged by their softmax denominators
};

// Which generation of CUDA kernels runs a call on CUDA tensors. automatic: the sm90 kernels
// (Hopper's wgmma) where the build has them (CMake option DATTN_SM90, off by default), the device
// is compute capability 9.x and they cover the call (bfloat16 or float16, head dim 64 or 128,
// forward), else the sm80 kernels. sm90 asks for them and is an error where they cannot run; sm80
// keeps the older kernels.
enum class CudaKernels : std::uint8_t { automatic, sm80, sm90 };

// How the sm90 backward forms dQ (dilated attention, with or without an index map; block-sparse
// attention always takes dq_blocks). dq_blocks: blocks of their own own the queries and compute
// S and dP again (seven matrix products per pair of tiles); every gradient is a fixed sum, bitwise
// the same run to run. atomic: the blocks that own the keys also form dQ = dS·K and add it into a
// float32 scratch slot per segment by bulk reductions (five products), which the segment's last
// block writes into dq; the order of those adds varies, so dq may differ in the last bits run to
// run (dk, dv do not). automatic: atomic from 2^19 query rows (batch × length × heads) up, where it
// is faster (15 % at 256k tokens, 12 heads), else dq_blocks. dq_blocks is honoured by every
// backward (CPU, sm80: their only way); atomic only where the sm90 backward runs dilated attention.
enum class BackwardDq : std::uint8_t { automatic, dq_blocks, atomic };

struct DilatedConfig {
  std::vector<std::int64_t> segment_lengths;  // w[i] >= 1
  std::vector<std::int64_t> dilation_rates;   // 1 <= r[i] <= w[i]
  Mode mode = Mode::grouped;
  bool causal = false;
  std::optional<double> scale;                 // default 1/sqrt(D)
  std::optional<TensorView> key_padding_mask;  // [B, N] boolean, true = padding
  double dropout_p = 0.0;                      // attention dropout, 0 <= p < 1
  std::uint64_t dropout_seed = 0;
  std::uint64_t dropout_offset = 0;            // the fourth Philox counter word, mod 2^32
  bool use_tf32 = false;                       // the named fast GPU path; the CPU is always exact
};

}  // namespace dattn
