// The sm90 backward (Hopper, sm_90a, 16-bit types): the sm80 backward's two kinds of block
// (backward_kernel.cuh: dk/dv blocks own keys and loop over the query tiles that see them, dq
// blocks own queries and loop over key tiles; every gradient row written by one block, no atomics)
// with the products on warpgroup MMA, in the forward's warp-specialised shape. Warpgroup 0
// produces: it loads the block's 128 own rows (K and V, or Q and dO) with the first tile, then each
// 64-row tile of the other side (Q, dO, lse and delta, or K, V and the key bias) by cp.async, or
// Q, K, V and dO by TMA where the forward's TMA loads cover the call (produce_backward_tma), into a
// ring of stages in wgmma's 128-byte swizzled layout, and writes the unselected rows of the
// block's region. Warpgroups 1 and 2 consume, 64 own rows each:
//   dk/dv: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ from shared memory; dV += (P∘Z)ᵀ·dO and dK += dSᵀ·Q with the
//          left operand in registers and Q, dO MN-major;
//   dq:    S = Q·Kᵀ and dP = dO·Vᵀ; dQ += dS·K, K MN-major.
// delta = rowsum(dO∘O) is read where it is given (the backward's workspace pass, or the ring's);
// without it the producer computes it for each tile of queries (dk/dv blocks) and the consumers
// for their own rows (dq blocks), from dO and O in global memory.
// With dQ by atomics (kAtomicDq: dilated walks, BackwardDq::atomic) there are no dq blocks: the
// dk/dv blocks also form dQ = dS·K for each query tile (both consumers write their dSᵀ to shared
// memory; at head dim 64 one consumer per tile, alternating, multiplies the block's 128 keys, at
// 128 each consumer one 64-column half) and add it into the group's float32 scratch slot by one
// bulk reduction per tile; the group's last block to finish writes dq from the slot
// (dq_atomic.cuh): five products per pair of tiles instead of seven, and no second pass. There a
// dk/dv block of the TMA instances' dilated walk may also work through two own tiles one after
// another (LaunchPlan::passes): both tiles' K and V load with the first tile of queries, the stage
// ring and the dSᵀ exchange's alternation run on across them, and the group counts blocks.
#pragma once

#include <type_traits>

#include "cuda/backward_tile.cuh"
#include "cuda/sm90/dq_atomic.cuh"
#include "cuda/sm90/forward_kernel.cuh"

