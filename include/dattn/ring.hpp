// Ring (sequence-parallel) attention (docs/semantics.md "Ring (sequence-parallel) attention"): P ranks each
// hold N/P rows of q, k, v in the contiguous or zigzag layout; keys and values travel between the
// ranks that share a segment, partial results are merged by log-sum-exp, and the backward's dk, dv
// travel back to their owners. No rank holds more than O(N/P) rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "dattn/config.hpp"
#include "dattn/tensor.hpp"

namespace dattn {

struct BlockSparseConfig;
class BlockSparseMask;

enum class Layout { contiguous, zigzag };

// The global row ranges [begin, end) a rank holds, in the order its local tensors hold them:
// contiguous: one chunk of N/P; zigzag: chunks p and 2P−1−p of N/(2P). N must divide.
std::vector<std::pair<std::int64_t, std::int64_t>> ring_rows(std::int64_t global_length, int ranks, int rank,
                                                              Layout layout);

// The part of x (along dim) that `rank` of `ranks` holds, as a new contiguous host tensor: one
// chunk (contiguous) or chunks p and 2P−1−p (zigzag). x's extent along dim must divide (P or 2P).
Tensor shard_sequence(const TensorView& x, int rank, int ranks, Layout layout = Layout::contiguous, int dim = 1);
// All ranks' parts (parts[p] from rank p) joined back in sequence order.
Tensor unshard_sequence(const std::vector<TensorView>& parts, Layout layout = Layout::contiguous, int dim = 1);

// Point-to-point messages between the ranks of a group: MPI, NCCL or threads of one process.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Start sending or receiving `bytes` bytes to or from `peer`; a receive matches the send of the
  // same tag (NCCL, which has no tags: the next one between the two ranks). Buffers stay untouched
  // by the caller until wait() on the returned request.
  virtual int isend(const void* data, std::size_t bytes, int peer, int tag) = 0;
  virtual int irecv(void* data, std::size_t bytes, int peer, int tag) = 0;
  virtual void wait(int request) = 0;
  // Starts what was posted since the last flush as one group (NCCL: a ring's sends and receives
  // must start together or every rank waits on its receive); the ring calls it after each step's
  // posts. A no-op where posts start at once.
  virtual void flush() {}
  // CUDA rings: the stream their device buffers are written and read on. Transfers start after
  // the work queued on it, and wait() makes later work on it wait for the transfer (NCCL without
  // blocking the host; the in-process group by synchronising).
  virtual void bind_stream(void* stream) { (void)stream; }
};

// `size` communicators of one process, for ring logic on one machine: one thread per rank, on
// the CPU or, with device buffers and a stream each (bind_stream), on one GPU.
std::vector<std::unique_ptr<Communicator>> make_in_process_group(int size);

// A communicator over MPI (builds with DATTN_MPI; otherwise an Error): mpi_comm points to an
// MPI_Comm, or is null for MPI_COMM_WORLD. The caller initialises and finalises MPI.
std::unique_ptr<Communicator> make_mpi_communicator(void* mpi_comm = nullptr);

// A communicator over NCCL (builds with DATTN_NCCL; otherwise an Error): nccl_comm points to an
// ncclComm_t the caller created (ncclCommInitRank / ncclCommInitAll) and destroys. Transfers run on
// a stream of the communicator's own, ordered against the bound stream by events, so they overlap
// the kernels queued between post and wait.
std::unique_ptr<Communicator> make_nccl_communicator(void* nccl_comm);

// The entries of rank `source`'s keys and values that rank `dest`'s queries need, as
// local_row·heads + head, ascending: a (row, head) travels when some branch selects that key for
// that head in a segment where it also selects a query of dest (causal: one at or after the key).
// Empty when the two ranks share no segment. Both sides compute it, so no index travels; the
// Python ring packs its transfers with it too.
std::vector<std::int64_t> ring_transfer_entries(const DilatedConfig& config, Layout layout, std::int64_t global_length,
                                                int ranks, std::int64_t heads, int source, int dest);

// What a ring call moved and where its time went (added to, so one struct can sum calls).
struct RingStats {
  std::int64_t bytes_sent = 0, bytes_received = 0;
  int transfers = 0;              // messages sent
  double compute_seconds = 0;     // in kernels, packing and merging
  double wait_seconds = 0;        // blocked on a message that had not arrived
  RingStats& operator+=(const RingStats& o) {
    bytes_sent += o.bytes_sent, bytes_received += o.bytes_received, transfers += o.transfers;
    compute_seconds += o.compute_seconds, wait_seconds += o.wait_seconds;
    return *this;
  }
};

// Local tensors hold this rank's rows in ring_rows order: q, k, v, out, dout, dq, dk, dv
// [B, N/P, H, D], lse [B, H, N/P]; config.key_padding_mask, if set, is sharded like q ([B, N/P]).
// k, v, dk, dv may have Hkv heads (H % Hkv == 0; CPU and CUDA tensors): they travel with their Hkv heads
// (a key/value head's row goes where any query head of its group needs it), so the ring moves Hkv / H
// of the bytes of H heads; dk, dv sum the group's query heads.
// CPU tensors: the backward is two sweeps (ring_query_gradients, then ring_key_gradients). CUDA
// tensors: everything runs on `stream` (a cudaStream_t, null for the default stream; it is bound
// to comm) with the one-pass steps (ring_forward_step, ring_step_gradients: one sweep of keys
// forward and back in the backward); RingStats then counts bytes and messages, not seconds.
void ring_forward(Communicator& comm, const DilatedConfig& config, Layout layout, std::int64_t global_length,
                  const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                  const TensorView& lse, RingStats* stats = nullptr, void* stream = nullptr);
void ring_backward(Communicator& comm, const DilatedConfig& config, Layout layout, std::int64_t global_length,
                   const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                   const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                   const TensorView& dv, RingStats* stats = nullptr, void* stream = nullptr);

// Block-sparse attention on the same ring (CPU tensors, or CUDA ones with the mask on their device:
// BlockSparseMask::to_device): `mask` covers the whole sequence and every
// rank's rows start and end on a block. A rank's whole key chunk travels to a rank some of whose
// query blocks the mask lets see one of its key blocks (causal: one not after them); otherwise the
// step moves and computes nothing. ring_block_sparse_entries is that schedule: all n·H entries of
// source's keys, or none.
std::vector<std::int64_t> ring_block_sparse_entries(const BlockSparseMask& mask, std::int64_t block_size, bool causal,
                                                    Layout layout, std::int64_t global_length, int ranks,
                                                    std::int64_t heads, int source, int dest);
void ring_forward(Communicator& comm, const BlockSparseConfig& config, const BlockSparseMask& mask, Layout layout,
                  std::int64_t global_length, const TensorView& q, const TensorView& k, const TensorView& v,
                  const TensorView& out, const TensorView& lse, RingStats* stats = nullptr, void* stream = nullptr);
void ring_backward(Communicator& comm, const BlockSparseConfig& config, const BlockSparseMask& mask, Layout layout,
                   std::int64_t global_length, const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& out, const TensorView& lse, const TensorView& dout, const TensorView& dq,
                   const TensorView& dk, const TensorView& dv, RingStats* stats = nullptr, void* stream = nullptr);

}  // namespace dattn
