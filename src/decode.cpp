// Decoding with a key/value cache: validation (everything before the cache is written), the new
// keys written into the cache, then the kernels through DilatedParams::key_lengths (each sequence
// a step whose queries are the last Tn of its first L positions and whose keys are those
// positions: the CPU kernels run it sequence by sequence, the CUDA kernels' blocks find it). The reference computes the definition: causal attention over the first L
// positions, of which it keeps the last Tn rows.
#include "dattn/decode.hpp"

#include <cmath>
#include <cstring>
#include <utility>
#include <string>
#include <vector>

#include "cpu/cpu_attention.hpp"
#ifdef DATTN_WITH_CUDA
#include "cuda/cuda_attention.hpp"
#endif
#include "dattn/error.hpp"
#include "params_of.hpp"
#include "reference/reference.hpp"
#include "validate.hpp"

namespace dattn {
namespace {

std::string str(std::int64_t x) { return std::to_string(x); }

void check_settings(const DilatedConfig& config, const LaunchOptions& options) {
  detail::check_config(config);
  if (!config.causal) throw Error("config.causal is false; decoding with a cache is causal by definition; expected true");
  if (config.dropout_p != 0.0)
    throw Error("dropout_p = " + std::to_string(config.dropout_p) + "; decoding takes no dropout; expected 0");
  if (config.key_padding_mask) throw Error("key_padding_mask is set; decoding with a cache takes none");
  if (config.scale && !std::isfinite(*config.scale))
    throw Error("scale = " + std::to_string(*config.scale) + "; expected a finite number");
  if (options.ring_step) throw Error("options.ring_step is set for decoding; expected none");
  if (options.position_index) throw Error("options.position_index is set for decoding; expected none (no Hilbert order)");
}

// The tensors' shapes, dtypes and devices.
void check_tensors(const KeyValueCache& cache, const TensorView& q, const TensorView& out, const TensorView& lse,
                   const LaunchOptions& options) {
  if (q.data == nullptr || q.rank != 4) throw Error("q has shape " + q.shape_string() + "; expected [B, Tn, H, D]");
  for (int d = 0; d < 4; ++d)
    if (q.shape[d] < 1) throw Error("q has shape " + q.shape_string() + "; every extent must be >= 1");
  if (q.dtype != DType::float32 && q.dtype != DType::bfloat16 && q.dtype != DType::float16 && q.dtype != DType::float64)
    throw Error(std::string("q has dtype ") + dtype_name(q.dtype) + "; expected float32, bfloat16, float16 or float64");
  if (q.dtype == DType::float64 && !detail::use_reference(options, q.dtype))
    throw Error("q has dtype float64, which only Backend::reference computes; expected float32, bfloat16 or float16");
  detail::check_head_dim(q);
  detail::check_attention_tensor("q", q, q);
  for (const auto& [name, t] : {std::pair{"k_cache", &cache.k_cache}, {"v_cache", &cache.v_cache}})
    if (t->data == nullptr || t->rank != 4)
      throw Error(std::string(name) + " has shape " + t->shape_string() + "; expected [B, Nmax, Hkv, D]");
  TensorView cache_like = q;
  cache_like.shape[1] = cache.k_cache.shape[1];
  cache_like.shape[2] = detail::check_kv_heads(q, cache.k_cache);
  detail::check_attention_tensor("k_cache", cache.k_cache, cache_like);
  detail::check_attention_tensor("v_cache", cache.v_cache, cache_like);
  if (cache.k_new.has_value() != cache.v_new.has_value())
    throw Error(std::string(cache.k_new ? "k_new is set but v_new is not" : "v_new is set but k_new is not") +
                "; expected both or neither");
  if (cache.k_new) {
    TensorView new_like = q;
    new_like.shape[2] = cache_like.shape[2];
    detail::check_attention_tensor("k_new", *cache.k_new, new_like);
    detail::check_attention_tensor("v_new", *cache.v_new, new_like);
  }
  detail::check_attention_tensor("out", out, q);
  detail::check_lse(lse, q);
  if (q.device.type == DeviceType::cuda) {  // the kernels' 32-bit row arithmetic and 16-byte loads
    if (cache.k_cache.shape[1] > (std::int64_t(1) << 30))
      throw Error("k_cache has Nmax = " + str(cache.k_cache.shape[1]) + " rows; expected at most 2^30 on the GPU");
    const std::pair<const char*, const TensorView*> tensors[] = {
        {"q", &q}, {"k_cache", &cache.k_cache}, {"v_cache", &cache.v_cache}, {"out", &out}};
    for (const auto& [name, t] : tensors) detail::check_cuda_alignment(name, *t);
    if (cache.k_new) {
      detail::check_cuda_alignment("k_new", *cache.k_new);
      detail::check_cuda_alignment("v_new", *cache.v_new);
    }
  }
  const TensorView& lengths = cache.cache_seqlens;
  if (lengths.data == nullptr || lengths.rank != 1 || lengths.shape[0] != q.shape[0])
    throw Error("cache_seqlens has shape " + lengths.shape_string() + "; expected [" + str(q.shape[0]) + "] ([B])");
  if (lengths.dtype != DType::int32)
    throw Error(std::string("cache_seqlens has dtype ") + dtype_name(lengths.dtype) + "; expected int32");
  if (lengths.device != q.device)
    throw Error("cache_seqlens is on " + device_name(lengths.device) + "; expected " + device_name(q.device));
  if (lengths.strides[0] != 1) throw Error("cache_seqlens has stride " + str(lengths.strides[0]) + "; expected 1");
}

// L of every sequence from cache_seqlens' values (on the host), checked against Tn and Nmax unless
// cache.validate is false.
std::vector<std::int32_t> key_lengths(const KeyValueCache& cache, const TensorView& q, const std::int32_t* seqlens) {
  const std::int64_t B = q.shape[0], Tn = q.shape[1], Nmax = cache.k_cache.shape[1];
  std::vector<std::int32_t> lengths(std::size_t(B), 0);
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t cached = seqlens[b];
    const std::int64_t L = cached + (cache.k_new ? Tn : 0);
    if (cache.validate && (cached < 0 || L > Nmax))
      throw Error("cache_seqlens[" + str(b) + "] = " + str(cached) + " gives L = " + str(L) + "; expected 0 <= L <= Nmax = " +
                  str(Nmax) + " (the cache's rows" + (cache.k_new ? ", L counting the Tn new tokens)" : ")"));
    if (cache.validate && L < Tn)
      throw Error("cache_seqlens[" + str(b) + "] = " + str(cached) + " < Tn = " + str(Tn) +
                  "; expected L >= Tn (without k_new, cache_seqlens already counts the new tokens)");
    lengths[std::size_t(b)] = std::int32_t(L);
  }
  return lengths;
}

// The element offset of (b, row, head 0, d 0) in a [B, rows, heads, D] view.
std::int64_t at(const TensorView& x, std::int64_t b, std::int64_t row) { return b * x.strides[0] + row * x.strides[1]; }

// to[to_b, to_row] = from[from_b, from_row], every head (same dtype, D contiguous).
void copy_row(const TensorView& from, std::int64_t from_b, std::int64_t from_row, const TensorView& to,
              std::int64_t to_b, std::int64_t to_row) {
  const std::int64_t element = std::int64_t(dtype_size(from.dtype));
  for (std::int64_t h = 0; h < from.shape[2]; ++h)
    std::memcpy(to.ptr<std::byte>() + (at(to, to_b, to_row) + h * to.strides[2]) * element,
                from.ptr<std::byte>() + (at(from, from_b, from_row) + h * from.strides[2]) * element,
                std::size_t(from.shape[3] * element));
}

// The definition: causal attention over the first L positions (q at the last Tn of them; the
// other query rows are zero and change nothing the kept rows see), rows L - Tn .. L - 1 kept.
void reference_decode(const DilatedConfig& config, const KeyValueCache& cache, const std::vector<std::int32_t>& lengths,
                      const TensorView& q, const TensorView& out, const TensorView& lse) {
  const std::int64_t Tn = q.shape[1], H = q.shape[2], D = q.shape[3];
  for (std::int64_t b = 0; b < q.shape[0]; ++b) {
    const std::int64_t L = lengths[std::size_t(b)];
    const Tensor q_full = Tensor::zeros({1, L, H, D}, q.dtype), out_full = Tensor::empty({1, L, H, D}, q.dtype);
    const Tensor lse_full = Tensor::empty({1, H, L}, DType::float32);
    for (std::int64_t t = 0; t < Tn; ++t) copy_row(q, b, t, q_full, 0, L - Tn + t);
    const TensorView k = cache.k_cache.narrow(0, b, 1).narrow(1, 0, L), v = cache.v_cache.narrow(0, b, 1).narrow(1, 0, L);
    reference::forward(config, q_full, k, v, out_full, lse_full);
    for (std::int64_t t = 0; t < Tn; ++t) {
      copy_row(out_full, 0, L - Tn + t, out, b, t);
      for (std::int64_t h = 0; h < H; ++h)
        lse.ptr<float>()[b * lse.strides[0] + h * lse.strides[1] + t * lse.strides[2]] =
            lse_full.data<float>()[h * L + L - Tn + t];
    }
  }
}

#ifdef DATTN_WITH_CUDA
detail::DilatedParams decode_params(const DilatedConfig& config, const KeyValueCache& cache, const TensorView& q,
                                    const TensorView& out, const TensorView& lse, const LaunchOptions& options) {
  detail::DilatedParams p = detail::dilated_params(config, q, cache.k_cache, cache.v_cache, out, lse, options);
  p.key_lengths = cache.cache_seqlens.ptr<std::int32_t>();
  p.key_length_offset = cache.k_new ? q.shape[1] : 0;
  return p;
}

// CUDA: cache_seqlens stays on the device; the kernels read each sequence's L there (params'
// key_lengths + key_length_offset). Validation copies it to the host once (a synchronisation)
// unless cache.validate is false; the new keys are appended in stream order (by the decode kernels, or
// by a kernel before the forward kernels).
void forward_with_kvcache_cuda(const DilatedConfig& config, const KeyValueCache& cache, const TensorView& q,
                               const TensorView& out, const TensorView& lse, const LaunchOptions& options) {
  if (detail::use_reference(options, q.dtype))
    throw Error("Backend::reference runs on the CPU; expected cpu tensors for it");
  if (reinterpret_cast<std::uintptr_t>(options.workspace) % 16 != 0)
    throw Error("options.workspace is not 16-byte aligned; expected 16-byte aligned device memory");
  detail::DilatedParams p = decode_params(config, cache, q, out, lse, options);
  cuda::check_supported(p);
  if (cache.validate) {
    std::vector<std::int32_t> seqlens(std::size_t(q.shape[0]));
    cuda::copy_to_host(p.key_lengths, seqlens.data(), seqlens.size() * sizeof(std::int32_t), options.stream);
    key_lengths(cache, q, seqlens.data());
  }
  // A few new tokens: the split-KV decode kernels (the keys of each selected row read once, spread
  // over the SMs; they read the new rows from k_new, v_new and append them themselves); more: the
  // new rows appended first, then the forward kernels (dattn/decode.hpp, kCudaDecodeMaxTokens).
  if (cuda::decode_covers(p))
    return cuda::decode(p, cache.k_cache.shape[1], cache.k_new ? &*cache.k_new : nullptr,
                        cache.v_new ? &*cache.v_new : nullptr);
  if (cache.k_new)
    cuda::append_to_cache(*cache.k_new, *cache.v_new, cache.k_cache, cache.v_cache, p.key_lengths, options.stream);
  cuda::forward(p);
}
#endif

}  // namespace

