// Host side of the CUDA backend: plans the launches (which blocks do which branch, longest
// first) and picks the compiled instance for the dtype and head dim. The only runtime-to-template
// switch of the backend.
#include <algorithm>
#include <climits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/cuda_attention.hpp"
#include "cuda/device_guard.hpp"
#include "cuda/launch.hpp"
#include "cuda/ring_kernels.hpp"
#ifdef DATTN_WITH_SM90_TMA
#include "cuda/sm90/tensor_maps.hpp"
#endif
#include "dattn/error.hpp"
#include "head_dims.hpp"

namespace dattn::cuda {
namespace {

using detail::DilatedParams;

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// The query heads of a launch: every head, or (the backward under grouped-query heads) those with
// h mod step == phase, one of each key/value head's group, so that no two blocks write one dk row.
struct HeadFilter {
  int phase = 0, step = 1;
};

// Heads [first, first + count) that pass the filter, as the job's head_first/head_count/head_step.
bool filter_heads(Job& job, std::int64_t first, std::int64_t count, HeadFilter heads) {
  const std::int64_t h0 = first + ((heads.phase - first % heads.step) % heads.step + heads.step) % heads.step;
  job.head_first = int(h0);
  job.head_step = heads.step;
  job.head_count = h0 < first + count ? int((first + count - h0 + heads.step - 1) / heads.step) : 0;
  return job.head_count > 0;
}

// The job's extents and its branch's dilation rate (1 for block-sparse attention) as the
// divisors decode_block divides by.
void set_divisors(Job& job, std::int64_t rate) {
  job.by_tiles = FastDivisor(job.tiles);
  job.by_segments = FastDivisor(job.segments);
  job.by_heads = FastDivisor(job.head_count);
  job.by_rate = FastDivisor(rate);
}

// Whether a job adds into what is there: the launch's `accumulate`, and dk/dv blocks after the
// first head phase (the earlier phases wrote the same key/value heads' rows).
bool job_accumulates(int role, bool accumulate, HeadFilter heads) {
  return accumulate || (role == kDkDvRole && heads.phase > 0);
}

// Jobs for branches [first, last) in each of `roles`, tiles of `block_rows` own rows (queries, or
// keys for dk/dv blocks: in a ring step, the segments that meet the local queries or the step's
// keys). Sorted by the selected length of the branch's segments (each block's work grows with it),
// longest first; among equals the order of `roles` is kept (dk/dv blocks, which do more, first).
LaunchPlan make_plan(const DilatedParams& p, int first, int last, std::vector<int> roles, int block_rows,
                     bool accumulate, HeadFilter heads = {}) {
  struct Entry {
    Job job;
    std::int64_t length, blocks;
  };
  std::vector<Entry> entries;
  for (int role : roles)
    for (int i = first; i < last; ++i) {
      const detail::Branch& br = p.branches[i];
      if (br.head_count == 0) continue;
      const bool keys = role == kDkDvRole;
      const std::int64_t lo = keys ? p.key_begin : p.query_position, hi = keys ? p.key_end : p.query_position + p.seqlen;
      const std::int64_t w = br.segment_length;
      const std::int64_t length = ceil_div(std::min(w, hi - lo), br.dilation_rate);
      Job job;
      job.branch = i;
      job.role = role;
      job.tiles = int(std::max<std::int64_t>(1, ceil_div(length, block_rows)));
      job.first_segment = int(lo / w);
      job.segments = int((hi - 1) / w - lo / w + 1);
      // Decoding: each sequence's queries start at its own L - seqlen; counted from their first
      // segment (decode_block), seqlen positions span at most one segment more than from 0.
      if (p.key_lengths != nullptr) job.segments += 1;
      job.accumulate = job_accumulates(role, accumulate, heads);
      if (!filter_heads(job, br.first_head, br.head_count, heads)) continue;
      set_divisors(job, br.dilation_rate);
      entries.push_back({job, length, std::int64_t(job.tiles) * job.segments * job.head_count * p.batch});
    }
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.length > b.length; });
  LaunchPlan plan;
  std::int64_t total = 0, groups = 0;
  for (const Entry& e : entries) {
    plan.jobs[plan.num_jobs] = e.job;
    plan.jobs[plan.num_jobs].block_begin = int(total);
    plan.jobs[plan.num_jobs].group_begin = int(groups);
    plan.jobs[plan.num_jobs].dq_accumulate = accumulate;
    ++plan.num_jobs;
    total += e.blocks;
    groups += e.blocks / e.job.tiles;
    if (total > INT_MAX) throw Error("the problem needs more than 2^31 thread blocks in one launch; expected a smaller B, N or H");
  }
  plan.total_blocks = int(total);
  return plan;
}

