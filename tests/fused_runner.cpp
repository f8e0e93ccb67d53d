#include "fused_runner.hpp"

#include <cstdlib>
#include <algorithm>
#include <exception>
#include <set>
#include <sstream>

namespace dattn_test {
namespace {

using dattn::Backend;
using dattn::LaunchOptions;

// Views [B, N, H, D] (q) and [B, N, Hkv, D] (k, v): one fused buffer or three separate ones.
std::vector<Buffer> attention_buffers(const Case& c, DType dtype, bool fused, Rng& rng) {
  if (fused) return {fused_qkv(c.B, c.N, c.H, c.D, dtype, rng)};
  std::vector<Buffer> buffers;
  for (int i = 0; i < 3; ++i) {
    const std::vector<std::int64_t> shape{c.B, c.N, i == 0 ? c.H : c.Hkv(), c.D};
    buffers.push_back(c.strided ? random_strided(shape, dtype, rng) : contiguous(shape, dtype));
  }
  return buffers;
}

TensorView nth_view(const std::vector<Buffer>& buffers, std::size_t i) {
  return buffers.size() == 1 ? buffers[0].view(i) : buffers[i].view();
}

struct Watch {  // buffers that must not change (inputs) or not change outside their views (outputs)
  std::vector<std::pair<const Buffer*, std::vector<unsigned char>>> items;
  void add(const Buffer& b) { items.emplace_back(&b, snapshot(b)); }
  void check_untouched(const char* what, std::ostringstream& problems) const {
    for (const auto& [b, before] : items)
      if (std::string m = changed_anywhere(*b, before); !m.empty()) problems << what << ": " << m << "\n";
  }
  void check_outside(const char* what, std::ostringstream& problems) const {
    for (const auto& [b, before] : items)
      if (std::string m = changed_outside_views(*b, before); !m.empty()) problems << what << ": " << m << "\n";
  }
};

}  // namespace

const char* dtype_label(DType dtype) { return dattn::dtype_name(dtype); }

std::string run_fused_case(const Case& c, DType dtype) {
  Rng rng(c.seed);
  std::ostringstream problems;
  const std::vector<std::int64_t> bnhd{c.B, c.N, c.H, c.D}, bhn{c.B, c.H, c.N}, kv_bnhd{c.B, c.N, c.Hkv(), c.D};
  const auto expect = [&](const ::testing::AssertionResult& r) {
    if (!r) problems << r.message() << "\n";
  };

  // Inputs: fresh normal draws; the unused elements of every allocation stay NaN.
  std::vector<Buffer> inputs = attention_buffers(c, dtype, c.fused_qkv, rng);
  for (const Buffer& b : inputs) poison(b);
  const TensorView q = nth_view(inputs, 0), k = nth_view(inputs, 1), v = nth_view(inputs, 2);
  for (const TensorView& t : {q, k, v}) fill_normal(t, rng);
  std::optional<Buffer> mask_buffer;
  std::optional<TensorView> mask;
  if (!c.padding.empty()) {
    mask_buffer = c.strided ? random_strided({c.B, c.N}, DType::boolean, rng, false) : contiguous({c.B, c.N}, DType::boolean);
    poison(*mask_buffer);
    mask = mask_buffer->view();
    std::size_t i = 0;
    for_each_offset(*mask, [&](std::int64_t o) { store(*mask, o, c.padding[i++]); });
  }
  const dattn::DilatedConfig config = config_of(c, mask);

  Buffer out = c.strided ? random_strided(bnhd, dtype, rng) : contiguous(bnhd, dtype);
  Buffer lse = c.strided ? random_strided(bhn, DType::float32, rng, false) : contiguous(bhn, DType::float32);
  poison(out);
  poison(lse);
  Watch forward_inputs, forward_outputs;
  for (const Buffer& b : inputs) forward_inputs.add(b);
  if (mask_buffer) forward_inputs.add(*mask_buffer);
  forward_outputs.add(out);
  forward_outputs.add(lse);

  LaunchOptions fused, reference;
  fused.backend = Backend::fused;
  reference.backend = Backend::reference;
  std::optional<Buffer> order;
  if (!c.order.empty()) {
    order = contiguous({c.N}, DType::int64);
    std::copy(c.order.begin(), c.order.end(), order->view().ptr<std::int64_t>());
    fused.position_index = reference.position_index = order->view();
    forward_inputs.add(*order);
  }
  try {
    dattn::forward(config, q, k, v, out.view(), lse.view(), fused);
  } catch (const std::exception& e) {
    return std::string("fused forward threw: ") + e.what() + "\n";
  }
  forward_inputs.check_untouched("forward", problems);
  forward_outputs.check_outside("forward", problems);

  const Tensor q64 = to_f64(q), k64 = to_f64(k), v64 = to_f64(v);
  const Tensor out64 = Tensor::empty(bnhd, DType::float64), lse64 = Tensor::empty(bhn, DType::float32);
  dattn::forward(config, q64, k64, v64, out64, lse64, reference);
  const Tolerance tol = tolerance(dtype);
  expect(close_rel_l2("out", out.view(), out64, tol.rel_l2));
  expect(lse_close(lse.view(), lse64, tol.lse));

  // Backward from the fused forward's out and lse.
  Buffer dout = c.strided ? random_strided(bnhd, dtype, rng) : contiguous(bnhd, dtype);
  poison(dout);
  fill_normal(dout.view(), rng);
  std::vector<Buffer> grads = attention_buffers(c, dtype, c.fused_dqkv, rng);
  for (const Buffer& b : grads) poison(b);
  Watch backward_inputs, backward_outputs;
  for (const Buffer* b : {&out, &lse, &dout}) backward_inputs.add(*b);
  for (const Buffer& b : inputs) backward_inputs.add(b);
  if (mask_buffer) backward_inputs.add(*mask_buffer);
  if (order) backward_inputs.add(*order);
  for (const Buffer& b : grads) backward_outputs.add(b);
  const TensorView dq = nth_view(grads, 0), dk = nth_view(grads, 1), dv = nth_view(grads, 2);
  try {
    dattn::backward(config, q, k, v, out.view(), lse.view(), dout.view(), dq, dk, dv, fused);
  } catch (const std::exception& e) {
    problems << "fused backward threw: " << e.what() << "\n";
    return problems.str();
  }
  backward_inputs.check_untouched("backward", problems);
  backward_outputs.check_outside("backward", problems);

  const Tensor dout64 = to_f64(dout.view());
  const Tensor dq64 = Tensor::empty(bnhd, DType::float64), dk64 = Tensor::empty(kv_bnhd, DType::float64),
               dv64 = Tensor::empty(kv_bnhd, DType::float64);
  dattn::backward(config, q64, k64, v64, out64, lse64, dout64, dq64, dk64, dv64, reference);
  expect(close_rel_l2("dq", dq, dq64, tol.rel_l2, ZeroReference::cancellation));
  expect(close_rel_l2("dk", dk, dk64, tol.rel_l2, ZeroReference::cancellation));
  expect(close_rel_l2("dv", dv, dv64, tol.rel_l2));
  return problems.str();
}

void FusedTest::SetUp() {
  if (!dattn::cpu_supports(isa()))
    GTEST_SKIP() << "the " << dattn::cpu_isa_name(isa())
                 << " path is untested on this CPU (it lacks the instructions)";
  if ((isa() == dattn::CpuIsa::avx512_bf16 || isa() == dattn::CpuIsa::amx_bf16) && dtype() != DType::bfloat16)
    GTEST_SKIP() << dtype_label(dtype()) << " data run the avx512 kernels under " << dattn::cpu_isa_name(isa())
                 << " (dispatch.cpp): the avx512 instance tests them";
  ::setenv("DATTN_CPU_ISA", dattn::cpu_isa_name(isa()), 1);
  ASSERT_EQ(dattn::active_cpu_isa(), isa()) << "DATTN_CPU_ISA=" << dattn::cpu_isa_name(isa()) << " was not honoured";
}

void FusedTest::TearDown() { ::unsetenv("DATTN_CPU_ISA"); }

namespace {

// The kinds of problem in run_fused_case's report, one per line.
std::set<std::string> problem_kinds(const std::string& problems) {
  std::set<std::string> kinds;
  std::istringstream lines(problems);
  for (std::string line; std::getline(lines, line);) {
    const bool grad = line.rfind("d", 0) == 0;
    if (line.find("threw") != std::string::npos) kinds.insert("threw");
    else if (line.find("outside the views") != std::string::npos) kinds.insert("wrote outside its view");
    else if (line.find("input buffer") != std::string::npos) kinds.insert("modified an input");
    else if (line.find(" is nan") != std::string::npos || line.find(" is inf") != std::string::npos ||
             line.find(" is -inf") != std::string::npos)
      kinds.insert("NaN/Inf written");
    else if (line.find("reference is exactly 0") != std::string::npos)
      kinds.insert(grad ? "gradient not exactly 0 where the reference is exactly 0"
                        : "out not exactly 0 where the reference is exactly 0");
    else if (line.find("lse") != std::string::npos) kinds.insert("lse");
    else kinds.insert(grad ? "gradient accuracy" : "out accuracy");
  }
  return kinds;
}

}  // namespace

bool FusedTest::check(const Case& c) {
  const std::string problems = run_fused_case(c, dtype());
  if (problems.empty()) return true;
  ++failures_;
  bool report = false;
  for (const std::string& kind : problem_kinds(problems)) report |= ++kinds_[kind] <= 4;  // a few of each kind
  if (report)
    ADD_FAILURE() << dtype_label(dtype()) << " on the " << dattn::cpu_isa_name(isa()) << " path\n"
                  << describe(c) << "\n" << problems;
  return false;
}

std::string FusedTest::summary() const {
  std::string s;
  for (const auto& [kind, count] : kinds_) s += "\n  " + kind + ": " + std::to_string(count) + " configuration(s)";
  return s;
}

std::string fused_test_name(const ::testing::TestParamInfo<FusedTest::ParamType>& info) {
  return std::string(dtype_label(std::get<0>(info.param))) + "_" + dattn::cpu_isa_name(std::get<1>(info.param));
}

}  // namespace dattn_test