void forward_with_kvcache(const DilatedConfig& config, const KeyValueCache& cache, const TensorView& q,
                          const TensorView& out, const TensorView& lse, const LaunchOptions& options) {
  check_settings(config, options);
  check_tensors(cache, q, out, lse, options);
  if (q.device.type == DeviceType::cuda) {
#ifdef DATTN_WITH_CUDA
    return forward_with_kvcache_cuda(config, cache, q, out, lse, options);
#else
    throw Error("q is on " + device_name(q.device) + ", but this build has no CUDA backend; expected cpu tensors");
#endif
  }
  if (options.stream != nullptr) throw Error("stream is set for cpu tensors; expected nullptr");
  const std::vector<std::int32_t> lengths = key_lengths(cache, q, cache.cache_seqlens.ptr<std::int32_t>());
  if (cache.k_new)
    for (std::int64_t b = 0; b < q.shape[0]; ++b)
      for (std::int64_t t = 0; t < q.shape[1]; ++t) {
        const std::int64_t row = cache.cache_seqlens.ptr<std::int32_t>()[b] + t;
        copy_row(*cache.k_new, b, t, cache.k_cache, b, row);
        copy_row(*cache.v_new, b, t, cache.v_cache, b, row);
      }
  if (detail::use_reference(options, q.dtype)) return reference_decode(config, cache, lengths, q, out, lse);
  detail::DilatedParams p = detail::dilated_params(config, q, cache.k_cache, cache.v_cache, out, lse, options);
  p.key_lengths = lengths.data();
  cpu::forward(p);
}

std::size_t decode_workspace_bytes(const DilatedConfig& config, const KeyValueCache& cache, const TensorView& q,
                                   const LaunchOptions& options) {
  check_settings(config, options);
  if (q.device.type != DeviceType::cuda) return 0;
#ifdef DATTN_WITH_CUDA
  // The shapes and settings as a call with out = q's shape would have them (no memory is read).
  const TensorView lse = make_view(nullptr, DType::float32, {q.shape[0], q.shape[2], q.shape[1]}, {}, q.device);
  const detail::DilatedParams p = decode_params(config, cache, q, q, lse, options);
  return cuda::decode_covers(p) ? cuda::decode_scratch_bytes(p, cache.k_cache.shape[1]) : 0;
#else
  return 0;
#endif
}

}  // namespace dattn
