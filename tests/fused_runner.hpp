// One fused-vs-reference comparison (forward and backward), and the (dtype, ISA) fixture that
// forces the SIMD path through DATTN_CPU_ISA.
#pragma once

#include <map>
#include <string>
#include <tuple>

#include "cases.hpp"
#include "dattn/cpu.hpp"

namespace dattn_test {

// Runs Backend::fused forward and backward on the case's inputs (drawn in `dtype`, outputs
// poisoned with NaN first) and compares out, lse, dq, dk, dv with the float64 reference on
// float64 copies of the same rounded inputs. Returns "" on success, else every problem found.
std::string run_fused_case(const Case& c, DType dtype);

const char* dtype_label(DType dtype);

class FusedTest : public ::testing::TestWithParam<std::tuple<DType, dattn::CpuIsa>> {
 protected:
  void SetUp() override;
  void TearDown() override;
  DType dtype() const { return std::get<0>(GetParam()); }
  dattn::CpuIsa isa() const { return std::get<1>(GetParam()); }
  // Runs the case; on failure reports the case and what went wrong. Returns true on success.
  bool check(const Case& c);
  std::string summary() const;  // failures per kind, e.g. "gradient accuracy: 3"
  int failures_ = 0;
  std::map<std::string, int> kinds_;
};

std::string fused_test_name(const ::testing::TestParamInfo<FusedTest::ParamType>& info);

#define DATTN_INSTANTIATE_FUSED(Suite)                                                          \
  INSTANTIATE_TEST_SUITE_P(                                                                     \
      All, Suite,                                                                               \
      ::testing::Combine(::testing::Values(dattn::DType::float32, dattn::DType::bfloat16,       \
                                           dattn::DType::float16),                              \
                         ::testing::Values(dattn::CpuIsa::scalar, dattn::CpuIsa::avx2,          \
                                           dattn::CpuIsa::avx512, dattn::CpuIsa::avx512_bf16,   \
                                           dattn::CpuIsa::amx_bf16)),                           \
      ::dattn_test::fused_test_name)

}  // namespace dattn_test
