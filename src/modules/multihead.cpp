// The multi-head modules: projections and LayerNorm through BLAS (cblas), attention through
// dattn::forward/backward on strided views of one [B, N, 3, E] projection buffer, so the fused
// module hands q, k, v to the kernels without a copy.
#include <cblas.h>

#include <cmath>
#include <cstring>
#include <random>

#include "dattn/attention.hpp"
#include "dattn/error.hpp"
#include "dattn/modules.hpp"

namespace dattn {
namespace {

std::string str(std::int64_t x) { return std::to_string(x); }

// C = alpha·op(A)·op(B) + beta·C, row-major.
template <class S>
void gemm(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K, const S* A, std::int64_t lda,
          const S* B, std::int64_t ldb, S beta, S* C, std::int64_t ldc) {
  const auto ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<S, float>)
    cblas_sgemm(CblasRowMajor, ta, tb, int(M), int(N), int(K), 1.0f, A, int(lda), B, int(ldb), beta, C, int(ldc));
  else
    cblas_dgemm(CblasRowMajor, ta, tb, int(M), int(N), int(K), 1.0, A, int(lda), B, int(ldb), beta, C, int(ldc));
}

// A contiguous copy of a [B, N, E] view.
template <class S>
Tensor copy_rows(const TensorView& x) {
  Tensor out = Tensor::empty({x.shape[0], x.shape[1], x.shape[2]}, x.dtype);
  S* dst = out.data<S>();
  for (std::int64_t b = 0; b < x.shape[0]; ++b)
    for (std::int64_t n = 0; n < x.shape[1]; ++n)
      for (std::int64_t e = 0; e < x.shape[2]; ++e)
        *dst++ = x.ptr<S>()[b * x.strides[0] + n * x.strides[1] + e * x.strides[2]];
  return out;
}

Parameter make_parameter(const std::vector<std::int64_t>& shape, DType dtype) {
  return {Tensor::zeros(shape, dtype), Tensor::zeros(shape, dtype)};
}

template <class S>
void xavier_normal(Tensor& weight, std::int64_t first_row, std::int64_t rows, std::int64_t cols, double gain,
                   std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, gain * std::sqrt(2.0 / double(rows + cols)));
  for (std::int64_t i = first_row * cols; i < (first_row + rows) * cols; ++i) weight.data<S>()[i] = S(normal(rng));
}

// The [B, N, H, D] view of part `which` (0 q, 1 k, 2 v) of a [B, N, 3, E] buffer.
TensorView head_view(const Tensor& buffer, int which, std::int64_t heads) {
  const TensorView& b = buffer.view();
  const std::int64_t E = b.shape[3], D = E / heads;
  return make_view(static_cast<std::byte*>(b.data) + which * E * std::int64_t(dtype_size(b.dtype)), b.dtype,
                   {b.shape[0], b.shape[1], heads, D}, {b.strides[0], b.strides[1], D, 1});
}

template <class S>
struct Impl {
  MultiheadDilatedAttention& m;
  std::int64_t E, H;

  const S* weight(int which) const {  // W_q, W_k, W_v: [E, E]
    const Linear& l = m.config().fused_qkv ? m.qkv_proj : (which == 0 ? m.q_proj : which == 1 ? m.k_proj : m.v_proj);
    return l.weight.value.data<S>() + (m.config().fused_qkv ? which * E * E : 0);
  }
  Linear& linear(int which) const {
    return m.config().fused_qkv ? m.qkv_proj : (which == 0 ? m.q_proj : which == 1 ? m.k_proj : m.v_proj);
  }
  std::int64_t slice(int which) const { return m.config().fused_qkv ? which * E : 0; }