// Block-sparse attention: one job per role, a block per tile of one own block (query blocks, or
// key blocks for dk/dv blocks, of the step's range) of one (batch, head).
LaunchPlan make_sparse_plan(const DilatedParams& p, std::vector<int> roles, int block_rows, bool accumulate,
                            HeadFilter heads = {}) {
  LaunchPlan plan;
  std::int64_t total = 0;
  for (int role : roles) {
    const bool keys = role == kDkDvRole;
    const std::int64_t lo = keys ? p.key_begin : p.query_position, hi = keys ? p.key_end : p.query_position + p.seqlen;
    Job& job = plan.jobs[plan.num_jobs++];
    job.role = role;
    job.tiles = int(ceil_div(std::min(p.block_size, hi - lo), block_rows));
    job.first_segment = int(lo / p.block_size);
    job.segments = int(ceil_div(hi, p.block_size) - lo / p.block_size);
    job.block_begin = int(total);
    job.accumulate = job_accumulates(role, accumulate, heads);
    filter_heads(job, 0, p.heads, heads);  // every phase < step <= H holds a head
    set_divisors(job, 1);
    total += std::int64_t(job.tiles) * job.segments * job.head_count * p.batch;
    if (total > INT_MAX) throw Error("the problem needs more than 2^31 thread blocks in one launch; expected a smaller B, N or H");
  }
  plan.total_blocks = int(total);
  return plan;
}

[[noreturn]] void unsupported_head_dim(std::int64_t d) {
#ifdef DATTN_CUDA_MINIMAL
  throw Error("head dim D = " + std::to_string(d) +
              " has no CUDA kernel in this build (DATTN_CUDA_MINIMAL builds D = 64 only); expected 64");
#else
  throw Error("head dim D = " + std::to_string(d) + " has no CUDA kernel; expected one of " +
              detail::cuda_head_dims_text());
#endif
}

template <class T, int S>
void forward_launch(const DilatedParams& p, const LaunchPlan& plan, cudaStream_t s) {
  switch (p.head_dim) {
#ifndef DATTN_CUDA_MINIMAL
    case 16: return launch_forward<T, 16, S>(p, plan, s);
    case 32: return launch_forward<T, 32, S>(p, plan, s);
    case 80: return launch_forward<T, 80, S>(p, plan, s);
    case 96: return launch_forward<T, 96, S>(p, plan, s);
    case 128: return launch_forward<T, 128, S>(p, plan, s);
#endif
    case 64: return launch_forward<T, 64, S>(p, plan, s);
    default: unsupported_head_dim(p.head_dim);
  }
}

template <class T, int S>
void backward_launch(const DilatedParams& p, const LaunchPlan& plan, cudaStream_t s) {
  switch (p.head_dim) {
#ifndef DATTN_CUDA_MINIMAL
    case 16: return launch_backward<T, 16, S>(p, plan, s);
    case 32: return launch_backward<T, 32, S>(p, plan, s);
    case 80: return launch_backward<T, 80, S>(p, plan, s);
    case 96: return launch_backward<T, 96, S>(p, plan, s);
    case 128: return launch_backward<T, 128, S>(p, plan, s);
#endif
    case 64: return launch_backward<T, 64, S>(p, plan, s);
    default: unsupported_head_dim(p.head_dim);
  }
}

#ifdef DATTN_WITH_SM90
// tma: the instances whose producer loads by TMA (builds with DATTN_SM90_TMA, calls
// sm90_tma_covers admits).
template <class T, bool Tma>
void forward_launch_sm90(const DilatedParams& p, int consumers, const LaunchPlan& plan, cudaStream_t s) {
#ifndef DATTN_CUDA_MINIMAL
  if (p.head_dim == 128) return launch_forward_sm90<T, 128, 2, Tma>(p, plan, s);
#endif
  // kernel_generation admits head dims 64 and 128 only
  if (consumers == 2) return launch_forward_sm90<T, 64, 2, Tma>(p, plan, s);
  return launch_forward_sm90<T, 64, 3, Tma>(p, plan, s);
}

