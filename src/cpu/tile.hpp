// Storage types and tile packing: rows of q, k, v, out or dout become dense fp32 tiles,
// row-major or transposed, zero-padded to the GEMM widths. This is the only place the kernels
// touch 16-bit storage.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "dattn/tensor.hpp"

namespace dattn::cpu {

struct BFloat16 {
  std::uint16_t bits;
};
struct Float16 {
  std::uint16_t bits;
};

template <class I>
struct Convert {
  static float load(float x) { return x; }
  static float load(BFloat16 x) {
    const std::uint32_t word = std::uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &word, 4);
    return f;
  }
  // Exact for normals and subnormals: the exponent is rebased by a multiply by 2^112.
  static float load(Float16 x) {
    std::uint32_t word = std::uint32_t(x.bits & 0x7fffu) << 13;
    float f;
    std::memcpy(&f, &word, 4);
    f *= 5.192296858534828e+33f;
    std::memcpy(&word, &f, 4);
    if (f >= 65536.0f) word |= 0x7f800000u;  // inf and NaN keep an all-ones exponent
    word |= std::uint32_t(x.bits & 0x8000u) << 16;
    std::memcpy(&f, &word, 4);
    return f;
  }
  static void store(float x, float* dst) { *dst = x; }
  static void store(float x, BFloat16* dst) {
    std::uint32_t word;
    std::memcpy(&word, &x, 4);
    word += 0x7fffu + ((word >> 16) & 1u);  // round to nearest even (inputs are finite)
    dst->bits = std::uint16_t(word >> 16);
  }
  static void store(float x, Float16* dst) { dst->bits = float_to_float16(x); }
};

// One register of elements converted to fp32 (the scalar ISA's register is one element).
template <class I, class T>
typename I::reg load_vector(const T* s) {
  if constexpr (I::width == 1) return Convert<I>::load(*s);
  else if constexpr (std::is_same_v<T, float>) return I::load(s);
  else if constexpr (std::is_same_v<T, BFloat16>) return I::load_bf16(&s->bits);
  else return I::load_f16(&s->bits);
}

template <class T>
void prefetch_row(const T* row, int D) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int at = 0; at < D * int(sizeof(T)); at += 64) __builtin_prefetch(bytes + at);
}

// dst[i*ld + d] = scale * row(i)[d] for i < rows, d < D; zero for D <= d < padded_d.
template <class I, class RowFn>
void pack_rows(RowFn&& row, int rows, int D, int padded_d, float scale, float* dst, std::int64_t ld) {
  constexpr int W = I::width;
  const typename I::reg factor = I::set1(scale);
  constexpr int kAhead = 4;  // rows are far apart (a head's row of [B, N, H, D]): prefetch them
  for (int i = 0; i < std::min(kAhead, rows); ++i) prefetch_row(row(i), D);
  for (int i = 0; i < rows; ++i) {
    if (i + kAhead < rows) prefetch_row(row(i + kAhead), D);
    const auto* s = row(i);
    float* d_row = dst + i * ld;
    int d = 0;
    for (; d + W <= D; d += W) I::store(d_row + d, I::mul(factor, load_vector<I>(s + d)));
    for (; d < D; ++d) d_row[d] = scale * Convert<I>::load(s[d]);
    for (; d < padded_d; ++d) d_row[d] = 0.0f;
  }
}

// dst[d*ld + i] = scale * row(i)[d]; zero for rows <= i < padded_rows and D <= d < padded_d.
// Sixteen source rows at a time, so they stay in L1 while each destination row gets a full line.
template <class I, class RowFn>
void pack_columns(RowFn&& row, int rows, int padded_rows, int D, int padded_d, float scale, float* dst,
                  std::int64_t ld) {
  constexpr int kBlock = 16;
  for (int i0 = 0; i0 < rows; i0 += kBlock) {
    const int n = std::min(kBlock, rows - i0);
    decltype(row(0)) source[kBlock];
    for (int i = 0; i < n; ++i) source[i] = row(i0 + i);
    for (int d = 0; d < D; ++d) {
      float* out = dst + d * ld + i0;
      for (int i = 0; i < n; ++i) out[i] = scale * Convert<I>::load(source[i][d]);
    }
  }
  for (int d = 0; d < padded_d; ++d) {
    const int first = d < D ? rows : 0;
    for (int i = first; i < padded_rows; ++i) dst[d * ld + i] = 0.0f;
  }
}

}  // namespace dattn::cpu
