#include "cases.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

#include "dattn/hilbert.hpp"

namespace dattn_test {
namespace {

std::int64_t uniform(Rng& rng, std::int64_t lo, std::int64_t hi) {
  return lo + std::int64_t(rng() % std::uint64_t(hi - lo + 1));
}

bool chance(Rng& rng, double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; }

std::int64_t random_head_dim(Rng& rng, std::int64_t max_d) {
  static const std::int64_t common[] = {1, 3, 7, 16, 32, 33, 64, 80, 128};
  static const std::int64_t rare[] = {2, 5, 8, 9, 15, 17, 31, 48, 63, 65, 96, 127, 129, 200, 255, 256};
  for (;;) {
    const std::int64_t d = chance(rng, 0.8) ? common[rng() % std::size(common)] : rare[rng() % std::size(rare)];
    if (d <= max_d) return d;
  }
}

std::vector<std::uint8_t> random_padding(Rng& rng, std::int64_t B, std::int64_t N) {
  std::vector<std::uint8_t> pad(std::size_t(B * N), 0);
  const int kind = int(rng() % 10);
  if (kind < 4) return {};  // no mask
  if (kind < 7) {           // independent keys
    const double p = std::vector<double>{0.1, 0.3, 0.7}[rng() % 3];
    for (auto& x : pad) x = chance(rng, p);
  } else if (kind == 7) {  // a padded prefix: early causal rows see nothing
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t n = 0, k = uniform(rng, 0, N); n < k; ++n) pad[std::size_t(b * N + n)] = 1;
  } else if (kind == 8) {  // one batch fully padded
    for (auto& x : pad) x = chance(rng, 0.2);
    const std::int64_t b = uniform(rng, 0, B - 1);
    std::fill_n(pad.begin() + b * N, N, 1);
  } else {  // every key padded
    std::fill(pad.begin(), pad.end(), 1);
  }
  return pad;
}

}  // namespace

Case random_case(Rng& rng, const CaseLimits& limits) {
  Case c;
  c.seed = rng();
  c.B = uniform(rng, 1, limits.max_b);
  c.H = uniform(rng, 1, limits.max_h);
  c.D = random_head_dim(rng, limits.max_d);
  const std::int64_t max_n = c.D > 128 ? std::min<std::int64_t>(limits.max_n, 40) : limits.max_n;
  const int n_kind = int(rng() % 20);
  c.N = n_kind == 0 ? 1 : n_kind < 4 ? uniform(rng, 2, std::min<std::int64_t>(8, max_n)) : uniform(rng, 2, max_n);

  const auto G = std::size_t(uniform(rng, 1, limits.max_g));
  c.w.assign(G, 1);
  c.r.assign(G, 1);
  const bool no_multiple = c.N > 1 && chance(rng, 0.3);
  for (std::size_t i = 0; i < G; ++i) {
    const int kind = int(rng() % 10);
    std::int64_t w = kind == 0 ? uniform(rng, c.N + 1, c.N + 20)
                     : kind == 1 ? c.N
                     : kind == 2 ? uniform(rng, 1, 4)
                                 : uniform(rng, 1, std::max<std::int64_t>(1, c.N));
    for (int tries = 0; no_multiple && c.N % w == 0 && tries < 50; ++tries) w = uniform(rng, 2, c.N + 5);
    c.w[i] = w;
    c.r[i] = chance(rng, 0.15) ? w : uniform(rng, 1, std::min<std::int64_t>(w, 4));
  }
  c.mode = chance(rng, 0.5) ? dattn::Mode::grouped : dattn::Mode::longnet;
  c.causal = chance(rng, 0.5);
  // An explicit scale within a factor 2 of the default keeps the softmax as well conditioned as
  // the default's (a much larger one makes it one-hot, where float32 gradients lose all digits).
  if (chance(rng, 0.2)) c.scale = std::uniform_real_distribution<double>(0.5, 2.0)(rng) / std::sqrt(double(c.D));
  c.padding = random_padding(rng, c.B, c.N);
  if (chance(rng, 0.3)) {
    c.dropout_p = std::uniform_real_distribution<double>(0.001, 0.499)(rng);
    c.dropout_seed = rng();
    c.dropout_offset = chance(rng, 0.3) ? rng() : 0;
  }
  if (chance(rng, 0.2)) {  // attend in Hilbert order or a random order
    if (chance(rng, 0.5)) {
      c.order = dattn::hilbert_sequence_order(c.N);
    } else {
      c.order.resize(std::size_t(c.N));
      std::iota(c.order.begin(), c.order.end(), 0);
      std::shuffle(c.order.begin(), c.order.end(), rng);
    }
  }
  c.fused_qkv = chance(rng, 0.5);
  c.fused_dqkv = chance(rng, 0.3);
  c.strided = chance(rng, 0.5);
  if (c.H > 1 && chance(rng, 0.35)) {  // grouped-query heads: k, v with a divisor Hkv < H of H heads
    std::vector<std::int64_t> divisors;
    for (std::int64_t d = 1; d < c.H; ++d)
      if (c.H % d == 0) divisors.push_back(d);
    c.kv_heads = divisors[rng() % divisors.size()];
    c.fused_qkv = c.fused_dqkv = false;  // one [B, N, 3, H, D] buffer holds equal head counts only
  }
  return c;
}

