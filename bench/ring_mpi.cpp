// dattn-bench-ring-mpi: ring attention across MPI processes (one rank each) on docs/benchmarks.md's geo(N),
// beside the all-gather of k and v, so that per-rank heap, bytes and the time spent waiting for
// messages are those of real processes and a real transport.
//   mpirun -np P dattn-bench-ring-mpi [--rows N/P] [--repeats R] [--dtype bfloat16|float32]
// Rank 0 prints one markdown row per method; every rank's forward out is first compared (gathered
// on rank 0) with single-process dattn::forward.
#include <mpi.h>
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "check.hpp"
#include "dattn/dattn.hpp"
#include "memhook.hpp"
#include "ring.hpp"
#include "stats.hpp"

namespace {

using dattn::DType;
using dattn::Tensor;
using dattn::TensorView;
using namespace dattn_bench;

struct RankMeasured {
  Stat ms;                 // this rank's call time
  double peak_bytes = 0;   // heap high-water mark above the heap before the call
  dattn::RingStats stats;  // summed over the timed calls
};

template <class F>
RankMeasured measure_rank(F&& call, int warmup, int repeats) {
  RankMeasured m;
  std::vector<double> samples;
  for (int i = 0; i < warmup + repeats; ++i) {
    MPI_Barrier(MPI_COMM_WORLD);
    const std::int64_t live = dattn_memhook_live();
    dattn_memhook_reset_peak();
    dattn::RingStats st;
    const auto t0 = std::chrono::steady_clock::now();
    call(st);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    m.peak_bytes = std::max(m.peak_bytes, double(dattn_memhook_peak() - live));
    if (i >= warmup) samples.push_back(ms), m.stats += st;
  }
  m.ms = summarize(samples);
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  auto comm = dattn::make_mpi_communicator();
  const int P = comm->size(), rank = comm->rank();
  std::int64_t rows = 4096;
  int repeats = 3, warmup = 1;
  DType dtype = DType::bfloat16;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], value = argv[i + 1];
    if (a == "--rows") rows = std::atoll(value.c_str());
    else if (a == "--repeats") repeats = std::atoi(value.c_str());
    else if (a == "--dtype") dtype = value == "float32" ? DType::float32 : DType::bfloat16;
    else {
      if (rank == 0) std::fprintf(stderr, "dattn-bench-ring-mpi: unknown argument %s\n", a.c_str());
      MPI_Abort(MPI_COMM_WORLD, 2);
    }
  }
  // The ranks share this machine's cores.
  omp_set_num_threads(std::max(1, int(std::thread::hardware_concurrency()) / P));

  const std::int64_t N = P * rows, H = 12, D = 64;
  const dattn::DilatedConfig config = geo(N);
  Problem problem{"geo", 1, N, H, D, config};
  CallTensors t = CallTensors::make(problem, dtype, 1);  // the same inputs on every rank
  const std::int64_t begin = rank * rows;
  const auto q = t.q.view().narrow(1, begin, rows), k = t.k.view().narrow(1, begin, rows),
             v = t.v.view().narrow(1, begin, rows), out = t.out.view().narrow(1, begin, rows),
             lse = t.lse.view().narrow(2, begin, rows), dout = t.dout.view().narrow(1, begin, rows),
             dq = t.dq.view().narrow(1, begin, rows), dk = t.dk.view().narrow(1, begin, rows),
             dv = t.dv.view().narrow(1, begin, rows);

  auto ring_forward = [&](dattn::RingStats& st) {
    dattn::ring_forward(*comm, config, dattn::Layout::contiguous, N, q, k, v, out, lse, &st);
  };
  auto ring_both = [&](dattn::RingStats& st) {
    ring_forward(st);
    dattn::ring_backward(*comm, config, dattn::Layout::contiguous, N, q, k, v, out, lse, dout, dq, dk, dv, &st);
  };
  auto gather_forward = [&](dattn::RingStats& st) { allgather_forward(*comm, config, N, q, k, v, out, lse, st); };

  // Check: every rank's out rows, gathered on rank 0, against single-process attention.
  auto check = [&](auto&& call) {
    dattn::RingStats unused;
    call(unused);
    const std::size_t bytes = std::size_t(rows * H * D) * dattn::dtype_size(dtype);
    MPI_Gather(rank == 0 ? MPI_IN_PLACE : out.data, int(bytes), MPI_BYTE, t.out.data<std::byte>(), int(bytes), MPI_BYTE, 0,
               MPI_COMM_WORLD);
    double error = 0;
    if (rank == 0) {
      Tensor expected = Tensor::empty({1, N, H, D}, dtype), expected_lse = Tensor::empty({1, H, N}, DType::float32);
      dattn::forward(config, t.q, t.k, t.v, expected, expected_lse);
      error = rel_l2(t.out, to_float64(expected));
    }
    MPI_Bcast(&error, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    return error;
  };

  if (rank == 0)
    std::printf("| method | P | N | N/P | fwd ms, slowest rank's median [min–max] | fwd+bwd ms | peak MiB per rank, max (fwd / fwd+bwd) "
                "| MiB sent per rank, max (fwd / fwd+bwd) | wait %% of call time (fwd / fwd+bwd) | out rel. L2 vs single-process |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n");
  int status = 0;
  for (const bool ring : {true, false}) {
    const double error = ring ? check(ring_forward) : check(gather_forward);
    const char* method = ring ? "dattn ring (MPI)" : "all-gather k, v (MPI)";
    if (!(error <= l2_bar(dtype))) {
      if (rank == 0) std::printf("| %s | %d | %lld | %lld | WRONG | — | — | — | — | %.1e |\n", method, P, (long long)N, (long long)rows, error);
      status = 1;
      continue;
    }
    const RankMeasured fwd = ring ? measure_rank(ring_forward, warmup, repeats) : measure_rank(gather_forward, warmup, repeats);
    const RankMeasured both = ring ? measure_rank(ring_both, warmup, repeats) : RankMeasured{};
    // Slowest rank's median, largest peak and bytes, and the wait fraction over all ranks.
    double local[8] = {fwd.ms.median, both.ms.samples.empty() ? 0 : both.ms.median, fwd.peak_bytes, both.peak_bytes,
                       double(fwd.stats.bytes_sent) / repeats, double(both.stats.bytes_sent) / repeats, fwd.ms.min,
                       fwd.ms.max};
    double worst[8];
    MPI_Reduce(local, worst, 8, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    double waits[4] = {fwd.stats.wait_seconds, 1e-3 * fwd.ms.median * repeats, both.stats.wait_seconds,
                       both.ms.samples.empty() ? 0 : 1e-3 * both.ms.median * repeats};
    double sums[4];
    MPI_Reduce(waits, sums, 4, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
    if (rank == 0) {
      const double mib = 1024.0 * 1024.0;
      char both_cell[64] = "—", both_peak[32] = "—", both_sent[32] = "—", both_wait[32] = "—";
      if (ring) {
        std::snprintf(both_cell, sizeof both_cell, "%.0f", worst[1]);
        std::snprintf(both_peak, sizeof both_peak, "%.1f", worst[3] / mib);
        std::snprintf(both_sent, sizeof both_sent, "%.1f", worst[5] / mib);
        std::snprintf(both_wait, sizeof both_wait, "%.0f", 100 * sums[2] / sums[3]);
      }
      std::printf("| %s | %d | %lld | %lld | %.0f [%.0f–%.0f] | %s | %.1f / %s | %.1f / %s | %.0f / %s | %.1e |\n", method, P,
                  (long long)N, (long long)rows, worst[0], worst[6], worst[7], both_cell, worst[2] / mib, both_peak,
                  worst[4] / mib, both_sent, 100 * sums[0] / sums[1], both_wait, error);
      std::fflush(stdout);
    }
  }
  comm.reset();
  MPI_Finalize();
  return status;
}
