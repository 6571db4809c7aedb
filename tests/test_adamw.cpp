// Host AdamW (src/optim/adamw.hpp), learning-rate schedules (src/optim/lr_schedule.hpp) and the
// Kokkos lifetime (src/optim/kokkos_scope.hpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "src/common/dtype.hpp"
#include "src/common/error.hpp"
#include "src/data/builtin_task.hpp"
#include "src/model/param_table.hpp"
#include "src/optim/adamw.hpp"
#include "src/optim/kokkos_scope.hpp"
#include "src/optim/lr_schedule.hpp"
#include "tests/test_paths.hpp"

namespace longtune {
namespace {

// Kokkos is initialized once for the test program: tests/test_environment.cpp.

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A flat state with tensors at 64-element aligned offsets; padding filled with sentinels.
struct State {
  std::vector<OptimRange> ranges;
  int64_t length = 0;
  std::vector<float> p, m, v, g;
  std::vector<uint16_t> out;

  explicit State(const std::vector<std::pair<int64_t, bool>>& tensors) {
    for (const auto& [numel, decay] : tensors) {
      ranges.push_back({length, numel, decay});
      length += (numel + 63) / 64 * 64;
    }
    const size_t n = size_t(length);
    p.assign(n, 1234.5f);
    m.assign(n, -77.0f);
    v.assign(n, 99.0f);
    g.assign(n, 1e6f);  // huge padding gradients: must not reach the norm
    out.assign(n, 0xbeef);
  }
  bool in_range(int64_t i) const {
    for (const auto& r : ranges)
      if (i >= r.offset && i < r.offset + r.numel) return true;
    return false;
  }
  void randomize(uint32_t seed, float gscale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (int64_t i = 0; i < length; ++i) {
      if (!in_range(i)) continue;
      p[size_t(i)] = nd(rng);
      m[size_t(i)] = 0.1f * nd(rng);
      v[size_t(i)] = 0.01f * std::abs(nd(rng));
      g[size_t(i)] = gscale * nd(rng);
    }
  }
  AdamWBuffers buffers(DType compute = DType::BF16, bool with_out = true) {
    AdamWBuffers b;
    b.master = p.data();
    b.exp_avg = m.data();
    b.exp_avg_sq = v.data();
    b.grad = g.data();
    b.compute = with_out ? out.data() : nullptr;
    b.compute_dtype = compute;
    return b;
  }
};

// ---- against torch.optim.AdamW (tests/golden/generate_adamw.py) -------------------------------

double rel_diff(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += want[i] * want[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

TEST(AdamWTorch, MatchesTorchAdamWWithParamGroupsAndClipping) {
  const auto path = test::fixture_dir() / "adamw" / "torch_adamw.json";
  std::ifstream f(path);
  ASSERT_TRUE(f) << "missing fixture " << path << " (python3 tests/golden/generate_adamw.py)";
  const nlohmann::json js = nlohmann::json::parse(f);
  const auto& jc = js.at("config");
  AdamWConfig cfg;
  cfg.lr = jc.at("lr");
  cfg.beta1 = jc.at("beta1");
  cfg.beta2 = jc.at("beta2");
  cfg.eps = jc.at("eps");
  cfg.weight_decay = jc.at("weight_decay");

  std::vector<std::pair<int64_t, bool>> tensors;
  for (const auto& t : js.at("tensors")) {
    const auto init = t.at("init").get<std::vector<double>>();
    tensors.push_back({int64_t(init.size()), t.at("decay").get<bool>()});
    ASSERT_EQ(t.at("decay").get<bool>(), t.at("shape").size() >= 2);
  }
  State s(tensors);
  for (size_t k = 0; k < tensors.size(); ++k) {
    const auto init = js.at("tensors")[k].at("init").get<std::vector<double>>();
    for (size_t i = 0; i < init.size(); ++i) {
      const size_t at = size_t(s.ranges[k].offset) + i;
      s.p[at] = float(init[i]);
      s.m[at] = 0.0f;
      s.v[at] = 0.0f;
    }
  }
  AdamW opt(s.ranges, s.length, cfg);
  const std::vector<float> pad_p = s.p;
  double worst = 0;
  for (const auto& st : js.at("steps")) {
    const int64_t step = st.at("step");
    cfg.clip = st.at("clip");
    opt.set_config(cfg);
    for (size_t k = 0; k < tensors.size(); ++k) {
      const auto grad = st.at("grads")[k].get<std::vector<double>>();
      for (size_t i = 0; i < grad.size(); ++i) s.g[size_t(s.ranges[k].offset) + i] = float(grad[i]);
    }
    const AdamWStepInfo info = opt.step(s.buffers(), step, st.at("lr").get<double>());
    const double want_norm = st.at("grad_norm");
    EXPECT_NEAR(info.grad_norm, want_norm, 1e-6 * want_norm) << "step " << step;
    if (cfg.clip > 0 && want_norm > cfg.clip) EXPECT_LT(info.clip_coef, 1.0f) << "step " << step;
    else EXPECT_EQ(info.clip_coef, 1.0f) << "step " << step;
    for (const char* key : {"params", "exp_avg", "exp_avg_sq"}) {
      const std::vector<float>& arr = std::string(key) == "params" ? s.p : std::string(key) == "exp_avg" ? s.m : s.v;
      for (size_t k = 0; k < tensors.size(); ++k) {
        const auto want = st.at(key)[k].get<std::vector<double>>();
        const std::vector<float> got(arr.begin() + s.ranges[k].offset, arr.begin() + s.ranges[k].offset + int64_t(want.size()));
        const double d = rel_diff(got, want);
        worst = std::max(worst, d);
        EXPECT_LE(d, 1e-6) << key << " of tensor " << k << " after step " << step;
      }
    }
  }
  for (int64_t i = 0; i < s.length; ++i)
    if (!s.in_range(i)) {
      ASSERT_EQ(bits_of(s.p[size_t(i)]), bits_of(pad_p[size_t(i)])) << "padding " << i;
    }
  std::printf("largest relative difference to torch %s: %.3g\n",
              js.at("torch_version").get<std::string>().c_str(), worst);
}

// ---- exactness of the implementation -----------------------------------------------------------

// The per-element formula of adamw.hpp in plain scalar code.
void reference_update(State& s, const AdamWConfig& c, int64_t step, double lr, float coef) {
  const float w1 = float(1.0 - c.beta1), b2 = float(c.beta2), omb2 = float(1.0 - c.beta2);
  const float bc2s = float(std::sqrt(1.0 - std::pow(c.beta2, double(step))));
  const float neg_step = float(-(lr / (1.0 - std::pow(c.beta1, double(step)))));
  const float wdf = float(1.0 - lr * c.weight_decay), eps = float(c.eps);
  for (const auto& r : s.ranges)
    for (int64_t i = r.offset; i < r.offset + r.numel; ++i) {
      const size_t k = size_t(i);
      const float g = s.g[k] * coef;
      float p = r.decay ? s.p[k] * wdf : s.p[k];
      float m = s.m[k];
      m = m + w1 * (g - m);
      float v = s.v[k];
      v = v * b2 + omb2 * g * g;
      volatile float sq = std::sqrt(v);  // keep the compiler from fusing anything
      const float denom = sq / bc2s + eps;
      p = p + (neg_step * m) / denom;
      s.p[k] = p;
      s.m[k] = m;
      s.v[k] = v;
    }
}

std::vector<std::pair<int64_t, bool>> odd_tensors() {
  // Sizes around the block (8192) and vector (16) boundaries, decay and not.
  return {{1, false}, {17, true}, {8192, true}, {8193, false}, {20000, true}, {15, false}, {33, true}};
}

TEST(AdamWExact, MatchesScalarFormulaBitForBit) {
  State s(odd_tensors());
  s.randomize(7);
  State ref = s;
  AdamWConfig c;
  c.lr = 3e-3;
  c.beta2 = 0.95;
  c.weight_decay = 0.1;
  AdamW opt(s.ranges, s.length, c);
  for (int64_t step = 1; step <= 3; ++step) {
    opt.update(s.buffers(), step, c.lr, 0.75f);
    reference_update(ref, c, step, c.lr, 0.75f);
  }
  for (int64_t i = 0; i < s.length; ++i) {
    const size_t k = size_t(i);
    ASSERT_EQ(bits_of(s.p[k]), bits_of(ref.p[k])) << i;
    ASSERT_EQ(bits_of(s.m[k]), bits_of(ref.m[k])) << i;
    ASSERT_EQ(bits_of(s.v[k]), bits_of(ref.v[k])) << i;
  }
}

TEST(AdamWExact, SimdLevelsAndSerialGiveIdenticalBits) {
  State base(odd_tensors());
  base.randomize(11, 5.0f);
  AdamWConfig c;
  c.lr = 1e-2;
  c.weight_decay = 0.05;
  c.clip = 1.0;
  std::vector<State> results;
  std::vector<std::string> names;
  for (SimdLevel level : {SimdLevel::Scalar, SimdLevel::SSE2, SimdLevel::AVX2, SimdLevel::AVX512}) {
    if (!simd_level_supported(level)) continue;
    for (bool serial : {false, true}) {
      State s = base;
      AdamWExecution exec;
      exec.simd = level;
      exec.serial = serial;
      AdamW opt(s.ranges, s.length, c, exec);
      for (int64_t step = 1; step <= 2; ++step) opt.step(s.buffers(DType::F16), step, c.lr);
      results.push_back(s);
      names.push_back(std::string(simd_level_name(level)) + (serial ? " serial" : " parallel"));
    }
  }
  ASSERT_GE(results.size(), 4u);
  for (size_t r = 1; r < results.size(); ++r)
    for (size_t k = 0; k < size_t(base.length); ++k) {
      ASSERT_EQ(bits_of(results[r].p[k]), bits_of(results[0].p[k])) << names[r] << " vs " << names[0] << " at " << k;
      ASSERT_EQ(bits_of(results[r].m[k]), bits_of(results[0].m[k])) << names[r] << " at " << k;
      ASSERT_EQ(bits_of(results[r].v[k]), bits_of(results[0].v[k])) << names[r] << " at " << k;
      ASSERT_EQ(results[r].out[k], results[0].out[k]) << names[r] << " at " << k;
    }
}

// bf16 host gradients (ZeRO-Offload, lean host state): the same update and norm, bit for bit, as
// fp32 gradients holding the widened bf16 values, for every SIMD level.
TEST(AdamWExact, Bf16GradientEqualsWidenedFp32Gradient) {
  State base(odd_tensors());
  base.randomize(23, 3.0f);
  std::vector<uint16_t> g16(base.g.size());
  for (size_t i = 0; i < g16.size(); ++i) g16[i] = float_to_bf16(base.g[i]);
  State widened = base;
  for (size_t i = 0; i < g16.size(); ++i) widened.g[i] = bf16_to_float(g16[i]);
  ASSERT_NE(widened.g, base.g);  // the rounding really happened
  AdamWConfig c;
  c.lr = 2e-3;
  c.weight_decay = 0.1;
  c.clip = 1.0;
  for (SimdLevel level : {SimdLevel::Scalar, SimdLevel::SSE2, SimdLevel::AVX2, SimdLevel::AVX512}) {
    if (!simd_level_supported(level)) continue;
    State a = base, b = widened;
    AdamW opt(a.ranges, a.length, c, AdamWExecution{false, level});
    EXPECT_EQ(opt.grad_norm_sq(g16.data()), opt.grad_norm_sq(b.g.data())) << simd_level_name(level);
    for (int64_t step = 1; step <= 2; ++step) {
      AdamWBuffers ab = a.buffers();
      ab.grad = nullptr;
      ab.grad_bf16 = g16.data();
      const AdamWStepInfo ia = opt.step(ab, step, c.lr);
      const AdamWStepInfo ib = opt.step(b.buffers(), step, c.lr);
      EXPECT_EQ(ia.grad_norm, ib.grad_norm);
      EXPECT_EQ(ia.clip_coef, ib.clip_coef);
    }
    for (size_t k = 0; k < size_t(a.length); ++k) {
      ASSERT_EQ(bits_of(a.p[k]), bits_of(b.p[k])) << simd_level_name(level) << " at " << k;
      ASSERT_EQ(bits_of(a.m[k]), bits_of(b.m[k])) << k;
      ASSERT_EQ(bits_of(a.v[k]), bits_of(b.v[k])) << k;
      ASSERT_EQ(a.out[k], b.out[k]) << k;
    }
  }
  // Exactly one gradient.
  State a = base;
  AdamW opt(a.ranges, a.length, c);
  AdamWBuffers both = a.buffers();
  both.grad_bf16 = g16.data();
  EXPECT_THROW(opt.update(both, 1, c.lr), InternalError);
}

TEST(AdamWExact, GradNormIndependentOfThreadsAndSimd) {
  State s(odd_tensors());
  s.randomize(5);
  AdamWConfig c;
  double first = -1;
  double want = 0;
  for (const auto& r : s.ranges)
    for (int64_t i = r.offset; i < r.offset + r.numel; ++i) want += double(s.g[size_t(i)]) * double(s.g[size_t(i)]);
  for (SimdLevel level : {SimdLevel::Scalar, SimdLevel::SSE2, SimdLevel::AVX2, SimdLevel::AVX512})
    for (bool serial : {false, true}) {
      if (!simd_level_supported(level)) continue;
      AdamW opt(s.ranges, s.length, c, AdamWExecution{serial, level});
      const double got = opt.grad_norm_sq(s.g.data());
      EXPECT_NEAR(got, want, 1e-12 * want);  // padding gradients (1e6) excluded
      if (first < 0) first = got;
      EXPECT_EQ(got, first) << simd_level_name(level) << (serial ? " serial" : " parallel");
    }
}

// ---- compute-dtype copy --------------------------------------------------------------------------

// Values covering every fp16/bf16 rounding regime: random bit patterns, subnormals, overflow,
// ties, infinities, NaNs, signed zeros.
std::vector<float> special_values() {
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f, 1e-8f, -3e-8f,
                          5.96e-8f, 2.98e-8f, 6.1035156e-05f, 6.1e-05f, 1e30f, -1e-30f,
                          std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
                          from_bits(0x7f800001u), from_bits(0xffc12345u), std::numeric_limits<float>::denorm_min(),
                          from_bits(0x3f808000u), from_bits(0x3f818000u), from_bits(0x38801000u),
                          from_bits(0x33000000u), from_bits(0x33000001u), from_bits(0x477fefffu),
                          from_bits(0x477ff000u)};
  std::mt19937 rng(3);
  for (int i = 0; i < 20000; ++i) v.push_back(from_bits(rng()));
  for (int e = -30; e <= 17; ++e)
    for (int k = 0; k < 64; ++k) v.push_back(std::ldexp(1.0f + float(k) / 64.0f, e) * (k % 2 ? -1.0f : 1.0f));
  return v;
}

class AdamWCopy : public ::testing::TestWithParam<DType> {};

TEST_P(AdamWCopy, CopyEqualsConversionOfMaster) {
  const std::vector<float> vals = special_values();
  for (SimdLevel level : {SimdLevel::Scalar, SimdLevel::SSE2, SimdLevel::AVX2, SimdLevel::AVX512}) {
    if (!simd_level_supported(level)) continue;
    State s({{int64_t(vals.size()), true}, {1000, false}});
    s.randomize(9);
    // lr = 0 and weight decay 0: the update is the identity, so master keeps the special values.
    std::copy(vals.begin(), vals.end(), s.p.begin());
    // g = m = 0: the step adds exactly -0.0 (lr = 0), which leaves every value as it is.
    std::fill(s.m.begin(), s.m.begin() + int64_t(vals.size()), 0.0f);
    std::fill(s.g.begin(), s.g.begin() + int64_t(vals.size()), 0.0f);
    AdamWConfig c;
    c.lr = 0.0;
    c.weight_decay = 0.0;
    AdamW opt(s.ranges, s.length, c, AdamWExecution{false, level});
    opt.update(s.buffers(GetParam()), 1, 0.0);
    for (const auto& r : s.ranges)
      for (int64_t i = r.offset; i < r.offset + r.numel; ++i) {
        const float p = s.p[size_t(i)];
        const uint16_t want = GetParam() == DType::BF16 ? float_to_bf16(p) : float_to_fp16(p);
        ASSERT_EQ(s.out[size_t(i)], want) << simd_level_name(level) << " element " << i << " value bits 0x"
                                          << std::hex << bits_of(p);
      }
    // The identity update really kept the values (NaNs stay NaN).
    for (size_t i = 0; i < vals.size(); ++i)
      if (!std::isnan(vals[i])) {
        ASSERT_EQ(bits_of(s.p[i]), bits_of(vals[i])) << i;
      }
  }
}

TEST_P(AdamWCopy, CopyAfterRealUpdate) {
  State s(odd_tensors());
  s.randomize(21);
  AdamWConfig c;
  c.lr = 0.05;
  AdamW opt(s.ranges, s.length, c);
  opt.step(s.buffers(GetParam()), 1, c.lr);
  for (const auto& r : s.ranges)
    for (int64_t i = r.offset; i < r.offset + r.numel; ++i) {
      const float p = s.p[size_t(i)];
      ASSERT_EQ(s.out[size_t(i)], GetParam() == DType::BF16 ? float_to_bf16(p) : float_to_fp16(p)) << i;
    }
}

INSTANTIATE_TEST_SUITE_P(AdamW, AdamWCopy, ::testing::Values(DType::BF16, DType::F16),
                         [](const ::testing::TestParamInfo<DType>& p) { return std::string(dtype_name(p.param)); });

// ---- ranges, padding, clipping -------------------------------------------------------------------

TEST(AdamWRanges, PaddingIsNeverTouched) {
  State s(odd_tensors());
  s.randomize(2);
  const State before = s;
  AdamWConfig c;
  c.clip = 1.0;
  AdamW opt(s.ranges, s.length, c);
  opt.first_touch(s.buffers());
  for (int64_t step = 1; step <= 2; ++step) opt.step(s.buffers(), step, 1e-3);
  int64_t padding = 0;
  for (int64_t i = 0; i < s.length; ++i) {
    if (s.in_range(i)) continue;
    ++padding;
    const size_t k = size_t(i);
    ASSERT_EQ(s.p[k], before.p[k]);
    ASSERT_EQ(s.m[k], before.m[k]);
    ASSERT_EQ(s.v[k], before.v[k]);
    ASSERT_EQ(s.out[k], before.out[k]);
  }
  EXPECT_GT(padding, 100);
}

TEST(AdamWRanges, WeightDecayOnlyOnDecayRanges) {
  // Zero gradient and moments: the only change is decay (m = v = 0 gives a zero Adam step).
  State s({{100, true}, {100, false}});
  for (int64_t i = 0; i < s.length; ++i) {
    s.p[size_t(i)] = 2.0f;
    s.g[size_t(i)] = 0.0f;
    s.m[size_t(i)] = 0.0f;
    s.v[size_t(i)] = 0.0f;
  }
  AdamWConfig c;
  c.lr = 0.1;
  c.weight_decay = 0.5;
  AdamW opt(s.ranges, s.length, c);
  opt.update(s.buffers(), 1, c.lr);
  EXPECT_EQ(s.p[0], 2.0f * float(1.0 - 0.1 * 0.5));
  EXPECT_EQ(s.p[99], 2.0f * float(1.0 - 0.1 * 0.5));
  EXPECT_EQ(s.p[128], 2.0f);
  EXPECT_EQ(s.p[227], 2.0f);
}

TEST(AdamWRanges, FromParamTable) {
  const ParamTable table(builtin_model_config());
  const std::vector<OptimRange> r = optim_ranges(table);
  ASSERT_EQ(r.size(), table.entries().size());
  int64_t n = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    EXPECT_EQ(r[i].decay, table.at(i).shape.size() >= 2) << table.at(i).name;
    EXPECT_EQ(r[i].offset, table.at(i).offset);
    EXPECT_EQ(r[i].numel, table.at(i).numel);
    n += r[i].numel;
  }
  EXPECT_EQ(n, table.num_parameters());
  AdamW opt(r, table.total_elements(), AdamWConfig{});
  EXPECT_EQ(opt.num_trained(), table.num_parameters());
}

TEST(AdamWRanges, ShardedUpdateEqualsWholeUpdate) {
  State whole(odd_tensors());
  whole.randomize(31, 3.0f);
  State sharded = whole;
  AdamWConfig c;
  c.clip = 2.0;
  c.lr = 1e-2;
  AdamW full(whole.ranges, whole.length, c);
  const AdamWStepInfo info = full.step(whole.buffers(), 1, c.lr);
  EXPECT_LT(info.clip_coef, 1.0f);
  // Three ranks with uneven shards that cut through tensors and blocks.
  const int64_t cuts[4] = {0, 9000, 30001, sharded.length};
  std::vector<AdamW> opts;
  double norm_sq = 0;
  for (int rnk = 0; rnk < 3; ++rnk) {
    opts.emplace_back(shard_ranges(sharded.ranges, cuts[rnk], cuts[rnk + 1]), cuts[rnk + 1] - cuts[rnk], c);
    norm_sq += opts.back().grad_norm_sq(sharded.g.data() + cuts[rnk]);  // all-reduce
  }
  EXPECT_NEAR(std::sqrt(norm_sq), info.grad_norm, 1e-12 * info.grad_norm);
  const float coef = opts[0].clip_coefficient(std::sqrt(norm_sq));
  for (int rnk = 0; rnk < 3; ++rnk) {
    const size_t o = size_t(cuts[rnk]);
    AdamWBuffers b{sharded.p.data() + o, sharded.m.data() + o, sharded.v.data() + o, sharded.g.data() + o,
                   sharded.out.data() + o, DType::BF16};
    opts[size_t(rnk)].update(b, 1, c.lr, coef);
  }
  if (coef == info.clip_coef)  // the norm sums in another order; equal coefficients give equal bits
    for (size_t k = 0; k < size_t(whole.length); ++k) {
      ASSERT_EQ(bits_of(sharded.p[k]), bits_of(whole.p[k])) << k;
      ASSERT_EQ(sharded.out[k], whole.out[k]) << k;
    }
  else
    for (size_t k = 0; k < size_t(whole.length); ++k) ASSERT_NEAR(sharded.p[k], whole.p[k], 1e-6f) << k;
}

TEST(AdamWClip, CoefficientLikeClipGradNorm) {
  AdamWConfig c;
  c.clip = 1.0;
  AdamW opt({{0, 4, true}}, 4, c);
  EXPECT_FLOAT_EQ(opt.clip_coefficient(10.0), 1.0f / (10.0f + 1e-6f));
  EXPECT_EQ(opt.clip_coefficient(0.5), 1.0f);
  EXPECT_EQ(opt.clip_coefficient(0.0), 1.0f);
  for (double off : {0.0, -1.0}) {
    c.clip = off;
    opt.set_config(c);
    EXPECT_EQ(opt.clip_coefficient(1e9), 1.0f) << "clip " << off << " disables clipping";
  }
}

TEST(AdamWClip, DisabledClipLeavesGradientsUnscaled) {
  State a(odd_tensors());
  a.randomize(4, 100.0f);  // norm in the thousands
  State b = a, d = a;
  AdamWConfig c;
  c.clip = 0.0;
  const AdamWStepInfo ia = AdamW(a.ranges, a.length, c).step(a.buffers(), 1, 1e-3);
  c.clip = -5.0;
  const AdamWStepInfo ib = AdamW(b.ranges, b.length, c).step(b.buffers(), 1, 1e-3);
  EXPECT_GT(ia.grad_norm, 1000.0);
  EXPECT_EQ(ia.clip_coef, 1.0f);
  EXPECT_EQ(ib.clip_coef, 1.0f);
  EXPECT_EQ(ia.grad_norm, ib.grad_norm);
  c.clip = 0.0;
  AdamW(d.ranges, d.length, c).update(d.buffers(), 1, 1e-3, 1.0f);
  for (size_t k = 0; k < size_t(a.length); ++k) {
    ASSERT_EQ(bits_of(a.p[k]), bits_of(b.p[k]));
    ASSERT_EQ(bits_of(a.p[k]), bits_of(d.p[k]));
    ASSERT_EQ(bits_of(a.v[k]), bits_of(d.v[k]));
  }
  // With clipping on, the same gradient gives a different (smaller) second moment.
  State f(odd_tensors());
  f.randomize(4, 100.0f);
  c.clip = 1.0;
  const AdamWStepInfo ic = AdamW(f.ranges, f.length, c).step(f.buffers(), 1, 1e-3);
  EXPECT_LT(ic.clip_coef, 1e-3f);
  EXPECT_LT(f.v[0], a.v[0]);
}

TEST(AdamWConfigCheck, RejectsBadValues) {
  AdamWConfig c;
  c.beta1 = 1.0;
  EXPECT_THROW(validate(c), ConfigError);
  c = AdamWConfig{};
  c.lr = -1;
  EXPECT_THROW(validate(c), ConfigError);
  c = AdamWConfig{};
  c.weight_decay = std::nan("");
  EXPECT_THROW(validate(c), ConfigError);
  EXPECT_THROW(AdamW({{0, 10, true}, {5, 10, false}}, 100, AdamWConfig{}), InternalError);  // overlap
  EXPECT_THROW(AdamW({{90, 20, true}}, 100, AdamWConfig{}), InternalError);                 // past the end
}

// ---- schedules ------------------------------------------------------------------------------------

TEST(AdamWSchedule, ConstantAndWarmup) {
  ScheduleConfig s;
  s.base_lr = 2e-4;
  EXPECT_EQ(scheduled_lr(s, 1), 2e-4);
  EXPECT_EQ(scheduled_lr(s, 1000000), 2e-4);
  s.warmup_steps = 4;
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 1), 0.5e-4);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 2), 1e-4);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 4), 2e-4);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 5), 2e-4);
  EXPECT_THROW(scheduled_lr(s, 0), InternalError);
}

