// AdamW kernels. Layout of this file:
//  1. SIMD spans: the per-element math of adamw.hpp over a contiguous span, written once with GCC
//     vector extensions (adamw_simd.inc) and compiled per ISA (SSE2 baseline, AVX2, AVX-512F)
//     with FMA contraction off, selected at run time (__builtin_cpu_supports). IEEE add, mul, div
//     and sqrt are exact at every width, so all widths give the scalar result bit for bit.
//  2. The AdamW class: ranges are cut into blocks of at most kBlock elements; Kokkos runs one
//     iteration per block with a static schedule.
#include "src/optim/adamw.hpp"

#include <unistd.h>

#include <Kokkos_Core.hpp>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "src/common/error.hpp"
#include "src/model/param_table.hpp"
#include "src/optim/kokkos_views.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LT_X86 1
#elif defined(__aarch64__)
#include <arm_neon.h>
#define LT_NEON 1
#endif

#if defined(__GNUC__) && !defined(__clang__)
// Vector-extension values passed between always-inline helpers trigger ABI notes only.
#pragma GCC diagnostic ignored "-Wpsabi"
#define LT_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define LT_NO_CONTRACT
#endif
#define LT_INLINE inline __attribute__((always_inline))

namespace longtune {

namespace {

// ---- 1. SIMD spans ---------------------------------------------------------------------------

// fp32 scalars of one update, rounded from double as torch rounds Python floats.
struct StepCoef {
  float wdf;       // 1 - lr * weight_decay (decay blocks), 1 otherwise
  float w1;        // 1 - beta1
  float b2;        // beta2
  float omb2;      // 1 - beta2
  float bc2s;      // sqrt(1 - beta2^step)
  float eps;
  float neg_step;  // -lr / (1 - beta1^step)
  float gcoef;     // clip coefficient
};

enum OutKind { kOutNone = 0, kOutBF16 = 1, kOutF16 = 2 };

struct Span {
  float* __restrict p;
  float* __restrict m;
  float* __restrict v;
  const float* __restrict g;
  uint16_t* __restrict out;  // null unless OUT != kOutNone
  int64_t n;
};

// Scalar element update: the reference the vector code must match bit for bit.
template <int OUT>
LT_INLINE void adamw_element(const Span& s, int64_t i, const StepCoef& c) {
  const float g = s.g[i] * c.gcoef;
  float p = s.p[i] * c.wdf;
  float m = s.m[i];
  m = m + c.w1 * (g - m);
  float v = s.v[i];
  v = v * c.b2 + c.omb2 * g * g;
  const float denom = __builtin_sqrtf(v) / c.bc2s + c.eps;
  p = p + (c.neg_step * m) / denom;
  s.p[i] = p;
  s.m[i] = m;
  s.v[i] = v;
  if constexpr (OUT == kOutBF16) s.out[i] = float_to_bf16(p);
  if constexpr (OUT == kOutF16) s.out[i] = float_to_fp16(p);
}

// The span kernels, once per ISA (adamw_simd.inc).
#define LT_W 4
#define LT_NS simd4
#include "src/optim/adamw_simd.inc"
#undef LT_NS
#undef LT_W

template <int OUT>
LT_NO_CONTRACT void span_scalar(const Span& s, const StepCoef& c) {
  for (int64_t i = 0; i < s.n; ++i) adamw_element<OUT>(s, i, c);
}

#if defined(LT_X86) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2")
#define LT_W 8
#define LT_NS simd8
#include "src/optim/adamw_simd.inc"
#undef LT_NS
#undef LT_W
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f")
#define LT_W 16
#define LT_NS simd16
#include "src/optim/adamw_simd.inc"
#undef LT_NS
#undef LT_W
#pragma GCC pop_options
#define LT_HAVE_WIDE_X86 1
#endif

using SpanFn = void (*)(const Span&, const StepCoef&);
using SumsqFn = double (*)(const float*, int64_t);

// span[out kind][streaming mode]
struct KernelSet {
  SpanFn span[3][3];
  SumsqFn sumsq;
};

#define LT_SPANS(NS)                                                                              \
  {                                                                                               \
    {NS::span<kOutNone, 0>, NS::span<kOutNone, 0>, NS::span<kOutNone, 2>},                       \
        {NS::span<kOutBF16, 0>, NS::span<kOutBF16, 1>, NS::span<kOutBF16, 2>},                   \
        {NS::span<kOutF16, 0>, NS::span<kOutF16, 1>, NS::span<kOutF16, 2>},                      \
  }

KernelSet kernels_for(SimdLevel s) {
  switch (s) {
#ifdef LT_HAVE_WIDE_X86
    case SimdLevel::AVX512: return {LT_SPANS(simd16), simd16::sumsq};
    case SimdLevel::AVX2: return {LT_SPANS(simd8), simd8::sumsq};
#endif
    case SimdLevel::SSE2: return {LT_SPANS(simd4), simd4::sumsq};
    default: {
      KernelSet k{};
      for (int nt = 0; nt < 3; ++nt) {
        k.span[kOutNone][nt] = span_scalar<kOutNone>;
        k.span[kOutBF16][nt] = span_scalar<kOutBF16>;
        k.span[kOutF16][nt] = span_scalar<kOutF16>;
      }
      k.sumsq = simd4::sumsq;
      return k;
    }
  }
}
#undef LT_SPANS

int out_kind(const AdamWBuffers& b) {
  if (!b.compute) return kOutNone;
  return b.compute_dtype == DType::F16 ? kOutF16 : kOutBF16;
}

}  // namespace

// ---- SIMD level ------------------------------------------------------------------------------

std::string_view streaming_stores_name(StreamingStores s) {
  switch (s) {
    case StreamingStores::None: return "none";
    case StreamingStores::ComputeCopy: return "copy";
    case StreamingStores::All: return "all";
  }
  return "?";
}

std::string_view simd_level_name(SimdLevel s) {
  switch (s) {
    case SimdLevel::Auto: return "auto";
    case SimdLevel::Scalar: return "scalar";
    case SimdLevel::SSE2: return "sse2";
    case SimdLevel::AVX2: return "avx2";
    case SimdLevel::AVX512: return "avx512";
  }
  return "?";
}

bool simd_level_supported(SimdLevel s) {
  switch (s) {
    case SimdLevel::Auto:
    case SimdLevel::Scalar: return true;
#if defined(LT_X86) || defined(LT_NEON)
    case SimdLevel::SSE2: return true;  // the 4-lane path (NEON on aarch64)
#endif
#ifdef LT_HAVE_WIDE_X86
    case SimdLevel::AVX2: return __builtin_cpu_supports("avx2");
    case SimdLevel::AVX512: return __builtin_cpu_supports("avx512f");
#endif
    default: return false;
  }
}

SimdLevel best_simd_level() {
  static const SimdLevel best = [] {
    SimdLevel cap = SimdLevel::AVX512;
    if (const char* env = std::getenv("LONGTUNE_SIMD"); env && *env) {
      const std::string e = env;
      if (e == "scalar") cap = SimdLevel::Scalar;
      else if (e == "sse2") cap = SimdLevel::SSE2;
      else if (e == "avx2") cap = SimdLevel::AVX2;
      else if (e != "avx512")
        throw ConfigError("LONGTUNE_SIMD: expected scalar, sse2, avx2 or avx512, got '" + e + "'");
    }
    for (SimdLevel s : {SimdLevel::AVX512, SimdLevel::AVX2, SimdLevel::SSE2})
      if (int(s) <= int(cap) && simd_level_supported(s)) return s;
    return SimdLevel::Scalar;
  }();
  return best;
}

// ---- configuration and ranges ------------------------------------------------------------------

void validate(const AdamWConfig& c) {
  auto bad = [](const char* opt, const std::string& expected, double got) {
    throw ConfigError(std::string(opt) + ": expected " + expected + ", got " + std::to_string(got));
  };
  if (!(c.lr >= 0.0) || !std::isfinite(c.lr)) bad("--lr", "a finite value >= 0", c.lr);
  if (!(c.beta1 >= 0.0 && c.beta1 < 1.0)) bad("--beta1", "a value in [0, 1)", c.beta1);
  if (!(c.beta2 >= 0.0 && c.beta2 < 1.0)) bad("--beta2", "a value in [0, 1)", c.beta2);
  if (!(c.eps >= 0.0) || !std::isfinite(c.eps)) bad("--eps", "a finite value >= 0", c.eps);
  if (!(c.weight_decay >= 0.0) || !std::isfinite(c.weight_decay))
    bad("--weight-decay", "a finite value >= 0", c.weight_decay);
  if (std::isnan(c.clip)) bad("--clip", "a number (<= 0 disables clipping)", c.clip);
}

std::vector<OptimRange> optim_ranges(const ParamTable& table) {
  std::vector<OptimRange> r;
  r.reserve(table.entries().size());
  for (const ParamEntry& e : table.entries()) r.push_back({e.offset, e.numel, e.decay()});
  std::sort(r.begin(), r.end(), [](const OptimRange& a, const OptimRange& b) { return a.offset < b.offset; });
  return r;
}

std::vector<OptimRange> shard_ranges(const std::vector<OptimRange>& ranges, int64_t begin, int64_t end) {
  LT_CHECK(begin >= 0 && begin <= end, "shard_ranges: bad shard bounds");
  std::vector<OptimRange> out;
  for (const OptimRange& r : ranges) {
    const int64_t lo = std::max(r.offset, begin), hi = std::min(r.offset + r.numel, end);
    if (lo < hi) out.push_back({lo - begin, hi - lo, r.decay});
  }
  return out;
}

// ---- AdamW -----------------------------------------------------------------------------------

AdamW::AdamW(std::vector<OptimRange> ranges, int64_t length, const AdamWConfig& cfg, AdamWExecution exec)
    : cfg_(cfg), ranges_(std::move(ranges)), length_(length), serial_(exec.serial), streaming_(exec.streaming) {
  validate(cfg_);
  LT_CHECK(length_ >= 0, "AdamW: negative length");
  simd_ = exec.simd == SimdLevel::Auto ? best_simd_level() : exec.simd;
  if (!simd_level_supported(simd_))
    throw ConfigError("AdamW: SIMD level " + std::string(simd_level_name(simd_)) + " is not supported by this CPU");
  std::sort(ranges_.begin(), ranges_.end(),
            [](const OptimRange& a, const OptimRange& b) { return a.offset < b.offset; });
  int64_t prev_end = 0;
  for (const OptimRange& r : ranges_) {
    LT_CHECK(r.offset >= 0 && r.numel >= 0 && r.offset <= length_ && r.numel <= length_ - r.offset,
             "AdamW: range [" + std::to_string(r.offset) + ", +" + std::to_string(r.numel) + ") outside [0, " +
                 std::to_string(length_) + ")");
    LT_CHECK(r.offset >= prev_end, "AdamW: overlapping ranges at offset " + std::to_string(r.offset));
    prev_end = r.offset + r.numel;
    trained_ += r.numel;
    for (int64_t b = 0; b < r.numel; b += kBlock)
      blocks_.push_back({r.offset + b, int32_t(std::min(kBlock, r.numel - b)), r.decay ? 1 : 0});
  }
  partial_.assign(blocks_.size(), 0.0);
}

void AdamW::set_config(const AdamWConfig& cfg) {
  validate(cfg);
  cfg_ = cfg;
}

void AdamW::check_buffers(const AdamWBuffers& b) const {
  if (!Kokkos::is_initialized())
    throw InternalError("AdamW: Kokkos is not initialized (create a KokkosScope first)");
  LT_CHECK(b.master && b.exp_avg && b.exp_avg_sq && (b.grad != nullptr) != (b.grad_bf16 != nullptr),
           "AdamW: missing buffer (or both an fp32 and a bf16 gradient)");
  LT_CHECK(!b.compute || b.compute_dtype == DType::BF16 || b.compute_dtype == DType::F16,
           "AdamW: the compute copy must be BF16 or F16");
}

namespace {

// A block of bf16 gradient widened to fp32 (exact), so the fp32 span kernels serve both.
LT_INLINE const float* widen_bf16(const uint16_t* g, int64_t n, float* tmp) {
  for (int64_t i = 0; i < n; ++i) tmp[i] = bf16_to_float(g[i]);
  return tmp;
}

template <class Exec>
void run_sumsq(const std::vector<AdamW::Block>& blocks, const float* grad, const uint16_t* grad_bf16, int64_t length,
               double* partial, SumsqFn fn) {
  const HostArray<const AdamW::Block> blk(blocks.data(), blocks.size());
  const HostConstF32 g(grad, grad ? size_t(length) : 0);
  const HostArray<const uint16_t> g16(grad_bf16, grad_bf16 ? size_t(length) : 0);
  const HostF64 part(partial, blocks.size());
  Kokkos::parallel_for(
      "AdamW::grad_norm_sq", HostRange<Exec>(0, int64_t(blocks.size())), KOKKOS_LAMBDA(int64_t k) {
        alignas(64) float tmp[AdamW::kBlock];
        const AdamW::Block bk = blk(k);
        const float* gp = g16.data() ? widen_bf16(g16.data() + bk.begin, bk.count, tmp) : g.data() + bk.begin;
        part(k) = fn(gp, bk.count);
      });
  Kokkos::fence();
}

template <class Exec>
void run_update(const std::vector<AdamW::Block>& blocks, const AdamWBuffers& b, int64_t length,
                const StepCoef& coef, float wdf_decay, SpanFn fn) {
  const size_t n = size_t(length);
  const HostArray<const AdamW::Block> blk(blocks.data(), blocks.size());
  const HostF32 p(b.master, n), m(b.exp_avg, n), v(b.exp_avg_sq, n);
  const HostConstF32 g(b.grad, b.grad ? n : 0);
  const HostArray<const uint16_t> g16(b.grad_bf16, b.grad_bf16 ? n : 0);
  const HostU16 out(b.compute, b.compute ? n : 0);
  Kokkos::parallel_for(
      "AdamW::step", HostRange<Exec>(0, int64_t(blocks.size())), KOKKOS_LAMBDA(int64_t k) {
        alignas(64) float tmp[AdamW::kBlock];
        const AdamW::Block bk = blk(k);
        StepCoef c = coef;
        if (bk.decay) c.wdf = wdf_decay;
        const float* gp = g16.data() ? widen_bf16(g16.data() + bk.begin, bk.count, tmp) : g.data() + bk.begin;
        const Span s{p.data() + bk.begin, m.data() + bk.begin, v.data() + bk.begin, gp,
                     out.data() ? out.data() + bk.begin : nullptr, bk.count};
        fn(s, c);
      });
  Kokkos::fence();
}

template <class Exec>
void run_first_touch(const std::vector<AdamW::Block>& blocks, const AdamWBuffers& b) {
  const HostArray<const AdamW::Block> blk(blocks.data(), blocks.size());
  const uintptr_t ps = uintptr_t(sysconf(_SC_PAGESIZE) > 0 ? sysconf(_SC_PAGESIZE) : 4096);
  void* const arrays[5] = {b.master, b.exp_avg, b.exp_avg_sq,
                           b.grad ? static_cast<void*>(const_cast<float*>(b.grad))
                                  : static_cast<void*>(const_cast<uint16_t*>(b.grad_bf16)),
                           b.compute};
  const size_t elem[5] = {4, 4, 4, size_t(b.grad ? 4 : 2), 2};
  Kokkos::parallel_for(
      "AdamW::first_touch", HostRange<Exec>(0, int64_t(blocks.size())), KOKKOS_LAMBDA(int64_t k) {
        for (int a = 0; a < 5; ++a) {
          if (!arrays[a]) continue;
          const uintptr_t lo = reinterpret_cast<uintptr_t>(arrays[a]) + uintptr_t(blk(k).begin) * elem[a];
          const uintptr_t hi = lo + uintptr_t(blk(k).count) * elem[a];
          for (uintptr_t pg = lo / ps * ps; pg < hi; pg += ps) {
            volatile char* q = reinterpret_cast<volatile char*>(std::max(pg, lo));
            *q = *q;
          }
        }
      });
  Kokkos::fence();
}

}  // namespace

double AdamW::grad_norm_sq(const float* grad) const { return grad_norm_sq_impl(grad, nullptr); }
double AdamW::grad_norm_sq(const uint16_t* grad_bf16) const { return grad_norm_sq_impl(nullptr, grad_bf16); }

double AdamW::grad_norm_sq_impl(const float* grad, const uint16_t* grad_bf16) const {
  if (!Kokkos::is_initialized())
    throw InternalError("AdamW: Kokkos is not initialized (create a KokkosScope first)");
  LT_CHECK(grad || grad_bf16, "AdamW::grad_norm_sq: null gradient");
  const SumsqFn fn = kernels_for(simd_).sumsq;
  if (serial_) run_sumsq<HostSerial>(blocks_, grad, grad_bf16, length_, partial_.data(), fn);
  else run_sumsq<HostExec>(blocks_, grad, grad_bf16, length_, partial_.data(), fn);
  double s = 0.0;
  for (double x : partial_) s += x;  // block order: independent of the thread count
  return s;
}

float AdamW::clip_coefficient(double total_norm) const {
  if (!(cfg_.clip > 0.0)) return 1.0f;
  // torch: clip_coef = max_norm / (total_norm + 1e-6) on fp32 tensors, clamped to 1.
  // Tensor.__rtruediv__ is reciprocal() * other: two roundings, mirrored here.
  const float coef = (1.0f / (float(total_norm) + 1e-6f)) * float(cfg_.clip);
  return coef < 1.0f ? coef : 1.0f;
}

AdamWStepScalars adamw_step_scalars(const AdamWConfig& cfg, int64_t step, double lr, float grad_coef) {
  LT_CHECK(step >= 1, "AdamW: optimizer steps count from 1");
  const double bc1 = 1.0 - std::pow(cfg.beta1, double(step));
  const double bc2 = 1.0 - std::pow(cfg.beta2, double(step));
  AdamWStepScalars s;
  s.lr = float(lr);
  s.beta1 = float(cfg.beta1);
  s.beta2 = float(cfg.beta2);
  s.eps = float(cfg.eps);
  s.weight_decay = float(cfg.weight_decay);
  s.one_minus_beta1 = float(1.0 - cfg.beta1);
  s.one_minus_beta2 = float(1.0 - cfg.beta2);
  s.lr_times_wd = float(lr * cfg.weight_decay);
  s.step_size = float(lr / bc1);
  s.sqrt_bc2 = float(std::sqrt(bc2));
  s.grad_coef = grad_coef;
  s.decay_factor = cfg.weight_decay != 0.0 ? float(1.0 - lr * cfg.weight_decay) : 1.0f;
  return s;
}

void AdamW::update(const AdamWBuffers& b, int64_t step, double lr, float grad_coef) const {
  check_buffers(b);
  const AdamWStepScalars s = adamw_step_scalars(cfg_, step, lr, grad_coef);
  StepCoef c;
  c.wdf = 1.0f;
  c.w1 = s.one_minus_beta1;
  c.b2 = s.beta2;
  c.omb2 = s.one_minus_beta2;
  c.bc2s = s.sqrt_bc2;
  c.eps = s.eps;
  c.neg_step = -s.step_size;  // float(-x) == -float(x): round to nearest is symmetric
  c.gcoef = s.grad_coef;
  const float wdf_decay = s.decay_factor;
  const SpanFn fn = kernels_for(simd_).span[out_kind(b)][int(streaming_)];
  if (serial_) run_update<HostSerial>(blocks_, b, length_, c, wdf_decay, fn);
  else run_update<HostExec>(blocks_, b, length_, c, wdf_decay, fn);
}

AdamWStepInfo AdamW::step(const AdamWBuffers& b, int64_t step, double lr) const {
  check_buffers(b);
  AdamWStepInfo info;
  info.lr = lr;
  info.grad_norm = std::sqrt(b.grad ? grad_norm_sq(b.grad) : grad_norm_sq(b.grad_bf16));
  info.clip_coef = clip_coefficient(info.grad_norm);
  update(b, step, lr, info.clip_coef);
  return info;
}

void AdamW::first_touch(const AdamWBuffers& b) const {
  check_buffers(b);
  if (serial_) run_first_touch<HostSerial>(blocks_, b);
  else run_first_touch<HostExec>(blocks_, b);
}

}  // namespace longtune
