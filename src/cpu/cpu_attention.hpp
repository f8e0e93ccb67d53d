// Fused CPU kernels: flash-style tiles with online softmax, OpenMP over work items.
#pragma once

#include "params.hpp"

namespace dattn::cpu {

void forward(const detail::DilatedParams& params);
void backward(const detail::DilatedParams& params);  // reads out and lse saved by forward

}  // namespace dattn::cpu
