// The amx_bf16 kernels' own group loops (the forward with keys as rows, dq and dk/dv with queries
// as rows), operands packed from the bf16 tensors straight into AMX's layouts (A: rows of bf16
// pairs along the reduced dimension; B: pair-rows, one column per output column), each once per
// tile or chunk rather than once per product (a group's key tiles once per group where they fit
// TileCache), and probabilities written as bf16 by the softmax itself. Included by
// kernels_amx_bf16.cpp after attention_kernel.hpp, under its target pragma.
#pragma once

#include "cpu/attention_kernel.hpp"

namespace dattn::cpu {

namespace amx {

inline int round_up(int n, int step) { return (n + step - 1) / step * step; }

// The 32 × 32 block of C at c0 (rows 0-15) and c1 (rows 16-31) in tiles 0-3, and back.
inline void load_block(const float* c0, const float* c1, std::int64_t cs) {
  _tile_loadd(0, c0, cs);
  _tile_loadd(1, c0 + 16, cs);
  _tile_loadd(2, c1, cs);
  _tile_loadd(3, c1 + 16, cs);
}
inline void store_block(float* c0, float* c1, std::int64_t cs) {
  _tile_stored(0, c0, cs);
  _tile_stored(1, c0 + 16, cs);
  _tile_stored(2, c1, cs);
  _tile_stored(3, c1 + 16, cs);
}

// Tiles 0-3 += a[32 rows from a0 × pairs]·b[pairs × columns n .. n + 31]; each A and B tile loaded
// serves two products.
inline void accumulate_block(const std::uint32_t* a0, std::int64_t a_pitch, const std::uint32_t* b,
                             std::int64_t b_pitch, int n, int pairs) {
  const std::int64_t as = a_pitch * 4, bs = b_pitch * 4;
  for (int k = 0; k < pairs; k += 16) {
    _tile_loadd(4, a0 + k, as);
    _tile_loadd(6, b + k * b_pitch + n, bs);
    _tile_loadd(7, b + k * b_pitch + n + 16, bs);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a0 + 16 * a_pitch + k, as);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// c[M × N] (=, or += with Accumulate) a[M × pairs]·b[pairs × N], pitches in elements; M and N
// multiples of 32, pairs of 16 (the buffers are zero-padded). Each 32 × 32 block of C is four
// tiles.
template <bool Accumulate>
void product(int M, int N, int pairs, const std::uint32_t* a, std::int64_t a_pitch, const std::uint32_t* b,
             std::int64_t b_pitch, float* c, std::int64_t ldc) {
  const std::int64_t cs = ldc * 4;
  for (int m = 0; m < M; m += 32)
    for (int n = 0; n < N; n += 32) {
      float* c0 = c + m * ldc + n;
      float* c1 = c0 + 16 * ldc;
      if constexpr (Accumulate) {
        load_block(c0, c1, cs);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      accumulate_block(a + m * a_pitch, a_pitch, b, b_pitch, n, pairs);
      store_block(c0, c1, cs);
    }
}

// c[M × N] += a0[M × pairs0]·b0[pairs0 × N] + a1[M × pairs1]·b1[pairs1 × N] (pairs1 may be 0), as
// product<true> with C loaded and stored once for both.
inline void product_two(int M, int N, int pairs0, const std::uint32_t* a0, std::int64_t a0_pitch, const std::uint32_t* b0,
                        std::int64_t b0_pitch, int pairs1, const std::uint32_t* a1, std::int64_t a1_pitch,
                        const std::uint32_t* b1, std::int64_t b1_pitch, float* c, std::int64_t ldc) {
  const std::int64_t cs = ldc * 4;
  for (int m = 0; m < M; m += 32)
    for (int n = 0; n < N; n += 32) {
      float* c0 = c + m * ldc + n;
      float* c1 = c0 + 16 * ldc;
      load_block(c0, c1, cs);
      accumulate_block(a0 + m * a0_pitch, a0_pitch, b0, b0_pitch, n, pairs0);
      accumulate_block(a1 + m * a1_pitch, a1_pitch, b1, b1_pitch, n, pairs1);
      store_block(c0, c1, cs);
    }
}

// dst[c·dp + r] = src[r·sp + c] for a 16 × 16 block of 32-bit words (a pair of bf16 each).
inline void transpose_block(const std::uint32_t* src, std::int64_t sp, std::uint32_t* dst, std::int64_t dp) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * sp);
  for (int i = 0; i < 16; i += 2) {  // lane L of t[i], t[i+1]: rows i, i+1 at columns 4L..4L+3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // lane L of r[g + e]: rows g..g+3 at column 4L + e
    r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // a 4 × 4 transpose of 128-bit lanes
    const __m512i c0 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x44), c1 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xee);
    const __m512i c2 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x44),
                  c3 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xee);
    _mm512_storeu_si512(dst + e * dp, _mm512_shuffle_i32x4(c0, c2, 0x88));
    _mm512_storeu_si512(dst + (4 + e) * dp, _mm512_shuffle_i32x4(c0, c2, 0xdd));
    _mm512_storeu_si512(dst + (8 + e) * dp, _mm512_shuffle_i32x4(c1, c3, 0x88));
    _mm512_storeu_si512(dst + (12 + e) * dp, _mm512_shuffle_i32x4(c1, c3, 0xdd));
  }
}

// dst[c·dp + r] = src[r·sp + c] for r < rows, c < cols (both multiples of 16).
inline void transpose(const std::uint32_t* src, std::int64_t sp, int rows, int cols, std::uint32_t* dst,
                      std::int64_t dp) {
  for (int r = 0; r < rows; r += 16)
    for (int c = 0; c < cols; c += 16) transpose_block(src + r * sp + c, sp, dst + c * dp + r, dp);
}