TEST(AdamWSchedule, CosineKeySteps) {
  ScheduleConfig s{LrSchedule::Cosine, 1.0, 10, 110, 0.0};
  validate(s);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 5), 0.5);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 10), 1.0);                                           // end of warmup
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 11), 0.5 * (1 + std::cos(std::numbers::pi * 0.01)));  // first decay step
  EXPECT_NEAR(scheduled_lr(s, 60), 0.5, 1e-15);                                         // half way
  EXPECT_NEAR(scheduled_lr(s, 110), 0.0, 1e-15);                                        // end
  EXPECT_NEAR(scheduled_lr(s, 500), 0.0, 1e-15);                                        // after the end
  s.min_lr_ratio = 0.1;
  EXPECT_NEAR(scheduled_lr(s, 60), 0.1 + 0.9 * 0.5, 1e-15);
  EXPECT_NEAR(scheduled_lr(s, 110), 0.1, 1e-15);
  EXPECT_NEAR(scheduled_lr(s, 1000), 0.1, 1e-15);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 10), 1.0);
}

TEST(AdamWSchedule, LinearKeySteps) {
  ScheduleConfig s{LrSchedule::Linear, 3e-4, 0, 100, 0.0};
  validate(s);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 1), 3e-4 * 0.99);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 50), 3e-4 * 0.5);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 100), 0.0);
  s.warmup_steps = 20;
  s.min_lr_ratio = 0.2;
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 10), 1.5e-4);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 20), 3e-4);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 60), 3e-4 * (0.2 + 0.8 * 0.5));
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 100), 3e-4 * 0.2);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 101), 3e-4 * 0.2);
}

