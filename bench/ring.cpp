// dattn-bench --ring: ring attention (dattn::ring_forward / ring_backward) over P ranks that are
// threads of this process (make_in_process_group), on docs/benchmarks.md's geo(N): the largest segment spans
// the sequence, so keys must travel. Beside it, in the same run, what the LongNet reference code
// does: every rank all-gathers k and v, then attends over the whole sequence. Reported per rank:
// bytes sent, peak heap (the process's heap peak above the inputs and outputs, divided by P: the
// ranks are symmetric threads), time waiting for messages; and the wall time of the P ranks
// sharing this machine's cores. Every ring result is first compared with single-process attention.
#include "ring.hpp"

#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>

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

constexpr std::int64_t kB = 1, kH = 12, kD = 64, kBase = 2048;

// Rank `rank`'s rows (along dim: 1 for [B, N, H, D], 2 for lse) in the contiguous layout.
TensorView rows_of(const Tensor& global, int P, int rank, int dim = 1) {
  const std::int64_t n = global.view().shape[dim] / P;
  return global.view().narrow(dim, rank * n, n);
}

// One measured call of all P ranks: the slowest rank's wall time, the heap peak per rank and each
// rank's RingStats.
struct RankRun {
  double ms = 0, peak_bytes_per_rank = 0;
  std::vector<dattn::RingStats> stats;
};

template <class F>
RankRun run_ranks(int P, int threads, F&& call) {
  auto group = dattn::make_in_process_group(P);
  RankRun run;
  run.stats.resize(std::size_t(P));
  std::vector<double> ms(static_cast<std::size_t>(P));
  const std::int64_t live = dattn_memhook_live();
  dattn_memhook_reset_peak();
  std::vector<std::thread> ranks;
  for (int rank = 0; rank < P; ++rank)
    ranks.emplace_back([&, rank] {
      omp_set_num_threads(std::max(1, threads / P));
      const auto t0 = std::chrono::steady_clock::now();
      call(*group[std::size_t(rank)], run.stats[std::size_t(rank)]);
      ms[std::size_t(rank)] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    });
  for (auto& t : ranks) t.join();
  run.ms = *std::max_element(ms.begin(), ms.end());
  run.peak_bytes_per_rank = double(dattn_memhook_peak() - live) / P;
  return run;
}

struct Row {
  std::string method;
  int P;
  std::int64_t N;
  Stat fwd_ms, fwdbwd_ms;
  bool has_backward = false;
  double fwd_peak = 0, fwdbwd_peak = 0, fwd_sent = 0, fwdbwd_sent = 0, wait_fraction = 0, error = 0;
};

template <class F>
Row measure(const std::string& method, int P, std::int64_t N, const RingBenchSettings& s, F&& call) {
  Row row;
  row.method = method, row.P = P, row.N = N;
  std::vector<double> ms;
  double wait = 0, busy = 0;
  for (int i = 0; i < s.warmup + s.repeats; ++i) {
    const RankRun run = run_ranks(P, s.threads, call);
    row.fwd_peak = std::max(row.fwd_peak, run.peak_bytes_per_rank);
    for (const auto& st : run.stats) {
      row.fwd_sent = std::max(row.fwd_sent, double(st.bytes_sent));
      wait += st.wait_seconds;
      busy += st.wait_seconds + st.compute_seconds;
    }
    if (i >= s.warmup) ms.push_back(run.ms);
  }
  row.fwd_ms = summarize(ms);
  row.wait_fraction = busy > 0 ? wait / busy : 0;
  return row;
}

std::string mb(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f", bytes / (1024.0 * 1024.0));
  return text;
}

std::string ms_cell(const Stat& s) {
  char text[64];
  std::snprintf(text, sizeof text, "%.0f [%.0f–%.0f]", s.median, s.min, s.max);
  return text;
}

