// Correctness checks of dattn-bench: every implementation is checked before it is timed.
//
//  - reduced check: the same call on a scaled-down problem (same B, H, D, dilation rates and
//    N : segment-length ratios, N and every segment length divided by a power of two), compared
//    over whole tensors with the library's float64 reference (Backend::reference on float64
//    copies of the same inputs): exactly docs/semantics.md's accuracy measure.
//  - spot check: at full size, sampled rows are recomputed in float64 from the SPEC formulas
//    (SpotChecker below): for every branch one (batch, head, segment), its query rows (out, lse,
//    dq) and key rows (dk, dv), plus rows the branch does not select. The spot checker is
//    itself checked against the reference on every reduced problem.
#pragma once

#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "dattn/dattn.hpp"

namespace dattn_bench {

// The bench's own float64 checker disagrees with the library's reference: nothing it says about
// other implementations can be trusted, so the bench stops.
class CheckerBroken : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Problem {
  std::string name;  // "seed", "long64k"
  std::int64_t B = 1, N = 1, H = 1, D = 1;
  dattn::DilatedConfig config;

  std::vector<std::int64_t> qkv_shape() const { return {B, N, H, D}; }
  double forward_flops() const { return dattn::forward_flops(config, B, N, H, D); }
  // Attention pairs (the reference's cost is proportional to them).
  double pairs() const { return forward_flops() / (4.0 * double(D)); }
};

// The problem with N and every segment length divided by `factor` (rates kept, clamped to the
// segment length).
Problem scaled_down(const Problem& p, std::int64_t factor);
// The largest power-of-two factor that keeps at least 16 selected rows per full segment and
// brings the reference's work under `max_pairs`.
std::int64_t reduction_factor(const Problem& p, double max_pairs);

// Accuracy of one implementation against float64, as docs/semantics.md measures it.
struct Errors {
  double out = 0, dq = 0, dk = 0, dv = 0;  // relative L2 (inf where ref is 0 and x is not)
  double lse = 0;                         // max |lse - ref| / max(1, |ref|) (inf on a -inf mismatch)
  bool finite = true;                     // no NaN or Inf in out, dq, dk, dv
  std::int64_t rows_checked = 0;          // spot check: query rows + key rows

  double max_rel() const;
  bool passes(dattn::DType dtype, std::string* why = nullptr) const;
};

// docs/semantics.md's bars (relative L2 for out and the gradients; lse tolerance).
double l2_bar(dattn::DType dtype);
double lse_bar(dattn::DType dtype);

// Host tensors of one call: inputs (random normal, in the call's dtype) and outputs.
struct CallTensors {
  dattn::Tensor q, k, v, dout;
  dattn::Tensor out, lse, dq, dk, dv;
  static CallTensors make(const Problem& p, dattn::DType dtype, std::uint64_t seed);
};

// A float64 copy of a contiguous float tensor of any dtype.
dattn::Tensor to_float64(const dattn::Tensor& t);
// docs/semantics.md's accuracy measure: ‖x − ref‖₂ / ‖ref‖₂ of x (any float dtype) against ref (float64),
// both contiguous; 0 or inf where ref is 0, inf for a NaN.
double rel_l2(const dattn::Tensor& x, const dattn::Tensor& ref);

// Fresh N(0, 1) draws stored in the tensor's dtype (parallel, deterministic for a seed).
void fill_normal(const dattn::Tensor& t, std::uint64_t seed);
// Every element NaN (all bits set), for outputs a kernel must overwrite.
void fill_nan(const dattn::Tensor& t);
// Every element finite.
bool all_finite(const dattn::Tensor& t);

// Runs `options` (forward then backward) on a scaled-down problem and compares with the
// float64 reference over whole tensors. `ref_threads` threads run reference jobs (per batch and,
// in grouped mode with H % G == 0, per head subset). Also self-checks the SpotChecker against
// the reference (throws CheckerBroken if they disagree).
struct ReducedCheck {
  Problem problem;       // the scaled-down problem
  std::int64_t factor = 1;
  Errors errors;
  double reference_seconds = 0;
  double spot_self_check = 0;  // max relative disagreement SpotChecker vs reference
};
// `perturb` != 0 multiplies the implementation's out and dk by (1 + perturb) after its calls:
// a self-test of the checks (--perturb), never used in a real measurement.
ReducedCheck reduced_check(const Problem& full, dattn::DType dtype, const dattn::LaunchOptions& options,
                           double max_pairs, std::uint64_t seed, double perturb = 0);

// Multiplies every element by `factor` (the --perturb self-test).
void scale_tensor(const dattn::Tensor& t, double factor);

// Float64 recomputation of sampled rows from the SPEC formulas (any mode, causal, no padding
// or dropout).
class SpotChecker {
 public:
  SpotChecker(const Problem& problem, const dattn::TensorView& q, const dattn::TensorView& k,
              const dattn::TensorView& v, const dattn::TensorView& dout);

  // Compares sampled rows of the given results (out, lse, dq, dk, dv of the full problem).
  Errors check(const dattn::TensorView& out, const dattn::TensorView& lse, const dattn::TensorView& dq,
               const dattn::TensorView& dk, const dattn::TensorView& dv, std::uint64_t seed) const;

 private:
  struct RowStats {
    double lse = 0, delta = 0;
  };
  const Problem& p_;
  dattn::TensorView q_, k_, v_, dout_;
  double scale_, out_scale_;

  std::vector<int> branches_of_head(std::int64_t h) const;
  std::int64_t offset(int branch, std::int64_t h) const;
  // Positions branch i selects for head h in the segment holding position p (empty if p is not
  // selected).
  std::vector<std::int64_t> selected_with(int branch, std::int64_t h, std::int64_t p) const;
  std::vector<std::int64_t> keys_of(std::int64_t h, std::int64_t p) const;     // multiset
  std::vector<std::int64_t> queries_of(std::int64_t h, std::int64_t k) const;  // multiset
};

}  // namespace dattn_bench
