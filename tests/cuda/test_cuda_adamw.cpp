// GPU AdamW against the host AdamW (src/optim/adamw.hpp): bit-identical updates and compute copies,
// padding untouched; gradient norm, non-finite flag, deterministic sum and fp32 <-> bf16/f16
// conversions against the CPU.
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cuda/adamw.cuh"
#include "src/common/dtype.hpp"
#include "src/common/error.hpp"
#include "src/optim/adamw.hpp"
#include "tests/cuda/gpu_test_util.hpp"

using namespace longtune;
using namespace longtune::test;

namespace {

// A flat state: ranges at arbitrary (also unaligned) offsets with padding between them; padding holds
// sentinels that must survive.
struct State {
  std::vector<OptimRange> ranges;
  int64_t length = 0;
  std::vector<float> p, m, v, g;
  std::vector<uint16_t> out;

  State(const std::vector<std::pair<int64_t, bool>>& tensors, int64_t gap, std::mt19937& rng) {
    length = 3;  // the first range starts unaligned
    for (const auto& [numel, decay] : tensors) {
      ranges.push_back({length, numel, decay});
      length += numel + gap;
    }
    const size_t n = size_t(length);
    p.assign(n, 1234.5f);
    m.assign(n, -77.0f);
    v.assign(n, 99.0f);
    g.assign(n, 1e6f);  // huge padding gradients: must not reach the norm
    out.assign(n, 0xbeef);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (const OptimRange& r : ranges)
      for (int64_t i = r.offset; i < r.offset + r.numel; ++i) {
        p[size_t(i)] = nd(rng) * 0.05f;
        m[size_t(i)] = nd(rng) * 1e-3f;
        v[size_t(i)] = std::fabs(nd(rng)) * 1e-6f;
        g[size_t(i)] = nd(rng) * 1e-2f;
      }
    // A few subnormal and tiny values: no flush to zero on either side.
    const int64_t i0 = ranges[0].offset;
    p[size_t(i0)] = 1e-40f;
    g[size_t(i0 + 1)] = -3e-39f;
    v[size_t(i0 + 2)] = 0.0f;
    m[size_t(i0 + 3)] = 2e-45f;
  }
  void new_gradients(std::mt19937& rng) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (const OptimRange& r : ranges)
      for (int64_t i = r.offset; i < r.offset + r.numel; ++i) g[size_t(i)] = nd(rng) * 1e-2f;
  }
};

cuda::AdamWScalars to_cuda(const AdamWStepScalars& s) {
  cuda::AdamWScalars c{};
  c.lr = s.lr;
  c.beta1 = s.beta1;
  c.beta2 = s.beta2;
  c.eps = s.eps;
  c.weight_decay = s.weight_decay;
  c.one_minus_beta1 = s.one_minus_beta1;
  c.one_minus_beta2 = s.one_minus_beta2;
  c.lr_times_wd = s.lr_times_wd;
  c.step_size = s.step_size;
  c.sqrt_bc2 = s.sqrt_bc2;
  c.grad_coef = s.grad_coef;
  c.decay_factor = s.decay_factor;
  return c;
}

std::vector<cuda::DeviceOptimRange> to_device_ranges(const std::vector<OptimRange>& r) {
  std::vector<cuda::DeviceOptimRange> d;
  for (const OptimRange& x : r) d.push_back({x.offset, x.numel, x.decay ? 1 : 0});
  return d;
}

const std::vector<std::pair<int64_t, bool>> kTensors = {
    {1000, true}, {37, false}, {4096, true}, {5, false}, {70001, true}, {1, false}, {130000, true}, {4099, false}};

}  // namespace

