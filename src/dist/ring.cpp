// The ring schedule over any Communicator. At step t a rank sends its own keys and values straight
// to rank + t and receives those of rank − t (point to point, no relaying), skipping the pairs of
// ranks that share no segment; every pair of (query chunk, key chunk) runs one ring step of the
// kernels and merge_partial combines them. The backward repeats the exchange twice: once for the
// queries' sums (dq), once for dk, dv, which go back to the keys' owner.
#include <cmath>
#include <cstring>

#include "dattn/attention.hpp"
#include "dattn/error.hpp"
#include "dattn/ring.hpp"
#include "validate.hpp"

namespace dattn {
namespace {

using Rows = std::vector<std::pair<std::int64_t, std::int64_t>>;

// Rows [begin, begin + count) along dimension dim of a view.
TensorView slice(const TensorView& t, int dim, std::int64_t begin, std::int64_t count) {
  TensorView s = t;
  s.data = static_cast<std::byte*>(t.data) + begin * t.strides[dim] * std::int64_t(dtype_size(t.dtype));
  s.shape[dim] = count;
  return s;
}

// Whether any branch has a segment holding rows of both ranges (and, causal, a key not after
// every query): both sides of a transfer evaluate it, so they agree on skipping it.
bool shares_segment(const DilatedConfig& config, std::int64_t global_length, const Rows& queries, const Rows& keys) {
  for (const auto& [q0, q1] : queries)
    for (const auto& [k0, k1] : keys) {
      if (config.causal && k0 > q1 - 1) continue;
      for (std::size_t i = 0; i < config.segment_lengths.size(); ++i) {
        const std::int64_t w = std::min(config.segment_lengths[i], global_length);
        if (std::max(q0 / w, k0 / w) <= std::min((q1 - 1) / w, (k1 - 1) / w)) return true;
      }
    }
  return false;
}

// This rank's keys, values and key padding, contiguous in one buffer that travels.
struct KeyBlock {
  std::int64_t B, rows, H, D;
  DType dtype;
  bool has_mask;
  std::vector<std::byte> bytes;

