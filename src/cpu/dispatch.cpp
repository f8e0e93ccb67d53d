// Picks the SIMD level once per call: the best the CPU has, or the one DATTN_CPU_ISA forces.
// Packed (varlen) and decode batches run sequence by sequence; grouped-query gradients are summed
// over the query heads that share a key/value head.
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "cpu/cpu_attention.hpp"
#include "cpu/isa_kernels.hpp"
#include "dattn/cpu.hpp"
#include "dattn/error.hpp"
#include "dattn/tensor.hpp"
#include "validate.hpp"

namespace dattn {
namespace {

// Linux enables AMX tile data per process on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction kills the process. Asked once.
bool amx_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

}  // namespace

bool cpu_supports(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::scalar: return true;
    case CpuIsa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case CpuIsa::avx512:
      return cpu_supports(CpuIsa::avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
    case CpuIsa::avx512_bf16: return cpu_supports(CpuIsa::avx512) && __builtin_cpu_supports("avx512bf16");
    case CpuIsa::amx_bf16:
      return cpu_supports(CpuIsa::avx512_bf16) && __builtin_cpu_supports("amx-tile") &&
             __builtin_cpu_supports("amx-bf16") && amx_permitted();
  }
  return false;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::scalar: return "scalar";
    case CpuIsa::avx2: return "avx2";
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx512_bf16: return "avx512_bf16";
    case CpuIsa::amx_bf16: return "amx_bf16";
  }
  return "unknown";
}

CpuIsa active_cpu_isa() {
  const char* forced = std::getenv("DATTN_CPU_ISA");
  if (forced && *forced) {
    for (CpuIsa isa : {CpuIsa::scalar, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::avx512_bf16, CpuIsa::amx_bf16})
      if (std::string(forced) == cpu_isa_name(isa)) {
        if (!cpu_supports(isa))
          throw Error(std::string("DATTN_CPU_ISA=") + forced + " but this CPU lacks " + forced +
                      (isa == CpuIsa::amx_bf16 ? " (or the kernel refused the AMX tile state)" : "") +
                      "; expected one of the supported paths or unset");
        return isa;
      }
    throw Error(std::string("DATTN_CPU_ISA=") + forced + "; expected scalar, avx2, avx512, avx512_bf16 or amx_bf16");
  }
  // amx_bf16 is the default where the CPU (and kernel) allow it: its tests pass at SPEC's bfloat16
  // bar on such a CPU and it beat avx512 there. avx512_bf16 is never picked by default: on that
  // CPU vdpbf16ps ran at half the fp32 FMA rate in FLOPs and its kernels were slower than avx512;
  // a CPU where it wins (Zen 4 is expected to be one) must be measured before it is preferred.
  if (cpu_supports(CpuIsa::amx_bf16)) return CpuIsa::amx_bf16;
  if (cpu_supports(CpuIsa::avx512)) return CpuIsa::avx512;
  if (cpu_supports(CpuIsa::avx2)) return CpuIsa::avx2;
  return CpuIsa::scalar;
}

