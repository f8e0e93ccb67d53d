// The plain, float64 implementation of SPEC.md: every test's ground truth. Works on any dtype
// (loads convert to double), any strides, both modes, causal, key padding and dropout.
#pragma once

#include "dattn/config.hpp"
#include "dattn/tensor.hpp"

namespace dattn::reference {

void forward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
             const TensorView& v, const TensorView& out, const TensorView& lse);

// Recomputes everything from q, k, v (it needs neither out nor lse).
void backward(const DilatedConfig& config, const TensorView& q, const TensorView& k,
              const TensorView& v, const TensorView& dout, const TensorView& dq,
              const TensorView& dk, const TensorView& dv);

}  // namespace dattn::reference