// An A operand: row i of the source (i < rows, its D bf16 values) as row i of dst [padded_rows ×
// pairs] (pairs along D), zero past D and past rows.
template <class RowFn>
void pack_rows(RowFn&& row, int rows, int padded_rows, int D, int pairs, std::uint32_t* dst) {
  constexpr int kAhead = 4;
  for (int i = 0; i < std::min(kAhead, rows); ++i) prefetch_row(row(i), D);
  for (int i = 0; i < padded_rows; ++i) {
    if (i + kAhead < rows) prefetch_row(row(i + kAhead), D);
    std::uint16_t* d = reinterpret_cast<std::uint16_t*>(dst + std::int64_t(i) * pairs);
    const int n = i < rows ? D : 0;
    if (n) std::memcpy(d, row(i), std::size_t(n) * 2);
    std::fill(d + n, d + 2 * pairs, std::uint16_t(0));
  }
}

// A B operand with pairs along the source rows: dst[p·width + d] = (row 2p [d], row 2p+1 [d]) for
// p < padded_rows / 2 (padded_rows even), d < width (a multiple of 32); zero past D and past rows.
template <class RowFn>
void pack_row_pairs(RowFn&& row, int rows, int padded_rows, int D, int width, std::uint32_t* dst) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                      37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  constexpr int kAhead = 4;
  for (int i = 0; i < std::min(kAhead, rows); ++i) prefetch_row(row(i), D);
  for (int i = 0; i < padded_rows; i += 2, dst += width) {
    for (int j = i + kAhead; j < std::min(i + kAhead + 2, rows); ++j) prefetch_row(row(j), D);
    const void* even = i < rows ? static_cast<const void*>(row(i)) : nullptr;
    const void* odd = i + 1 < rows ? static_cast<const void*>(row(i + 1)) : nullptr;
    for (int d = 0; d < width; d += 32) {
      const __mmask32 mask = D - d >= 32 ? ~__mmask32(0) : D > d ? __mmask32((1u << (D - d)) - 1) : 0;
      const __m512i x = even ? _mm512_maskz_loadu_epi16(mask, static_cast<const std::uint16_t*>(even) + d)
                             : _mm512_setzero_si512();
      const __m512i y = odd ? _mm512_maskz_loadu_epi16(mask, static_cast<const std::uint16_t*>(odd) + d)
                            : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d, _mm512_permutex2var_epi16(x, lo, y));
      _mm512_storeu_si512(dst + d + 16, _mm512_permutex2var_epi16(x, hi, y));
    }
  }
}

// 32 float32 values as 32 bf16 (round to nearest even), in order: one row of pairs.
inline void store_bf16(const float* x, std::uint32_t* dst) {
  _mm512_storeu_si512(dst, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x))));
}

// 32 float32 values x as hi + lo, each 32 bf16 in order: |x − hi − lo| <= 2^-18·|x|, so products
// of hi and lo with bf16 data are nearly float32-accurate.
inline void store_bf16_split(const float* x, std::uint32_t* hi, std::uint32_t* lo) {
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x1, x0));
  const __m512 h0 = _mm512_cvtpbh_ps(reinterpret_cast<__m256bh>(_mm512_castsi512_si256(h)));
  const __m512 h1 = _mm512_cvtpbh_ps(reinterpret_cast<__m256bh>(_mm512_extracti64x4_epi64(h, 1)));
  _mm512_storeu_si512(hi, h);
  _mm512_storeu_si512(lo, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, h1), _mm512_sub_ps(x0, h0))));
}

// One mask per 16 keys of a tile: set where the key bias is 0 (a usable key).
inline void key_masks(const float* bias, int keys, __mmask16* masks) {
  for (int c = 0; c < keys; c += 16)
    masks[c / 16] = _mm512_cmp_ps_mask(_mm512_loadu_ps(bias + c), _mm512_setzero_ps(), _CMP_EQ_OQ);
}

// scale·s for a usable key, else -inf (a padded key or a padding column, whatever its score).
inline __m512 masked_score(__mmask16 usable, __m512 scale, __m512 s) {
  return _mm512_mask_mul_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), usable, scale, s);
}

// exp(x − shift) as 2^y with y = x·log2 e − shift_log2 (shift_log2 = shift·log2 e; one FMA): y is
// split exactly into n + f, |f| <= 1/2, and 2^f is its degree-6 Taylor polynomial (relative error
// below 1.2e-7). y below -126, a masked score of -inf included, gives exactly 0; a NaN stays NaN.
inline __m512 exp_shifted(__m512 x, __m512 shift_log2) {
  const __m512 y = _mm512_fmsub_ps(x, _mm512_set1_ps(1.44269504f), shift_log2);
  const __mmask16 kept = _mm512_cmp_ps_mask(y, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  constexpr float c[] = {1.5403530e-4f, 1.3333558e-3f, 9.6181291e-3f, 5.5504109e-2f, 2.4022651e-1f, 6.9314718e-1f, 1.0f};
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_maskz_scalef_ps(kept, p, n);
}
inline __m512 log2e_times(float x) { return _mm512_set1_ps(x * 1.44269504f); }

// 2^y where kept and y >= -126, else 0, with a degree-3 polynomial for 2^f (relative error below
// 7.5e-5): for the forward's probabilities, which become bf16 operands (relative rounding up to
// 2^-9) and whose float32 sum, made of these same values, enters lse (bar 1e-3). f = y − floor(y)
// in one instruction (vreduceps), and vscalefps multiplies by 2^floor(y) itself.
inline __m512 exp2_coarse(__mmask16 kept, __m512 y) {
  kept = _mm512_mask_cmp_ps_mask(kept, y, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  const __m512 f = _mm512_reduce_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(7.80245215e-2f), f, _mm512_set1_ps(2.26067171e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.95833504e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.99925196e-1f));
  return _mm512_maskz_scalef_ps(kept, p, y);
}

// Two rows of 16 float32 values as 16 bf16 pairs (row0[c], row1[c]): one pair-row of a B operand.
inline __m512i interleave_bf16(__m512 row0, __m512 row1) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(row1, row0)));
}

