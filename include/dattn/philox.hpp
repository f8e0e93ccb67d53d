// Philox4x32-10 (Salmon et al., Random123) and the attention-dropout keep decision of docs/semantics.md.
// Header-only so CPU and CUDA kernels draw bit-identical masks.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
// static: each translation unit (each CPU ISA) keeps its own copy, never merged across ISAs.
#define DATTN_HOST_DEVICE static inline
#endif

namespace dattn {

struct PhiloxWords {
  std::uint32_t w[4];
};

DATTN_HOST_DEVICE PhiloxWords philox4x32_10(PhiloxWords counter, std::uint32_t key0, std::uint32_t key1) {
  constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = std::uint64_t(kMul0) * counter.w[0];
    const std::uint64_t p1 = std::uint64_t(kMul1) * counter.w[2];
    counter = PhiloxWords{{std::uint32_t(p1 >> 32) ^ counter.w[1] ^ key0, std::uint32_t(p1),
                           std::uint32_t(p0 >> 32) ^ counter.w[3] ^ key1, std::uint32_t(p0)}};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return counter;
}

// Keep iff u >= threshold, threshold = floor(p * 2^32) computed in float64.
DATTN_HOST_DEVICE std::uint32_t dropout_threshold(double p) {
  return std::uint32_t(p * 4294967296.0);
}

// The keep decision for (batch, head, query position i, key position j), positions global.
DATTN_HOST_DEVICE bool dropout_keep(std::uint64_t seed, std::uint64_t offset, std::int64_t batch_head,
                                    std::int64_t query_position, std::int64_t key_position,
                                    std::uint32_t threshold) {
  const PhiloxWords counter{{std::uint32_t(key_position >> 2), std::uint32_t(query_position),
                             std::uint32_t(batch_head), std::uint32_t(offset)}};
  const PhiloxWords out = philox4x32_10(counter, std::uint32_t(seed), std::uint32_t(seed >> 32));
  return out.w[key_position & 3] >= threshold;
}

}  // namespace dattn
