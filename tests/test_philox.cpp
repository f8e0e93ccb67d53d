// Philox4x32-10 known answers (Random123) and the dropout keep rule of SPEC.md.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "dattn/philox.hpp"

namespace {

using dattn::PhiloxWords;

void expect_words(const PhiloxWords& got, const PhiloxWords& want) {
  for (int i = 0; i < 4; ++i) EXPECT_EQ(got.w[i], want.w[i]) << "word " << i;
}

TEST(Philox, KnownAnswerZero) {
  expect_words(dattn::philox4x32_10(PhiloxWords{{0, 0, 0, 0}}, 0, 0),
               PhiloxWords{{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}});
}

TEST(Philox, KnownAnswerPi) {
  expect_words(dattn::philox4x32_10(PhiloxWords{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
                                    0xa4093822u, 0x299f31d0u),
               PhiloxWords{{0xd16cfe09u, 0x94fdcceb, 0x5001e420u, 0x24126ea1u}});
}

TEST(Dropout, ThresholdIsFloorOfPTimes2To32) {
  EXPECT_EQ(dattn::dropout_threshold(0.0), 0u);
  EXPECT_EQ(dattn::dropout_threshold(0.5), 0x80000000u);
  EXPECT_EQ(dattn::dropout_threshold(0.25), 0x40000000u);
  EXPECT_EQ(dattn::dropout_threshold(0.1), std::uint32_t(std::floor(0.1 * 4294967296.0)));
  EXPECT_EQ(dattn::dropout_threshold(std::nextafter(1.0, 0.0)), 0xffffffffu);
}

// The Pi known answer through the keep rule: seed = key0 + 2^32 key1, counter
// (j / 4, i, b*H + h, offset), word j mod 4, keep iff word >= threshold.
TEST(Dropout, KeepUsesTheSpecCounterKeyAndWord) {
  const std::uint64_t seed = 0x299f31d0a4093822ull, offset = 0x03707344ull;
  const std::uint32_t words[4] = {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u};
  for (std::int64_t word = 0; word < 4; ++word) {
    const std::int64_t key = 0x243f6a88ll * 4 + word;
    EXPECT_TRUE(dattn::dropout_keep(seed, offset, 0x13198a2e, 0x85a308d3ll, key, words[word])) << word;
    EXPECT_FALSE(dattn::dropout_keep(seed, offset, 0x13198a2e, 0x85a308d3ll, key, words[word] + 1)) << word;
    // offset is taken mod 2^32
    EXPECT_TRUE(dattn::dropout_keep(seed, offset + (7ull << 32), 0x13198a2e, 0x85a308d3ll, key, words[word]));
  }
}

TEST(Dropout, KeepMatchesPhiloxOnRandomPositions) {
  std::mt19937_64 rng(12345);
  for (int t = 0; t < 20000; ++t) {
    const std::uint64_t seed = rng(), offset = rng() % 3 == 0 ? rng() : 0;
    const std::int64_t bh = std::int64_t(rng() % 64), i = std::int64_t(rng() % 100000), j = std::int64_t(rng() % 100000);
    const double p = std::uniform_real_distribution<double>(0, 1)(rng);
    const std::uint32_t threshold = dattn::dropout_threshold(p);
    const PhiloxWords counter{{std::uint32_t(j / 4), std::uint32_t(i), std::uint32_t(bh), std::uint32_t(offset)}};
    const PhiloxWords words = dattn::philox4x32_10(counter, std::uint32_t(seed), std::uint32_t(seed >> 32));
    ASSERT_EQ(dattn::dropout_keep(seed, offset, bh, i, j, threshold), words.w[j % 4] >= threshold)
        << "seed " << seed << " offset " << offset << " bh " << bh << " i " << i << " j " << j << " p " << p;
  }
}

TEST(Dropout, KeepRateIsOneMinusP) {
  for (double p : {0.0, 0.1, 0.5, 0.9}) {
    const std::uint32_t threshold = dattn::dropout_threshold(p);
    int kept = 0;
    const int n = 200000;
    for (int j = 0; j < n; ++j) kept += dattn::dropout_keep(42, 0, 3, j / 500, j % 500, threshold);
    EXPECT_NEAR(double(kept) / n, 1.0 - p, 0.005) << "p = " << p;
  }
}

}  // namespace