template <class X>
X* sized(std::vector<X>& v, std::int64_t n) {
  if (v.size() < std::size_t(n)) v.resize(std::size_t(n));
  return v.data();
}

// The packed tiles of a group's other side, kept while the group's own tiles meet them in turn: a
// tile is packed on first use, and again only where a causal chunk cuts it differently. A group
// whose tiles would pass kBytes has one slot, packed on every use.
struct TileCache {
  static constexpr std::int64_t kBytes = std::int64_t(1) << 20;
  std::vector<std::uint32_t> words;
  std::vector<std::int64_t> first;  // per slot: the first row packed there and the row count, or -1
  std::vector<int> rows;
  std::int64_t tile_words = 0;
  bool kept = false;

  void reset(std::int64_t other_length, std::int64_t words_per_tile) {
    const std::int64_t tiles = (other_length + kTileRows - 1) / kTileRows;
    kept = tiles * words_per_tile * 4 <= kBytes;
    tile_words = words_per_tile;
    const std::int64_t slots = kept ? tiles : 1;
    sized(words, slots * words_per_tile);
    first.assign(std::size_t(slots), -1);
    rows.assign(std::size_t(slots), -1);
  }
  // The packed words of rows [j0, j0 + n), and whether they must be packed now.
  std::uint32_t* slot(std::int64_t j0, int n, bool& pack) {
    const std::size_t at = kept ? std::size_t(j0 / kTileRows) : 0;
    pack = !kept || first[at] != j0 || rows[at] != n;
    first[at] = j0;
    rows[at] = n;
    return words.data() + std::int64_t(at) * tile_words;
  }
};

// Per-thread buffers of the packed operands, grown once to the largest shapes. The forward's Qᵀ and
// Oᵀ have their own (own_cols, own_acc): taking the backward's own_b and product for them made the
// backward 5-8 % slower at N = 16384 (2 threads), only the heap layout having changed.
struct Buffers {
  std::vector<std::uint32_t> own_a, own_b, own_cols, tile_rows, tile_b, tile_c, tile_d, probs, grads;
  std::vector<float> product, product_b, own_acc, row_values;
  TileCache tiles;
};
inline Buffers& buffers() {
  thread_local Buffers b;
  return b;
}

}  // namespace amx

