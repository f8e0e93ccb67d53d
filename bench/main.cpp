// dattn-bench: checks each implementation against the float64 reference, then times it.
//
// Prints (stdout) a markdown table: forward and forward+backward time (median [min-max] of
// --repeats runs after --warmup), GFLOP/s (docs/benchmarks.md's FLOP count, forward+backward 3.5x), the
// percentage of the fp32 FMA peak this program measures itself, extra heap during the call and
// the worst relative error; then ratio lines against the PyTorch peers run in the same process
// tree (bench/peers.py). Progress goes to stderr; --json FILE writes everything.
#include <omp.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "dattn/cpu.hpp"
#include "dattn/dattn.hpp"
#include "peak.hpp"
#include "ring.hpp"
#include "sparse.hpp"
#include "memhook.hpp"
#include "stats.hpp"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace dattn_bench;

namespace {

// ---------------------------------------------------------------------------------------------
// Small helpers

const auto g_start = std::chrono::steady_clock::now();

// A progress line on stderr, stamped with the seconds since the start.
template <class... Args>
void progress(const char* fmt, Args... args) {
  std::fprintf(stderr, "%6.1f s  ", std::chrono::duration<double>(std::chrono::steady_clock::now() - g_start).count());
  std::fprintf(stderr, fmt, args...);
  std::fflush(stderr);
}

std::string fmt(const char* f, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

// Three significant digits, no exponent for the usual ranges.
std::string sig3(double x) {
  if (!std::isfinite(x)) return "—";
  const double a = std::fabs(x);
  if (a >= 100) return fmt("%.0f", x);
  if (a >= 10) return fmt("%.1f", x);
  if (a >= 1) return fmt("%.2f", x);
  return fmt("%.3f", x);
}

std::string sci(double x) {
  if (std::isinf(x)) return "inf";
  if (std::isnan(x)) return "nan";
  return fmt("%.1e", x);
}

const char* short_dtype(dattn::DType d) {
  switch (d) {
    case dattn::DType::float32: return "fp32";
    case dattn::DType::bfloat16: return "bf16";
    case dattn::DType::float16: return "fp16";
    default: return "?";
  }
}

std::optional<dattn::DType> parse_dtype(const std::string& s) {
  if (s == "float32" || s == "fp32") return dattn::DType::float32;
  if (s == "bfloat16" || s == "bf16") return dattn::DType::bfloat16;
  if (s == "float16" || s == "fp16") return dattn::DType::float16;
  return std::nullopt;
}

// The 1-minute load average: above ~0.5 something else is running and timings suffer.
double load_average() {
  std::ifstream in("/proc/loadavg");
  double one = -1;
  in >> one;
  return one;
}

// CPU time of the whole machine (from /proc/stat) and of this process, to tell how much of the
// CPUs other processes took while something was timed.
struct CpuSnapshot {
  double busy = 0, total = 0;  // seconds, all CPUs of the machine
  double self = 0;             // seconds, this process (user + system)
  static CpuSnapshot now() {
    CpuSnapshot s;
    std::ifstream in("/proc/stat");
    std::string cpu;
    in >> cpu;
    double v[10] = {};
    for (double& x : v) in >> x;
    const double hz = double(sysconf(_SC_CLK_TCK));
    for (int i = 0; i < 8; ++i) s.total += v[i] / hz;  // user nice system idle iowait irq softirq steal
    s.busy = s.total - (v[3] + v[4]) / hz;
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    s.self = double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + 1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
    return s;
  }
  // Fraction of the machine's CPU capacity that other processes used since `before`.
  double others_since(const CpuSnapshot& before) const {
    const double capacity = total - before.total;
    if (capacity <= 0) return 0;
    return std::clamp((busy - before.busy - (self - before.self)) / capacity, 0.0, 1.0);
  }
};

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  return "unknown CPU";
}

// ---------------------------------------------------------------------------------------------
// Threads: pin OpenMP thread i to the i-th CPU this process may run on.

std::vector<int> allowed_cpus(const cpu_set_t& set) {
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  return cpus;
}

bool pin_threads(int threads, const std::vector<int>& cpus) {
  if (threads > int(cpus.size())) return false;
  bool ok = true;
#pragma omp parallel num_threads(threads) reduction(&& : ok)
  {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpus[std::size_t(omp_get_thread_num())], &one);
    ok = ok && sched_setaffinity(0, sizeof one, &one) == 0;
  }
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Results

struct Row {
  std::string implementation;
  std::string kind;  // "dattn" or "peer"
  Problem problem;
  dattn::DType dtype = dattn::DType::float32;
  std::string status = "ok";  // ok | wrong | error | skipped
  std::string message;
  double max_rel_err = 0;
  json checks = json::object();
  std::optional<Stat> fwd, fwdbwd;
  double fwd_extra_bytes = NAN, fwdbwd_extra_bytes = NAN;
  double contention = NAN;  // share of the CPUs other processes used while this row was timed
};

json errors_json(const Errors& e) {
  return {{"out", e.out}, {"dq", e.dq}, {"dk", e.dk}, {"dv", e.dv}, {"lse", e.lse}, {"finite", e.finite},
          {"rows_checked", e.rows_checked}};
}

json problem_json(const Problem& p) {
  return {{"config", p.name},
          {"B", p.B},
          {"N", p.N},
          {"H", p.H},
          {"D", p.D},
          {"segment_lengths", p.config.segment_lengths},
          {"dilation_rates", p.config.dilation_rates},
          {"mode", p.config.mode == dattn::Mode::grouped ? "grouped" : "longnet"},
          {"causal", p.config.causal}};
}

// ---------------------------------------------------------------------------------------------
// One dattn implementation on one problem and dtype: check, then time.

struct Settings {
  int threads = 1;
  int repeats = 5;
  int warmup = 1;
  double peak_gflops = 0;
  double max_check_pairs = 1.5e6;
  std::uint64_t seed = 1;
  double peer_max_seconds = 4.0;
  double perturb = 0;
};

// Sets DATTN_CPU_ISA for the lifetime of the object (nullptr: leave the library's choice).
struct IsaScope {
  std::optional<std::string> saved;
  bool active = false;
  explicit IsaScope(const char* isa) {
    if (!isa) return;
    active = true;
    if (const char* old = std::getenv("DATTN_CPU_ISA")) saved = old;
    setenv("DATTN_CPU_ISA", isa, 1);
  }
  ~IsaScope() {
    if (!active) return;
    if (saved) setenv("DATTN_CPU_ISA", saved->c_str(), 1);
    else unsetenv("DATTN_CPU_ISA");
  }
};

Row run_dattn(const std::string& label, const char* isa, const Problem& problem, dattn::DType dtype,
              const Settings& s, std::vector<double>* peak_samples) {
  Row row;
  row.implementation = label;
  row.kind = "dattn";
  row.problem = problem;
  row.dtype = dtype;
  IsaScope isa_scope(isa);
  // The bf16 levels run only bfloat16 data on their own kernels; say which kernels other rows ran.
  const dattn::CpuIsa level = dattn::active_cpu_isa();
  if ((level == dattn::CpuIsa::avx512_bf16 || level == dattn::CpuIsa::amx_bf16) && dtype != dattn::DType::bfloat16)
    row.implementation = std::string("dattn fused (avx512 under ") + dattn::cpu_isa_name(level) + ")";
  dattn::LaunchOptions options;
  options.backend = dattn::Backend::fused;
  const std::string tag = "[" + problem.name + " N=" + std::to_string(problem.N) + " " +
                          dattn::dtype_name(dtype) + " " + label + "]";
  try {
    // 1. Reduced problem against the library's float64 reference, whole tensors.
    const auto t0 = std::chrono::steady_clock::now();
    const ReducedCheck reduced = reduced_check(problem, dtype, options, s.max_check_pairs, s.seed, s.perturb);
    progress("%s reduced check (N=%lld, segments/%lld): out %.1e dq %.1e dk %.1e dv %.1e lse %.1e "
             "(reference %.1f s, spot checker self-check %.0e)\n",
             tag.c_str(), (long long)reduced.problem.N, (long long)reduced.factor, reduced.errors.out,
             reduced.errors.dq, reduced.errors.dk, reduced.errors.dv, reduced.errors.lse,
             reduced.reference_seconds, reduced.spot_self_check);
    row.checks["reduced"] = errors_json(reduced.errors);
    row.checks["reduced"]["problem"] = problem_json(reduced.problem);
    row.checks["reduced"]["reference_seconds"] = reduced.reference_seconds;
    row.checks["reduced"]["spot_checker_self_check"] = reduced.spot_self_check;
    row.max_rel_err = reduced.errors.max_rel();
    std::string why;
    if (!reduced.errors.passes(dtype, &why)) {
      row.status = "wrong";
      row.message = "reduced check: " + why;
      progress("%s WRONG (%s): not timed\n", tag.c_str(), row.message.c_str());
      return row;
    }

    // 2. Full size: one forward+backward, sampled rows recomputed in float64.
    CallTensors t = CallTensors::make(problem, dtype, s.seed + 1000);
    const std::int64_t live_before = dattn_memhook_live();
    dattn_memhook_reset_peak();
    dattn::forward(problem.config, t.q, t.k, t.v, t.out, t.lse, options);
    dattn::backward(problem.config, t.q, t.k, t.v, t.out, t.lse, t.dout, t.dq, t.dk, t.dv, options);
    const double first_call_extra = double(dattn_memhook_peak() - live_before);
    if (s.perturb != 0) {
      scale_tensor(t.out, 1 + s.perturb);
      scale_tensor(t.dk, 1 + s.perturb);
    }
    const SpotChecker spot(problem, t.q, t.k, t.v, t.dout);
    Errors full = spot.check(t.out, t.lse, t.dq, t.dk, t.dv, s.seed + 2000);
    full.finite = full.finite && all_finite(t.out) && all_finite(t.dq) && all_finite(t.dk) && all_finite(t.dv);
    progress("%s full-size spot check (%lld rows): out %.1e dq %.1e dk %.1e dv %.1e lse %.1e (checks %.1f s)\n",
             tag.c_str(), (long long)full.rows_checked, full.out, full.dq, full.dk, full.dv, full.lse,
             std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    row.checks["full_size_spot"] = errors_json(full);
    row.max_rel_err = std::max(row.max_rel_err, full.max_rel());
    if (!full.passes(dtype, &why)) {
      row.status = "wrong";
      row.message = "full-size spot check: " + why;
      progress("%s WRONG (%s): not timed\n", tag.c_str(), row.message.c_str());
      return row;
    }

    // 3. Timing, after a short sample of the FMA peak (the run's peak is the best sample).
    if (peak_samples) peak_samples->push_back(measure_fma_peak(s.threads, 2, 0.1).gflops);
    const CpuSnapshot before = CpuSnapshot::now();
    // The checked full-size call above was the first warm-up run of forward+backward.
    Measured fb = measure(
        [&] {
          dattn::forward(problem.config, t.q, t.k, t.v, t.out, t.lse, options);
          dattn::backward(problem.config, t.q, t.k, t.v, t.out, t.lse, t.dout, t.dq, t.dk, t.dv, options);
        },
        s.warmup - 1, s.repeats);
    fb.extra_bytes = std::max(fb.extra_bytes, first_call_extra);
    const Measured fwd = measure(
        [&] { dattn::forward(problem.config, t.q, t.k, t.v, t.out, t.lse, options); }, s.warmup, s.repeats);
    row.contention = CpuSnapshot::now().others_since(before);
    row.fwd = fwd.ms;
    row.fwdbwd = fb.ms;
    row.fwd_extra_bytes = fwd.extra_bytes;
    row.fwdbwd_extra_bytes = fb.extra_bytes;
    const double flops = problem.forward_flops();
    progress("%s forward %.2f ms (%.1f GFLOP/s), forward+backward %.2f ms (%.1f GFLOP/s); other processes took "
             "%.0f%% of the CPUs meanwhile\n",
             tag.c_str(), fwd.ms.median, flops / fwd.ms.median * 1e-6, fb.ms.median, 3.5 * flops / fb.ms.median * 1e-6,
             100 * row.contention);
  } catch (const CheckerBroken&) {
    throw;  // the bench's own checker is broken: nothing it says can be trusted
  } catch (const std::exception& e) {
    row.status = "error";
    row.message = e.what();
    progress("%s ERROR: %s\n", tag.c_str(), e.what());
  }
  return row;
}

// ---------------------------------------------------------------------------------------------
// Peers: bench/peers.py under each Python that has torch.

fs::path exe_dir() {
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  return ec ? fs::current_path() : self.parent_path();
}

std::optional<fs::path> find_first(const std::vector<fs::path>& candidates) {
  for (const auto& p : candidates) {
    std::error_code ec;
    if (!p.empty() && fs::is_regular_file(p, ec)) return p;
  }
  return std::nullopt;
}

// A script of bench/ beside the executable, installed, or in the source tree.
std::optional<fs::path> find_script(const std::string& name) {
  std::vector<fs::path> c;
  c.push_back(exe_dir() / name);
  c.push_back(exe_dir().parent_path() / DATTN_BENCH_INSTALL_DATADIR / name);
#ifdef DATTN_BENCH_SOURCE_DIR
  c.push_back(fs::path(DATTN_BENCH_SOURCE_DIR) / name);
#endif
  return find_first(c);
}

std::optional<fs::path> find_peers_script() {
  if (const char* env = std::getenv("DATTN_BENCH_PEERS")) return fs::path(env);
  return find_script("peers.py");
}

// Debian's python3 (torch 1.x), then a torch 2.x interpreter where there is one.
std::vector<std::string> default_peer_pythons() {
  std::vector<std::string> pythons{fs::exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3"};
  if (const char* t2 = std::getenv("DATTN_TORCH2_PYTHON"); t2 && *t2)
    pythons.push_back(t2);
  else if (fs::exists("/opt/torch2-venv/bin/python"))
    pythons.push_back("/opt/torch2-venv/bin/python");
  return pythons;
}

std::optional<fs::path> find_memhook() {
  return find_first({exe_dir() / "libdattn_memhook.so",
                     exe_dir().parent_path() / DATTN_BENCH_INSTALL_LIBDIR / "libdattn_memhook.so"});
}

// Runs argv with stdout captured; stderr passes through. The child gets `cpus` as its affinity
// (this process's threads are pinned) and the extra environment variables.
int run_captured(const std::vector<std::string>& argv, const std::vector<std::string>& env_add,
                 const cpu_set_t& cpus, std::string* out) {
  int pipefd[2];
  if (pipe(pipefd) != 0) return -1;
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    dup2(pipefd[1], STDOUT_FILENO);
    close(pipefd[0]);
    close(pipefd[1]);
    sched_setaffinity(0, sizeof cpus, &cpus);
    for (const auto& kv : env_add) {
      const auto eq = kv.find('=');
      setenv(kv.substr(0, eq).c_str(), kv.substr(eq + 1).c_str(), 1);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    std::fprintf(stderr, "dattn-bench: cannot run %s: %s\n", args[0], std::strerror(errno));
    _exit(127);
  }
  close(pipefd[1]);
  char buf[65536];
  ssize_t n;
  while ((n = read(pipefd[0], buf, sizeof buf)) > 0) out->append(buf, std::size_t(n));
  close(pipefd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

struct PeerRun {
  std::string python;
  std::string note;  // why it was skipped, or what ran
  json result;
};

std::vector<PeerRun> run_peers(const std::vector<std::string>& pythons, const std::vector<Problem>& problems,
                               const std::vector<dattn::DType>& dtypes, const Settings& s,
                               const cpu_set_t& all_cpus, const std::string& variants) {
  std::vector<PeerRun> runs;
  const auto script = find_peers_script();
  if (!script) {
    runs.push_back({"", "peers skipped: bench/peers.py not found (set DATTN_BENCH_PEERS)", json()});
    return runs;
  }
  const auto memhook = find_memhook();
  json spec;
  spec["threads"] = s.threads;
  spec["repeats"] = s.repeats;
  spec["warmup"] = s.warmup;
  spec["seed"] = s.seed;
  spec["variants"] = variants;
  spec["max_call_seconds"] = s.peer_max_seconds;
  spec["perturb"] = s.perturb;
  spec["start_time"] = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count() -
                       std::chrono::duration<double>(std::chrono::steady_clock::now() - g_start).count();
  for (auto d : dtypes) spec["dtypes"].push_back(dattn::dtype_name(d));
  for (const Problem& p : problems) {
    json pj = problem_json(p);
    const std::int64_t factor = reduction_factor(p, s.max_check_pairs);
    pj["reduced"] = problem_json(scaled_down(p, factor));
    pj["forward_flops"] = p.forward_flops();
    spec["problems"].push_back(pj);
  }
  const std::string spec_path = (fs::temp_directory_path() / ("dattn-bench-peers-" + std::to_string(getpid()) + ".json")).string();
  std::ofstream(spec_path) << spec.dump();

  for (const auto& python : pythons) {
    PeerRun run;
    run.python = python;
    std::vector<std::string> env{"OMP_NUM_THREADS=" + std::to_string(s.threads)};
    if (memhook) env.push_back("LD_PRELOAD=" + memhook->string());
    progress("[peers] %s %s\n", python.c_str(), script->string().c_str());
    std::string out;
    const int rc = run_captured({python, script->string(), "--spec", spec_path}, env, all_cpus, &out);
    if (rc != 0) {
      run.note = "peers under " + python + " skipped: exit status " + std::to_string(rc);
      if (rc == 127) run.note = "peers under " + python + " skipped: interpreter not found";
    } else {
      try {
        run.result = json::parse(out);
        if (run.result.contains("skipped"))
          run.note = "peers under " + python + " skipped: " + run.result["skipped"].get<std::string>();
        else
          run.note = "peers under " + python + ": torch " + run.result.value("torch_version", std::string("?"));
      } catch (const std::exception& e) {
        run.note = "peers under " + python + " skipped: unreadable output (" + std::string(e.what()) + ")";
      }
    }
    progress("[peers] %s\n", run.note.c_str());
    runs.push_back(std::move(run));
  }
  std::remove(spec_path.c_str());
  return runs;
}

Row peer_row(const json& r, const std::vector<Problem>& problems) {
  Row row;
  row.kind = "peer";
  row.implementation = r.value("implementation", std::string("peer"));
  const std::string config = r.value("config", std::string());
  const std::int64_t N = r.value("N", std::int64_t(0));
  for (const Problem& p : problems)
    if (p.name == config && p.N == N) row.problem = p;
  row.dtype = parse_dtype(r.value("dtype", std::string("float32"))).value_or(dattn::DType::float32);
  row.status = r.value("status", std::string("error"));
  row.message = r.value("message", std::string());
  row.max_rel_err = r.value("max_rel_err", NAN);
  if (r.contains("checks")) row.checks = r["checks"];
  auto stat = [](const json& j) {
    Stat s;
    s.median = j.at("median");
    s.min = j.at("min");
    s.max = j.at("max");
    s.samples = j.value("samples", std::vector<double>{});
    return s;
  };
  if (r.contains("fwd_ms") && !r["fwd_ms"].is_null()) row.fwd = stat(r["fwd_ms"]);
  if (r.contains("fwdbwd_ms") && !r["fwdbwd_ms"].is_null()) row.fwdbwd = stat(r["fwdbwd_ms"]);
  if (r.contains("fwd_extra_bytes") && r["fwd_extra_bytes"].is_number()) row.fwd_extra_bytes = r["fwd_extra_bytes"];
  if (r.contains("fwdbwd_extra_bytes") && r["fwdbwd_extra_bytes"].is_number())
    row.fwdbwd_extra_bytes = r["fwdbwd_extra_bytes"];
  if (r.contains("contention") && r["contention"].is_number()) row.contention = r["contention"];
  return row;
}

// ---------------------------------------------------------------------------------------------
// Output

std::string ms_cell(const Stat& s) {
  return sig3(s.median) + " [" + sig3(s.min) + "–" + sig3(s.max) + "]";
}

std::string mb_cell(double bytes) {
  if (std::isnan(bytes)) return "—";
  return sig3(bytes / (1024.0 * 1024.0));
}

constexpr double kBusy = 0.05;  // a row is marked when others took more than 5% of the CPUs

// The peak a row is rated against: bfloat16 rows against the higher of the bf16 dot-product and
// the fp32 FMA peaks (the bf16 kernels may use either; on some CPUs vdpbf16ps does fewer FLOPs per
// cycle than fp32 FMAs, and a % of the lower peak would pass 100), other rows the fp32 FMA peak.
double row_peak(const Row& r, double fp32_peak, double bf16_peak) {
  return r.dtype == dattn::DType::bfloat16 ? std::max(bf16_peak, fp32_peak) : fp32_peak;
}

void print_table(const std::vector<Row>& rows, double fp32_peak, double bf16_peak) {
  std::printf("| implementation | config | dtype | N | fwd ms (median [min–max]) | fwd GFLOP/s | %% peak | "
              "fwd+bwd ms | fwd+bwd GFLOP/s | %% peak | extra MB (fwd / fwd+bwd) | max rel err |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    const double flops = r.problem.forward_flops();
    const bool busy = r.contention > kBusy;
    std::printf("| %s%s | %s | %s | %lld | ", r.implementation.c_str(), busy ? " †" : "", r.problem.name.c_str(),
                short_dtype(r.dtype), (long long)r.problem.N);
    if (r.status != "ok" || !r.fwd || !r.fwdbwd) {
      std::string what = r.status == "wrong" ? "**WRONG**: " : (r.status == "skipped" ? "skipped: " : "**ERROR**: ");
      std::string msg = r.message;
      if (msg.size() > 160) msg = msg.substr(0, 157) + "...";
      std::replace(msg.begin(), msg.end(), '|', '/');
      std::printf("%s%s | — | — | — | — | — | — | %s |\n", what.c_str(), msg.c_str(),
                  (r.status == "wrong" || r.status == "skipped") && !std::isnan(r.max_rel_err)
                      ? sci(r.max_rel_err).c_str()
                      : "—");
      continue;
    }
    const double g1 = flops / r.fwd->median * 1e-6, g2 = 3.5 * flops / r.fwdbwd->median * 1e-6;
    const double peak = row_peak(r, fp32_peak, bf16_peak);
    std::printf("%s | %s | %s | %s | %s | %s | %s / %s | %s |\n", ms_cell(*r.fwd).c_str(), sig3(g1).c_str(),
                sig3(100 * g1 / peak).c_str(), ms_cell(*r.fwdbwd).c_str(), sig3(g2).c_str(),
                sig3(100 * g2 / peak).c_str(), mb_cell(r.fwd_extra_bytes).c_str(),
                mb_cell(r.fwdbwd_extra_bytes).c_str(), sci(r.max_rel_err).c_str());
  }
}

std::vector<json> ratios(const std::vector<Row>& rows) {
  // dattn against every peer on the same problem in the same dtype; where a peer has no valid
  // row in that dtype (say torch 1.13's bf16 composition fails the bar), against its fp32 row.
  std::vector<json> result;
  auto same_problem = [](const Row& a, const Row& b) {
    return b.problem.name == a.problem.name && b.problem.N == a.problem.N;
  };
  for (const Row& a : rows) {
    if (a.kind != "dattn" || a.status != "ok") continue;
    std::vector<std::string> peers;
    for (const Row& b : rows)
      if (b.kind == "peer" && same_problem(a, b) &&
          std::find(peers.begin(), peers.end(), b.implementation) == peers.end())
        peers.push_back(b.implementation);
    for (const std::string& peer : peers) {
      const Row* match = nullptr;
      for (const Row& b : rows)
        if (b.kind == "peer" && b.implementation == peer && same_problem(a, b) && b.status == "ok" && b.dtype == a.dtype)
          match = &b;
      if (!match)
        for (const Row& b : rows)
          if (b.kind == "peer" && b.implementation == peer && same_problem(a, b) && b.status == "ok" &&
              b.dtype == dattn::DType::float32)
            match = &b;
      if (!match) continue;
      result.push_back({{"implementation", a.implementation},
                        {"peer", peer},
                        {"config", a.problem.name},
                        {"N", a.problem.N},
                        {"dtype", dattn::dtype_name(a.dtype)},
                        {"peer_dtype", dattn::dtype_name(match->dtype)},
                        {"forward_speedup", match->fwd->median / a.fwd->median},
                        {"forward_backward_speedup", match->fwdbwd->median / a.fwdbwd->median}});
    }
  }
  return result;
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"dattn-bench: check each dilated-attention implementation against the float64 reference, "
               "then time it beside the PyTorch peers (docs/benchmarks.md)"};
  std::string config = "all";
  std::vector<std::int64_t> ns;
  std::vector<std::string> dtype_names;
  std::string mode = "grouped";
  int threads = 0;
  int repeats = 5;
  int warmup = 1;
  std::string json_path;
  bool no_peers = false, quick = false;
  std::string isa = "auto";
  std::vector<std::string> peer_pythons;
  std::string peer_variants = "auto";
  std::uint64_t seed = 1;
  double max_check_pairs = 1.5e6;
  double peer_max_seconds = 4.0;
  double perturb = 0;

  app.add_option("--config", config, "seed, long64k or all")
      ->check(CLI::IsMember({"seed", "long64k", "all"}))
      ->capture_default_str();
  app.add_option("--n", ns,
                 "sequence length(s) of the long64k-shaped sweep (same segments and rates as long64k, B=1); "
                 "default 4096,8192 (4096 with --quick); 16384 is docs/benchmarks.md's CPU anchor shape")
      ->delimiter(',');
  app.add_option("--dtype", dtype_names, "float32, bfloat16, float16 (comma list); default float32,bfloat16")
      ->delimiter(',');
  app.add_option("--mode", mode, "grouped or longnet")->check(CLI::IsMember({"grouped", "longnet"}))->capture_default_str();
  app.add_option("--threads", threads, "threads (default: the CPUs this process may use)");
  app.add_option("--repeats", repeats, "timed runs per measurement (median, min, max)")
      ->check(CLI::Range(5, 100000))
      ->capture_default_str();
  app.add_option("--warmup", warmup, "untimed runs before the timed ones")->check(CLI::Range(1, 1000))->capture_default_str();
  app.add_option("--json", json_path, "write all results as JSON to this file");
  app.add_flag("--no-peers", no_peers, "do not run the PyTorch peers");
  app.add_flag("--quick", quick,
               "a short run: seed and long64k shapes at N=4096, float32 (unless --n or --dtype say otherwise)");
  app.add_option("--isa", isa, "CPU kernels to bench: auto (the library's choice), scalar, avx2, avx512, avx512_bf16, amx_bf16 or all supported")
      ->check(CLI::IsMember({"auto", "scalar", "avx2", "avx512", "avx512_bf16", "amx_bf16", "all"}))
      ->capture_default_str();
  app.add_option("--peer-python", peer_pythons,
                 "Python interpreter(s) for bench/peers.py (default: /usr/bin/python3 and $DATTN_TORCH2_PYTHON or "
                 "/opt/torch2-venv/bin/python where present)");
  app.add_option("--peer-variants", peer_variants,
                 "auto (matmul+softmax composition under torch 1.x, per-group SDPA under torch 2.x), matmul, sdpa or all")
      ->check(CLI::IsMember({"auto", "matmul", "sdpa", "all"}))
      ->capture_default_str();
  app.add_option("--peer-max-seconds", peer_max_seconds,
                 "a peer row whose first full-size forward+backward takes longer is checked but not timed "
                 "(keeps the run short; dattn rows are always timed)")
      ->capture_default_str();
  app.add_option("--seed", seed, "random seed of the inputs")->capture_default_str();
  app.add_option("--perturb", perturb,
                 "self-test of the checks: multiply every implementation's out and dk by (1 + X) before they are "
                 "checked; with X above the dtype's bar every row must come out WRONG")
      ->group("Self-test");
  app.add_option("--check-pairs", max_check_pairs,
                 "attention pairs of the reduced problem the float64 reference checks (its cost)")
      ->capture_default_str();
  std::vector<int> ring_ranks;
  std::int64_t ring_rows = 4096;
  std::string ring_svg;
  app.add_option("--ring", ring_ranks,
                 "ring attention over P in-process ranks (comma list, e.g. 2,4,8) on docs/benchmarks.md's geo(N), beside an "
                 "all-gather of k, v; N = P x --ring-rows unless --n gives N; dtype bfloat16 unless --dtype")
      ->delimiter(',');
  app.add_option("--ring-rows", ring_rows, "rows per rank (N/P) of the --ring sweep")->capture_default_str();
  app.add_option("--ring-svg", ring_svg, "write a plot of per-rank peak heap against N (--ring) to this SVG file");
  bool sparse = false;
  std::vector<std::string> sparse_parts{"block", "hilbert"};
  app.add_option("--sparse-parts", sparse_parts, "tables of --sparse: block, hilbert (comma list)")
      ->delimiter(',')
      ->check(CLI::IsMember({"block", "hilbert"}));
  app.add_flag("--sparse", sparse,
               "block-sparse attention (docs/benchmarks.md's N=2048 shape beside torch SDPA with a dense token mask, and "
               "N=16384) and Hilbert-ordered dilated attention beside row-major, instead of the dilated table");
  CLI11_PARSE(app, argc, argv);
  if (sparse) {
    SparseBenchSettings ss;
    ss.threads = threads > 0 ? threads : std::max(1, int(std::thread::hardware_concurrency()));
    omp_set_dynamic(0);
    omp_set_num_threads(ss.threads);
    ss.warmup = warmup;
    ss.repeats = repeats;
    ss.seed = seed;
    ss.peak_gflops = measure_fma_peak(ss.threads).gflops;
    ss.block_sparse = std::find(sparse_parts.begin(), sparse_parts.end(), "block") != sparse_parts.end();
    ss.hilbert = std::find(sparse_parts.begin(), sparse_parts.end(), "hilbert") != sparse_parts.end();
    for (const auto& python : default_peer_pythons())
      if (python != "/usr/bin/python3") ss.peer_python = python;  // Debian's torch 1.13 has no SDPA
    if (const auto script = find_script("sparse_peers.py")) ss.peer_script = script->string();
    const json result = run_sparse_bench(ss);
    if (!json_path.empty()) std::ofstream(json_path) << result.dump(2) << "\n";
    for (const auto& row : result["rows"])
      if (row["implementation"].get<std::string>().rfind("dattn", 0) == 0 && !row["ok"].get<bool>()) return 1;
    return 0;
  }
  if (!ring_ranks.empty()) {
    RingBenchSettings rs;
    rs.ranks = ring_ranks;
    rs.lengths = ns;
    rs.rows_per_rank = ring_rows;
    if (!dtype_names.empty()) {
      const auto d = parse_dtype(dtype_names.front());
      if (!d) throw std::runtime_error("unknown dtype '" + dtype_names.front() + "'");
      rs.dtype = *d;
    }
    rs.threads = threads > 0 ? threads : std::max(1, int(std::thread::hardware_concurrency()));
    rs.warmup = warmup;
    rs.repeats = repeats == 5 ? 3 : repeats;
    rs.seed = seed;
    rs.svg_path = ring_svg;
    const json result = run_ring_bench(rs);
    if (!json_path.empty()) std::ofstream(json_path) << result.dump(2) << "\n";
    return result["ok"].get<bool>() ? 0 : 1;
  }

  std::vector<dattn::DType> dtypes;
  if (dtype_names.empty()) dtype_names = quick ? std::vector<std::string>{"float32"}
                                               : std::vector<std::string>{"float32", "bfloat16"};
  for (const auto& n : dtype_names) {
    const auto d = parse_dtype(n);
    if (!d) {
      std::fprintf(stderr, "dattn-bench: unknown dtype '%s' (expected float32, bfloat16 or float16)\n", n.c_str());
      return 2;
    }
    dtypes.push_back(*d);
  }
  if (ns.empty()) ns = quick ? std::vector<std::int64_t>{4096} : std::vector<std::int64_t>{4096, 8192};
  for (auto n : ns)
    if (n < 1) {
      std::fprintf(stderr, "dattn-bench: --n must be >= 1\n");
      return 2;
    }

  const auto wall0 = std::chrono::steady_clock::now();
  cpu_set_t all_cpus;
  CPU_ZERO(&all_cpus);
  sched_getaffinity(0, sizeof all_cpus, &all_cpus);
  const std::vector<int> cpus = allowed_cpus(all_cpus);
  if (threads <= 0) threads = std::max<int>(1, int(cpus.size()));
  omp_set_dynamic(0);
  omp_set_num_threads(threads);
  const bool pinned = pin_threads(threads, cpus);

  Settings s;
  s.threads = threads;
  s.repeats = repeats;
  s.warmup = warmup;
  s.seed = seed;
  s.max_check_pairs = max_check_pairs;
  s.peer_max_seconds = peer_max_seconds;
  s.perturb = perturb;

  // Problems (docs/benchmarks.md).
  const dattn::Mode dmode = mode == "grouped" ? dattn::Mode::grouped : dattn::Mode::longnet;
  std::vector<Problem> problems;
  if (config == "seed" || config == "all") {
    Problem p;
    p.name = "seed";
    p.B = 2;
    p.N = 2048;
    p.H = 12;
    p.D = 64;
    p.config.segment_lengths = {512, 1024, 2048};
    p.config.dilation_rates = {1, 2, 4};
    p.config.mode = dmode;
    problems.push_back(p);
  }
  if (config == "long64k" || config == "all")
    for (auto n : ns) {
      Problem p;
      p.name = "long64k";
      p.B = 1;
      p.N = n;
      p.H = 12;
      p.D = 64;
      p.config.segment_lengths = {2048, 4096, 8192, 16384};
      p.config.dilation_rates = {1, 2, 4, 8};
      p.config.mode = dmode;
      problems.push_back(p);
    }

  // Implementations.
  std::vector<std::pair<std::string, const char*>> impls;  // label, forced ISA
  const char* isa_names[] = {"scalar", "avx2", "avx512", "avx512_bf16", "amx_bf16"};
  const dattn::CpuIsa isa_values[] = {dattn::CpuIsa::scalar, dattn::CpuIsa::avx2, dattn::CpuIsa::avx512,
                                      dattn::CpuIsa::avx512_bf16, dattn::CpuIsa::amx_bf16};
  if (isa == "auto") {
    impls.push_back({std::string("dattn fused (") + dattn::cpu_isa_name(dattn::active_cpu_isa()) + ")", nullptr});
  } else {
    for (int i = 0; i < 5; ++i)
      if ((isa == "all" || isa == isa_names[i])) {
        if (!dattn::cpu_supports(isa_values[i])) {
          if (isa != "all") {
            std::fprintf(stderr, "dattn-bench: this CPU does not support %s\n", isa_names[i]);
            return 2;
          }
          continue;
        }
        impls.push_back({std::string("dattn fused (") + isa_names[i] + ")", isa_names[i]});
      }
  }

  if (perturb != 0)
    progress("--perturb %g: outputs are deliberately corrupted, every row should be WRONG\n", perturb);
  const double load_start = load_average();
  progress("dattn-bench: %s, %d thread(s)%s, load average %.2f\n", cpu_model().c_str(), threads,
           pinned ? " pinned one per CPU" : " (not pinned: more threads than CPUs)", load_start);
  if (load_start > 0.5)
    progress("warning: load average %.2f: other processes are using the CPUs, timings will be noisy\n", load_start);
  PeakResult peak = measure_fma_peak(threads);
  std::vector<double> peak_samples{peak.gflops};
  progress("measured fp32 FMA peak: %.1f GFLOP/s (%s, %d threads); sampled again before each timing, the best "
           "sample is used\n",
           peak.gflops, peak.isa.c_str(), threads);
  PeakResult bf16_peak = measure_dot_bf16_peak(threads);
  std::vector<double> bf16_peak_samples{bf16_peak.gflops};
  if (bf16_peak.gflops > 0)
    progress("measured bf16 dot-product peak: %.1f GFLOP/s (vdpbf16ps, %d threads); sampled again at the end\n",
             bf16_peak.gflops, threads);

  std::vector<Row> rows;
  for (const Problem& p : problems)
    for (auto dtype : dtypes)
      for (const auto& [label, forced] : impls) rows.push_back(run_dattn(label, forced, p, dtype, s, &peak_samples));

  // Peers.
  std::vector<std::string> peer_notes;
  json peer_json = json::array();
  if (no_peers) {
    peer_notes.push_back("peers skipped: --no-peers");
  } else if (dmode != dattn::Mode::grouped) {
    peer_notes.push_back("peers skipped: the PyTorch compositions compute grouped mode only");
  } else {
    if (peer_pythons.empty()) {
      peer_pythons = default_peer_pythons();
      if (peer_pythons.size() < 2)
        peer_notes.push_back("no torch 2.x interpreter (set DATTN_TORCH2_PYTHON): per-group SDPA not run");
    }
    for (PeerRun& run : run_peers(peer_pythons, problems, dtypes, s, all_cpus, peer_variants)) {
      peer_notes.push_back(run.note);
      json entry = {{"python", run.python}, {"note", run.note}};
      if (!run.result.is_null()) {
        entry["result"] = run.result;
        if (run.result.contains("rows"))
          for (const json& r : run.result["rows"]) rows.push_back(peer_row(r, problems));
      }
      peer_json.push_back(entry);
    }
    pin_threads(threads, cpus);
  }

  // The peak again (a busy machine at the start would otherwise inflate every % of peak).
  peak_samples.push_back(measure_fma_peak(threads).gflops);
  peak.gflops = *std::max_element(peak_samples.begin(), peak_samples.end());
  progress("fp32 FMA peak: best of %zu samples %.1f GFLOP/s (lowest %.1f)\n", peak_samples.size(), peak.gflops,
           *std::min_element(peak_samples.begin(), peak_samples.end()));
  if (bf16_peak.gflops > 0) {
    bf16_peak_samples.push_back(measure_dot_bf16_peak(threads).gflops);
    bf16_peak.gflops = *std::max_element(bf16_peak_samples.begin(), bf16_peak_samples.end());
  }
  std::string bf16_peak_text = ", no bf16 dot-product instruction (bf16 rows' % peak is of fp32)";
  if (bf16_peak.gflops > 0)
    bf16_peak_text = ", bf16 dot-product peak " + fmt("%.1f", bf16_peak.gflops) + " GFLOP/s (vdpbf16ps; bf16 rows' % peak " +
                     (bf16_peak.gflops > peak.gflops ? "is of this one)" : "is of the higher fp32 peak)");
  const double load_end = load_average();

  // Table, grouped by problem and dtype.
  std::vector<Row> ordered;
  for (const Problem& p : problems)
    for (auto dtype : dtypes)
      for (const Row& r : rows)
        if (r.problem.name == p.name && r.problem.N == p.N && r.dtype == dtype) ordered.push_back(r);
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();

  std::printf("\n## dattn-bench: %s, %d thread(s), measured fp32 FMA peak %.1f GFLOP/s (%s)%s, load average %.2f / "
              "%.2f (start / end)\n\n",
              cpu_model().c_str(), threads, peak.gflops, peak.isa.c_str(), bf16_peak_text.c_str(), load_start,
              load_end);
  print_table(ordered, peak.gflops, bf16_peak.gflops);
  const auto ratio_list = ratios(ordered);
  if (!ratio_list.empty()) std::printf("\n");
  for (const json& r : ratio_list) {
    const double f = r["forward_speedup"], fb = r["forward_backward_speedup"];
    auto word = [](double x) { return x >= 1 ? fmt("%.2f× faster", x) : fmt("%.2f× slower", 1 / x); };
    const std::string dtype = r["dtype"], peer_dtype = r["peer_dtype"];
    const std::string dtypes_text = dtype == peer_dtype ? std::string(short_dtype(*parse_dtype(dtype)))
                                                        : std::string(short_dtype(*parse_dtype(dtype))) + " vs the peer's " +
                                                              short_dtype(*parse_dtype(peer_dtype));
    std::printf("- %s vs %s (%s, %s, N=%lld): forward %s, forward+backward %s\n",
                r["implementation"].get<std::string>().c_str(), r["peer"].get<std::string>().c_str(),
                r["config"].get<std::string>().c_str(), dtypes_text.c_str(), (long long)r["N"].get<std::int64_t>(),
                word(f).c_str(), word(fb).c_str());
  }
  std::printf("\n");
  double worst = 0;
  for (const Row& r : ordered)
    if (r.contention > worst) worst = r.contention;
  if (worst > kBusy)
    std::printf("- † other processes used more than %.0f%% of the CPUs while this row was timed (worst %.0f%%): "
                "its times are not trustworthy\n", 100 * kBusy, 100 * worst);
  for (const auto& note : peer_notes) std::printf("- %s\n", note.c_str());
  std::printf(
      "\nseed: B=2 N=2048 H=12 D=64 segments [512,1024,2048] rates [1,2,4]; long64k: B=1 H=12 D=64 segments "
      "[2048,4096,8192,16384] rates [1,2,4,8] at the N shown; mode %s, not causal. Inputs fresh N(0,1).\n"
      "Times: steady clock, median [min–max] of %d runs after %d warm-up run(s) (for fwd+bwd the checked full-size "
      "call is the first); fwd+bwd = forward then backward. "
      "GFLOP/s: docs/benchmarks.md's count (4·B·H_i·pairs·D), fwd+bwd 3.5×; %% peak of the fp32 FMA peak measured above "
      "(register-resident %s FMA loop on the same %d thread(s), best of samples taken at the start, before each "
      "dattn timing and at the end); bf16 rows of the higher of that and the bf16 dot-product peak where the CPU has vdpbf16ps "
      "(register-resident loop of it, 2 FLOPs per product, best of the start and end samples).\n"
      "Extra MB: heap high-water mark during the call above the heap before it (malloc interposed, OpenMP and "
      "library scratch included; mmap'd memory and stacks are not), outputs and lse excluded (preallocated for "
      "dattn; subtracted for the peers), max over all runs.\n"
      "Checks before timing: (1) the same call on a scaled-down problem (N and segment lengths divided by a power "
      "of two, rates and N:segment ratios kept, same B, H, D) against the library's float64 reference over whole "
      "tensors (out, dq, dk, dv relative L2; lse); (2) at full size, for every branch one random (batch, head, "
      "segment), sampled query rows (out, lse, dq) and key rows (dk, dv), selected and unselected, recomputed in "
      "float64 by the bench (itself checked against the reference on (1)), plus a NaN/Inf scan of all outputs. "
      "Max rel err is the worst of both; SPEC bars: fp32 1e-5, bf16 1.5e-2, fp16 3e-3. A row failing either "
      "check is WRONG and not timed. Peers are checked the same way against float64 torch (peers.py).\n"
      "Total run time: %.0f s.\n",
      mode.c_str(), repeats, warmup, peak.isa.c_str(), threads, total_s);

  if (!json_path.empty()) {
    json j;
    j["tool"] = "dattn-bench";
    j["machine"] = {{"cpu", cpu_model()},
                    {"threads", threads},
                    {"pinned", pinned},
                    {"dattn_isa", dattn::cpu_isa_name(dattn::active_cpu_isa())},
                    {"peak_gflops_fp32", peak.gflops},
                    {"peak_isa", peak.isa},
                    {"peak_samples_gflops", peak_samples},
                    {"peak_gflops_bf16_dot", bf16_peak.gflops > 0 ? json(bf16_peak.gflops) : json(nullptr)},
                    {"peak_bf16_dot_samples_gflops", bf16_peak_samples},
                    {"load_average_start", load_start},
                    {"load_average_end", load_end}};
    j["settings"] = {{"repeats", repeats}, {"warmup", warmup}, {"seed", seed}, {"mode", mode}, {"check_pairs", max_check_pairs},
                     {"peer_max_seconds", peer_max_seconds}, {"perturb", perturb}};
    j["rows"] = json::array();
    for (const Row& r : ordered) {
      json row = problem_json(r.problem);
      row["implementation"] = r.implementation;
      row["kind"] = r.kind;
      row["dtype"] = dattn::dtype_name(r.dtype);
      row["status"] = r.status;
      if (!r.message.empty()) row["message"] = r.message;
      row["max_rel_err"] = std::isfinite(r.max_rel_err) ? json(r.max_rel_err) : json(nullptr);
      row["checks"] = r.checks;
      const double flops = r.problem.forward_flops();
      row["forward_flops"] = flops;
      if (r.status == "ok" && r.fwd && r.fwdbwd) {
        row["fwd_ms"] = stat_json(*r.fwd);
        row["fwdbwd_ms"] = stat_json(*r.fwdbwd);
        row["fwd_gflops"] = flops / r.fwd->median * 1e-6;
        row["fwdbwd_gflops"] = 3.5 * flops / r.fwdbwd->median * 1e-6;
        const double rated = row_peak(r, peak.gflops, bf16_peak.gflops);
        row["pct_peak_of"] = rated == peak.gflops ? "fp32_fma" : "bf16_dot";
        row["fwd_pct_peak"] = 100 * flops / r.fwd->median * 1e-6 / rated;
        row["fwdbwd_pct_peak"] = 100 * 3.5 * flops / r.fwdbwd->median * 1e-6 / rated;
        row["fwd_extra_mb"] = std::isnan(r.fwd_extra_bytes) ? json(nullptr) : json(r.fwd_extra_bytes / 1048576.0);
        row["fwdbwd_extra_mb"] =
            std::isnan(r.fwdbwd_extra_bytes) ? json(nullptr) : json(r.fwdbwd_extra_bytes / 1048576.0);
        row["contention"] = std::isnan(r.contention) ? json(nullptr) : json(r.contention);
      }
      j["rows"].push_back(row);
    }
    j["ratios"] = ratio_list;
    j["peers"] = peer_json;
    j["notes"] = peer_notes;
    j["total_seconds"] = total_s;
    std::ofstream out(json_path);
    if (!out) {
      std::fprintf(stderr, "dattn-bench: cannot write %s\n", json_path.c_str());
      return 1;
    }
    out << j.dump(2) << "\n";
    progress("wrote %s\n", json_path.c_str());
  }
  progress("dattn-bench: done in %.0f s\n", total_s);
  // Exit status 1 when a dattn implementation is wrong or failed, so the bench can gate a change.
  for (const Row& r : ordered)
    if (r.kind == "dattn" && r.status != "ok") return 1;
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const CheckerBroken& e) {
    std::fprintf(stderr, "dattn-bench: internal error: %s\n", e.what());
    return 3;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dattn-bench: error: %s\n", e.what());
    return 3;
  }
}
