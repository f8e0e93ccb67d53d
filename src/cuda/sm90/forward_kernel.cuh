// The sm90 forward (Hopper, sm_90a, 16-bit types): the walk and arithmetic of the sm80 kernel
// (decode, other_tiles, score_tile, write_forward_rows) with the two products on warpgroup MMA, in
// a warp-specialised block. Warpgroup 0 produces: it loads the block's query rows and then each
// key tile of 128 rows (K, V and the key bias) by cp.async into a ring of shared-memory stages, in
// wgmma's 128-byte swizzled layout, and signals each stage full on an mbarrier when its copies
// land; then it writes the unselected rows of the block's region. The other warpgroups (three at
// head dim 64, two at 128) consume, 64 query rows each: S = Q·Kᵀ from shared memory, the online
// softmax in registers, and O += P·V with P from registers (the accumulator layout of S is
// wgmma's A-fragment layout) and V MN-major from shared memory; a stage is handed back on its
// empty barrier when all are done with it. The next tile's S = Q·Kᵀ is issued before the previous
// tile's P·V, so that one tile's softmax runs beside the other's product, where the consumers have
// the registers for it (two consumers; three in the TMA instances, not the cp.async ones). Every
// walk (dilated, index map, block-sparse) loads rows one by one, so one kernel serves them all.
// With DATTN_SM90_TMA (the default where the sm90 kernels are built) the calls sm90_tma_covers admits
// (whole sequences: the dilated walk with every dilation rate dividing N, the index-map walk, and
// block-sparse attention's walk) run instances whose producer loads by TMA instead: one thread
// issues a tile's bulk tensor copies (produce_tma), which land in the same swizzled layout
// (tensor_maps.hpp), and the warpgroup keeps only the key bias. Under an index map the rows lie
// anywhere, a TMA box would be one row and a warp issues such copies one at a time, so these
// instances' producer gathers them by cp.async as the other instances' does (produce), keeping
// the TMA instances' decode (the build option DATTN_SM90_TMA_ROWS tries the one-row boxes instead,
// produce_tma_rows: its producer needs fewer registers, which lets the consumers overlap).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/forward_kernel.cuh"
#include "cuda/forward_tile.cuh"
#include "cuda/launch.hpp"
#include "cuda/sm90/sync.cuh"
#include "cuda/sm90/tensor_maps.hpp"
#include "cuda/sm90/tma.cuh"
#include "cuda/sm90/wgmma.cuh"
#include "cuda/work.cuh"

namespace dattn::cuda::sm90 {

template <int N>
using Flat = float[N];

// The running-max softmax in the TMA instances (score_tile_at_running_max): the build option
// DATTN_SM90_RUNNING_MAX, off until a GPU run has checked it.
#if defined(DATTN_SM90_RUNNING_MAX)
inline constexpr bool kRunningMax = true;
#else
inline constexpr bool kRunningMax = false;
#endif

// Issues S = Q·Kᵀ for the warpgroup's 64 rows against one key tile: D/16 steps of k16, both
// operands K-major (a step advances 32 bytes inside the swizzled row; the 64-column block kk / 4
// lies kRows·128 bytes on).
template <class T, int D, int BM, int BN>
__device__ __forceinline__ void issue_scores(float (&s)[BN / 8][4], std::uint32_t q_tile, std::uint32_t k_tile) {
  const std::uint64_t q = descriptor(q_tile, 16, 1024), k = descriptor(k_tile, 16, 1024);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const std::uint32_t column = (kk % 4) * 32;
    Wgmma<T, BN>::ss(reinterpret_cast<Flat<BN / 2>&>(s), advanced(q, (kk / 4) * BM * 128 + column),
                     advanced(k, (kk / 4) * BN * 128 + column), kk > 0);
  }
}

