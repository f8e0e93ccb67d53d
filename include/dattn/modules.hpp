// Multi-head dilated attention modules for C++ users (docs/semantics.md "Multi-head modules"): input
// projections, dilated attention, MAGNETO sub-LayerNorm, output projection; forward and backward.
// float32 (the fused kernels) or float64 (the reference, for gradient checks) on the CPU.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "dattn/config.hpp"
#include "dattn/tensor.hpp"

namespace dattn {

struct MultiheadConfig {
  std::int64_t embed_dim = 0;
  std::int64_t num_heads = 0;
  std::vector<std::int64_t> segment_lengths;
  std::vector<std::int64_t> dilation_rates;
  double dropout = 0.0;  // attention dropout, training only
  bool bias = true;
  bool layer_norm = true;
  double layer_norm_eps = 1e-5;
  double gamma_init = 1.0;
  Mode mode = Mode::grouped;
  bool fused_qkv = false;  // one [3E, E] projection (the "Improved" module)
  DType dtype = DType::float32;
};

// A parameter and the gradient that backward accumulates into.
struct Parameter {
  Tensor value, grad;
};

struct Linear {
  Parameter weight;  // [out, in]
  std::optional<Parameter> bias;  // [out]
};

struct ForwardOptions {
  bool causal = false;
  std::optional<TensorView> key_padding_mask;  // [B, N] bool
  bool training = false;                       // attention dropout only in training
  std::uint64_t dropout_seed = 0;
};

class MultiheadDilatedAttention {
 public:
  // Xavier-normal init (gain 1 for Wq, Wk; gamma_init for Wv, Wout), zero biases, drawn from seed.
  explicit MultiheadDilatedAttention(MultiheadConfig config, std::uint64_t seed = 0);

  // What forward keeps for backward.
  struct Saved {
    Tensor query, key, value;  // copies of the inputs ([B, N, E]; one copy for self-attention)
    bool self_attention = false;
    Tensor projected;          // [B, N, 3, E]: q, k, v projections
    Tensor attention, lse;     // attention output [B, N, H, D], lse [B, H, N]
    Tensor normalized, mean, rstd;  // LayerNorm input normalised, per-row statistics
    Tensor normed;             // input of out_proj
    ForwardOptions options;
  };
  struct InputGradients {
    Tensor query, key, value;  // for self-attention all three are the same total gradient in query
  };

  // query, key, value: [B, N, E] of the module's dtype; key and value may be the same view as
  // query (self-attention: one product for the fused module). Returns [B, N, E].
  Tensor forward(const TensorView& query, const TensorView& key, const TensorView& value,
                 const ForwardOptions& options = {}, Saved* saved = nullptr);
  // Accumulates parameter gradients and returns the inputs' gradients.
  InputGradients backward(const Saved& saved, const TensorView& grad_output);

  void zero_grad();
  const MultiheadConfig& config() const { return config_; }
  // q_proj, k_proj, v_proj (unfused) or qkv_proj (fused, rows Wq then Wk then Wv), out_proj, norm.
  Linear q_proj, k_proj, v_proj, qkv_proj, out_proj;
  Parameter norm_weight, norm_bias;

 private:
  MultiheadConfig config_;
  DilatedConfig attention_config(const ForwardOptions& options) const;
};

}  // namespace dattn