// Per-rank peak heap of the forward against N, ring and all-gather: a small SVG line plot.
void write_svg(const std::string& path, const std::vector<Row>& rows) {
  double max_n = 0, max_mb = 0;
  for (const Row& r : rows) max_n = std::max(max_n, double(r.N)), max_mb = std::max(max_mb, r.fwd_peak / 1048576.0);
  const double W = 640, Hh = 400, left = 70, bottom = 50, top = 40, right = 180;
  auto x = [&](double n) { return left + (W - left - right) * n / max_n; };
  auto y = [&](double m) { return Hh - bottom - (Hh - bottom - top) * m / (max_mb * 1.05); };
  std::ofstream f(path);
  f << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << Hh << "' font-family='sans-serif' font-size='12'>\n"
    << "<text x='" << left << "' y='20'>dattn-bench --ring: peak heap per rank (forward), geo(N)</text>\n"
    << "<line x1='" << left << "' y1='" << Hh - bottom << "' x2='" << W - right << "' y2='" << Hh - bottom << "' stroke='black'/>\n"
    << "<line x1='" << left << "' y1='" << top << "' x2='" << left << "' y2='" << Hh - bottom << "' stroke='black'/>\n"
    << "<text x='" << (W - right) / 2 << "' y='" << Hh - 10 << "'>sequence length N</text>\n"
    << "<text x='10' y='" << top - 10 << "'>MiB</text>\n";
  for (int i = 0; i <= 4; ++i) {
    const double m = max_mb * i / 4;
    f << "<text x='" << left - 50 << "' y='" << y(m) + 4 << "'>" << mb(m * 1048576.0) << "</text>\n";
  }
  const char* colours[] = {"#1f77b4", "#d62728"};
  int series = 0;
  for (const std::string method : {"dattn ring", "all-gather k, v"}) {
    std::string points;
    for (const Row& r : rows)
      if (r.method == method) {
        points += std::to_string(x(double(r.N))) + "," + std::to_string(y(r.fwd_peak / 1048576.0)) + " ";
        f << "<circle cx='" << x(double(r.N)) << "' cy='" << y(r.fwd_peak / 1048576.0) << "' r='3' fill='" << colours[series] << "'/>\n"
          << "<text x='" << x(double(r.N)) - 20 << "' y='" << Hh - bottom + 15 << "'>" << r.N << "</text>\n";
      }
    f << "<polyline fill='none' stroke='" << colours[series] << "' stroke-width='2' points='" << points << "'/>\n"
      << "<text x='" << W - right + 10 << "' y='" << top + 20 * series << "' fill='" << colours[series] << "'>" << method
      << "</text>\n";
    ++series;
  }
  f << "</svg>\n";
}

}  // namespace

// docs/benchmarks.md geo(N): segments 2048·4^k below N, then N; rates w / 2048.
dattn::DilatedConfig geo(std::int64_t N) {
  if (N < kBase || N % kBase != 0)
    throw std::runtime_error("geo(N) needs N a multiple of 2048; got N = " + std::to_string(N));
  dattn::DilatedConfig config;
  for (std::int64_t w = kBase; w < N; w *= 4) config.segment_lengths.push_back(w);
  config.segment_lengths.push_back(N);
  for (const std::int64_t w : config.segment_lengths) config.dilation_rates.push_back(w / kBase);
  return config;
}

