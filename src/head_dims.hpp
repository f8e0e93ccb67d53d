// The head dims the CUDA kernels are built for: validation refuses the others on the GPU, and the
// dispatch's messages name them. (src/cuda/generate_instances.py writes one instance file per dim;
// DATTN_CUDA_MINIMAL builds hold 64 only.)
#pragma once

#include <cstdint>
#include <string>

namespace dattn::detail {

inline constexpr std::int64_t kCudaHeadDims[] = {16, 32, 64, 80, 96, 128};

inline bool is_cuda_head_dim(std::int64_t d) {
  for (const std::int64_t x : kCudaHeadDims)
    if (x == d) return true;
  return false;
}

// "16, 32, 64, 80, 96, 128", for messages.
inline std::string cuda_head_dims_text() {
  std::string text;
  for (const std::int64_t x : kCudaHeadDims) text += (text.empty() ? "" : ", ") + std::to_string(x);
  return text;
}

}  // namespace dattn::detail
