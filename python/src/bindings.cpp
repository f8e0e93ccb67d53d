// dattn._C: the Python face of the C++ API, kept as thin as the C++ API itself.
//
// Tensors cross as plain descriptions, (data pointer, dtype code, device type, device index,
// sizes, strides in elements), so nothing is copied and no framework type reaches C++; the
// Python package builds them from torch tensors. dattn::Error derives from
// std::invalid_argument, which nanobind raises as ValueError with the C++ message (it names
// the argument and the expected value).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dattn/attention.hpp"
#include "dattn/block_sparse.hpp"
#include "dattn/hilbert.hpp"
#include "dattn/ring.hpp"
#include "dattn/config.hpp"
#include "dattn/decode.hpp"
#include "dattn/cpu.hpp"
#include "dattn/error.hpp"
#include "dattn/tensor.hpp"
#include "dattn/varlen.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// (data_ptr, dtype code, device type code, device index, sizes, strides)
using ViewSpec = std::tuple<std::uintptr_t, int, int, int, std::vector<std::int64_t>, std::vector<std::int64_t>>;

dattn::TensorView to_view(const ViewSpec& spec, const char* name) {
  const auto& [data, dtype, device_type, device_index, shape, strides] = spec;
  if (dtype < int(dattn::DType::float32) || dtype > int(dattn::DType::int32))
    throw dattn::Error(std::string(name) + " has dtype code " + std::to_string(dtype) +
                       "; expected a dattn dtype code (0..6)");
  if (device_type != int(dattn::DeviceType::cpu) && device_type != int(dattn::DeviceType::cuda))
    throw dattn::Error(std::string(name) + " has device type code " + std::to_string(device_type) +
                       "; expected 0 (cpu) or 1 (cuda)");
  if (shape.size() != strides.size())
    throw dattn::Error(std::string(name) + " has " + std::to_string(shape.size()) + " sizes but " +
                       std::to_string(strides.size()) + " strides; expected as many strides as sizes");
  dattn::Device device{dattn::DeviceType(device_type), device_index};
  return dattn::make_view(reinterpret_cast<void*>(data), dattn::DType(dtype), shape, strides, device);
}

dattn::Mode to_mode(const std::string& mode) {
  if (mode == "grouped") return dattn::Mode::grouped;
  if (mode == "longnet") return dattn::Mode::longnet;
  throw dattn::Error("mode = '" + mode + "'; expected 'grouped' or 'longnet'");
}

dattn::Backend to_backend(const std::string& backend) {
  if (backend == "automatic") return dattn::Backend::automatic;
  if (backend == "reference") return dattn::Backend::reference;
  if (backend == "fused") return dattn::Backend::fused;
  throw dattn::Error("backend = '" + backend + "'; expected 'automatic', 'reference' or 'fused'");
}

struct Call {
  dattn::DilatedConfig config;
  dattn::LaunchOptions options;
};

Call make_call(const std::vector<std::int64_t>& segment_lengths,
               const std::vector<std::int64_t>& dilation_rates, const std::string& mode, bool causal,
               std::optional<double> scale, const std::optional<ViewSpec>& key_padding_mask,
               double dropout_p, std::uint64_t dropout_seed, std::uint64_t dropout_offset,
               bool use_tf32, const std::string& backend, std::uintptr_t stream,
               const std::optional<ViewSpec>& position_index, bool position_index_checked) {
  Call call;
  call.config.segment_lengths = segment_lengths;
  call.config.dilation_rates = dilation_rates;
  call.config.mode = to_mode(mode);
  call.config.causal = causal;
  call.config.scale = scale;
  if (key_padding_mask) call.config.key_padding_mask = to_view(*key_padding_mask, "key_padding_mask");
  call.config.dropout_p = dropout_p;
  call.config.dropout_seed = dropout_seed;
  call.config.dropout_offset = dropout_offset;
  call.config.use_tf32 = use_tf32;
  call.options.backend = to_backend(backend);
  call.options.stream = reinterpret_cast<void*>(stream);
  if (position_index) {
    call.options.position_index = to_view(*position_index, "position_index");
    call.options.position_index_checked = position_index_checked;
  }
  return call;
}

// The caller's device workspace (LaunchOptions::workspace; 0 bytes: none, which each call handles as its header says).
void set_workspace(dattn::LaunchOptions& options, std::uintptr_t workspace, std::size_t workspace_bytes) {
  options.workspace = reinterpret_cast<void*>(workspace);
  options.workspace_bytes = workspace_bytes;
}

// A backward's options: the workspace, and dQ formed in dq blocks (bitwise reproducible) when
// torch asks for deterministic algorithms, instead of the sm90 backward's float32 bulk adds.
void set_backward_options(dattn::LaunchOptions& options, std::uintptr_t workspace, std::size_t workspace_bytes,
                          bool deterministic) {
  set_workspace(options, workspace, workspace_bytes);
  if (deterministic) options.sm90_backward_dq = dattn::BackwardDq::dq_blocks;
}

