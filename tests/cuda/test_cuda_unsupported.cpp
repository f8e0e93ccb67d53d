// What the CUDA kernels do not compute yet is refused by name, before anything is written: packed
// batches (cu_seqlens) of block-sparse attention; and a decode call whose cache_seqlens (on the
// device) overflow the cache, or whose head dim has no CUDA kernel, is refused by its validation
// before the cache is written. (Grouped-query heads in ring steps, refused before, run on CUDA:
// dattn-test-cuda's and dattn-test-ring-cuda's cases.)
// A plain program (no GoogleTest on the GPU machine): exit 0 when every call raised the expected
// dattn::Error, 1 otherwise, 77 without a CUDA device.
#include <cuda_runtime.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "dattn/dattn.hpp"

namespace {

int failures = 0;

// The call raises a dattn::Error whose message holds every needle.
void expect_error(const char* what, const std::vector<std::string>& needles, const std::function<void()>& call) {
  try {
    call();
    std::printf("FAIL %s: no error; expected one containing '%s'\n", what, needles[0].c_str());
  } catch (const dattn::Error& e) {
    const std::string message = e.what();
    bool all = true;
    for (const std::string& needle : needles) all = all && message.find(needle) != std::string::npos;
    if (all) {
      std::printf("ok   %s: %s\n", what, e.what());
      return;
    }
    std::printf("FAIL %s: '%s'; expected '%s'%s\n", what, e.what(), needles[0].c_str(),
                needles.size() > 1 ? (" and '" + needles[1] + "'").c_str() : "");
  }
  ++failures;
}

void expect_refusal(const char* what, const std::string& needle, const std::function<void()>& call) {
  expect_error(what, {needle, "not yet supported on CUDA"}, call);
}

// Device memory of `bytes` bytes, each set to `byte`.
struct DeviceBuffer {
  void* data = nullptr;
  DeviceBuffer(std::size_t bytes, int byte) {
    cudaMalloc(&data, bytes);
    cudaMemset(data, byte, bytes);
  }
  ~DeviceBuffer() { cudaFree(data); }
  dattn::TensorView view(dattn::DType dtype, const std::vector<std::int64_t>& shape) const {
    return dattn::make_view(data, dtype, shape, {}, {dattn::DeviceType::cuda, 0});
  }
};

std::vector<unsigned char> host_copy(const DeviceBuffer& b, std::size_t bytes) {
  std::vector<unsigned char> host(bytes);
  cudaMemcpy(host.data(), b.data, bytes, cudaMemcpyDeviceToHost);
  return host;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  using dattn::DType;
  const std::int64_t B = 2, N = 64, H = 4, D = 64;
  const std::size_t bytes = std::size_t(B * N * H * D) * 2;  // bfloat16
  DeviceBuffer q(bytes, 0), k(bytes, 0), v(bytes, 0), out(bytes, 0x7f), lse(std::size_t(B * H * N) * 4, 0x7f);
  DeviceBuffer dout(bytes, 0), offsets(64, 0);
  const auto before = host_copy(out, bytes);

  dattn::DilatedConfig config;
  config.segment_lengths = {16, 32}, config.dilation_rates = {1, 2}, config.causal = true;
  dattn::BlockSparseConfig sparse;
  sparse.block_size = 16;

  // Packed batch: q [T, H, D] = the first 2 * 64 rows, offsets {0, 64, 128} on the device.
  const std::int32_t cu[3] = {0, 64, 128};
  cudaMemcpy(offsets.data, cu, sizeof cu, cudaMemcpyHostToDevice);
  const dattn::PackedSequences packed{offsets.view(DType::int32, {3}), 64};
  const auto qp = q.view(DType::bfloat16, {B * N, H, D}), op = out.view(DType::bfloat16, {B * N, H, D});
  const auto lp = lse.view(DType::float32, {H, B * N});
  dattn::SparsePattern pattern;
  pattern.window = 32;
  expect_refusal("block_sparse_forward_varlen", "cu_seqlens",
                 [&] { dattn::block_sparse_forward_varlen(sparse, pattern, packed, qp, qp, qp, op, lp); });

  // Decoding: q [B, 1, H, D] over caches [B, N, H, D] with one new key each, cache_seqlens {0, 64}:
  // the second sequence would hold N + 1 keys. Refused by the validation; the cache stays as it was.
  const auto cache_before = host_copy(k, bytes);
  const auto new_rows = dout.view(DType::bfloat16, {B, 1, H, D});
  const dattn::KeyValueCache cache{.k_cache = k.view(DType::bfloat16, {B, N, H, D}),
                                   .v_cache = v.view(DType::bfloat16, {B, N, H, D}),
                                   .cache_seqlens = offsets.view(DType::int32, {B}),
                                   .k_new = new_rows,
                                   .v_new = new_rows};
  expect_error("forward_with_kvcache, L > Nmax", {"cache_seqlens[1] = 64", "Nmax = 64"}, [&] {
    dattn::forward_with_kvcache(config, cache, q.view(DType::bfloat16, {B, 1, H, D}),
                                out.view(DType::bfloat16, {B, 1, H, D}), lse.view(DType::float32, {B, H, 1}));
  });

  // Head dim 8 (no CUDA kernel) with valid lengths {0, 0}: refused by the validation before the new
  // keys are written into the cache.
  const std::int32_t zeros[2] = {0, 0};
  cudaMemcpy(offsets.data, zeros, sizeof zeros, cudaMemcpyHostToDevice);
  const std::int64_t narrow = 8, rows = bytes / (2 * B * H * narrow);
  const dattn::KeyValueCache narrow_cache{.k_cache = k.view(DType::bfloat16, {B, rows, H, narrow}),
                                          .v_cache = v.view(DType::bfloat16, {B, rows, H, narrow}),
                                          .cache_seqlens = offsets.view(DType::int32, {B}),
                                          .k_new = dout.view(DType::bfloat16, {B, 1, H, narrow}),
                                          .v_new = dout.view(DType::bfloat16, {B, 1, H, narrow})};
  expect_error("forward_with_kvcache, D = 8", {"head dim D = 8", "not supported on the GPU"}, [&] {
    dattn::forward_with_kvcache(config, narrow_cache, q.view(DType::bfloat16, {B, 1, H, narrow}),
                                out.view(DType::bfloat16, {B, 1, H, narrow}), lse.view(DType::float32, {B, H, 1}));
  });

  if (host_copy(out, bytes) != before) std::printf("FAIL out was written by a refused call\n"), ++failures;
  if (host_copy(k, bytes) != cache_before) std::printf("FAIL the cache was written by a refused call\n"), ++failures;
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
