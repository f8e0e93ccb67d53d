// dattn-bench --ring: ring attention over P in-process ranks on docs/benchmarks.md's geo(N) shapes.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dattn/config.hpp"
#include "dattn/ring.hpp"
#include "dattn/tensor.hpp"

namespace dattn_bench {

struct RingBenchSettings {
  std::vector<int> ranks;              // P values
  std::vector<std::int64_t> lengths;   // N values; empty: N = P · rows_per_rank
  std::int64_t rows_per_rank = 4096;
  dattn::DType dtype = dattn::DType::bfloat16;
  int threads = 1, warmup = 1, repeats = 3;
  std::uint64_t seed = 1;
  std::string svg_path;                // plot of per-rank peak heap against N; empty: none
};

// docs/benchmarks.md geo(N): segments 2048·4^k below N, then N; rates w / 2048 (N a multiple of 2048).
dattn::DilatedConfig geo(std::int64_t N);

// The LongNet reference code's approach, the baseline: every rank gathers all ranks' k and v
// (contiguous layout, local [B, N/P, H, D] views), then attends over them.
void allgather_forward(dattn::Communicator& comm, const dattn::DilatedConfig& config, std::int64_t N,
                       const dattn::TensorView& q, const dattn::TensorView& k, const dattn::TensorView& v,
                       const dattn::TensorView& out, const dattn::TensorView& lse, dattn::RingStats& stats);

// Prints the markdown table on stdout and returns the rows as JSON; the exit status is nonzero
// (in "ok": false) when a ring result differs from single-process attention beyond the bar.
nlohmann::json run_ring_bench(const RingBenchSettings& settings);

}  // namespace dattn_bench