// (query_position, global_length, key_begin, key_end) of one ring step.
using RingStepSpec = std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t>;
dattn::RingStep to_step(const RingStepSpec& s) {
  return {std::get<0>(s), std::get<1>(s), std::get<2>(s), std::get<3>(s)};
}

void forward(const ViewSpec& q, const ViewSpec& k, const ViewSpec& v, const ViewSpec& out,
             const ViewSpec& lse, const std::vector<std::int64_t>& segment_lengths,
             const std::vector<std::int64_t>& dilation_rates, const std::string& mode, bool causal,
             std::optional<double> scale, const std::optional<ViewSpec>& key_padding_mask,
             double dropout_p, std::uint64_t dropout_seed, std::uint64_t dropout_offset, bool use_tf32,
             const std::string& backend, std::uintptr_t stream, const std::optional<ViewSpec>& position_index,
             const std::optional<RingStepSpec>& ring_step, bool position_index_checked) {
  Call call = make_call(segment_lengths, dilation_rates, mode, causal, scale, key_padding_mask, dropout_p,
                        dropout_seed, dropout_offset, use_tf32, backend, stream, position_index, position_index_checked);
  if (ring_step) call.options.ring_step = to_step(*ring_step);
  const auto qv = to_view(q, "q"), kv = to_view(k, "k"), vv = to_view(v, "v");
  const auto ov = to_view(out, "out"), lv = to_view(lse, "lse");
  nb::gil_scoped_release release;
  dattn::forward(call.config, qv, kv, vv, ov, lv, call.options);
}

void backward(const ViewSpec& q, const ViewSpec& k, const ViewSpec& v, const ViewSpec& out,
              const ViewSpec& lse, const ViewSpec& dout, const ViewSpec& dq, const ViewSpec& dk,
              const ViewSpec& dv, const std::vector<std::int64_t>& segment_lengths,
              const std::vector<std::int64_t>& dilation_rates, const std::string& mode, bool causal,
              std::optional<double> scale, const std::optional<ViewSpec>& key_padding_mask,
              double dropout_p, std::uint64_t dropout_seed, std::uint64_t dropout_offset,
              bool use_tf32, const std::string& backend, std::uintptr_t stream,
              const std::optional<ViewSpec>& position_index, std::uintptr_t workspace, std::size_t workspace_bytes,
              bool position_index_checked, bool deterministic) {
  Call call = make_call(segment_lengths, dilation_rates, mode, causal, scale, key_padding_mask, dropout_p,
                        dropout_seed, dropout_offset, use_tf32, backend, stream, position_index, position_index_checked);
  set_backward_options(call.options, workspace, workspace_bytes, deterministic);
  const auto qv = to_view(q, "q"), kv = to_view(k, "k"), vv = to_view(v, "v");
  const auto ov = to_view(out, "out"), lv = to_view(lse, "lse"), gv = to_view(dout, "dout");
  const auto dqv = to_view(dq, "dq"), dkv = to_view(dk, "dk"), dvv = to_view(dv, "dv");
  nb::gil_scoped_release release;
  dattn::backward(call.config, qv, kv, vv, ov, lv, gv, dqv, dkv, dvv, call.options);
}

dattn::BlockSparseConfig block_sparse_config(std::int64_t block_size, bool causal, std::optional<double> scale,
                                             const std::optional<ViewSpec>& key_padding_mask, double dropout_p,
                                             std::uint64_t dropout_seed) {
  dattn::BlockSparseConfig config;
  config.block_size = block_size;
  config.causal = causal;
  config.scale = scale;
  if (key_padding_mask) config.key_padding_mask = to_view(*key_padding_mask, "key_padding_mask");
  config.dropout_p = dropout_p;
  config.dropout_seed = dropout_seed;
  return config;
}

void block_sparse_forward(const dattn::BlockSparseMask& mask, const ViewSpec& q, const ViewSpec& k, const ViewSpec& v,
                          const ViewSpec& out, const ViewSpec& lse, std::int64_t block_size, bool causal,
                          std::optional<double> scale, const std::optional<ViewSpec>& key_padding_mask,
                          double dropout_p, std::uint64_t dropout_seed, std::uintptr_t stream) {
  const auto config = block_sparse_config(block_size, causal, scale, key_padding_mask, dropout_p, dropout_seed);
  const auto qv = to_view(q, "q"), kv = to_view(k, "k"), vv = to_view(v, "v");
  const auto ov = to_view(out, "out"), lv = to_view(lse, "lse");
  dattn::LaunchOptions options;
  options.stream = reinterpret_cast<void*>(stream);
  nb::gil_scoped_release release;
  dattn::block_sparse_forward(config, mask, qv, kv, vv, ov, lv, options);
}

