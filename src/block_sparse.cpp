// Block-sparse attention's API: the mask (CSR and its transpose), the named patterns of
// docs/semantics.md, validation and dispatch. The kernels are the dilated kernels' tiles and softmax with
// groups made of allowed blocks (src/cpu/work.hpp).
#include "dattn/block_sparse.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "cpu/cpu_attention.hpp"
#ifdef DATTN_WITH_CUDA
#include "cuda/cuda_attention.hpp"
#endif
#include "dattn/error.hpp"
#include "reference/block_sparse.hpp"
#include "params_of.hpp"
#include "validate.hpp"

namespace dattn {
namespace {

std::string str(std::int64_t x) { return std::to_string(x); }

std::int64_t blocks_of(std::int64_t seqlen, std::int64_t block_size) { return (seqlen + block_size - 1) / block_size; }

Tensor empty_pattern(std::int64_t num_blocks) {
  if (num_blocks < 1) throw Error("num_blocks = " + str(num_blocks) + "; expected >= 1");
  return Tensor::zeros({num_blocks, num_blocks}, DType::boolean);
}

// The mask covers the whole sequence: q's rows, or a ring step's global length, whose query and key
// ranges must then start (and end, unless at the sequence's end) on block boundaries.
void check_mask_for(const BlockSparseConfig& config, const BlockSparseMask& mask, const TensorView& q,
                    const LaunchOptions& options) {
  if (config.block_size < 1) throw Error("block_size = " + str(config.block_size) + "; expected >= 1");
  const std::int64_t N = options.ring_step ? options.ring_step->global_length : q.shape[1];
  if (options.ring_step) {
    const RingStep& step = *options.ring_step;
    auto aligned = [&](std::int64_t row) { return row % config.block_size == 0 || row == N; };
    if (!aligned(step.query_position) || !aligned(step.query_position + q.shape[1]) || !aligned(step.key_begin) ||
        !aligned(step.key_end))
      throw Error("ring_step rows [" + str(step.query_position) + ", " + str(step.query_position + q.shape[1]) +
                  ") and keys [" + str(step.key_begin) + ", " + str(step.key_end) + ") do not lie on blocks of " +
                  str(config.block_size) + "; expected multiples of block_size (or N)");
  }
  const std::int64_t blocks = blocks_of(N, config.block_size);
  if (mask.query_blocks() != blocks || mask.key_blocks() != blocks)
    throw Error("block mask has " + str(mask.query_blocks()) + " x " + str(mask.key_blocks()) + " blocks; expected " +
                str(blocks) + " x " + str(blocks) + " (ceil(N / block_size) with N = " + str(N) + ")");
  if (mask.heads() != 1 && mask.heads() != q.shape[2])
    throw Error("block mask has " + str(mask.heads()) + " heads; expected 1 (shared) or H = " + str(q.shape[2]));
  if (mask.device() != q.device)
    throw Error("block mask is on " + device_name(mask.device()) + " and q on " + device_name(q.device) +
                "; expected the mask on " + device_name(q.device) + " (BlockSparseMask::to_device)");
}

detail::CommonSettings settings_of(const BlockSparseConfig& config) {
  return {config.causal, config.scale, config.key_padding_mask, config.dropout_p, config.dropout_seed,
          config.dropout_offset, false};
}

}  // namespace

detail::DilatedParams detail::block_sparse_params(const BlockSparseConfig& config, const BlockSparseMask& mask,
                                                  const TensorView& q, const TensorView& k, const TensorView& v,
                                                  const TensorView& out, const TensorView& lse,
                                                  const LaunchOptions& options) {
  detail::DilatedParams p = detail::base_params(settings_of(config), q, k, v, out, lse, options);
  p.block_size = config.block_size;
  p.query_blocks = mask.query_blocks();
  p.key_blocks = mask.key_blocks();
  p.block_mask_heads = mask.heads();
  const BlockSparseMask::Arrays arrays = mask.arrays();
  p.block_row_offsets = arrays.row_offsets;
  p.block_columns = arrays.columns;
  p.block_column_offsets = arrays.column_offsets;
  p.block_rows = arrays.rows;
  return p;
}

BlockSparseMask BlockSparseMask::from_dense(const TensorView& mask) {
  if (mask.dtype != DType::boolean)
    throw Error(std::string("block mask has dtype ") + dtype_name(mask.dtype) + "; expected bool");
  if (mask.rank != 2 && mask.rank != 3)
    throw Error("block mask has shape " + mask.shape_string() + "; expected [nqb, nkb] or [H, nqb, nkb]");
  if (mask.device.type != DeviceType::cpu) throw Error("block mask is on " + device_name(mask.device) + "; expected cpu");
  const int first = mask.rank - 2;
  BlockSparseMask m;
  m.heads_ = mask.rank == 3 ? mask.shape[0] : 1;
  m.query_blocks_ = mask.shape[first];
  m.key_blocks_ = mask.shape[first + 1];
  if (m.heads_ < 1 || m.query_blocks_ < 1 || m.key_blocks_ < 1)
    throw Error("block mask has shape " + mask.shape_string() + "; every extent must be >= 1");
  const auto* bits = mask.ptr<std::uint8_t>();
  for (std::int64_t h = 0; h < m.heads_; ++h) {
    for (std::int64_t qb = 0; qb < m.query_blocks_; ++qb) {
      m.row_offsets_.push_back(std::int64_t(m.columns_.size()));
      for (std::int64_t kb = 0; kb < m.key_blocks_; ++kb) {
        const std::int64_t at = (mask.rank == 3 ? h * mask.strides[0] : 0) + qb * mask.strides[first] +
                                kb * mask.strides[first + 1];
        if (bits[at]) m.columns_.push_back(kb);
      }
    }
    m.row_offsets_.push_back(std::int64_t(m.columns_.size()));
  }
  m.build_transpose();
  return m;
}

BlockSparseMask BlockSparseMask::from_csr(std::int64_t heads, std::int64_t query_blocks, std::int64_t key_blocks,
                                          std::vector<std::int64_t> row_offsets,
                                          std::vector<std::int64_t> column_indices) {
  if (heads < 1 || query_blocks < 1 || key_blocks < 1)
    throw Error("CSR block mask: heads, query_blocks and key_blocks must be >= 1");
  if (std::int64_t(row_offsets.size()) != heads * (query_blocks + 1))
    throw Error("CSR row_offsets has " + str(row_offsets.size()) + " entries; expected heads * (query_blocks + 1) = " +
                str(heads * (query_blocks + 1)));
  BlockSparseMask m;
  m.heads_ = heads;
  m.query_blocks_ = query_blocks;
  m.key_blocks_ = key_blocks;
  std::int64_t base = 0;
  for (std::int64_t h = 0; h < heads; ++h) {
    const std::int64_t* offsets = row_offsets.data() + h * (query_blocks + 1);
    if (offsets[0] != 0) throw Error("CSR row_offsets of head " + str(h) + " starts at " + str(offsets[0]) + "; expected 0");
    for (std::int64_t qb = 0; qb < query_blocks; ++qb) {
      if (offsets[qb + 1] < offsets[qb] || base + offsets[qb + 1] > std::int64_t(column_indices.size()))
        throw Error("CSR row_offsets of head " + str(h) + " are not non-decreasing within column_indices");
      m.row_offsets_.push_back(base + offsets[qb]);
      for (std::int64_t e = base + offsets[qb]; e < base + offsets[qb + 1]; ++e) {
        const std::int64_t kb = column_indices[std::size_t(e)];
        if (kb < 0 || kb >= key_blocks || (e > base + offsets[qb] && kb <= column_indices[std::size_t(e - 1)]))
          throw Error("CSR column_indices of head " + str(h) + ", query block " + str(qb) +
                      " must be sorted, unique and in [0, " + str(key_blocks) + ")");
        m.columns_.push_back(kb);
      }
    }
    base += offsets[query_blocks];
    m.row_offsets_.push_back(base);
  }
  if (base != std::int64_t(column_indices.size()))
    throw Error("CSR column_indices has " + str(column_indices.size()) + " entries; the offsets cover " + str(base));
  m.build_transpose();
  return m;
}

void BlockSparseMask::build_transpose() {
  column_offsets_.assign(std::size_t(heads_ * (key_blocks_ + 1)), 0);
  rows_.resize(columns_.size());
  for (std::int64_t h = 0; h < heads_; ++h) {
    std::int64_t* offsets = column_offsets_.data() + h * (key_blocks_ + 1);
    const std::int64_t* row_offsets = row_offsets_.data() + h * (query_blocks_ + 1);
    for (std::int64_t e = row_offsets[0]; e < row_offsets[query_blocks_]; ++e) ++offsets[columns_[e] + 1];
    offsets[0] = row_offsets[0];
    for (std::int64_t kb = 0; kb < key_blocks_; ++kb) offsets[kb + 1] += offsets[kb];
    std::vector<std::int64_t> next(offsets, offsets + key_blocks_);
    for (std::int64_t qb = 0; qb < query_blocks_; ++qb)
      for (std::int64_t e = row_offsets[qb]; e < row_offsets[qb + 1]; ++e) rows_[next[columns_[e]]++] = qb;
  }
}

BlockSparseMask BlockSparseMask::to_device(const Device& device) const {
  BlockSparseMask m = *this;
  m.device_ = device;
  m.device_data_.reset();
  if (device.type == DeviceType::cpu) return m;
#ifdef DATTN_WITH_CUDA
  std::vector<std::int64_t> packed;
  for (const auto* part : {&row_offsets_, &columns_, &column_offsets_, &rows_})
    packed.insert(packed.end(), part->begin(), part->end());
  m.device_data_ = cuda::upload(packed, device.index);
  return m;
#else
  throw Error("BlockSparseMask::to_device(" + device_name(device) + "): this build has no CUDA; expected cpu");
#endif
}

BlockSparseMask::Arrays BlockSparseMask::arrays() const {
  if (!device_data_) return {row_offsets_.data(), columns_.data(), column_offsets_.data(), rows_.data()};
  const std::int64_t* row_offsets = device_data_.get();
  const std::int64_t* columns = row_offsets + row_offsets_.size();
  const std::int64_t* column_offsets = columns + columns_.size();
  return {row_offsets, columns, column_offsets, column_offsets + column_offsets_.size()};
}

bool BlockSparseMask::allowed(std::int64_t head, std::int64_t query_block, std::int64_t key_block) const {
  const std::int64_t row = head * (query_blocks_ + 1) + query_block;
  return std::binary_search(columns_.begin() + row_offsets_[row], columns_.begin() + row_offsets_[row + 1], key_block);
}

void block_sparse_forward(const BlockSparseConfig& config, const BlockSparseMask& mask, const TensorView& q,
                          const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                          const LaunchOptions& options) {
  detail::check_inputs(settings_of(config), q, k, v, out, lse, options);
  check_mask_for(config, mask, q, options);
  if (options.position_index) throw Error("options.position_index is set; block-sparse attention takes no index map");
  if (detail::use_reference(options, q.dtype)) return reference::block_sparse_forward(config, mask, q, k, v, out, lse);
  const detail::DilatedParams p = detail::block_sparse_params(config, mask, q, k, v, out, lse, options);
#ifdef DATTN_WITH_CUDA
  if (q.device.type == DeviceType::cuda) return cuda::forward(p);
#endif
  cpu::forward(p);
}

bool cuda_block_sparse_forward_uses_tma(const BlockSparseConfig& config, const BlockSparseMask& mask,
                                        const TensorView& q, const TensorView& k, const TensorView& v,
                                        const TensorView& out, const TensorView& lse, const LaunchOptions& options) {
  detail::require_cuda_query(q);
  detail::check_inputs(settings_of(config), q, k, v, out, lse, options);
  check_mask_for(config, mask, q, options);
  if (options.position_index) throw Error("options.position_index is set; block-sparse attention takes no index map");
#ifdef DATTN_WITH_CUDA
  if (detail::use_reference(options, q.dtype)) return false;
  return cuda::forward_uses_tma(detail::block_sparse_params(config, mask, q, k, v, out, lse, options));
#else
  throw Error("this build of dattn has no CUDA backend; expected one built with DATTN_CUDA=ON");
#endif
}

void block_sparse_backward(const BlockSparseConfig& config, const BlockSparseMask& mask, const TensorView& q,
                           const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                           const TensorView& dout, const TensorView& dq, const TensorView& dk, const TensorView& dv,
                           const LaunchOptions& options) {
  if (options.ring_step)
    throw Error("options.ring_step is set for block_sparse_backward; expected no ring_step (a ring backward step is "
                "block_sparse_ring_query_gradients and block_sparse_ring_key_gradients)");
  detail::check_inputs(settings_of(config), q, k, v, out, lse, options);
  detail::check_gradients(q, k, dout, dq, dk, dv);
  check_mask_for(config, mask, q, options);
  if (options.position_index) throw Error("options.position_index is set; block-sparse attention takes no index map");
  if (detail::use_reference(options, q.dtype))
    return reference::block_sparse_backward(config, mask, q, k, v, dout, dq, dk, dv);
  detail::DilatedParams p = detail::block_sparse_params(config, mask, q, k, v, out, lse, options);
  detail::set_gradients(p, dout, dq, dk, dv);
#ifdef DATTN_WITH_CUDA
  if (q.device.type == DeviceType::cuda) {
    detail::set_backward_workspace(p, q, out, dout, options);
    return cuda::backward(p);
  }
#endif
  cpu::backward(p);
}

bool cuda_block_sparse_backward_uses_tma(const BlockSparseConfig& config, const BlockSparseMask& mask,
                                         const TensorView& q, const TensorView& k, const TensorView& v,
                                         const TensorView& out, const TensorView& lse, const TensorView& dout,
                                         const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                         const LaunchOptions& options) {
  detail::require_cuda_query(q);
  detail::check_inputs(settings_of(config), q, k, v, out, lse, options);
  detail::check_gradients(q, k, dout, dq, dk, dv);
  check_mask_for(config, mask, q, options);
  if (options.position_index) throw Error("options.position_index is set; block-sparse attention takes no index map");
#ifdef DATTN_WITH_CUDA
  if (detail::use_reference(options, q.dtype)) return false;
  detail::DilatedParams p = detail::block_sparse_params(config, mask, q, k, v, out, lse, options);
  detail::set_gradients(p, dout, dq, dk, dv);
  return cuda::backward_uses_tma(p);
#else
  throw Error("this build of dattn has no CUDA backend; expected one built with DATTN_CUDA=ON");
#endif
}

void block_sparse_ring_query_gradients(const BlockSparseConfig& config, const BlockSparseMask& mask,
                                       const RingStep& step, const TensorView& q, const TensorView& k,
                                       const TensorView& v, const TensorView& dout, const TensorView& lse,
                                       const RingQueryGradients& sums) {
  LaunchOptions options;
  options.ring_step = step;
  detail::check_inputs(settings_of(config), q, k, v, dout, lse, options);
  check_mask_for(config, mask, q, options);
  detail::check_accumulator("sum_gk", sums.sum_gk, q, q.shape[1]);
  detail::check_accumulator("sum_pk", sums.sum_pk, q, q.shape[1]);
  detail::check_delta(sums.delta, q);
  detail::DilatedParams p = detail::block_sparse_params(config, mask, q, k, v, dout, lse, options);
  detail::set_ring_query_pass(p, dout, sums);
  cpu::backward(p);
}

void block_sparse_ring_finish_query_gradients(const BlockSparseConfig& config, const RingQueryGradients& sums,
                                              const TensorView& dq) {
  detail::finish_query_gradients(config.scale, sums, dq);
}

void block_sparse_ring_key_gradients(const BlockSparseConfig& config, const BlockSparseMask& mask, const RingStep& step,
                                     const TensorView& q, const TensorView& k, const TensorView& v,
                                     const TensorView& dout, const TensorView& lse, const TensorView& delta,
                                     const TensorView& dk, const TensorView& dv) {
  LaunchOptions options;
  options.ring_step = step;
  detail::check_inputs(settings_of(config), q, k, v, dout, lse, options);
  check_mask_for(config, mask, q, options);
  detail::check_delta(delta, q);
  detail::check_accumulator("dk", dk, k, k.shape[1]);
  detail::check_accumulator("dv", dv, k, k.shape[1]);
  detail::DilatedParams p = detail::block_sparse_params(config, mask, q, k, v, dout, lse, options);
  detail::set_ring_key_pass(p, dout, delta, dk, dv);
  cpu::backward(p);
}

void block_sparse_ring_forward_step(const BlockSparseConfig& config, const BlockSparseMask& mask, const RingStep& step,
                                    const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView& out, const TensorView& lse, void* stream) {
  detail::check_accumulator("out", out, q, q.shape[1]);
  LaunchOptions options;
  options.ring_step = step;
  options.stream = stream;
#ifdef DATTN_WITH_CUDA
  if (q.device.type == DeviceType::cuda) {
    TensorView like_q_out = out;  // check_inputs compares out with q: give it q's dtype
    like_q_out.dtype = q.dtype;
    detail::check_inputs(settings_of(config), q, k, v, like_q_out, lse, options);
    check_mask_for(config, mask, q, options);
    detail::DilatedParams p = detail::block_sparse_params(config, mask, q, k, v, out, lse, options);
    p.float32_outputs = true;
    return cuda::forward(p);
  }
#endif
  Tensor part = Tensor::empty({q.shape[0], q.shape[1], q.shape[2], q.shape[3]}, q.dtype);
  Tensor part_lse = Tensor::empty({q.shape[0], q.shape[2], q.shape[1]}, DType::float32);
  block_sparse_forward(config, mask, q, k, v, part, part_lse, options);
  merge_partial(out, lse, part, part_lse);
}

void block_sparse_ring_step_gradients(const BlockSparseConfig& config, const BlockSparseMask& mask,
                                      const RingStep& step, const TensorView& q, const TensorView& k,
                                      const TensorView& v, const TensorView& dout, const TensorView& lse,
                                      const TensorView& delta, const TensorView& dq, const TensorView& dk,
                                      const TensorView& dv, void* stream) {
  detail::check_delta(delta, q);
  detail::check_accumulator("dq", dq, q, q.shape[1]);
#ifdef DATTN_WITH_CUDA
  if (q.device.type == DeviceType::cuda) {
    LaunchOptions options;
    options.ring_step = step;
    options.stream = stream;
    detail::check_inputs(settings_of(config), q, k, v, dout, lse, options);
    check_mask_for(config, mask, q, options);
    detail::check_accumulator("dk", dk, k, k.shape[1]);
    detail::check_accumulator("dv", dv, k, k.shape[1]);
    detail::DilatedParams p = detail::block_sparse_params(config, mask, q, k, v, dout, lse, options);
    detail::set_step_gradients(p, dout, delta, dq, dk, dv);
    return cuda::backward(p);
  }
#endif
  if (stream != nullptr) throw Error("stream is set for cpu tensors; expected nullptr (streams are for CUDA tensors)");
  const std::int64_t B = q.shape[0], N = q.shape[1], H = q.shape[2], D = q.shape[3];
  Tensor sum_gk = Tensor::zeros({B, N, H, D}, DType::float32), sum_pk = Tensor::zeros({B, N, H, D}, DType::float32);
  Tensor step_delta = Tensor::zeros({B, H, N}, DType::float32);
  block_sparse_ring_query_gradients(config, mask, step, q, k, v, dout, lse, {sum_gk, sum_pk, step_delta});
  detail::add_query_gradients(config.scale, {sum_gk, sum_pk, delta}, dq);
  block_sparse_ring_key_gradients(config, mask, step, q, k, v, dout, lse, delta, dk, dv);
}

Tensor local_window_pattern(std::int64_t num_blocks, std::int64_t window, std::int64_t block_size) {
  if (window < 0 || block_size < 1) throw Error("local_window: window must be >= 0 and block_size >= 1");
  Tensor mask = empty_pattern(num_blocks);
  const std::int64_t half = window / block_size / 2;
  for (std::int64_t i = 0; i < num_blocks; ++i)
    for (std::int64_t j = std::max<std::int64_t>(0, i - half); j <= std::min(num_blocks - 1, i + half); ++j)
      mask.data<std::uint8_t>()[i * num_blocks + j] = 1;
  return mask;
}

Tensor dilated_sparse_pattern(std::int64_t num_blocks, const std::vector<std::int64_t>& rates) {
  Tensor mask = empty_pattern(num_blocks);
  for (std::int64_t rate : rates)
    if (rate < 1) throw Error("dilated_sparse: rate " + str(rate) + "; expected rates >= 1");
  for (std::int64_t i = 0; i < num_blocks; ++i) {
    mask.data<std::uint8_t>()[i * num_blocks + i] = 1;
    for (std::int64_t rate : rates) {
      if (i - rate >= 0) mask.data<std::uint8_t>()[i * num_blocks + i - rate] = 1;
      if (i + rate < num_blocks) mask.data<std::uint8_t>()[i * num_blocks + i + rate] = 1;
    }
  }
  return mask;
}

Tensor global_local_pattern(std::int64_t num_blocks, std::int64_t window, std::int64_t global_blocks,
                            std::int64_t block_size) {
  if (global_blocks < 0) throw Error("global_local: global_blocks = " + str(global_blocks) + "; expected >= 0");
  Tensor mask = local_window_pattern(num_blocks, window, block_size);
  for (std::int64_t g = 0; g < std::min(global_blocks, num_blocks); ++g)
    for (std::int64_t j = 0; j < num_blocks; ++j) {
      mask.data<std::uint8_t>()[g * num_blocks + j] = 1;
      mask.data<std::uint8_t>()[j * num_blocks + g] = 1;
    }
  return mask;
}

Tensor dilated_pattern(std::int64_t seqlen, const std::vector<std::int64_t>& segment_lengths,
                       const std::vector<std::int64_t>& dilation_rates, std::int64_t block_size) {
  detail::check_config(DilatedConfig{segment_lengths, dilation_rates});
  if (block_size < 1 || seqlen < 1) throw Error("dilated pattern: seqlen and block_size must be >= 1");
  const std::int64_t nb = blocks_of(seqlen, block_size);
  Tensor mask = empty_pattern(nb);
  for (std::size_t i = 0; i < segment_lengths.size(); ++i) {
    if (segment_lengths[i] % block_size != 0)
      throw Error("segment_lengths[" + str(i) + "] = " + str(segment_lengths[i]) + " is not a multiple of block_size " +
                  str(block_size));
    const std::int64_t segment = segment_lengths[i] / block_size, r = dilation_rates[i], offset = std::int64_t(i) % r;
    for (std::int64_t start = 0; start < nb; start += segment) {
      const std::int64_t end = std::min(start + segment, nb);
      for (std::int64_t qb = start + offset; qb < end; qb += r)
        for (std::int64_t kb = start + offset; kb < end; kb += r) mask.data<std::uint8_t>()[qb * nb + kb] = 1;
    }
  }
  return mask;
}

double block_sparse_forward_flops(const BlockSparseMask& mask, std::int64_t block_size, bool causal,
                                  std::int64_t batch, std::int64_t seqlen, std::int64_t heads, std::int64_t head_dim) {
  double pairs = 0;
  for (std::int64_t h = 0; h < heads; ++h) {
    const std::int64_t mh = mask.heads() == 1 ? 0 : h;
    for (std::int64_t qb = 0; qb < mask.query_blocks(); ++qb) {
      const std::int64_t q0 = qb * block_size, q1 = std::min(seqlen, q0 + block_size);
      const std::int64_t row = mh * (mask.query_blocks() + 1) + qb;
      for (std::int64_t e = mask.row_offsets()[row]; e < mask.row_offsets()[row + 1]; ++e) {
        const std::int64_t k0 = mask.columns()[e] * block_size, k1 = std::min(seqlen, k0 + block_size);
        for (std::int64_t i = q0; i < q1; ++i)
          pairs += causal ? double(std::clamp<std::int64_t>(i + 1 - k0, 0, k1 - k0)) : double(k1 - k0);
      }
    }
  }
  return 4.0 * double(batch) * pairs * double(head_dim);
}

}  // namespace dattn