  std::size_t tensor_bytes() const { return std::size_t(B * rows * H * D) * dtype_size(dtype); }
  TensorView tensor(int which) const {  // 0: k, 1: v
    return make_view(const_cast<std::byte*>(bytes.data()) + which * tensor_bytes(), dtype, {B, rows, H, D});
  }
  TensorView mask() const {
    return make_view(const_cast<std::byte*>(bytes.data()) + 2 * tensor_bytes(), DType::boolean, {B, rows});
  }
};

KeyBlock make_block(const TensorView& k, bool has_mask) {
  KeyBlock block{k.shape[0], k.shape[1], k.shape[2], k.shape[3], k.dtype, has_mask, {}};
  block.bytes.resize(2 * block.tensor_bytes() + (has_mask ? std::size_t(block.B * block.rows) : 0));
  return block;
}

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

KeyBlock own_block(const DilatedConfig& config, const TensorView& k, const TensorView& v) {
  KeyBlock block = make_block(k, bool(config.key_padding_mask));
  copy(k, block.tensor(0));
  copy(v, block.tensor(1));
  if (block.has_mask) copy(*config.key_padding_mask, block.mask());
  return block;
}

// Runs body(source rank, its key block) for every source that shares a segment with this rank,
// exchanging blocks directly with rank ± t.
template <class Body>
void for_each_source(Communicator& comm, const DilatedConfig& config, Layout layout, std::int64_t N,
                     const KeyBlock& own, int tag, Body&& body) {
  const int P = comm.size(), rank = comm.rank();
  const Rows mine = ring_rows(N, P, rank, layout);
  KeyBlock received = make_block(own.tensor(0), own.has_mask);
  for (int t = 0; t < P; ++t) {
    const int dest = (rank + t) % P, source = (rank - t + P) % P;
    if (t == 0) {
      if (shares_segment(config, N, mine, mine)) body(rank, own);
      continue;
    }
    const bool send = shares_segment(config, N, ring_rows(N, P, dest, layout), mine);
    const bool receive = shares_segment(config, N, mine, ring_rows(N, P, source, layout));
    const int sent = send ? comm.isend(own.bytes.data(), own.bytes.size(), dest, tag) : -1;
    if (receive) {
      comm.wait(comm.irecv(received.bytes.data(), received.bytes.size(), source, tag));
      body(source, received);
    }
    comm.wait(sent);
  }
}

DilatedConfig step_config(const DilatedConfig& config, const KeyBlock& block, std::int64_t offset, std::int64_t rows) {
  DilatedConfig c = config;
  if (block.has_mask) c.key_padding_mask = slice(block.mask(), 1, offset, rows);
  return c;
}

void check_layout(const TensorView& q, std::int64_t N, int P, int rank, Layout layout) {
  std::int64_t rows = 0;
  for (const auto& [begin, end] : ring_rows(N, P, rank, layout)) rows += end - begin;
  if (q.rank != 4 || q.shape[1] != rows)
    throw Error("q has shape " + q.shape_string() + "; expected " + std::to_string(rows) + " local rows (N / P)");
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

void ring_forward(Communicator& comm, const DilatedConfig& config, Layout layout, std::int64_t N, const TensorView& q,
                  const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse) {
  check_layout(q, N, comm.size(), comm.rank(), layout);
  const Rows mine = ring_rows(N, comm.size(), comm.rank(), layout);
  const std::int64_t B = q.shape[0], n = q.shape[1], H = q.shape[2], D = q.shape[3];
  Tensor merged = Tensor::zeros({B, n, H, D}, DType::float32), merged_lse = Tensor::empty({B, H, n}, DType::float32);
  for (std::int64_t i = 0; i < merged_lse.numel(); ++i) merged_lse.data<float>()[i] = -INFINITY;
  const KeyBlock own = own_block(config, k, v);
  for_each_source(comm, config, layout, N, own, 1, [&](int source, const KeyBlock& block) {
    std::int64_t key_offset = 0;
    for (const auto& [k0, k1] : ring_rows(N, comm.size(), source, layout)) {
      std::int64_t query_offset = 0;
      for (const auto& [q0, q1] : mine) {
        Tensor part = Tensor::empty({B, q1 - q0, H, D}, q.dtype), part_lse = Tensor::empty({B, H, q1 - q0}, DType::float32);
        forward(step_config(config, block, key_offset, k1 - k0), slice(q, 1, query_offset, q1 - q0),
                slice(block.tensor(0), 1, key_offset, k1 - k0), slice(block.tensor(1), 1, key_offset, k1 - k0), part,
                part_lse, {.ring_step = RingStep{q0, N, k0, k1}});
        merge_partial(slice(merged, 1, query_offset, q1 - q0), slice(merged_lse, 2, query_offset, q1 - q0), part, part_lse);
        query_offset += q1 - q0;
      }
      key_offset += k1 - k0;
    }
  });
  convert(merged, out);
  copy(merged_lse, lse);
}

void ring_backward(Communicator& comm, const DilatedConfig& config, Layout layout, std::int64_t N, const TensorView& q,
                   const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                   const TensorView& dout, const TensorView& dq, const TensorView& dk, const TensorView& dv) {
  (void)out;  // the exact softmax correction comes from P and dP (ring_query_gradients), not from out
  check_layout(q, N, comm.size(), comm.rank(), layout);
  const int P = comm.size(), rank = comm.rank();
  const Rows mine = ring_rows(N, P, rank, layout);
  const std::int64_t B = q.shape[0], n = q.shape[1], H = q.shape[2], D = q.shape[3];
  const KeyBlock own = own_block(config, k, v);

  // Per query chunk: its lse (contiguous copy) and the sums of the query sweep.
  struct Chunk {
    std::int64_t q0, q1, offset;
    Tensor lse, sum_gk, sum_pk, delta;
  };
  std::vector<Chunk> chunks;
  std::int64_t offset = 0;
  for (const auto& [q0, q1] : mine) {
    Chunk c{q0, q1, offset, Tensor::empty({B, H, q1 - q0}, DType::float32), Tensor::zeros({B, q1 - q0, H, D}, DType::float32),
            Tensor::zeros({B, q1 - q0, H, D}, DType::float32), Tensor::zeros({B, H, q1 - q0}, DType::float32)};
    copy(slice(lse, 2, offset, q1 - q0), c.lse);
    offset += q1 - q0;
    chunks.push_back(std::move(c));
  }
  auto pairs = [&](int source, const KeyBlock& block, auto&& fn) {
    std::int64_t key_offset = 0;
    for (const auto& [k0, k1] : ring_rows(N, P, source, layout)) {
      for (const Chunk& c : chunks) fn(c, step_config(config, block, key_offset, k1 - k0), key_offset, k0, k1);
      key_offset += k1 - k0;
    }
  };
  for_each_source(comm, config, layout, N, own, 2, [&](int source, const KeyBlock& block) {
    pairs(source, block, [&](const Chunk& c, const DilatedConfig& cfg, std::int64_t at, std::int64_t k0, std::int64_t k1) {
      ring_query_gradients(cfg, RingStep{c.q0, N, k0, k1}, slice(q, 1, c.offset, c.q1 - c.q0),
                           slice(block.tensor(0), 1, at, k1 - k0), slice(block.tensor(1), 1, at, k1 - k0),
                           slice(dout, 1, c.offset, c.q1 - c.q0), c.lse, {c.sum_gk, c.sum_pk, c.delta});
    });
  });
  for (const Chunk& c : chunks)
    ring_finish_query_gradients(config, {c.sum_gk, c.sum_pk, c.delta}, slice(dq, 1, c.offset, c.q1 - c.q0));

  // Key sweep: gradients for the source's keys from this rank's queries go back to the source.
  Tensor own_dkv = Tensor::zeros({2, B, n, H, D}, DType::float32);
  const std::size_t half = std::size_t(B * n * H * D), bytes = 2 * half * sizeof(float);
  Tensor partial = Tensor::empty({2, B, n, H, D}, DType::float32), arriving = Tensor::empty({2, B, n, H, D}, DType::float32);
  auto add = [&](const Tensor& from) {
    for (std::size_t i = 0; i < 2 * half; ++i) own_dkv.data<float>()[i] += from.data<float>()[i];
  };
  for (int t = 0; t < P; ++t) {
    const int dest = (rank + t) % P, source = (rank - t + P) % P;
    // keys of `source` come in (as in the query sweep), their gradients go back to `source`, and
    // the gradients of this rank's keys come from `dest`.
    const bool need_source = shares_segment(config, N, mine, ring_rows(N, P, source, layout));
    const bool dest_needs_mine = shares_segment(config, N, ring_rows(N, P, dest, layout), mine);
    KeyBlock block = t == 0 ? own : make_block(own.tensor(0), own.has_mask);
    // Post the receive of this rank's key gradients before any blocking send (no cycle of waits).
    const int gradients_in = t > 0 && dest_needs_mine ? comm.irecv(arriving.data<std::byte>(), bytes, dest, 4) : -1;
    const int sent = t > 0 && dest_needs_mine ? comm.isend(own.bytes.data(), own.bytes.size(), dest, 3) : -1;
    if (t > 0 && need_source) comm.wait(comm.irecv(block.bytes.data(), block.bytes.size(), source, 3));
    if (need_source) {
      std::memset(partial.data<std::byte>(), 0, partial.nbytes());
      pairs(source, block, [&](const Chunk& c, const DilatedConfig& cfg, std::int64_t at, std::int64_t k0, std::int64_t k1) {
        ring_key_gradients(cfg, RingStep{c.q0, N, k0, k1}, slice(q, 1, c.offset, c.q1 - c.q0),
                           slice(block.tensor(0), 1, at, k1 - k0), slice(block.tensor(1), 1, at, k1 - k0),
                           slice(dout, 1, c.offset, c.q1 - c.q0), c.lse, c.delta,
                           slice(partial.view().select(0, 0), 1, at, k1 - k0),
                           slice(partial.view().select(0, 1), 1, at, k1 - k0));
      });
      if (t == 0) add(partial);
      else comm.wait(comm.isend(partial.data<std::byte>(), bytes, source, 4));
    }
    if (gradients_in >= 0) {
      comm.wait(gradients_in);
      add(arriving);
    }
    comm.wait(sent);
  }
  convert(own_dkv.view().select(0, 0), dk);
  convert(own_dkv.view().select(0, 1), dv);
}

}  // namespace dattn