template <class T>
void forward_launch_sm90(const DilatedParams& p, int consumers, bool tma, const LaunchPlan& plan, cudaStream_t s) {
#ifdef DATTN_WITH_SM90_TMA
  if (tma) return forward_launch_sm90<T, true>(p, consumers, plan, s);
#endif
  (void)tma;
  forward_launch_sm90<T, false>(p, consumers, plan, s);
}

template <class T, bool Tma>
void backward_launch_sm90(const DilatedParams& p, const LaunchPlan& plan, cudaStream_t s) {
#ifndef DATTN_CUDA_MINIMAL
  if (p.head_dim == 128) return launch_backward_sm90<T, 128, Tma>(p, plan, s);
#endif
  return launch_backward_sm90<T, 64, Tma>(p, plan, s);
}

// The backward's producer loads by TMA where sm90_backward_tma_covers admits the call (builds with
// DATTN_SM90_TMA), else by cp.async.
template <class T>
void backward_launch_sm90(const DilatedParams& p, const LaunchPlan& plan, cudaStream_t s) {
#ifdef DATTN_WITH_SM90_TMA
  if (sm90_backward_tma_covers(p)) return backward_launch_sm90<T, true>(p, plan, s);
#endif
  backward_launch_sm90<T, false>(p, plan, s);
}
#endif

// The sm90 kernels cover 16-bit calls of head dim 64 or 128 on a device of compute capability 9.x,
// in builds with DATTN_SM90.
bool sm90_covers(const DilatedParams& p) {
#ifdef DATTN_WITH_SM90
  if (p.dtype != DType::bfloat16 && p.dtype != DType::float16) return false;
#ifdef DATTN_CUDA_MINIMAL
  if (p.head_dim != 64) return false;
#else
  if (p.head_dim != 64 && p.head_dim != 128) return false;
#endif
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major == 9;
#else
  (void)p;
  return false;
#endif
}

// One launch per branch group: grouped mode puts every head in one branch, so one launch does all;
// longnet mode launches per branch, the later ones merging into (forward) or adding to (backward)
// what the earlier wrote. Block-sparse attention is one launch.
template <class Launch>
void launch_forward_plans(const DilatedParams& p, int rows, Launch launch) {
  const bool ring = p.float32_outputs;  // ring steps merge into what is there
  if (p.block_size > 0) return launch(make_sparse_plan(p, {kForwardRole}, rows, ring));
  if (p.mode == Mode::grouped) return launch(make_plan(p, 0, p.num_branches, {kForwardRole}, rows, ring));
  for (int i = 0; i < p.num_branches; ++i) launch(make_plan(p, i, i + 1, {kForwardRole}, rows, ring || i > 0));
}

#ifdef DATTN_WITH_SM90
// The GPU rounds (blocks / SMs, rounded up; one block per SM) of the sm90 forward's one-tile
// plans at `consumers` consumer warpgroups (64 query rows each): of blocks of one query tile, and
// of blocks of two at 0.965 a tile each (long256k on the H100 and the H200: 7920 tiles, 60 rounds
// against 30, 3.6 % faster; the block's start, its first tiles' latency and its end come once per
// two tiles), with the smallest launch's blocks. A group's odd last tile makes a block of its own,
// which fills the gaps of the rounds of two.
struct ForwardRounds {
  double one = 0, two = 0;
  int fewest_blocks = INT_MAX;
};

ForwardRounds sm90_forward_rounds(const DilatedParams& p, int consumers) {
  const int sms = multiprocessor_count();
  ForwardRounds r;
  launch_forward_plans(p, 64 * consumers, [&](const LaunchPlan& plan) {
    r.fewest_blocks = std::min(r.fewest_blocks, plan.total_blocks);
    r.one += double(ceil_div(plan.total_blocks, sms));
    r.two += 2 * 0.965 * double(ceil_div(plan.total_blocks, 2 * sms));
  });
  return r;
}

// The most query tiles a block of the sm90 forward can work through (LaunchPlan::passes): on the
// TMA instances' dilated walk without causality (a causal block's later tile sees more keys), rows
// in order or under an index map, their query buffers' count (Sm90ForwardShape::kQBuffers: 3 at
// head dim 64, 2 at 128), else 1.
int sm90_forward_max_passes(const DilatedParams& p, bool tma) {
  if (!tma || p.causal || p.block_size > 0) return 1;
  return p.head_dim <= 64 ? 3 : 2;
}