namespace dattn::cuda::sm90 {

// The shared memory of a backward block: the own tiles, per stage the other side's two tiles and
// three float columns of its rows (lse, delta, positions; or key bias, positions), the own keys'
// bias, then the stages' barriers, as in the forward (full: copies landed; keys: the producer's
// plain stores; empty: both consumers done).
template <int D>
struct BackwardStages {
  using Shape = Sm90BackwardShape<D>;
  unsigned char* own_a;    // K (dk/dv blocks) or Q (dq blocks)
  unsigned char* own_b;    // V or dO
  unsigned char* other_a;  // per stage: Q or K
  unsigned char* other_b;  // per stage: dO or V
  unsigned char* scores_gradient;  // two buffers of dSᵀ (dQ by atomics)
  float* dq_staging;               // per consumer a dQ tile (dQ by atomics, bulk reduction)
  float* floats;           // per stage [3][kBlockOther]
  float* own_bias;         // [kBlockOwn]
  std::uint64_t* full;
  std::uint64_t* keys;
  std::uint64_t* empty;
  void* work;  // the block's decoded work (SharedBackwardWork)
  __device__ explicit BackwardStages(unsigned char* raw) {
    unsigned char* base = raw + ((1024 - smem_address(raw) % 1024) % 1024);
    own_a = base;
    own_b = own_a + Shape::kOwnBytes;
    other_a = own_a + Shape::kOwnBuffers * 2 * Shape::kOwnBytes;
    other_b = other_a + Shape::kStages * Shape::kOtherBytes;
    scores_gradient = other_b + Shape::kStages * Shape::kOtherBytes;
    dq_staging = reinterpret_cast<float*>(scores_gradient + 2 * Shape::kScoresGradientBytes);
    floats = dq_staging + Shape::kConsumers * Shape::kDqStagingBytes / 4;
    own_bias = floats + Shape::kStages * 3 * Shape::kBlockOther;
    full = reinterpret_cast<std::uint64_t*>(own_bias + Shape::kOwnBuffers * Shape::kBlockOwn);
    keys = full + Shape::kStages;
    empty = keys + Shape::kStages;
    work = empty + Shape::kStages;
  }
  // Pass `pass`'s own tiles (LaunchPlan::passes) and their keys' bias.
  __device__ unsigned char* own_a_of(int pass) const { return own_a + pass * 2 * Shape::kOwnBytes; }
  __device__ unsigned char* own_b_of(int pass) const { return own_b + pass * 2 * Shape::kOwnBytes; }
  __device__ float* own_bias_of(int pass) const { return own_bias + pass * Shape::kBlockOwn; }
  __device__ unsigned char* a(int stage) const { return other_a + stage * Shape::kOtherBytes; }
  __device__ unsigned char* b(int stage) const { return other_b + stage * Shape::kOtherBytes; }
  __device__ float* column(int stage, int which) const { return floats + (stage * 3 + which) * Shape::kBlockOther; }
};

// A stage's float columns of the other side's rows [j0, j0 + valid): for dk/dv blocks the queries'
// lse and delta (cp.async; delta computed from dO and O where none is given) and, for causality
// under an index map, positions; for dq blocks the keys' bias (and positions). known_row: this
// thread's row of the tile where the caller looked it up already (produce_backward under an index
// map, a tile ahead), else -1.
template <class T, int D, Walk kWalk>
__device__ __forceinline__ void produce_columns(const detail::DilatedParams& p, const BlockWork& w, const Side& other,
                                                std::int64_t j0, int valid, int stage, bool keys_own,
                                                bool causal_by_position, bool delta_given, const BackwardStages<D>& st,
                                                int known_row = -1) {
  constexpr int BO = Sm90BackwardShape<D>::kBlockOther;
  if (keys_own) {
    const int c = threadIdx.x;
    if (c < BO) {
      const bool ok = c < valid;
      const std::int64_t row = !ok ? 0 : known_row >= 0 ? known_row : w.row(other, j0 + c);
      cp_async_4(smem_address(st.column(stage, 0) + c), lse_pointer(p, w.batch, w.head, row), ok);
      if (delta_given)
        cp_async_4(smem_address(st.column(stage, 1) + c), delta_pointer(p, w.batch, w.head, row), ok);
      if (causal_by_position)
        reinterpret_cast<int*>(st.column(stage, 2))[c] = ok ? w.position32(other, int(j0) + c) : 0;
    }
    if (!delta_given) {  // two threads a row; a plain store, released by the keys barrier
      static_assert(2 * BO == 128, "two producer threads per query row");
      const int row = threadIdx.x / 2, part = threadIdx.x % 2;
      float sum = row < valid ? row_delta_part<T, D, 2>(p, w, other, j0 + row, part) : 0.0f;
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      if (part == 0) st.column(stage, 1)[row] = sum;
    }
  } else {
    key_bias(p, w, j0, valid, BO, st.column(stage, 0),
             causal_by_position ? reinterpret_cast<int*>(st.column(stage, 1)) : nullptr);
  }
}

// Warpgroup 0: the own tiles with the first stage, then every tile of the other side.
template <class T, int D, Walk kWalk, class Tiles>
__device__ __forceinline__ void produce_backward(const detail::DilatedParams& p, const BlockWork& w, const Tiles& tiles,
                                                 int num_tiles, const BackwardStages<D>& st) {
  using Shape = Sm90BackwardShape<D>;
  constexpr int BW = Shape::kBlockOwn, BO = Shape::kBlockOther, kStages = Shape::kStages;
  constexpr TileLayout kSwizzled = TileLayout::swizzled;
  const bool keys_own = w.role == kDkDvRole;
  const bool causal_by_position = kWalk == Walk::indexed && p.causal;
  const bool delta_given = p.softmax_delta != nullptr;
  const Side own = keys_own ? w.key : w.query;  // copies: registers, not w's local memory
  const Side other = keys_own ? w.query : w.key;
  // Under an index map thread t looks other row t up for its warp's copies (gather_row_pair) and the
  // lse and delta copies, the lookup for tile it + 1 in flight while tile it's copies are issued.
  int next_other_row = kWalk == Walk::indexed ? gathered_row(w, other, tiles, num_tiles, 0) : 0;
  for (int it = 0; it < num_tiles; ++it) {
    const int stage = it % kStages;
    const int other_row_here = next_other_row;
    if constexpr (kWalk == Walk::indexed) next_other_row = gathered_row(w, other, tiles, num_tiles, it + 1);
    wait_stage_reusable<kStages>(st, it);
    if (it == 0) {
      auto* own_a = reinterpret_cast<std::uint16_t*>(st.own_a);
      auto* own_b = reinterpret_cast<std::uint16_t*>(st.own_b);
      const detail::Operand& x = keys_own ? p.k : p.q;
      const detail::Operand& y = keys_own ? p.v : p.dout;
      // Under an index map thread t looks own row t up once, before any copy (load_row_pair looks a
      // row up before each of its copies, one load latency per copy at the block's start).
      static_assert(BW <= 128, "one own row per producer thread");
      if constexpr (kWalk == Walk::indexed)
        gather_row_pair<T, BW, D>(own_a, own_b, x, y, w, w.tile_rows,
                                  int(threadIdx.x) < w.tile_rows ? w.row32(own, int(w.tile_begin) + int(threadIdx.x)) : 0);
      else
        load_row_pair<T, 1, BW, D, 128, kSwizzled>(own_a, own_b, 0, x, y, w, own, w.tile_begin, w.tile_rows);
      if (keys_own) key_bias(p, w, w.tile_begin, w.tile_rows, BW, st.own_bias);
    }
    const std::int64_t j0 = tiles.start(it);
    const int valid = tiles.valid(it);
    auto* a_tile = reinterpret_cast<std::uint16_t*>(st.a(stage));
    auto* b_tile = reinterpret_cast<std::uint16_t*>(st.b(stage));
    const detail::Operand& a = keys_own ? p.q : p.k;
    const detail::Operand& b = keys_own ? p.dout : p.v;
    if constexpr (kWalk == Walk::indexed) gather_row_pair<T, BO, D>(a_tile, b_tile, a, b, w, valid, other_row_here);
    else load_row_pair<T, 1, BO, D, 128, kSwizzled>(a_tile, b_tile, 0, a, b, w, other, j0, valid);
    produce_columns<T, D, kWalk>(p, w, other, j0, valid, stage, keys_own, causal_by_position, delta_given, st,
                                 kWalk == Walk::indexed ? other_row_here : -1);
    cp_async_arrive(st.full + stage);
    barrier_arrive(st.keys + stage);
  }
  wait_last_arrivals<kStages>(st, num_tiles);
}

// Warpgroup 0 of the backward's TMA instances (the calls sm90_backward_tma_covers admits): as
// produce_backward, but Q, K, V and dO come by TMA on the stage's `full` barrier. The dilated and
// sparse walks: thread 0 announces the boxes' bytes and issues them (the own side's 128 rows as
// two 64-row boxes with the first tile, then each 64-row tile of the other side) at map coordinates
// (column, head, first mod r, first / r + j, batch); an index map's rows, which lie anywhere, come
// by produce_backward (sm90_backward_tma_covers admits none). Each thread still arrives once per
// phase on `full` when its cp.async copies (lse, delta) land, so the phase waits for both. Rows past a side's end that a box brought in (the
// next segment's) are zeroed once they have landed, and rows no copy writes at once, as the
// cp.async producer zero-fills them: no product may meet them (0 · NaN).
// passes: own tiles of 128 rows the block works through one after another (LaunchPlan::passes),
// all loaded with the first tile; the other side's tiles come again for each (ring tile g).
template <class T, int D, Walk kWalk, class Tiles>
__device__ __forceinline__ void produce_backward_tma(const detail::DilatedParams& p, const BlockWork& w,
                                                     const Tiles& tiles, int num_tiles, int passes,
                                                     const BackwardStages<D>& st, const BackwardTensorMaps& maps) {
  using Shape = Sm90BackwardShape<D>;
  constexpr int BW = Shape::kBlockOwn, BO = Shape::kBlockOther, kStages = Shape::kStages;
  constexpr std::uint32_t kRowBytes = 128 * (D / 64);  // one row's boxes
  static_assert(BW == 128 && BO <= 128, "an own row per producer thread; an other row per thread below BO");
  static_assert(kWalk != Walk::indexed, "an index map's rows come by cp.async (produce_backward)");
  const bool keys_own = w.role == kDkDvRole;
  const bool delta_given = p.softmax_delta != nullptr;
  const Side own = keys_own ? w.key : w.query;  // copies: registers, not w's local memory
  const Side other = keys_own ? w.query : w.key;
  const CUtensorMap* own_a = keys_own ? &maps.k[w.branch] : &maps.q[w.branch];
  const CUtensorMap* own_b = keys_own ? &maps.v[w.branch] : &maps.dout[w.branch];
  const CUtensorMap* other_a = keys_own ? &maps.q[w.branch] : &maps.k[w.branch];
  const CUtensorMap* other_b = keys_own ? &maps.dout[w.branch] : &maps.v[w.branch];
  const int query_head = int(w.head), key_head = int(operand_head(p.k, w.head));
  const int own_head = keys_own ? key_head : query_head, other_head = keys_own ? query_head : key_head;
  const int t = int(threadIdx.x);
  if (t == 0) {
    prefetch_tensor_map(own_a);
    prefetch_tensor_map(own_b);
    prefetch_tensor_map(other_a);
    prefetch_tensor_map(other_b);
  }
  for (int g = 0; g < passes * num_tiles; ++g) {
    const int it = g % num_tiles, stage = g % kStages;
    wait_stage_reusable<kStages>(st, g);
    const std::int64_t j0 = tiles.start(it);
    const int valid = tiles.valid(it);
    std::uint64_t* full = st.full + stage;
    const std::uint32_t to_a = smem_address(st.a(stage)), to_b = smem_address(st.b(stage));
    if (t == 0) {
      // Both sides' tensor rows are positions less row_offset (0, or minus a packed sequence's first
      // row), read from w here: no thread keeps it through the loop.
      const unsigned r = unsigned(w.stride), row_base = unsigned(-w.query.row_offset);
      const int batch_here = map_batch_coordinate(p, w.batch);
      barrier_expect_tx(full, std::uint32_t(2 * BO + (g == 0 ? passes * 2 * BW : 0)) * kRowBytes);
      if (g == 0) {
        const unsigned first = unsigned(own.first) + row_base;
        const int offset = int(first % r), row = int(first / r) + int(w.tile_begin);
        for (int pass = 0; pass < passes; ++pass) {
          const std::uint32_t own_to_a = smem_address(st.own_a_of(pass)), own_to_b = smem_address(st.own_b_of(pass));
#pragma unroll
          for (int h = 0; h < BW / BO; ++h)
#pragma unroll
            for (int c = 0; c < D / 64; ++c) {
              const std::uint32_t at = (c * BW + h * BO) * 128;
              const int own_row = row + pass * BW + h * BO;
              tma_load_5d(own_to_a + at, own_a, c * 64, own_head, offset, own_row, batch_here, full);
              tma_load_5d(own_to_b + at, own_b, c * 64, own_head, offset, own_row, batch_here, full);
            }
        }
      }
      const unsigned first = unsigned(other.first) + row_base;
      const int offset = int(first % r), row = int(first / r) + int(j0);
#pragma unroll
      for (int c = 0; c < D / 64; ++c) {
        tma_load_5d(to_a + c * BO * 128, other_a, c * 64, other_head, offset, row, batch_here, full);
        tma_load_5d(to_b + c * BO * 128, other_b, c * 64, other_head, offset, row, batch_here, full);
      }
    }
    // Pass `pass`'s own rows (with the first tile only), the last pass's maybe short.
    auto own_rows = [&](int pass) { return g == 0 ? min(w.tile_rows - pass * BW, BW) : 0; };
    if (g == 0 && keys_own)
      for (int pass = 0; pass < passes; ++pass)
        key_bias(p, w, w.tile_begin + pass * BW, own_rows(pass), BW, st.own_bias_of(pass));
    produce_columns<T, D, kWalk>(p, w, other, j0, valid, stage, keys_own, false, delta_given, st, -1);
    cp_async_arrive(full);
    const int last_own_rows = own_rows(passes - 1);
    const bool own_short = last_own_rows > 0 && last_own_rows < BW, other_short = valid < BO;
    if (own_short || other_short) {
      barrier_wait(full, (g / kStages) & 1);  // the boxes have landed
      if (own_short) zero_rows<BW, D>(st.own_a_of(passes - 1), st.own_b_of(passes - 1), last_own_rows);
      if (other_short) zero_rows<BO, D>(st.a(stage), st.b(stage), valid);
      fence_async_shared();  // the zeros, before the consumers' wgmma reads
    }
    barrier_arrive(st.keys + stage);
  }
  wait_last_arrivals<kStages>(st, passes * num_tiles);
}

// Issues C = A·Bᵀ for the warpgroup's 64 own rows (A: the own tile, 128 rows a column block)
// against a 64-row tile of the other side (B), both K-major.
template <class T, int D>
__device__ __forceinline__ void issue_products(float (&c)[Sm90BackwardShape<D>::kBlockOther / 8][4], std::uint32_t a,
                                               std::uint32_t b) {
  issue_scores<T, D, Sm90BackwardShape<D>::kBlockOwn, Sm90BackwardShape<D>::kBlockOther>(c, a, b);
}

// A consumer's wait for a stage, and its hand-back (first waiting for the phase of its previous
// arrival on that stage, as compute-sanitizer's synccheck expects).
template <int D>
__device__ __forceinline__ void wait_stage(const BackwardStages<D>& st, int it) {
  constexpr int kStages = Sm90BackwardShape<D>::kStages;
  barrier_wait(st.full + it % kStages, (it / kStages) & 1);
  barrier_wait(st.keys + it % kStages, (it / kStages) & 1);
  fence_async_shared();
}
template <int D>
__device__ __forceinline__ void release_stage(const BackwardStages<D>& st, int it) {
  constexpr int kStages = Sm90BackwardShape<D>::kStages;
  if (it >= kStages) barrier_wait(st.empty + it % kStages, (it / kStages + 1) & 1);
  barrier_arrive(st.empty + it % kStages);
}
template <int D>
__device__ __forceinline__ void drain_stages(const BackwardStages<D>& st, int num_tiles) {
  constexpr int kStages = Sm90BackwardShape<D>::kStages;
  for (int it = num_tiles > kStages ? num_tiles - kStages : 0; it < num_tiles; ++it)
    barrier_wait(st.empty + it % kStages, (it / kStages) & 1);
}

// Warpgroups 1 and 2 of a dk/dv block: 64 keys each.
template <class T, int D, Walk kWalk, bool kAtomicDq, class Tiles>
__device__ __forceinline__ void consume_keys(const detail::DilatedParams& p, bool accumulate, const BlockWork& w,
                                             const Tiles& tiles, int num_tiles, int passes,
                                             const BackwardStages<D>& st, float* dq_slot) {
  constexpr int BO = Sm90BackwardShape<D>::kBlockOther, BW = Sm90BackwardShape<D>::kBlockOwn;
  // The warpgroup as a value the compiler knows is warp-uniform (a shuffle from lane 0): the
  // descriptors built from it then stay in uniform registers instead of one move per wgmma.
  const int warpgroup = __shfl_sync(0xffffffffu, int(threadIdx.x / 128), 0) - 1;
  const int warp = threadIdx.x / 32 % 4, g = threadIdx.x % 32 / 4;
  const int own_row = warpgroup * 64 + warp * 16 + g;  // of the pass's tile
  const bool causal_by_position = kWalk == Walk::indexed && p.causal;
  // Pass after pass (the block's own tiles, LaunchPlan::passes) the same tiles of queries; r counts
  // the stage ring's tiles across passes.
  for (int pass = 0; pass < passes; ++pass) {
    const std::int64_t kj[2] = {w.tile_begin + pass * BW + own_row, w.tile_begin + pass * BW + own_row + 8};
    const int key_position[2] = {causal_by_position ? w.position32(w.key, int(kj[0])) : 0,
                                 causal_by_position ? w.position32(w.key, int(kj[1])) : 0};
    const std::uint32_t own_k = smem_address(st.own_a_of(pass)) + warpgroup * 64 * 128;
    const std::uint32_t own_v = smem_address(st.own_b_of(pass)) + warpgroup * 64 * 128;
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.0f;
    float own_bias[2] = {0.0f, 0.0f};
    for (int it = 0; it < num_tiles; ++it) {
      const int r = pass * num_tiles + it, stage = r % Sm90BackwardShape<D>::kStages;
      wait_stage(st, r);
      if (it == 0) {
        own_bias[0] = st.own_bias_of(pass)[own_row];
        own_bias[1] = st.own_bias_of(pass)[own_row + 8];
      }
      const std::uint32_t q_tile = smem_address(st.a(stage)), dout_tile = smem_address(st.b(stage));
      float s[BO / 8][4], dp[BO / 8][4];
      wgmma_fence();
      issue_products<T, D>(s, own_k, q_tile);
      issue_products<T, D>(dp, own_v, dout_tile);
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers(reinterpret_cast<Flat<BO / 2>&>(s));
      fence_registers(reinterpret_cast<Flat<BO / 2>&>(dp));
      key_tile_gradients<BO, kWalk>(p, w, s, dp, kj, own_bias, key_position, tiles.start(it), tiles.valid(it),
                                    st.column(stage, 0), st.column(stage, 1),
                                    reinterpret_cast<const int*>(st.column(stage, 2)));
      std::uint32_t probabilities[BO / 16][4], scores_gradient[BO / 16][4];
      pack_probabilities<T, BO>(s, probabilities);
      pack_probabilities<T, BO>(dp, scores_gradient);
      // dQ by atomics: this tile's dSᵀ buffer (the one of tile it − 2, whose dQ both consumers had
      // finished before the barrier of tile it − 1); at head dim 64 the consumers take turns.
      const bool with_dq = kAtomicDq && (D == 128 || r % 2 == warpgroup);
      if constexpr (kAtomicDq) {
        store_scores_gradient<BO>(st.scores_gradient + (r % 2) * Sm90BackwardShape<D>::kScoresGradientBytes,
                                  scores_gradient, own_row);
        fence_async_shared();
        // The buffer is whole once both consumers stored their keys' rows, which only the one
        // multiplying it must wait for: at head dim 64 the other arrives and goes on to its dV and
        // dK products, so the two do not meet every tile (one's gradient arithmetic runs beside the
        // other's products). The barrier alternates with the tile's parity, so that a consumer
        // arriving on tile it and waiting on tile it + 1 cannot complete tile it's barrier alone.
        // Reuse: tile it's buffer was read by tile it − 2's dQ consumer (this tile's), which arrived
        // on tile it − 1 after that read, before the other consumer's wait there.
        const int exchange = r % 2 == 0 ? 1 : 2;
        if (with_dq) named_barrier_sync(exchange, 256);
        else named_barrier_arrive(exchange, 256);
      }
      // dV += (P∘Z)ᵀ·dO and dK += dSᵀ·Q (and dQ = dS·K): each branch holds its whole fence-issue-wait
      // sequence, so that ptxas sees no accumulator of a product defined on one path only (it would
      // serialise the products behind an injected warpgroup.arrive).
      auto products = [&](auto issue_more) {
        fence_registers(reinterpret_cast<Flat<D / 2>&>(dv));
        fence_registers(reinterpret_cast<Flat<D / 2>&>(dk));
        wgmma_fence();
        issue_pv<T, D, BO>(dv, probabilities, dout_tile);
        issue_pv<T, D, BO>(dk, scores_gradient, q_tile);
        issue_more();
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(reinterpret_cast<Flat<D / 2>&>(dv));
        fence_registers(reinterpret_cast<Flat<D / 2>&>(dk));
        release_stage(st, r);
      };
      if (with_dq) {
        const std::uint32_t dq_buffer =
            smem_address(st.scores_gradient) + (r % 2) * Sm90BackwardShape<D>::kScoresGradientBytes;
        const std::uint32_t k_columns = smem_address(st.own_a_of(pass)) + (D == 128 ? warpgroup * BW * 128 : 0);
        float dq[8][4];
        if constexpr (D == 64) {
          products([&] { issue_dq<T, BW>(dq, dq_buffer, k_columns); });
        } else {  // dK, dV hold 128 registers: dQ's 32 take those of P and dS once their products are done
          products([] {});
          wgmma_fence();
          issue_dq<T, BW>(dq, dq_buffer, k_columns);
          wgmma_commit();
          wgmma_wait<0>();
        }
        fence_registers(reinterpret_cast<Flat<32>&>(dq));
        add_dq(p, dq_slot, st.dq_staging + warpgroup * Sm90BackwardShape<D>::kDqStagingBytes / 4, dq, tiles.start(it),
               tiles.valid(it), D == 128 ? warpgroup : 0);
      } else {
        products([] {});
      }
    }
    write_gradient_rows<T, D>(p, w, w.key, kj, accumulate, p.dk, dk, p.scale, &p.dv, &dv, p.output_scale);
  }
  drain_stages(st, passes * num_tiles);
  if (kAtomicDq && threadIdx.x % 128 == 0) {  // the last bulk reductions are done, and seen by generic loads
    bulk_wait();
    fence_async_global();
  }
}

// Warpgroups 1 and 2 of a dq block: 64 queries each.
template <class T, int D, Walk kWalk, class Tiles>
__device__ __forceinline__ void consume_queries(const detail::DilatedParams& p, bool accumulate, const BlockWork& w,
                                                const Tiles& tiles, int num_tiles, const BackwardStages<D>& st) {
  constexpr int BO = Sm90BackwardShape<D>::kBlockOther;
  // The warpgroup as a value the compiler knows is warp-uniform (a shuffle from lane 0): the
  // descriptors built from it then stay in uniform registers instead of one move per wgmma.
  const int warpgroup = __shfl_sync(0xffffffffu, int(threadIdx.x / 128), 0) - 1;
  const int warp = threadIdx.x / 32 % 4, g = threadIdx.x % 32 / 4;
  const int own_row = warpgroup * 64 + warp * 16 + g;
  const std::int64_t qi[2] = {w.tile_begin + own_row, w.tile_begin + own_row + 8};
  const bool causal_by_position = kWalk == Walk::indexed && p.causal;
  const int query_position[2] = {causal_by_position ? w.position32(w.query, int(qi[0])) : 0,
                                 causal_by_position ? w.position32(w.query, int(qi[1])) : 0};
  float lse2[2], delta[2];
  query_rows_lse(p, w, qi, lse2, delta);
  if (p.softmax_delta == nullptr) {  // the four threads of a row's quad take a quarter of D each
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool own = qi[r] < w.tile_begin + w.tile_rows;
      float sum = own ? row_delta_part<T, D, 4>(p, w, w.query, qi[r], threadIdx.x % 4) : 0.0f;
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      delta[r] = sum;
    }
  }
  const std::uint32_t own_q = smem_address(st.own_a) + warpgroup * 64 * 128;
  const std::uint32_t own_dout = smem_address(st.own_b) + warpgroup * 64 * 128;
  float dq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
  for (int it = 0; it < num_tiles; ++it) {
    const int stage = it % Sm90BackwardShape<D>::kStages;
    wait_stage(st, it);
    const std::uint32_t k_tile = smem_address(st.a(stage)), v_tile = smem_address(st.b(stage));
    float s[BO / 8][4], dp[BO / 8][4];
    wgmma_fence();
    issue_products<T, D>(s, own_q, k_tile);
    issue_products<T, D>(dp, own_dout, v_tile);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(reinterpret_cast<Flat<BO / 2>&>(s));
    fence_registers(reinterpret_cast<Flat<BO / 2>&>(dp));
    query_tile_gradients<BO, kWalk>(p, w, s, dp, qi, lse2, delta, query_position, tiles.start(it), tiles.valid(it),
                                    st.column(stage, 0), reinterpret_cast<const int*>(st.column(stage, 1)));
    std::uint32_t scores_gradient[BO / 16][4];
    pack_probabilities<T, BO>(s, scores_gradient);
    fence_registers(reinterpret_cast<Flat<D / 2>&>(dq));
    wgmma_fence();
    issue_pv<T, D, BO>(dq, scores_gradient, k_tile);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(reinterpret_cast<Flat<D / 2>&>(dq));
    release_stage(st, it);
  }
  drain_stages(st, num_tiles);
  write_gradient_rows<T, D>(p, w, w.query, qi, accumulate, p.dq, dq, p.scale, nullptr, nullptr, 0.0f);
}

