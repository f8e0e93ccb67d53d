// dattn-bench --sparse: block-sparse and Hilbert-ordered attention on the CPU.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

namespace dattn_bench {

struct SparseBenchSettings {
  int threads = 1, warmup = 1, repeats = 5;
  std::uint64_t seed = 1;
  double peak_gflops = 0;    // the measured fp32 FMA peak, for the % column
  std::string peer_python;   // a Python with torch >= 2 for the SDPA peer; empty: no peer
  std::string peer_script;   // bench/sparse_peers.py
  bool block_sparse = true, hilbert = true;  // which tables to run
};

// Prints the markdown table on stdout and returns the rows as JSON.
nlohmann::json run_sparse_bench(const SparseBenchSettings& settings);

}  // namespace dattn_bench