// The sm90 forward's block: its consumer warpgroups and the query tiles it works through.
struct Sm90ForwardBlock {
  int consumers, passes;
};

// Options' sm90_forward_rows and sm90_forward_passes where given (check_supported admitted them).
// Else consumers: at head dim 64 three, unless two take fewer GPU rounds' worth of time (a row of a
// three-consumer block costs 0.87 of a two-consumer one's: their long256k times on the H100), so
// seed's 168 blocks of 192 rows (two rounds) become 224 of 128; two at 128. Passes: two where they
// fit, every launch keeps at least four blocks of two tiles per SM, and they take fewer rounds'
// worth of time; so long64k's 1980 tiles keep one a block: 15 whole rounds against 8 of two (7.5 of
// work; the last one half full), which measured 6 % slower under an index map.
Sm90ForwardBlock sm90_forward_block(const DilatedParams& p, bool tma) {
  Sm90ForwardBlock block{p.head_dim == 64 ? 3 : 2, 1};
  std::optional<ForwardRounds> rounds;  // the chosen consumers' (walked once)
  if (p.sm90_forward_rows > 0) {
    block.consumers = p.sm90_forward_rows / 64;
  } else if (block.consumers == 3) {
    const ForwardRounds three = sm90_forward_rounds(p, 3), two = sm90_forward_rounds(p, 2);
    if (three.one * 192 * 0.87 > two.one * 128) block.consumers = 2;
    rounds = block.consumers == 3 ? three : two;
  }
  if (p.sm90_forward_passes != 0) {
    block.passes = p.sm90_forward_passes;
  } else if (sm90_forward_max_passes(p, tma) >= 2) {
    if (!rounds) rounds = sm90_forward_rounds(p, block.consumers);
    block.passes = rounds->fewest_blocks >= 8 * multiprocessor_count() && rounds->two < rounds->one ? 2 : 1;
  }
  return block;
}
#endif

template <class T, int S>
void run_forward(const DilatedParams& p) {
  const auto stream = static_cast<cudaStream_t>(p.stream);
#ifdef DATTN_WITH_SM90
  if constexpr (S == 1) {
    if (kernel_generation(p, false) == CudaKernels::sm90) {
#ifdef DATTN_WITH_SM90_TMA
      const bool tma = sm90_tma_covers(p);
#else
      const bool tma = false;
#endif
      const Sm90ForwardBlock block = sm90_forward_block(p, tma);
      return launch_forward_plans(p, 64 * block.consumers * block.passes, [&](LaunchPlan plan) {
        plan.passes = block.passes;
        forward_launch_sm90<T>(p, block.consumers, tma, plan, stream);
      });
    }
  }
#endif
  launch_forward_plans(p, ForwardShape<64, S>::kBlockM,  // the same rows for every head dim
                       [&](const LaunchPlan& plan) { forward_launch<T, S>(p, plan, stream); });
}

// As launch_forward_plans, for the backward's two roles (each later launch adds to the gradients).
// Under grouped-query heads one launch per query head of a key/value head's group (heads.phase):
// the query heads of one key/value head add into its dk, dv rows one launch after another (ring
// steps too: their float32 dk, dv have the Hkv heads of the step's keys, and every launch adds).
// `roles`: both, or the dk/dv blocks alone (the sm90 backward with dQ by atomics).
template <class Launch>
void launch_backward_plans(const DilatedParams& p, int rows, Launch launch,
                           const std::vector<int>& roles = {kDkDvRole, kDqRole}) {
  const bool ring = p.float32_outputs;  // ring steps add into the accumulators
  const int group = int(p.heads / p.kv_heads);
  auto run = [&](const LaunchPlan& plan) {
    if (plan.total_blocks > 0) launch(plan);
  };
  for (int phase = 0; phase < group; ++phase) {
    const HeadFilter heads{phase, group};
    if (p.block_size > 0) {
      run(make_sparse_plan(p, roles, rows, ring, heads));
    } else if (p.mode == Mode::grouped) {
      run(make_plan(p, 0, p.num_branches, roles, rows, ring, heads));
    } else {
      for (int i = 0; i < p.num_branches; ++i) run(make_plan(p, i, i + 1, roles, rows, ring || i > 0, heads));
    }
  }
}