  void add_bias(const Linear& l, std::int64_t first, S* y, std::int64_t rows, std::int64_t cols, std::int64_t ld) const {
    if (!l.bias) return;
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < cols; ++c) y[r * ld + c] += l.bias->value.data<S>()[first + c];
  }

  void project(const MultiheadDilatedAttention::Saved& s, std::int64_t M) const {
    S* out = s.projected.data<S>();
    if (s.self_attention && m.config().fused_qkv) {  // one [M, 3E] product
      gemm<S>(false, true, M, 3 * E, E, s.query.data<S>(), E, weight(0), E, S(0), out, 3 * E);
      add_bias(m.qkv_proj, 0, out, M, 3 * E, 3 * E);
      return;
    }
    const Tensor* inputs[3] = {&s.query, s.self_attention ? &s.query : &s.key, s.self_attention ? &s.query : &s.value};
    for (int i = 0; i < 3; ++i) {
      gemm<S>(false, true, M, E, E, inputs[i]->data<S>(), E, weight(i), E, S(0), out + i * E, 3 * E);
      add_bias(linear(i), slice(i), out + i * E, M, E, 3 * E);
    }
  }

  void layer_norm(MultiheadDilatedAttention::Saved& s, std::int64_t M) const {
    const S* x = s.attention.data<S>();
    for (std::int64_t r = 0; r < M; ++r) {
      double mean = 0, var = 0;
      for (std::int64_t e = 0; e < E; ++e) mean += x[r * E + e];
      mean /= double(E);
      for (std::int64_t e = 0; e < E; ++e) var += (x[r * E + e] - mean) * (x[r * E + e] - mean);
      const double rstd = 1.0 / std::sqrt(var / double(E) + m.config().layer_norm_eps);
      s.mean.data<S>()[r] = S(mean);
      s.rstd.data<S>()[r] = S(rstd);
      for (std::int64_t e = 0; e < E; ++e) {
        const S xhat = S((x[r * E + e] - mean) * rstd);
        s.normalized.data<S>()[r * E + e] = xhat;
        s.normed.data<S>()[r * E + e] = xhat * m.norm_weight.value.data<S>()[e] + m.norm_bias.value.data<S>()[e];
      }
    }
  }

  // d_attention from d_normed: dx = rstd·(dxhat − mean(dxhat) − xhat·mean(dxhat·xhat)).
  void layer_norm_backward(const MultiheadDilatedAttention::Saved& s, const S* d_normed, S* d_attention,
                           std::int64_t M) const {
    S* dgamma = m.norm_weight.grad.data<S>();
    S* dbeta = m.norm_bias.grad.data<S>();
    const S* gamma = m.norm_weight.value.data<S>();
    for (std::int64_t r = 0; r < M; ++r) {
      const S* xhat = s.normalized.data<S>() + r * E;
      double mean_dxhat = 0, mean_dxhat_xhat = 0;
      for (std::int64_t e = 0; e < E; ++e) {
        const double dxhat = double(d_normed[r * E + e]) * gamma[e];
        mean_dxhat += dxhat;
        mean_dxhat_xhat += dxhat * xhat[e];
        dgamma[e] += d_normed[r * E + e] * xhat[e];
        dbeta[e] += d_normed[r * E + e];
      }
      mean_dxhat /= double(E);
      mean_dxhat_xhat /= double(E);
      for (std::int64_t e = 0; e < E; ++e) {
        const double dxhat = double(d_normed[r * E + e]) * gamma[e];
        d_attention[r * E + e] = S(s.rstd.data<S>()[r] * (dxhat - mean_dxhat - xhat[e] * mean_dxhat_xhat));
      }
    }
  }

  void linear_backward(Linear& l, std::int64_t first, const S* dy, std::int64_t ldy, const S* x, std::int64_t rows,
                       std::int64_t out_features, std::int64_t in_features) const {
    S* dw = l.weight.grad.data<S>() + first * in_features;
    gemm<S>(true, false, out_features, in_features, rows, dy, ldy, x, in_features, S(1), dw, in_features);
    if (l.bias)
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < out_features; ++c) l.bias->grad.data<S>()[first + c] += dy[r * ldy + c];
  }
};

template <class S>
Tensor forward_typed(MultiheadDilatedAttention& m, const DilatedConfig& attention, const TensorView& query,
                     const TensorView& key, const TensorView& value, MultiheadDilatedAttention::Saved& s) {
  const std::int64_t B = query.shape[0], N = query.shape[1], E = m.config().embed_dim, H = m.config().num_heads;
  const std::int64_t M = B * N;
  Impl<S> impl{m, E, H};
  s.self_attention = key.data == query.data && value.data == query.data && key.strides == query.strides &&
                     value.strides == query.strides;
  s.query = copy_rows<S>(query);
  if (!s.self_attention) {
    s.key = copy_rows<S>(key);
    s.value = copy_rows<S>(value);
  }
  s.projected = Tensor::empty({B, N, 3, E}, query.dtype);
  impl.project(s, M);
  s.attention = Tensor::empty({B, N, H, E / H}, query.dtype);
  s.lse = Tensor::empty({B, H, N}, DType::float32);
  forward(attention, head_view(s.projected, 0, H), head_view(s.projected, 1, H), head_view(s.projected, 2, H),
          s.attention, s.lse);
  const Tensor* normed = &s.attention;
  if (m.config().layer_norm) {
    s.normalized = Tensor::empty({M, E}, query.dtype);
    s.normed = Tensor::empty({M, E}, query.dtype);
    s.mean = Tensor::empty({M}, query.dtype);
    s.rstd = Tensor::empty({M}, query.dtype);
    impl.layer_norm(s, M);
    normed = &s.normed;
  }
  Tensor out = Tensor::empty({B, N, E}, query.dtype);
  gemm<S>(false, true, M, E, E, normed->data<S>(), E, m.out_proj.weight.value.data<S>(), E, S(0), out.data<S>(), E);
  impl.add_bias(m.out_proj, 0, out.data<S>(), M, E, E);
  return out;
}

