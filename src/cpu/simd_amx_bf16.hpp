// AMX bf16 tiles (tdpbf16ps): the AVX-512 vocabulary plus the tile configuration. The kernels'
// group loops on AMX are in amx_attention.hpp (bf16 operands, float32 accumulation; bfloat16 data
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

}  // namespace amx

struct AmxBf16Isa : Avx512Isa {
  static constexpr bool dot_bf16 = true;   // q and dout unscaled as operands (operand_scales)
  static constexpr bool amx_tiles = true;  // the group loops of amx_attention.hpp

  // The tile configuration is per thread and is set for each kernel call's parallel region, then
  // released: other libraries in the process (oneDNN under PyTorch) run their own configurations
  // on the same threads and release them, and a tile instruction under a released configuration
  // is an illegal instruction (seen in the Python tests; tests/test_amx.cpp).
  static void begin_thread() { amx::configure_tiles(); }
  static void end_thread() { _tile_release(); }
};

}  // namespace dattn::cpu
