// Host side of the sm90 kernels' TMA loads (builds with DATTN_SM90_TMA): which calls they cover,
// and the tensor maps (tensor_maps.hpp has the layout). cuTensorMapEncodeTiled is a driver
// function: it is looked up through the runtime (cudaGetDriverEntryPoint), so that the library
// links against cudart only, as before.
#include "cuda/sm90/tensor_maps.hpp"

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

namespace dattn::cuda {
namespace {

using detail::DilatedParams;
using detail::Operand;

constexpr std::int64_t kElementBytes = 2;  // 16-bit data only
constexpr int kBoxColumns = 64;            // one 128-byte swizzle span

// A map's dims and byte strides (of dims 1-4; dim 0, the head dim, has stride 1).
struct MapShape {
  cuuint64_t dims[5];
  cuuint64_t strides[4];
};

// The byte stride of a map dim: any positive multiple of 16 for a dim of extent 1, which no copy
// steps along (`packed`: what a contiguous tensor would have); else a positive multiple of 16
// below 2^40, or false.
bool map_stride(std::int64_t extent, std::int64_t stride, std::int64_t packed, cuuint64_t& bytes) {
  if (extent == 1) {
    bytes = cuuint64_t(packed * kElementBytes);
    return true;
  }
  if (stride <= 0 || stride * kElementBytes % 16 != 0 || stride * kElementBytes >= (std::int64_t(1) << 40)) return false;
  bytes = cuuint64_t(stride * kElementBytes);
  return true;
}

// The rows a map spans and its batch extent: B sequences of N rows, or a packed batch's T rows as
// one (its sequences' rows are addressed by their tensor rows, tensor_maps.hpp).
std::int64_t map_rows(const DilatedParams& p) { return p.cu_seqlens != nullptr ? p.packed_rows : p.seqlen; }
std::int64_t map_batch(const DilatedParams& p) { return p.cu_seqlens != nullptr ? 1 : p.batch; }

// The map of operand x (with `heads` heads) for a branch of dilation rate r (r divides the map's
// rows), or false where x's layout is not one a map can describe.
bool map_shape(const DilatedParams& p, const Operand& x, std::int64_t heads, std::int64_t r, MapShape& m) {
  if (x.data == nullptr || reinterpret_cast<std::uintptr_t>(x.data) % 16 != 0) return false;
  const std::int64_t D = p.head_dim, rows = map_rows(p) / r, batch = map_batch(p);
  m.dims[0] = cuuint64_t(D);
  m.dims[1] = cuuint64_t(heads);
  m.dims[2] = cuuint64_t(r);
  m.dims[3] = cuuint64_t(rows);
  m.dims[4] = cuuint64_t(batch);
  return map_stride(heads, x.head_stride, D, m.strides[0]) && map_stride(r, x.row_stride, heads * D, m.strides[1]) &&
         map_stride(rows, x.row_stride * r, r * heads * D, m.strides[2]) &&
         map_stride(batch, x.batch_stride, map_rows(p) * heads * D, m.strides[3]);
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver the runtime loaded (once per process).
EncodeTiled encode_tiled() {
  static EncodeTiled function = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* address = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t status =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &address, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t status = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &address, cudaEnableDefault, &found);
#endif
    if (status == cudaSuccess && found == cudaDriverEntryPointSuccess) function = reinterpret_cast<EncodeTiled>(address);
    else cudaGetLastError();
  });
  if (function == nullptr)
    throw std::runtime_error("dattn: the CUDA driver has no cuTensorMapEncodeTiled (the sm90 forward's TMA loads need "
                             "a CUDA 12 driver)");
  return function;
}

// The dilation rate a branch's maps step by: block-sparse attention has no branches, its rows are
// those of rate 1, and an index map's rows lie anywhere (one-row maps, DATTN_SM90_TMA_ROWS).
std::int64_t map_rate(const DilatedParams& p, int branch) {
  return p.block_size > 0 || p.position_index != nullptr ? 1 : p.branches[branch].dilation_rate;
}

// Whether each operand (tensor, heads) has a map at the rate of every branch a launch may take
// (block-sparse attention: the one map of rate 1).
bool maps_fit(const DilatedParams& p, std::initializer_list<std::pair<const Operand*, std::int64_t>> operands) {
  const bool one_map = p.block_size > 0;
  for (int i = 0; i < (one_map ? 1 : p.num_branches); ++i) {
    if (!one_map && p.branches[i].head_count == 0) continue;  // never launched
    const std::int64_t r = map_rate(p, i);
    if (r < 1 || map_rows(p) % r != 0) return false;
    for (const auto& [x, heads] : operands) {
      MapShape m;
      if (!map_shape(p, *x, heads, r, m)) return false;
    }
  }
  return true;
}

}  // namespace