#ifdef DATTN_WITH_SM90
// Whether the sm90 backward forms dQ by atomics (BackwardDq; the caller checked the generation).
// automatic takes them from 2^19 query rows (batch × length × heads) up: measured on the H100, they
// save 15 % of long256k's fwd+bwd (3.1M rows) but cost 8 % at seed's 49k (the dq blocks then fill
// the GPU beside the dk/dv blocks, and the scratch's allocation and zeroing weigh more).
bool atomic_dq(const DilatedParams& p) {
  if (p.block_size > 0) return false;
  if (p.sm90_backward_dq == BackwardDq::automatic) return p.batch * p.seqlen * p.heads >= (std::int64_t(1) << 19);
  return p.sm90_backward_dq == BackwardDq::atomic;
}

// The scratch of dQ by atomics: a slot per group in flight, of the longest query side a group of
// the call selects (rows) × D floats, then the slots' counters. Stream-ordered (cudaMallocAsync,
// zeroed once: the kernel zeroes a slot after converting it), freed on scope exit in stream order.
struct DqScratch {
  float* data = nullptr;
  cudaStream_t stream = nullptr;
  DqScratch(std::size_t bytes, cudaStream_t s) : stream(s) {
    void* raw = nullptr;
    if (const cudaError_t e = cudaMallocAsync(&raw, bytes, s); e != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error("dattn: the backward's dQ scratch of " + std::to_string(bytes) +
                               " bytes (cudaMallocAsync) failed: " + cudaGetErrorString(e));
    }
    data = static_cast<float*>(raw);
    if (const cudaError_t e = cudaMemsetAsync(raw, 0, bytes, s); e != cudaSuccess) {
      cudaFreeAsync(raw, s);
      throw std::runtime_error(std::string("dattn: zeroing the backward's dQ scratch failed: ") + cudaGetErrorString(e));
    }
  }
  ~DqScratch() { cudaFreeAsync(data, stream); }
  DqScratch(const DqScratch&) = delete;
  DqScratch& operator=(const DqScratch&) = delete;
};

// The most own (key) tiles a dk/dv block of the sm90 backward with dQ by atomics can work through
// (LaunchPlan::passes): two on the TMA instances' dilated walk without causality at head dim 64
// (Sm90BackwardShape::kOwnBuffers), else 1.
int sm90_backward_max_passes(const DilatedParams& p) {
#ifdef DATTN_WITH_SM90_TMA
  const bool tma = sm90_backward_tma_covers(p);
#else
  const bool tma = false;
#endif
  return tma && atomic_dq(p) && !p.causal && p.block_size == 0 && p.position_index == nullptr && p.head_dim <= 64
             ? 2
             : 1;
}

// Own tiles a dk/dv block works through with dQ by atomics: options' sm90_backward_passes, else two
// where they fit and every launch keeps at least four blocks per SM (as the forward's passes).
int sm90_backward_passes(const DilatedParams& p) {
  if (p.sm90_backward_passes != 0) return p.sm90_backward_passes;  // check_supported admitted it
  if (sm90_backward_max_passes(p) < 2) return 1;
  int fewest = INT_MAX;
  launch_backward_plans(p, Sm90BackwardShape<64>::kBlockOwn,
                        [&](const LaunchPlan& plan) { fewest = std::min(fewest, plan.total_blocks); }, {kDkDvRole});
  return fewest >= 4 * multiprocessor_count() ? 2 : 1;
}