void block_sparse_backward(const dattn::BlockSparseMask& mask, const ViewSpec& q, const ViewSpec& k,
                           const ViewSpec& v, const ViewSpec& out, const ViewSpec& lse, const ViewSpec& dout,
                           const ViewSpec& dq, const ViewSpec& dk, const ViewSpec& dv, std::int64_t block_size,
                           bool causal, std::optional<double> scale, const std::optional<ViewSpec>& key_padding_mask,
                           double dropout_p, std::uint64_t dropout_seed, std::uintptr_t stream, std::uintptr_t workspace,
                           std::size_t workspace_bytes) {
  const auto config = block_sparse_config(block_size, causal, scale, key_padding_mask, dropout_p, dropout_seed);
  const auto qv = to_view(q, "q"), kv = to_view(k, "k"), vv = to_view(v, "v");
  const auto ov = to_view(out, "out"), lv = to_view(lse, "lse"), gv = to_view(dout, "dout");
  const auto dqv = to_view(dq, "dq"), dkv = to_view(dk, "dk"), dvv = to_view(dv, "dv");
  dattn::LaunchOptions options;
  options.stream = reinterpret_cast<void*>(stream);
  set_workspace(options, workspace, workspace_bytes);
  nb::gil_scoped_release release;
  dattn::block_sparse_backward(config, mask, qv, kv, vv, ov, lv, gv, dqv, dkv, dvv, options);
}

// Ring steps (the backward's two sweeps), with the same configuration arguments as forward.
dattn::DilatedConfig ring_config(const std::vector<std::int64_t>& segment_lengths,
                                 const std::vector<std::int64_t>& dilation_rates, const std::string& mode, bool causal,
                                 std::optional<double> scale, const std::optional<ViewSpec>& key_padding_mask,
                                 double dropout_p, std::uint64_t dropout_seed) {
  return make_call(segment_lengths, dilation_rates, mode, causal, scale, key_padding_mask, dropout_p, dropout_seed, 0,
                   false, "automatic", 0, std::nullopt, false)
      .config;
}

// A named pattern's dense [nb, nb] mask as a flat list of 0/1 (Python makes it a bool tensor).
std::vector<std::uint8_t> flat(const dattn::Tensor& mask) {
  const auto* bits = mask.data<std::uint8_t>();
  return std::vector<std::uint8_t>(bits, bits + mask.numel());
}

double forward_flops(const std::vector<std::int64_t>& segment_lengths,
                     const std::vector<std::int64_t>& dilation_rates, const std::string& mode,
                     bool causal, std::int64_t batch, std::int64_t seqlen, std::int64_t heads,
                     std::int64_t head_dim) {
  dattn::DilatedConfig config;
  config.segment_lengths = segment_lengths;
  config.dilation_rates = dilation_rates;
  config.mode = to_mode(mode);
  config.causal = causal;
  return dattn::forward_flops(config, batch, seqlen, heads, head_dim);
}

// Packed variable-length batches: the call's arguments plus (cu_seqlens, max_seqlen, validate).
dattn::PackedSequences packed(const ViewSpec& cu_seqlens, std::int64_t max_seqlen, bool validate) {
  return {to_view(cu_seqlens, "cu_seqlens"), max_seqlen, validate};
}

void forward_varlen(const ViewSpec& q, const ViewSpec& k, const ViewSpec& v, const ViewSpec& out, const ViewSpec& lse,
                    const ViewSpec& cu_seqlens, std::int64_t max_seqlen, bool validate,
                    const std::vector<std::int64_t>& segment_lengths, const std::vector<std::int64_t>& dilation_rates,
                    const std::string& mode, bool causal, std::optional<double> scale, double dropout_p,
                    std::uint64_t dropout_seed, const std::string& backend, std::uintptr_t stream) {
  const Call call = make_call(segment_lengths, dilation_rates, mode, causal, scale, std::nullopt, dropout_p,
                              dropout_seed, 0, false, backend, stream, std::nullopt, false);
  const auto sequences = packed(cu_seqlens, max_seqlen, validate);
  const auto qv = to_view(q, "q"), kv = to_view(k, "k"), vv = to_view(v, "v");
  const auto ov = to_view(out, "out"), lv = to_view(lse, "lse");
  nb::gil_scoped_release release;
  dattn::forward_varlen(call.config, sequences, qv, kv, vv, ov, lv, call.options);
}

void backward_varlen(const ViewSpec& q, const ViewSpec& k, const ViewSpec& v, const ViewSpec& out, const ViewSpec& lse,
                     const ViewSpec& dout, const ViewSpec& dq, const ViewSpec& dk, const ViewSpec& dv,
                     const ViewSpec& cu_seqlens, std::int64_t max_seqlen, bool validate,
                     const std::vector<std::int64_t>& segment_lengths, const std::vector<std::int64_t>& dilation_rates,
                     const std::string& mode, bool causal, std::optional<double> scale, double dropout_p,
                     std::uint64_t dropout_seed, const std::string& backend, std::uintptr_t stream,
                     std::uintptr_t workspace, std::size_t workspace_bytes, bool deterministic) {
  Call call = make_call(segment_lengths, dilation_rates, mode, causal, scale, std::nullopt, dropout_p,
                        dropout_seed, 0, false, backend, stream, std::nullopt, false);
  set_backward_options(call.options, workspace, workspace_bytes, deterministic);
  const auto sequences = packed(cu_seqlens, max_seqlen, validate);
  const auto qv = to_view(q, "q"), kv = to_view(k, "k"), vv = to_view(v, "v");
  const auto ov = to_view(out, "out"), lv = to_view(lse, "lse"), gv = to_view(dout, "dout");
  const auto dqv = to_view(dq, "dq"), dkv = to_view(dk, "dk"), dvv = to_view(dv, "dv");
  nb::gil_scoped_release release;
  dattn::backward_varlen(call.config, sequences, qv, kv, vv, ov, lv, gv, dqv, dkv, dvv, call.options);
}