bool sm90_tma_covers(const DilatedParams& p) {
  if (p.key_lengths != nullptr) return false;                                // caches
  if (p.float32_outputs || !p.whole_sequence()) return false;               // ring steps
  if (p.cu_seqlens != nullptr && p.packed_rows < 1) return false;            // a packed batch of T rows
  if (p.dtype != DType::bfloat16 && p.dtype != DType::float16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.batch < 1 || p.seqlen < 1 || p.heads < 1 || p.kv_heads < 1) return false;
  // An index map's rows lie anywhere: the forward's TMA instances gather them by cp.async, no maps.
  if (p.position_index != nullptr && p.block_size == 0) return true;
  // Blocks of whole 128-row key tiles: a shorter block's tiles would end short, and the TMA producer
  // zeroes a short tile's rows after its copy lands (the cp.async one zero-fills them).
  if (p.block_size % 128 != 0) return false;
  return maps_fit(p, {{&p.q, p.heads}, {&p.k, p.kv_heads}, {&p.v, p.kv_heads}});
}

namespace {

// One operand's maps: its name (for messages), tensor, heads, box rows and per-branch maps.
struct MapOperand {
  const char* name;
  const Operand* x;
  std::int64_t heads;
  int rows;
  CUtensorMap* maps;
};

void encode_maps(const DilatedParams& p, const LaunchPlan& plan, const MapOperand* operands, int count) {
  const EncodeTiled encode = encode_tiled();
  const CUtensorMapDataType type =
      p.dtype == DType::bfloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  bool encoded[detail::kMaxBranches] = {};
  for (int j = 0; j < plan.num_jobs; ++j) {
    const int branch = plan.jobs[j].branch;
    if (encoded[branch]) continue;
    encoded[branch] = true;
    const std::int64_t r = map_rate(p, branch);
    for (int i = 0; i < count; ++i) {
      const MapOperand& o = operands[i];
      MapShape m;
      const cuuint32_t box[5] = {cuuint32_t(kBoxColumns), 1, 1, cuuint32_t(o.rows), 1};
      const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
      const CUresult status =
          map_shape(p, *o.x, o.heads, r, m)
              ? encode(&o.maps[branch], type, 5, o.x->data, m.dims, m.strides, box, element_strides,
                       CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
              : CUDA_ERROR_INVALID_VALUE;
      if (status != CUDA_SUCCESS)
        throw std::runtime_error(std::string("dattn: cuTensorMapEncodeTiled refused the sm90 kernels' map of ") + o.name +
                                 " for branch " + std::to_string(branch) + " (error " + std::to_string(int(status)) +
                                 "), which sm90_tma_covers admitted");
    }
  }
}

}  // namespace

void encode_forward_maps(const DilatedParams& p, const LaunchPlan& plan, int query_rows, int key_rows,
                         ForwardTensorMaps& maps) {
  const MapOperand operands[] = {{"q", &p.q, p.heads, query_rows, maps.q},
                                 {"k", &p.k, p.kv_heads, key_rows, maps.k},
                                 {"v", &p.v, p.kv_heads, key_rows, maps.v}};
  encode_maps(p, plan, operands, 3);
}

#if defined(DATTN_SM90_TMA_ROWS)
bool sm90_row_maps_fit(const DilatedParams& p) {
  return p.position_index != nullptr && p.block_size == 0 && p.cu_seqlens == nullptr &&
         maps_fit(p, {{&p.q, p.heads}, {&p.k, p.kv_heads}, {&p.v, p.kv_heads}});
}
#endif

bool sm90_backward_tma_covers(const DilatedParams& p) {
  // An index map's rows come by the cp.async producer (one-row TMA boxes would issue one at a time).
  return p.position_index == nullptr && sm90_tma_covers(p) && maps_fit(p, {{&p.dout, p.heads}});
}

void encode_backward_maps(const DilatedParams& p, const LaunchPlan& plan, int rows, BackwardTensorMaps& maps) {
  const MapOperand operands[] = {{"q", &p.q, p.heads, rows, maps.q},
                                 {"k", &p.k, p.kv_heads, rows, maps.k},
                                 {"v", &p.v, p.kv_heads, rows, maps.v},
                                 {"dout", &p.dout, p.heads, rows, maps.dout}};
  encode_maps(p, plan, operands, 4);
}

}  // namespace dattn::cuda
