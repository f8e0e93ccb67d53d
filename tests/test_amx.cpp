// The amx_bf16 kernels after another library released the tiles on their threads (oneDNN under
// PyTorch does, between its own AMX kernels): they must configure the tiles again on every call,
// not die on an illegal instruction. This file alone is compiled with -mamx-tile.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>

#include "dattn/cpu.hpp"
#include "fused_runner.hpp"

namespace dattn_test {
namespace {

void release_tiles_on_every_thread() {
#pragma omp parallel
  _tile_release();
}

TEST(AmxTiles, SurviveAnotherLibraryReleasingThem) {
  if (!dattn::cpu_supports(dattn::CpuIsa::amx_bf16))
    GTEST_SKIP() << "the amx_bf16 path is untested on this CPU (it lacks AMX bf16, or Linux refused the tile state)";
  ::setenv("DATTN_CPU_ISA", "amx_bf16", 1);
  Rng rng(0xA3A3A3A3ull);
  for (int i = 0; i < 6; ++i) {
    const Case c = random_case(rng);
    EXPECT_EQ(run_fused_case(c, DType::bfloat16), "") << describe(c);
    release_tiles_on_every_thread();
  }
  ::unsetenv("DATTN_CPU_ISA");
}

// Groups of several chunks (kChunkRows = 256 rows) and key tiles: the random cases above rarely have
// a group longer than one chunk, where the amx_bf16 loops keep packed operands across tiles.
TEST(AmxTiles, LongGroupsMatchTheReference) {
  if (!dattn::cpu_supports(dattn::CpuIsa::amx_bf16))
    GTEST_SKIP() << "the amx_bf16 path is untested on this CPU (it lacks AMX bf16, or Linux refused the tile state)";
  ::setenv("DATTN_CPU_ISA", "amx_bf16", 1);
  Rng rng(0xA3A30001ull);
  auto long_group = [](const Case& c) {
    for (std::size_t i = 0; i < c.w.size(); ++i)
      if (std::min(c.w[i], c.N) / c.r[i] >= 600) return true;
    return false;
  };
  for (int i = 0; i < 8; ++i) {
    Case c;
    do c = random_case(rng, CaseLimits{.max_n = 1400, .max_b = 1, .max_h = 3, .max_g = 3, .max_d = 80});
    while (!long_group(c));
    EXPECT_EQ(run_fused_case(c, DType::bfloat16), "") << describe(c);
  }
  ::unsetenv("DATTN_CPU_ISA");
}

}  // namespace
}  // namespace dattn_test