// Forward over one group on AMX, keys as rows: Sᵀ = K·Qᵀ, the online softmax of each query (a
// column: its max and sum are vertical, 16 queries per vector), Pᵀ written as bf16 pair-rows by
// the softmax itself, then Oᵀ += Vᵀ·Pᵀ in the tiles. A chunk's Oᵀ, max and sum live in chunk-local
// buffers ([Dp × chunk], per-column scaling is one vector multiply) and go back to the state rows
// at the chunk's end.
template <class I, class T>
void forward_group_amx(const SideView<I, T>& own, const SideView<I, T>& other, const Group& g, Scratch<I>& s) {
  static_assert(std::is_same_v<T, BFloat16>);
  const detail::DilatedParams& p = own.p;
  const int D = int(p.head_dim), Dp = s.padded_d, pairs = amx::round_up((D + 1) / 2, 16);
  const int C = int(kChunkRows), Tr = int(kTileRows);
  constexpr int kBlocks = int(kTileRows) / 16;  // 16-query column blocks of a tile
  amx::Buffers& b = amx::buffers();
  std::uint32_t* q_rows = amx::sized(b.own_a, std::int64_t(C) * pairs);
  std::uint32_t* q_cols = amx::sized(b.own_cols, std::int64_t(pairs) * C);  // Qᵀ pairs [pairs × Cp]
  std::uint32_t* v_rows = amx::sized(b.tile_rows, std::int64_t(Tr / 2) * std::max(Dp, 2 * pairs));
  const std::int64_t k_words = std::int64_t(Tr) * pairs;  // a tile: K [Kp × pairs], then Vᵀ [Dp × Kp/2]
  b.tiles.reset(g.other_length, k_words + std::int64_t(Dp) * (Tr / 2));
  // Wide: two key tiles per step (their Pᵀ in one softmax pass, Oᵀ loaded and stored once per 128
  // keys), where the key tiles are kept and no key is masked but by its count: no causal mask,
  // padding mask or dropout.
  const bool wide =
      b.tiles.kept && !p.causal && !p.key_padding_mask && p.dropout_p == 0.0f;
  const int span = wide ? 2 : 1;
  std::uint32_t* probs = amx::sized(b.probs, std::int64_t(span * Tr / 2) * Tr);  // Pᵀ pairs [Kp/2 × Qp]
  // Sᵀ [Kp × Qp]: wide, its 2·Tr² floats run on into grad_scores, which the forward leaves unused.
  float* scores = wide && s.grad_scores != s.scores + std::int64_t(Tr) * Tr
                      ? amx::sized(b.product, std::int64_t(2 * Tr) * Tr)
                      : s.scores;
  float* acc_t = amx::sized(b.own_acc, std::int64_t(Dp) * C);          // Oᵀ [Dp × Cp]
  float* column_max = amx::sized(b.row_values, 2 * std::int64_t(C));
  float* column_sum = column_max + C;
  __mmask16 key_keep[2 * kTileRows * kBlocks], pair_keep[kTileRows * kBlocks];
  int keep_keys = -1;  // the key count key_keep was built for without a padding mask, else -1
  bool all_keys = false;
  const std::int64_t diagonal = causal_diagonal(own, other);
  const std::int64_t state_step = own.state_step();
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 scale = _mm512_set1_ps(p.scale), scale_log2 = _mm512_set1_ps(p.scale * 1.44269504f);
  // One query tile at a time meets every key tile while its Oᵀ stays in L1, if the packed key tiles
  // are kept; else a chunk of query tiles meets each key tile, packed once per chunk.
  const std::int64_t chunk_rows = b.tiles.kept ? kTileRows : kChunkRows;
  for (std::int64_t c0 = g.begin; c0 < g.end; c0 += chunk_rows) {
    const int chunk = int(std::min(chunk_rows, g.end - c0)), Cp = amx::round_up(chunk, 32);
    amx::pack_rows([&](int i) { return own.row(p.q, c0 + i); }, chunk, Cp, D, pairs, q_rows);
    amx::transpose(q_rows, pairs, Cp, pairs, q_cols, Cp);
    const std::int64_t state0 = own.state(c0);
    const bool contiguous = state_step == 1 && chunk % 16 == 0;
    if (contiguous) {
      amx::transpose(reinterpret_cast<const std::uint32_t*>(s.acc + state0 * Dp), Dp, chunk, Dp,
                     reinterpret_cast<std::uint32_t*>(acc_t), Cp);
    } else {
      for (int i = 0; i < chunk; ++i)
        for (int d = 0; d < Dp; ++d) acc_t[std::int64_t(d) * Cp + i] = s.acc[(state0 + i * state_step) * Dp + d];
    }
    for (int d = 0; d < Dp; ++d) std::fill(acc_t + std::int64_t(d) * Cp + chunk, acc_t + std::int64_t(d) * Cp + Cp, 0.0f);
    for (int i = 0; i < Cp; ++i) {
      column_max[i] = i < chunk ? s.row_max[state0 + i * state_step] : -std::numeric_limits<float>::infinity();
      column_sum[i] = i < chunk ? s.row_sum[state0 + i * state_step] : 0.0f;
    }
    const std::int64_t key_end =
        diagonal == kNoDiagonal ? g.other_length : std::clamp<std::int64_t>(diagonal + c0 + chunk, 0, g.other_length);
    for (std::int64_t k0 = 0; k0 < key_end; k0 += span * kTileRows) {
      // keys0 in the first tile (Kp0 padded), keys1 in the second (wide only; 0 if none).
      const int keys0 = int(std::min(kTileRows, key_end - k0)), Kp0 = amx::round_up(keys0, 32);
      const int keys1 = wide ? int(std::clamp<std::int64_t>(key_end - k0 - kTileRows, 0, kTileRows)) : 0;
      const int Kp1 = amx::round_up(keys1, 32), keys = keys0 + keys1, Kp = Kp0 + Kp1;
      std::uint32_t *k_rows = nullptr, *v_cols = nullptr, *k_rows1 = nullptr, *v_cols1 = nullptr;
      for (int t = 0; t < (keys1 ? 2 : 1); ++t) {
        const std::int64_t t0 = k0 + t * kTileRows;
        const int tk = t ? keys1 : keys0, tKp = t ? Kp1 : Kp0;
        bool pack;
        std::uint32_t* kr = b.tiles.slot(t0, tk, pack);
        std::uint32_t* vc = kr + k_words;
        if (pack) {
          amx::pack_rows([&](int i) { return other.row(p.k, t0 + i); }, tk, tKp, D, pairs, kr);
          amx::pack_row_pairs([&](int i) { return other.row(p.v, t0 + i); }, tk, tKp, D, Dp, v_rows);
          amx::transpose(v_rows, Dp, tKp / 2, Dp, vc, tKp / 2);
        }
        (t ? k_rows1 : k_rows) = kr;
        (t ? v_cols1 : v_cols) = vc;
      }
      // Each key row's mask over the column blocks: all set for a usable key. Without a padding
      // mask it depends on the key count alone, so it is rebuilt only where that changes.
      if (wide) {
        if (keys != keep_keys) {
          for (int i = 0; i < Kp; ++i)
            std::fill(key_keep + i * kBlocks, key_keep + (i + 1) * kBlocks, __mmask16(i < keys ? 0xffff : 0));
          all_keys = keys == Kp;
          keep_keys = keys;
        }
      } else if (p.key_padding_mask || keys != keep_keys) {
        pack_key_bias(other, k0, keys, Kp, s.tile_bias);
        for (int i = 0; i < Kp; ++i)
          std::fill(key_keep + i * kBlocks, key_keep + (i + 1) * kBlocks, __mmask16(s.tile_bias[i] == 0.0f ? 0xffff : 0));
        all_keys = keys == Kp && std::all_of(s.tile_bias, s.tile_bias + Kp, [](float x) { return x == 0.0f; });
        keep_keys = p.key_padding_mask ? -1 : keys;
      }
      for (std::int64_t q0 = c0; q0 < c0 + chunk; q0 += kTileRows) {
        const int queries = int(std::min(kTileRows, c0 + chunk - q0)), Qp = amx::round_up(queries, 32);
        const CausalPair pair = record_pair(own, q0, queries, other, k0, keys, s);
        if (pair == CausalPair::skipped) continue;
        const int at = int(q0 - c0);
        amx::product<false>(Kp0, Qp, pairs, k_rows, pairs, q_cols + at, Cp, scores, Qp);
        if (keys1) amx::product<false>(Kp1, Qp, pairs, k_rows1, pairs, q_cols + at, Cp, scores + Kp0 * Qp, Qp);
        const __mmask16* keep = key_keep;
        if (pair == CausalPair::masked) {  // queries before the key
          for (int i = 0; i < Kp; ++i)
            for (int cb = 0; cb < Qp / 16; ++cb) {
              __mmask16 m = key_keep[i * kBlocks + cb];
              for (int c = 0; c < 16; ++c)
                if (16 * cb + c < queries && s.key_original[std::min(i, keys - 1)] > s.query_original[16 * cb + c])
                  m &= __mmask16(~(1u << c));
              pair_keep[i * kBlocks + cb] = m;
            }
          keep = pair_keep;
        }
        // The next key tile's rows, where it is yet to be packed: their loads overlap the softmax.
        const std::int64_t next = k0 + span * kTileRows;
        const int ahead =
            next < key_end && (c0 == g.begin || !b.tiles.kept) ? int(std::min(span * kTileRows, key_end - next)) : 0;
        const int ahead_step = (ahead + Qp / 16 - 1) / (Qp / 16);  // spread over the column blocks
        const bool dropout = p.dropout_p > 0.0f;
        const bool unmasked = all_keys && pair != CausalPair::masked && p.scale > 0.0f;
        for (int cb = 0; cb < Qp / 16; ++cb) {
          for (int i = cb * ahead_step; i < std::min(ahead, (cb + 1) * ahead_step); ++i) {
            prefetch_row(other.row(p.k, next + i), D);
            prefetch_row(other.row(p.v, next + i), D);
          }
          const float* column = scores + 16 * cb;
          // exp(scale·S − shift) of the block as Pᵀ pair-rows, returning its sum; with Track, the
          // maximum of the raw scores too (unmasked tiles only).
          auto exp_pass = [&]<bool Track>(__m512 shift_log2, __m512* raw_top) {
            __m512 sum[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int i = 0; i < Kp; i += 2) {
              __m512 e[2];
              for (int r = 0; r < 2; ++r) {
                const __m512 x = _mm512_loadu_ps(column + (i + r) * Qp);
                if constexpr (Track) raw_top[r] = _mm512_max_ps(raw_top[r], x);
                e[r] = amx::exp2_coarse(keep[(i + r) * kBlocks + cb], _mm512_fmsub_ps(x, scale_log2, shift_log2));
                sum[r] = _mm512_add_ps(sum[r], e[r]);
                if (dropout) _mm512_storeu_ps(scores + (i + r) * Qp + 16 * cb, e[r]);
              }
              _mm512_storeu_si512(probs + (i / 2) * Qp + 16 * cb, amx::interleave_bf16(e[0], e[1]));
            }
            return _mm512_add_ps(sum[0], sum[1]);
          };
          // The column's shift moves only where the tile's maximum passes it by more than kSlack, so
          // that most tiles rescale nothing: probabilities stay below e^kSlack, lse = shift + log sum.
          constexpr float kSlack = 8.0f;
          const __m512 old_max = _mm512_loadu_ps(column_max + at + 16 * cb);
          const __m512 limit = _mm512_add_ps(old_max, _mm512_set1_ps(kSlack));
          float* l = column_sum + at + 16 * cb;
          __m512 top_all;
          if (unmasked && !dropout && _mm512_cmp_ps_mask(old_max, neg_inf, _CMP_NEQ_UQ) == 0xffff) {
            // Every column has a shift: the exponentials with it in one pass, the maximum beside
            // them; only a block whose maximum passes the limit (rare after the first tiles) is redone.
            __m512 raw_top[2] = {neg_inf, neg_inf};
            const __m512 sum =
                exp_pass.template operator()<true>(_mm512_mul_ps(old_max, _mm512_set1_ps(1.44269504f)), raw_top);
            top_all = _mm512_mul_ps(scale, _mm512_max_ps(raw_top[0], raw_top[1]));
            if (!_mm512_cmp_ps_mask(top_all, limit, _CMP_GT_OQ)) {
              _mm512_storeu_ps(l, _mm512_add_ps(_mm512_loadu_ps(l), sum));
              continue;
            }
          } else {
            __m512 top[4] = {neg_inf, neg_inf, neg_inf, neg_inf};
            if (unmasked) {  // every key usable and scale > 0: the maximum of the raw scores, scaled once
              for (int i = 0; i < Kp; i += 4)
                for (int r = 0; r < 4; ++r) top[r] = _mm512_max_ps(top[r], _mm512_loadu_ps(column + (i + r) * Qp));
              for (int r = 0; r < 4; ++r) top[r] = _mm512_mul_ps(scale, top[r]);
            } else {
              for (int i = 0; i < Kp; i += 4)
                for (int r = 0; r < 4; ++r)
                  top[r] = _mm512_max_ps(top[r], _mm512_mask_mul_ps(neg_inf, keep[(i + r) * kBlocks + cb], scale,
                                                                    _mm512_loadu_ps(column + (i + r) * Qp)));
            }
            top_all = _mm512_max_ps(_mm512_max_ps(top[0], top[1]), _mm512_max_ps(top[2], top[3]));
          }
          const __mmask16 grow = _mm512_cmp_ps_mask(top_all, limit, _CMP_GT_OQ);
          const __m512 new_max = _mm512_mask_mov_ps(old_max, grow, top_all);
          _mm512_storeu_ps(column_max + at + 16 * cb, new_max);
          const __m512 shift = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(new_max, neg_inf, _CMP_NEQ_UQ), new_max);
          const __m512 shift_log2 = _mm512_mul_ps(shift, _mm512_set1_ps(1.44269504f));
          const __m512 fix = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), grow, amx::exp_shifted(old_max, shift_log2));
          const __m512 sum = exp_pass.template operator()<false>(shift_log2, nullptr);
          _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), fix, sum));
          if (grow)
            for (int d = 0; d < Dp; ++d) {
              float* a = acc_t + std::int64_t(d) * Cp + at + 16 * cb;
              _mm512_storeu_ps(a, _mm512_mul_ps(fix, _mm512_loadu_ps(a)));
            }
        }
        if (dropout) {
          for (int i = 0; i < keys; ++i)
            for (int c = 0; c < queries; ++c) scores[i * Qp + c] *= dropout_factor(p, own.item, s, c, i);
          for (int i = 0; i < Kp; i += 2)
            for (int c = 0; c < Qp; c += 16)
              _mm512_storeu_si512(probs + (i / 2) * Qp + c, amx::interleave_bf16(_mm512_loadu_ps(scores + i * Qp + c),
                                                                                 _mm512_loadu_ps(scores + (i + 1) * Qp + c)));
        }
        if (keys1)
          amx::product_two(Dp, Qp, Kp0 / 2, v_cols, Kp0 / 2, probs, Qp, Kp1 / 2, v_cols1, Kp1 / 2,
                           probs + std::int64_t(Kp0 / 2) * Qp, Qp, acc_t + at, Cp);
        else
          amx::product<true>(Dp, Qp, Kp / 2, v_cols, Kp / 2, probs, Qp, acc_t + at, Cp);
      }
    }
    if (contiguous) {
      amx::transpose(reinterpret_cast<const std::uint32_t*>(acc_t), Cp, Dp, chunk,
                     reinterpret_cast<std::uint32_t*>(s.acc + state0 * Dp), Dp);
    } else {
      for (int i = 0; i < chunk; ++i)
        for (int d = 0; d < Dp; ++d) s.acc[(state0 + i * state_step) * Dp + d] = acc_t[std::int64_t(d) * Cp + i];
    }
    for (int i = 0; i < chunk; ++i) {
      s.row_max[state0 + i * state_step] = column_max[i];
      s.row_sum[state0 + i * state_step] = column_sum[i];
    }
  }
}