std::string describe(const Case& c) {
  std::ostringstream s;
  s << "Case{seed=" << c.seed << "ull, B=" << c.B << ", N=" << c.N << ", H=" << c.H << ", D=" << c.D
    << ", kv_heads=" << c.kv_heads << ", w={";
  for (std::size_t i = 0; i < c.w.size(); ++i) s << (i ? ", " : "") << c.w[i];
  s << "}, r={";
  for (std::size_t i = 0; i < c.r.size(); ++i) s << (i ? ", " : "") << c.r[i];
  s << "}, mode=" << (c.mode == dattn::Mode::grouped ? "grouped" : "longnet")
    << ", causal=" << c.causal << ", scale=";
  if (c.scale) {
    s.precision(17);
    s << *c.scale;
  } else {
    s << "default";
  }
  s << ", dropout_p=" << c.dropout_p << ", dropout_seed=" << c.dropout_seed << "ull, dropout_offset="
    << c.dropout_offset << "ull, fused_qkv=" << c.fused_qkv << ", fused_dqkv=" << c.fused_dqkv
    << ", strided=" << c.strided << ", padding=";
  if (c.padding.empty()) s << "none";
  for (std::int64_t b = 0; b < c.B && !c.padding.empty(); ++b) {
    s << (b ? "|" : "\"");
    for (std::int64_t n = 0; n < c.N; ++n) s << int(c.padding[std::size_t(b * c.N + n)]);
  }
  if (!c.padding.empty()) s << '"';
  s << ", order=";
  if (c.order.empty()) s << "none";
  for (std::size_t i = 0; i < c.order.size(); ++i) s << (i ? "," : "{") << c.order[i];
  if (!c.order.empty()) s << '}';
  s << '}';
  return s.str();
}

Problem64 make_problem64(const Case& c) {
  Rng rng(c.seed);
  Problem64 p;
  for (Tensor* t : {&p.q, &p.k, &p.v, &p.g}) {
    *t = Tensor::empty({c.B, c.N, t == &p.k || t == &p.v ? c.Hkv() : c.H, c.D}, DType::float64);
    fill_normal(*t, rng);
  }
  std::optional<dattn::TensorView> mask;
  if (!c.padding.empty()) {
    p.mask = Tensor::empty({c.B, c.N}, DType::boolean);
    std::copy(c.padding.begin(), c.padding.end(), p.mask.data<std::uint8_t>());
    mask = p.mask.view();
  }
  p.config = config_of(c, mask);
  p.options.backend = dattn::Backend::reference;
  if (!c.order.empty()) {
    p.order = Tensor::empty({c.N}, DType::int64);
    std::copy(c.order.begin(), c.order.end(), p.order.data<std::int64_t>());
    p.options.position_index = p.order.view();
  }
  return p;
}

void Coverage::add(const Case& c) {
  const auto any = [&](auto pred) {
    for (std::size_t i = 0; i < c.w.size(); ++i)
      if (pred(c.w[i], c.r[i])) return true;
    return false;
  };
  n1 += c.N == 1;
  n_not_multiple += c.N > 1 && !any([&](std::int64_t w, std::int64_t) { return c.N % w == 0; });
  w_over_n += any([&](std::int64_t w, std::int64_t) { return w > c.N; });
  r_eq_w += any([&](std::int64_t w, std::int64_t r) { return w > 1 && r == w; });
  h_lt_g += c.H < std::int64_t(c.w.size());
  odd_d += c.D % 2 == 1;
  causal += c.causal;
  grouped += c.mode == dattn::Mode::grouped;
  longnet += c.mode == dattn::Mode::longnet;
  padding += !c.padding.empty();
  for (std::int64_t b = 0; b < c.B && !c.padding.empty(); ++b)
    if (std::all_of(c.padding.begin() + b * c.N, c.padding.begin() + (b + 1) * c.N, [](auto x) { return x != 0; })) {
      ++empty_batch;
      break;
    }
  dropout += c.dropout_p > 0;
  fused_qkv += c.fused_qkv;
  strided += c.strided;
  position_index += !c.order.empty();
  grouped_query += c.Hkv() != c.H;
}

std::string Coverage::missing() const {
  std::string m;
  const auto need = [&](int count, const char* name) {
    if (count == 0) m += std::string(m.empty() ? "" : ", ") + name;
  };
  need(n1, "N = 1");
  need(n_not_multiple, "N not a multiple of any w");
  need(w_over_n, "w > N");
  need(r_eq_w, "r = w > 1");
  need(h_lt_g, "H < G");
  need(odd_d, "odd D");
  need(causal, "causal");
  need(grouped, "grouped mode");
  need(longnet, "longnet mode");
  need(padding, "key padding");
  need(empty_batch, "fully padded batch");
  need(dropout, "dropout");
  need(fused_qkv, "fused QKV views");
  need(strided, "strided outputs");
  need(position_index, "position_index");
  need(grouped_query, "grouped-query heads");
  return m;
}

}  // namespace dattn_test