TEST(CudaAdamW, UpdateBitIdenticalToCpuOverSteps) {
  SKIP_WITHOUT_GPU();
  for (int out_kind = 0; out_kind < 3; ++out_kind) {
    const DType dt = out_kind == 2 ? DType::F16 : DType::BF16;
    for (int64_t gap : {0, 5, 64}) {
      SCOPED_TRACE("out_kind=" + std::to_string(out_kind) + " gap=" + std::to_string(gap));
      std::mt19937 rng(51 + uint32_t(gap));
      State cpu(kTensors, gap, rng);
      AdamWConfig cfg;
      cfg.lr = 3e-4;
      cfg.weight_decay = 0.1;
      cfg.beta2 = 0.95;
      AdamW opt(cpu.ranges, cpu.length, cfg);

      DeviceBuffer<float> d_p(cpu.p), d_m(cpu.m), d_v(cpu.v), d_g(cpu.g);
      DeviceBuffer<uint16_t> d_out(cpu.out);
      const auto dranges = to_device_ranges(cpu.ranges);
      DeviceBuffer<cuda::DeviceOptimRange> d_ranges(dranges);
      for (int64_t step = 1; step <= 3; ++step) {
        if (step > 1) {
          cpu.new_gradients(rng);
          d_g.upload(cpu.g);
        }
        const double lr = cfg.lr * double(step) / 3.0;
        const float coef = step == 2 ? 0.7f : 1.0f;
        AdamWBuffers b{cpu.p.data(), cpu.m.data(), cpu.v.data(), cpu.g.data(), out_kind ? cpu.out.data() : nullptr, dt};
        opt.update(b, step, lr, coef);
        const cuda::AdamWScalars s = to_cuda(adamw_step_scalars(cfg, step, lr, coef));
        cuda::adamw_update(d_p.get(), d_m.get(), d_v.get(), d_g.get(), out_kind ? d_out.get() : nullptr, dt, d_ranges.get(),
                           int64_t(dranges.size()), s, nullptr);
        CUDA_CHECK(cudaDeviceSynchronize());
        SCOPED_TRACE("step " + std::to_string(step));
        EXPECT_TRUE(bit_equal(d_p.download(), cpu.p)) << "master";
        EXPECT_TRUE(bit_equal(d_m.download(), cpu.m)) << "exp_avg";
        EXPECT_TRUE(bit_equal(d_v.download(), cpu.v)) << "exp_avg_sq";
        EXPECT_TRUE(bit_equal(d_out.download(), cpu.out)) << "compute copy";
      }
      // Padding: the sentinels survive (the CPU arrays were compared whole, sentinels included).
      const auto p = d_p.download();
      if (gap > 0) {
        EXPECT_EQ(p[size_t(cpu.ranges[0].offset + cpu.ranges[0].numel)], 1234.5f);
      }
      EXPECT_EQ(p[0], 1234.5f);
    }
  }
}

TEST(CudaAdamW, UnsetDecayFactorIsRejected) {
  SKIP_WITHOUT_GPU();
  cuda::AdamWScalars s{};
  DeviceBuffer<float> d(16);
  DeviceBuffer<cuda::DeviceOptimRange> r(std::vector<cuda::DeviceOptimRange>{{0, 16, 1}});
  EXPECT_THROW(cuda::adamw_update(d.get(), d.get(), d.get(), d.get(), nullptr, DType::BF16, r.get(), 1, s, nullptr),
               InternalError);
}

TEST(CudaAdamW, GradNormSqMatchesCpuAndFlagsNonFinite) {
  SKIP_WITHOUT_GPU();
  for (int64_t big : {int64_t(1000), int64_t(3'000'001)}) {
    SCOPED_TRACE("big tensor " + std::to_string(big));
    std::mt19937 rng(61);
    auto tensors = kTensors;
    tensors.push_back({big, true});
    State st(tensors, 7, rng);
    AdamW opt(st.ranges, st.length, AdamWConfig{});
    const double cpu_sum = opt.grad_norm_sq(st.g.data());
    const auto dranges = to_device_ranges(st.ranges);
    DeviceBuffer<cuda::DeviceOptimRange> d_ranges(dranges);
    DeviceBuffer<float> d_g(st.g);
    DeviceBuffer<char> scratch(cuda::adamw_reduce_scratch_bytes(st.length));
    DeviceBuffer<double> d_sum(1);
    DeviceBuffer<int32_t> d_flag(1);
    auto run = [&] {
      poison_nan(d_sum.get(), 1);
      CUDA_CHECK(cudaMemset(d_flag.get(), 0x7f, sizeof(int32_t)));
      cuda::grad_norm_sq(d_sum.get(), d_flag.get(), d_g.get(), d_ranges.get(), int64_t(dranges.size()), st.length,
                         scratch.get(), nullptr);
      CUDA_CHECK(cudaDeviceSynchronize());
      return std::make_pair(d_sum.download()[0], d_flag.download()[0]);
    };
    const auto [sum1, flag1] = run();
    EXPECT_NEAR(sum1, cpu_sum, 1e-12 * cpu_sum);
    EXPECT_EQ(flag1, 0);
    const auto [sum2, flag2] = run();
    EXPECT_EQ(std::memcmp(&sum1, &sum2, sizeof(double)), 0) << "not deterministic";
    EXPECT_EQ(flag2, 0);

    // An inf in the padding is not looked at; one inside a range sets the flag.
    std::vector<float> g = st.g;
    g[size_t(st.ranges[2].offset + st.ranges[2].numel + 1)] = std::numeric_limits<float>::infinity();
    d_g.upload(g);
    EXPECT_EQ(run().second, 0);
    g[size_t(st.ranges.back().offset + st.ranges.back().numel / 2)] = -std::numeric_limits<float>::infinity();
    d_g.upload(g);
    EXPECT_EQ(run().second, 1);
    g = st.g;
    g[size_t(st.ranges[1].offset)] = std::numeric_limits<float>::quiet_NaN();
    d_g.upload(g);
    EXPECT_EQ(run().second, 1);
  }
}

