// The ring's schedule, shared by the CPU engine (ring.cpp) and the CUDA one (ring_cuda.cpp): at
// step t a rank sends to rank + t and receives from rank − t the (row, head) entries the
// receiver's queries need (ring_transfer_entries).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "dattn/block_sparse.hpp"
#include "dattn/error.hpp"
#include "dattn/ring.hpp"

namespace dattn::detail {

using Rows = std::vector<std::pair<std::int64_t, std::int64_t>>;
using Entries = std::vector<std::int64_t>;

// The keys of one step: k, v [B, n, H, D] and the padding mask [B, n], if any.
struct Keys {
  TensorView k, v;
  std::optional<TensorView> mask;
};

// A step's keys' padding mask: rows [offset, offset + rows) of the keys' mask, if any.
using StepMask = std::optional<TensorView>;
inline StepMask step_mask(const Keys& keys, std::int64_t offset, std::int64_t rows) {
  return keys.mask ? StepMask(keys.mask->narrow(1, offset, rows)) : std::nullopt;
}

// Step t of one rank's schedule: its peers and what travels. Made when the step is posted, so a
// rank keeps the entries of a few steps, never all P of them (O(N/P) memory).
struct Step {
  int dest, source;
  Entries outgoing;  // this rank's entries that dest needs
  Entries incoming;  // source's entries this rank needs
};

// entries(source, dest): the entries (local_row·H + head) of source's keys that dest's queries
// need, ascending; the attention kind decides (ring_transfer_entries for dilated attention).
struct Schedule {
  Layout layout;
  std::int64_t N, H;
  int P, rank;
  Rows mine;
  std::function<Entries(int, int)> entries;

  Schedule(const Communicator& comm, Layout l, std::int64_t global_length, std::int64_t heads,
           std::function<Entries(int, int)> entries_of)
      : layout(l), N(global_length), H(heads), P(comm.size()), rank(comm.rank()), mine(ring_rows(N, P, rank, layout)),
        entries(std::move(entries_of)) {}

  // Dilated attention's schedule: only the selected (row, head) entries travel.
  static Schedule dilated(const Communicator& comm, const DilatedConfig& config, Layout l, std::int64_t global_length,
                          std::int64_t heads) {
    return Schedule(comm, l, global_length, heads, [&config, l, global_length, heads, P = comm.size()](int s, int d) {
      return ring_transfer_entries(config, l, global_length, P, heads, s, d);
    });
  }

  // Block-sparse attention's schedule: a key chunk travels whole to the ranks whose query blocks
  // the mask lets see it.
  static Schedule block_sparse(const Communicator& comm, const BlockSparseConfig& config, const BlockSparseMask& mask,
                               Layout l, std::int64_t global_length, std::int64_t heads) {
    return Schedule(comm, l, global_length, heads,
                    [&config, &mask, l, global_length, heads, P = comm.size()](int s, int d) {
                      return ring_block_sparse_entries(mask, config.block_size, config.causal, l, global_length, P,
                                                       heads, s, d);
                    });
  }

  Step step(int t) const {  // t = 0: this rank's own keys
    const int dest = (rank + t) % P, source = (rank - t + P) % P;
    Entries outgoing = entries(rank, dest);
    Entries incoming = t == 0 ? outgoing : entries(source, rank);
    return {dest, source, std::move(outgoing), std::move(incoming)};
  }
};

// q holds this rank's rows: N/P of them.
inline void check_layout(const TensorView& q, std::int64_t N, int P, int rank, Layout layout) {
  std::int64_t rows = 0;
  for (const auto& [begin, end] : ring_rows(N, P, rank, layout)) rows += end - begin;
  if (q.rank != 4 || q.shape[1] != rows)
    throw Error("q has shape " + q.shape_string() + "; expected " + std::to_string(rows) + " local rows (N / P)");
}

#ifdef DATTN_WITH_CUDA
// What the CUDA engine (ring_cuda.cpp) runs at each step, for one attention kind (dilated or
// block-sparse): the one-pass steps of ring_forward_step and ring_step_gradients.
struct CudaStepKernels {
  std::function<void(const StepMask&, const RingStep&, const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out, const TensorView& lse, void* stream)>
      forward;
  std::function<void(const StepMask&, const RingStep&, const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& dout, const TensorView& lse, const TensorView& delta, const TensorView& dq,
                     const TensorView& dk, const TensorView& dv, void* stream)>
      gradients;
};

// ring_forward / ring_backward for CUDA tensors (ring_cuda.cpp), given own: this rank's keys.
void ring_forward_cuda(Communicator& comm, const Schedule& schedule, const CudaStepKernels& kernels, const Keys& own,
                       const TensorView& q, const TensorView& out, const TensorView& lse, RingStats& stats,
                       void* stream);
void ring_backward_cuda(Communicator& comm, const Schedule& schedule, const CudaStepKernels& kernels, const Keys& own,
                        const TensorView& q, const TensorView& out, const TensorView& lse, const TensorView& dout,
                        const TensorView& dq, const TensorView& dk, const TensorView& dv, RingStats& stats,
                        void* stream);
#endif

}  // namespace dattn::detail
