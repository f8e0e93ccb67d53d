// Every invalid argument raises dattn::Error naming the argument, before any memory is touched.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "dattn/dattn.hpp"

namespace {

using dattn::Backend;
using dattn::DType;
using dattn::Tensor;
using dattn::TensorView;
using ::testing::HasSubstr;

#define EXPECT_DATTN_ERROR(statement, needle)                                                   \
  do {                                                                                          \
    try {                                                                                       \
      statement;                                                                                \
      ADD_FAILURE() << "no dattn::Error from " #statement "; expected one naming " << (needle); \
    } catch (const dattn::Error& e) {                                                           \
      EXPECT_THAT(e.what(), HasSubstr(needle));                                                 \
    } catch (const std::exception& e) {                                                         \
      ADD_FAILURE() << "not a dattn::Error: " << e.what();                                      \
    }                                                                                           \
  } while (0)

constexpr std::int64_t B = 2, N = 8, H = 2, D = 4;

struct Args {
  TensorView q, k, v, out, lse, dout, dq, dk, dv;
  dattn::DilatedConfig config;
  dattn::LaunchOptions options;
  void forward() const { dattn::forward(config, q, k, v, out, lse, options); }
  void backward() const { dattn::backward(config, q, k, v, out, lse, dout, dq, dk, dv, options); }
};

using Member = TensorView Args::*;
const std::pair<Member, const char*> kForwardTensors[] = {{&Args::k, "k"}, {&Args::v, "v"}, {&Args::out, "out"}};
const std::pair<Member, const char*> kBackwardTensors[] = {
    {&Args::dout, "dout"}, {&Args::dq, "dq"}, {&Args::dk, "dk"}, {&Args::dv, "dv"}};

class Validation : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    for (Tensor* t : {&q_, &k_, &v_, &out_, &dout_, &dq_, &dk_, &dv_}) *t = Tensor::zeros({B, N, H, D}, DType::float32);
    lse_ = Tensor::zeros({B, H, N}, DType::float32);
    mask_ = Tensor::zeros({B, N}, DType::boolean);
    wide_ = Tensor::zeros({B, N, H, 2 * D}, DType::float32);
    other_ = Tensor::zeros({B, N + 1, H, D}, DType::float32);
    half_ = Tensor::zeros({B, N, H, D}, DType::bfloat16);
    good_ = Args{q_, k_, v_, out_, lse_, dout_, dq_, dk_, dv_, {}, {}};
    good_.config.segment_lengths = {4, 8};
    good_.config.dilation_rates = {1, 2};
    good_.options.backend = GetParam();
  }
  // A [B, N, H, D] view whose D stride is 2.
  TensorView d_stride_two() const {
    return dattn::make_view(wide_.view().data, DType::float32, {B, N, H, D}, {N * H * 2 * D, H * 2 * D, 2 * D, 2});
  }
  Tensor q_, k_, v_, out_, lse_, dout_, dq_, dk_, dv_, mask_, wide_, other_, half_;
  Args good_;
};

// Both calls must raise for the arguments both take.
#define EXPECT_BOTH(args, needle)                   \
  do {                                              \
    EXPECT_DATTN_ERROR((args).forward(), needle);   \
    EXPECT_DATTN_ERROR((args).backward(), needle);  \
  } while (0)

TEST_P(Validation, ValidArgumentsPass) {
  EXPECT_NO_THROW(good_.forward());
  EXPECT_NO_THROW(good_.backward());
}

TEST_P(Validation, SegmentAndRateLists) {
  Args a = good_;
  a.config.segment_lengths = {}, a.config.dilation_rates = {};
  EXPECT_BOTH(a, "segment_lengths is empty");
  a.config.segment_lengths = {4, 8}, a.config.dilation_rates = {1};
  EXPECT_BOTH(a, "dilation_rates");
  a.config.segment_lengths.assign(17, 4), a.config.dilation_rates.assign(17, 1);
  EXPECT_BOTH(a, "segment_lengths has 17 entries");
  a.config.segment_lengths = {4, 0}, a.config.dilation_rates = {1, 1};
  EXPECT_BOTH(a, "segment_lengths[1] = 0");
  a.config.segment_lengths = {-4}, a.config.dilation_rates = {1};
  EXPECT_BOTH(a, "segment_lengths[0] = -4");
  a.config.segment_lengths = {4}, a.config.dilation_rates = {0};
  EXPECT_BOTH(a, "dilation_rates[0] = 0");
  a.config.dilation_rates = {-2};
  EXPECT_BOTH(a, "dilation_rates[0] = -2");
  a.config.segment_lengths = {4, 2}, a.config.dilation_rates = {1, 3};
  EXPECT_BOTH(a, "dilation_rates[1] = 3");
  EXPECT_DATTN_ERROR(dattn::forward_flops(a.config, B, N, H, D), "dilation_rates[1] = 3");
  a.config = good_.config;
  EXPECT_DATTN_ERROR(dattn::forward_flops(a.config, B, -N, H, D), "seqlen = -");
  EXPECT_DATTN_ERROR(dattn::forward_flops(a.config, B, N, H, 0), "head_dim = 0");
}

