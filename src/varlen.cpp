// Packed variable-length batches: validation of the packed tensors and cu_seqlens, then dilated
// attention through DilatedParams::cu_seqlens (the CPU kernels run sequence by sequence, the CUDA
// kernels' blocks find their sequence in cu_seqlens) and
// block-sparse attention one sequence at a time with the pattern's mask for its length. The
// reference computes each sequence as a whole-sequence call of its own.
#include "dattn/varlen.hpp"

#include <array>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "cpu/cpu_attention.hpp"
#ifdef DATTN_WITH_CUDA
#include "cuda/cuda_attention.hpp"
#endif
#include "dattn/error.hpp"
#include "params_of.hpp"
#include "reference/block_sparse.hpp"
#include "reference/reference.hpp"
#include "validate.hpp"

namespace dattn {
namespace {

std::string str(std::int64_t x) { return std::to_string(x); }

// A packed [T, H, D] (or lse [H, T]) tensor as the batch of one the kernels take.
TensorView as_batch_of_one(const TensorView& t) {
  TensorView batch = t;
  batch.rank = t.rank + 1;
  for (int d = t.rank; d > 0; --d) batch.shape[d] = t.shape[d - 1], batch.strides[d] = t.strides[d - 1];
  batch.shape[0] = 1;
  batch.strides[0] = 0;
  return batch;
}

void check_rank(const char* name, const TensorView& t, int rank, const char* layout) {
  if (t.data == nullptr) throw Error(std::string(name) + " is null; expected a " + layout + " tensor");
  if (t.rank != rank)
    throw Error(std::string(name) + " has rank " + str(t.rank) + "; expected rank " + str(rank) + " " + layout +
                " (a packed batch)");
}

// The sequences' boundaries, read on the host; every rule of a packed batch checked unless
// sequences.validate is false.
struct Packed {
  TensorView q, k, v, out, lse;  // batches of one: [1, T, H, D], lse [1, H, T]
  const std::int32_t* offsets = nullptr;
  std::int64_t batch = 0, total = 0;
  std::int64_t start(std::int64_t b) const { return offsets[b]; }
  std::int64_t length(std::int64_t b) const { return offsets[b + 1] - offsets[b]; }
};

Packed check_packed(const detail::CommonSettings& settings, const PackedSequences& sequences, const TensorView& q,
                    const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                    const LaunchOptions& options) {
  for (const auto& [name, t] : {std::pair{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}})
    check_rank(name, *t, 3, name == std::string("k") || name == std::string("v") ? "[T, Hkv, D]" : "[T, H, D]");
  check_rank("lse", lse, 2, "[H, T]");
  if (settings.key_padding_mask)
    throw Error("key_padding_mask is set for a packed batch; expected none (a packed batch has no padding)");
  if (options.ring_step) throw Error("options.ring_step is set for a packed batch; expected none");
  if (options.position_index) throw Error("options.position_index is set for a packed batch; expected none");
  const TensorView& cu = sequences.cu_seqlens;
  if (cu.data == nullptr) throw Error("cu_seqlens is null; expected an int32 [B + 1] tensor");
  if (cu.rank != 1 || cu.shape[0] < 2)
    throw Error("cu_seqlens has shape " + cu.shape_string() + "; expected [B + 1] with B >= 1");
  if (cu.dtype != DType::int32)
    throw Error(std::string("cu_seqlens has dtype ") + dtype_name(cu.dtype) + "; expected int32");
  if (cu.device != q.device)
    throw Error("cu_seqlens is on " + device_name(cu.device) + "; expected " + device_name(q.device) +
                " (the device of q)");
  if (cu.strides[0] != 1) throw Error("cu_seqlens has stride " + str(cu.strides[0]) + "; expected 1");
  if (sequences.max_seqlen < 0) throw Error("max_seqlen = " + str(sequences.max_seqlen) + "; expected >= 0");

  Packed p{as_batch_of_one(q), as_batch_of_one(k), as_batch_of_one(v), as_batch_of_one(out), as_batch_of_one(lse),
           cu.ptr<std::int32_t>(), cu.shape[0] - 1, q.shape[0]};
  if (p.total > 0) detail::check_inputs(settings, p.q, p.k, p.v, p.out, p.lse, options);
  if (!sequences.validate) return p;
  // CUDA: the offsets are read on the host (a copy and a synchronisation; validate = false skips it).
  std::vector<std::int32_t> host;
  const std::int32_t* offsets = p.offsets;
  if (q.device.type == DeviceType::cuda) {
#ifdef DATTN_WITH_CUDA
    host.resize(std::size_t(p.batch + 1));
    cuda::copy_to_host(p.offsets, host.data(), host.size() * sizeof(std::int32_t), options.stream);
    offsets = host.data();
#endif
  }
  if (offsets[0] != 0) throw Error("cu_seqlens[0] = " + str(offsets[0]) + "; expected 0");
  for (std::int64_t b = 0; b < p.batch; ++b) {
    if (offsets[b + 1] < offsets[b])
      throw Error("cu_seqlens[" + str(b + 1) + "] = " + str(offsets[b + 1]) + " < cu_seqlens[" + str(b) + "] = " +
                  str(offsets[b]) + "; expected non-decreasing offsets");
    if (offsets[b + 1] - offsets[b] > sequences.max_seqlen)
      throw Error("sequence " + str(b) + " has " + str(offsets[b + 1] - offsets[b]) + " tokens but max_seqlen = " +
                  str(sequences.max_seqlen) + "; expected max_seqlen >= the longest sequence");
  }
  if (offsets[p.batch] != p.total)
    throw Error("cu_seqlens[" + str(p.batch) + "] = " + str(offsets[p.batch]) + "; expected T = " + str(p.total) +
                " (the rows of q)");
  return p;
}

// The gradients as batches of one, checked like q (dout, dq) and k (dk, dv).
std::array<TensorView, 4> check_packed_gradients(const Packed& p, const TensorView& dout, const TensorView& dq,
                                                  const TensorView& dk, const TensorView& dv) {
  for (const auto& [name, t] : {std::pair{"dout", &dout}, {"dq", &dq}, {"dk", &dk}, {"dv", &dv}})
    check_rank(name, *t, 3, name[1] == 'k' || name[1] == 'v' ? "[T, Hkv, D]" : "[T, H, D]");
  const std::array<TensorView, 4> batch{as_batch_of_one(dout), as_batch_of_one(dq), as_batch_of_one(dk),
                                        as_batch_of_one(dv)};
  if (p.total > 0) detail::check_gradients(p.q, p.k, batch[0], batch[1], batch[2], batch[3]);
  return batch;
}

// Calls run(sequence index, its rows of t) for every sequence of length >= 1; `dim` is t's row dimension.
template <class Fn>
void for_each_sequence(const Packed& p, Fn&& run) {
  for (std::int64_t b = 0; b < p.batch; ++b)
    if (p.length(b) > 0) run(b, [&](const TensorView& t, int dim) { return t.narrow(dim, p.start(b), p.length(b)); });
}

detail::CommonSettings settings_of(const DilatedConfig& c) {
  return {c.causal, c.scale, c.key_padding_mask, c.dropout_p, c.dropout_seed, c.dropout_offset, c.use_tf32};
}

detail::CommonSettings settings_of(const BlockSparseConfig& c) {
  return {c.causal, c.scale, c.key_padding_mask, c.dropout_p, c.dropout_seed, c.dropout_offset, false};
}

// Dilated attention's params of a packed batch: `batch` sequences found in cu_seqlens, T rows.
detail::DilatedParams packed_params(const DilatedConfig& config, const PackedSequences& sequences, const Packed& p,
                                    const LaunchOptions& options) {
  detail::DilatedParams params = detail::dilated_params(config, p.q, p.k, p.v, p.out, p.lse, options);
  params.batch = p.batch;
  params.cu_seqlens = p.offsets;
  params.max_seqlen = sequences.max_seqlen;
  params.packed_rows = p.total;
  return params;
}

void run_forward(const detail::DilatedParams& p, const TensorView& q) {
#ifdef DATTN_WITH_CUDA
  if (q.device.type == DeviceType::cuda) return cuda::forward(p);  // refuses block-sparse cu_seqlens by name
#endif
  (void)q;
  cpu::forward(p);
}

void run_backward(const detail::DilatedParams& p, const TensorView& q) {
#ifdef DATTN_WITH_CUDA
  if (q.device.type == DeviceType::cuda) return cuda::backward(p);
#endif
  (void)q;
  cpu::backward(p);
}

// The pattern's masks for every length in the batch, made before anything is written.
std::map<std::int64_t, BlockSparseMask> pattern_masks(const SparsePattern& pattern, const Packed& p,
                                                      std::int64_t block_size) {
  if (block_size < 1) throw Error("block_size = " + str(block_size) + "; expected >= 1");
  std::map<std::int64_t, BlockSparseMask> masks;
  for (std::int64_t b = 0; b < p.batch; ++b)
    if (p.length(b) > 0 && !masks.count(p.length(b))) masks.emplace(p.length(b), pattern_mask(pattern, p.length(b), block_size));
  return masks;
}

}  // namespace

void forward_varlen(const DilatedConfig& config, const PackedSequences& sequences, const TensorView& q,
                    const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                    const LaunchOptions& options) {
  detail::check_config(config);
  const Packed p = check_packed(settings_of(config), sequences, q, k, v, out, lse, options);
  if (p.total == 0) return;
  if (detail::use_reference(options, q.dtype))
    return for_each_sequence(p, [&](std::int64_t b, auto rows) {
      reference::forward(config, rows(p.q, 1), rows(p.k, 1), rows(p.v, 1), rows(p.out, 1), rows(p.lse, 2), nullptr, b);
    });
  run_forward(packed_params(config, sequences, p, options), q);
}

void backward_varlen(const DilatedConfig& config, const PackedSequences& sequences, const TensorView& q,
                     const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                     const TensorView& dout, const TensorView& dq, const TensorView& dk, const TensorView& dv,
                     const LaunchOptions& options) {
  detail::check_config(config);
  const Packed p = check_packed(settings_of(config), sequences, q, k, v, out, lse, options);
  const auto [g, gq, gk, gv] = check_packed_gradients(p, dout, dq, dk, dv);
  if (p.total == 0) return;
  if (detail::use_reference(options, q.dtype))
    return for_each_sequence(p, [&](std::int64_t b, auto rows) {
      reference::backward(config, rows(p.q, 1), rows(p.k, 1), rows(p.v, 1), rows(g, 1), rows(gq, 1), rows(gk, 1),
                          rows(gv, 1), nullptr, b);
    });
  detail::DilatedParams params = packed_params(config, sequences, p, options);
  detail::set_gradients(params, g, gq, gk, gv);
  if (q.device.type == DeviceType::cuda)
    detail::set_backward_workspace(params, p.q, p.out, g, options);  // delta [H, T] in a pass of its own
  run_backward(params, q);
}

bool cuda_varlen_forward_uses_tma(const DilatedConfig& config, const PackedSequences& sequences, const TensorView& q,
                                  const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                                  const LaunchOptions& options) {
  detail::require_cuda_query(q);
  detail::check_config(config);
  const Packed p = check_packed(settings_of(config), sequences, q, k, v, out, lse, options);
#ifdef DATTN_WITH_CUDA
  if (p.total == 0 || detail::use_reference(options, q.dtype)) return false;
  return cuda::forward_uses_tma(packed_params(config, sequences, p, options));
#else
  throw Error("this build of dattn has no CUDA backend; expected one built with DATTN_CUDA=ON");
#endif
}

bool cuda_varlen_backward_uses_tma(const DilatedConfig& config, const PackedSequences& sequences, const TensorView& q,
                                   const TensorView& k, const TensorView& v, const TensorView& out,
                                   const TensorView& lse, const TensorView& dout, const TensorView& dq,
                                   const TensorView& dk, const TensorView& dv, const LaunchOptions& options) {
  detail::require_cuda_query(q);
  detail::check_config(config);
  const Packed p = check_packed(settings_of(config), sequences, q, k, v, out, lse, options);
  const auto [g, gq, gk, gv] = check_packed_gradients(p, dout, dq, dk, dv);
#ifdef DATTN_WITH_CUDA
  if (p.total == 0 || detail::use_reference(options, q.dtype)) return false;
  detail::DilatedParams params = packed_params(config, sequences, p, options);
  detail::set_gradients(params, g, gq, gk, gv);
  return cuda::backward_uses_tma(params);
#else
  throw Error("this build of dattn has no CUDA backend; expected one built with DATTN_CUDA=ON");
#endif
}

BlockSparseMask pattern_mask(const SparsePattern& pattern, std::int64_t seqlen, std::int64_t block_size) {
  if (seqlen < 1) throw Error("seqlen = " + str(seqlen) + "; expected >= 1");
  if (block_size < 1) throw Error("block_size = " + str(block_size) + "; expected >= 1");
  const std::int64_t blocks = (seqlen + block_size - 1) / block_size;
  switch (pattern.kind) {
    case SparsePattern::Kind::local_window:
      return BlockSparseMask::from_dense(local_window_pattern(blocks, pattern.window, block_size));
    case SparsePattern::Kind::dilated_sparse:
      return BlockSparseMask::from_dense(dilated_sparse_pattern(blocks, pattern.rates));
    case SparsePattern::Kind::global_local:
      return BlockSparseMask::from_dense(global_local_pattern(blocks, pattern.window, pattern.global_blocks, block_size));
    case SparsePattern::Kind::dilated:
      return BlockSparseMask::from_dense(
          dilated_pattern(seqlen, pattern.segment_lengths, pattern.dilation_rates, block_size));
  }
  throw Error("pattern.kind = " + str(int(pattern.kind)) + "; expected a SparsePattern::Kind");
}

void block_sparse_forward_varlen(const BlockSparseConfig& config, const SparsePattern& pattern,
                                 const PackedSequences& sequences, const TensorView& q, const TensorView& k,
                                 const TensorView& v, const TensorView& out, const TensorView& lse,
                                 const LaunchOptions& options) {
  const Packed p = check_packed(settings_of(config), sequences, q, k, v, out, lse, options);
  if (p.total == 0) return;
  if (q.device.type == DeviceType::cuda) {  // the CUDA dispatch refuses packed batches by name
    detail::DilatedParams params =
        detail::block_sparse_params(config, pattern_mask(pattern, 1, config.block_size), p.q, p.k, p.v, p.out, p.lse, options);
    params.cu_seqlens = p.offsets;
    return run_forward(params, q);
  }
  const auto masks = pattern_masks(pattern, p, config.block_size);
  const bool reference = detail::use_reference(options, q.dtype);
  for_each_sequence(p, [&](std::int64_t b, auto rows) {
    const BlockSparseMask& mask = masks.at(p.length(b));
    const TensorView sq = rows(p.q, 1), sk = rows(p.k, 1), sv = rows(p.v, 1), so = rows(p.out, 1), sl = rows(p.lse, 2);
    if (reference) return reference::block_sparse_forward(config, mask, sq, sk, sv, so, sl, b);
    detail::DilatedParams params = detail::block_sparse_params(config, mask, sq, sk, sv, so, sl, options);
    params.dropout_batch_base = b;
    run_forward(params, q);
  });
}

void block_sparse_backward_varlen(const BlockSparseConfig& config, const SparsePattern& pattern,
                                  const PackedSequences& sequences, const TensorView& q, const TensorView& k,
                                  const TensorView& v, const TensorView& out, const TensorView& lse,
                                  const TensorView& dout, const TensorView& dq, const TensorView& dk,
                                  const TensorView& dv, const LaunchOptions& options) {
  const Packed p = check_packed(settings_of(config), sequences, q, k, v, out, lse, options);
  const auto [g, gq, gk, gv] = check_packed_gradients(p, dout, dq, dk, dv);
  if (p.total == 0) return;
  if (q.device.type == DeviceType::cuda) {
    detail::DilatedParams params =
        detail::block_sparse_params(config, pattern_mask(pattern, 1, config.block_size), p.q, p.k, p.v, p.out, p.lse, options);
    detail::set_gradients(params, g, gq, gk, gv);
    params.cu_seqlens = p.offsets;
    return run_backward(params, q);
  }
  const auto masks = pattern_masks(pattern, p, config.block_size);
  const bool reference = detail::use_reference(options, q.dtype);
  for_each_sequence(p, [&](std::int64_t b, auto rows) {
    const BlockSparseMask& mask = masks.at(p.length(b));
    const TensorView sq = rows(p.q, 1), sk = rows(p.k, 1), sv = rows(p.v, 1), so = rows(p.out, 1), sl = rows(p.lse, 2);
    if (reference)
      return reference::block_sparse_backward(config, mask, sq, sk, sv, rows(g, 1), rows(gq, 1), rows(gk, 1), rows(gv, 1), b);
    detail::DilatedParams params = detail::block_sparse_params(config, mask, sq, sk, sv, so, sl, options);
    detail::set_gradients(params, rows(g, 1), rows(gq, 1), rows(gk, 1), rows(gv, 1));
    params.dropout_batch_base = b;
    run_backward(params, q);
  });
}

}  // namespace dattn
