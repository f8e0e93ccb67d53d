// Each rank's peak heap stays O(N/P): ring forward and backward over P = 2 .. 16 in-process ranks
// at a fixed N/P, with the largest segment spanning the whole sequence (PERF.md's geo shape, scaled
// down), so keys travel between every pair. malloc is counted by bench/memhook.cpp linked in; the
// ranks are threads of one process, so a rank's peak is the process's peak above the inputs / P.
#include <gtest/gtest.h>

#include <thread>

#include "harness.hpp"

#include "memhook.hpp"

namespace dattn_test {
namespace {

constexpr std::int64_t kB = 1, kRows = 128, kH = 4, kD = 32, kBase = 32;

// Peak heap bytes per rank of one ring forward + backward.
double peak_per_rank(int P) {
  const std::int64_t N = P * kRows;
  dattn::DilatedConfig config;  // geo(N) with base kBase: every branch selects kBase rows a segment
  for (std::int64_t w = kBase; w < N; w *= 4) config.segment_lengths.push_back(w);
  config.segment_lengths.push_back(N);
  for (const std::int64_t w : config.segment_lengths) config.dilation_rates.push_back(w / kBase);
  Rng rng(P);
  std::vector<Tensor> tensors;  // per rank: q, k, v, out, dout, dq, dk, dv, lse
  for (int rank = 0; rank < P; ++rank) {
    for (int i = 0; i < 8; ++i) {
      tensors.push_back(Tensor::empty({kB, kRows, kH, kD}, DType::float32));
      fill_normal(tensors.back().view(), rng);
    }
    tensors.push_back(Tensor::empty({kB, kH, kRows}, DType::float32));
  }
  auto group = dattn::make_in_process_group(P);
  const std::int64_t before = dattn_memhook_live();
  dattn_memhook_reset_peak();
  std::vector<std::thread> threads;
  for (int rank = 0; rank < P; ++rank)
    threads.emplace_back([&, rank] {
      const Tensor* t = &tensors[std::size_t(rank) * 9];
      dattn::Communicator& comm = *group[std::size_t(rank)];
      dattn::ring_forward(comm, config, dattn::Layout::contiguous, N, t[0], t[1], t[2], t[3], t[8]);
      dattn::ring_backward(comm, config, dattn::Layout::contiguous, N, t[0], t[1], t[2], t[3], t[8], t[4], t[5], t[6],
                           t[7]);
    });
  for (auto& t : threads) t.join();
  return double(dattn_memhook_peak() - before) / P;
}

TEST(RingMemoryTest, PeakPerRankIsFlatInPAtFixedRowsPerRank) {
  const double local_kv = double(2 * kB * kRows * kH * kD * sizeof(float));  // this rank's k and v
  std::vector<double> peaks;
  for (const int P : {2, 4, 8, 16}) {
    peaks.push_back(peak_per_rank(P));
    const double gathered_kv = local_kv * P;  // what an all-gather of k and v alone would hold
    std::printf("P = %2d: peak per rank %.0f KiB (%.1f x its own k, v); an all-gather of k, v holds %.0f KiB\n", P,
                peaks.back() / 1024, peaks.back() / local_kv, gathered_kv / 1024);
  }
  EXPECT_LT(peaks.back(), 1.25 * peaks.front()) << "per-rank peak grew with P at fixed N/P";
  EXPECT_LT(peaks.back(), 8 * local_kv);  // a small multiple of the local rows, far below 16 ranks' k, v (32x)
  EXPECT_GT(peaks.front(), local_kv);     // the hook sees the ring's buffers at all
}

}  // namespace
}  // namespace dattn_test
