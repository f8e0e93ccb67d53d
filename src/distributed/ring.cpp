// The ring schedule over any Communicator. At step t a rank sends keys and values straight to
// rank + t and receives those of rank − t (point to point, no relaying). What travels is the
// (row, head) entries the receiver's queries need (ring_transfer_entries): nothing when two ranks
// share no segment, and of a dilated branch only the rows it selects. Two buffers each way let
// step t + 1 travel while step t computes. Every pair of (query chunk, key chunk) runs one ring
// step of the kernels and merge_partial combines them. The backward repeats the exchange twice:
// once for the queries' sums (dq), once for dk, dv, which go back to the keys' owner packed the
// same way.
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <optional>

#include "dattn/attention.hpp"
#include "dattn/block_sparse.hpp"
#include "dattn/error.hpp"
#include "dattn/ring.hpp"
#include "distributed/schedule.hpp"
#include "validate.hpp"

namespace dattn {
namespace {

using detail::check_layout;
using detail::Entries;
using detail::Rows;
using detail::Schedule;
using detail::Keys;
using detail::Step;
using detail::StepMask;
using detail::step_mask;
using Clock = std::chrono::steady_clock;

// Calls f(offset in from, offset in to) for every element of two views of one shape.
template <class F>
void for_each_pair(const TensorView& from, const TensorView& to, F&& f) {
  std::int64_t index[kMaxRank] = {};
  for (std::int64_t n = 0; n < from.numel(); ++n) {
    std::int64_t a = 0, b = 0;
    for (int d = 0; d < from.rank; ++d) a += index[d] * from.strides[d], b += index[d] * to.strides[d];
    f(a, b);
    for (int d = from.rank - 1; d >= 0 && ++index[d] == from.shape[d]; --d) index[d] = 0;
  }
}

// to = from, same dtype, any strides.
void copy(const TensorView& from, const TensorView& to) {
  const std::size_t element = dtype_size(from.dtype);
  for_each_pair(from, to, [&](std::int64_t a, std::int64_t b) {
    std::memcpy(static_cast<std::byte*>(to.data) + b * element, static_cast<const std::byte*>(from.data) + a * element,
                element);
  });
}

// to = from (float32) in to's dtype, any strides.
void convert(const TensorView& from, const TensorView& to) {
  for_each_pair(from, to, [&](std::int64_t a, std::int64_t b) { detail::store_float(to, b, from.ptr<float>()[a]); });
}

// The D-vector of entry e = row·H + head of a [B, rows, H, D] view (D stride 1), batch b.
std::byte* entry(const TensorView& t, std::int64_t b, std::int64_t e) {
  const std::int64_t H = t.shape[2];
  return static_cast<std::byte*>(t.data) +
         (b * t.strides[0] + (e / H) * t.strides[1] + (e % H) * t.strides[2]) * std::int64_t(dtype_size(t.dtype));
}

// The wire format of one transfer: for each tensor, [B, entries, D] in its dtype, then the key
// padding mask [B, rows] whole (one byte a row, small beside the keys).
std::size_t packed_bytes(const TensorView& like, std::size_t tensors, std::size_t entries, bool with_mask) {
  const std::size_t row = std::size_t(like.shape[3]) * dtype_size(like.dtype);
  return tensors * std::size_t(like.shape[0]) * entries * row +
         (with_mask ? std::size_t(like.shape[0] * like.shape[1]) : 0);
}

void pack(const std::vector<TensorView>& tensors, const TensorView* mask, const Entries& entries, std::byte* out) {
  for (const TensorView& t : tensors) {
    const std::size_t row = std::size_t(t.shape[3]) * dtype_size(t.dtype);
    for (std::int64_t b = 0; b < t.shape[0]; ++b)
      for (const std::int64_t e : entries) out = static_cast<std::byte*>(std::memcpy(out, entry(t, b, e), row)) + row;
  }
  if (mask) copy(*mask, make_view(out, DType::boolean, {mask->shape[0], mask->shape[1]}));
}

// Writes a packed transfer into contiguous tensors and mask; the entries that did not travel are
// zero (no branch reads them, and zeros keep any stray read finite).
void unpack(const std::byte* in, const Entries& entries, const std::vector<TensorView>& tensors, const TensorView* mask) {
  for (const TensorView& t : tensors) {
    const std::size_t row = std::size_t(t.shape[3]) * dtype_size(t.dtype);
    std::memset(t.data, 0, std::size_t(t.numel()) * dtype_size(t.dtype));
    for (std::int64_t b = 0; b < t.shape[0]; ++b)
      for (const std::int64_t e : entries) std::memcpy(entry(t, b, e), in, row), in += row;
  }
  if (mask) copy(make_view(const_cast<std::byte*>(in), DType::boolean, {mask->shape[0], mask->shape[1]}), *mask);
}

// Adds a packed float32 transfer into contiguous float32 tensors.
void unpack_add(const std::byte* in, const Entries& entries, const std::vector<TensorView>& tensors) {
  const auto* x = reinterpret_cast<const float*>(in);
  for (const TensorView& t : tensors)
    for (std::int64_t b = 0; b < t.shape[0]; ++b)
      for (const std::int64_t e : entries) {
        auto* y = reinterpret_cast<float*>(entry(t, b, e));
        for (std::int64_t d = 0; d < t.shape[3]; ++d) y[d] += *x++;
      }
}

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Runs body(source, its keys) for every source whose keys this rank needs, its own first; after
// each step, after_step(t, step). The keys of step t + 1 are sent and received while step t
// computes: two buffers each way.
template <class Body, class AfterStep>
void for_each_source(Communicator& comm, const Schedule& schedule, const Keys& own, int tag, RingStats& stats,
                     Body&& body, AfterStep&& after_step) {
  const TensorView& k = own.k;
  const std::int64_t B = k.shape[0], n = k.shape[1], H = k.shape[2], D = k.shape[3];
  const bool with_mask = own.mask.has_value();
  Tensor block = Tensor::empty({2, B, n, H, D}, k.dtype), block_mask = Tensor::empty({B, n}, DType::boolean);
  const Keys received{block.view().select(0, 0), block.view().select(0, 1),
                      with_mask ? std::optional(block_mask.view()) : std::nullopt};
  Step steps[2];
  std::vector<std::byte> send_buffer[2], receive_buffer[2];
  int sends[2] = {-1, -1}, receives[2] = {-1, -1};
  auto post = [&](int t) {
    if (t >= schedule.P) return;
    const int slot = t % 2;
    comm.wait(sends[slot]);  // step t − 2's send, before its buffer is reused
    sends[slot] = receives[slot] = -1;
    const Step& s = steps[slot] = schedule.step(t);
    if (!s.incoming.empty()) {
      receive_buffer[slot].resize(packed_bytes(k, 2, s.incoming.size(), with_mask));
      receives[slot] = comm.irecv(receive_buffer[slot].data(), receive_buffer[slot].size(), s.source, tag);
    }
    if (!s.outgoing.empty()) {
      send_buffer[slot].resize(packed_bytes(k, 2, s.outgoing.size(), with_mask));
      pack({own.k, own.v}, own.mask ? &*own.mask : nullptr, s.outgoing, send_buffer[slot].data());
      sends[slot] = comm.isend(send_buffer[slot].data(), send_buffer[slot].size(), s.dest, tag);
      stats.bytes_sent += std::int64_t(send_buffer[slot].size());
      ++stats.transfers;
    }
  };
  auto start = Clock::now();
  const Step own_step = schedule.step(0);
  post(1);
  if (!own_step.incoming.empty()) body(schedule.rank, own);
  after_step(0, own_step);
  stats.compute_seconds += seconds_since(start);
  for (int t = 1; t < schedule.P; ++t) {
    post(t + 1);
    const Step& s = steps[t % 2];
    if (!s.incoming.empty()) {
      start = Clock::now();
      comm.wait(receives[t % 2]);
      stats.wait_seconds += seconds_since(start);
      stats.bytes_received += std::int64_t(receive_buffer[t % 2].size());
      start = Clock::now();
      unpack(receive_buffer[t % 2].data(), s.incoming, {received.k, received.v}, with_mask ? &*received.mask : nullptr);
      body(s.source, received);
      stats.compute_seconds += seconds_since(start);
    }
    start = Clock::now();
    after_step(t, s);
    stats.compute_seconds += seconds_since(start);
  }
  comm.wait(sends[0]);
  comm.wait(sends[1]);
}

// What the CPU engine runs at each step, for one attention kind (dilated or block-sparse): the
// forward step and the backward's two sweeps. `mask` is the step's keys' padding mask, if any.
struct StepKernels {
  std::function<void(const StepMask&, const RingStep&, const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out, const TensorView& lse)>
      forward;
  std::function<void(const StepMask&, const RingStep&, const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& dout, const TensorView& lse, const RingQueryGradients& sums)>
      query_gradients;
  std::function<void(const RingQueryGradients& sums, const TensorView& dq)> finish;
  std::function<void(const StepMask&, const RingStep&, const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& dout, const TensorView& lse, const TensorView& delta, const TensorView& dk,
                     const TensorView& dv)>
      key_gradients;
};

StepKernels step_kernels(const DilatedConfig& config) {
  auto with = [&config](const StepMask& mask) {
    DilatedConfig c = config;
    c.key_padding_mask = mask;
    return c;
  };
  return {[with](const StepMask& m, const RingStep& s, const TensorView& q, const TensorView& k, const TensorView& v,
                 const TensorView& out, const TensorView& lse) {
            LaunchOptions options;
            options.ring_step = s;
            forward(with(m), q, k, v, out, lse, options);
          },
          [with](const StepMask& m, const RingStep& s, const TensorView& q, const TensorView& k, const TensorView& v,
                 const TensorView& dout, const TensorView& lse, const RingQueryGradients& sums) {
            ring_query_gradients(with(m), s, q, k, v, dout, lse, sums);
          },
          [&config](const RingQueryGradients& sums, const TensorView& dq) { ring_finish_query_gradients(config, sums, dq); },
          [with](const StepMask& m, const RingStep& s, const TensorView& q, const TensorView& k, const TensorView& v,
                 const TensorView& dout, const TensorView& lse, const TensorView& delta, const TensorView& dk,
                 const TensorView& dv) { ring_key_gradients(with(m), s, q, k, v, dout, lse, delta, dk, dv); }};
}

StepKernels step_kernels(const BlockSparseConfig& config, const BlockSparseMask& block_mask) {
  auto with = [&config](const StepMask& mask) {
    BlockSparseConfig c = config;
    c.key_padding_mask = mask;
    return c;
  };
  return {[with, &block_mask](const StepMask& m, const RingStep& s, const TensorView& q, const TensorView& k,
                              const TensorView& v, const TensorView& out, const TensorView& lse) {
            LaunchOptions options;
            options.ring_step = s;
            block_sparse_forward(with(m), block_mask, q, k, v, out, lse, options);
          },
          [with, &block_mask](const StepMask& m, const RingStep& s, const TensorView& q, const TensorView& k,
                              const TensorView& v, const TensorView& dout, const TensorView& lse,
                              const RingQueryGradients& sums) {
            block_sparse_ring_query_gradients(with(m), block_mask, s, q, k, v, dout, lse, sums);
          },
          [&config](const RingQueryGradients& sums, const TensorView& dq) {
            block_sparse_ring_finish_query_gradients(config, sums, dq);
          },
          [with, &block_mask](const StepMask& m, const RingStep& s, const TensorView& q, const TensorView& k,
                              const TensorView& v, const TensorView& dout, const TensorView& lse,
                              const TensorView& delta, const TensorView& dk, const TensorView& dv) {
            block_sparse_ring_key_gradients(with(m), block_mask, s, q, k, v, dout, lse, delta, dk, dv);
          }};
}

#ifdef DATTN_WITH_CUDA
detail::CudaStepKernels cuda_step_kernels(const DilatedConfig& config) {
  auto with = [&config](const StepMask& mask) {
    DilatedConfig c = config;
    c.key_padding_mask = mask;
    return c;
  };
  return {[with](const StepMask& m, const RingStep& s, const TensorView& q, const TensorView& k, const TensorView& v,
                 const TensorView& out, const TensorView& lse,
                 void* stream) { ring_forward_step(with(m), s, q, k, v, out, lse, stream); },
          [with](const StepMask& m, const RingStep& s, const TensorView& q, const TensorView& k, const TensorView& v,
                 const TensorView& dout, const TensorView& lse, const TensorView& delta, const TensorView& dq,
                 const TensorView& dk, const TensorView& dv, void* stream) {
            ring_step_gradients(with(m), s, q, k, v, dout, lse, delta, dq, dk, dv, stream);
          }};
}

detail::CudaStepKernels cuda_step_kernels(const BlockSparseConfig& config, const BlockSparseMask& block_mask) {
  auto with = [&config](const StepMask& mask) {
    BlockSparseConfig c = config;
    c.key_padding_mask = mask;
    return c;
  };
  return {[with, &block_mask](const StepMask& m, const RingStep& s, const TensorView& q, const TensorView& k,
                              const TensorView& v, const TensorView& out, const TensorView& lse, void* stream) {
            block_sparse_ring_forward_step(with(m), block_mask, s, q, k, v, out, lse, stream);
          },
          [with, &block_mask](const StepMask& m, const RingStep& s, const TensorView& q, const TensorView& k,
                              const TensorView& v, const TensorView& dout, const TensorView& lse,
                              const TensorView& delta, const TensorView& dq, const TensorView& dk, const TensorView& dv,
                              void* stream) {
            block_sparse_ring_step_gradients(with(m), block_mask, s, q, k, v, dout, lse, delta, dq, dk, dv, stream);
          }};
}
#endif

// The heads of branch i and the offset each uses (docs/semantics.md: grouped, group i's heads with offset
// i mod r; longnet, every head h with offset h mod r).
std::vector<std::pair<std::int64_t, std::int64_t>> branch_heads(const DilatedConfig& config, std::size_t i,
                                                                std::int64_t H) {
  const std::int64_t G = std::int64_t(config.segment_lengths.size()), r = config.dilation_rates[i];
  std::vector<std::pair<std::int64_t, std::int64_t>> heads;
  if (config.mode == Mode::longnet) {
    for (std::int64_t h = 0; h < H; ++h) heads.push_back({h, h % r});
    return heads;
  }
  std::int64_t first = 0;
  for (std::int64_t g = 0; g < std::int64_t(i); ++g) first += H / G + (g < H % G);
  for (std::int64_t h = first; h < first + H / G + (std::int64_t(i) < H % G); ++h) heads.push_back({h, std::int64_t(i) % r});
  return heads;
}

}  // namespace

std::vector<std::pair<std::int64_t, std::int64_t>> ring_rows(std::int64_t N, int P, int rank, Layout layout) {
  if (P < 1 || rank < 0 || rank >= P) throw Error("rank " + std::to_string(rank) + " of " + std::to_string(P) + " ranks");
  const std::int64_t parts = layout == Layout::zigzag ? 2 * std::int64_t(P) : P;
  if (N < parts || N % parts != 0)
    throw Error("sequence length " + std::to_string(N) + " is not divisible by " + std::to_string(parts) +
                (layout == Layout::zigzag ? " (2P, zigzag layout)" : " (P, contiguous layout)"));
  const std::int64_t c = N / parts;
  if (layout == Layout::contiguous) return {{rank * c, (rank + 1) * c}};
  return {{rank * c, (rank + 1) * c}, {(parts - 1 - rank) * c, (parts - rank) * c}};
}

namespace {

void check_sequence_tensor(const char* name, const TensorView& x, int dim) {
  if (dim < 0 || dim >= x.rank)
    throw Error(std::string("dim = ") + std::to_string(dim) + "; expected a dimension of " + name + " " +
                x.shape_string());
  if (x.device.type != DeviceType::cpu)
    throw Error(std::string(name) + " is on " + device_name(x.device) + "; expected cpu");
}

std::vector<std::int64_t> shape_of(const TensorView& x) { return {x.shape.begin(), x.shape.begin() + x.rank}; }

}  // namespace

Tensor shard_sequence(const TensorView& x, int rank, int ranks, Layout layout, int dim) {
  check_sequence_tensor("x", x, dim);
  const Rows rows = ring_rows(x.shape[dim], ranks, rank, layout);
  std::vector<std::int64_t> shape = shape_of(x);
  shape[std::size_t(dim)] = 0;
  for (const auto& [begin, end] : rows) shape[std::size_t(dim)] += end - begin;
  Tensor part = Tensor::empty(shape, x.dtype);
  std::int64_t at = 0;
  for (const auto& [begin, end] : rows) {
    copy(x.narrow(dim, begin, end - begin), part.view().narrow(dim, at, end - begin));
    at += end - begin;
  }
  return part;
}

Tensor unshard_sequence(const std::vector<TensorView>& parts, Layout layout, int dim) {
  if (parts.empty()) throw Error("unshard_sequence: no parts; expected one per rank");
  const int P = int(parts.size());
  for (int p = 0; p < P; ++p) {
    check_sequence_tensor("part", parts[std::size_t(p)], dim);
    std::vector<std::int64_t> a = shape_of(parts[std::size_t(p)]), b = shape_of(parts[0]);
    if (a != b || parts[std::size_t(p)].dtype != parts[0].dtype)
      throw Error("part " + std::to_string(p) + " has shape " + parts[std::size_t(p)].shape_string() + " and dtype " +
                  dtype_name(parts[std::size_t(p)].dtype) + "; expected those of part 0: " + parts[0].shape_string() +
                  ", " + dtype_name(parts[0].dtype));
  }
  std::vector<std::int64_t> shape = shape_of(parts[0]);
  shape[std::size_t(dim)] *= P;
  Tensor x = Tensor::empty(shape, parts[0].dtype);
  for (int p = 0; p < P; ++p) {
    std::int64_t at = 0;
    for (const auto& [begin, end] : ring_rows(shape[std::size_t(dim)], P, p, layout)) {
      copy(parts[std::size_t(p)].narrow(dim, at, end - begin), x.view().narrow(dim, begin, end - begin));
      at += end - begin;
    }
  }
  return x;
}

std::vector<std::int64_t> ring_transfer_entries(const DilatedConfig& config, Layout layout, std::int64_t N, int P,
                                                std::int64_t H, int source, int dest) {
  detail::check_config(config);
  if (H < 1) throw Error("heads = " + std::to_string(H) + "; expected >= 1");
  const Rows keys = ring_rows(N, P, source, layout), queries = ring_rows(N, P, dest, layout);
  std::int64_t n = 0;
  for (const auto& [k0, k1] : keys) n += k1 - k0;
  std::vector<char> needed(std::size_t(n * H), 0);
  for (std::size_t i = 0; i < config.segment_lengths.size(); ++i) {
    const std::int64_t w = std::min(config.segment_lengths[i], N), r = config.dilation_rates[i];
    for (const auto& [h, o] : branch_heads(config, i, H)) {
      std::int64_t local = 0;
      for (const auto& [k0, k1] : keys)
        for (std::int64_t p = k0; p < k1; ++p, ++local) {
          const std::int64_t s0 = p / w * w, s1 = std::min(s0 + w, N);
          if (p - s0 < o || (p - s0 - o) % r != 0) continue;  // the branch does not select this key
          // The last query of dest this branch selects in the segment: needed if there is one
          // (causal: at or after the key).
          std::int64_t last = -1;
          for (const auto& [q0, q1] : queries) {
            const std::int64_t hi = std::min(q1, s1) - 1;
            if (hi < s0 + o) continue;
            const std::int64_t x = s0 + o + (hi - s0 - o) / r * r;
            if (x >= std::max(q0, s0)) last = std::max(last, x);
          }
          if (last >= 0 && (!config.causal || last >= p)) needed[std::size_t(local * H + h)] = 1;
        }
    }
  }
  std::vector<std::int64_t> entries;
  for (std::int64_t e = 0; e < n * H; ++e)
    if (needed[std::size_t(e)]) entries.push_back(e);
  return entries;
}

namespace {

// CUDA tensors go to the CUDA engine; CPU tensors take no stream.
bool on_cuda(const TensorView& q, void* stream) {
  if (q.device.type == DeviceType::cuda) {
#ifdef DATTN_WITH_CUDA
    return true;
#else
    throw Error("q is on " + device_name(q.device) + " but this build has no CUDA backend; expected cpu tensors");
#endif
  }
  if (stream != nullptr) throw Error("stream is set for cpu tensors; expected nullptr");
  return false;
}

}  // namespace

namespace {

// The CPU engine's forward: every step's partial result merged by log-sum-exp.
void cpu_ring_forward(Communicator& comm, const Schedule& schedule, const StepKernels& kernels, const Keys& own,
                      const TensorView& q, const TensorView& out, const TensorView& lse, RingStats* stats) {
  const std::int64_t B = q.shape[0], n = q.shape[1], H = q.shape[2], D = q.shape[3], N = schedule.N;
  RingStats local_stats;
  Tensor merged = Tensor::zeros({B, n, H, D}, DType::float32), merged_lse = Tensor::empty({B, H, n}, DType::float32);
  for (std::int64_t i = 0; i < merged_lse.numel(); ++i) merged_lse.data<float>()[i] = -INFINITY;
  const std::int64_t chunk = schedule.mine[0].second - schedule.mine[0].first;  // every chunk has this length
  Tensor part = Tensor::empty({B, chunk, H, D}, q.dtype), part_lse = Tensor::empty({B, H, chunk}, DType::float32);
  for_each_source(
      comm, schedule, own, 1, local_stats,
      [&](int source, const Keys& keys) {
        std::int64_t key_offset = 0;
        for (const auto& [k0, k1] : ring_rows(N, comm.size(), source, schedule.layout)) {
          std::int64_t query_offset = 0;
          for (const auto& [q0, q1] : schedule.mine) {
            kernels.forward(step_mask(keys, key_offset, k1 - k0), RingStep{q0, N, k0, k1},
                            q.narrow(1, query_offset, q1 - q0), keys.k.narrow(1, key_offset, k1 - k0),
                            keys.v.narrow(1, key_offset, k1 - k0), part, part_lse);
            merge_partial(merged.view().narrow(1, query_offset, q1 - q0),
                          merged_lse.view().narrow(2, query_offset, q1 - q0), part, part_lse);
            query_offset += q1 - q0;
          }
          key_offset += k1 - k0;
        }
      },
      [](int, const Step&) {});
  convert(merged, out);
  copy(merged_lse, lse);
  if (stats) *stats += local_stats;
}

// The CPU engine's backward: the queries' sweep (dq, with the exact softmax correction from P and
// dP rather than from out), then the keys' sweep whose dk, dv go back to the keys' owners.
void cpu_ring_backward(Communicator& comm, const Schedule& schedule, const StepKernels& kernels, const Keys& own,
                       const TensorView& q, const TensorView& lse, const TensorView& dout, const TensorView& dq,
                       const TensorView& dk, const TensorView& dv, RingStats* stats) {
  const std::int64_t B = q.shape[0], n = q.shape[1], H = q.shape[2], D = q.shape[3], N = schedule.N;
  RingStats local_stats;

  // Per query chunk: its lse (contiguous copy) and the sums of the query sweep.
  struct Chunk {
    std::int64_t q0, q1, offset;
    Tensor lse, sum_gk, sum_pk, delta;
  };
  std::vector<Chunk> chunks;
  std::int64_t offset = 0;
  for (const auto& [q0, q1] : schedule.mine) {
    Chunk c{q0, q1, offset, Tensor::empty({B, H, q1 - q0}, DType::float32), Tensor::zeros({B, q1 - q0, H, D}, DType::float32),
            Tensor::zeros({B, q1 - q0, H, D}, DType::float32), Tensor::zeros({B, H, q1 - q0}, DType::float32)};
    copy(lse.narrow(2, offset, q1 - q0), c.lse);
    offset += q1 - q0;
    chunks.push_back(std::move(c));
  }
  auto pairs = [&](int source, const Keys& keys, auto&& fn) {
    std::int64_t key_offset = 0;
    for (const auto& [k0, k1] : ring_rows(N, comm.size(), source, schedule.layout)) {
      for (const Chunk& c : chunks) fn(c, step_mask(keys, key_offset, k1 - k0), key_offset, k0, k1);
      key_offset += k1 - k0;
    }
  };
  for_each_source(
      comm, schedule, own, 2, local_stats,
      [&](int source, const Keys& keys) {
        pairs(source, keys, [&](const Chunk& c, const StepMask& m, std::int64_t at, std::int64_t k0, std::int64_t k1) {
          kernels.query_gradients(m, RingStep{c.q0, N, k0, k1}, q.narrow(1, c.offset, c.q1 - c.q0),
                                  keys.k.narrow(1, at, k1 - k0), keys.v.narrow(1, at, k1 - k0),
                                  dout.narrow(1, c.offset, c.q1 - c.q0), c.lse, {c.sum_gk, c.sum_pk, c.delta});
        });
      },
      [](int, const Step&) {});
  for (const Chunk& c : chunks)
    kernels.finish({c.sum_gk, c.sum_pk, c.delta}, dq.narrow(1, c.offset, c.q1 - c.q0));

  // Key sweep: the gradients of the source's keys from this rank's queries go back to the source,
  // packed like its keys came; this rank's own key gradients arrive from each dest one step later.
  const std::int64_t kv_heads = own.k.shape[2];  // Hkv under grouped-query heads
  Tensor own_dkv = Tensor::zeros({2, B, n, kv_heads, D}, DType::float32);
  Tensor partial = Tensor::empty({2, B, n, kv_heads, D}, DType::float32);
  const std::vector<TensorView> own_grads{own_dkv.view().select(0, 0), own_dkv.view().select(0, 1)};
  const std::vector<TensorView> partial_grads{partial.view().select(0, 0), partial.view().select(0, 1)};
  std::vector<std::byte> send_buffer[2], receive_buffer[2];
  int sends[2] = {-1, -1}, receives[2] = {-1, -1};
  Entries receiving[2];  // the entries whose gradients each receive buffer will hold
  auto finish_receive = [&](int slot) {
    if (receives[slot] < 0) return;
    const auto start = Clock::now();
    comm.wait(receives[slot]);
    local_stats.wait_seconds += seconds_since(start);
    local_stats.bytes_received += std::int64_t(receive_buffer[slot].size());
    unpack_add(receive_buffer[slot].data(), receiving[slot], own_grads);
    receives[slot] = -1;
  };
  for_each_source(
      comm, schedule, own, 3, local_stats,
      [&](int source, const Keys& keys) {
        std::memset(partial.data<std::byte>(), 0, partial.nbytes());
        pairs(source, keys, [&](const Chunk& c, const StepMask& m, std::int64_t at, std::int64_t k0, std::int64_t k1) {
          kernels.key_gradients(m, RingStep{c.q0, N, k0, k1}, q.narrow(1, c.offset, c.q1 - c.q0),
                                keys.k.narrow(1, at, k1 - k0), keys.v.narrow(1, at, k1 - k0),
                                dout.narrow(1, c.offset, c.q1 - c.q0), c.lse, c.delta,
                                partial_grads[0].narrow(1, at, k1 - k0), partial_grads[1].narrow(1, at, k1 - k0));
        });
      },
      [&](int t, const Step& s) {  // after step t's keys were used (or skipped)
        if (t == 0) {
          if (!s.incoming.empty())
            for (std::int64_t i = 0; i < own_dkv.numel(); ++i) own_dkv.data<float>()[i] += partial.data<float>()[i];
          return;
        }
        const int slot = t % 2;
        comm.wait(sends[slot]);
        sends[slot] = -1;
        if (!s.incoming.empty()) {  // the source's keys came: their gradients go back
          send_buffer[slot].resize(packed_bytes(partial_grads[0], 2, s.incoming.size(), false));
          pack(partial_grads, nullptr, s.incoming, send_buffer[slot].data());
          sends[slot] = comm.isend(send_buffer[slot].data(), send_buffer[slot].size(), s.source, 4);
          local_stats.bytes_sent += std::int64_t(send_buffer[slot].size());
          ++local_stats.transfers;
        }
        finish_receive(slot);  // step t − 2's gradients, before the buffer is reused
        if (!s.outgoing.empty()) {
          receive_buffer[slot].resize(packed_bytes(partial_grads[0], 2, s.outgoing.size(), false));
          receives[slot] = comm.irecv(receive_buffer[slot].data(), receive_buffer[slot].size(), s.dest, 4);
          receiving[slot] = s.outgoing;
        }
      });
  finish_receive(0);
  finish_receive(1);
  comm.wait(sends[0]);
  comm.wait(sends[1]);
  convert(own_grads[0], dk);
  convert(own_grads[1], dv);
  if (stats) *stats += local_stats;
}


// Grouped-query heads in the ring: k and v travel with their Hkv heads. A (row, key/value head)
// entry goes where any query head of its group needs (row, query head), so the ring moves
// Hkv / H of the keys it would move repeated; the step kernels (CPU and CUDA) read query head h's
// keys at head h / (H / Hkv) and sum the group's key gradients into dk, dv of Hkv heads.
Schedule for_kv_heads(const Schedule& schedule, const TensorView& q, const Keys& keys) {
  const std::int64_t kv_heads = detail::check_kv_heads(q, keys.k), H = schedule.H, group = H / kv_heads;
  Schedule kv = schedule;
  kv.H = kv_heads;
  kv.entries = [query_entries = schedule.entries, H, group, kv_heads](int source, int dest) {
    Entries entries;  // ascending like the query heads' (h / group grows with h within a row)
    for (const std::int64_t e : query_entries(source, dest)) {
      const std::int64_t kv_entry = e / H * kv_heads + e % H / group;
      if (entries.empty() || entries.back() != kv_entry) entries.push_back(kv_entry);
    }
    return entries;
  };
  return kv;
}

bool grouped_query_heads(const TensorView& q, const Keys& keys) {
  return keys.k.rank == 4 && q.rank == 4 && keys.k.shape[2] != q.shape[2];
}

// The engine the tensors' device picks, for either attention kind: `kind` is (config) or
// (config, block mask), from which each engine's step kernels are made.
template <class... Kind>
void ring_forward_on_device(Communicator& comm, const Schedule& schedule, const Keys& keys, const TensorView& q,
                            const TensorView& out, const TensorView& lse, RingStats* stats, void* stream,
                            const Kind&... kind) {
  if (grouped_query_heads(q, keys) && schedule.H == q.shape[2])
    return ring_forward_on_device(comm, for_kv_heads(schedule, q, keys), keys, q, out, lse, stats, stream, kind...);
#ifdef DATTN_WITH_CUDA
  if (on_cuda(q, stream)) {
    RingStats local;
    detail::ring_forward_cuda(comm, schedule, cuda_step_kernels(kind...), keys, q, out, lse, local, stream);
    if (stats) *stats += local;
    return;
  }
#else
  on_cuda(q, stream);
#endif
  cpu_ring_forward(comm, schedule, step_kernels(kind...), keys, q, out, lse, stats);
}

template <class... Kind>
void ring_backward_on_device(Communicator& comm, const Schedule& schedule, const Keys& keys, const TensorView& q,
                             const TensorView& out, const TensorView& lse, const TensorView& dout, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv, RingStats* stats, void* stream,
                             const Kind&... kind) {
  if (grouped_query_heads(q, keys) && schedule.H == q.shape[2]) {
    detail::check_gradients(q, keys.k, dout, dq, dk, dv);
    return ring_backward_on_device(comm, for_kv_heads(schedule, q, keys), keys, q, out, lse, dout, dq, dk, dv, stats,
                                   stream, kind...);
  }
#ifdef DATTN_WITH_CUDA
  if (on_cuda(q, stream)) {
    RingStats local;
    detail::ring_backward_cuda(comm, schedule, cuda_step_kernels(kind...), keys, q, out, lse, dout, dq, dk, dv, local,
                               stream);
    if (stats) *stats += local;
    return;
  }
#else
  on_cuda(q, stream);
#endif
  (void)out;  // the CPU sweeps take the softmax correction from P and dP
  cpu_ring_backward(comm, schedule, step_kernels(kind...), keys, q, lse, dout, dq, dk, dv, stats);
}

}  // namespace

void ring_forward(Communicator& comm, const DilatedConfig& config, Layout layout, std::int64_t N, const TensorView& q,
                  const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                  RingStats* stats, void* stream) {
  check_layout(q, N, comm.size(), comm.rank(), layout);
  ring_forward_on_device(comm, Schedule::dilated(comm, config, layout, N, q.shape[2]),
                         Keys{k, v, config.key_padding_mask}, q, out, lse, stats, stream, config);
}

void ring_backward(Communicator& comm, const DilatedConfig& config, Layout layout, std::int64_t N, const TensorView& q,
                   const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                   const TensorView& dout, const TensorView& dq, const TensorView& dk, const TensorView& dv,
                   RingStats* stats, void* stream) {
  check_layout(q, N, comm.size(), comm.rank(), layout);
  ring_backward_on_device(comm, Schedule::dilated(comm, config, layout, N, q.shape[2]),
                          Keys{k, v, config.key_padding_mask}, q, out, lse, dout, dq, dk, dv, stats, stream, config);
}

std::vector<std::int64_t> ring_block_sparse_entries(const BlockSparseMask& mask, std::int64_t block_size, bool causal,
                                                    Layout layout, std::int64_t N, int P, std::int64_t H, int source,
                                                    int dest) {
  if (block_size < 1) throw Error("block_size = " + std::to_string(block_size) + "; expected >= 1");
  const Rows keys = ring_rows(N, P, source, layout), queries = ring_rows(N, P, dest, layout);
  for (const Rows* rows : {&keys, &queries})
    for (const auto& [b, e] : *rows)
      if (b % block_size != 0 || e % block_size != 0)
        throw Error("a rank's rows [" + std::to_string(b) + ", " + std::to_string(e) + ") do not start and end on a block of " +
                    std::to_string(block_size) + "; expected N / P (N / 2P zigzag) to be a multiple of block_size");
  std::int64_t n = 0;
  for (const auto& [b, e] : keys) n += e - b;
  const std::int64_t nqb = mask.query_blocks();
  bool needed = false;
  for (std::int64_t h = 0; h < mask.heads() && !needed; ++h)
    for (const auto& [q0, q1] : queries)
      for (std::int64_t qb = q0 / block_size; qb < q1 / block_size && !needed; ++qb) {
        const std::int64_t row = h * (nqb + 1) + qb;
        for (std::int64_t e = mask.row_offsets()[std::size_t(row)]; e < mask.row_offsets()[std::size_t(row) + 1]; ++e) {
          const std::int64_t kb = mask.columns()[std::size_t(e)];
          if (causal && kb > qb) continue;
          for (const auto& [k0, k1] : keys)
            if (kb * block_size >= k0 && kb * block_size < k1) needed = true;
        }
      }
  std::vector<std::int64_t> entries;
  if (needed)
    for (std::int64_t i = 0; i < n * H; ++i) entries.push_back(i);
  return entries;
}

void ring_forward(Communicator& comm, const BlockSparseConfig& config, const BlockSparseMask& mask, Layout layout,
                  std::int64_t N, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                  const TensorView& lse, RingStats* stats, void* stream) {
  check_layout(q, N, comm.size(), comm.rank(), layout);
  ring_forward_on_device(comm, Schedule::block_sparse(comm, config, mask, layout, N, q.shape[2]),
                         Keys{k, v, config.key_padding_mask}, q, out, lse, stats, stream, config, mask);
}

void ring_backward(Communicator& comm, const BlockSparseConfig& config, const BlockSparseMask& mask, Layout layout,
                   std::int64_t N, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                   const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                   const TensorView& dv, RingStats* stats, void* stream) {
  check_layout(q, N, comm.size(), comm.rank(), layout);
  ring_backward_on_device(comm, Schedule::block_sparse(comm, config, mask, layout, N, q.shape[2]),
                          Keys{k, v, config.key_padding_mask}, q, out, lse, dout, dq, dk, dv, stats, stream, config,
                          mask);
}

}  // namespace dattn
