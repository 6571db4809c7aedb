// longtune bench adamw: the host AdamW step over N parameters against the memory bandwidth of the
// same machine, threads and placement (docs/benchmarks.md, "AdamW on the host").
//
// Kokkos fixes its OpenMP thread count at initialization, so each thread count of --threads runs
// in a forked child process that initializes Kokkos with that many threads; the parent only parses
// options, collects each child's numbers through a pipe and prints the table.
#include <omp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <Kokkos_Core.hpp>
#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "src/cli/bench.hpp"
#include "src/cli/options.hpp"
#include "src/common/error.hpp"
#include "src/memory/host_memory.hpp"
#include "src/optim/adamw.hpp"
#include "src/optim/kokkos_scope.hpp"
#include "src/optim/kokkos_views.hpp"

namespace po = boost::program_options;

namespace longtune::cli {

namespace {

struct BenchOptions {
  int64_t params = 0;
  int steps = 10, warmup = 2, stream_reps = 5;
  NumaPlacement placement;
  std::string compute = "bf16";
  SimdLevel simd = SimdLevel::Auto;
  StreamingStores streaming = StreamingStores::ComputeCopy;
  bool variants = true;
};

// What a child reports to the parent (plain data through a pipe).
struct BenchResult {
  int threads = 0;
  int64_t trained = 0;
  double bytes_per_param = 0;
  double step_s = 0, step_min_s = 0, clip_step_s = 0;
  double nt_none_s = 0, nt_all_s = 0, nocopy_s = 0, nocopy_nt_all_s = 0;
  double copy_gbs = 0, triad_gbs = 0, triad_best_gbs = 0;
  double pattern_s = 0;
  double norm_s = 0;  // grad_norm_sq alone  // AdamW's loads and stores with trivial arithmetic: the bandwidth ceiling
  char simd[16] = {};
};

int64_t parse_count(const std::string& text) {
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(text, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  double mult = 1;
  const std::string suffix = text.substr(std::min(pos, text.size()));
  if (suffix == "K" || suffix == "k") mult = 1e3;
  else if (suffix == "M" || suffix == "m") mult = 1e6;
  else if (suffix == "G" || suffix == "g" || suffix == "B" || suffix == "b") mult = 1e9;
  else if (!suffix.empty()) pos = 0;
  if (pos == 0 || !(v * mult >= 1.0) || v * mult > 1e12)
    throw ConfigError("--params: expected a count such as 300M, 1.5G or 1000000, got '" + text + "'");
  return int64_t(std::llround(v * mult));
}

std::vector<int> parse_threads(const std::string& text, int cores) {
  std::vector<int> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const long v = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || v < 1 || v > 4096)
      throw ConfigError("--threads: expected a comma-separated list of thread counts, got '" + text + "'");
    if (v <= cores && std::find(out.begin(), out.end(), int(v)) == out.end()) out.push_back(int(v));
  }
  if (out.empty()) out.push_back(cores);
  return out;
}

// Processors OpenMP may use. Not sched_getaffinity(): with OMP_PROC_BIND set, libgomp pins the
// initial thread to one place when it loads, so this process's mask shows a single core.
int available_cores() { return std::max(1, omp_get_num_procs()); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

using Clock = std::chrono::steady_clock;
template <class F>
double time_s(F&& f) {
  const auto t0 = Clock::now();
  f();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Llama-like layout: 4096x4096 matrices (decay) alternating with 4096-element norms (no decay),
// every tensor starting at a multiple of 64 elements, until `params` trained elements.
std::vector<OptimRange> bench_ranges(int64_t params, int64_t* length) {
  std::vector<OptimRange> r;
  int64_t off = 0, left = params;
  for (int k = 0; left > 0; ++k) {
    const bool matrix = k % 2 == 0;
    const int64_t n = std::min(left, matrix ? int64_t(4096) * 4096 : int64_t(4096));
    r.push_back({off, n, matrix});
    off += (n + 63) / 64 * 64;
    left -= n;
  }
  *length = off;
  return r;
}

// Deterministic pseudo-random values in [-1, 1) from an index (splitmix64).
KOKKOS_INLINE_FUNCTION float hash_unit(uint64_t i, uint64_t seed) {
  uint64_t z = i * 0x9e3779b97f4a7c15ull + seed;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return float(int64_t(z >> 40) - (int64_t(1) << 23)) * (1.0f / float(1 << 23));
}

BenchResult bench_one(const BenchOptions& o, int threads) {
  KokkosScope kokkos(threads);
  BenchResult res;
  res.threads = KokkosScope::concurrency();
  int64_t length = 0;
  const std::vector<OptimRange> ranges = bench_ranges(o.params, &length);
  const size_t n = size_t(length);
  const bool copy_out = o.compute != "none";

  // ---- AdamW state in one NUMA-placed arena -------------------------------------------------
  HostArena arena(HostArena::bytes_for({4 * n, 4 * n, 4 * n, 4 * n, copy_out ? 2 * n : 0}), o.placement);
  AdamWBuffers b;
  b.master = arena.carve<float>(n);
  b.exp_avg = arena.carve<float>(n);
  b.exp_avg_sq = arena.carve<float>(n);
  float* grad = arena.carve<float>(n);
  b.grad = grad;
  if (copy_out) {
    b.compute = arena.carve<uint16_t>(n);
    b.compute_dtype = o.compute == "fp16" ? DType::F16 : DType::BF16;
  }
  AdamWConfig cfg;
  cfg.lr = 1e-4;
  cfg.beta2 = 0.95;
  cfg.weight_decay = 0.1;
  cfg.clip = 0.0;
  AdamWExecution exec;
  exec.simd = o.simd;
  exec.streaming = o.streaming;
  AdamW opt(ranges, length, cfg, exec);
  res.trained = opt.num_trained();
  res.bytes_per_param = copy_out ? 30.0 : 28.0;
  std::snprintf(res.simd, sizeof res.simd, "%s", std::string(simd_level_name(opt.simd())).c_str());
  opt.first_touch(b);  // pages placed by the policy, faulted with the update's thread split
  {
    const HostF32 p(b.master, n), m(b.exp_avg, n), v(b.exp_avg_sq, n), g(grad, n);
    Kokkos::parallel_for(
        "bench::init", HostRange<>(0, length), KOKKOS_LAMBDA(int64_t i) {
          p(i) = 0.02f * hash_unit(uint64_t(i), 1);
          g(i) = 1e-3f * hash_unit(uint64_t(i), 2);
          m(i) = 0.0f;
          v(i) = 0.0f;
        });
    Kokkos::fence();
  }
  int64_t step = 0;
  // Median (and minimum) seconds of `steps` updates after `warmup` ones.
  auto time_updates = [&](const AdamW& a, const AdamWBuffers& bufs, bool with_clip, double* min_s) {
    for (int i = 0; i < o.warmup; ++i) a.update(bufs, ++step, cfg.lr);
    std::vector<double> t;
    for (int i = 0; i < o.steps; ++i)
      t.push_back(time_s([&] {
        if (with_clip) a.step(bufs, ++step, cfg.lr);
        else a.update(bufs, ++step, cfg.lr);
      }));
    if (min_s) *min_s = *std::min_element(t.begin(), t.end());
    return median(t);
  };
  res.step_s = time_updates(opt, b, false, &res.step_min_s);
  if (o.variants) {
    // The same update with the other store kinds, and without the compute copy (torch's 28 B/param).
    AdamWBuffers nocopy = b;
    nocopy.compute = nullptr;
    auto with_streaming = [&](StreamingStores st) {
      AdamWExecution e = exec;
      e.streaming = st;
      return AdamW(ranges, length, cfg, e);
    };
    res.nt_none_s = time_updates(with_streaming(StreamingStores::None), b, false, nullptr);
    res.nt_all_s = time_updates(with_streaming(StreamingStores::All), b, false, nullptr);
    res.nocopy_s = time_updates(with_streaming(StreamingStores::None), nocopy, false, nullptr);
    res.nocopy_nt_all_s = time_updates(with_streaming(StreamingStores::All), nocopy, false, nullptr);
  }
  cfg.clip = 1.0;
  opt.set_config(cfg);
  res.clip_step_s = time_updates(opt, b, true, nullptr);
  {
    std::vector<double> t;
    double sink = 0;
    for (int r = 0; r < o.warmup + o.steps; ++r) {
      const double d = time_s([&] { sink += opt.grad_norm_sq(grad); });
      if (r >= o.warmup) t.push_back(d);
    }
    res.norm_s = median(t);
    if (!(sink >= 0)) std::printf("unexpected gradient norm\n");
  }
  {
    // The update's memory traffic (read p, m, v, g; write p, m, v and a 16-bit copy) with trivial
    // arithmetic and the same blocks and threads: what the update would take if it were free.
    const HostF32 p(b.master, n), m(b.exp_avg, n), v(b.exp_avg_sq, n);
    const HostConstF32 g(b.grad, n);
    const HostU16 out(b.compute, b.compute ? n : 0);
    constexpr int64_t kChunk = AdamW::kBlock;
    const int64_t chunks = (length + kChunk - 1) / kChunk;
    std::vector<double> t;
    for (int r = 0; r < o.warmup + o.steps; ++r) {
      const double d = time_s([&] {
        Kokkos::parallel_for(
            "bench::adamw_pattern", HostRange<>(0, chunks), KOKKOS_LAMBDA(int64_t k) {
              const int64_t lo = k * kChunk, hi = std::min(length, lo + kChunk);
              float* __restrict pp = p.data();
              float* __restrict mp = m.data();
              float* __restrict vp = v.data();
              const float* __restrict gp = g.data();
              uint16_t* __restrict op = out.data();
              if (op) {
                for (int64_t i = lo; i < hi; ++i) {
                  const float x = gp[i], pv = pp[i] + x;
                  pp[i] = pv;
                  mp[i] += x;
                  vp[i] -= x;
                  op[i] = uint16_t(std::bit_cast<uint32_t>(pv) >> 16);
                }
              } else {
                for (int64_t i = lo; i < hi; ++i) {
                  const float x = gp[i];
                  pp[i] += x;
                  mp[i] += x;
                  vp[i] -= x;
                }
              }
            });
        Kokkos::fence();
      });
      if (r >= o.warmup) t.push_back(d);
    }
    res.pattern_s = median(t);
  }
  const std::string numa_line = format_numa_usage(host_memory_per_node());

  // ---- STREAM-like copy and triad over arrays of the same length, same threads ----------------
  {
    HostArena sarena(HostArena::bytes_for({4 * n, 4 * n, 4 * n}), o.placement);
    float* a = sarena.carve<float>(n);
    float* bb = sarena.carve<float>(n);
    float* c = sarena.carve<float>(n);
    constexpr int64_t kChunk = 8192;
    const int64_t chunks = (length + kChunk - 1) / kChunk;
    const HostF32 av(a, n), bv(bb, n), cv(c, n);
    Kokkos::parallel_for(
        "bench::stream_init", HostRange<>(0, chunks), KOKKOS_LAMBDA(int64_t k) {
          const int64_t lo = k * kChunk, hi = std::min(length, lo + kChunk);
          for (int64_t i = lo; i < hi; ++i) {
            av(i) = 1.0f;
            bv(i) = 2.0f;
            cv(i) = 0.0f;
          }
        });
    Kokkos::fence();
    std::vector<double> tc, tt;
    for (int r = 0; r < o.stream_reps + 1; ++r) {
      const double dc = time_s([&] {
        Kokkos::parallel_for(
            "bench::stream_copy", HostRange<>(0, chunks), KOKKOS_LAMBDA(int64_t k) {
              const int64_t lo = k * kChunk, hi = std::min(length, lo + kChunk);
              const float* __restrict src = av.data();
              float* __restrict dst = cv.data();
              for (int64_t i = lo; i < hi; ++i) dst[i] = src[i];
            });
        Kokkos::fence();
      });
      const double dt = time_s([&] {
        Kokkos::parallel_for(
            "bench::stream_triad", HostRange<>(0, chunks), KOKKOS_LAMBDA(int64_t k) {
              const int64_t lo = k * kChunk, hi = std::min(length, lo + kChunk);
              float* __restrict dst = av.data();
              const float* __restrict x = bv.data();
              const float* __restrict y = cv.data();
              for (int64_t i = lo; i < hi; ++i) dst[i] = x[i] + 3.0f * y[i];
            });
        Kokkos::fence();
      });
      if (r > 0) {  // the first pass is a warm-up
        tc.push_back(dc);
        tt.push_back(dt);
      }
    }
    res.copy_gbs = 8.0 * double(n) / median(tc) / 1e9;
    res.triad_gbs = 12.0 * double(n) / median(tt) / 1e9;
    res.triad_best_gbs = 12.0 * double(n) / *std::min_element(tt.begin(), tt.end()) / 1e9;
  }

  const double pps = double(res.trained) / res.step_s;
  std::printf("[RESULT] adamw threads=%d simd=%s params=%lld step_ms=%.2f step_min_ms=%.2f params_per_s=%.3e "
              "GB_per_s=%.1f bytes_per_param=%.0f clip_step_ms=%.2f\n",
              res.threads, res.simd, static_cast<long long>(res.trained), res.step_s * 1e3, res.step_min_s * 1e3,
              pps, pps * res.bytes_per_param / 1e9, res.bytes_per_param, res.clip_step_s * 1e3);
  std::printf("[RESULT] adamw_grad_norm threads=%d norm_ms=%.2f read_GB_per_s=%.1f\n", res.threads, res.norm_s * 1e3,
              4.0 * double(res.trained) / res.norm_s / 1e9);
  if (o.variants)
    std::printf("[RESULT] adamw_variants threads=%d streaming_none_ms=%.2f streaming_all_ms=%.2f "
                "no_copy_ms=%.2f no_copy_params_per_s=%.3e no_copy_streaming_all_ms=%.2f\n",
                res.threads, res.nt_none_s * 1e3, res.nt_all_s * 1e3, res.nocopy_s * 1e3,
                double(res.trained) / res.nocopy_s, res.nocopy_nt_all_s * 1e3);
  std::printf("[RESULT] stream threads=%d elements=%zu copy_GB_per_s=%.1f triad_GB_per_s=%.1f triad_best_GB_per_s=%.1f "
              "adamw_pattern_ms=%.2f adamw_pattern_GB_per_s=%.1f\n",
              res.threads, n, res.copy_gbs, res.triad_gbs, res.triad_best_gbs, res.pattern_s * 1e3,
              double(res.trained) * res.bytes_per_param / res.pattern_s / 1e9);
  std::printf("[RESULT] adamw threads=%d arena: %s; %s\n", res.threads, arena.describe().c_str(), numa_line.c_str());
  std::fflush(stdout);
  return res;
}

}  // namespace

int run_bench_adamw(int argc, char** argv) {
  po::options_description desc(
      "longtune bench adamw: host AdamW step time over N parameters (fp32 master, exp_avg, exp_avg_sq,\n"
      "grad, plus the compute-dtype copy: 30 bytes per parameter) against a STREAM-like copy/triad over\n"
      "arrays of the same length, with the same threads and NUMA placement. Each thread count runs in\n"
      "its own process (Kokkos fixes its thread count at start). Run with OMP_PROC_BIND=spread\n"
      "OMP_PLACES=cores.\n\nOptions");
  std::string params_text, threads_text, numa_text, simd_text, streaming_text;
  BenchOptions o;
  desc.add_options()
      ("help,h", "show this help")
      ("params", po::value(&params_text)->default_value("300M"), "parameters to update (K/M/G suffixes)")
      ("threads", po::value(&threads_text)->default_value("1,2,4,8,16"),
       "comma-separated thread counts; counts above the available cores are dropped")
      ("steps", po::value(&o.steps)->default_value(10), "timed steps (median reported)")
      ("warmup", po::value(&o.warmup)->default_value(2), "untimed steps first")
      ("stream-reps", po::value(&o.stream_reps)->default_value(5), "timed copy/triad repetitions")
      ("numa", po::value(&numa_text)->default_value("bind"), "bind, bind:<node>, interleave, weighted-interleave, none")
      ("compute", po::value(&o.compute)->default_value("bf16"), "compute-dtype copy: bf16, fp16 or none")
      ("simd", po::value(&simd_text)->default_value("auto"), "auto, scalar, sse2, avx2 or avx512")
      ("streaming", po::value(&streaming_text)->default_value("copy"),
       "non-temporal stores: none, copy (the compute copy only) or all")
      ("variants", po::value(&o.variants)->default_value(true),
       "also time the other store kinds and the update without the compute copy");
  po::variables_map vm;
  if (!parse_command_line(argc, argv, desc, vm)) return 0;  // --help
  o.params = parse_count(params_text);
  o.placement = parse_numa_placement(numa_text);
  if (o.steps < 1) throw ConfigError("--steps: expected an integer >= 1, got " + std::to_string(o.steps));
  if (o.warmup < 0) throw ConfigError("--warmup: expected an integer >= 0, got " + std::to_string(o.warmup));
  if (o.stream_reps < 1)
    throw ConfigError("--stream-reps: expected an integer >= 1, got " + std::to_string(o.stream_reps));
  if (o.compute != "bf16" && o.compute != "fp16" && o.compute != "none")
    throw ConfigError("--compute: expected bf16, fp16 or none, got '" + o.compute + "'");
  if (simd_text == "auto") o.simd = SimdLevel::Auto;
  else if (simd_text == "scalar") o.simd = SimdLevel::Scalar;
  else if (simd_text == "sse2") o.simd = SimdLevel::SSE2;
  else if (simd_text == "avx2") o.simd = SimdLevel::AVX2;
  else if (simd_text == "avx512") o.simd = SimdLevel::AVX512;
  else throw ConfigError("--simd: expected auto, scalar, sse2, avx2 or avx512, got '" + simd_text + "'");
  if (streaming_text == "none") o.streaming = StreamingStores::None;
  else if (streaming_text == "copy") o.streaming = StreamingStores::ComputeCopy;
  else if (streaming_text == "all") o.streaming = StreamingStores::All;
  else throw ConfigError("--streaming: expected none, copy or all, got '" + streaming_text + "'");
  if (!simd_level_supported(o.simd))
    throw ConfigError("--simd: " + simd_text + " is not supported by this CPU");

  const int cores = available_cores();
  const std::vector<int> threads = parse_threads(threads_text, cores);
  std::printf("longtune bench adamw: %lld parameters, threads %s (of %d available cores), numa %s, compute copy %s\n",
              static_cast<long long>(o.params), threads_text.c_str(), cores, numa_text.c_str(), o.compute.c_str());
  std::fflush(stdout);

  std::vector<BenchResult> results;
  if (Kokkos::is_initialized()) {
    // Kokkos already runs in this process: its thread count is fixed, measure with it.
    std::printf("note: Kokkos is already initialized; measuring with its %d threads only\n", KokkosScope::concurrency());
    results.push_back(bench_one(o, KokkosScope::concurrency()));
  } else {
    for (int t : threads) {
      int fd[2];
      if (pipe(fd) != 0) throw SystemError(std::string("pipe(): ") + std::strerror(errno));
      std::fflush(stdout);
      std::fflush(stderr);
      const pid_t pid = fork();
      if (pid < 0) throw SystemError(std::string("fork(): ") + std::strerror(errno));
      if (pid == 0) {
        close(fd[0]);
        int rc = 0;
        try {
          const BenchResult r = bench_one(o, t);
          rc = write(fd[1], &r, sizeof r) == ssize_t(sizeof r) ? 0 : 1;
        } catch (const std::exception& e) {
          std::fprintf(stderr, "longtune bench adamw (threads %d): error: %s\n", t, e.what());
          rc = 1;
        }
        std::fflush(stdout);
        std::fflush(stderr);
        _exit(rc);
      }
      close(fd[1]);
      BenchResult r;
      const ssize_t got = read(fd[0], &r, sizeof r);
      close(fd[0]);
      int status = 0;
      if (waitpid(pid, &status, 0) < 0) throw SystemError(std::string("waitpid(): ") + std::strerror(errno));
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || got != ssize_t(sizeof r))
        throw Error("bench adamw: the run with " + std::to_string(t) + " threads failed");
      results.push_back(r);
    }
  }

  std::printf("\n| threads | simd | AdamW step ms | params/s | GB/s (%.0f B/param) | step+clip ms | same traffic, no math: ms "
              "| AdamW / no-math time | copy GB/s | triad GB/s |\n",
              results.empty() ? 30.0 : results[0].bytes_per_param);
  std::printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  for (const BenchResult& r : results) {
    const double pps = double(r.trained) / r.step_s;
    const double gbs = pps * r.bytes_per_param / 1e9;
    std::printf("| %d | %s | %.1f | %.2f G | %.1f | %.1f | %.1f | %.2f | %.1f | %.1f |\n", r.threads, r.simd,
                r.step_s * 1e3, pps / 1e9, gbs, r.clip_step_s * 1e3, r.pattern_s * 1e3, r.step_s / r.pattern_s,
                r.copy_gbs, r.triad_gbs);
  }
  if (o.variants && !results.empty()) {
    std::printf("\nStore kinds (step ms; streaming %s is the main column above):\n\n",
                std::string(streaming_stores_name(o.streaming)).c_str());
    std::printf("| threads | bf16 copy, streaming none | bf16 copy, streaming all | no copy, streaming none | "
                "no copy, streaming all | no copy params/s |\n| --- | --- | --- | --- | --- | --- |\n");
    for (const BenchResult& r : results)
      std::printf("| %d | %.1f | %.1f | %.1f | %.1f | %.2f G |\n", r.threads, r.nt_none_s * 1e3, r.nt_all_s * 1e3,
                  r.nocopy_s * 1e3, r.nocopy_nt_all_s * 1e3, double(r.trained) / r.nocopy_s / 1e9);
  }
  return 0;
}

}  // namespace longtune::cli
