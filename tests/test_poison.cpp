// Outputs start as NaN (a NaN bit pattern for the 16-bit types): every element of out, lse,
// dq, dk, dv must be written, finite (lse -inf only where the reference is), even where
// nothing is attended; nothing outside the views may be written. Edge configurations.
#include "fused_runner.hpp"

namespace dattn_test {
namespace {

using dattn::Mode;

std::vector<Case> edge_cases() {
  std::vector<Case> cases;
  const auto add = [&](Case c) {
    for (int layout = 0; layout < 4; ++layout) {  // contiguous, strided, fused QKV, fused dQKV
      c.strided = layout == 1 || layout == 3;
      c.fused_qkv = layout >= 2;
      c.fused_dqkv = layout == 3;
      c.seed = 1000 + cases.size();
      cases.push_back(c);
    }
  };
  for (Mode mode : {Mode::grouped, Mode::longnet}) {
    Case c;
    c.mode = mode;
    // Every key padded: out 0, lse -inf, gradients 0 everywhere.
    c.B = 2, c.N = 9, c.H = 3, c.D = 16, c.w = {4, 8}, c.r = {1, 2};
    c.padding.assign(18, 1);
    add(c);
    c.dropout_p = 0.3, c.dropout_seed = 77;
    add(c);
    // Batch 1 fully padded, batch 0 not at all.
    c.padding.assign(18, 0);
    std::fill(c.padding.begin() + 9, c.padding.end(), 1);
    add(c);
    c.dropout_p = 0;
    // H < G: groups 2 and 3 are empty; r = w leaves most positions unselected.
    c.padding.clear();
    c.B = 1, c.N = 13, c.H = 2, c.D = 7, c.w = {5, 6, 7, 8}, c.r = {5, 6, 7, 8};
    add(c);
    // One segment longer than N with r = w: only position 0 (or h) is selected.
    c.N = 10, c.H = 1, c.D = 33, c.w = {12}, c.r = {12};
    add(c);
    // N = 1.
    c.N = 1, c.H = 4, c.D = 1, c.w = {1, 2}, c.r = {1, 2};
    add(c);
    c.causal = true;
    add(c);
    // Causal with a padded prefix: the first rows attend to nothing.
    c.B = 2, c.N = 11, c.H = 2, c.D = 64, c.w = {4, 11}, c.r = {2, 1};
    c.padding.assign(22, 0);
    std::fill_n(c.padding.begin(), 3, 1);
    std::fill_n(c.padding.begin() + 11, 6, 1);
    add(c);
    // Largest head dim.
    c.padding.clear(), c.causal = false;
    c.B = 1, c.N = 17, c.H = 2, c.D = 256, c.w = {3, 16}, c.r = {3, 4};
    add(c);
  }
  return cases;
}

TEST_P(FusedTest, WritesEveryOutputOnEdgeConfigs) {
  for (const Case& c : edge_cases()) check(c);
  EXPECT_EQ(failures_, 0) << summary();
}

DATTN_INSTANTIATE_FUSED(FusedTest);

}  // namespace
}  // namespace dattn_test
