// The ring's data movement on the GPU: one thread block per (batch, entry) row of D elements,
// copied as 2- or 4-byte words (every dtype here is one of those sizes).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/ring_kernels.hpp"
#include "dattn/error.hpp"

namespace dattn::cuda {
namespace {

// A [B, rows, H, D] view: element (b, n, h, d) at data + b·s0 + n·s1 + h·s2 + d.
struct Rows4 {
  void* data;
  std::int64_t s0, s1, s2, B, N, H, D;
};

Rows4 rows_of(const TensorView& x) {
  return {x.data, x.strides[0], x.strides[1], x.strides[2], x.shape[0], x.shape[1], x.shape[2], x.shape[3]};
}

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

void check(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("dattn: ") + what + " launch failed: " + cudaGetErrorString(e));
}

unsigned blocks(std::int64_t n) {
  if (n > 0x7fffffff) throw Error("a ring transfer of " + std::to_string(n) + " rows exceeds one launch");
  return unsigned(n);
}

template <class W>
__global__ void gather_kernel(Rows4 x, const std::int64_t* entries, std::int64_t count, W* packed) {
  const std::int64_t b = blockIdx.x / count, i = blockIdx.x % count, e = entries[i];
  const W* src = static_cast<const W*>(x.data) + b * x.s0 + (e / x.H) * x.s1 + (e % x.H) * x.s2;
  W* dst = packed + (b * count + i) * x.D;
  for (std::int64_t d = threadIdx.x; d < x.D; d += blockDim.x) dst[d] = src[d];
}

template <class W>
__global__ void scatter_kernel(const W* packed, const std::int64_t* entries, std::int64_t count, Rows4 x) {
  const std::int64_t b = blockIdx.x / count, i = blockIdx.x % count, e = entries[i];
  W* dst = static_cast<W*>(x.data) + b * x.s0 + (e / x.H) * x.s1 + (e % x.H) * x.s2;
  const W* src = packed + (b * count + i) * x.D;
  for (std::int64_t d = threadIdx.x; d < x.D; d += blockDim.x) dst[d] = src[d];
}

__global__ void scatter_add_kernel(const float* packed, const std::int64_t* entries, std::int64_t count, Rows4 x) {
  const std::int64_t b = blockIdx.x / count, i = blockIdx.x % count, e = entries[i];
  float* dst = static_cast<float*>(x.data) + b * x.s0 + (e / x.H) * x.s1 + (e % x.H) * x.s2;
  const float* src = packed + (b * count + i) * x.D;
  for (std::int64_t d = threadIdx.x; d < x.D; d += blockDim.x) dst[d] += src[d];
}

__global__ void mask_kernel(const std::uint8_t* from, std::int64_t f0, std::int64_t f1, std::uint8_t* to, std::int64_t t0,
                            std::int64_t t1, std::int64_t B, std::int64_t N) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < B * N; i += std::int64_t(gridDim.x) * blockDim.x)
    to[(i / N) * t0 + (i % N) * t1] = from[(i / N) * f0 + (i % N) * f1];
}

__global__ void fill_kernel(float* x, std::int64_t n, float value) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x)
    x[i] = value;
}

__global__ void add_kernel(float* x, const float* y, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x)
    x[i] += y[i];
}

// One block per (b, t, h) row of k_rows, then one per row of v_rows (one launch for both: a decode
// step is a few microseconds of work, and a launch is one of them), written at row lengths[b] + t
// of its cache.
template <class W>
__global__ void append_kernel(Rows4 k_rows, Rows4 k_cache, Rows4 v_rows, Rows4 v_cache, const std::int32_t* lengths) {
  const std::int64_t count = k_rows.B * k_rows.N * k_rows.H;
  const bool is_v = blockIdx.x >= count;
  const Rows4 rows = is_v ? v_rows : k_rows;
  const Rows4 cache = is_v ? v_cache : k_cache;
  const std::int64_t row = is_v ? blockIdx.x - count : blockIdx.x;
  const std::int64_t h = row % rows.H, t = row / rows.H % rows.N, b = row / (rows.H * rows.N);
  const W* src = static_cast<const W*>(rows.data) + b * rows.s0 + t * rows.s1 + h * rows.s2;
  W* dst = static_cast<W*>(cache.data) + b * cache.s0 + (lengths[b] + t) * cache.s1 + h * cache.s2;
  for (std::int64_t d = threadIdx.x; d < rows.D; d += blockDim.x) dst[d] = src[d];
}

