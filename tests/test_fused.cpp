// Fused CPU kernels against the float64 reference on random configurations, for every
// (dtype, SIMD path) pair. DATTN_TEST_CONFIGS overrides the number of configurations.
#include <cstdlib>

#include "fused_runner.hpp"

namespace dattn_test {
namespace {

int config_count() {
  const char* env = std::getenv("DATTN_TEST_CONFIGS");
  return env ? std::atoi(env) : 300;
}

TEST_P(FusedTest, MatchesReferenceOnRandomConfigs) {
  // A fixed master seed per (dtype, ISA); every configuration draws its own seed from it.
  Rng rng(0xD1A7ED00ull + 16 * std::uint64_t(dtype()) + std::uint64_t(isa()));
  Coverage coverage;
  const int count = config_count();
  for (int i = 0; i < count; ++i) {
    const Case c = random_case(rng);
    coverage.add(c);
    check(c);
  }
  EXPECT_EQ(failures_, 0) << failures_ << " of " << count << " configurations failed:" << summary();
  if (count >= 300) {
    EXPECT_EQ(coverage.missing(), "") << "the random configurations missed these features";
  }
}

DATTN_INSTANTIATE_FUSED(FusedTest);

}  // namespace
}  // namespace dattn_test