template <class T>
void run_backward_atomic_dq(const DilatedParams& params, cudaStream_t stream) {
  const int passes = sm90_backward_passes(params);
  const int rows = Sm90BackwardShape<64>::kBlockOwn * passes;
  std::int64_t slot_rows = 1, groups = 1;
  const std::int64_t query_range = params.seqlen;  // [query_position, + seqlen): every segment's queries lie in it
  for (int i = 0; i < params.num_branches; ++i) {
    const detail::Branch& br = params.branches[i];
    if (br.head_count > 0)
      slot_rows = std::max(slot_rows, ceil_div(std::min(br.segment_length, query_range), br.dilation_rate));
  }
  launch_backward_plans(params, rows, [&](const LaunchPlan& plan) {
    std::int64_t g = 0;
    for (int j = 0; j < plan.num_jobs; ++j) g += std::int64_t(plan.jobs[j].segments) * plan.jobs[j].head_count * params.batch;
    groups = std::max(groups, g);
  }, {kDkDvRole});
  // Slots: two per SM (a group's blocks run together, so more slots than groups in flight only
  // cost memory), at most the groups of the largest launch and as many as 256 MiB hold.
  const std::size_t slot_bytes = std::size_t(slot_rows) * std::size_t(params.head_dim) * sizeof(float);
  const int sms = multiprocessor_count();
  const std::int64_t slots = std::clamp<std::int64_t>(
      std::min(std::int64_t((std::size_t(256) << 20) / slot_bytes), std::int64_t(2 * sms)), 1, groups);
  const std::size_t counter_bytes = (std::size_t(slots) * 2 + 1) * sizeof(int);  // arrivals, conversions, ticket
  DqScratch scratch(std::size_t(slots) * slot_bytes + counter_bytes, stream);
  DilatedParams p = params;
  p.dq_scratch = scratch.data;
  p.dq_scratch_rows = slot_rows;
  p.dq_counters = reinterpret_cast<int*>(scratch.data + slots * slot_rows * params.head_dim);
  p.dq_slots = int(slots);
  launch_backward_plans(p, rows, [&](LaunchPlan plan) {
    if (const cudaError_t e = cudaMemsetAsync(p.dq_counters, 0, counter_bytes, stream); e != cudaSuccess)
      throw std::runtime_error(std::string("dattn: zeroing the backward's dQ counters failed: ") + cudaGetErrorString(e));
    plan.passes = passes;
    backward_launch_sm90<T>(p, plan, stream);
  }, {kDkDvRole});
}
#endif

template <class T, int S>
void run_backward(const DilatedParams& p) {
  const auto stream = static_cast<cudaStream_t>(p.stream);
#ifdef DATTN_WITH_SM90
  if constexpr (S == 1) {
    if (kernel_generation(p, true) == CudaKernels::sm90) {
      if (atomic_dq(p)) return run_backward_atomic_dq<T>(p, stream);
      return launch_backward_plans(p, Sm90BackwardShape<64>::kBlockOwn,
                                   [&](const LaunchPlan& plan) { backward_launch_sm90<T>(p, plan, stream); });
    }
  }
#endif
  const int rows = p.head_dim > 64 ? BackwardShape<128, S>::kBlockOwn : BackwardShape<64, S>::kBlockOwn;
  launch_backward_plans(p, rows, [&](const LaunchPlan& plan) { backward_launch<T, S>(p, plan, stream); });
}

// A packed batch is planned as `batch` sequences of max_seqlen rows; each block finds its
// sequence's rows in cu_seqlens (decode_block) and does nothing past its end.
DilatedParams as_launched(const DilatedParams& p) {
  if (p.cu_seqlens == nullptr) return p;
  DilatedParams launched = p;
  launched.seqlen = launched.global_length = launched.key_end = p.max_seqlen;
  return launched;
}

// A device index map must be a permutation of [0, N) like a host one (validate.cpp checks those):
// copied to the host in stream order and checked once per call (a synchronisation).
void check_position_index(const DilatedParams& p) {
  if (p.position_index == nullptr || p.position_index_checked) return;
  std::vector<std::int64_t> index(std::size_t(p.seqlen));
  const auto stream = static_cast<cudaStream_t>(p.stream);
  if (cudaMemcpyAsync(index.data(), p.position_index, index.size() * sizeof(std::int64_t), cudaMemcpyDeviceToHost,
                      stream) != cudaSuccess ||
      cudaStreamSynchronize(stream) != cudaSuccess)
    throw Error("position_index could not be read from the device; expected an [N] int64 tensor on the device of q");
  std::vector<bool> seen(index.size(), false);
  for (std::size_t i = 0; i < index.size(); ++i) {
    const std::int64_t row = index[i];
    if (row < 0 || row >= p.seqlen || seen[std::size_t(row)])
      throw Error("position_index[" + std::to_string(i) + "] = " + std::to_string(row) +
                  "; expected a permutation of [0, " + std::to_string(p.seqlen) + ")");
    seen[std::size_t(row)] = true;
  }
}

}  // namespace

