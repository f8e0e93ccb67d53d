// 16-bit conversions, Tensor allocation and TensorView::select / narrow.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "dattn/dattn.hpp"

namespace {

using dattn::DType;

bool half_is_nan(std::uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
bool bf16_is_nan(std::uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0; }

TEST(Float16, EveryBitPatternRoundTrips) {
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const auto h = std::uint16_t(bits);
    const float f = dattn::float16_to_float(h);
    if (half_is_nan(h)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << bits;
      EXPECT_TRUE(half_is_nan(dattn::float_to_float16(f))) << std::hex << bits;
    } else {
      EXPECT_EQ(dattn::float_to_float16(f), h) << std::hex << bits << " -> " << f;
    }
  }
}

TEST(Float16, KnownValues) {
  EXPECT_EQ(dattn::float16_to_float(0x3c00), 1.0f);
  EXPECT_EQ(dattn::float16_to_float(0xc000), -2.0f);
  EXPECT_EQ(dattn::float16_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(dattn::float16_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(dattn::float16_to_float(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(dattn::float16_to_float(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::signbit(dattn::float16_to_float(0x8000)));
  EXPECT_EQ(dattn::float_to_float16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie to even (down)
  EXPECT_EQ(dattn::float_to_float16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie to even (up)
  EXPECT_EQ(dattn::float_to_float16(65519.0f), 0x7bff);
  EXPECT_EQ(dattn::float_to_float16(65520.0f), 0x7c00);  // rounds to inf
  EXPECT_EQ(dattn::float_to_float16(std::ldexp(1.0f, -25)), 0x0000);  // tie to even: 0
  EXPECT_EQ(dattn::float_to_float16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(dattn::float_to_float16(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 subnormal ulps: tie to even
}

#if defined(__FLT16_MAX__)
// The compiler's _Float16 conversion (correctly rounded) as an independent oracle.
TEST(Float16, RoundsLikeTheCompilerOnSampledFloats) {
  for (std::uint64_t u = 0; u <= 0xffffffffull; u += 997) {
    const float f = std::bit_cast<float>(std::uint32_t(u));
    const std::uint16_t got = dattn::float_to_float16(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(half_is_nan(got));
      continue;
    }
    const auto want = std::bit_cast<std::uint16_t>(static_cast<_Float16>(f));
    ASSERT_EQ(got, want) << std::hex << "float bits " << u;
  }
}
#endif

TEST(BFloat16, EveryBitPatternRoundTrips) {
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const auto h = std::uint16_t(bits);
    const float f = dattn::bfloat16_to_float(h);
    if (bf16_is_nan(h)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << bits;
      EXPECT_TRUE(bf16_is_nan(dattn::float_to_bfloat16(f))) << std::hex << bits;
    } else {
      EXPECT_EQ(dattn::float_to_bfloat16(f), h) << std::hex << bits;
    }
  }
}

// Value of a non-NaN bfloat16 pattern, with 0x7f80 (inf) read as 2^128 so it can be a rounding candidate.
double bf16_value(std::uint16_t magnitude) {
  return magnitude == 0x7f80 ? std::ldexp(1.0, 128) : double(dattn::bfloat16_to_float(magnitude));
}

TEST(BFloat16, RoundsToNearestEvenOnSampledFloats) {
  for (std::uint64_t u = 0; u <= 0xffffffffull; u += 991) {
    const auto word = std::uint32_t(u);
    const float f = std::bit_cast<float>(word);
    const std::uint16_t got = dattn::float_to_bfloat16(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(bf16_is_nan(got));
      continue;
    }
    if (std::isinf(f)) {
      EXPECT_EQ(got, std::uint16_t(word >> 16));
      continue;
    }
    const double x = std::fabs(double(f));
    const auto below = std::uint16_t((word & 0x7fffffffu) >> 16), above = std::uint16_t(below + 1);
    const double d_below = x - bf16_value(below), d_above = bf16_value(above) - x;
    const std::uint16_t nearest =
        d_below < d_above ? below : d_above < d_below ? above : (below & 1u) ? above : below;
    ASSERT_EQ(got, std::uint16_t(nearest | ((word >> 16) & 0x8000u))) << std::hex << "float bits " << u;
  }
}

TEST(Tensor, EmptyIsAlignedAndContiguous) {
  for (DType dtype : {DType::float32, DType::bfloat16, DType::float16, DType::float64, DType::boolean}) {
    for (const std::vector<std::int64_t>& shape :
         std::vector<std::vector<std::int64_t>>{{1}, {3}, {2, 5, 3, 7}, {1, 1, 1, 1, 1, 1}, {0, 4}, {129}}) {
      const dattn::Tensor t = dattn::Tensor::empty(shape, dtype);
      ASSERT_NE(t.view().data, nullptr);
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.view().data) % 64, 0u) << dattn::dtype_name(dtype);
      EXPECT_EQ(t.view().rank, int(shape.size()));
      EXPECT_EQ(t.view().dtype, dtype);
      EXPECT_TRUE(t.view().is_contiguous());
      std::int64_t numel = 1;
      for (auto e : shape) numel *= e;
      EXPECT_EQ(t.numel(), numel);
      EXPECT_EQ(t.nbytes(), std::size_t(numel) * dattn::dtype_size(dtype));
      EXPECT_EQ(t.view().strides[shape.size() - 1], 1);
    }
  }
}

TEST(Tensor, ZerosIsZero) {
  const dattn::Tensor t = dattn::Tensor::zeros({3, 5, 7}, DType::float32);
  for (std::int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(t.data<float>()[i], 0.0f);
}

TEST(Tensor, EmptyRejectsNegativeExtents) {
  EXPECT_THROW(dattn::Tensor::empty({2, -1}, DType::float32), dattn::Error);
}

TEST(TensorView, SelectOfFusedQkv) {
  const std::int64_t B = 2, N = 5, H = 3, D = 4;
  const dattn::Tensor qkv = dattn::Tensor::empty({B, N, 3, H, D}, DType::float32);
  for (std::int64_t i = 0; i < qkv.numel(); ++i) qkv.data<float>()[i] = float(i);
  for (std::int64_t which = 0; which < 3; ++which) {
    const dattn::TensorView v = qkv.view().select(2, which);
    ASSERT_EQ(v.rank, 4);
    EXPECT_EQ(v.shape_string(), "[2, 5, 3, 4]");
    EXPECT_EQ(v.stride(0), N * 3 * H * D);
    EXPECT_EQ(v.stride(1), 3 * H * D);
    EXPECT_EQ(v.stride(2), D);
    EXPECT_EQ(v.stride(3), 1);
    EXPECT_FALSE(v.is_contiguous());
    EXPECT_EQ(v.numel(), B * N * H * D);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t d = 0; d < D; ++d) {
            const std::int64_t o = b * v.stride(0) + n * v.stride(1) + h * v.stride(2) + d;
            ASSERT_EQ(v.ptr<float>()[o], float((((b * N + n) * 3 + which) * H + h) * D + d));
          }
  }
}

TEST(TensorView, SelectOfSixteenBitAndFirstDim) {
  const dattn::Tensor t = dattn::Tensor::empty({4, 6}, DType::bfloat16);
  const dattn::TensorView row = t.view().select(0, 3);
  EXPECT_EQ(row.rank, 1);
  EXPECT_EQ(row.shape[0], 6);
  EXPECT_EQ(static_cast<std::byte*>(row.data) - static_cast<std::byte*>(t.view().data), 3 * 6 * 2);
  const dattn::TensorView column = t.view().select(1, 5);
  EXPECT_EQ(column.shape[0], 4);
  EXPECT_EQ(column.strides[0], 6);
  EXPECT_EQ(static_cast<std::byte*>(column.data) - static_cast<std::byte*>(t.view().data), 5 * 2);
}

TEST(TensorView, SelectOutOfRangeThrows) {
  const dattn::Tensor t = dattn::Tensor::empty({2, 3}, DType::float32);
  EXPECT_THROW(t.view().select(2, 0), dattn::Error);
  EXPECT_THROW(t.view().select(-1, 0), dattn::Error);
  EXPECT_THROW(t.view().select(1, 3), dattn::Error);
  EXPECT_THROW(t.view().select(0, -1), dattn::Error);
}

TEST(TensorView, NarrowKeepsRankAndStrides) {
  const dattn::Tensor t = dattn::Tensor::empty({4, 6, 2}, DType::bfloat16);
  const dattn::TensorView rows = t.view().narrow(1, 2, 3);
  EXPECT_EQ(rows.rank, 3);
  EXPECT_EQ(rows.shape_string(), "[4, 3, 2]");
  EXPECT_EQ(rows.strides, t.view().strides);
  EXPECT_EQ(static_cast<std::byte*>(rows.data) - static_cast<std::byte*>(t.view().data), 2 * 2 * 2);
  EXPECT_EQ(t.view().narrow(0, 4, 0).shape[0], 0);  // empty at the end is allowed
  EXPECT_THROW(t.view().narrow(3, 0, 1), dattn::Error);
  EXPECT_THROW(t.view().narrow(1, 4, 3), dattn::Error);
  EXPECT_THROW(t.view().narrow(1, -1, 2), dattn::Error);
  EXPECT_THROW(t.view().narrow(1, 0, -1), dattn::Error);
}

TEST(TensorView, MakeViewStrides) {
  float data[64] = {};
  const dattn::TensorView v = dattn::make_view(data, DType::float32, {2, 3, 4});
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_EQ(v.strides[0], 12);
  EXPECT_EQ(v.strides[1], 4);
  const dattn::TensorView s = dattn::make_view(data, DType::float32, {2, 3}, {1, 2});
  EXPECT_FALSE(s.is_contiguous());
  EXPECT_EQ(s.strides[1], 2);
  EXPECT_THROW(dattn::make_view(data, DType::float32, {2, 3}, {1}), dattn::Error);
  EXPECT_EQ(dattn::dtype_size(DType::bfloat16), 2u);
  EXPECT_STREQ(dattn::dtype_name(DType::float16), "float16");
}

}  // namespace
