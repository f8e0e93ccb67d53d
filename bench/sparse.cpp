// dattn-bench --sparse: the sparse variants on the CPU.
//  - Block-sparse attention at docs/benchmarks.md's N = 2048 shape (B2 H12 D64, block 64, local_window 256)
//    beside torch's SDPA with the same mask as a dense token mask (bench/sparse_peers.py, run in
//    the same process tree), and at a long shape scaled to this CPU (N = 16384, block 128,
//    local_window 2048; docs/benchmarks.md's is N = 65536, a GPU shape).
//  - Hilbert order: dilated attention with the Hilbert index map beside the same call without
//    it (the map's cost), and the locality that buys: the mean bounding box, on the 2-D grid, of
//    the tokens one segment selects, row-major against Hilbert order.
// Each dattn call is first checked against the float64 reference (whole tensors, forward and
// backward; the long shape on the same mask at N = 4096).
#include "sparse.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>

#include "check.hpp"
#include "dattn/dattn.hpp"
#include "memhook.hpp"
#include "stats.hpp"

namespace dattn_bench {
namespace {

using dattn::DType;
using dattn::Tensor;
using dattn::TensorView;
using json = nlohmann::json;

struct Timed {
  Stat fwd_ms, fwdbwd_ms;
  double extra_bytes = 0;
};

// forward + backward of `run` on the tensors of t, and on float64 copies (the reference); the
// worst relative L2 of out, dq, dk, dv.
using Call = std::function<void(const CallTensors&)>;
double check(const Call& run, const CallTensors& t) {
  run(t);
  CallTensors ref;
  ref.q = to_float64(t.q), ref.k = to_float64(t.k), ref.v = to_float64(t.v), ref.dout = to_float64(t.dout);
  for (Tensor* x : {&ref.out, &ref.dq, &ref.dk, &ref.dv}) *x = Tensor::empty({t.q.view().shape[0], t.q.view().shape[1], t.q.view().shape[2], t.q.view().shape[3]}, DType::float64);
  ref.lse = Tensor::empty({t.q.view().shape[0], t.q.view().shape[2], t.q.view().shape[1]}, DType::float32);
  run(ref);
  return std::max({rel_l2(t.out, ref.out), rel_l2(t.dq, ref.dq), rel_l2(t.dk, ref.dk), rel_l2(t.dv, ref.dv)});
}

struct Row {
  std::string label, shape;
  DType dtype;
  double flops = 0, error = 0;
  bool ok = true;
  Timed timed;
  std::string note;
};

std::string ms_cell(const Stat& s) {
  char text[64];
  std::snprintf(text, sizeof text, "%.3g [%.3g–%.3g]", s.median, s.min, s.max);
  return text;
}

Row time_row(const std::string& label, const std::string& shape, DType dtype, double flops, const Call& forward,
             const Call& backward, const CallTensors& t, double error, const SparseBenchSettings& s) {
  Row row{label, shape, dtype, flops, error, error <= l2_bar(dtype), {}, ""};
  if (!row.ok) return row;
  const Measured fwd = measure([&] { forward(t); }, s.warmup, s.repeats);
  const Measured both = measure([&] { forward(t), backward(t); }, s.warmup, s.repeats);
  row.timed.fwd_ms = fwd.ms, row.timed.fwdbwd_ms = both.ms;
  row.timed.extra_bytes = std::max(fwd.extra_bytes, both.extra_bytes);
  return row;
}

// The SDPA peer on the same block mask, or a row saying why not.
Row sdpa_peer(const std::string& shape, const Tensor& block_mask, std::int64_t B, std::int64_t N, std::int64_t H,
              std::int64_t D, std::int64_t block, DType dtype, double flops, const SparseBenchSettings& s) {
  Row row{"torch SDPA, dense token mask", shape, dtype, flops, 0, true, {}, ""};
  if (s.peer_python.empty() || s.peer_script.empty()) {
    row.ok = false, row.note = "skipped: no torch 2 Python or bench/sparse_peers.py";
    return row;
  }
  const std::string mask_path = "/tmp/dattn-bench-mask-" + std::to_string(::getpid()) + ".bin";
  std::ofstream(mask_path, std::ios::binary).write(block_mask.data<char>(), block_mask.numel());
  const std::string command = s.peer_python + " " + s.peer_script + " --B " + std::to_string(B) + " --N " +
                              std::to_string(N) + " --H " + std::to_string(H) + " --D " + std::to_string(D) +
                              " --block " + std::to_string(block) + " --repeats " + std::to_string(s.repeats) +
                              " --warmup " + std::to_string(s.warmup) + " --threads " + std::to_string(s.threads) +
                              " --dtype " + dattn::dtype_name(dtype) + " --mask " + mask_path;
  std::string output;
  if (FILE* pipe = ::popen(command.c_str(), "r")) {
    char buffer[4096];
    while (std::fgets(buffer, sizeof buffer, pipe)) output += buffer;
    ::pclose(pipe);
  }
  std::remove(mask_path.c_str());
  const json r = json::parse(output, nullptr, false);
  if (r.is_discarded() || r.contains("skipped")) {
    row.ok = false, row.note = r.is_discarded() ? "failed: " + output.substr(0, 200) : r["skipped"].get<std::string>();
    return row;
  }
  row.error = r["max_rel_err"].get<double>();
  row.label += " (torch " + r["torch_version"].get<std::string>() + ")";
  for (auto [stat, key] : {std::pair{&row.timed.fwd_ms, "fwd_ms"}, std::pair{&row.timed.fwdbwd_ms, "fwdbwd_ms"}}) {
    stat->median = r[key]["median"], stat->min = r[key]["min"], stat->max = r[key]["max"];
    stat->samples = r[key]["samples"].get<std::vector<double>>();
  }
  row.ok = row.error <= l2_bar(dtype);
  if (!row.ok) row.note = "WRONG";
  return row;
}

struct BlockShape {
  std::string name;
  std::int64_t B, N, H, D, block, window, check_N;
  std::vector<DType> dtypes;
  bool peer;
};

void block_sparse_rows(const BlockShape& shape, const SparseBenchSettings& s, std::vector<Row>& rows) {
  for (const DType dtype : shape.dtypes) {
    auto mask_for = [&](std::int64_t N) {
      return dattn::BlockSparseMask::from_dense(
          dattn::local_window_pattern((N + shape.block - 1) / shape.block, shape.window, shape.block));
    };
    dattn::BlockSparseConfig config;
    config.block_size = shape.block;
    std::fprintf(stderr, "sparse: block-sparse %s %s\n", shape.name.c_str(), dattn::dtype_name(dtype));
    auto calls = [&](const dattn::BlockSparseMask& mask) {
      Call forward = [&, mask](const CallTensors& t) { dattn::block_sparse_forward(config, mask, t.q, t.k, t.v, t.out, t.lse); };
      Call backward = [&, mask](const CallTensors& t) {
        dattn::block_sparse_backward(config, mask, t.q, t.k, t.v, t.out, t.lse, t.dout, t.dq, t.dk, t.dv);
      };
      return std::pair{forward, backward};
    };
    Problem small{"check", shape.B, shape.check_N, shape.H, shape.D, {}};
    const auto [check_forward, check_backward] = calls(mask_for(shape.check_N));
    const double error = check([&](const CallTensors& t) { check_forward(t), check_backward(t); },
                               CallTensors::make(small, dtype, s.seed));
    const dattn::BlockSparseMask mask = mask_for(shape.N);
    const double flops = dattn::block_sparse_forward_flops(mask, shape.block, false, shape.B, shape.N, shape.H, shape.D);
    const auto [forward, backward] = calls(mask);
    Problem full{shape.name, shape.B, shape.N, shape.H, shape.D, {}};
    const CallTensors t = CallTensors::make(full, dtype, s.seed);
    char label[128];
    std::snprintf(label, sizeof label, "B%lld N%lld H%lld D%lld, block %lld, local_window %lld (%.1f%%)", (long long)shape.B,
                  (long long)shape.N, (long long)shape.H, (long long)shape.D, (long long)shape.block, (long long)shape.window,
                  100.0 * double(mask.allowed_pairs()) / double(mask.query_blocks() * mask.key_blocks()));
    rows.push_back(time_row("dattn block-sparse", label, dtype, flops, forward, backward, t, error, s));
    if (shape.peer) {
      const Tensor dense = dattn::local_window_pattern(mask.query_blocks(), shape.window, shape.block);
      rows.push_back(sdpa_peer(label, dense, shape.B, shape.N, shape.H, shape.D, shape.block, dtype, flops, s));
    }
  }
}

// Mean bounding box (rows × columns of the grid) of the tokens one segment of branch i selects,
// for the tokens visited in `order` (curve position -> token).
std::pair<double, double> mean_extent(const std::vector<std::int64_t>& order, std::int64_t width,
                                      const dattn::DilatedConfig& config) {
  double rows = 0, cols = 0;
  int count = 0;
  const std::int64_t N = std::int64_t(order.size());
  for (std::size_t i = 0; i < config.segment_lengths.size(); ++i) {
    const std::int64_t w = std::min(config.segment_lengths[i], N), r = config.dilation_rates[i], o = std::int64_t(i) % r;
    for (std::int64_t start = 0; start < N; start += w) {
      std::int64_t r0 = N, r1 = -1, c0 = N, c1 = -1;
      for (std::int64_t p = start + o; p < std::min(start + w, N); p += r) {
        const std::int64_t token = order[std::size_t(p)];
        r0 = std::min(r0, token / width), r1 = std::max(r1, token / width);
        c0 = std::min(c0, token % width), c1 = std::max(c1, token % width);
      }
      if (r1 < 0) continue;
      rows += double(r1 - r0 + 1), cols += double(c1 - c0 + 1), ++count;
    }
  }
  return {rows / count, cols / count};
}

void hilbert_rows(const SparseBenchSettings& s, std::vector<Row>& rows, json& locality) {
  const std::int64_t B = 2, grid_h = 32, grid_w = 64, N = grid_h * grid_w, H = 12, D = 64;
  dattn::DilatedConfig config;
  config.segment_lengths = {512, 1024, 2048};
  config.dilation_rates = {1, 2, 4};
  const auto order = dattn::hilbert_grid_order(grid_h, grid_w);
  Tensor index = Tensor::empty({N}, DType::int64);
  std::copy(order.begin(), order.end(), index.data<std::int64_t>());
  std::vector<std::int64_t> identity(static_cast<std::size_t>(N));
  for (std::int64_t i = 0; i < N; ++i) identity[std::size_t(i)] = i;
  const auto [row_major_h, row_major_w] = mean_extent(identity, grid_w, config);
  const auto [hilbert_h, hilbert_w] = mean_extent(order, grid_w, config);
  locality = json::object();
  locality["grid"] = {grid_h, grid_w};
  locality["row_major"] = {row_major_h, row_major_w};
  locality["hilbert"] = {hilbert_h, hilbert_w};

  // The check runs the same config on a 16 × 32 grid (segments scaled by 1/4).
  dattn::DilatedConfig small_config = config;
  for (auto& w : small_config.segment_lengths) w /= 4;
  const auto small_order = dattn::hilbert_grid_order(16, 32);
  Tensor small_index = Tensor::empty({512}, DType::int64);
  std::copy(small_order.begin(), small_order.end(), small_index.data<std::int64_t>());
  for (const DType dtype : {DType::float32, DType::bfloat16}) {
    const double flops = dattn::forward_flops(config, B, N, H, D);
    for (const bool hilbert : {false, true}) {
      std::fprintf(stderr, "sparse: %s dilated attention %s\n", hilbert ? "Hilbert" : "plain", dattn::dtype_name(dtype));
      auto calls = [&](const dattn::DilatedConfig& c, const Tensor* map) {
        dattn::LaunchOptions options;
        if (map) options.position_index = map->view();
        Call forward = [c, options](const CallTensors& t) { dattn::forward(c, t.q, t.k, t.v, t.out, t.lse, options); };
        Call backward = [c, options](const CallTensors& t) {
          dattn::backward(c, t.q, t.k, t.v, t.out, t.lse, t.dout, t.dq, t.dk, t.dv, options);
        };
        return std::pair{forward, backward};
      };
      const auto [check_forward, check_backward] = calls(small_config, hilbert ? &small_index : nullptr);
      const double error = check([&](const CallTensors& t) { check_forward(t), check_backward(t); },
                                 CallTensors::make(Problem{"check", B, 512, H, D, small_config}, dtype, s.seed));
      const auto [forward, backward] = calls(config, hilbert ? &index : nullptr);
      const CallTensors t = CallTensors::make(Problem{"seed", B, N, H, D, config}, dtype, s.seed);
      rows.push_back(time_row(hilbert ? "dattn dilated, Hilbert order (index map)" : "dattn dilated, row-major order",
                              "seed on a 32×64 grid", dtype, flops, forward, backward, t, error, s));
    }
  }
}

}  // namespace

json run_sparse_bench(const SparseBenchSettings& s) {
  std::vector<Row> rows;
  if (s.block_sparse) {
    block_sparse_rows({"N2048", 2, 2048, 12, 64, 64, 256, 2048, {DType::float32, DType::bfloat16}, true}, s, rows);
    block_sparse_rows({"N16384", 1, 16384, 12, 64, 128, 2048, 4096, {DType::bfloat16}, false}, s, rows);
  }
  json locality = {{"grid", {0, 0}}, {"row_major", {0.0, 0.0}}, {"hilbert", {0.0, 0.0}}};
  if (s.hilbert) hilbert_rows(s, rows, locality);

  std::printf("\n## dattn-bench --sparse: %d thread(s), measured fp32 FMA peak %.1f GFLOP/s\n\n", s.threads, s.peak_gflops);
  std::printf("| implementation | shape | dtype | fwd ms (median [min–max]) | fwd GFLOP/s | %% peak | fwd+bwd ms | fwd+bwd GFLOP/s | extra MB | max rel err |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  json out = json::array();
  for (const Row& r : rows) {
    const bool timed = !r.timed.fwd_ms.samples.empty();
    json j = {{"implementation", r.label}, {"shape", r.shape}, {"dtype", dattn::dtype_name(r.dtype)}, {"flops", r.flops},
              {"max_rel_err", r.error}, {"ok", r.ok}, {"note", r.note}};
    if (!timed) {
      std::printf("| %s | %s | %s | %s | — | — | — | — | — | %.1e |\n", r.label.c_str(), r.shape.c_str(), dattn::dtype_name(r.dtype),
                  r.note.empty() ? "WRONG" : r.note.c_str(), r.error);
      out.push_back(j);
      continue;
    }
    const double fwd = r.flops / (r.timed.fwd_ms.median * 1e6), both = 3.5 * r.flops / (r.timed.fwdbwd_ms.median * 1e6);
    std::printf("| %s | %s | %s | %s | %.1f | %.1f | %s | %.1f | %s | %.1e |\n", r.label.c_str(), r.shape.c_str(),
                dattn::dtype_name(r.dtype), ms_cell(r.timed.fwd_ms).c_str(), fwd, 100 * fwd / s.peak_gflops,
                ms_cell(r.timed.fwdbwd_ms).c_str(), both,
                r.label.rfind("dattn", 0) == 0 ? (std::to_string(int(r.timed.extra_bytes / 1e6 + 0.5))).c_str() : "—", r.error);
    j.update({{"fwd_ms", stat_json(r.timed.fwd_ms)}, {"fwdbwd_ms", stat_json(r.timed.fwdbwd_ms)}, {"extra_bytes", r.timed.extra_bytes}});
    out.push_back(j);
  }
  if (s.hilbert)
    std::printf("\nLocality (mean bounding box, grid rows × columns, of the tokens one segment of a branch selects, "
              "seed config on a %lld × %lld grid): row-major %.1f × %.1f, Hilbert %.1f × %.1f.\n",
              (long long)locality["grid"][0], (long long)locality["grid"][1], locality["row_major"][0].get<double>(),
              locality["row_major"][1].get<double>(), locality["hilbert"][0].get<double>(), locality["hilbert"][1].get<double>());
  std::printf("Checks: every dattn row's forward and backward against the float64 reference over whole tensors "
              "(N16384: the same mask pattern at N = 4096; Hilbert: the seed config scaled to a 16 × 32 grid); the "
              "SDPA peer's out against a float64 masked softmax. GFLOP/s: docs/benchmarks.md's count over allowed pairs "
              "(fwd+bwd 3.5×). Extra MB: heap high-water mark above the heap before the call.\n");
  return {{"rows", out}, {"locality", locality}};
}

}  // namespace dattn_bench
