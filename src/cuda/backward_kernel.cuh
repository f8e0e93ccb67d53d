// The fused backward, FlashAttention-2 style from the saved lse: probabilities are recomputed,
// never stored. One launch runs two kinds of block side by side:
//   dk/dv blocks own 64 keys of a group and loop over the query tiles that see them:
//     dV += (P∘Z)ᵀ·dO, dK += dSᵀ·Q;
//   dq blocks own 64 queries and loop over the key tiles they see: dQ += dS·K;
// with dS = P∘(Z∘dP − delta), delta = rowsum(dout∘out) computed in the block (no workspace) or,
// in ring steps, read from softmax_delta; Z the dropout multiplier. Every row of dq, dk, dv is written by exactly one block per launch: no atomics
// and no fp32 accumulator in device memory. Longnet mode runs one launch per branch, each adding
// into what the launches before wrote.
#pragma once

#include "cuda/backward_tile.cuh"
#include "cuda/forward_kernel.cuh"

namespace dattn::cuda {

template <class T, int D, int S, Walk kWalk>
__device__ __forceinline__ void dkdv_block(const detail::DilatedParams& p, bool accumulate, const BlockWork& w,
                                           unsigned char* smem) {
  using Shape = BackwardShape<D, S>;
  using M = MmaType<T>;
  constexpr int BW = Shape::kBlockOwn, BO = Shape::kBlockOther, kStride = Shape::kStride, kRowBytes = kStride * 2;
  constexpr int kThreads = Shape::kThreads, kStages = Shape::kStages;
  std::uint16_t* sK = reinterpret_cast<std::uint16_t*>(smem);
  std::uint16_t* sV = sK + Shape::kOwnElems;
  std::uint16_t* sOther = sV + Shape::kOwnElems;  // [stage][Q, dO, O][plane][row][kStride]
  float* own_key_bias = reinterpret_cast<float*>(sOther + kStages * 3 * Shape::kOtherElems);  // [BW]
  float* other_floats = own_key_bias + Shape::kFloatsOwn;  // [stage][lse BO | delta BO | -]
  auto other = [&](int stage, int which) { return sOther + (stage * 3 + which) * Shape::kOtherElems; };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const std::int64_t kj[2] = {w.tile_begin + warp * 16 + g, w.tile_begin + warp * 16 + g + 8};
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.0f;

  const Side& qs = w.query;
  const auto tiles = other_tiles<BO, kWalk>(p, w);
  const bool delta_given = p.softmax_delta != nullptr;
  // Causal attention under an index map compares original positions, element by element.
  const bool causal_by_position = kWalk == Walk::indexed && p.causal;
  const int key_position[2] = {causal_by_position ? w.position32(w.key, int(kj[0])) : 0,
                               causal_by_position ? w.position32(w.key, int(kj[1])) : 0};
  if (w.tile_rows > 0 && tiles.count > 0) {
    load_rows<T, S, BW, D, kThreads>(sK, Shape::kOwnPlane, p.k, w, w.key, w.tile_begin, w.tile_rows);
    load_rows<T, S, BW, D, kThreads>(sV, Shape::kOwnPlane, p.v, w, w.key, w.tile_begin, w.tile_rows);
    key_bias(p, w, w.tile_begin, w.tile_rows, BW, own_key_bias);
    const int num_tiles = tiles.count;
    auto load_queries = [&](int tile, int stage) {
      const std::int64_t j0 = tiles.start(tile);
      const int valid = tiles.valid(tile);
      load_row_pair<T, S, BO, D, kThreads>(other(stage, 0), other(stage, 1), Shape::kOtherPlane, p.q, p.dout, w, qs, j0,
                                           valid);
      if (!delta_given) load_rows<T, S, BO, D, kThreads>(other(stage, 2), Shape::kOtherPlane, p.out, w, qs, j0, valid);
      for (int c = threadIdx.x; c < BO; c += kThreads) {
        const bool ok = c < valid;
        const std::int64_t row = ok ? w.row(qs, j0 + c) : 0;
        cp_async_4(smem_address(other_floats + stage * 3 * BO + c), lse_pointer(p, w.batch, w.head, row), ok);
        if (delta_given)
          cp_async_4(smem_address(other_floats + stage * 3 * BO + BO + c), delta_pointer(p, w.batch, w.head, row), ok);
        if (causal_by_position)
          reinterpret_cast<int*>(other_floats + stage * 3 * BO + 2 * BO)[c] = ok ? w.position32(qs, int(j0) + c) : 0;
      }
    };
    load_queries(0, 0);
    cp_async_commit();

    float own_bias[2] = {0.0f, 0.0f};
    for (int it = 0; it < num_tiles; ++it) {
      const int stage = kStages == 2 ? it % 2 : 0;
      if constexpr (kStages == 2) {
        if (it + 1 < num_tiles) load_queries(it + 1, (it + 1) % 2);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        if (it > 0) {
          load_queries(it, 0);
          cp_async_commit();
        }
        cp_async_wait<0>();
      }
      __syncthreads();
      const float* lse = other_floats + stage * 3 * BO;
      float* delta = other_floats + stage * 3 * BO + BO;
      const int* query_position = reinterpret_cast<const int*>(other_floats + stage * 3 * BO + 2 * BO);
      if (!delta_given && warp * 16 < BO) {  // delta = rowsum(dO∘O) of 16 queries per warp, as dPᵀ = V·dOᵀ is computed
        float d[2];
        diagonal_dot<M, S, D>(d, smem_address(other(stage, 2) + warp * 16 * kStride),
                              smem_address(other(stage, 1) + warp * 16 * kStride), Shape::kOtherPlane * 2,
                              Shape::kOtherPlane * 2, kRowBytes);
        if (t == 0) {
          delta[warp * 16 + g] = d[0];
          delta[warp * 16 + g + 8] = d[1];
        }
      }
      __syncthreads();
      if (it == 0) {
        own_bias[0] = own_key_bias[warp * 16 + g];
        own_bias[1] = own_key_bias[warp * 16 + g + 8];
      }

      float st[BO / 8][4], dpt[BO / 8][4];
#pragma unroll
      for (int n = 0; n < BO / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.0f;
      gemm_nt<M, S, D, BO>(st, smem_address(sK + warp * 16 * kStride), smem_address(other(stage, 0)),
                           Shape::kOwnPlane * 2, Shape::kOtherPlane * 2, kRowBytes);
      gemm_nt<M, S, D, BO>(dpt, smem_address(sV + warp * 16 * kStride), smem_address(other(stage, 1)),
                           Shape::kOwnPlane * 2, Shape::kOtherPlane * 2, kRowBytes);
      key_tile_gradients<BO, kWalk>(p, w, st, dpt, kj, own_bias, key_position, tiles.start(it), tiles.valid(it), lse,
                                    delta, query_position);
      gemm_pn<M, S, BO, D>(dv, st, smem_address(other(stage, 1)), Shape::kOtherPlane * 2, kRowBytes);
      gemm_pn<M, S, BO, D>(dk, dpt, smem_address(other(stage, 0)), Shape::kOtherPlane * 2, kRowBytes);
      __syncthreads();
    }
  }

  write_gradient_rows<T, D>(p, w, w.key, kj, accumulate, p.dk, dk, p.scale, &p.dv, &dv, p.output_scale);
  if (!accumulate) zero_unselected<T, D, kThreads>(p, w, &p.dk, &p.dv, false);
}

template <class T, int D, int S, Walk kWalk>
__device__ __forceinline__ void dq_block(const detail::DilatedParams& p, bool accumulate, const BlockWork& w,
                                         unsigned char* smem) {
  using Shape = BackwardShape<D, S>;
  using M = MmaType<T>;
  constexpr int BW = Shape::kBlockOwn, BO = Shape::kBlockOther, kStride = Shape::kStride, kRowBytes = kStride * 2;
  constexpr int kThreads = Shape::kThreads, kStages = Shape::kStages;
  std::uint16_t* sQ = reinterpret_cast<std::uint16_t*>(smem);
  std::uint16_t* sdO = sQ + Shape::kOwnElems;
  std::uint16_t* sO = sdO + Shape::kOwnElems;
  std::uint16_t* sOther = sO + Shape::kOwnElems;  // [stage][K, V, -][plane][row][kStride]
  float* other_floats = reinterpret_cast<float*>(sOther + kStages * 3 * Shape::kOtherElems) + Shape::kFloatsOwn;
  auto other = [&](int stage, int which) { return sOther + (stage * 3 + which) * Shape::kOtherElems; };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
  const std::int64_t qi[2] = {w.tile_begin + warp * 16 + g, w.tile_begin + warp * 16 + g + 8};
  float dq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;

  const Side& qs = w.query;
  const auto tiles = other_tiles<BO, kWalk>(p, w);
  const bool delta_given = p.softmax_delta != nullptr;
  const bool causal_by_position = kWalk == Walk::indexed && p.causal;
  const int query_position[2] = {causal_by_position ? w.position32(qs, int(qi[0])) : 0,
                                 causal_by_position ? w.position32(qs, int(qi[1])) : 0};
  if (w.tile_rows > 0 && tiles.count > 0) {
    load_rows<T, S, BW, D, kThreads>(sQ, Shape::kOwnPlane, p.q, w, qs, w.tile_begin, w.tile_rows);
    load_rows<T, S, BW, D, kThreads>(sdO, Shape::kOwnPlane, p.dout, w, qs, w.tile_begin, w.tile_rows);
    if (!delta_given) load_rows<T, S, BW, D, kThreads>(sO, Shape::kOwnPlane, p.out, w, qs, w.tile_begin, w.tile_rows);
    const int num_tiles = tiles.count;
    auto load_keys = [&](int tile, int stage) {
      const std::int64_t k0 = tiles.start(tile);
      const int valid = tiles.valid(tile);
      load_row_pair<T, S, BO, D, kThreads>(other(stage, 0), other(stage, 1), Shape::kOtherPlane, p.k, p.v, w, w.key, k0,
                                           valid);
      key_bias(p, w, k0, valid, BO, other_floats + stage * 3 * BO,
               causal_by_position ? reinterpret_cast<int*>(other_floats + stage * 3 * BO + BO) : nullptr);
    };
    load_keys(0, 0);
    cp_async_commit();

    float lse2[2], delta[2];
    query_rows_lse(p, w, qi, lse2, delta);

    for (int it = 0; it < num_tiles; ++it) {
      const int stage = kStages == 2 ? it % 2 : 0;
      if constexpr (kStages == 2) {
        if (it + 1 < num_tiles) load_keys(it + 1, (it + 1) % 2);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        if (it > 0) load_keys(it, 0);
        cp_async_wait<0>();
      }
      __syncthreads();
      if (it == 0 && !delta_given)  // delta = rowsum(dO∘O) of the own rows, as dP = dO·Vᵀ is computed
        diagonal_dot<M, S, D>(delta, smem_address(sdO + warp * 16 * kStride), smem_address(sO + warp * 16 * kStride),
                              Shape::kOwnPlane * 2, Shape::kOwnPlane * 2, kRowBytes);

      float s[BO / 8][4], dp[BO / 8][4];
#pragma unroll
      for (int n = 0; n < BO / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
      gemm_nt<M, S, D, BO>(s, smem_address(sQ + warp * 16 * kStride), smem_address(other(stage, 0)),
                           Shape::kOwnPlane * 2, Shape::kOtherPlane * 2, kRowBytes);
      gemm_nt<M, S, D, BO>(dp, smem_address(sdO + warp * 16 * kStride), smem_address(other(stage, 1)),
                           Shape::kOwnPlane * 2, Shape::kOtherPlane * 2, kRowBytes);
      const float* bias = other_floats + stage * 3 * BO;
      const int* key_position = reinterpret_cast<const int*>(other_floats + stage * 3 * BO + BO);
      query_tile_gradients<BO, kWalk>(p, w, s, dp, qi, lse2, delta, query_position, tiles.start(it), tiles.valid(it), bias,
                                      key_position);
      gemm_pn<M, S, BO, D>(dq, s, smem_address(other(stage, 0)), Shape::kOtherPlane * 2, kRowBytes);
      __syncthreads();
    }
  }

  write_gradient_rows<T, D>(p, w, w.query, qi, accumulate, p.dq, dq, p.scale, nullptr, nullptr, 0.0f);
  if (!accumulate) zero_unselected<T, D, kThreads>(p, w, &p.dq, nullptr, false);
}

template <class T, int D, int S, Walk kWalk>
__global__ void __launch_bounds__(BackwardShape<D, S>::kThreads)
    backward_kernel(const __grid_constant__ detail::DilatedParams p, const __grid_constant__ LaunchPlan plan) {
  static_assert(BackwardShape<D, S>::kThreads >= BackwardShape<D, S>::kBlockOther &&
                    BackwardShape<D, S>::kThreads >= BackwardShape<D, S>::kBlockOwn,
                "key_bias takes a thread per key row");
  extern __shared__ __align__(16) unsigned char smem[];
  BlockWork w;
  if (!decode<BackwardShape<D, S>::kBlockOwn, kWalk>(p, plan, w)) return;
  if (w.role == kDkDvRole) dkdv_block<T, D, S, kWalk>(p, w.accumulate, w, smem);
  else dq_block<T, D, S, kWalk>(p, w.accumulate, w, smem);
}

template <class T, int D, int S>
void launch_backward(const detail::DilatedParams& params, const LaunchPlan& plan, cudaStream_t stream) {
  using Shape = BackwardShape<D, S>;
  auto kernel = params.block_size > 0              ? backward_kernel<T, D, S, Walk::sparse>
                : params.position_index != nullptr ? backward_kernel<T, D, S, Walk::indexed>
                                                   : backward_kernel<T, D, S, Walk::dilated>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kSmemBytes)) != cudaSuccess)
    check_launch("backward (shared memory attribute)");
  kernel<<<plan.total_blocks, Shape::kThreads, Shape::kSmemBytes, stream>>>(params, plan);
  check_launch("backward");
}

}  // namespace dattn::cuda