// dq pass over one group on AMX (own side queries), queries as rows: S = Q·Kᵀ and dP = dO·Vᵀ give
// P and G = P∘Z∘dP row by row (delta += Σ_j G_j), then E += G·K and F += P·K as in dq_group. E and
// F need float32 accuracy (see dq_group): G and P enter as bf16 hi + lo against K stacked twice,
// [G_hi G_lo]·[K; K] and [P_hi P_lo]·[K; K] (one product with the rows stacked where they go
// through a float32 buffer).
template <class I, class T>
void dq_group_amx(const SideView<I, T>& own, const SideView<I, T>& other, const Group& g, Scratch<I>& s) {
  static_assert(std::is_same_v<T, BFloat16>);
  using reg = typename I::reg;
  const detail::DilatedParams& p = own.p;
  const int D = int(p.head_dim), Dp = s.padded_d, pairs = amx::round_up((D + 1) / 2, 16);
  const int C = int(kChunkRows), Tr = int(kTileRows);
  const OperandScales scales = operand_scales<I>(p);
  amx::Buffers& b = amx::buffers();
  std::uint32_t* q_rows = amx::sized(b.own_a, std::int64_t(C) * pairs);
  std::uint32_t* dout_rows = amx::sized(b.own_b, std::int64_t(C) * pairs);
  std::uint32_t* rows = amx::sized(b.tile_rows, std::int64_t(Tr) * pairs);
  const std::int64_t k_words = std::int64_t(pairs) * Tr;  // a tile: Kᵀ, Vᵀ [pairs × Kp], then [K; K] [Kp × Dp]
  b.tiles.reset(g.other_length, 2 * k_words + std::int64_t(Tr) * Dp);
  std::uint32_t* split = amx::sized(b.probs, std::int64_t(2 * Tr) * Tr);
  float* ef = amx::sized(b.product, std::int64_t(2 * Tr) * Dp);
  const std::int64_t diagonal = causal_diagonal(own, other);
  const std::int64_t chunk_rows = b.tiles.kept ? kTileRows : kChunkRows;  // as in forward_group_amx
  for (std::int64_t c0 = g.begin; c0 < g.end; c0 += chunk_rows) {
    const int chunk = int(std::min(chunk_rows, g.end - c0)), padded_chunk = amx::round_up(chunk, 32);
    amx::pack_rows([&](int i) { return own.row(p.q, c0 + i); }, chunk, padded_chunk, D, pairs, q_rows);
    amx::pack_rows([&](int i) { return own.row(p.dout, c0 + i); }, chunk, padded_chunk, D, pairs, dout_rows);
    pack_lse_delta(own, c0, chunk, padded_chunk, s.own_lse, s.own_delta, false);
    const std::int64_t key_end =
        diagonal == kNoDiagonal ? g.other_length : std::clamp<std::int64_t>(diagonal + c0 + chunk, 0, g.other_length);
    for (std::int64_t k0 = 0; k0 < key_end; k0 += kTileRows) {
      const int keys = int(std::min(kTileRows, key_end - k0)), Kp = amx::round_up(keys, 32);
      bool pack;
      std::uint32_t* k_cols = b.tiles.slot(k0, keys, pack);
      std::uint32_t *v_cols = k_cols + k_words, *k_twice = v_cols + k_words;
      if (pack) {
        auto key_row = [&](int i) { return other.row(p.k, k0 + i); };
        amx::pack_rows(key_row, keys, Kp, D, pairs, rows);
        amx::transpose(rows, pairs, Kp, pairs, k_cols, Kp);
        amx::pack_rows([&](int i) { return other.row(p.v, k0 + i); }, keys, Kp, D, pairs, rows);
        amx::transpose(rows, pairs, Kp, pairs, v_cols, Kp);
        amx::pack_row_pairs(key_row, keys, Kp, D, Dp, k_twice);
        std::copy(k_twice, k_twice + (Kp / 2) * Dp, k_twice + (Kp / 2) * Dp);
      }
      pack_key_bias(other, k0, keys, Kp, s.tile_bias);
      __mmask16 usable[kTileRows / 16];
      amx::key_masks(s.tile_bias, Kp, usable);
      for (std::int64_t q0 = c0; q0 < c0 + chunk; q0 += kTileRows) {
        const int queries = int(std::min(kTileRows, c0 + chunk - q0)), Qp = amx::round_up(queries, 32);
        const CausalPair pair = record_pair(own, q0, queries, other, k0, keys, s);
        if (pair == CausalPair::skipped) continue;
        const std::int64_t at = q0 - c0, state0 = own.state(q0), state_step = own.state_step();
        amx::product<false>(Qp, Kp, pairs, q_rows + at * pairs, pairs, k_cols, Kp, s.scores, Kp);
        amx::product<false>(Qp, Kp, pairs, dout_rows + at * pairs, pairs, v_cols, Kp, s.grad_scores, Kp);
        const reg scale = I::set1(scales.q_product), dout_scale = I::set1(scales.dout_product);
        const std::int64_t next = k0 + kTileRows;  // as in forward_group_amx
        const int ahead = next < key_end && (c0 == g.begin || !b.tiles.kept) ? int(std::min(kTileRows, key_end - next)) : 0;
        for (int i = 0; i < Qp; ++i) {
          if (i < ahead) {
            prefetch_row(other.row(p.k, next + i), D);
            prefetch_row(other.row(p.v, next + i), D);
          }
          float* prob = s.scores + i * Kp;
          float* grad = s.grad_scores + i * Kp;
          std::uint32_t* g_split = split + std::int64_t(i) * Kp;
          std::uint32_t* p_split = split + std::int64_t(Qp + i) * Kp;
          if (i >= queries) {
            std::fill(g_split, g_split + Kp, 0u);
            std::fill(p_split, p_split + Kp, 0u);
            continue;
          }
          const reg shift = amx::log2e_times(s.own_lse[at + i]);
          for (int c = 0; c < Kp; c += I::width)
            I::store(prob + c, amx::exp_shifted(amx::masked_score(usable[c / 16], scale, I::load(prob + c)), shift));
          if (pair == CausalPair::masked)  // keys after the query
            for (int c = 0; c < keys; ++c)
              if (s.key_original[c] > s.query_original[i]) prob[c] = 0.0f;
          if (p.dropout_p > 0.0f)
            for (int c = 0; c < keys; ++c) grad[c] *= dropout_factor(p, own.item, s, i, c);
          reg sum = I::zero();
          for (int c = 0; c < Kp; c += I::width) {
            const reg x = I::mul(I::load(prob + c), I::mul(dout_scale, I::load(grad + c)));
            I::store(grad + c, x);
            sum = I::add(sum, x);
          }
          s.row_delta[state0 + i * state_step] += I::reduce_add(sum);
          for (int c = 0; c < Kp; c += 32) {
            amx::store_bf16_split(grad + c, g_split + c / 2, g_split + Kp / 2 + c / 2);
            amx::store_bf16_split(prob + c, p_split + c / 2, p_split + Kp / 2 + c / 2);
          }
        }
        if (state_step == 1 && queries == Qp) {  // E and F accumulate in the tiles
          amx::product<true>(Qp, Dp, Kp, split, Kp, k_twice, Dp, s.acc + state0 * Dp, Dp);
          amx::product<true>(Qp, Dp, Kp, split + std::int64_t(Qp) * Kp, Kp, k_twice, Dp, s.acc2 + state0 * Dp, Dp);
          continue;
        }
        amx::product<false>(2 * Qp, Dp, Kp, split, Kp, k_twice, Dp, ef, Dp);
        for (int i = 0; i < queries; ++i) {
          float* e = s.acc + (state0 + i * state_step) * Dp;
          float* f = s.acc2 + (state0 + i * state_step) * Dp;
          for (int d = 0; d < Dp; d += I::width) {
            I::store(e + d, I::add(I::load(e + d), I::load(ef + i * Dp + d)));
            I::store(f + d, I::add(I::load(f + d), I::load(ef + (Qp + i) * Dp + d)));
          }
        }
      }
    }
  }
}