// The block's decoded work, in shared memory after the barriers (Shape::kWorkBytes): thread 0
// decodes it and each role copies it once it has its registers, so that nothing decoded is live
// across the register reallocation (the producer's 56 registers would spill it) and decode's 64-bit
// divisions run once per block instead of in all 384 threads.
template <int BO, Walk kWalk>
struct SharedBackwardWork {
  BlockWork work;
  OtherTiles<BO, kWalk == Walk::sparse> tiles;
  int passes;  // own tiles of kBlockOwn rows the block works through (LaunchPlan::passes)
  bool run;
};

// One block's work: the producer warpgroup and the two consumers.
template <class T, int D, Walk kWalk, bool kAtomicDq, class Maps>
__device__ __forceinline__ void backward_block(const detail::DilatedParams& p,
                                               const SharedBackwardWork<Sm90BackwardShape<D>::kBlockOther, kWalk>& shared,
                                               const BackwardStages<D>& st, const Maps& maps) {
  using Shape = Sm90BackwardShape<D>;
  // The copy, with what decode's dilated and sparse walks make known to the compiler: no index map.
  auto work = [&] {
    BlockWork w = shared.work;
    if constexpr (kWalk != Walk::indexed) w.index = nullptr;
    return w;
  };
  if (threadIdx.x < 128) {
    registers_decrease<Shape::kProducerRegisters>();
    const BlockWork w = work();
    const auto tiles = shared.tiles;
    const int num_tiles = w.tile_rows > 0 ? tiles.count : 0;
    const bool keys_own = w.role == kDkDvRole;
    if constexpr (std::is_same_v<Maps, BackwardTensorMaps>)
      produce_backward_tma<T, D, kWalk>(p, w, tiles, num_tiles, shared.passes, st, maps);
    else
      produce_backward<T, D, kWalk>(p, w, tiles, num_tiles, st);
    if (!w.accumulate)
      zero_unselected<T, D, 128>(p, w, keys_own ? &p.dk : &p.dq, keys_own ? &p.dv : nullptr, false);
    // dQ by atomics: the dk/dv block's region holds the same positions for dq (no ring steps here
    // write; a later head phase adds dk, dv but writes dq first).
    if (kAtomicDq && !w.dq_accumulate) zero_unselected<T, D, 128>(p, w, &p.dq, nullptr, false);
  } else {
    registers_increase<Shape::kConsumerRegisters>();
    const BlockWork w = work();
    const auto tiles = shared.tiles;
    const int num_tiles = w.tile_rows > 0 ? tiles.count : 0;
    const bool keys_own = w.role == kDkDvRole;
    float* dq_slot = kAtomicDq ? p.dq_scratch + std::int64_t(w.group % p.dq_slots) * p.dq_scratch_rows * D : nullptr;
    if (keys_own)
      consume_keys<T, D, kWalk, kAtomicDq>(p, w.accumulate, w, tiles, num_tiles, shared.passes, st, dq_slot);
    else consume_queries<T, D, kWalk>(p, w.accumulate, w, tiles, num_tiles, st);
  }
}