template <class S>
MultiheadDilatedAttention::InputGradients backward_typed(MultiheadDilatedAttention& m, const DilatedConfig& attention,
                                                         const MultiheadDilatedAttention::Saved& s,
                                                         const TensorView& grad_output) {
  const std::int64_t B = s.query.view().shape[0], N = s.query.view().shape[1];
  const std::int64_t E = m.config().embed_dim, H = m.config().num_heads, M = B * N;
  const DType dtype = s.query.view().dtype;
  Impl<S> impl{m, E, H};
  const Tensor dy = copy_rows<S>(grad_output);

  Tensor d_normed = Tensor::empty({M, E}, dtype);
  const Tensor& normed = m.config().layer_norm ? s.normed : s.attention;
  gemm<S>(false, false, M, E, E, dy.data<S>(), E, m.out_proj.weight.value.data<S>(), E, S(0), d_normed.data<S>(), E);
  impl.linear_backward(m.out_proj, 0, dy.data<S>(), E, normed.data<S>(), M, E, E);

  Tensor d_attention = Tensor::empty({B, N, H, E / H}, dtype);
  if (m.config().layer_norm)
    impl.layer_norm_backward(s, d_normed.data<S>(), d_attention.data<S>(), M);
  else
    std::memcpy(d_attention.data<S>(), d_normed.data<S>(), d_normed.nbytes());

  Tensor d_projected = Tensor::empty({B, N, 3, E}, dtype);
  backward(attention, head_view(s.projected, 0, H), head_view(s.projected, 1, H), head_view(s.projected, 2, H),
           s.attention, s.lse, d_attention, head_view(d_projected, 0, H), head_view(d_projected, 1, H),
           head_view(d_projected, 2, H));

  MultiheadDilatedAttention::InputGradients grads;
  const S* dp = d_projected.data<S>();
  if (s.self_attention) {
    grads.query = Tensor::empty({B, N, E}, dtype);
    if (m.config().fused_qkv) {  // one [M, 3E] · [3E, E] product
      gemm<S>(false, false, M, E, 3 * E, dp, 3 * E, impl.weight(0), E, S(0), grads.query.data<S>(), E);
      impl.linear_backward(m.qkv_proj, 0, dp, 3 * E, s.query.data<S>(), M, 3 * E, E);
      return grads;
    }
    for (int i = 0; i < 3; ++i) {
      gemm<S>(false, false, M, E, E, dp + i * E, 3 * E, impl.weight(i), E, S(i == 0 ? 0 : 1), grads.query.data<S>(), E);
      impl.linear_backward(impl.linear(i), impl.slice(i), dp + i * E, 3 * E, s.query.data<S>(), M, E, E);
    }
    return grads;
  }
  Tensor* targets[3] = {&grads.query, &grads.key, &grads.value};
  const Tensor* inputs[3] = {&s.query, &s.key, &s.value};
  for (int i = 0; i < 3; ++i) {
    *targets[i] = Tensor::empty({B, N, E}, dtype);
    gemm<S>(false, false, M, E, E, dp + i * E, 3 * E, impl.weight(i), E, S(0), targets[i]->data<S>(), E);
    impl.linear_backward(impl.linear(i), impl.slice(i), dp + i * E, 3 * E, inputs[i]->data<S>(), M, E, E);
  }
  return grads;
}

void check_input(const char* name, const TensorView& x, const MultiheadConfig& c, const TensorView& query) {
  if (x.data == nullptr || x.rank != 3 || x.shape[2] != c.embed_dim)
    throw Error(std::string(name) + " has shape " + x.shape_string() + "; expected [B, N, " + str(c.embed_dim) + "]");
  if (x.dtype != c.dtype)
    throw Error(std::string(name) + " has dtype " + dtype_name(x.dtype) + "; expected " + dtype_name(c.dtype));
  if (x.device.type != DeviceType::cpu) throw Error(std::string(name) + " is on " + device_name(x.device) + "; expected cpu");
  if (x.shape[0] != query.shape[0] || x.shape[1] != query.shape[1])
    throw Error(std::string(name) + " has shape " + x.shape_string() + "; expected " + query.shape_string());
}

}  // namespace

