// Random dilated-attention problems for the fused-vs-reference tests, printable so a failing
// one can be rebuilt by hand.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "case_config.hpp"
#include "harness.hpp"

namespace dattn_test {

struct Case {
  std::uint64_t seed = 0;  // draws the inputs and the random layouts
  std::int64_t B = 1, N = 1, H = 1, D = 16;
  std::int64_t kv_heads = 0;  // k, v heads (grouped-query heads); 0 means H
  std::vector<std::int64_t> w{1}, r{1};
  dattn::Mode mode = dattn::Mode::grouped;
  bool causal = false;
  std::optional<double> scale;
  std::vector<std::uint8_t> padding;  // empty: no mask; else [B * N], 1 = padded key
  double dropout_p = 0;
  std::uint64_t dropout_seed = 0, dropout_offset = 0;
  std::vector<std::int64_t> order;  // options.position_index (attention order) or empty for none
  bool fused_qkv = false;   // q, k, v are select(2, i) of one [B, N, 3, H, D] buffer
  bool fused_dqkv = false;  // dq, dk, dv likewise
  bool strided = false;     // out, lse, dout, mask (and q, k, v when not fused) in random layouts

  std::int64_t Hkv() const { return kv_heads > 0 ? kv_heads : H; }
};

// Limits keep one case cheap for the O(N^2 D) reference.
struct CaseLimits {
  std::int64_t max_n = 70, max_b = 2, max_h = 5, max_g = 4, max_d = 256;
};

Case random_case(Rng& rng, const CaseLimits& limits = {});
std::string describe(const Case& c);

// A case's inputs as contiguous float64 tensors (q, k, v and a dout/G), drawn from its seed.
struct Problem64 {
  dattn::Tensor q, k, v, g, mask, order;
  dattn::DilatedConfig config;
  dattn::LaunchOptions options;  // Backend::reference, with the case's position_index
};
Problem64 make_problem64(const Case& c);

// The features the random generator promises to cover, counted over a run.
struct Coverage {
  int n1 = 0, n_not_multiple = 0, w_over_n = 0, r_eq_w = 0, h_lt_g = 0, odd_d = 0, causal = 0;
  int grouped = 0, longnet = 0, padding = 0, empty_batch = 0, dropout = 0, fused_qkv = 0, strided = 0;
  int position_index = 0, grouped_query = 0;
  void add(const Case& c);
  std::string missing() const;  // empty when every feature was seen
};

}  // namespace dattn_test
