// Decoding with a key/value cache: the attention of a few new tokens over a sequence's cached keys,
// causal by definition, for dilated attention (both modes; no Hilbert order, no dropout). Per new
// token a branch reads only the keys it selects in the token's segment (at most ceil(w / r)),
// never the whole cache. CPU and CUDA tensors (on CUDA cache_seqlens stays on the device: the
// kernels read it there; validation copies it to the host once). Forward only.
#pragma once

#include <cstdint>
#include <optional>

#include "dattn/attention.hpp"
#include "dattn/config.hpp"
#include "dattn/tensor.hpp"

namespace dattn {

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

}  // namespace dattn