MultiheadDilatedAttention::MultiheadDilatedAttention(MultiheadConfig config, std::uint64_t seed)
    : config_(std::move(config)) {
  const std::int64_t E = config_.embed_dim, H = config_.num_heads;
  if (E < 1 || H < 1 || E % H != 0)
    throw Error("embed_dim = " + str(E) + ", num_heads = " + str(H) + "; expected embed_dim divisible by num_heads");
  if (config_.dtype != DType::float32 && config_.dtype != DType::float64)
    throw Error(std::string("dtype ") + dtype_name(config_.dtype) + "; expected float32 or float64 for the C++ modules");
  if (!(config_.dropout >= 0.0 && config_.dropout < 1.0))
    throw Error("dropout = " + std::to_string(config_.dropout) + "; expected 0 <= dropout < 1");
  forward_flops(DilatedConfig{config_.segment_lengths, config_.dilation_rates}, 1, 1, 1, 1);  // validates the lists
  const DType t = config_.dtype;
  auto linear = [&](std::int64_t out) {
    Linear l{make_parameter({out, E}, t), std::nullopt};
    if (config_.bias) l.bias = make_parameter({out}, t);
    return l;
  };
  std::mt19937_64 rng(seed);
  const double gains[3] = {1.0, 1.0, config_.gamma_init};
  auto init = [&](Tensor& w, std::int64_t first_row, double gain) {
    if (t == DType::float32) xavier_normal<float>(w, first_row, E, E, gain, rng);
    else xavier_normal<double>(w, first_row, E, E, gain, rng);
  };
  if (config_.fused_qkv) {
    qkv_proj = linear(3 * E);
    for (int i = 0; i < 3; ++i) init(qkv_proj.weight.value, i * E, gains[i]);
  } else {
    Linear* parts[3] = {&q_proj, &k_proj, &v_proj};
    for (int i = 0; i < 3; ++i) {
      *parts[i] = linear(E);
      init(parts[i]->weight.value, 0, gains[i]);
    }
  }
  out_proj = linear(E);
  init(out_proj.weight.value, 0, config_.gamma_init);
  norm_weight = make_parameter({E}, t);
  norm_bias = make_parameter({E}, t);
  for (std::int64_t e = 0; e < E; ++e) {
    if (t == DType::float32) norm_weight.value.data<float>()[e] = 1.0f;
    else norm_weight.value.data<double>()[e] = 1.0;
  }
}

DilatedConfig MultiheadDilatedAttention::attention_config(const ForwardOptions& options) const {
  DilatedConfig c;
  c.segment_lengths = config_.segment_lengths;
  c.dilation_rates = config_.dilation_rates;
  c.mode = config_.mode;
  c.causal = options.causal;
  c.key_padding_mask = options.key_padding_mask;
  c.dropout_p = options.training ? config_.dropout : 0.0;
  c.dropout_seed = options.dropout_seed;
  return c;
}

Tensor MultiheadDilatedAttention::forward(const TensorView& query, const TensorView& key, const TensorView& value,
                                          const ForwardOptions& options, Saved* saved) {
  check_input("query", query, config_, query);
  check_input("key", key, config_, query);
  check_input("value", value, config_, query);
  Saved local;
  Saved& s = saved ? *saved : local;
  s.options = options;
  const DilatedConfig attention = attention_config(options);
  return config_.dtype == DType::float32 ? forward_typed<float>(*this, attention, query, key, value, s)
                                         : forward_typed<double>(*this, attention, query, key, value, s);
}

MultiheadDilatedAttention::InputGradients MultiheadDilatedAttention::backward(const Saved& saved,
                                                                              const TensorView& grad_output) {
  check_input("grad_output", grad_output, config_, saved.query.view());
  const DilatedConfig attention = attention_config(saved.options);
  return config_.dtype == DType::float32 ? backward_typed<float>(*this, attention, saved, grad_output)
                                         : backward_typed<double>(*this, attention, saved, grad_output);
}

void MultiheadDilatedAttention::zero_grad() {
  for (Linear* l : {&q_proj, &k_proj, &v_proj, &qkv_proj, &out_proj}) {
    if (!l->weight.grad.data<std::byte>()) continue;  // the projections this variant does not have
    std::memset(l->weight.grad.data<std::byte>(), 0, l->weight.grad.nbytes());
    if (l->bias) std::memset(l->bias->grad.data<std::byte>(), 0, l->bias->grad.nbytes());
  }
  std::memset(norm_weight.grad.data<std::byte>(), 0, norm_weight.grad.nbytes());
  std::memset(norm_bias.grad.data<std::byte>(), 0, norm_bias.grad.nbytes());
}

}  // namespace dattn
