// Helpers shared by the GPU test programs: host-side element access in any dtype, an index
// walker, random draws, and a CUDA error check.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "dattn/tensor.hpp"

namespace dattn_gpu_test {

using dattn::DType;
using Rng = std::mt19937_64;

#define CUDA_OK(x)                                                                                   \
  do {                                                                                               \
    const cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) throw std::runtime_error(std::string(#x) + ": " + cudaGetErrorString(e_)); \
  } while (0)

inline std::int64_t uniform(Rng& rng, std::int64_t lo, std::int64_t hi) {
  return lo + std::int64_t(rng() % std::uint64_t(hi - lo + 1));
}
inline bool chance(Rng& rng, double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; }

inline double load(const void* base, DType t, std::int64_t i) {
  switch (t) {
    case DType::float32: return static_cast<const float*>(base)[i];
    case DType::float64: return static_cast<const double*>(base)[i];
    case DType::bfloat16: return dattn::bfloat16_to_float(static_cast<const std::uint16_t*>(base)[i]);
    case DType::float16: return dattn::float16_to_float(static_cast<const std::uint16_t*>(base)[i]);
    case DType::boolean: return static_cast<const std::uint8_t*>(base)[i];
    default: break;
  }
  return 0;
}
inline void store(void* base, DType t, std::int64_t i, double x) {
  switch (t) {
    case DType::float32: static_cast<float*>(base)[i] = float(x); break;
    case DType::float64: static_cast<double*>(base)[i] = x; break;
    case DType::bfloat16: static_cast<std::uint16_t*>(base)[i] = dattn::float_to_bfloat16(float(x)); break;
    case DType::float16: static_cast<std::uint16_t*>(base)[i] = dattn::float_to_float16(float(x)); break;
    case DType::boolean: static_cast<std::uint8_t*>(base)[i] = x != 0; break;
    default: break;
  }
}

template <class F>
void for_each_index(const std::vector<std::int64_t>& shape, F&& f) {
  std::vector<std::int64_t> idx(shape.size(), 0);
  for (auto s : shape)
    if (s == 0) return;
  for (;;) {
    f(idx);
    int d = int(shape.size()) - 1;
    for (; d >= 0; --d) {
      if (++idx[std::size_t(d)] < shape[std::size_t(d)]) break;
      idx[std::size_t(d)] = 0;
    }
    if (d < 0) return;
  }
}

}  // namespace dattn_gpu_test