// Maps: BackwardTensorMaps for the TMA instances, else NoTensorMaps.
template <class T, int D, Walk kWalk, bool kAtomicDq, class Maps>
__global__ void __launch_bounds__(Sm90BackwardShape<D>::kThreads, 1)
    backward_kernel(const __grid_constant__ detail::DilatedParams p, const __grid_constant__ LaunchPlan plan,
                    const __grid_constant__ Maps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = Sm90BackwardShape<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const BackwardStages<D> st(smem_raw);
  using Shared = SharedBackwardWork<Shape::kBlockOther, kWalk>;
  static_assert(sizeof(Shared) <= Shape::kWorkBytes, "the decoded work's slot");
  auto* shared = static_cast<Shared*>(st.work);
  if (threadIdx.x == 0) {
    for (int s = 0; s < Shape::kStages; ++s) {
      barrier_init(st.full + s, 128);
      barrier_init(st.keys + s, 128);
      barrier_init(st.empty + s, 256);
    }
    // dQ by atomics: a block's work is that of a ticket taken in the order blocks start, so that the
    // blocks it may wait for (lower tickets) are running or done whatever order the GPU starts them in.
    const int ticket = kAtomicDq ? atomicAdd(p.dq_counters + 2 * p.dq_slots, 1) : int(blockIdx.x);
    BlockWork w;
    // Two passes (LaunchPlan::passes: the TMA instances' dilated walk with dQ by atomics, head dim
    // 64): the block's own rows are two tiles, decoded as one of twice the rows.
    constexpr int BW = Shape::kBlockOwn;
    const bool two = Shape::kOwnBuffers >= 2 && kAtomicDq && kWalk == Walk::dilated &&
                     std::is_same_v<Maps, BackwardTensorMaps> && plan.passes == 2;
    shared->run = two ? decode<2 * BW, kWalk>(p, plan, w, ticket) : decode<BW, kWalk>(p, plan, w, ticket);
    shared->passes = w.tile_rows > BW ? 2 : 1;
    shared->work = w;
    if (shared->run) shared->tiles = other_tiles<Shape::kBlockOther, kWalk>(p, w);
    // dQ by atomics: every block of the group, run or not, waits for the slot and arrives
    // (arrive_and_convert).
    if (kAtomicDq) wait_for_slot(p, w.group);
  }
  __syncthreads();
  // The slot's zeros (generic stores by the block that converted its previous group, acquired
  // above) before this block's bulk reductions into it (async proxy).
  if constexpr (kAtomicDq) fence_async_global();
  if (shared->run) backward_block<T, D, kWalk, kAtomicDq>(p, *shared, st, maps);
  if (kAtomicDq && threadIdx.x >= 128) arrive_and_convert<T, D>(p, plan, shared->work.group);
#else
  (void)p, (void)plan, (void)maps;
#endif
}

}  // namespace dattn::cuda::sm90