// The LongNet reference code's approach: gather every rank's k and v, then attend over all of them
// (the same ring steps and merge, with nothing left to send).
void allgather_forward(dattn::Communicator& comm, const dattn::DilatedConfig& config, std::int64_t N,
                       const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                       const TensorView& lse, dattn::RingStats& stats) {
  const int P = comm.size(), rank = comm.rank();
  const std::int64_t B = q.shape[0], n = q.shape[1], H = q.shape[2], D = q.shape[3];
  const std::size_t rows_bytes = std::size_t(n * H * D) * dattn::dtype_size(q.dtype);
  Tensor all = Tensor::empty({P, 2, B, n, H, D}, q.dtype);  // every rank's k, v
  auto slot = [&](int r, int which, std::int64_t b) {
    return all.data<std::byte>() + ((std::size_t(r) * 2 + std::size_t(which)) * std::size_t(B) + std::size_t(b)) * rows_bytes;
  };
  for (std::int64_t b = 0; b < B; ++b)
    for (int which = 0; which < 2; ++which) {
      const TensorView& t = which ? v : k;
      std::memcpy(slot(rank, which, b), static_cast<const std::byte*>(t.data) + b * t.strides[0] * std::int64_t(dattn::dtype_size(t.dtype)), rows_bytes);
    }
  const std::size_t block = 2 * std::size_t(B) * rows_bytes;
  std::vector<int> requests;
  for (int r = 0; r < P; ++r)
    if (r != rank) {
      requests.push_back(comm.irecv(slot(r, 0, 0), block, r, 9));
      requests.push_back(comm.isend(slot(rank, 0, 0), block, r, 9));
      stats.bytes_sent += std::int64_t(block);
      stats.bytes_received += std::int64_t(block);
      ++stats.transfers;
    }
  const auto t0 = std::chrono::steady_clock::now();
  for (const int r : requests) comm.wait(r);
  const auto t1 = std::chrono::steady_clock::now();
  stats.wait_seconds += std::chrono::duration<double>(t1 - t0).count();
  Tensor merged = Tensor::zeros({B, n, H, D}, DType::float32), part = Tensor::empty({B, n, H, D}, q.dtype);
  Tensor part_lse = Tensor::empty({B, H, n}, DType::float32), merged_lse = Tensor::empty({B, H, n}, DType::float32);
  for (std::int64_t i = 0; i < merged_lse.numel(); ++i) merged_lse.data<float>()[i] = -INFINITY;
  for (int r = 0; r < P; ++r) {
    const TensorView kr = dattn::make_view(slot(r, 0, 0), q.dtype, {B, n, H, D}), vr = dattn::make_view(slot(r, 1, 0), q.dtype, {B, n, H, D});
    dattn::forward(config, q, kr, vr, part, part_lse, 
                   {.ring_step = dattn::RingStep{rank * n, N, r * n, (r + 1) * n}, .position_index = {}});
    dattn::merge_partial(merged, merged_lse, part, part_lse);
  }
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < n; ++i) {
        lse.ptr<float>()[b * lse.strides[0] + h * lse.strides[1] + i * lse.strides[2]] = merged_lse.data<float>()[(b * H + h) * n + i];
        for (std::int64_t d = 0; d < D; ++d) {
          const float x = merged.data<float>()[((b * n + i) * H + h) * D + d];
          const std::int64_t at = b * out.strides[0] + i * out.strides[1] + h * out.strides[2] + d;
          if (out.dtype == DType::bfloat16) out.ptr<std::uint16_t>()[at] = dattn::float_to_bfloat16(x);
          else out.ptr<float>()[at] = x;
        }
      }
  stats.compute_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
}

