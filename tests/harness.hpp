// Shared test helpers: element access on any strided view, buffers with random layouts,
// random normal fills, float64 copies and the SPEC.md accuracy checks.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "dattn/dattn.hpp"

namespace dattn_test {

using dattn::DType;
using dattn::Tensor;
using dattn::TensorView;
using Rng = std::mt19937_64;

// ---- element access (offsets count elements from view.data) ----
// Calls f(offset) for every element of t in row-major logical order.
template <class F>
void for_each_offset(const TensorView& t, F&& f) {
  if (t.numel() == 0) return;
  std::int64_t index[dattn::kMaxRank] = {};
  for (;;) {
    std::int64_t offset = 0;
    for (int d = 0; d < t.rank; ++d) offset += index[d] * t.strides[d];
    f(offset);
    int d = t.rank - 1;
    for (; d >= 0; --d) {
      if (++index[d] < t.shape[d]) break;
      index[d] = 0;
    }
    if (d < 0) return;
  }
}
double load(const TensorView& t, std::int64_t offset);
void store(const TensorView& t, std::int64_t offset, double x);
// Element (b, n, h, d) of a [B, N, H, D] view (or (b, h, n) of a rank-3 view with d unused).
double at(const TensorView& t, std::int64_t i0, std::int64_t i1, std::int64_t i2, std::int64_t i3 = 0);

// ---- buffers ----
// One allocation holding one or more views (q, k, v of a fused QKV buffer share one).
struct Buffer {
  std::shared_ptr<Tensor> mem;  // flat, 64-byte aligned
  std::vector<TensorView> views;
  const TensorView& view(std::size_t i = 0) const { return views.at(i); }
};

Buffer contiguous(const std::vector<std::int64_t>& shape, DType dtype);
// Random memory order of the dims, padded extents and a base offset of 0..3 elements; with
// unit_last the last dim stays innermost with stride 1 (the attention tensors' D rule).
Buffer random_strided(const std::vector<std::int64_t>& shape, DType dtype, Rng& rng, bool unit_last = true);
// [B, N, 3, H, D] (rows possibly padded) and its three views select(2, 0..2).
Buffer fused_qkv(std::int64_t B, std::int64_t N, std::int64_t H, std::int64_t D, DType dtype, Rng& rng);

// Every element of the allocation set to the dtype's NaN pattern (0xff for bool, INT64_MIN for int64).
void poison(const Buffer& b);
std::vector<unsigned char> snapshot(const Buffer& b);
// Empty when every element outside the buffer's views still holds its snapshot value.
std::string changed_outside_views(const Buffer& b, const std::vector<unsigned char>& before);
std::string changed_anywhere(const Buffer& b, const std::vector<unsigned char>& before);

void fill_normal(const TensorView& t, Rng& rng);  // N(0, 1) rounded to the view's dtype
Tensor to_f64(const TensorView& t);               // contiguous float64 copy of the same values

// ---- SPEC.md accuracy bars ----
struct Tolerance {
  double rel_l2;  // out and gradients
  double lse;     // |lse - ref| <= lse * max(1, |ref|)
};
Tolerance tolerance(DType dtype);

// How an exactly-zero reference is judged: `exact` (x must be exactly 0: out and dv, which are
// sums of non-negative weights and 0 only where nothing is attended) or `cancellation` (dq and
// dk, which are 0 by the identity Σ_j P_j = 1 and so only up to round-off in any float format).
enum class ZeroReference { exact, cancellation };

// Relative L2 error ||x - ref|| / ||ref||; where ||ref|| = 0, x must be exactly 0 (or, for
// ZeroReference::cancellation, RMS(x) <= tol); where ref is 0 up to float64 round-off
// (RMS <= 1e-12), RMS(x) <= tol. NaN/Inf fail.
::testing::AssertionResult close_rel_l2(const char* name, const TensorView& x, const TensorView& ref,
                                        double tol, ZeroReference zero = ZeroReference::exact);
// lse is -inf exactly where ref is, finite elsewhere and within tol * max(1, |ref|).
::testing::AssertionResult lse_close(const TensorView& lse, const TensorView& ref, double tol);

// The message of the dattn::Error that f throws, or "no error".
template <class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const dattn::Error& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace dattn_test