namespace dattn::cuda {

// With params.dq_scratch (dQ by atomics: plan holds the dk/dv jobs only) the dk/dv blocks, which
// also write dq; else the dk/dv and dq blocks. Tma: the instances whose producer loads by TMA
// (dispatch.cu runs them where sm90_backward_tma_covers admits the call).
template <class T, int D, bool Tma>
void launch_backward_sm90(const detail::DilatedParams& params, const LaunchPlan& plan, cudaStream_t stream) {
  using Shape = Sm90BackwardShape<D>;
  const bool atomic = params.dq_scratch != nullptr;
  auto launch = [&](const auto& maps) {
    using Maps = std::decay_t<decltype(maps)>;
    auto kernel = atomic ? sm90::backward_kernel<T, D, Walk::dilated, true, Maps>
                         : sm90::backward_kernel<T, D, Walk::dilated, false, Maps>;
    if (params.block_size > 0) kernel = sm90::backward_kernel<T, D, Walk::sparse, false, Maps>;
    if constexpr (!std::is_same_v<Maps, BackwardTensorMaps>)  // an index map's rows come by cp.async only
      if (params.position_index != nullptr && params.block_size == 0)
        kernel = atomic ? sm90::backward_kernel<T, D, Walk::indexed, true, Maps>
                        : sm90::backward_kernel<T, D, Walk::indexed, false, Maps>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kSmemBytes)) != cudaSuccess)
      check_launch("sm90 backward (shared memory attribute)");
    kernel<<<plan.total_blocks, Shape::kThreads, Shape::kSmemBytes, stream>>>(params, plan, maps);
    check_launch("sm90 backward");
  };
  if constexpr (Tma) {
    BackwardTensorMaps maps{};
    encode_backward_maps(params, plan, Shape::kBlockOther, maps);
    launch(maps);
  } else {
    launch(NoTensorMaps{});
  }
}

}  // namespace dattn::cuda