namespace cpu {
namespace {

// Under avx512_bf16 and amx_bf16 only bfloat16 data take the bf16-operand kernels: float32 and float16 inputs
// would lose precision to bf16 operands, so they run the avx512 kernels.
void forward_isa(const detail::DilatedParams& params) {
  switch (active_cpu_isa()) {
    case CpuIsa::avx512_bf16:
      return params.dtype == DType::bfloat16 ? forward_avx512_bf16(params) : forward_avx512(params);
    case CpuIsa::amx_bf16:
      return params.dtype == DType::bfloat16 ? forward_amx_bf16(params) : forward_avx512(params);
    case CpuIsa::avx512: return forward_avx512(params);
    case CpuIsa::avx2: return forward_avx2(params);
    case CpuIsa::scalar: return forward_scalar(params);
  }
}

void backward_isa(const detail::DilatedParams& params) {
  switch (active_cpu_isa()) {
    case CpuIsa::avx512_bf16:
      return params.dtype == DType::bfloat16 ? backward_avx512_bf16(params) : backward_avx512(params);
    case CpuIsa::amx_bf16:
      return params.dtype == DType::bfloat16 ? backward_amx_bf16(params) : backward_avx512(params);
    case CpuIsa::avx512: return backward_avx512(params);
    case CpuIsa::avx2: return backward_avx2(params);
    case CpuIsa::scalar: return backward_scalar(params);
  }
}

void* advance(void* data, std::int64_t elements, std::int64_t element_size) {
  return data ? static_cast<char*>(data) + elements * element_size : nullptr;
}

// Every operand and lse moved to the sequence starting at (batch, row) of the tensors.
void move_to(detail::DilatedParams& s, std::int64_t batch, std::int64_t row, std::int64_t element_size) {
  for (detail::Operand* x : {&s.q, &s.k, &s.v, &s.out, &s.dout, &s.dq, &s.dk, &s.dv})
    x->data = advance(x->data, batch * x->batch_stride + row * x->row_stride, element_size);
  if (s.lse) s.lse += batch * s.lse_batch_stride + row * s.lse_row_stride;
}

// Varlen and decode calls run one sequence at a time, each as a call of one sequence: a varlen
// sequence as a whole-sequence call of its own length, a decode sequence as a step whose queries
// are the last rows of its first key_lengths[b] positions and whose keys are those positions.
// Sequences run side by side (one thread each) when no one of them holds more than a thread's
// share of the rows, else one after another with every thread on each.
template <class Run>
void run_per_sequence(const detail::DilatedParams& p, Run&& run) {
  if (p.cu_seqlens == nullptr && p.key_lengths == nullptr) return run(p);
  const std::int64_t element_size = std::int64_t(dtype_size(p.dtype));
  std::vector<detail::DilatedParams> sequences;
  std::int64_t rows = 0, longest = 0;
  for (std::int64_t b = 0; b < p.batch; ++b) {
    detail::DilatedParams s = p;
    s.batch = 1;
    s.cu_seqlens = nullptr;
    s.key_lengths = nullptr;
    s.dropout_batch_base = p.dropout_batch_base + b;
    s.key_begin = 0;
    if (p.cu_seqlens) {
      const std::int64_t first = p.cu_seqlens[b], length = p.cu_seqlens[b + 1] - first;
      if (length == 0) continue;  // a zero-length sequence produces nothing
      move_to(s, 0, first, element_size);
      s.seqlen = s.global_length = s.key_end = length;
      s.query_position = 0;
    } else {
      move_to(s, b, 0, element_size);
      s.global_length = s.key_end = p.key_lengths[b];
      s.query_position = s.global_length - p.seqlen;
    }
    rows += s.seqlen;
    longest = std::max(longest, s.seqlen);
    sequences.push_back(s);
  }
  const int threads = omp_get_max_threads();
  if (threads == 1 || longest * threads > rows) {
    for (const detail::DilatedParams& s : sequences) run(s);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (std::size_t i = 0; i < sequences.size(); ++i) run(sequences[i]);  // nested regions run on one thread
}

// Under grouped-query heads the backward's dk, dv of each query head go to a [B, Nk, H, D]
// buffer of their own (or a float32 accumulator for ring key passes), then every key/value head
// gets the sum over the query heads that share it: no two threads write one row.
void backward_grouped_query(const detail::DilatedParams& p) {
  if (p.kv_heads == p.heads || !p.run_key_pass) return backward_isa(p);
  const std::int64_t B = p.batch, Nk = p.key_end - p.key_begin, H = p.heads, D = p.head_dim;
  const DType type = p.accumulate ? DType::float32 : p.dtype;
  Tensor dk = Tensor::zeros({B, Nk, H, D}, type), dv = Tensor::zeros({B, Nk, H, D}, type);
  detail::DilatedParams s = p;
  s.dk = {dk.data<void>(), Nk * H * D, H * D, D, 1};
  s.dv = {dv.data<void>(), Nk * H * D, H * D, D, 1};
  backward_isa(s);
  const std::int64_t group = H / p.kv_heads;
  const TensorView sum_type = make_view(nullptr, p.dtype, {0});  // load_float/store_float read the dtype
  for (const auto& [sum, parts] : {std::pair{p.dk, &dk}, std::pair{p.dv, &dv}}) {
    const TensorView& part = parts->view();
    TensorView out = sum_type;
    out.data = sum.data;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t n = 0; n < Nk; ++n)
        for (std::int64_t g = 0; g < p.kv_heads; ++g)
          for (std::int64_t d = 0; d < D; ++d) {
            float total = 0.0f;
            for (std::int64_t h = g * group; h < (g + 1) * group; ++h)
              total += detail::load_float(part, ((b * Nk + n) * H + h) * D + d);
            const std::int64_t at = b * sum.batch_stride + n * sum.row_stride + g * sum.head_stride + d;
            if (p.accumulate) static_cast<float*>(sum.data)[at] += total;
            else detail::store_float(out, at, total);
          }
  }
}

}  // namespace

void forward(const detail::DilatedParams& params) { run_per_sequence(params, forward_isa); }

void backward(const detail::DilatedParams& params) { run_per_sequence(params, backward_grouped_query); }

}  // namespace cpu
}  // namespace dattn