CudaKernels kernel_generation(const DilatedParams& p, bool backward) {
  const bool sm90 = sm90_covers(p);
  switch (p.cuda_kernels) {
    case CudaKernels::automatic: return sm90 ? CudaKernels::sm90 : CudaKernels::sm80;
    case CudaKernels::sm80: return CudaKernels::sm80;
    case CudaKernels::sm90: break;
  }
  if (!sm90)
    throw Error(std::string("options.cuda_kernels = sm90, but the sm90 kernels do not cover this call (") +
                dtype_name(p.dtype) + ", head dim " + std::to_string(p.head_dim) + (backward ? ", backward" : ", forward") +
                "); expected a build with DATTN_SM90, a device of compute capability 9.x, bfloat16 or float16, head dim "
                "64 or 128");
  return CudaKernels::sm90;
}

bool forward_uses_tma(const DilatedParams& p) {
#ifdef DATTN_WITH_SM90_TMA
  return kernel_generation(p, false) == CudaKernels::sm90 && sm90_tma_covers(p);
#else
  (void)p;
  return false;
#endif
}

bool backward_uses_tma(const DilatedParams& p) {
#ifdef DATTN_WITH_SM90_TMA
  return kernel_generation(p, true) == CudaKernels::sm90 && sm90_backward_tma_covers(p);
#else
  (void)p;
  return false;
#endif
}

namespace {
// options.sm90_backward_dq = atomic names a way of the sm90 backward: refused where it cannot run
// (also by forward, which the same options reach from an autograd function). dq_blocks, the
// reproducible way, is what every other backward does.
void check_backward_dq(const DilatedParams& p) {
  if (p.sm90_backward_dq != BackwardDq::atomic) return;
  const std::string option = "options.sm90_backward_dq = atomic";
  if (kernel_generation(p, true) != CudaKernels::sm90)
    throw Error(option + ", but the sm80 kernels run this backward; expected automatic or dq_blocks");
  if (p.block_size > 0)
    throw Error(option + " for block-sparse attention, whose backward has dq blocks only; expected automatic or "
                "dq_blocks");
}
}  // namespace

// Paths of later issues that the CUDA kernels do not read yet: refused, never ignored.
void check_supported(const DilatedParams& p) {
  check_backward_dq(p);
  if (p.sm90_forward_rows != 0) {
    const std::string rows = "options.sm90_forward_rows = " + std::to_string(p.sm90_forward_rows);
    if (p.sm90_forward_rows != 128 && p.sm90_forward_rows != 192)
      throw Error(rows + "; expected 0 (chosen per call), 128 or 192");
    if (p.sm90_forward_rows == 192 && p.head_dim != 64)
      throw Error(rows + " with head dim " + std::to_string(p.head_dim) + "; expected 128 (192 rows need head dim 64)");
    if (kernel_generation(p, false) != CudaKernels::sm90)
      throw Error(rows + ", but the sm80 kernels run this call; expected 0");
  }
  if (p.sm90_forward_passes != 0) {
    const std::string passes = "options.sm90_forward_passes = " + std::to_string(p.sm90_forward_passes);
    if (p.sm90_forward_passes < 1 || p.sm90_forward_passes > 3)
      throw Error(passes + "; expected 0 (chosen per call), 1, 2 or 3");
    if (kernel_generation(p, false) != CudaKernels::sm90)
      throw Error(passes + ", but the sm80 kernels run this call; expected 0");
#ifdef DATTN_WITH_SM90
    if (const int most = sm90_forward_max_passes(p, forward_uses_tma(p)); p.sm90_forward_passes > most)
      throw Error(passes + "; expected at most " + std::to_string(most) +
                  (most == 1 ? " (more need the TMA instances' dilated walk without causality: no block-sparse "
                               "mask or causality, and tensors the TMA loads take)"
                             : " at head dim " + std::to_string(p.head_dim)));
#endif
  }
  if (p.sm90_backward_passes != 0) {
    const std::string passes = "options.sm90_backward_passes = " + std::to_string(p.sm90_backward_passes);
    if (p.sm90_backward_passes < 1 || p.sm90_backward_passes > 2)
      throw Error(passes + "; expected 0 (chosen per call), 1 or 2");
    if (p.dout.data != nullptr) {  // a backward call (forward calls leave the option to their backward)
      if (kernel_generation(p, true) != CudaKernels::sm90)
        throw Error(passes + ", but the sm80 kernels run this backward; expected 0");
#ifdef DATTN_WITH_SM90
      if (p.sm90_backward_passes > sm90_backward_max_passes(p))
        throw Error(passes + "; expected at most 1 (two need dQ by atomics, the TMA loads, the dilated walk without "
                             "causality and head dim 64)");
#endif
    }
  }
  const bool ring_step = !p.whole_sequence();
  if (ring_step && !p.float32_outputs)
    throw Error("options.ring_step with CUDA tensors: forward writes no per-step output on CUDA; expected "
                "ring_forward_step (which merges the step into float32 out and lse) or cpu tensors");
  if (p.cu_seqlens != nullptr && p.block_size > 0)
    throw Error("cu_seqlens: packed variable-length batches of block-sparse attention are not yet supported on "
                "CUDA; expected cpu tensors (dilated attention's packed batches run on CUDA)");
  if (!p.run_query_pass || !p.run_key_pass || p.accumulate)
    throw Error("the two-sweep ring backward steps (ring_query_gradients, ring_key_gradients) run on cpu tensors; "
                "expected ring_step_gradients for CUDA tensors");
}

