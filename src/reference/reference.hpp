// The plain, float64 implementation of docs/semantics.md: every test's ground truth. Works on any dtype
// (loads convert to double), any strides, both modes, causal, key padding, dropout and a
// position index map.
#pragma once

#include <cstdint>

#include "dattn/config.hpp"
#include "dattn/tensor.hpp"

namespace dattn::reference {

// position_index (curve position -> original position, [N]) attends in that order, as docs/semantics.md's
// Hilbert-ordered attention; null is the identity. k, v may have Hkv heads (grouped-query heads).
// dropout_batch_base is the dropout counter's b of batch row 0 (a varlen sequence's index).
void forward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
             const TensorView& v, const TensorView& out, const TensorView& lse,
             const std::int64_t* position_index = nullptr, std::int64_t dropout_batch_base = 0);

// Recomputes everything from q, k, v (it needs neither out nor lse).
void backward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
              const TensorView& v, const TensorView& dout, const TensorView& dq,
              const TensorView& dk, const TensorView& dv, const std::int64_t* position_index = nullptr,
              std::int64_t dropout_batch_base = 0);

}  // namespace dattn::reference