// (pattern_type, window, global_blocks, rates) of a SparsePatternConfig without segments.
using PatternSpec = std::tuple<std::string, std::int64_t, std::int64_t, std::vector<std::int64_t>>;
dattn::SparsePattern to_pattern(const PatternSpec& spec) {
  const auto& [type, window, global_blocks, rates] = spec;
  dattn::SparsePattern pattern;
  if (type == "local_window") pattern.kind = dattn::SparsePattern::Kind::local_window;
  else if (type == "dilated_sparse") pattern.kind = dattn::SparsePattern::Kind::dilated_sparse;
  else if (type == "global_local") pattern.kind = dattn::SparsePattern::Kind::global_local;
  else throw dattn::Error("pattern_type = '" + type + "'; expected local_window, dilated_sparse or global_local");
  pattern.window = window;
  pattern.global_blocks = global_blocks;
  pattern.rates = rates;
  return pattern;
}

void block_sparse_forward_varlen(const PatternSpec& pattern, const ViewSpec& q, const ViewSpec& k, const ViewSpec& v,
                                 const ViewSpec& out, const ViewSpec& lse, const ViewSpec& cu_seqlens,
                                 std::int64_t max_seqlen, bool validate, std::int64_t block_size, bool causal,
                                 std::optional<double> scale, double dropout_p, std::uint64_t dropout_seed) {
  const auto config = block_sparse_config(block_size, causal, scale, std::nullopt, dropout_p, dropout_seed);
  const auto sequences = packed(cu_seqlens, max_seqlen, validate);
  const auto qv = to_view(q, "q"), kv = to_view(k, "k"), vv = to_view(v, "v");
  const auto ov = to_view(out, "out"), lv = to_view(lse, "lse");
  const dattn::SparsePattern named = to_pattern(pattern);
  nb::gil_scoped_release release;
  dattn::block_sparse_forward_varlen(config, named, sequences, qv, kv, vv, ov, lv);
}

void block_sparse_backward_varlen(const PatternSpec& pattern, const ViewSpec& q, const ViewSpec& k, const ViewSpec& v,
                                  const ViewSpec& out, const ViewSpec& lse, const ViewSpec& dout, const ViewSpec& dq,
                                  const ViewSpec& dk, const ViewSpec& dv, const ViewSpec& cu_seqlens,
                                  std::int64_t max_seqlen, bool validate, std::int64_t block_size, bool causal,
                                  std::optional<double> scale, double dropout_p, std::uint64_t dropout_seed) {
  const auto config = block_sparse_config(block_size, causal, scale, std::nullopt, dropout_p, dropout_seed);
  const auto sequences = packed(cu_seqlens, max_seqlen, validate);
  const auto qv = to_view(q, "q"), kv = to_view(k, "k"), vv = to_view(v, "v");
  const auto ov = to_view(out, "out"), lv = to_view(lse, "lse"), gv = to_view(dout, "dout");
  const auto dqv = to_view(dq, "dq"), dkv = to_view(dk, "dk"), dvv = to_view(dv, "dv");
  const dattn::SparsePattern named = to_pattern(pattern);
  nb::gil_scoped_release release;
  dattn::block_sparse_backward_varlen(config, named, sequences, qv, kv, vv, ov, lv, gv, dqv, dkv, dvv);
}

void forward_with_kvcache(const ViewSpec& q, const ViewSpec& k_cache, const ViewSpec& v_cache,
                          const ViewSpec& cache_seqlens, const std::optional<ViewSpec>& k_new,
                          const std::optional<ViewSpec>& v_new, const ViewSpec& out, const ViewSpec& lse, bool validate,
                          const std::vector<std::int64_t>& segment_lengths,
                          const std::vector<std::int64_t>& dilation_rates, const std::string& mode,
                          std::optional<double> scale, const std::string& backend, std::uintptr_t stream,
                          std::uintptr_t workspace, std::size_t workspace_bytes) {
  Call call = make_call(segment_lengths, dilation_rates, mode, true, scale, std::nullopt, 0.0, 0, 0, false, backend,
                        stream, std::nullopt, false);
  set_workspace(call.options, workspace, workspace_bytes);
  dattn::KeyValueCache cache{to_view(k_cache, "k_cache"), to_view(v_cache, "v_cache"),
                             to_view(cache_seqlens, "cache_seqlens")};
  if (k_new) cache.k_new = to_view(*k_new, "k_new");
  if (v_new) cache.v_new = to_view(*v_new, "v_new");
  cache.validate = validate;
  const auto qv = to_view(q, "q"), ov = to_view(out, "out"), lv = to_view(lse, "lse");
  nb::gil_scoped_release release;
  dattn::forward_with_kvcache(call.config, cache, qv, ov, lv, call.options);
}