// dk/dv pass over one group on AMX (own side keys), queries as rows: S = Q·Kᵀ, dP = dO·Vᵀ, then
// dVᵀ += dOᵀ·(P∘Z) and dKᵀ += Qᵀ·dS with the chunk's dKᵀ and dVᵀ accumulated in tiles' float32
// layout [Dp × chunk]: Qᵀ and dOᵀ are packed once per query tile, P and dS as pairs of query rows.
template <class I, class T>
void dkdv_group_amx(const SideView<I, T>& own, const SideView<I, T>& other, const Group& g, Scratch<I>& s) {
  static_assert(std::is_same_v<T, BFloat16>);
  using reg = typename I::reg;
  const detail::DilatedParams& p = own.p;
  const int D = int(p.head_dim), Dp = s.padded_d, pairs = amx::round_up((D + 1) / 2, 16);
  const int C = int(kChunkRows), Tr = int(kTileRows);
  const OperandScales scales = operand_scales<I>(p);
  amx::Buffers& b = amx::buffers();
  std::uint32_t* rows = amx::sized(b.tile_rows, std::int64_t(C) * std::max(pairs, Dp));
  std::uint32_t* k_cols = amx::sized(b.own_a, std::int64_t(pairs) * C);
  std::uint32_t* v_cols = amx::sized(b.own_b, std::int64_t(pairs) * C);
  std::uint32_t* q_rows = amx::sized(b.tile_b, std::int64_t(Tr) * pairs);
  std::uint32_t* dout_rows = amx::sized(b.tile_c, std::int64_t(Tr) * pairs);
  std::uint32_t* q_t = amx::sized(b.tile_d, std::int64_t(Dp) * Tr);  // Qᵀ then dOᵀ, [Dp × Tr/2] each
  std::uint32_t* dout_t = q_t + std::int64_t(Dp) * Tr / 2;
  std::uint32_t* prob_pairs = amx::sized(b.probs, std::int64_t(Tr / 2) * Tr);
  std::uint32_t* grad_pairs = amx::sized(b.grads, std::int64_t(Tr / 2) * Tr);
  float* dk_t = amx::sized(b.product, std::int64_t(Dp) * C);
  float* dv_t = amx::sized(b.product_b, std::int64_t(Dp) * C);
  const std::int64_t diagonal = causal_diagonal(own, other);
  for (std::int64_t c0 = g.begin; c0 < g.end; c0 += kChunkRows) {
    const int chunk = int(std::min(kChunkRows, g.end - c0)), Cp = amx::round_up(chunk, 32);
    amx::pack_rows([&](int i) { return own.row(p.k, c0 + i); }, chunk, Cp, D, pairs, rows);
    amx::transpose(rows, pairs, Cp, pairs, k_cols, Cp);
    amx::pack_rows([&](int i) { return own.row(p.v, c0 + i); }, chunk, Cp, D, pairs, rows);
    amx::transpose(rows, pairs, Cp, pairs, v_cols, Cp);
    pack_key_bias(own, c0, chunk, Cp, s.own_bias);
    std::fill(dk_t, dk_t + std::int64_t(Dp) * Cp, 0.0f);
    std::fill(dv_t, dv_t + std::int64_t(Dp) * Cp, 0.0f);
    const std::int64_t query_begin = diagonal == kNoDiagonal ? 0 : std::max<std::int64_t>(0, diagonal + c0);
    for (std::int64_t q0 = query_begin; q0 < g.other_length; q0 += kTileRows) {
      const int queries = int(std::min(kTileRows, g.other_length - q0)), Qp = amx::round_up(queries, 32);
      auto query_row = [&](int i) { return other.row(p.q, q0 + i); };
      auto dout_row = [&](int i) { return other.row(p.dout, q0 + i); };
      amx::pack_rows(query_row, queries, Qp, D, pairs, q_rows);
      amx::pack_rows(dout_row, queries, Qp, D, pairs, dout_rows);
      amx::pack_row_pairs(query_row, queries, Qp, D, Dp, rows);
      amx::transpose(rows, Dp, Qp / 2, Dp, q_t, Qp / 2);
      amx::pack_row_pairs(dout_row, queries, Qp, D, Dp, rows);
      amx::transpose(rows, Dp, Qp / 2, Dp, dout_t, Qp / 2);
      pack_lse_delta(other, q0, queries, Qp, s.tile_lse, s.tile_delta, true);
      for (std::int64_t k0 = c0; k0 < c0 + chunk; k0 += kTileRows) {
        const int keys = int(std::min(kTileRows, c0 + chunk - k0)), Kp = amx::round_up(keys, 32);
        const CausalPair pair = record_pair(other, q0, queries, own, k0, keys, s);
        if (pair == CausalPair::skipped) continue;
        const std::int64_t at = k0 - c0;
        __mmask16 usable[kTileRows / 16];
        amx::key_masks(s.own_bias + at, Kp, usable);
        amx::product<false>(Qp, Kp, pairs, q_rows, pairs, k_cols + at, Cp, s.scores, Kp);
        amx::product<false>(Qp, Kp, pairs, dout_rows, pairs, v_cols + at, Cp, s.grad_scores, Kp);
        const reg scale = I::set1(scales.q_product), dout_scale = I::set1(scales.dout_product);
        // The next query tile's rows, packed after this chunk's last key tile: their loads overlap.
        const std::int64_t next = q0 + kTileRows;
        const int ahead = k0 + kTileRows >= c0 + chunk && next < g.other_length
                              ? int(std::min(kTileRows, g.other_length - next))
                              : 0;
        for (int i = 0; i < Qp; ++i) {  // rows past the queries: lse +inf and delta 0 give zeros
          if (i < ahead) {
            prefetch_row(other.row(p.q, next + i), D);
            prefetch_row(other.row(p.dout, next + i), D);
          }
          float* prob = s.scores + i * Kp;
          float* grad = s.grad_scores + i * Kp;
          if (p.dropout_p > 0.0f && i < queries)
            for (int c = 0; c < keys; ++c) grad[c] *= (s.dropout_row[c] = dropout_factor(p, own.item, s, i, c));
          const reg shift = amx::log2e_times(s.tile_lse[i]), correction = I::set1(s.tile_delta[i]);
          for (int c = 0; c < Kp; c += I::width) {
            const reg pr = amx::exp_shifted(amx::masked_score(usable[c / 16], scale, I::load(prob + c)), shift);
            I::store(prob + c, pr);
            I::store(grad + c, I::mul(pr, I::sub(I::mul(dout_scale, I::load(grad + c)), correction)));
          }
          if (i >= queries) continue;
          if (pair == CausalPair::masked)  // keys after the query
            for (int c = 0; c < keys; ++c)
              if (s.key_original[c] > s.query_original[i]) prob[c] = grad[c] = 0.0f;
          if (p.dropout_p > 0.0f)
            for (int c = 0; c < keys; ++c) prob[c] *= s.dropout_row[c];
        }
        dot_bf16::pack_row_pairs(s.scores, Kp, Qp, Kp, prob_pairs);
        dot_bf16::pack_row_pairs(s.grad_scores, Kp, Qp, Kp, grad_pairs);
        amx::product<true>(Dp, Kp, Qp / 2, dout_t, Qp / 2, prob_pairs, Kp, dv_t + at, Cp);
        amx::product<true>(Dp, Kp, Qp / 2, q_t, Qp / 2, grad_pairs, Kp, dk_t + at, Cp);
      }
    }
    for (int i = 0; i < chunk; ++i) {
      float* dk = s.acc + (own.state(c0 + i)) * Dp;
      float* dv = s.acc2 + (own.state(c0 + i)) * Dp;
      for (int d = 0; d < Dp; ++d) {
        dk[d] += scales.q_product * dk_t[std::int64_t(d) * Cp + i];
        dv[d] += scales.dout_product * dv_t[std::int64_t(d) * Cp + i];
      }
    }
  }
}

}  // namespace dattn::cpu
