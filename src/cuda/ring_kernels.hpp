// Data movement of the ring on the GPU (src/distributed/ring_cuda.cpp): packing the (row, head) entries
// that travel, unpacking them, and the float32 accumulators' fills and conversions; row_dot also
// serves the backward's delta pass (api.cpp), append_rows decoding's new keys and values
// (append_to_cache, cuda_attention.hpp). All asynchronous on `stream`; sizes in elements.
#pragma once

#include <cstdint>

#include "dattn/tensor.hpp"

namespace dattn::cuda {

// packed[b][i][:] = x[b, e_i / H, e_i % H, :] for the device entries e_0 .. e_{count-1} (x any
// strides with stride 1 along D; packed contiguous [B, count, D] in x's dtype).
void gather_entries(const TensorView& x, const std::int64_t* entries, std::int64_t count, void* packed, void* stream);
// x[b, e_i / H, e_i % H, :] = packed[b][i][:] (x contiguous; the caller zeroes it first).
void scatter_entries(const void* packed, const std::int64_t* entries, std::int64_t count, const TensorView& x,
                     void* stream);
// x[b, e_i / H, e_i % H, :] += packed[b][i][:], float32 (x contiguous).
void scatter_add_entries(const float* packed, const std::int64_t* entries, std::int64_t count, const TensorView& x,
                         void* stream);
// A [B, N] byte mask, any strides, into (or out of) a contiguous one.
void copy_mask(const TensorView& from, const TensorView& to, void* stream);
void fill(float* x, std::int64_t count, float value, void* stream);
void add(float* x, const float* y, std::int64_t count, void* stream);
// to (any float dtype, any strides, stride 1 along D) = from (float32 [B, N, H, D] contiguous).
void store_converted(const float* from, const TensorView& to, void* stream);
// delta [B, H, N] (float32, contiguous) = Σ_d dout·out over D (both [B, N, H, D], any strides).
void row_dot(const TensorView& dout, const TensorView& out, float* delta, void* stream);
// k_cache[b, lengths[b] + t, h, :] = k_rows[b, t, h, :] for t < Tn, and v_cache from v_rows alike, in
// one launch (rows [B, Tn, H, D], caches [B, Nmax, H, D], one dtype, any strides with stride 1 along
// D; lengths int32 [B] on the device, read there).
void append_rows(const TensorView& k_rows, const TensorView& v_rows, const TensorView& k_cache,
                 const TensorView& v_cache, const std::int32_t* lengths, void* stream);

}  // namespace dattn::cuda
