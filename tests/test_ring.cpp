// Ring attention over an in-process group (one thread per rank): every rank holds N/P rows in the
// contiguous or zigzag layout; the gathered outputs and gradients must equal attention over the
// whole sequence at the SPEC bars.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <thread>
#include <tuple>

#include "case_config.hpp"
#include "harness.hpp"

namespace dattn_test {
namespace {

using dattn::Layout;

struct Case {
  std::int64_t B, N, H, D;
  std::vector<std::int64_t> w, r;
  dattn::Mode mode;
  bool causal, padding;
  Layout layout;
  int P;
  double dropout_p;
  std::int64_t kv_heads = 0;  // k, v heads (grouped-query heads); 0 means H
  std::uint64_t dropout_seed = 5;  // the same for every case
};

// The ring over an in-process group of P threads: each rank runs call(comm, its q, k, v, dout,
// padding shard (or none), out, lse, dq, dk, dv); returns the gathered {out, lse, dq, dk, dv}.
template <class RingCall>
std::array<Tensor, 5> run_ring(int P, Layout layout, const std::vector<std::int64_t>& shape, DType dtype,
                               const std::array<const Buffer*, 4>& inputs, const Tensor* padding, RingCall&& call) {
  const std::int64_t B = shape[0], N = shape[1], H = shape[2], D = shape[3], n = N / P;
  const std::int64_t Hkv = inputs[1]->view().shape[2];
  std::vector<std::array<Tensor, 5>> results(static_cast<std::size_t>(P));
  auto group = dattn::make_in_process_group(P);
  std::vector<std::thread> threads;
  std::vector<std::string> errors(static_cast<std::size_t>(P));
  for (int rank = 0; rank < P; ++rank)
    threads.emplace_back([&, rank] {
      try {
        auto local = [&](const TensorView& global) { return dattn::shard_sequence(global, rank, P, layout, 1); };
        const Tensor lq = local(inputs[0]->view()), lk = local(inputs[1]->view()), lv = local(inputs[2]->view()),
                     ldout = local(inputs[3]->view());
        const Tensor lmask = padding ? local(padding->view()) : Tensor();
        auto& [lout, llse, ldq, ldk, ldv] = results[std::size_t(rank)];
        lout = Tensor::empty({B, n, H, D}, dtype), llse = Tensor::empty({B, H, n}, DType::float32);
        ldq = Tensor::empty({B, n, H, D}, dtype), ldk = Tensor::empty({B, n, Hkv, D}, dtype);
        ldv = Tensor::empty({B, n, Hkv, D}, dtype);
        call(*group[std::size_t(rank)], lq, lk, lv, ldout, padding ? std::optional<TensorView>(lmask.view()) : std::nullopt,
             lout, llse, ldq, ldk, ldv);
      } catch (const std::exception& e) {
        errors[std::size_t(rank)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (const auto& e : errors) EXPECT_EQ(e, "");
  std::array<Tensor, 5> gathered;
  for (int which = 0; which < 5; ++which) {
    std::vector<TensorView> parts;
    for (const auto& r : results) parts.push_back(r[std::size_t(which)].view());
    gathered[std::size_t(which)] = dattn::unshard_sequence(parts, layout, which == 1 ? 2 : 1);
  }
  return gathered;
}

void run(const Case& c, DType dtype, Rng& rng) {
  SCOPED_TRACE(::testing::Message() << "N=" << c.N << " P=" << c.P << " H=" << c.H << " kv_heads=" << c.kv_heads
                                    << " zigzag=" << (c.layout == Layout::zigzag)
                                    << " causal=" << c.causal << " mode=" << int(c.mode) << " w0=" << c.w[0]
                                    << " dtype=" << dattn::dtype_name(dtype));
  const std::vector<std::int64_t> shape{c.B, c.N, c.H, c.D}, kv_shape{c.B, c.N, c.kv_heads ? c.kv_heads : c.H, c.D};
  Buffer q = contiguous(shape, dtype), k = contiguous(kv_shape, dtype), v = contiguous(kv_shape, dtype),
         dout = contiguous(shape, dtype);
  for (const Buffer* b : {&q, &k, &v, &dout}) fill_normal(b->view(), rng);
  const dattn::DilatedConfig config = config_of(c);
  Tensor padding = Tensor::zeros({c.B, c.N}, DType::boolean);
  std::uniform_real_distribution<double> uniform;
  if (c.padding)
    for (std::int64_t i = 0; i < padding.numel(); ++i) padding.data<std::uint8_t>()[i] = uniform(rng) < 0.2;

  const auto [out, lse, dq, dk, dv] = run_ring(
      c.P, c.layout, shape, dtype, {&q, &k, &v, &dout}, c.padding ? &padding : nullptr,
      [&](dattn::Communicator& comm, const Tensor& lq, const Tensor& lk, const Tensor& lv, const Tensor& ldout,
          const std::optional<TensorView>& lmask, const Tensor& lout, const Tensor& llse, const Tensor& ldq,
          const Tensor& ldk, const Tensor& ldv) {
        dattn::DilatedConfig mine = config;
        mine.key_padding_mask = lmask;
        dattn::ring_forward(comm, mine, c.layout, c.N, lq, lk, lv, lout, llse);
        dattn::ring_backward(comm, mine, c.layout, c.N, lq, lk, lv, lout, llse, ldout, ldq, ldk, ldv);
      });

  dattn::DilatedConfig whole = config;
  if (c.padding) whole.key_padding_mask = padding.view();
  Tensor ref = Tensor::empty(shape, DType::float64), ref_lse = Tensor::empty({c.B, c.H, c.N}, DType::float32);
  Tensor dq64 = Tensor::empty(shape, DType::float64), dk64 = Tensor::empty(kv_shape, DType::float64),
         dv64 = Tensor::empty(kv_shape, DType::float64);
  const Tensor q64 = to_f64(q.view()), k64 = to_f64(k.view()), v64 = to_f64(v.view());
  dattn::forward(whole, q64, k64, v64, ref, ref_lse);
  dattn::backward(whole, q64, k64, v64, ref, ref_lse, to_f64(dout.view()), dq64, dk64, dv64);
  const Tolerance tol = tolerance(dtype);
  EXPECT_TRUE(close_rel_l2("out", out.view(), ref, tol.rel_l2));
  EXPECT_TRUE(lse_close(lse.view(), ref_lse, tol.lse));
  EXPECT_TRUE(close_rel_l2("dq", dq.view(), dq64, tol.rel_l2, ZeroReference::cancellation));
  EXPECT_TRUE(close_rel_l2("dk", dk.view(), dk64, tol.rel_l2, ZeroReference::cancellation));
  EXPECT_TRUE(close_rel_l2("dv", dv.view(), dv64, tol.rel_l2));
}

TEST(RingTest, GatheredResultsEqualWholeSequenceAttention) {
  Rng rng(2026);
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  for (int i = 0; i < 24; ++i) {
    Case c;
    c.P = 1 + pick(rng) % 4;
    c.layout = pick(rng) % 2 ? Layout::zigzag : Layout::contiguous;
    const std::int64_t unit = c.layout == Layout::zigzag ? 2 * c.P : c.P;
    c.N = unit * (1 + pick(rng) % (48 / unit + 1));
    c.B = 1 + pick(rng) % 2;
    c.H = 1 + pick(rng) % 3;
    c.D = 8 * (1 + pick(rng) % 3);
    const int G = 1 + pick(rng) % 3;
    for (int g = 0; g < G; ++g) {  // shorter than, equal to and longer than N/P
      const std::int64_t w = std::max<std::int64_t>(1, (c.N / c.P) * (1 + pick(rng) % 4) / 2 + pick(rng) % 3);
      c.w.push_back(w);
      c.r.push_back(1 + pick(rng) % std::min<std::int64_t>(w, 5));
    }
    c.mode = pick(rng) % 2 ? dattn::Mode::longnet : dattn::Mode::grouped;
    c.causal = pick(rng) % 2;
    c.padding = pick(rng) % 3 == 0;
    c.dropout_p = pick(rng) % 4 == 0 ? 0.25 : 0.0;
    run(c, i % 4 == 3 ? DType::bfloat16 : DType::float32, rng);
  }
}

// Grouped-query heads on the ring: k, v with Hkv heads, dk, dv summed over the query heads.
TEST(RingTest, GroupedQueryHeads) {
  Rng rng(16);
  for (const auto& [H, kv_heads, P, layout] : {std::tuple{4, 2, 2, Layout::contiguous}, std::tuple{4, 1, 3, Layout::zigzag},
                                               std::tuple{6, 3, 4, Layout::contiguous}}) {
    Case c{1, 24 * std::int64_t(P), H, 16, {8, 20}, {1, 3}, dattn::Mode::grouped, true, true, layout, P, 0.2};
    c.kv_heads = kv_heads;
    run(c, DType::float32, rng);
    c.mode = dattn::Mode::longnet, c.causal = false;
    run(c, DType::float32, rng);
  }
}

// The definition, pair by pair: key (p, head) of source is needed when some branch selects p and a
// query x of dest for that head in one segment (causal: x >= p).
std::vector<std::int64_t> needed_by_definition(const dattn::DilatedConfig& c, Layout layout, std::int64_t N, int P,
                                               std::int64_t H, int source, int dest) {
  const auto keys = dattn::ring_rows(N, P, source, layout), queries = dattn::ring_rows(N, P, dest, layout);
  const std::int64_t G = std::int64_t(c.segment_lengths.size());
  std::vector<std::int64_t> entries;
  std::int64_t local = 0;
  for (const auto& [k0, k1] : keys)
    for (std::int64_t p = k0; p < k1; ++p, ++local)
      for (std::int64_t h = 0; h < H; ++h) {
        bool needed = false;
        for (std::int64_t i = 0; i < G; ++i) {
          std::int64_t group = 0, first = 0;  // grouped mode: the group head h falls in
          while (first + H / G + (group < H % G) <= h) first += H / G + (group < H % G), ++group;
          if (c.mode == dattn::Mode::grouped && group != i) continue;
          const std::int64_t w = std::min(c.segment_lengths[std::size_t(i)], N), r = c.dilation_rates[std::size_t(i)];
          const std::int64_t o = (c.mode == dattn::Mode::grouped ? i : h) % r;
          auto selected = [&](std::int64_t x) { return x % w >= o && (x % w - o) % r == 0; };
          for (const auto& [q0, q1] : queries)
            for (std::int64_t x = q0; x < q1; ++x)
              needed |= selected(p) && selected(x) && x / w == p / w && (!c.causal || x >= p);
        }
        if (needed) entries.push_back(local * H + h);
      }
  return entries;
}

// Block masks on the same engine: random masks (shared or per head, every density), causal, key
// padding, both layouts; gathered results against the float64 block-sparse reference, and the
// schedule skips the rank pairs no query block needs.
TEST(RingTest, BlockSparseMasksOnTheRing) {
  Rng rng(77);
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  std::uniform_real_distribution<double> uniform;
  for (int i = 0; i < 24; ++i) {
    const int P = 1 + pick(rng) % 4;
    const Layout layout = pick(rng) % 2 ? Layout::zigzag : Layout::contiguous;
    const std::int64_t block = 1 + pick(rng) % 5, parts = layout == Layout::zigzag ? 2 * P : P;
    const std::int64_t N = parts * block * (1 + pick(rng) % 3), B = 1 + pick(rng) % 2, H = 1 + pick(rng) % 3, D = 8;
    const std::int64_t nb = N / block, mask_heads = pick(rng) % 2 ? H : 1;
    const double density = std::vector<double>{0.1, 0.4, 1.0}[std::size_t(pick(rng) % 3)];
    Tensor dense = Tensor::zeros({mask_heads, nb, nb}, DType::boolean);
    for (std::int64_t e = 0; e < dense.numel(); ++e) dense.data<std::uint8_t>()[e] = uniform(rng) < density;
    const dattn::BlockSparseMask mask = dattn::BlockSparseMask::from_dense(dense);
    dattn::BlockSparseConfig config;
    config.block_size = block;
    config.causal = pick(rng) % 2;
    const bool with_padding = pick(rng) % 3 == 0;
    SCOPED_TRACE(::testing::Message() << "case " << i << " P=" << P << " N=" << N << " block=" << block
                                      << " zigzag=" << (layout == Layout::zigzag) << " causal=" << config.causal);
    const std::vector<std::int64_t> shape{B, N, H, D};
    Buffer q = contiguous(shape, DType::float32), k = contiguous(shape, DType::float32),
           v = contiguous(shape, DType::float32), dout = contiguous(shape, DType::float32);
    for (const Buffer* b : {&q, &k, &v, &dout}) fill_normal(b->view(), rng);
    Tensor padding = Tensor::zeros({B, N}, DType::boolean);
    for (std::int64_t e = 0; e < padding.numel(); ++e) padding.data<std::uint8_t>()[e] = with_padding && uniform(rng) < 0.2;
    const auto [out, lse, dq, dk, dv] = run_ring(
        P, layout, shape, DType::float32, {&q, &k, &v, &dout}, with_padding ? &padding : nullptr,
        [&](dattn::Communicator& comm, const Tensor& lq, const Tensor& lk, const Tensor& lv, const Tensor& ldout,
            const std::optional<TensorView>& lmask, const Tensor& lout, const Tensor& llse, const Tensor& ldq,
            const Tensor& ldk, const Tensor& ldv) {
          dattn::BlockSparseConfig mine = config;
          mine.key_padding_mask = lmask;
          dattn::ring_forward(comm, mine, mask, layout, N, lq, lk, lv, lout, llse);
          dattn::ring_backward(comm, mine, mask, layout, N, lq, lk, lv, lout, llse, ldout, ldq, ldk, ldv);
        });
    dattn::BlockSparseConfig whole = config;
    if (with_padding) whole.key_padding_mask = padding.view();
    Tensor ref = Tensor::empty(shape, DType::float64), ref_lse = Tensor::empty({B, H, N}, DType::float32);
    Tensor dq64 = Tensor::empty(shape, DType::float64), dk64 = Tensor::empty(shape, DType::float64),
           dv64 = Tensor::empty(shape, DType::float64);
    const Tensor q64 = to_f64(q.view()), k64 = to_f64(k.view()), v64 = to_f64(v.view());
    dattn::block_sparse_forward(whole, mask, q64, k64, v64, ref, ref_lse);
    dattn::block_sparse_backward(whole, mask, q64, k64, v64, ref, ref_lse, to_f64(dout.view()), dq64, dk64, dv64);
    const Tolerance tol = tolerance(DType::float32);
    EXPECT_TRUE(close_rel_l2("out", out.view(), ref, tol.rel_l2));
    EXPECT_TRUE(lse_close(lse.view(), ref_lse, tol.lse));
    EXPECT_TRUE(close_rel_l2("dq", dq.view(), dq64, tol.rel_l2, ZeroReference::cancellation));
    EXPECT_TRUE(close_rel_l2("dk", dk.view(), dk64, tol.rel_l2, ZeroReference::cancellation));
    EXPECT_TRUE(close_rel_l2("dv", dv.view(), dv64, tol.rel_l2));
  }
  // The schedule: a window of one block each side over 4 ranks of 2 blocks skips far ranks.
  Tensor window = Tensor::zeros({8, 8}, DType::boolean);
  for (std::int64_t i = 0; i < 8; ++i)
    for (std::int64_t j = std::max<std::int64_t>(0, i - 1); j <= std::min<std::int64_t>(7, i + 1); ++j)
      window.data<std::uint8_t>()[i * 8 + j] = 1;
  const dattn::BlockSparseMask local = dattn::BlockSparseMask::from_dense(window);
  for (int s = 0; s < 4; ++s)
    for (int d = 0; d < 4; ++d)
      EXPECT_EQ(dattn::ring_block_sparse_entries(local, 4, false, Layout::contiguous, 32, 4, 3, s, d).size(),
                std::abs(s - d) <= 1 ? 8u * 3u : 0u)
          << s << " -> " << d;
  EXPECT_THROW(dattn::ring_block_sparse_entries(local, 3, false, Layout::contiguous, 32, 4, 3, 0, 1), dattn::Error);
}

TEST(RingTest, TransferEntriesAreExactlyTheNeededKeys) {
  Rng rng(77);
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  int nonempty = 0, partial = 0;
  for (int i = 0; i < 200; ++i) {
    const int P = 1 + pick(rng) % 4;
    const Layout layout = pick(rng) % 2 ? Layout::zigzag : Layout::contiguous;
    const std::int64_t unit = layout == Layout::zigzag ? 2 * P : P, N = unit * (1 + pick(rng) % (40 / unit + 1));
    const std::int64_t H = 1 + pick(rng) % 5;
    dattn::DilatedConfig c;
    for (int g = 0; g < 1 + pick(rng) % 3; ++g) {
      const std::int64_t w = 1 + pick(rng) % (N + 4);
      c.segment_lengths.push_back(w);
      c.dilation_rates.push_back(1 + pick(rng) % std::min<std::int64_t>(w, 6));
    }
    c.mode = pick(rng) % 2 ? dattn::Mode::longnet : dattn::Mode::grouped;
    c.causal = pick(rng) % 2;
    for (int source = 0; source < P; ++source)
      for (int dest = 0; dest < P; ++dest) {
        const auto entries = dattn::ring_transfer_entries(c, layout, N, P, H, source, dest);
        ASSERT_EQ(entries, needed_by_definition(c, layout, N, P, H, source, dest))
            << "N=" << N << " P=" << P << " H=" << H << " source=" << source << " dest=" << dest;
        nonempty += !entries.empty();
        partial += !entries.empty() && std::int64_t(entries.size()) < N / P * H;
      }
  }
  EXPECT_GT(nonempty, 100);  // the cases exercise both kinds of transfer
  EXPECT_GT(partial, 50);
}

// Each rank's RingStats of one ring_forward of zeros, N = 64 over P = 4 ranks, H = 4 query heads of
// D = 8, k, v with kv_heads heads.
constexpr std::int64_t kBytesN = 64, kBytesH = 4, kBytesD = 8;
constexpr int kBytesP = 4;
std::vector<dattn::RingStats> ring_stats(const dattn::DilatedConfig& config, std::int64_t kv_heads) {
  const std::int64_t B = 1, n = kBytesN / kBytesP;
  auto group = dattn::make_in_process_group(kBytesP);
  std::vector<dattn::RingStats> stats(kBytesP);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < kBytesP; ++rank)
    threads.emplace_back([&, rank] {
      Tensor q = Tensor::zeros({B, n, kBytesH, kBytesD}, DType::float32);
      Tensor kv = Tensor::zeros({B, n, kv_heads, kBytesD}, DType::float32);
      Tensor out = Tensor::empty({B, n, kBytesH, kBytesD}, DType::float32), lse = Tensor::empty({B, kBytesH, n}, DType::float32);
      dattn::ring_forward(*group[std::size_t(rank)], config, Layout::contiguous, kBytesN, q, kv, kv, out, lse,
                          &stats[std::size_t(rank)]);
    });
  for (auto& t : threads) t.join();
  return stats;
}

// Only selected keys travel: a branch whose segments fit in a rank sends nothing, and a dilated
// one sends 1/r of its heads' rows.
TEST(RingTest, BytesSentAreTheSelectedKeys) {
  const std::int64_t H = kBytesH, D = kBytesD;
  for (const auto& [w, r, expected_entries] : {std::tuple{16L, 1L, 0L}, std::tuple{64L, 1L, 3 * 16 * H},
                                               std::tuple{64L, 4L, 3 * 16 * H / 4}}) {
    dattn::DilatedConfig config;
    config.segment_lengths = {w};
    config.dilation_rates = {r};
    for (const auto& s : ring_stats(config, H)) {
      EXPECT_EQ(s.bytes_sent, expected_entries * 2 * D * std::int64_t(sizeof(float))) << "w=" << w << " r=" << r;
      EXPECT_EQ(s.bytes_received, s.bytes_sent);
    }
  }
}

// Under grouped-query heads the ring moves k, v with their Hkv heads: a branch that needs every key
// of the other ranks sends Hkv / H of what H heads would take.
TEST(RingTest, GroupedQueryHeadsSendTheirOwnHeads) {
  dattn::DilatedConfig config;
  config.segment_lengths = {64};
  config.dilation_rates = {1};
  for (const std::int64_t kv_heads : {4L, 2L, 1L})
    for (const auto& s : ring_stats(config, kv_heads))  // to each of the 3 other ranks: its 16 rows, k and v
      EXPECT_EQ(s.bytes_sent, 3 * 16 * kv_heads * 2 * kBytesD * std::int64_t(sizeof(float))) << "Hkv=" << kv_heads;
}

TEST(RingTest, ShardAndUnshardSequences) {
  Tensor x = Tensor::empty({1, 24}, DType::int64);
  for (std::int64_t i = 0; i < 24; ++i) x.data<std::int64_t>()[i] = i;
  const Tensor part = dattn::shard_sequence(x.view(), 1, 3, Layout::zigzag);
  EXPECT_EQ(std::vector<std::int64_t>(part.data<std::int64_t>(), part.data<std::int64_t>() + part.numel()),
            (std::vector<std::int64_t>{4, 5, 6, 7, 16, 17, 18, 19}));
  // Round trips of a strided [2, 12, 3] view along each dimension that divides.
  Tensor big = Tensor::empty({3, 12, 4}, DType::float32);
  for (std::int64_t i = 0; i < big.numel(); ++i) big.data<float>()[i] = float(i);
  TensorView view = big.view();
  view.shape[0] = 2, view.shape[2] = 3;  // a strided window of it
  for (const Layout layout : {Layout::contiguous, Layout::zigzag})
    for (const auto& [dim, P] : {std::pair{1, 3}, std::pair{1, 2}, std::pair{0, 1}}) {
      std::vector<Tensor> parts;
      std::vector<TensorView> views;
      for (int r = 0; r < P; ++r) parts.push_back(dattn::shard_sequence(view, r, P, layout, dim));
      for (const Tensor& t : parts) views.push_back(t.view());
      const Tensor joined = dattn::unshard_sequence(views, layout, dim);
      ASSERT_EQ(joined.view().shape_string(), view.shape_string());
      for (std::int64_t a = 0; a < 2; ++a)
        for (std::int64_t b = 0; b < 12; ++b)
          for (std::int64_t c = 0; c < 3; ++c)
            ASSERT_EQ(joined.data<float>()[(a * 12 + b) * 3 + c], big.data<float>()[(a * 12 + b) * 4 + c]);
    }
  EXPECT_THAT(error_message([&] { dattn::shard_sequence(x.view(), 0, 5); }), ::testing::HasSubstr("divisible"));
  EXPECT_THAT(error_message([&] { dattn::shard_sequence(x.view(), 0, 2, Layout::contiguous, 2); }),
              ::testing::HasSubstr("dim = 2; expected a dimension of x [1, 24]"));
  EXPECT_THAT(error_message([&] { dattn::unshard_sequence({x.view(), part.view()}); }),
              ::testing::HasSubstr("part 1 has shape [1, 8]"));
  EXPECT_THAT(error_message([] { dattn::unshard_sequence({}); }), ::testing::HasSubstr("no parts"));
}

TEST(RingTest, LayoutsAndErrors) {
  using Rows = std::vector<std::pair<std::int64_t, std::int64_t>>;
  EXPECT_EQ(dattn::ring_rows(16, 4, 1, Layout::contiguous), (Rows{{4, 8}}));
  EXPECT_EQ(dattn::ring_rows(16, 4, 1, Layout::zigzag), (Rows{{2, 4}, {12, 14}}));
  EXPECT_THAT(error_message([] { dattn::ring_rows(10, 4, 0, Layout::contiguous); }), ::testing::HasSubstr("divisible"));
  EXPECT_THAT(error_message([] { dattn::ring_rows(12, 4, 0, Layout::zigzag); }), ::testing::HasSubstr("2P"));
}

}  // namespace
}  // namespace dattn_test