template <class T>
__device__ float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}

template <class T>
__device__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

// One block per (b, n, h) row.
template <class T>
__global__ void convert_kernel(const float* from, Rows4 to) {
  const std::int64_t row = blockIdx.x, h = row % to.H, n = row / to.H % to.N, b = row / (to.H * to.N);
  T* dst = static_cast<T*>(to.data) + b * to.s0 + n * to.s1 + h * to.s2;
  for (std::int64_t d = threadIdx.x; d < to.D; d += blockDim.x) dst[d] = from_float<T>(from[row * to.D + d]);
}

// kLanes lanes per (b, n, h) row, each summing 16-byte chunks (rows 16-byte aligned; else kLanes =
// 32 with one element at a time); delta laid out [B, H, N]. Rows are numbered with h fastest.
template <class T, int kLanes, bool kVector>
__global__ void row_dot_kernel(Rows4 dout, Rows4 out, float* delta, unsigned rows) {
  const unsigned thread = blockIdx.x * blockDim.x + threadIdx.x, row = thread / kLanes, lane = thread % kLanes;
  if (row >= rows) return;
  const unsigned H = unsigned(out.H), N = unsigned(out.N), h = row % H, n = row / H % N, b = row / (H * N);
  const T* g = static_cast<const T*>(dout.data) + b * dout.s0 + n * dout.s1 + h * dout.s2;
  const T* o = static_cast<const T*>(out.data) + b * out.s0 + n * out.s1 + h * out.s2;
  float sum = 0.0f;
  if constexpr (kVector) {
    constexpr int kPer = 16 / int(sizeof(T));
    for (int d = int(lane) * kPer; d < int(out.D); d += kLanes * kPer) {
      const uint4 gv = *reinterpret_cast<const uint4*>(g + d), ov = *reinterpret_cast<const uint4*>(o + d);
      const T* ge = reinterpret_cast<const T*>(&gv);
      const T* oe = reinterpret_cast<const T*>(&ov);
#pragma unroll
      for (int i = 0; i < kPer; ++i) sum += to_float(ge[i]) * to_float(oe[i]);
    }
  } else {
    for (int d = int(lane); d < int(out.D); d += kLanes) sum += to_float(g[d]) * to_float(o[d]);
  }
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset, kLanes);
  if (lane == 0) delta[(std::size_t(b) * H + h) * N + n] = sum;
}

template <class F>
void by_word(DType t, F&& f) {
  if (dtype_size(t) == 2) return f(std::uint16_t{});
  if (dtype_size(t) == 4) return f(std::uint32_t{});
  throw Error(std::string("dtype ") + dtype_name(t) + " does not travel on the GPU ring; expected float32, bfloat16 or float16");
}

template <class F>
void by_float(DType t, F&& f) {
  switch (t) {
    case DType::float32: return f(float{});
    case DType::bfloat16: return f(__nv_bfloat16{});
    case DType::float16: return f(__half{});
    default: throw Error(std::string("dtype ") + dtype_name(t) + "; expected float32, bfloat16 or float16");
  }
}

constexpr int kThreads = 128;
unsigned grid_for(std::int64_t n) { return unsigned(std::min<std::int64_t>((n + kThreads - 1) / kThreads, 65535)); }

}  // namespace

void gather_entries(const TensorView& x, const std::int64_t* entries, std::int64_t count, void* packed, void* stream) {
  if (count == 0) return;
  by_word(x.dtype, [&](auto w) {
    using W = decltype(w);
    gather_kernel<W><<<blocks(x.shape[0] * count), 64, 0, as_stream(stream)>>>(rows_of(x), entries, count, static_cast<W*>(packed));
  });
  check("ring gather");
}

void scatter_entries(const void* packed, const std::int64_t* entries, std::int64_t count, const TensorView& x,
                     void* stream) {
  if (count == 0) return;
  by_word(x.dtype, [&](auto w) {
    using W = decltype(w);
    scatter_kernel<W><<<blocks(x.shape[0] * count), 64, 0, as_stream(stream)>>>(static_cast<const W*>(packed), entries, count, rows_of(x));
  });
  check("ring scatter");
}

