// dattn-bench-host-calls: the host time of the CUDA calls a dattn forward makes, one kind at a time,
// beside the host time of whole dattn::forward calls (seed and long256k shapes, bf16): where the C++
// core's ~11-20 us per call go. Each figure is the median [min-max] of 2000 calls (after 200
// untimed), us, timed by steady_clock around the call alone.
//   pointer attributes      cudaPointerGetAttributes (every entry point's device guard)
//   device attribute        cudaGetDevice + cudaDeviceGetAttribute (multiprocessors)
//   function attribute      cudaFuncSetAttribute (max dynamic shared memory), as each launch sets it
//   tensor map encode       cuTensorMapEncodeTiled of one 5-D bf16 map (the sm90 forward encodes 3
//                           a branch: seed 9, long256k 12)
//   launch, P bytes         an empty kernel of P bytes of parameters (the sm90 forward's are ~10.6
//                           KiB: params 1408, plan 3084, maps 6144), the GPU kept busy meanwhile
//   dattn::forward          the whole call, the GPU idle at each call as in dattn-bench-gpu
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "dattn/attention.hpp"

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

template <int Bytes>
struct Blob {
  unsigned char data[Bytes];
};

template <int Bytes>
__global__ void empty_kernel(const __grid_constant__ Blob<Bytes> blob) {
  if (blob.data[threadIdx.x % Bytes] == 255 && threadIdx.x == 1024) __trap();  // reads the parameters
}

__global__ void spin(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

// `before` runs ahead of each call, outside the timed span.
void report(const char* name, const std::function<void()>& call, int calls = 2000, int warmup = 200,
            const std::function<void()>& before = [] {}) {
  std::vector<double> us;
  for (int i = 0; i < warmup + calls; ++i) {
    before();
    const auto start = std::chrono::steady_clock::now();
    call();
    const auto end = std::chrono::steady_clock::now();
    if (i >= warmup) us.push_back(std::chrono::duration<double, std::micro>(end - start).count());
  }
  std::sort(us.begin(), us.end());
  std::printf("%-44s %8.2f [%.2f-%.2f]\n", name, us[us.size() / 2], us.front(), us.back());
}

template <int Bytes>
void report_launch(cudaStream_t stream) {
  static const Blob<Bytes> blob{};
  char name[64];
  std::snprintf(name, sizeof name, "launch, %d bytes of parameters", Bytes);
  int launched = 0;
  report(name, [&] {
    if (launched++ % 100 == 0) {  // keep the GPU busy so the launches queue, as a call's do
      check(cudaStreamSynchronize(stream), "synchronize");
      spin<<<1, 1, 0, stream>>>(2000000);
    }
    empty_kernel<Bytes><<<1, 32, 0, stream>>>(blob);
  });
  check(cudaStreamSynchronize(stream), "launch");
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

void whole_calls(const char* name, std::int64_t B, std::int64_t N, std::int64_t H, std::vector<std::int64_t> w,
                 std::vector<std::int64_t> r, cudaStream_t stream) {
  const std::int64_t D = 64, elements = B * N * H * D;
  void *q, *k, *v, *out, *lse;
  for (void** p : {&q, &k, &v, &out}) check(cudaMalloc(p, elements * 2), "cudaMalloc");
  check(cudaMalloc(&lse, B * H * N * 4), "cudaMalloc");
  for (void* p : {q, k, v}) check(cudaMemset(p, 0, elements * 2), "cudaMemset");
  const dattn::Device dev{dattn::DeviceType::cuda, 0};
  auto view = [&](void* p) { return dattn::make_view(p, dattn::DType::bfloat16, {B, N, H, D}, {}, dev); };
  const dattn::TensorView lse_view = dattn::make_view(lse, dattn::DType::float32, {B, H, N}, {}, dev);
  dattn::DilatedConfig config;
  config.segment_lengths = w;
  config.dilation_rates = r;
  dattn::LaunchOptions options;
  options.stream = stream;
  report(
      name, [&] { dattn::forward(config, view(q), view(k), view(v), view(out), lse_view, options); }, 200, 20,
      [&] { check(cudaStreamSynchronize(stream), "synchronize"); });  // each call on an idle GPU, the wait untimed
  check(cudaStreamSynchronize(stream), "forward");
  for (void* p : {q, k, v, out, lse}) cudaFree(p);
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("host time of CUDA calls, %s: us, median [min-max]\n", prop.name);
  cudaStream_t stream;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  void* buffer = nullptr;
  check(cudaMalloc(&buffer, std::size_t(1) << 26), "cudaMalloc");

  report("pointer attributes", [&] {
    cudaPointerAttributes a{};
    cudaPointerGetAttributes(&a, buffer);
  });
  report("device attribute", [&] {
    int device = 0, count = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  });
  report("function attribute", [&] {
    cudaFuncSetAttribute(empty_kernel<64>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
  });

  void* address = nullptr;
  cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
  check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &address, 12000, cudaEnableDefault, &found),
        "entry point");
#else
  check(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &address, cudaEnableDefault, &found), "entry point");
#endif
  const auto encode = reinterpret_cast<EncodeTiled>(address);
  report("tensor map encode", [&] {
    CUtensorMap map;
    const cuuint64_t dims[5] = {64, 12, 4, 2048, 1}, strides[4] = {128, 1536, 6144, 12582912};
    const cuuint32_t box[5] = {64, 1, 1, 128, 1}, element_strides[5] = {1, 1, 1, 1, 1};
    encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 5, buffer, dims, strides, box, element_strides,
           CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
           CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  });

  report_launch<64>(stream);
  report_launch<1408>(stream);
  report_launch<4096>(stream);
  report_launch<10636>(stream);
  report_launch<12684>(stream);

  whole_calls("dattn::forward, seed (B 2, N 2048, H 12)", 2, 2048, 12, {512, 1024, 2048}, {1, 2, 4}, stream);
  whole_calls("dattn::forward, long256k (B 1, N 262144, H 12)", 1, 262144, 12, {2048, 4096, 8192, 16384},
              {1, 2, 4, 8}, stream);
  cudaFree(buffer);
  return 0;
}