std::size_t decode_workspace_bytes(const ViewSpec& q, const ViewSpec& k_cache, const ViewSpec& v_cache,
                                   const ViewSpec& cache_seqlens, const std::vector<std::int64_t>& segment_lengths,
                                   const std::vector<std::int64_t>& dilation_rates, const std::string& mode,
                                   std::optional<double> scale) {
  const Call call = make_call(segment_lengths, dilation_rates, mode, true, scale, std::nullopt, 0.0, 0, 0, false,
                              "automatic", 0, std::nullopt, false);
  const dattn::KeyValueCache cache{to_view(k_cache, "k_cache"), to_view(v_cache, "v_cache"),
                                   to_view(cache_seqlens, "cache_seqlens")};
  return dattn::decode_workspace_bytes(call.config, cache, to_view(q, "q"), call.options);
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "dattn C++ core: dilated attention forward and backward over raw tensor descriptions";

  m.attr("__version__") = DATTN_PYTHON_VERSION;
  m.attr("has_cuda") = bool(DATTN_PYTHON_WITH_CUDA);
  m.attr("DTYPE_FLOAT32") = int(dattn::DType::float32);
  m.attr("DTYPE_BFLOAT16") = int(dattn::DType::bfloat16);
  m.attr("DTYPE_FLOAT16") = int(dattn::DType::float16);
  m.attr("DTYPE_FLOAT64") = int(dattn::DType::float64);
  m.attr("DTYPE_BOOL") = int(dattn::DType::boolean);
  m.attr("DEVICE_CPU") = int(dattn::DeviceType::cpu);
  m.attr("DEVICE_CUDA") = int(dattn::DeviceType::cuda);

  m.def("forward", &forward, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "segment_lengths"_a,
        "dilation_rates"_a, "mode"_a, "causal"_a, "scale"_a.none(), "key_padding_mask"_a.none(),
        "dropout_p"_a, "dropout_seed"_a, "dropout_offset"_a, "use_tf32"_a, "backend"_a, "stream"_a,
        "position_index"_a.none() = nb::none(), "ring_step"_a.none() = nb::none(), "position_index_checked"_a = false,
        "Writes out [B, N, H, D] and lse [B, H, N] (float32) of dilated attention (docs/semantics.md).");
  m.def("backward", &backward, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "dout"_a, "dq"_a, "dk"_a,
        "dv"_a, "segment_lengths"_a, "dilation_rates"_a, "mode"_a, "causal"_a, "scale"_a.none(),
        "key_padding_mask"_a.none(), "dropout_p"_a, "dropout_seed"_a, "dropout_offset"_a,
        "use_tf32"_a, "backend"_a, "stream"_a, "position_index"_a.none() = nb::none(), "workspace"_a = 0,
        "workspace_bytes"_a = 0, "position_index_checked"_a = false, "deterministic"_a = false,
        "Writes dq, dk, dv given dout and the out and lse that forward wrote (CUDA: a workspace of "
        "B*H*N float32 lets it compute delta once, before the kernel; deterministic: bitwise-reproducible "
        "gradients, never dQ by atomics).");
  m.def("forward_varlen", &forward_varlen, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "cu_seqlens"_a, "max_seqlen"_a,
        "validate"_a, "segment_lengths"_a, "dilation_rates"_a, "mode"_a, "causal"_a, "scale"_a.none(), "dropout_p"_a,
        "dropout_seed"_a, "backend"_a, "stream"_a,
        "Dilated attention of a packed batch: out [T, H, D] and lse [H, T] of each sequence alone.");
  m.def("backward_varlen", &backward_varlen, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "dout"_a, "dq"_a, "dk"_a, "dv"_a,
        "cu_seqlens"_a, "max_seqlen"_a, "validate"_a, "segment_lengths"_a, "dilation_rates"_a, "mode"_a, "causal"_a,
        "scale"_a.none(), "dropout_p"_a, "dropout_seed"_a, "backend"_a, "stream"_a, "workspace"_a = 0,
        "workspace_bytes"_a = 0, "deterministic"_a = false);
  m.def("block_sparse_forward_varlen", &block_sparse_forward_varlen, "pattern"_a, "q"_a, "k"_a, "v"_a, "out"_a,
        "lse"_a, "cu_seqlens"_a, "max_seqlen"_a, "validate"_a, "block_size"_a, "causal"_a, "scale"_a.none(),
        "dropout_p"_a, "dropout_seed"_a);
  m.def("block_sparse_backward_varlen", &block_sparse_backward_varlen, "pattern"_a, "q"_a, "k"_a, "v"_a, "out"_a,
        "lse"_a, "dout"_a, "dq"_a, "dk"_a, "dv"_a, "cu_seqlens"_a, "max_seqlen"_a, "validate"_a, "block_size"_a,
        "causal"_a, "scale"_a.none(), "dropout_p"_a, "dropout_seed"_a);
  m.def("forward_with_kvcache", &forward_with_kvcache, "q"_a, "k_cache"_a, "v_cache"_a, "cache_seqlens"_a,
        "k_new"_a.none(), "v_new"_a.none(), "out"_a, "lse"_a, "validate"_a, "segment_lengths"_a, "dilation_rates"_a,
        "mode"_a, "scale"_a.none(), "backend"_a, "stream"_a, "workspace"_a = 0, "workspace_bytes"_a = 0,
        "Decoding with a key/value cache: out [B, Tn, H, D] and lse [B, H, Tn] of the new tokens (causal).");
  m.def("decode_workspace_bytes", &decode_workspace_bytes, "q"_a, "k_cache"_a, "v_cache"_a, "cache_seqlens"_a,
        "segment_lengths"_a, "dilation_rates"_a, "mode"_a, "scale"_a.none(),
        "Bytes of scratch forward_with_kvcache's CUDA split-KV kernels take (0 where they do not run).");
  m.def("forward_flops", &forward_flops, "segment_lengths"_a, "dilation_rates"_a, "mode"_a,
        "causal"_a, "batch"_a, "seqlen"_a, "heads"_a, "head_dim"_a,
        "Forward FLOPs as docs/benchmarks.md counts them.");
  m.attr("DTYPE_INT64") = int(dattn::DType::int64);
  m.attr("DTYPE_INT32") = int(dattn::DType::int32);

  nb::class_<dattn::BlockSparseMask>(m, "BlockSparseMask",
                                     "A block mask in CSR form with its transpose, built once per mask.")
      .def_static("from_dense", [](const ViewSpec& mask) { return dattn::BlockSparseMask::from_dense(to_view(mask, "block_mask")); },
                  "mask"_a, "From a dense bool [nqb, nkb] or [H, nqb, nkb] cpu tensor.")
      .def_static("from_csr", &dattn::BlockSparseMask::from_csr, "heads"_a, "query_blocks"_a, "key_blocks"_a,
                  "row_offsets"_a, "column_indices"_a)
      .def_prop_ro("heads", &dattn::BlockSparseMask::heads)
      .def_prop_ro("query_blocks", &dattn::BlockSparseMask::query_blocks)
      .def_prop_ro("key_blocks", &dattn::BlockSparseMask::key_blocks)
      .def_prop_ro("allowed_pairs", &dattn::BlockSparseMask::allowed_pairs)
      .def_prop_ro("row_offsets", &dattn::BlockSparseMask::row_offsets)
      .def_prop_ro("columns", &dattn::BlockSparseMask::columns)
      .def_prop_ro("device", [](const dattn::BlockSparseMask& mask) { return dattn::device_name(mask.device()); },
                   "Where the CSR arrays live: 'cpu' or 'cuda:i'.")
      .def("to_cuda", [](const dattn::BlockSparseMask& mask, int index) {
        return mask.to_device({dattn::DeviceType::cuda, index});
      }, "index"_a, "A copy whose CSR arrays also live on CUDA device `index` (uploaded once).");
  m.def("block_sparse_forward", &block_sparse_forward, "mask"_a, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a,
        "block_size"_a, "causal"_a, "scale"_a.none(), "key_padding_mask"_a.none(), "dropout_p"_a, "dropout_seed"_a,
        "stream"_a = 0);
  m.def("block_sparse_backward", &block_sparse_backward, "mask"_a, "q"_a, "k"_a, "v"_a, "out"_a, "lse"_a, "dout"_a,
        "dq"_a, "dk"_a, "dv"_a, "block_size"_a, "causal"_a, "scale"_a.none(), "key_padding_mask"_a.none(),
        "dropout_p"_a, "dropout_seed"_a, "stream"_a = 0, "workspace"_a = 0, "workspace_bytes"_a = 0);
  m.def("local_window_pattern", [](std::int64_t nb, std::int64_t window, std::int64_t block_size) {
    return flat(dattn::local_window_pattern(nb, window, block_size));
  }, "num_blocks"_a, "window"_a, "block_size"_a);
  m.def("dilated_sparse_pattern", [](std::int64_t nb, const std::vector<std::int64_t>& rates) {
    return flat(dattn::dilated_sparse_pattern(nb, rates));
  }, "num_blocks"_a, "rates"_a);
  m.def("global_local_pattern", [](std::int64_t nb, std::int64_t window, std::int64_t global_blocks,
                                   std::int64_t block_size) {
    return flat(dattn::global_local_pattern(nb, window, global_blocks, block_size));
  }, "num_blocks"_a, "window"_a, "global_blocks"_a, "block_size"_a);
  m.def("dilated_pattern", [](std::int64_t seqlen, const std::vector<std::int64_t>& w,
                              const std::vector<std::int64_t>& r, std::int64_t block_size) {
    return flat(dattn::dilated_pattern(seqlen, w, r, block_size));
  }, "seqlen"_a, "segment_lengths"_a, "dilation_rates"_a, "block_size"_a);
  m.def("ring_rows", [](std::int64_t N, int P, int rank, const std::string& layout) {
    if (layout != "contiguous" && layout != "zigzag")
      throw dattn::Error("layout = '" + layout + "'; expected 'contiguous' or 'zigzag'");
    return dattn::ring_rows(N, P, rank, layout == "zigzag" ? dattn::Layout::zigzag : dattn::Layout::contiguous);
  }, "global_length"_a, "ranks"_a, "rank"_a, "layout"_a);
  m.def("ring_transfer_entries", [](const std::vector<std::int64_t>& w, const std::vector<std::int64_t>& r,
                                    const std::string& mode, bool causal, const std::string& layout, std::int64_t N,
                                    int P, std::int64_t H, int source, int dest) {
    const auto config = ring_config(w, r, mode, causal, std::nullopt, std::nullopt, 0.0, 0);
    return dattn::ring_transfer_entries(config, layout == "zigzag" ? dattn::Layout::zigzag : dattn::Layout::contiguous,
                                        N, P, H, source, dest);
  }, "segment_lengths"_a, "dilation_rates"_a, "mode"_a, "causal"_a, "layout"_a, "global_length"_a, "ranks"_a,
        "heads"_a, "source"_a, "dest"_a);
  m.def("merge_partial", [](const ViewSpec& out, const ViewSpec& lse, const ViewSpec& step_out, const ViewSpec& step_lse) {
    dattn::merge_partial(to_view(out, "out"), to_view(lse, "lse"), to_view(step_out, "step_out"),
                         to_view(step_lse, "step_lse"));
  }, "out"_a, "lse"_a, "step_out"_a, "step_lse"_a);
  m.def("ring_query_gradients",
        [](const RingStepSpec& step, const ViewSpec& q, const ViewSpec& k, const ViewSpec& v, const ViewSpec& dout,
           const ViewSpec& lse, const ViewSpec& sum_gk, const ViewSpec& sum_pk, const ViewSpec& delta,
           const std::vector<std::int64_t>& w, const std::vector<std::int64_t>& r, const std::string& mode, bool causal,
           std::optional<double> scale, const std::optional<ViewSpec>& mask, double dropout_p, std::uint64_t seed) {
          const auto config = ring_config(w, r, mode, causal, scale, mask, dropout_p, seed);
          dattn::ring_query_gradients(config, to_step(step), to_view(q, "q"), to_view(k, "k"), to_view(v, "v"),
                                      to_view(dout, "dout"), to_view(lse, "lse"),
                                      {to_view(sum_gk, "sum_gk"), to_view(sum_pk, "sum_pk"), to_view(delta, "delta")});
        });
  m.def("ring_finish_query_gradients",
        [](const ViewSpec& sum_gk, const ViewSpec& sum_pk, const ViewSpec& delta, const ViewSpec& dq,
           const std::vector<std::int64_t>& w, const std::vector<std::int64_t>& r, std::optional<double> scale) {
          dattn::DilatedConfig config;
          config.segment_lengths = w;
          config.dilation_rates = r;
          config.scale = scale;
          dattn::ring_finish_query_gradients(
              config, {to_view(sum_gk, "sum_gk"), to_view(sum_pk, "sum_pk"), to_view(delta, "delta")}, to_view(dq, "dq"));
        });
  m.def("ring_key_gradients",
        [](const RingStepSpec& step, const ViewSpec& q, const ViewSpec& k, const ViewSpec& v, const ViewSpec& dout,
           const ViewSpec& lse, const ViewSpec& delta, const ViewSpec& dk, const ViewSpec& dv,
           const std::vector<std::int64_t>& w, const std::vector<std::int64_t>& r, const std::string& mode, bool causal,
           std::optional<double> scale, const std::optional<ViewSpec>& mask, double dropout_p, std::uint64_t seed) {
          const auto config = ring_config(w, r, mode, causal, scale, mask, dropout_p, seed);
          dattn::ring_key_gradients(config, to_step(step), to_view(q, "q"), to_view(k, "k"), to_view(v, "v"),
                                    to_view(dout, "dout"), to_view(lse, "lse"), to_view(delta, "delta"),
                                    to_view(dk, "dk"), to_view(dv, "dv"));
        });

  m.def("ring_forward_step",
        [](const RingStepSpec& step, const ViewSpec& q, const ViewSpec& k, const ViewSpec& v, const ViewSpec& out,
           const ViewSpec& lse, const std::vector<std::int64_t>& w, const std::vector<std::int64_t>& r,
           const std::string& mode, bool causal, std::optional<double> scale, const std::optional<ViewSpec>& mask,
           double dropout_p, std::uint64_t seed, std::uintptr_t stream) {
          const auto config = ring_config(w, r, mode, causal, scale, mask, dropout_p, seed);
          dattn::ring_forward_step(config, to_step(step), to_view(q, "q"), to_view(k, "k"), to_view(v, "v"),
                                   to_view(out, "out"), to_view(lse, "lse"), reinterpret_cast<void*>(stream));
        });
  m.def("ring_step_gradients",
        [](const RingStepSpec& step, const ViewSpec& q, const ViewSpec& k, const ViewSpec& v, const ViewSpec& dout,
           const ViewSpec& lse, const ViewSpec& delta, const ViewSpec& dq, const ViewSpec& dk, const ViewSpec& dv,
           const std::vector<std::int64_t>& w, const std::vector<std::int64_t>& r, const std::string& mode, bool causal,
           std::optional<double> scale, const std::optional<ViewSpec>& mask, double dropout_p, std::uint64_t seed,
           std::uintptr_t stream) {
          const auto config = ring_config(w, r, mode, causal, scale, mask, dropout_p, seed);
          dattn::ring_step_gradients(config, to_step(step), to_view(q, "q"), to_view(k, "k"), to_view(v, "v"),
                                     to_view(dout, "dout"), to_view(lse, "lse"), to_view(delta, "delta"),
                                     to_view(dq, "dq"), to_view(dk, "dk"), to_view(dv, "dv"),
                                     reinterpret_cast<void*>(stream));
        });

  m.def("block_sparse_ring_forward_step",
        [](const dattn::BlockSparseMask& mask, const RingStepSpec& step, const ViewSpec& q, const ViewSpec& k,
           const ViewSpec& v, const ViewSpec& out, const ViewSpec& lse, std::int64_t block_size, bool causal,
           std::optional<double> scale, const std::optional<ViewSpec>& key_padding_mask, double dropout_p,
           std::uint64_t seed, std::uintptr_t stream) {
          const auto config = block_sparse_config(block_size, causal, scale, key_padding_mask, dropout_p, seed);
          dattn::block_sparse_ring_forward_step(config, mask, to_step(step), to_view(q, "q"), to_view(k, "k"),
                                                to_view(v, "v"), to_view(out, "out"), to_view(lse, "lse"),
                                                reinterpret_cast<void*>(stream));
        });
  m.def("block_sparse_ring_step_gradients",
        [](const dattn::BlockSparseMask& mask, const RingStepSpec& step, const ViewSpec& q, const ViewSpec& k,
           const ViewSpec& v, const ViewSpec& dout, const ViewSpec& lse, const ViewSpec& delta, const ViewSpec& dq,
           const ViewSpec& dk, const ViewSpec& dv, std::int64_t block_size, bool causal, std::optional<double> scale,
           const std::optional<ViewSpec>& key_padding_mask, double dropout_p, std::uint64_t seed,
           std::uintptr_t stream) {
          const auto config = block_sparse_config(block_size, causal, scale, key_padding_mask, dropout_p, seed);
          dattn::block_sparse_ring_step_gradients(config, mask, to_step(step), to_view(q, "q"), to_view(k, "k"),
                                                  to_view(v, "v"), to_view(dout, "dout"), to_view(lse, "lse"),
                                                  to_view(delta, "delta"), to_view(dq, "dq"), to_view(dk, "dk"),
                                                  to_view(dv, "dv"), reinterpret_cast<void*>(stream));
        });

  m.def("hilbert_grid_order", &dattn::hilbert_grid_order, "height"_a, "width"_a,
        "Token indices row * width + column in generalized Hilbert curve order.");
  m.def("hilbert_sequence_order", &dattn::hilbert_sequence_order, "length"_a,
        "The plain-sequence layout of docs/semantics.md (width ceil(sqrt(N)), empty cells skipped).");

  m.def("cpu_isa", [] { return std::string(dattn::cpu_isa_name(dattn::active_cpu_isa())); },
        "The SIMD path the CPU kernels run (DATTN_CPU_ISA forces one).");
  m.def("cpu_isas_supported", [] {
    std::vector<std::string> names;
    for (auto isa : {dattn::CpuIsa::scalar, dattn::CpuIsa::avx2, dattn::CpuIsa::avx512,
                     dattn::CpuIsa::avx512_bf16, dattn::CpuIsa::amx_bf16}) {
      if (dattn::cpu_supports(isa)) names.emplace_back(dattn::cpu_isa_name(isa));
    }
    return names;
  }, "The compiled CPU SIMD paths this CPU can run.");
  // What the build has (python/CMakeLists.txt passes these from the resolved CMake options).
  m.attr("cuda_architectures") = std::string(DATTN_PYTHON_CUDA_ARCHS);
  m.def("cuda_kernel_generations", [] {
    std::vector<std::string> names;
    for (const dattn::CudaKernels k : dattn::cuda_kernel_generations_built())
      names.push_back(k == dattn::CudaKernels::sm90 ? "sm90" : "sm80");
    return names;
  });
  m.attr("has_mpi") = bool(DATTN_PYTHON_WITH_MPI);
  m.attr("has_nccl") = bool(DATTN_PYTHON_WITH_NCCL);
}