// The warp's 16 rows of S = Q·Kᵀ against one key tile again, by mma.sync from the stage's swizzled
// tiles (the rare path of score_tile_at_running_max, whose probabilities have replaced the scores):
// the same products as issue_scores, in the accumulator layout. q_rows: the warp's first row in the
// query tile (whose 64-column blocks lie BM rows apart, the key tile's BN).
template <class T, int D, int BM, int BN>
__device__ __forceinline__ void recompute_scores(float (&s)[BN / 8][4], std::uint32_t q_rows, std::uint32_t k_tile) {
  using M = MmaType<T>;
  const int lane = threadIdx.x % 32;
  // ldmatrix's row addresses: A rows lane % 16 at chunk 2kk + lane / 16; B rows (keys) lane % 8 +
  // 8 (lane / 16) of each 16 at chunk 2kk + (lane / 8) % 2. Every row here is lane % 8 mod 8 (the
  // swizzle's), as the warp's first row and a 16-key group's are multiples of 8.
  const int a_row = lane % 16, a_half = lane / 16, b_row = lane % 8 + (lane / 16) * 8, b_half = (lane / 8) % 2;
#pragma unroll
  for (int n = 0; n < BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int block = kk / 4, chunk = 2 * (kk % 4);
    std::uint32_t a[4];
    ldmatrix_x4(a, q_rows + block * BM * 128 + a_row * 128 + (((chunk + a_half) ^ (lane % 8)) << 4));
#pragma unroll
    for (int np = 0; np < BN / 16; ++np) {
      std::uint32_t b[4];
      ldmatrix_x4(b, k_tile + block * BN * 128 + (np * 16 + b_row) * 128 + (((chunk + b_half) ^ (lane % 8)) << 4));
      mma_16816<M>(s[2 * np], a, b[0], b[1]);
      mma_16816<M>(s[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// P (the probabilities of a tile, float32 in the accumulator layout) as wgmma A fragments: keys
// [16kk, 16kk + 16) are the thread's registers of column blocks 2kk and 2kk + 1.
template <class T, int BN>
__device__ __forceinline__ void pack_probabilities(const float (&s)[BN / 8][4], std::uint32_t (&a)[BN / 16][4]) {
  using M = MmaType<T>;
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    a[kk][0] = pack2<M>(s[2 * kk][0], s[2 * kk][1]);
    a[kk][1] = pack2<M>(s[2 * kk][2], s[2 * kk][3]);
    a[kk][2] = pack2<M>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[kk][3] = pack2<M>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// The epilogue of a pass whose rows merge with nothing (no earlier branch or ring step: out and lse
// are written, not added to) into 16-bit outputs: the warp's 16 normalised rows go into its rows of
// the pass's query tile, free once the pass's last S = Q·Kᵀ has completed (the tiles' swizzled
// layout: a store of the accumulator layout's 4-byte pieces, 8 rows at one column, hits 32 banks),
// then out by 16-byte stores, 8 lanes to a row's 128 bytes, where write_forward_rows stores 4 bytes a
// thread with 8 rows in each instruction. warp_rows: the warp's first row in the tile (generic).
template <class T, int D, int BM, Walk kWalk>
__device__ __forceinline__ void write_rows_through_shared(const detail::DilatedParams& p, const BlockWork& w,
                                                          const float (&acc)[D / 8][4], const float (&row_max)[2],
                                                          const float (&row_sum)[2], std::int64_t warp_row0,
                                                          unsigned char* warp_rows) {
  using M = MmaType<T>;
  const int lane = threadIdx.x % 32, t = lane % 4, g = lane / 4;
  const std::int64_t end = w.tile_begin + w.tile_rows;
  // Under an index map the tensor rows of this thread's lse and out stores are all looked up before
  // the first store (each a load, which the store after it waited for: ncu at long64k, identity map,
  // 4.5 % of the forward's samples; rows past the tile look up a valid position or none). Otherwise
  // they are arithmetic, made where used (kept live, they cost the walk in order spills).
  int lse_rows[2] = {}, out_rows[4] = {};
  if constexpr (kWalk == Walk::indexed) {
#pragma unroll
    for (int r = 0; r < 2; ++r) lse_rows[r] = w.row32(w.query, int(warp_row0) + g + 8 * r);
#pragma unroll
    for (int i = 0; i < 4; ++i) out_rows[i] = w.row32(w.query, int(warp_row0) + lane / 8 + 4 * i);
  }
  auto tensor_row = [&](int looked_up, int row) {
    return kWalk == Walk::indexed ? std::int64_t(looked_up) : w.row(w.query, warp_row0 + row);
  };
  float inv[2], lse_row[2];
  row_totals(row_max, row_sum, inv, lse_row);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;  // of the warp's 16; row mod 8 = g, the swizzle's
    if (t == 0 && warp_row0 + row < end) *lse_pointer(p, w.batch, w.head, tensor_row(lse_rows[r], row)) = lse_row[r];
    const float weight = p.output_scale * inv[r];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<std::uint32_t*>(warp_rows + (n / 8) * BM * 128 + row * 128 + (((n % 8) ^ g) << 4) + 4 * t) =
          pack2<M>(acc[n][2 * r] * weight, acc[n][2 * r + 1] * weight);
  }
  __syncwarp();
  const int chunk = lane % 8;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 8 + 4 * i;
    if (warp_row0 + row >= end) continue;
    T* const out_row = row_pointer<T>(p.out, w.batch, w.head, tensor_row(out_rows[i], row)) + chunk * 8;
#pragma unroll
    for (int b = 0; b < D / 64; ++b)
      *reinterpret_cast<uint4*>(out_row + b * 64) =
          *reinterpret_cast<const uint4*>(warp_rows + b * BM * 128 + row * 128 + ((chunk ^ (row % 8)) << 4));
  }
}

// Issues O += P·V: BN/16 steps of k16 keys; V is MN-major (rows are keys): a step advances 16
// rows (2048 bytes), and the head dim's 64-column blocks lie BN rows apart.
template <class T, int D, int BN>
__device__ __forceinline__ void issue_pv(float (&acc)[D / 8][4], const std::uint32_t (&a)[BN / 16][4],
                                         std::uint32_t v_tile) {
  const std::uint64_t v = descriptor(v_tile, BN * 128, 1024);
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) Wgmma<T, D>::rs(reinterpret_cast<Flat<D / 2>&>(acc), a[kk], advanced(v, kk * 16 * 128), 1);
}

// The shared memory of a block: the query tile, then per stage K, V (swizzled), the key bias and
// the keys' positions, then the stages' barriers: `full` completes when the stage's copies have
// landed, `keys` when the producer's plain stores (the key bias and positions) are done, `empty`
// when the consumers are done with the stage. Each thread arrives once per phase on each (`full`
// of the TMA path: the thread that issues the copies, with their bytes).
template <class Shape>
struct Stages {
  unsigned char* q;
  unsigned char* k;
  unsigned char* v;
  float* bias;
  int* key_position;
  std::uint64_t* full;
  std::uint64_t* keys;
  std::uint64_t* empty;
  __device__ explicit Stages(unsigned char* raw) {
    unsigned char* base = raw + ((1024 - smem_address(raw) % 1024) % 1024);
    q = base;
    k = q + Shape::kQBuffers * Shape::kQBytes;
    v = k + Shape::kStages * Shape::kKvBytes;
    bias = reinterpret_cast<float*>(v + Shape::kStages * Shape::kKvBytes);
    key_position = reinterpret_cast<int*>(bias + Shape::kStages * Shape::kBlockN);
    full = reinterpret_cast<std::uint64_t*>(key_position + Shape::kStages * Shape::kBlockN);
    keys = full + Shape::kStages;
    empty = keys + Shape::kStages;
  }
};

// Before a producer refills the stage of tile `it` (of kStages, in the stages' `full`, `keys` and
// `empty` barriers: the forward's and the backward's): the consumers have emptied it, and this
// thread's own arrivals of the stage's previous phase have completed (compute-sanitizer's synccheck
// expects every arrival's phase to be waited for). arrives_on_full: whether this thread arrives on
// `full` (the TMA forward's: its issuing thread only). One that does not must not wait for it: the
// issuing thread may complete the stage's next phase too before it looks, and a parity wait would
// then wait for the phase after, which needs this thread's `keys` arrival: a deadlock once one
// producer thread falls a stage behind the issuing one (found by a model of the barriers).
template <int kStages, class StageBarriers>
__device__ __forceinline__ void wait_stage_reusable(const StageBarriers& st, int it,
                                                    bool arrives_on_full = true) {
  if (it < kStages) return;
  const int stage = it % kStages, parity = (it / kStages + 1) & 1;
  barrier_wait(st.empty + stage, parity);
  if (arrives_on_full) barrier_wait(st.full + stage, parity);
  barrier_wait(st.keys + stage, parity);
}

// After a producer's last tile: the phases of its last arrivals on each stage.
template <int kStages, class StageBarriers>
__device__ __forceinline__ void wait_last_arrivals(const StageBarriers& st, int num_tiles,
                                                   bool arrives_on_full = true) {
  for (int it = num_tiles > kStages ? num_tiles - kStages : 0; it < num_tiles; ++it) {
    if (arrives_on_full) barrier_wait(st.full + it % kStages, (it / kStages) & 1);
    barrier_wait(st.keys + it % kStages, (it / kStages) & 1);
  }
}

// Whether the producer gathers rows by cp.async (the cp.async instances, and the TMA instances under
// an index map without one-row maps) rather than issuing TMA copies: it then needs 56 registers, not
// 32 (Sm90ForwardShape::kProducerRegisters), and leaves the consumers fewer.
template <class Shape, Walk kWalk, class Maps = NoTensorMaps>
inline constexpr bool kGathers = !Shape::kTma || (kWalk == Walk::indexed && std::is_same_v<Maps, NoTensorMaps>);

// Warpgroup 0: every tile's loads, a stage at a time once the consumers have emptied it; pass after
// pass the same key tiles (g counts the stage ring's tiles across the block's `passes` query tiles,
// which all load with the first).
template <class T, class Shape, Walk kWalk, class Tiles>
__device__ __forceinline__ void produce(const detail::DilatedParams& p, const BlockWork& w, const Tiles& tiles,
                                        int num_tiles, int passes, const Stages<Shape>& st) {
  constexpr int D = Shape::kHeadDim, BM = Shape::kBlockM, BN = Shape::kBlockN, kStages = Shape::kStages;
  constexpr TileLayout kSwizzled = TileLayout::swizzled;
  const bool causal_by_position = kWalk == Walk::indexed && p.causal;
  const int ring_tiles = passes * num_tiles;
  // Under an index map thread t looks key row t up for its warp's copies (gather_row_pair), the
  // lookup for ring tile g + 1 is in flight while tile g's copies are issued and its stage awaited.
  static_assert(BN == 128, "one key row per producer thread");
  auto lookup = [&](int g) { return gathered_row(w, w.key, tiles, num_tiles, g < ring_tiles ? g % num_tiles : num_tiles); };
  int next_key_row = kWalk == Walk::indexed ? lookup(0) : 0;
  // Every pass's query tile, landing with the first key tile (the first stage's `full` counts them).
  for (int pass = 0; pass < (ring_tiles > 0 ? passes : 0); ++pass) {
    auto* q_tile = reinterpret_cast<std::uint16_t*>(st.q + pass * Shape::kQBytes);
    const std::int64_t q0 = w.tile_begin + pass * BM;
    const int q_rows = int(w.tile_rows - pass * BM);
    if constexpr (kWalk == Walk::indexed) gather_rows<T, BM, D>(q_tile, p.q, w, w.query, q0, q_rows);
    else load_rows<T, 1, BM, D, 128, kSwizzled>(q_tile, 0, p.q, w, w.query, q0, q_rows);
  }
  for (int g = 0; g < ring_tiles; ++g) {
    const int it = g % num_tiles, stage = g % kStages;
    const int key_row_here = next_key_row;
    if constexpr (kWalk == Walk::indexed) next_key_row = lookup(g + 1);
    wait_stage_reusable<kStages>(st, g);
    const std::int64_t k0 = tiles.start(it);
    const int valid = tiles.valid(it);
    auto* k_tile = reinterpret_cast<std::uint16_t*>(st.k + stage * Shape::kKvBytes);
    auto* v_tile = reinterpret_cast<std::uint16_t*>(st.v + stage * Shape::kKvBytes);
    if constexpr (kWalk == Walk::indexed) gather_row_pair<T, BN, D>(k_tile, v_tile, p.k, p.v, w, valid, key_row_here);
    else load_row_pair<T, 1, BN, D, 128, kSwizzled>(k_tile, v_tile, 0, p.k, p.v, w, w.key, k0, valid);
    key_bias(p, w, k0, valid, BN, st.bias + stage * BN, causal_by_position ? st.key_position + stage * BN : nullptr);
    cp_async_arrive(st.full + stage);  // the stage's copies, when they land
    barrier_arrive(st.keys + stage);   // this thread's plain stores (the key bias)
  }
  wait_last_arrivals<kStages>(st, ring_tiles);
}

// Rows [valid, kRows) of two swizzled tiles of kRows rows (head dim D) as zeros (16-byte stores
// by the producer's 128 threads), as the cp.async producer leaves them: a box of rows reaches past
// its group into the next segment's rows, whose values (a NaN, say) must reach no product (0 · NaN).
template <int kRows, int D>
__device__ __forceinline__ void zero_rows(unsigned char* a, unsigned char* b, int valid) {
  constexpr int kColumnBlocks = D / 64;
  const int chunks = (kRows - valid) * 8;  // of one 64-column block: rows of 128 bytes, one after another
  for (int c = threadIdx.x; c < kColumnBlocks * chunks; c += 128) {
    const int at = ((c / chunks) * kRows + valid) * 128 + (c % chunks) * 16;
    *reinterpret_cast<uint4*>(a + at) = make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(b + at) = make_uint4(0, 0, 0, 0);
  }
}

// A stage's K and V tiles' rows [valid, kBlockN).
template <class Shape>
__device__ __forceinline__ void zero_tile_rows(unsigned char* k, unsigned char* v, int valid) {
  zero_rows<Shape::kBlockN, Shape::kHeadDim>(k, v, valid);
}

// Warpgroup 0 of the TMA instances (the dilated walk over whole sequences): thread 0 issues each
// tile's copies (and the block's query tile with the first), one box per 64-column block, on the
// stage's `full` barrier with their bytes; every thread writes its key's bias. A tile with fewer
// than kBlockN valid rows (a group's end, or the causal diagonal's) waits for its copies and zeroes
// the rest. Selected row j of a group whose first tensor row is `first` sits at map coordinates
// (column, head, first mod r, first / r + j, batch) (tensor_maps.hpp; a packed batch's rows: batch 0).
template <class T, class Shape, class Tiles>
__device__ __forceinline__ void produce_tma(const detail::DilatedParams& p, const BlockWork& w, const Tiles& tiles,
                                            int num_tiles, int passes, const Stages<Shape>& st,
                                            const ForwardTensorMaps& maps) {
  constexpr int D = Shape::kHeadDim, BM = Shape::kBlockM, BN = Shape::kBlockN, kStages = Shape::kStages;
  const bool leader = threadIdx.x == 0;
  if (leader) {
    prefetch_tensor_map(&maps.q[w.branch]);
    prefetch_tensor_map(&maps.k[w.branch]);
    prefetch_tensor_map(&maps.v[w.branch]);
  }
  // Pass after pass the same key tiles (g counts the stage ring's tiles across passes); every
  // pass's query tile comes with the first.
  for (int g = 0; g < passes * num_tiles; ++g) {
    const int it = g % num_tiles, stage = g % kStages;
    wait_stage_reusable<kStages>(st, g, leader);
    const std::int64_t k0 = tiles.start(it);
    const int valid = tiles.valid(it);
    unsigned char* k_tile = st.k + stage * Shape::kKvBytes;
    unsigned char* v_tile = st.v + stage * Shape::kKvBytes;
    if (leader) {
      // The coordinates, here rather than before the loop: the other threads then keep nothing of
      // them through it (32-bit: CUDA calls hold N <= 2^30 rows).
      std::uint64_t* full = st.full + stage;
      const unsigned r = unsigned(w.stride);
      const int batch = map_batch_coordinate(p, w.batch);
      barrier_arrive_expect_tx(full, 2 * Shape::kKvBytes + (g == 0 ? passes * Shape::kQBytes : 0));
      if (g == 0) {
        const unsigned first = unsigned(w.query.first - w.query.row_offset);
        const int offset = int(first % r), row = int(first / r) + int(w.tile_begin), head = int(w.head);
        for (int pass = 0; pass < passes; ++pass)
#pragma unroll
          for (int b = 0; b < D / 64; ++b)
            tma_load_5d(smem_address(st.q) + pass * Shape::kQBytes + b * BM * 128, &maps.q[w.branch], b * 64, head,
                        offset, row + pass * BM, batch, full);
      }
      const unsigned first = unsigned(w.key.first - w.key.row_offset);
      const int offset = int(first % r), row = int(first / r) + int(k0), head = int(operand_head(p.k, w.head));
#pragma unroll
      for (int b = 0; b < D / 64; ++b) {
        tma_load_5d(smem_address(k_tile) + b * BN * 128, &maps.k[w.branch], b * 64, head, offset, row, batch, full);
        tma_load_5d(smem_address(v_tile) + b * BN * 128, &maps.v[w.branch], b * 64, head, offset, row, batch, full);
      }
    }
    key_bias(p, w, k0, valid, BN, st.bias + stage * BN);
    if (valid < BN) {
      barrier_wait(st.full + stage, (g / kStages) & 1);  // the boxes' rows have landed
      zero_tile_rows<Shape>(k_tile, v_tile, valid);
      fence_async_shared();  // before the consumers' wgmma reads (and a later phase's TMA writes)
    }
    barrier_arrive(st.keys + stage);  // this thread's plain stores (the key bias, the zeros)
  }
  wait_last_arrivals<kStages>(st, passes * num_tiles, leader);
}

// Warpgroup 0 of the TMA instances under an index map with one-row maps (DATTN_SM90_TMA_ROWS,
// encode_forward_maps with boxes of one row): thread t issues the copies of row t of each key tile (K and V; and rows t,
// t + 128 of every pass's query tile with the first), one-row boxes that land at their row's 128 bytes
// of the swizzled tiles (TMA swizzles by the shared-memory address), and arrives on the stage's `full`
// expecting their bytes. A row past a tile's valid rows takes a coordinate before the map (-1), which
// TMA fills with zeros. Thread t looks row t of the next tile up while this tile's copies go out.
template <class T, class Shape, class Tiles>
__device__ __forceinline__ void produce_tma_rows(const detail::DilatedParams& p, const BlockWork& w, const Tiles& tiles,
                                                 int num_tiles, int passes, const Stages<Shape>& st,
                                                 const ForwardTensorMaps& maps) {
  constexpr int D = Shape::kHeadDim, BM = Shape::kBlockM, BN = Shape::kBlockN, kStages = Shape::kStages;
  static_assert(BN == 128 && BM >= 128 && BM <= 256, "one key row, one or two query rows a producer thread");
  constexpr std::uint32_t kRowBytes = D * 2;
  const int t = int(threadIdx.x), ring_tiles = passes * num_tiles, batch = map_batch_coordinate(p, w.batch);
  const CUtensorMap* const q_map = &maps.q[w.branch];
  const CUtensorMap* const k_map = &maps.k[w.branch];
  const CUtensorMap* const v_map = &maps.v[w.branch];
  auto key_row = [&](int g) {
    const int it = g % num_tiles;
    return g < ring_tiles && t < tiles.valid(it) ? w.row32(w.key, int(tiles.start(it)) + t) : -1;
  };
  int next_key_row = ring_tiles > 0 ? key_row(0) : -1;
  for (int g = 0; g < ring_tiles; ++g) {
    const int it = g % num_tiles, stage = g % kStages, row = next_key_row;
    next_key_row = key_row(g + 1);
    wait_stage_reusable<kStages>(st, g);
    std::uint64_t* full = st.full + stage;
    const int query_rows = g == 0 ? (t < BM - 128 ? 2 : 1) * passes : 0;
    barrier_arrive_expect_tx(full, (2 + query_rows) * kRowBytes);
    if (g == 0) {
      for (int pass = 0; pass < passes; ++pass)
        for (int i = t; i < BM; i += 128) {
          const std::int64_t q = w.tile_begin + pass * BM + i;
          const int q_row = q < w.tile_begin + w.tile_rows ? w.row32(w.query, int(q)) : -1;
#pragma unroll
          for (int b = 0; b < D / 64; ++b)
            tma_load_5d(smem_address(st.q) + pass * Shape::kQBytes + b * BM * 128 + i * 128, q_map, b * 64, int(w.head),
                        0, q_row, batch, full);
        }
    }
    // Here rather than before the loop: kept through it, it costs the 32-register producer spills
    // (ptxas, c3 head dim 64: 40/48 -> 48/56 bytes).
    const int kv_head = int(operand_head(p.k, w.head));
#pragma unroll
    for (int b = 0; b < D / 64; ++b) {
      const std::uint32_t at = std::uint32_t(stage * Shape::kKvBytes + b * BN * 128 + t * 128);
      tma_load_5d(smem_address(st.k) + at, k_map, b * 64, kv_head, 0, row, batch, full);
      tma_load_5d(smem_address(st.v) + at, v_map, b * 64, kv_head, 0, row, batch, full);
    }
    key_bias(p, w, tiles.start(it), tiles.valid(it), BN, st.bias + stage * BN,
             p.causal ? st.key_position + stage * BN : nullptr);
    barrier_arrive(st.keys + stage);  // this thread's plain stores (the key bias and positions)
  }
  wait_last_arrivals<kStages>(st, ring_tiles);
}

// The consumer warpgroups: the online softmax over the key tiles of the stages, then the epilogue,
// for each of the block's `passes` query tiles in turn (the stage ring's tile g counts across them).
// They take turns at the tensor cores (named barriers 1, 2, 3, round robin from the first): each
// issues its products when the one before has issued its own, so that one's softmax runs while
// another's products do, instead of all waiting for the same stage and then computing side by side.
template <class T, class Shape, Walk kWalk, class Maps, class Tiles>
__device__ __forceinline__ void consume(const detail::DilatedParams& p, const BlockWork& w,
                                        const Tiles& tiles, int num_tiles, int passes, const Stages<Shape>& st) {
  constexpr int D = Shape::kHeadDim, BM = Shape::kBlockM, BN = Shape::kBlockN, kStages = Shape::kStages;
  // The warpgroup as a value the compiler knows is warp-uniform (a shuffle from lane 0), as in
  // the backward.
  const int warpgroup = __shfl_sync(0xffffffffu, int(threadIdx.x / 128), 0) - 1;
  const int warp = threadIdx.x / 32 % 4, g = threadIdx.x % 32 / 4;
  const bool causal_by_position = kWalk == Walk::indexed && p.causal;
  const float scale_log2 = p.scale * kLog2e;
  // Named barrier ids of this warpgroup's turn and of the next one's (round robin).
  constexpr int kConsumers = Shape::kConsumers;
  // The next tile's S = Q·Kᵀ before this tile's P·V needs registers for a tile's P beside the next
  // tile's S: two consumers (224 registers) and three beside the TMA producer (160) have them, three
  // beside a gathering producer (152) not (ptxas, the index-map TMA instance at head dim 64: 256 / 288
  // bytes of spills overlapped at 32 / 160 registers, 4 / 8 in turn at 56 / 152: 3 % faster at long64k).
  constexpr bool kOverlap = kConsumers == 2 || !kGathers<Shape, kWalk, Maps>;
  const int my_turn = 1 + warpgroup, next_turn = 1 + (warpgroup + 1) % kConsumers;
  const int ring_tiles = passes * num_tiles;
  if (ring_tiles > 0 && warpgroup + 1 == kConsumers) named_barrier_arrive(1, 256);  // the first one's first turn

  for (int pass = 0; pass < passes; ++pass) {
    const int ring0 = pass * num_tiles;  // the stage ring's index of the pass's first tile
    const std::int64_t warp_row0 = w.tile_begin + pass * BM + warpgroup * 64 + warp * 16;
    const std::int64_t qi[2] = {warp_row0 + g, warp_row0 + g + 8};
    const int query_position[2] = {causal_by_position ? w.position32(w.query, int(qi[0])) : 0,
                                   causal_by_position ? w.position32(w.query, int(qi[1])) : 0};
    const std::uint32_t q_tile = smem_address(st.q) + pass * Shape::kQBytes + warpgroup * 64 * 128;
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.0f, 0.0f};
    const bool last_tile_short = num_tiles > 0 && tiles.valid(num_tiles - 1) < BN;
    // The softmax of tile `it` (in stage `stage`) in place of its scores; false when the rows'
    // corrections are 1 (the accumulators stay as they are). With kRunningMax a tile after the pass's
    // first takes the running max as it stands (TMA instances, no dropout: score_tile_at_running_max),
    // and only where that fails its max: the warp's scores again (recompute_scores) through score_tile.
    auto softmax = [&](int it, int stage, float (&s)[BN / 8][4], float (&correction)[2], bool first) {
      // The dilated walk's tiles are whole but its last, and so are the TMA instances' block-sparse
      // ones (blocks of whole tiles; the sequence's end in the last) (kRunningMax: a per-pass flag,
      // where the tiles' int64 end would take a register the loop spills).
      constexpr bool kLastShort = kWalk == Walk::dilated || (kWalk == Walk::sparse && Shape::kTma);
      const bool short_tile = kRunningMax && kLastShort ? it + 1 == num_tiles && last_tile_short : tiles.valid(it) < BN;
      const bool masked_columns = short_tile || p.key_padding_mask != nullptr;
      const std::int64_t k0 = tiles.start(it);
      const float* bias = st.bias + stage * BN;
      const int* key_position = st.key_position + stage * BN;
      if (kRunningMax && Shape::kTma && !first && p.dropout_p == 0.0f) {
        if (score_tile_at_running_max<BN, kWalk>(p, w, s, row_max, row_sum, k0, warp_row0, qi, query_position, bias,
                                                 key_position, scale_log2, masked_columns))
          return false;
        recompute_scores<T, D, BM, BN>(s, q_tile + warp * 16 * 128, smem_address(st.k + stage * Shape::kKvBytes));
      }
      score_tile<BN, kWalk>(p, w, s, correction, row_max, row_sum, k0, warp_row0, qi, query_position, bias,
                            key_position, scale_log2, masked_columns);
      return true;
    };
    // Ring tile `r`: wait for its stage, take the turn and issue S = Q·Kᵀ in a wgmma group of its own.
    auto issue_scores_in_turn = [&](int r, float (&s)[BN / 8][4]) {
      const int stage = r % kStages;
      barrier_wait(st.full + stage, (r / kStages) & 1);
      barrier_wait(st.keys + stage, (r / kStages) & 1);
      fence_async_shared();
      named_barrier_sync(my_turn, 256);
      if constexpr (kOverlap) fence_registers(reinterpret_cast<Flat<D / 2>&>(acc));  // P·V follows
      wgmma_fence();
      issue_scores<T, D, BM, BN>(s, q_tile, smem_address(st.k + stage * Shape::kKvBytes));
      wgmma_commit();
    };
    // The next warpgroup's turn; the last warpgroup's last ring tile hands over nothing (the first
    // has finished, so no sync would meet it).
    auto hand_over_turn = [&](int r) {
      if (warpgroup + 1 < kConsumers || r + 1 < ring_tiles) named_barrier_arrive(next_turn, 256);
    };
    // This thread's arrival on ring tile r's `empty`, once its arrival of the stage's previous phase
    // has completed (compute-sanitizer's synccheck expects every arrival's phase to be waited for).
    auto release = [&](int r) {
      if (r >= kStages) barrier_wait(st.empty + r % kStages, (r / kStages + 1) & 1);
      barrier_arrive(st.empty + r % kStages);
    };
    if constexpr (kOverlap) {
      std::uint32_t probabilities[BN / 16][4];  // the previous tile's P, waiting for its P·V
      // Tile `it`'s S (and the previous tile's P·V, which runs on while this tile's softmax does), then
      // its softmax. Tile 0 is peeled off the loop so that every wgmma group of the loop is
      // unconditional (ptxas serialises wgmmas whose groups it cannot follow through a branch).
      auto scores = [&](int it, float (&s)[BN / 8][4], bool with_pv) {
        const int r = ring0 + it, previous = (r + kStages - 1) % kStages;
        issue_scores_in_turn(r, s);
        if (with_pv) issue_pv<T, D, BN>(acc, probabilities, smem_address(st.v + previous * Shape::kKvBytes));
        wgmma_commit();
        hand_over_turn(r);
        wgmma_wait<1>();
        fence_registers(reinterpret_cast<Flat<BN / 2>&>(s));
        float correction[2];
        const bool rescale = softmax(it, r % kStages, s, correction, !with_pv);
        wgmma_wait<0>();
        fence_registers(reinterpret_cast<Flat<D / 2>&>(acc));
        if (with_pv) {
          release(r - 1);
          if (rescale) rescale_rows<D>(acc, correction);
        }
        pack_probabilities<T, BN>(s, probabilities);
      };
      if (num_tiles > 0) {
        float s[BN / 8][4];
        scores(0, s, false);
      }
      for (int it = 1; it < num_tiles; ++it) {
        float s[BN / 8][4];
        scores(it, s, true);
      }
      if (num_tiles > 0) {  // the last tile's P·V
        fence_registers(reinterpret_cast<Flat<D / 2>&>(acc));
        wgmma_fence();
        const int last_stage = (ring0 + num_tiles - 1) % kStages;
        issue_pv<T, D, BN>(acc, probabilities, smem_address(st.v + last_stage * Shape::kKvBytes));
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(reinterpret_cast<Flat<D / 2>&>(acc));
        release(ring0 + num_tiles - 1);
      }
    } else {
      // No register room for one tile's P beside the next tile's S, so each tile's P·V follows its
      // softmax; the turns still keep one warpgroup's softmax beside the others' products.
      for (int it = 0; it < num_tiles; ++it) {
        const int r = ring0 + it, stage = r % kStages;
        float s[BN / 8][4];
        issue_scores_in_turn(r, s);
        hand_over_turn(r);
        wgmma_wait<0>();
        fence_registers(reinterpret_cast<Flat<BN / 2>&>(s));
        float correction[2];
        const bool rescale = softmax(it, stage, s, correction, it == 0);
        if (it > 0 && rescale) rescale_rows<D>(acc, correction);
        std::uint32_t probabilities[BN / 16][4];
        pack_probabilities<T, BN>(s, probabilities);
        fence_registers(reinterpret_cast<Flat<D / 2>&>(acc));
        wgmma_fence();
        issue_pv<T, D, BN>(acc, probabilities, smem_address(st.v + stage * Shape::kKvBytes));
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(reinterpret_cast<Flat<D / 2>&>(acc));
        release(r);
      }
    }
    if (!w.accumulate && !p.float32_outputs)
      write_rows_through_shared<T, D, BM, kWalk>(p, w, acc, row_max, row_sum, warp_row0,
                                          st.q + pass * Shape::kQBytes + (warpgroup * 64 + warp * 16) * 128);
    else
      write_forward_rows<T, D>(p, w, acc, row_max, row_sum, qi);
  }
  for (int r = ring_tiles > kStages ? ring_tiles - kStages : 0; r < ring_tiles; ++r)
    barrier_wait(st.empty + r % kStages, (r / kStages) & 1);  // the last arrivals' phases
}

// The TMA instances' decoded work, in shared memory after the barriers (Shape::kWorkBytes).
template <int BN, Walk kWalk>
struct SharedWork {
  BlockWork work;
  OtherTiles<BN, kWalk == Walk::sparse> tiles;
  int passes;  // query tiles of kBlockM rows the block works through (LaunchPlan::passes)
  bool run;
};

// Maps: ForwardTensorMaps for the TMA instances (Shape::kTma), else NoTensorMaps.
template <class T, class Shape, Walk kWalk, class Maps>
__global__ void __launch_bounds__(Shape::kThreads, 1)
    forward_kernel(const __grid_constant__ detail::DilatedParams p, const __grid_constant__ LaunchPlan plan,
                   const __grid_constant__ Maps maps) {
  static_assert(!Shape::kTma || sizeof(SharedWork<Shape::kBlockN, kWalk>) <= Shape::kWorkBytes, "the decoded work's slot");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Shape::kHeadDim;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Stages<Shape> st(smem_raw);
  // TMA instances: thread 0 decodes the block's work into shared memory (SharedWork, after the
  // barriers) and each role copies it once it has its registers, so that nothing computed before
  // the reallocation is live across it (ptxas fits such values into the producer's 32 registers:
  // decoded by every thread before the roles part, the work spilled) and decode's 64-bit divisions
  // (calls of one routine that both roles' code would share) stay out of the reallocated code.
  auto* shared = reinterpret_cast<SharedWork<Shape::kBlockN, kWalk>*>(st.empty + Shape::kStages);
  if (threadIdx.x == 0) {
    for (int s = 0; s < Shape::kStages; ++s) {
      // cp.async (every instance's index-map walk): the producer's threads, when their copies land;
      // TMA: the thread that issues the copies
      barrier_init(st.full + s, !Shape::kTma || kWalk == Walk::indexed ? 128 : 1);
      barrier_init(st.keys + s, 128);  // the producer's threads
      barrier_init(st.empty + s, 128 * Shape::kConsumers);  // the consumers' threads
    }
    if constexpr (Shape::kTma) {
      fence_barrier_init();  // TMA completes bytes on them
      constexpr int BM = Shape::kBlockM;
      BlockWork w;
      // Passes (the dilated walk, rows in order or under an index map; LaunchPlan::passes): the
      // block's rows are that many query tiles, decoded as one tile of as many rows; a short last
      // block may need fewer.
      const int passes = kWalk != Walk::sparse ? plan.passes : 1;
      if (passes == 3 && Shape::kQBuffers >= 3) shared->run = decode<3 * BM, kWalk>(p, plan, w);
      else if (passes == 2) shared->run = decode<2 * BM, kWalk>(p, plan, w);
      else shared->run = decode<BM, kWalk>(p, plan, w);
      shared->passes = w.tile_rows > BM ? (w.tile_rows + BM - 1) / BM : 1;
      shared->work = w;
      if (shared->run) shared->tiles = other_tiles<Shape::kBlockN, kWalk>(p, w);
    }
  }
  __syncthreads();

  if constexpr (Shape::kTma) {
    if (!shared->run) return;
    // The copy, with what decode's dilated and sparse walks make known to the compiler: no index map.
    auto work = [&] {
      BlockWork w = shared->work;
      if constexpr (kWalk != Walk::indexed) w.index = nullptr;
      return w;
    };
    if (threadIdx.x < 128) {
      registers_decrease<Shape::template kProducerRegisters<kGathers<Shape, kWalk, Maps>>>();
      const BlockWork w = work();
      const auto tiles = shared->tiles;
      if constexpr (kWalk == Walk::indexed && kGathers<Shape, kWalk, Maps>)  // rows by cp.async (gather_row_pair)
        produce<T, Shape, kWalk>(p, w, tiles, w.tile_rows > 0 ? tiles.count : 0, shared->passes, st);
      else if constexpr (kWalk == Walk::indexed)  // one-row boxes (DATTN_SM90_TMA_ROWS)
        produce_tma_rows<T, Shape>(p, w, tiles, w.tile_rows > 0 ? tiles.count : 0, shared->passes, st, maps);
      else
        produce_tma<T, Shape>(p, w, tiles, w.tile_rows > 0 ? tiles.count : 0, shared->passes, st, maps);
      if (!w.accumulate) zero_unselected<T, D, 128>(p, w, &p.out, nullptr, true);
    } else {
      registers_increase<Shape::template kConsumerRegisters<kGathers<Shape, kWalk, Maps>>>();
      const BlockWork w = work();
      const auto tiles = shared->tiles;
      consume<T, Shape, kWalk, Maps>(p, w, tiles, w.tile_rows > 0 ? tiles.count : 0, shared->passes, st);
    }
  } else {
    BlockWork w;
    if (!decode<Shape::kBlockM, kWalk>(p, plan, w)) return;
    const auto tiles = other_tiles<Shape::kBlockN, kWalk>(p, w);
    const int num_tiles = w.tile_rows > 0 ? tiles.count : 0;
    if (threadIdx.x < 128) {
      registers_decrease<Shape::template kProducerRegisters<kGathers<Shape, kWalk, Maps>>>();
      produce<T, Shape, kWalk>(p, w, tiles, num_tiles, 1, st);
      if (!w.accumulate) zero_unselected<T, D, 128>(p, w, &p.out, nullptr, true);
    } else {
      registers_increase<Shape::template kConsumerRegisters<kGathers<Shape, kWalk, Maps>>>();
      consume<T, Shape, kWalk, Maps>(p, w, tiles, num_tiles, 1, st);
    }
  }
#else
  (void)p, (void)plan, (void)maps;
#endif
}

}  // namespace dattn::cuda::sm90

namespace dattn::cuda {

template <class T, int D, int Consumers, bool Tma>
void launch_forward_sm90(const detail::DilatedParams& params, const LaunchPlan& plan, cudaStream_t stream) {
  using Shape = Sm90ForwardShape<D, Consumers, Tma>;
  auto launch = [&](auto kernel, const auto& maps) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Shape::kSmemBytes)) != cudaSuccess)
      check_launch("sm90 forward (shared memory attribute)");
    kernel<<<plan.total_blocks, Shape::kThreads, Shape::kSmemBytes, stream>>>(params, plan, maps);
    check_launch("sm90 forward");
  };
  if constexpr (Tma) {
    // dispatch.cu runs these instances where sm90_tma_covers(params): every walk over whole
    // sequences. An index map's rows are gathered by cp.async (no maps), or with DATTN_SM90_TMA_ROWS
    // come in one-row boxes where q, k and v have such maps.
    if (params.position_index != nullptr && params.block_size == 0) {
#if defined(DATTN_SM90_TMA_ROWS)
      if (sm90_row_maps_fit(params)) {
        ForwardTensorMaps maps{};
        encode_forward_maps(params, plan, 1, 1, maps);  // one-row boxes (map_rate: 1 under an index map)
        return launch(sm90::forward_kernel<T, Shape, Walk::indexed, ForwardTensorMaps>, maps);
      }
#endif
      return launch(sm90::forward_kernel<T, Shape, Walk::indexed, NoTensorMaps>, NoTensorMaps{});
    }
    ForwardTensorMaps maps{};
    encode_forward_maps(params, plan, Shape::kBlockM, Shape::kBlockN, maps);
    if (params.block_size > 0) launch(sm90::forward_kernel<T, Shape, Walk::sparse, ForwardTensorMaps>, maps);
    else launch(sm90::forward_kernel<T, Shape, Walk::dilated, ForwardTensorMaps>, maps);
  } else {
    using Maps = NoTensorMaps;
    auto kernel = params.block_size > 0              ? sm90::forward_kernel<T, Shape, Walk::sparse, Maps>
                  : params.position_index != nullptr ? sm90::forward_kernel<T, Shape, Walk::indexed, Maps>
                                                     : sm90::forward_kernel<T, Shape, Walk::dilated, Maps>;
    launch(kernel, Maps{});
  }
}

}  // namespace dattn::cuda
