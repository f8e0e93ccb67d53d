// The CUDA backend behind dattn::forward / dattn::backward for tensors on a CUDA device.
// Asynchronous on params.stream: no synchronisation, no allocation.
#pragma once

#include "params.hpp"

namespace dattn::cuda {

void forward(const detail::DilatedParams& params);
void backward(const detail::DilatedParams& params);  // reads out and lse saved by forward

}  // namespace dattn::cuda