TEST(CudaAdamW, SumDeterministicMatchesHostSum) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(71);
  for (int64_t n : {int64_t(1), int64_t(1000), int64_t(2049), int64_t(3'000'007)}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const auto x = random_vector(size_t(n), rng, 0.5f, 1.0f);
    long double ref = 0;
    for (float f : x) ref += f;
    DeviceBuffer<float> d_x(x);
    DeviceBuffer<char> scratch(cuda::adamw_reduce_scratch_bytes(n));
    DeviceBuffer<double> d_out(1);
    poison_nan(d_out.get(), 1);
    cuda::sum_deterministic(d_out.get(), d_x.get(), n, scratch.get(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const double s1 = d_out.download()[0];
    EXPECT_NEAR(s1, double(ref), 1e-12 * std::fabs(double(ref)) + 1e-300);
    poison_nan(d_out.get(), 1);
    cuda::sum_deterministic(d_out.get(), d_x.get(), n, scratch.get(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const double s2 = d_out.download()[0];
    EXPECT_EQ(std::memcmp(&s1, &s2, sizeof(double)), 0);
  }
}

TEST(CudaAdamW, ConvertF32MatchesCpuBits) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(81);
  auto x = random_vector(100003, rng, 0.0f, 10.0f);
  const float specials[] = {0.0f, -0.0f, 1e-45f, -3e-39f, 5.96e-8f, 2.98e-8f, 6.1e-5f, 6.09e-5f, 65504.0f, 65519.0f,
                            65520.0f, -65536.0f, 1e30f, std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::quiet_NaN(), 3.3895314e38f, 1.00390625f, 1.01171875f};
  for (size_t i = 0; i < std::size(specials); ++i) x[i * 7] = specials[i];
  uint32_t nan_payload = 0x7f800001u;  // a signalling NaN with a payload
  std::memcpy(&x[500], &nan_payload, 4);
  // Random bit patterns cover every exponent.
  std::uniform_int_distribution<uint32_t> bits;
  for (size_t i = 1000; i < 30000; ++i) {
    const uint32_t b = bits(rng);
    std::memcpy(&x[i], &b, 4);
  }
  DeviceBuffer<float> d_x(x);
  for (DType dt : {DType::BF16, DType::F16}) {
    for (size_t shift : {size_t(0), size_t(1)}) {  // shift 1: unaligned, scalar path
      SCOPED_TRACE(std::string(dtype_name(dt)) + " shift " + std::to_string(shift));
      const size_t n = x.size() - shift;
      std::vector<uint16_t> ref(n);
      convert_from_f32(ref.data(), x.data() + shift, dt, n);
      DeviceBuffer<uint16_t> d_out(n + 1);
      poison_nan(d_out.get(), n + 1);
      cuda::convert_f32(d_out.get() + shift, dt, d_x.get() + shift, int64_t(n), nullptr);
      CUDA_CHECK(cudaDeviceSynchronize());
      auto got = d_out.download();
      got.erase(got.begin(), got.begin() + ptrdiff_t(shift));
      got.resize(n);
      size_t bad = 0;
      for (size_t i = 0; i < n; ++i) bad += got[i] != ref[i];
      EXPECT_EQ(bad, 0u);
    }
  }
}

TEST(CudaAdamW, ConvertToF32MatchesCpuBits) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(82);
  // Every 16-bit pattern (zeros, subnormals, inf, NaNs with payloads, in both dtypes), random ones,
  // and fp32 values rounded to the dtype so typical gradients are there too.
  const size_t patterns = 65536, randoms = 20011, rounded = 5000;
  std::vector<uint16_t> base(patterns + randoms);
  for (size_t i = 0; i < patterns; ++i) base[i] = uint16_t(i);
  std::uniform_int_distribution<uint32_t> bits(0, 0xffff);
  for (size_t i = patterns; i < base.size(); ++i) base[i] = uint16_t(bits(rng));
  const std::vector<float> values = random_vector(rounded, rng, 0.0f, 1e-3f);
  for (DType dt : {DType::BF16, DType::F16}) {
    std::vector<uint16_t> x = base;
    convert_from_f32(x.data() + patterns + 1, values.data(), dt, rounded);
    DeviceBuffer<uint16_t> d_x(x);
    // Odd lengths; shift 1: unaligned, scalar path.
    for (size_t n : {size_t(1), size_t(3), size_t(4097), x.size() - 1}) {
      for (size_t shift : {size_t(0), size_t(1)}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " n " + std::to_string(n) + " shift " + std::to_string(shift));
        std::vector<float> ref(n);
        convert_to_f32(ref.data(), x.data() + shift, dt, n);
        DeviceBuffer<float> d_out(n + 1);
        poison_nan(d_out.get(), n + 1);
        cuda::convert_to_f32(d_out.get() + shift, d_x.get() + shift, dt, int64_t(n), nullptr);
        CUDA_CHECK(cudaDeviceSynchronize());
        auto got = d_out.download();
        got.erase(got.begin(), got.begin() + ptrdiff_t(shift));
        got.resize(n);
        EXPECT_TRUE(bit_equal(got, ref));
      }
    }
  }
}