void scatter_add_entries(const float* packed, const std::int64_t* entries, std::int64_t count, const TensorView& x,
                         void* stream) {
  if (count == 0) return;
  scatter_add_kernel<<<blocks(x.shape[0] * count), 64, 0, as_stream(stream)>>>(packed, entries, count, rows_of(x));
  check("ring scatter-add");
}

void copy_mask(const TensorView& from, const TensorView& to, void* stream) {
  const std::int64_t n = from.shape[0] * from.shape[1];
  if (n == 0) return;
  mask_kernel<<<grid_for(n), kThreads, 0, as_stream(stream)>>>(static_cast<const std::uint8_t*>(from.data), from.strides[0],
                                                               from.strides[1], static_cast<std::uint8_t*>(to.data),
                                                               to.strides[0], to.strides[1], from.shape[0], from.shape[1]);
  check("ring mask copy");
}

void fill(float* x, std::int64_t count, float value, void* stream) {
  if (count == 0) return;
  fill_kernel<<<grid_for(count), kThreads, 0, as_stream(stream)>>>(x, count, value);
  check("ring fill");
}

void add(float* x, const float* y, std::int64_t count, void* stream) {
  if (count == 0) return;
  add_kernel<<<grid_for(count), kThreads, 0, as_stream(stream)>>>(x, y, count);
  check("ring add");
}

void store_converted(const float* from, const TensorView& to, void* stream) {
  const std::int64_t rows = to.shape[0] * to.shape[1] * to.shape[2];
  if (rows == 0) return;
  by_float(to.dtype, [&](auto t) {
    using T = decltype(t);
    convert_kernel<T><<<blocks(rows), 64, 0, as_stream(stream)>>>(from, rows_of(to));
  });
  check("ring convert");
}

void row_dot(const TensorView& dout, const TensorView& out, float* delta, void* stream) {
  const std::int64_t rows = out.shape[0] * out.shape[1] * out.shape[2];
  if (rows == 0) return;
  if (rows > std::int64_t(UINT32_MAX / 32)) throw Error("row_dot: " + std::to_string(rows) + " rows; expected fewer than 2^27");
  auto aligned = [](const TensorView& x) {
    const std::int64_t bytes = std::int64_t(dtype_size(x.dtype));
    return reinterpret_cast<std::uintptr_t>(x.data) % 16 == 0 && (x.shape[3] * bytes) % 16 == 0 &&
           (x.strides[0] * bytes) % 16 == 0 && (x.strides[1] * bytes) % 16 == 0 && (x.strides[2] * bytes) % 16 == 0;
  };
  const bool vector = aligned(dout) && aligned(out);
  by_float(out.dtype, [&](auto t) {
    using T = decltype(t);
    if (vector) {
      constexpr int kLanes = 8;
      row_dot_kernel<T, kLanes, true><<<blocks((rows * kLanes + kThreads - 1) / kThreads), kThreads, 0, as_stream(stream)>>>(
          rows_of(dout), rows_of(out), delta, unsigned(rows));
    } else {
      row_dot_kernel<T, 32, false><<<blocks((rows * 32 + kThreads - 1) / kThreads), kThreads, 0, as_stream(stream)>>>(
          rows_of(dout), rows_of(out), delta, unsigned(rows));
    }
  });
  check("ring row dot");
}

void append_rows(const TensorView& k_rows, const TensorView& v_rows, const TensorView& k_cache,
                 const TensorView& v_cache, const std::int32_t* lengths, void* stream) {
  const std::int64_t count = k_rows.shape[0] * k_rows.shape[1] * k_rows.shape[2];
  if (count == 0) return;
  by_word(k_rows.dtype, [&](auto w) {
    using W = decltype(w);
    append_kernel<W><<<blocks(2 * count), 64, 0, as_stream(stream)>>>(rows_of(k_rows), rows_of(k_cache),
                                                                      rows_of(v_rows), rows_of(v_cache), lengths);
  });
  check("decode append");
}

}  // namespace dattn::cuda