json run_ring_bench(const RingBenchSettings& s) {
  std::vector<std::pair<int, std::int64_t>> sweep;
  for (const int P : s.ranks) {
    if (s.lengths.empty()) sweep.push_back({P, P * s.rows_per_rank});
    for (const std::int64_t N : s.lengths) sweep.push_back({P, N});
  }
  std::vector<Row> rows;
  bool ok = true;
  for (const auto& [P, N] : sweep) {
    const dattn::DilatedConfig config = geo(N);
    if (N % P != 0) throw std::runtime_error("N = " + std::to_string(N) + " does not divide by P = " + std::to_string(P));
    Problem problem{"geo", kB, N, kH, kD, config};
    CallTensors t = CallTensors::make(problem, s.dtype, s.seed);
    std::fprintf(stderr, "ring: P = %d, N = %lld: single-process forward for the check\n", P, (long long)N);
    Tensor expected = Tensor::empty({kB, N, kH, kD}, s.dtype), expected_lse = Tensor::empty({kB, kH, N}, DType::float32);
    dattn::forward(config, t.q, t.k, t.v, expected, expected_lse);

    auto ring_forward = [&](dattn::Communicator& comm, dattn::RingStats& st) {
      const int r = comm.rank();
      dattn::ring_forward(comm, config, dattn::Layout::contiguous, N, rows_of(t.q, P, r), rows_of(t.k, P, r),
                          rows_of(t.v, P, r), rows_of(t.out, P, r), rows_of(t.lse, P, r, 2), &st);
    };
    auto ring_both = [&](dattn::Communicator& comm, dattn::RingStats& st) {
      const int r = comm.rank();
      ring_forward(comm, st);
      dattn::ring_backward(comm, config, dattn::Layout::contiguous, N, rows_of(t.q, P, r), rows_of(t.k, P, r),
                           rows_of(t.v, P, r), rows_of(t.out, P, r), rows_of(t.lse, P, r, 2), rows_of(t.dout, P, r),
                           rows_of(t.dq, P, r), rows_of(t.dk, P, r), rows_of(t.dv, P, r), &st);
    };
    auto gather_forward = [&](dattn::Communicator& comm, dattn::RingStats& st) {
      const int r = comm.rank();
      allgather_forward(comm, config, N, rows_of(t.q, P, r), rows_of(t.k, P, r), rows_of(t.v, P, r),
                        rows_of(t.out, P, r), rows_of(t.lse, P, r, 2), st);
    };
    for (const std::string method : {"dattn ring", "all-gather k, v"}) {
      const bool ring = method == "dattn ring";
      fill_nan(t.out);
      run_ranks(P, s.threads, [&](dattn::Communicator& c, dattn::RingStats& st) { ring ? ring_forward(c, st) : gather_forward(c, st); });
      const double error = rel_l2(t.out, to_float64(expected));
      std::fprintf(stderr, "ring: P = %d, N = %lld, %s: out vs single-process rel. L2 %.2e\n", P, (long long)N,
                   method.c_str(), error);
      if (!(error <= l2_bar(s.dtype))) {
        ok = false;
        Row wrong;
        wrong.method = method, wrong.P = P, wrong.N = N, wrong.error = error;
        rows.push_back(wrong);
        continue;
      }
      Row row = ring ? measure(method, P, N, s, ring_forward) : measure(method, P, N, s, gather_forward);
      row.error = error;
      if (ring) {
        const Row both = measure(method, P, N, s, ring_both);
        row.has_backward = true;
        row.fwdbwd_ms = both.fwd_ms;
        row.fwdbwd_peak = both.fwd_peak;
        row.fwdbwd_sent = both.fwd_sent;
      }
      rows.push_back(row);
    }
  }

  std::printf("\n## dattn-bench --ring: geo(N), B=%lld H=%lld D=%lld, %s, contiguous layout, %d thread(s) shared by the P in-process ranks\n\n",
              (long long)kB, (long long)kH, (long long)kD, dattn::dtype_name(s.dtype), s.threads);
  std::printf("| method | P | N | N/P | fwd ms (median [min–max]) | fwd+bwd ms | peak MiB per rank (fwd / fwd+bwd) | MiB sent per rank (fwd / fwd+bwd) | wait %% (fwd) | out rel. L2 vs single-process |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  json out = json::array();
  for (const Row& r : rows) {
    const bool timed = !r.fwd_ms.samples.empty();
    std::printf("| %s | %d | %lld | %lld | %s | %s | %s / %s | %s / %s | %.0f | %.1e%s |\n", r.method.c_str(), r.P, (long long)r.N,
                (long long)(r.N / r.P), timed ? ms_cell(r.fwd_ms).c_str() : "WRONG", r.has_backward ? ms_cell(r.fwdbwd_ms).c_str() : "—",
                mb(r.fwd_peak).c_str(), r.has_backward ? mb(r.fwdbwd_peak).c_str() : "—", mb(r.fwd_sent).c_str(),
                r.has_backward ? mb(r.fwdbwd_sent).c_str() : "—", 100 * r.wait_fraction, r.error, timed ? "" : " (not timed)");
    json j = {{"method", r.method}, {"P", r.P}, {"N", r.N}, {"peak_bytes_per_rank_fwd", r.fwd_peak},
              {"bytes_sent_per_rank_fwd", r.fwd_sent}, {"wait_fraction_fwd", r.wait_fraction}, {"out_rel_l2", r.error}};
    if (timed) j["fwd_ms"] = stat_json(r.fwd_ms);
    if (r.has_backward)
      j.update({{"fwdbwd_ms", stat_json(r.fwdbwd_ms)}, {"peak_bytes_per_rank_fwdbwd", r.fwdbwd_peak},
                {"bytes_sent_per_rank_fwdbwd", r.fwdbwd_sent}});
    out.push_back(j);
  }
  std::printf("\nPeak per rank: this process's heap high-water mark during the call above the heap before it (inputs and "
              "outputs preallocated), divided by P (the ranks are symmetric threads of one process). Sent: the largest "
              "rank's bytes. Wait: time blocked on a message not yet arrived over time in the call, summed over ranks. "
              "Times: all P ranks share this machine's %d thread(s), so they measure total work, not a cluster's "
              "per-rank time. Each method's forward out is first compared with single-process dattn::forward at the "
              "dtype's SPEC bar.\n",
              s.threads);
  if (!s.svg_path.empty()) {
    write_svg(s.svg_path, rows);
    std::fprintf(stderr, "ring: wrote %s\n", s.svg_path.c_str());
  }
  return {{"rows", out}, {"ok", ok}};
}

}  // namespace dattn_bench