TEST(AdamWSchedule, ValidationAndNames) {
  EXPECT_EQ(parse_lr_schedule("cosine"), LrSchedule::Cosine);
  EXPECT_EQ(parse_lr_schedule("linear"), LrSchedule::Linear);
  EXPECT_EQ(parse_lr_schedule("constant"), LrSchedule::Constant);
  EXPECT_THROW(parse_lr_schedule("cosin"), ConfigError);
  EXPECT_THROW(validate(ScheduleConfig{LrSchedule::Cosine, 1e-3, 10, 10, 0.0}), ConfigError);
  EXPECT_THROW(validate(ScheduleConfig{LrSchedule::Linear, 1e-3, 0, 100, 1.5}), ConfigError);
  EXPECT_THROW(validate(ScheduleConfig{LrSchedule::Constant, 1e-3, -1, 0, 0.0}), ConfigError);
  EXPECT_NO_THROW(validate(ScheduleConfig{LrSchedule::Constant, 1e-3, 5, 0, 0.0}));
}

// ---- Kokkos lifetime --------------------------------------------------------------------------------

TEST(AdamWKokkos, NestedScopesDoNotOwn) {
  KokkosScope inner;  // the global environment already initialized Kokkos
  EXPECT_FALSE(inner.owns());
  EXPECT_GE(KokkosScope::concurrency(), 1);
}

}  // namespace
}  // namespace longtune
