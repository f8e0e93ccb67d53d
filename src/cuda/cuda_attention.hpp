// The CUDA backend behind dattn::forward / dattn::backward for tensors on a CUDA device.
// Asynchronous on params.stream: no synchronisation, no allocation (except decode's scratch, which
// is stream-ordered: cudaMallocAsync and cudaFreeAsync on params.stream).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "dattn/tensor.hpp"
#include "params.hpp"

namespace dattn::cuda {

// Throws dattn::Error for inputs the CUDA kernels do not compute (yet); forward and backward call it
// first, and so does whatever writes caller-owned memory before them (the backward's workspace).
void check_supported(const detail::DilatedParams& params);
void forward(const detail::DilatedParams& params);
// The generation forward (or backward) would run for these params: sm80 or sm90 (see CudaKernels).
CudaKernels kernel_generation(const detail::DilatedParams& params, bool backward);
// Whether forward runs the sm90 forward with TMA loads for these params (builds with
// DATTN_SM90_TMA only; see sm90_tma_covers in src/cuda/sm90/tensor_maps.hpp).
bool forward_uses_tma(const detail::DilatedParams& params);
// Whether backward runs the sm90 backward with TMA loads (sm90_backward_tma_covers).
bool backward_uses_tma(const detail::DilatedParams& params);
void backward(const detail::DilatedParams& params);  // reads out and lse saved by forward

// Decoding: k_new, v_new [B, Tn, Hkv, D] written into the caches at rows lengths[b] + t (lengths
// int32 [B] on the device), on the caches' device, in order on `stream`.
void append_to_cache(const TensorView& k_new, const TensorView& v_new, const TensorView& k_cache,
                     const TensorView& v_cache, const std::int32_t* lengths, void* stream);

// Decoding with a cache (params.key_lengths set) for Tn <= kCudaDecodeMaxTokens new tokens: the
// split-KV kernels of decode_kernel.cu. decode_covers says whether they take the call (else
// forward's kernels run it): Tn small enough, causal, a head dim of the build, no key padding mask,
// dropout, index map or packed batch, and options.cuda_kernels automatic (a named generation runs
// the forward kernels).
// cache_rows is Nmax, the caches' rows, which bounds the grid. decode allocates B·Tn·H·(G in
// longnet mode, else 1)·chunks·(D + 1) floats of scratch in stream order on params.stream
// (cudaMallocAsync from the device's current pool; cudaFreeAsync after its kernels).
// params.workspace of at least decode_scratch_bytes serves as that scratch instead.
bool decode_covers(const detail::DilatedParams& params);
// With k_new and v_new (both or neither; [B, Tn, Hkv, D] on the caches' device) the kernels read the
// new tokens' keys and values there and write them into the caches themselves (no append_to_cache).
void decode(const detail::DilatedParams& params, std::int64_t cache_rows, const TensorView* k_new = nullptr,
            const TensorView* v_new = nullptr);
std::size_t decode_scratch_bytes(const detail::DilatedParams& params, std::int64_t cache_rows);

// Copies `bytes` bytes of device memory to the host, in order on `stream` (a cudaStream_t), and
// waits for them (a synchronisation: for validating small device arrays such as cu_seqlens).
void copy_to_host(const void* device_data, void* host, std::size_t bytes, void* stream);

// A copy of values in the memory of CUDA device `device`, freed with the last owner. Synchronous:
// for what is uploaded once and used by many calls (block masks).
std::shared_ptr<const std::int64_t> upload(const std::vector<std::int64_t>& values, int device);

}  // namespace dattn::cuda