TEST_P(Validation, ScaleAndDropout) {
  Args a = good_;
  a.config.scale = std::numeric_limits<double>::quiet_NaN();
  EXPECT_BOTH(a, "scale");
  a.config.scale = std::numeric_limits<double>::infinity();
  EXPECT_BOTH(a, "scale");
  a.config.scale.reset();
  for (double p : {-0.1, 1.0, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    a.config.dropout_p = p;
    EXPECT_BOTH(a, "dropout_p");
  }
}

TEST_P(Validation, NullPointers) {
  for (TensorView Args::*member : {&Args::q, &Args::k, &Args::v, &Args::out, &Args::lse}) {
    Args a = good_;
    (a.*member).data = nullptr;
    const char* name = member == &Args::q ? "q" : member == &Args::k ? "k" : member == &Args::v ? "v"
                     : member == &Args::out ? "out" : "lse";
    EXPECT_BOTH(a, std::string(name) + " is null");
  }
  for (auto [member, name] : kBackwardTensors) {
    Args a = good_;
    (a.*member).data = nullptr;
    EXPECT_DATTN_ERROR(a.backward(), std::string(name) + " is null");
  }
  Args a = good_;
  a.config.key_padding_mask = mask_.view();
  a.config.key_padding_mask->data = nullptr;
  EXPECT_BOTH(a, "key_padding_mask is null");
}

// Grouped-query heads: k, v (and dk, dv) may have Hkv heads with H % Hkv == 0, nothing else.
TEST_P(Validation, KeyValueHeads) {
  const Tensor q4 = Tensor::zeros({B, N, 4, D}, DType::float32), out4 = Tensor::zeros({B, N, 4, D}, DType::float32);
  const Tensor lse4 = Tensor::zeros({B, 4, N}, DType::float32), kv3 = Tensor::zeros({B, N, 3, D}, DType::float32);
  Args a = good_;
  a.q = a.dout = a.dq = q4, a.out = out4, a.lse = lse4;
  EXPECT_NO_THROW(a.forward());  // Hkv = 2 divides H = 4
  EXPECT_NO_THROW(a.backward());
  a.k = a.v = a.dk = a.dv = kv3;
  EXPECT_BOTH(a, "k has 3 heads and q has H = 4");
  a.k = a.v = k_;
  a.dk = kv3;
  EXPECT_DATTN_ERROR(a.backward(), "dk has shape");
  a.dk = dk_;
  a.v = kv3;
  EXPECT_BOTH(a, "v has shape");
}

TEST_P(Validation, RankExtentAndDtypeOfQ) {
  Args a = good_;
  a.q = dattn::make_view(q_.view().data, DType::float32, {B, N, H * D});
  EXPECT_BOTH(a, "q has rank");
  a.q = dattn::make_view(q_.view().data, DType::float32, {B, 0, H, D});
  EXPECT_BOTH(a, "q has shape");
  a.q = dattn::make_view(q_.view().data, DType::boolean, {B, N, H, D});
  EXPECT_BOTH(a, "q has dtype");
}


// Applies `change` to each attention tensor in turn and expects an error naming it.
template <class Change>
void for_each_tensor(const Args& good, Change change, const std::string& what) {
  for (auto [member, name] : kForwardTensors) {
    Args a = good;
    change(a.*member);
    EXPECT_BOTH(a, std::string(name) + what);
  }
  for (auto [member, name] : kBackwardTensors) {
    Args a = good;
    change(a.*member);
    EXPECT_DATTN_ERROR(a.backward(), std::string(name) + what);
  }
}

TEST_P(Validation, ShapeMismatch) {
  for_each_tensor(good_, [&](TensorView& t) { t = other_.view(); }, " has shape");
  for_each_tensor(good_, [&](TensorView& t) { t = dattn::make_view(t.data, DType::float32, {B, N, H}); }, " has rank");
}

TEST_P(Validation, HeadDimStride) {
  Args a = good_;
  a.q = d_stride_two();
  EXPECT_BOTH(a, "q has stride 2 along D");
  for_each_tensor(good_, [&](TensorView& t) { t = d_stride_two(); }, " has stride 2 along D");
}

TEST_P(Validation, DtypeMismatch) {
  for_each_tensor(good_, [&](TensorView& t) { t = half_.view(); }, " has dtype bfloat16");
}

TEST_P(Validation, DeviceMismatch) {
  const dattn::Device cuda{dattn::DeviceType::cuda, 0};
  for_each_tensor(good_, [&](TensorView& t) { t.device = cuda; }, " is on cuda:0");
  Args a = good_;
  a.lse.device = cuda;
  EXPECT_BOTH(a, "lse is on cuda:0");
  a = good_;
  a.config.key_padding_mask = mask_.view();
  a.config.key_padding_mask->device = cuda;
  EXPECT_BOTH(a, "key_padding_mask is on cuda:0");
}

#if !DATTN_TEST_HAS_CUDA
TEST_P(Validation, CudaTensorsWithoutCudaBackend) {
  Args a = good_;
  for (TensorView* t : {&a.q, &a.k, &a.v, &a.out, &a.lse, &a.dout, &a.dq, &a.dk, &a.dv})
    t->device = dattn::Device{dattn::DeviceType::cuda, 0};
  EXPECT_BOTH(a, "q is on cuda:0");
}
#endif

// The TMA queries name their CUDA-only nature for host tensors, before anything else.
TEST_P(Validation, TmaQueriesWantCudaTensors) {
  const Args& a = good_;
  EXPECT_DATTN_ERROR(dattn::cuda_forward_uses_tma(a.config, a.q, a.k, a.v, a.out, a.lse, a.options),
                     "q is not a CUDA tensor");
  EXPECT_DATTN_ERROR(dattn::cuda_backward_uses_tma(a.config, a.q, a.k, a.v, a.out, a.lse, a.dout, a.dq, a.dk, a.dv,
                                                   a.options),
                     "q is not a CUDA tensor");
}

TEST_P(Validation, HeadDimTooLarge) {
  const Tensor big = Tensor::zeros({1, 2, 1, 257}, DType::float32);
  const Tensor big_lse = Tensor::zeros({1, 1, 2}, DType::float32);
  Args a{big, big, big, big, big_lse, big, big, big, big, good_.config, good_.options};
  EXPECT_BOTH(a, "head dim D = 257");
  const Tensor ok = Tensor::zeros({1, 2, 1, 256}, DType::float32);
  Args b{ok, ok, ok, ok, big_lse, ok, ok, ok, ok, good_.config, good_.options};
  EXPECT_NO_THROW(b.forward());
}

TEST_P(Validation, Lse) {
  Args a = good_;
  const Tensor wrong = Tensor::zeros({B, N, H}, DType::float32);
  a.lse = wrong;
  EXPECT_BOTH(a, "lse has shape");
  a.lse = dattn::make_view(lse_.view().data, DType::float32, {B, H * N});
  EXPECT_BOTH(a, "lse has shape");
  const Tensor f64 = Tensor::zeros({B, H, N}, DType::float64);
  a.lse = f64;
  EXPECT_BOTH(a, "lse has dtype float64");
  a.lse = dattn::make_view(lse_.view().data, DType::bfloat16, {B, H, N});
  EXPECT_BOTH(a, "lse has dtype bfloat16");
}

TEST_P(Validation, KeyPaddingMask) {
  Args a = good_;
  const Tensor longer = Tensor::zeros({B, N + 1}, DType::boolean);
  a.config.key_padding_mask = longer.view();
  EXPECT_BOTH(a, "key_padding_mask has shape");
  a.config.key_padding_mask = dattn::make_view(mask_.view().data, DType::boolean, {B * N});
  EXPECT_BOTH(a, "key_padding_mask has shape");
  const Tensor floats = Tensor::zeros({B, N}, DType::float32);
  a.config.key_padding_mask = floats.view();
  EXPECT_BOTH(a, "key_padding_mask has dtype float32");
  a.config.key_padding_mask = mask_.view();
  EXPECT_NO_THROW(a.forward());
}

TEST_P(Validation, RingStepAndStream) {
  Args a = good_;
  a.options.ring_step = dattn::RingStep{0, N, 0, N + 1};  // keys past the sequence
  EXPECT_BOTH(a, "ring_step");
  a.options.ring_step = dattn::RingStep{0, N, 0, N};
  if (GetParam() != dattn::Backend::reference) EXPECT_NO_THROW(a.forward());
  EXPECT_DATTN_ERROR(a.backward(), "ring_step");  // the ring step backward is not implemented yet
  a = good_;
  int fake_stream = 0;
  a.options.stream = &fake_stream;
  EXPECT_BOTH(a, "stream");
  a = good_;
  a.options.sm90_forward_rows = 192;  // a CUDA block shape
  EXPECT_BOTH(a, "options.sm90_forward_rows = 192 for cpu tensors");
  a = good_;
  a.options.sm90_forward_passes = 2;  // how a CUDA kernel's blocks walk the queries
  EXPECT_BOTH(a, "options.sm90_forward_passes = 2 for cpu tensors");
  a = good_;
  a.options.sm90_backward_passes = 2;  // how a CUDA kernel's blocks walk the keys
  EXPECT_BOTH(a, "options.sm90_backward_passes = 2 for cpu tensors");
  a = good_;
  a.options.sm90_backward_dq = dattn::BackwardDq::atomic;  // a CUDA backward's way
  EXPECT_BOTH(a, "options.sm90_backward_dq = atomic for cpu tensors");
  a.options.sm90_backward_dq = dattn::BackwardDq::dq_blocks;  // the reproducible way: every backward's
  EXPECT_NO_THROW(a.forward());
  EXPECT_NO_THROW(a.backward());
}

TEST_P(Validation, PositionIndex) {
  Tensor index = Tensor::empty({N}, DType::int64);
  for (std::int64_t i = 0; i < N; ++i) index.data<std::int64_t>()[i] = N - 1 - i;
  Args a = good_;
  a.options.position_index = index.view();
  EXPECT_NO_THROW(a.forward());
  EXPECT_NO_THROW(a.backward());
  a.options.position_index->data = nullptr;
  EXPECT_BOTH(a, "position_index is null");
  const Tensor longer = Tensor::zeros({N + 1}, DType::int64);
  a.options.position_index = longer.view();
  EXPECT_BOTH(a, "position_index has shape");
  const Tensor floats = Tensor::zeros({N}, DType::float64);
  a.options.position_index = floats.view();
  EXPECT_BOTH(a, "position_index has dtype float64");
  const Tensor wide = Tensor::zeros({2 * N}, DType::int64);
  for (std::int64_t i = 0; i < N; ++i) wide.data<std::int64_t>()[2 * i] = i;
  a.options.position_index = dattn::make_view(wide.view().data, DType::int64, {N}, {2});
  EXPECT_BOTH(a, "position_index has stride 2");
  a.options.position_index = index.view();
  a.options.position_index->device = dattn::Device{dattn::DeviceType::cuda, 0};
  EXPECT_BOTH(a, "position_index is on cuda:0");
  a.options.position_index = index.view();
  index.data<std::int64_t>()[3] = index.data<std::int64_t>()[2];  // a repeated row
  EXPECT_BOTH(a, "position_index[3]");
  index.data<std::int64_t>()[3] = N;  // out of range
  EXPECT_BOTH(a, "position_index[3] = 8");
  index.data<std::int64_t>()[3] = -1;
  EXPECT_BOTH(a, "position_index[3] = -1");
}

INSTANTIATE_TEST_SUITE_P(Backends, Validation,
                         ::testing::Values(Backend::reference, Backend::fused, Backend::automatic),
                         [](const auto& info) {
                           return std::string(info.param == Backend::reference ? "reference"
                                              : info.param == Backend::fused ? "fused" : "automatic");
                         });

TEST(ValidationFloat64, OnlyTheReferenceTakesFloat64) {
  std::vector<Tensor> t;
  for (int i = 0; i < 8; ++i) t.push_back(Tensor::zeros({B, N, H, D}, DType::float64));
  const Tensor lse = Tensor::zeros({B, H, N}, DType::float32);
  Args a{t[0], t[1], t[2], t[3], lse, t[4], t[5], t[6], t[7], {}, {}};
  a.config.segment_lengths = {4};
  a.config.dilation_rates = {2};
  a.options.backend = Backend::fused;
  EXPECT_BOTH(a, "float64");
  a.options.backend = Backend::reference;
  EXPECT_NO_THROW(a.forward());
  EXPECT_NO_THROW(a.backward());
  a.options.backend = Backend::automatic;
  EXPECT_NO_THROW(a.forward());
}

}  // namespace
