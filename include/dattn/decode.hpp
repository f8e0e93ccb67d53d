// Decoding with a key/value cache: the attention of a few new tokens over a sequence's cached keys,
// causal by definition, for dilated attention (both modes; no Hilbert order, no dropout). Per new
// token a branch reads only the keys it selects in the token's segment (at most ceil(w / r)),
// never the whole cache. CPU and CUDA tensors (on CUDA cache_seqlens stays on the device: the
// kernels read it there; validation copies it to the host once). Forward only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "dattn/attention.hpp"
#include "dattn/config.hpp"
#include "dattn/tensor.hpp"

namespace dattn {

// CUDA: calls with Tn <= kCudaDecodeMaxTokens new tokens per sequence (and LaunchOptions::cuda_kernels
// automatic) run split-KV decode kernels: a block reads a chunk of the keys a branch selects for a
// kv head once for every query head and new token that selects them, the chunks spread over the
// SMs, and a second kernel merges the chunks and branches. Larger Tn run the forward kernels. Why
// 8: a few tokens leave the forward kernels' blocks of 64 to 192 query rows nearly empty, each block
// scanning a segment's keys alone; the split kernels compute on the CUDA cores, where the work per
// key grows with the rows sharing it (Tn times the heads of a class), so the tensor cores win from
// some Tn on. At 8 every call without grouped-query heads fits one block's registers (8 rows); a
// chosen bound, not tuned on a GPU. Their scratch is LaunchOptions::workspace when it holds
// decode_workspace_bytes, else allocated and freed in order on the call's stream from the device's
// current memory pool (docs/support.md, "Device memory").
inline constexpr std::int64_t kCudaDecodeMaxTokens = 8;

struct KeyValueCache {
  TensorView k_cache, v_cache;  // [B, Nmax, Hkv, D], H % Hkv == 0
  TensorView cache_seqlens;     // int32 [B] on q's device; never modified
  // Optional [B, Tn, Hkv, D] (both or neither): first written into the cache at rows
  // cache_seqlens[b] .. cache_seqlens[b] + Tn - 1, and then L = cache_seqlens[b] + Tn; without
  // them cache_seqlens[b] already counts the new tokens and L = cache_seqlens[b] (L >= Tn).
  std::optional<TensorView> k_new, v_new;
  bool validate = true;  // false skips the check of cache_seqlens' values (undefined behaviour on bad ones)
};

// q, out: [B, Tn, H, D]; lse: [B, H, Tn] float32. Writes rows L - Tn .. L - 1 of causal dilated
// attention over each sequence's first L positions (Tn may exceed a segment). config.causal must
// be true; config.dropout_p 0 and no key_padding_mask. Every error is raised before the cache or
// out is written.
void forward_with_kvcache(const DilatedConfig& config, const KeyValueCache& cache, const TensorView& q,
                          const TensorView& out, const TensorView& lse, const LaunchOptions& options = {});

// The bytes of scratch forward_with_kvcache's split-KV kernels take for these shapes and settings
// (0 on the CPU and where the forward kernels run the call). LaunchOptions::workspace of at least
// this many bytes (device memory, 16-byte aligned) serves as that scratch; without one each call
// allocates it in stream order (cudaMallocAsync), which a loop that synchronises every step pays
// again each step once the pool has released it.
std::size_t decode_workspace_bytes(const DilatedConfig& config, const KeyValueCache& cache, const TensorView& q,
                                   const LaunchOptions& options = {});

}  // namespace dattn
