// AMX bf16 tiles (tdpbf16ps): the AVX-512 vocabulary plus a tile GEMM on AMX, with the same
// operand rounding as the vdpbf16ps path (bf16 operands, float32 accumulation; bfloat16 data
// only). Include only under a target pragma with avx512bf16, amx-tile and amx-bf16. The process
// must have been granted the tile data state (dispatch.cpp asks the kernel once).
#pragma once

#include "cpu/simd_avx512_bf16.hpp"

namespace dattn::cpu {

namespace amx {

// Every tile is 16 rows × 64 bytes: C as 16×16 float32 (tiles 0-3), A as 16 rows × 16 bf16 pairs
// (4, 5), B as 16 pair-rows × 16 columns (6, 7).
struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

inline void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

// c[16 × 32] (rows < rows_used) = alpha·t (+ c).
template <bool Accumulate>
void store_block(const float* t, int rows_used, float* c, std::int64_t ldc, float alpha) {
  const __m512 scale = _mm512_set1_ps(alpha);
  for (int r = 0; r < rows_used; ++r)
    for (int h = 0; h < 32; h += 16) {
      const __m512 x = _mm512_loadu_ps(t + r * 32 + h);
      _mm512_storeu_ps(c + r * ldc + h, Accumulate ? _mm512_fmadd_ps(scale, x, _mm512_loadu_ps(c + r * ldc + h))
                                                   : _mm512_mul_ps(scale, x));
    }
}

}  // namespace amx

struct AmxBf16Isa : Avx512Isa {
  static constexpr bool dot_bf16 = true;
  static constexpr bool amx_tiles = true;  // the group loops of amx_attention.hpp
  using Exact = Avx512Isa;  // the float32 GEMMs, for products whose bf16 rounding would not hold the bar

  // The tile configuration is per thread and is set for each kernel call's parallel region, then
  // released: other libraries in the process (oneDNN under PyTorch) run their own configurations
  // on the same threads and release them, and a tile instruction under a released configuration
  // is an illegal instruction (seen in the Python tests; tests/test_amx.cpp).
  static void begin_thread() { amx::configure_tiles(); }
  static void end_thread() { _tile_release(); }

  // gemm()'s contract (see gemm.hpp) on AMX. A becomes [M16 × P16] pairs and B [P16 × N] pairs
  // (M16, P16: M and the pair count rounded up to 16, zero-filled), in per-thread buffers; each
  // 32 × 32 block of C is four tiles (each A and B tile loaded serves two products), a last
  // 16 × 32 block two; through a float32 buffer for alpha, accumulation and rows past M.
  template <bool Accumulate, bool TransposeA>
  static void tile_gemm(int M, int N, int K, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
                        float* c, std::int64_t ldc, float alpha) {
    thread_local std::vector<std::uint32_t> a_pairs, b_pairs, staged;
    alignas(64) float block[16 * 32];
    const int pairs = (K + 1) / 2, p16 = (pairs + 15) / 16 * 16, m16 = (M + 15) / 16 * 16;
    // Only the padding is zeroed: the tiles' pair rows past K (B) and columns past K, rows past M (A).
    b_pairs.resize(std::size_t(p16) * N);
    dot_bf16::pack_row_pairs(b, ldb, K, N, b_pairs.data());
    std::fill(b_pairs.begin() + std::ptrdiff_t(pairs) * N, b_pairs.end(), 0u);
    a_pairs.resize(std::size_t(m16) * p16);
    for (int r = 0; r < M; ++r)
      std::fill(a_pairs.begin() + std::ptrdiff_t(r) * p16 + pairs, a_pairs.begin() + std::ptrdiff_t(r + 1) * p16, 0u);
    std::fill(a_pairs.begin() + std::ptrdiff_t(M) * p16, a_pairs.end(), 0u);
    if constexpr (TransposeA) {
      // a is [K × M] (pitch lda >= M rounded up to 16): pair its rows, then transpose to rows of M.
      staged.resize(std::size_t(pairs) * m16);
      dot_bf16::pack_row_pairs(a, lda, K, m16, staged.data());
      for (int p = 0; p < pairs; ++p)
        for (int r = 0; r < M; ++r) a_pairs[std::size_t(r) * p16 + p] = staged[std::size_t(p) * m16 + r];
    } else {
      staged.resize(std::size_t(pairs) * M);
      dot_bf16::pack_column_pairs(a, lda, M, K, staged.data());
      for (int r = 0; r < M; ++r)
        std::copy(staged.begin() + std::ptrdiff_t(r) * pairs, staged.begin() + std::ptrdiff_t(r + 1) * pairs,
                  a_pairs.begin() + std::ptrdiff_t(r) * p16);
    }
    const std::int64_t a_stride = std::int64_t(p16) * 4, b_stride = std::int64_t(N) * 4;
    for (int m = 0; m < M; m += 32)
      for (int n = 0; n < N; n += 32) {
        const bool two = m + 16 < M;  // a second row block of A
        const std::uint32_t* a0 = a_pairs.data() + std::size_t(m) * p16;
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
          _tile_zero(2);
          _tile_zero(3);
        }
        for (int p = 0; p < p16; p += 16) {
          _tile_loadd(6, b_pairs.data() + std::size_t(p) * N + n, b_stride);
          _tile_loadd(7, b_pairs.data() + std::size_t(p) * N + n + 16, b_stride);
          _tile_loadd(4, a0 + p, a_stride);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {
            _tile_loadd(5, a0 + 16 * p16 + p, a_stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, block, 32 * 4);
        _tile_stored(1, block + 16, 32 * 4);
        amx::store_block<Accumulate>(block, std::min(16, M - m), c + std::int64_t(m) * ldc + n, ldc, alpha);
        if (!two) continue;
        _tile_stored(2, block, 32 * 4);
        _tile_stored(3, block + 16, 32 * 4);
        amx::store_block<Accumulate>(block, std::min(16, M - m - 16), c + std::int64_t(m + 16) * ldc + n, ldc, alpha);
      }
  }
};

}  // namespace dattn::cpu
