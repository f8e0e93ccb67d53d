#include "reference/block_sparse.hpp"

#include <cmath>
#include <vector>

#include "reference/softmax.hpp"

namespace dattn::reference {
namespace {

Problem problem(const BlockSparseConfig& c, const TensorView& q, const TensorView& k, std::int64_t batch_base) {
  return {q.shape[0], q.shape[1], q.shape[2], q.shape[3], c.scale.value_or(1.0 / std::sqrt(double(q.shape[3]))),
          c.causal, c.key_padding_mask, c.dropout_p, c.dropout_seed, c.dropout_offset, nullptr, q.shape[2] / k.shape[2],
          batch_base};
}

KeySets allowed_keys(const Problem& P, const BlockSparseMask& mask, std::int64_t block_size) {
  return [&P, &mask, block_size](std::int64_t b, std::int64_t h, std::int64_t p) {
    std::vector<std::int64_t> keys;
    for (std::int64_t key = 0; key < P.N; ++key)
      if (mask.allowed(mask.heads() == 1 ? 0 : h, p / block_size, key / block_size) && P.visible(b, p, key))
        keys.push_back(key);
    return keys;
  };
}

}  // namespace

void block_sparse_forward(const BlockSparseConfig& config, const BlockSparseMask& mask, const TensorView& q,
                          const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
                          std::int64_t dropout_batch_base) {
  const Problem P = problem(config, q, k, dropout_batch_base);
  multiset_forward(P, allowed_keys(P, mask, config.block_size), 1.0, q, k, v, out, lse);
}

void block_sparse_backward(const BlockSparseConfig& config, const BlockSparseMask& mask, const TensorView& q,
                           const TensorView& k, const TensorView& v, const TensorView& dout, const TensorView& dq,
                           const TensorView& dk, const TensorView& dv, std::int64_t dropout_batch_base) {
  const Problem P = problem(config, q, k, dropout_batch_base);
  multiset_backward(P, allowed_keys(P, mask, config.block_size), 1.0, q, k, v, dout, dq, dk, dv);
}

}  // namespace dattn::reference
