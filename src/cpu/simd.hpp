// SIMD vocabulary of the CPU kernels. Each ISA struct is only usable inside a translation unit
// (or `#pragma GCC target` region) compiled for that ISA; the kernels are templates over it.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace dattn::cpu {

struct ScalarIsa {
  static constexpr int width = 1;
  using reg = float;
  static reg zero() { return 0.0f; }
  static reg set1(float x) { return x; }
  static reg load(const float* p) { return *p; }
  static void store(float* p, reg x) { *p = x; }
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static reg add(reg a, reg b) { return a + b; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg max(reg a, reg b) { return std::max(a, b); }
  static float reduce_add(reg x) { return x; }
  static float reduce_max(reg x) { return x; }
  static reg exp(reg x) { return std::exp(x); }
};


// exp(x) = 2^n · e^t with n = round(x·log2 e) and |t| <= ln2/2; e^t by its degree-7 Taylor
// polynomial (error below 1e-8 relative). Inputs below -87.3 give exactly 0, so a masked score
// of -inf becomes a probability of 0.
template <class I>
typename I::reg exp_polynomial(typename I::reg t) {
  constexpr float c[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  typename I::reg p = I::set1(c[0]);
  for (int i = 1; i < 8; ++i) p = I::fmadd(p, t, I::set1(c[i]));
  return p;
}

}  // namespace dattn::cpu