std::shared_ptr<const std::int64_t> upload(const std::vector<std::int64_t>& values, int device) {
  int previous = 0;
  cudaGetDevice(&previous);
  if (cudaSetDevice(device) != cudaSuccess)
    throw Error("cannot use CUDA device " + std::to_string(device) + "; expected a device index below cudaGetDeviceCount");
  std::int64_t* data = nullptr;
  const std::size_t bytes = std::max<std::size_t>(1, values.size()) * sizeof(std::int64_t);
  cudaError_t status = cudaMalloc(&data, bytes);
  if (status == cudaSuccess && !values.empty())
    status = cudaMemcpy(data, values.data(), values.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice);
  cudaSetDevice(previous);
  if (status != cudaSuccess) {
    cudaFree(data);
    throw std::runtime_error(std::string("dattn: uploading ") + std::to_string(bytes) + " bytes to CUDA device " +
                             std::to_string(device) + " failed: " + cudaGetErrorString(status));
  }
  return {data, [](const std::int64_t* x) { cudaFree(const_cast<std::int64_t*>(x)); }};
}

void copy_to_host(const void* device_data, void* host, std::size_t bytes, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (cudaMemcpyAsync(host, device_data, bytes, cudaMemcpyDeviceToHost, s) != cudaSuccess || cudaStreamSynchronize(s) != cudaSuccess)
    throw Error("copying " + std::to_string(bytes) + " bytes from the device failed: " +
                cudaGetErrorString(cudaGetLastError()) + "; expected device memory of the current device");
}

void append_to_cache(const TensorView& k_new, const TensorView& v_new, const TensorView& k_cache,
                     const TensorView& v_cache, const std::int32_t* lengths, void* stream) {
  DeviceGuard guard(k_cache.data);
  append_rows(k_new, v_new, k_cache, v_cache, lengths, stream);
}

void forward(const DilatedParams& params) {
  check_supported(params);
  DeviceGuard guard(params.q.data);
  check_position_index(params);
  const DilatedParams p = as_launched(params);
  switch (p.dtype) {
    case DType::bfloat16: return run_forward<__nv_bfloat16, 1>(p);
    case DType::float16: return run_forward<__half, 1>(p);
    case DType::float32: return p.use_tf32 ? run_forward<float, 2>(p) : run_forward<float, 3>(p);
    default: throw Error(std::string("dtype ") + dtype_name(p.dtype) + " has no CUDA kernel; expected float32, bfloat16 or float16");
  }
}

void backward(const DilatedParams& params) {
  check_supported(params);
  DeviceGuard guard(params.q.data);
  check_position_index(params);
  const DilatedParams p = as_launched(params);
  switch (p.dtype) {
    case DType::bfloat16: return run_backward<__nv_bfloat16, 1>(p);
    case DType::float16: return run_backward<__half, 1>(p);
    case DType::float32: return p.use_tf32 ? run_backward<float, 2>(p) : run_backward<float, 3>(p);
    default: throw Error(std::string("dtype ") + dtype_name(p.dtype) + " has no CUDA kernel; expected float32, bfloat16 or float16");
  }
}

}  // namespace dattn::cuda
