// Fused lm_head + cross-entropy on the GPU against the CPU reference
// (kernels/cpu/linear_cross_entropy) on fresh random inputs rounded to the storage type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/linear_cross_entropy.hpp"
#include "kernels/cuda/linear_cross_entropy.cuh"
#include "tests/cuda/gpu_test_util.hpp"

using namespace longtune;
using longtune::test::DeviceBuffer;
using longtune::test::DtypeName;
using longtune::test::fast_random;
using longtune::test::StorageTypes;
using longtune::test::from_device_dtype;
using longtune::test::rel_error;
using longtune::test::round_to_dtype;
using longtune::test::to_device_dtype;

namespace {

using Vec = std::vector<float>;

// dhidden is in the storage type (and computed from storage-type dlogits); dweight is fp32 but sums
// storage-type dlogits, so both carry the storage type's rounding. Losses only see fp32 logits.
template <typename S> constexpr double kTol = 1e-5;
template <> constexpr double kTol<__nv_bfloat16> = 1e-2;
template <> constexpr double kTol<__half> = 3e-3;
template <typename S> constexpr double kLossTol = 1e-5;
template <> constexpr double kLossTol<__nv_bfloat16> = 1e-4;
template <> constexpr double kLossTol<__half> = 1e-4;

template <typename S>
class CudaLinearCrossEntropy : public ::testing::Test {};
TYPED_TEST_SUITE(CudaLinearCrossEntropy, StorageTypes, DtypeName);

// chunk: tokens' worth of scratch given to the launcher (0 = all T at once).
struct Case { int64_t T, C, V, chunk; };
const Case kCases[] = {{1, 64, 96, 0},       {7, 64, 1000, 0},     {7, 64, 1001, 0},      {333, 64, 1000, 64},
                       {333, 64, 96, 1},     {333, 2048, 1000, 100}, {7, 2048, 32000, 0}, {3, 2048, 128256, 2},
                       {333, 2048, 1001, 0}};

std::string trace(const Case& c) {
  return "T=" + std::to_string(c.T) + " C=" + std::to_string(c.C) + " V=" + std::to_string(c.V) +
         " chunk=" + std::to_string(c.chunk);
}

bool bit_equal(const Vec& a, const Vec& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Targets uniform in [0, V) with about one in five masked (-1); the first is always masked when
// T > 1, and the extremes 0 and V - 1 appear.
std::vector<int32_t> make_targets(int64_t T, int64_t V, std::mt19937& rng) {
  std::uniform_int_distribution<int32_t> pick(0, int32_t(V - 1));
  std::uniform_int_distribution<int> mask(0, 4);
  std::vector<int32_t> t(static_cast<size_t>(T));
  for (auto& x : t) x = mask(rng) == 0 ? -1 : pick(rng);
  if (T > 1) t[0] = -1;
  if (T > 2) t[1] = int32_t(V - 1);
  if (T > 3) t[2] = 0;
  return t;
}

template <typename S>
struct Problem {
  Case c;
  Vec hidden, weight, dw0;
  std::vector<int32_t> targets;
  float scale;
  Problem(const Case& c_, std::mt19937& rng) : c(c_) {
    hidden = round_to_dtype<S>(fast_random(size_t(c.T * c.C), rng));
    weight = round_to_dtype<S>(fast_random(size_t(c.V * c.C), rng, 0.0f, 2.0f / std::sqrt(float(c.C))));
    dw0 = fast_random(size_t(c.V * c.C), rng, 0.0f, 0.01f);
    targets = make_targets(c.T, c.V, rng);
    int64_t counted = 0;
    for (int32_t t : targets) counted += t >= 0;
    // fp16: loss-scaled, as fp16 training does, so dlogits stay in fp16's normal range.
    scale = std::is_same_v<S, __half> ? 1024.0f : 1.0f / float(std::max<int64_t>(counted, 1));
  }
  size_t scratch_bytes() const { return cuda::linear_cross_entropy_scratch_bytes(c.chunk > 0 ? c.chunk : c.T, c.V); }
};

struct GpuResult {
  Vec losses, dhidden, dweight;
};

template <typename S>
GpuResult run_gpu(const Problem<S>& p, const cuda::Blas& blas, bool with_dhidden = true, bool with_dweight = true) {
  const Case& c = p.c;
  DeviceBuffer<S> d_h(to_device_dtype<S>(p.hidden)), d_w(to_device_dtype<S>(p.weight));
  DeviceBuffer<S> d_dh(to_device_dtype<S>(Vec(size_t(c.T * c.C), NAN)));
  DeviceBuffer<float> d_losses(Vec(size_t(c.T), NAN)), d_dw(p.dw0);
  DeviceBuffer<int32_t> d_t(p.targets);
  DeviceBuffer<unsigned char> scratch(p.scratch_bytes());
  cuda::linear_cross_entropy_forward_backward(d_losses.get(), with_dhidden ? d_dh.get() : nullptr,
                                              with_dweight ? d_dw.get() : nullptr, d_h.get(), d_w.get(), d_t.get(),
                                              p.scale, c.T, c.C, c.V, scratch.get(), p.scratch_bytes(), blas, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  return {d_losses.download(), from_device_dtype(d_dh.download()), d_dw.download()};
}

}  // namespace

TYPED_TEST(CudaLinearCrossEntropy, ForwardBackwardMatchesCpuReference) {
  using S = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(41);
  cuda::Blas blas;
  for (const Case& c : kCases) {
    SCOPED_TRACE(trace(c));
    const Problem<S> p(c, rng);
    Vec losses(size_t(c.T)), dh(size_t(c.T * c.C)), dw = p.dw0;
    cpu::linear_cross_entropy_forward_backward(losses.data(), dh.data(), dw.data(), p.hidden.data(), p.weight.data(),
                                               p.targets.data(), p.scale, c.T, c.C, c.V);
    const GpuResult g = run_gpu(p, blas);
    EXPECT_LT(rel_error(g.losses, losses), kLossTol<S>);
    EXPECT_LT(rel_error(g.dhidden, dh), kTol<S>);
    // dweight: compare the accumulated increment (dw0 is small on purpose, but not zero).
    Vec inc_gpu(dw.size()), inc_ref(dw.size());
    for (size_t i = 0; i < dw.size(); ++i) {
      inc_gpu[i] = g.dweight[i] - p.dw0[i];
      inc_ref[i] = dw[i] - p.dw0[i];
    }
    EXPECT_LT(rel_error(inc_gpu, inc_ref), kTol<S> + 1e-4);
    EXPECT_LT(rel_error(g.dweight, dw), kTol<S>);
    // Masked rows: loss exactly 0, dhidden exactly 0.
    for (int64_t t = 0; t < c.T; ++t) {
      if (p.targets[size_t(t)] >= 0) continue;
      EXPECT_EQ(g.losses[size_t(t)], 0.0f) << "t=" << t;
      for (int64_t k = 0; k < c.C; ++k) ASSERT_EQ(g.dhidden[size_t(t * c.C + k)], 0.0f) << "t=" << t;
    }
  }
}

TYPED_TEST(CudaLinearCrossEntropy, ForwardMatchesCpuReference) {
  using S = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(42);
  cuda::Blas blas;
  for (const Case& c : kCases) {
    SCOPED_TRACE(trace(c));
    const Problem<S> p(c, rng);
    Vec losses(size_t(c.T));
    cpu::linear_cross_entropy_forward(losses.data(), p.hidden.data(), p.weight.data(), p.targets.data(), c.T, c.C,
                                      c.V);
    DeviceBuffer<S> d_h(to_device_dtype<S>(p.hidden)), d_w(to_device_dtype<S>(p.weight));
    DeviceBuffer<float> d_losses(Vec(size_t(c.T), NAN));
    DeviceBuffer<int32_t> d_t(p.targets);
    DeviceBuffer<unsigned char> scratch(p.scratch_bytes());
    cuda::linear_cross_entropy_forward(d_losses.get(), d_h.get(), d_w.get(), d_t.get(), c.T, c.C, c.V, scratch.get(),
                                       p.scratch_bytes(), blas, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_LT(rel_error(d_losses.download(), losses), kLossTol<S>);
  }
}

TYPED_TEST(CudaLinearCrossEntropy, NullGradientsAreSkipped) {
  using S = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(43);
  cuda::Blas blas;
  const Case c{333, 64, 1000, 64};
  const Problem<S> p(c, rng);
  Vec losses(size_t(c.T)), dh(size_t(c.T * c.C)), dw = p.dw0;
  cpu::linear_cross_entropy_forward_backward(losses.data(), dh.data(), dw.data(), p.hidden.data(), p.weight.data(),
                                             p.targets.data(), p.scale, c.T, c.C, c.V);
  const GpuResult only_dw = run_gpu(p, blas, /*with_dhidden=*/false, /*with_dweight=*/true);
  const GpuResult only_dh = run_gpu(p, blas, /*with_dhidden=*/true, /*with_dweight=*/false);
  EXPECT_LT(rel_error(only_dw.dweight, dw), kTol<S>);
  EXPECT_LT(rel_error(only_dh.dhidden, dh), kTol<S>);
  EXPECT_TRUE(bit_equal(only_dh.dweight, p.dw0)) << "dweight changed although null was passed";
  EXPECT_LT(rel_error(only_dh.losses, losses), kLossTol<S>);
}

TYPED_TEST(CudaLinearCrossEntropy, TwoRunsAreBitIdentical) {
  using S = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(44);
  for (const Case& c : {Case{333, 2048, 1000, 100}, Case{1024, 256, 32000, 0}}) {
    SCOPED_TRACE(trace(c));
    const Problem<S> p(c, rng);
    cuda::Blas blas1, blas2;
    const GpuResult a = run_gpu(p, blas1), b = run_gpu(p, blas2);
    EXPECT_TRUE(bit_equal(a.losses, b.losses));
    EXPECT_TRUE(bit_equal(a.dhidden, b.dhidden));
    EXPECT_TRUE(bit_equal(a.dweight, b.dweight));
  }
}

// A target outside the vocabulary cannot throw on the device: its loss is NaN, never a wild read.
TEST(CudaLinearCrossEntropyErrors, TargetBeyondVocabularyGivesNan) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(45);
  cuda::Blas blas;
  const int64_t T = 4, C = 64, V = 96;
  DeviceBuffer<float> d_h(fast_random(size_t(T * C), rng)), d_w(fast_random(size_t(V * C), rng));
  DeviceBuffer<float> d_losses(static_cast<size_t>(T));
  DeviceBuffer<int32_t> d_t(std::vector<int32_t>{3, int32_t(V), -1, 0});
  const size_t bytes = cuda::linear_cross_entropy_scratch_bytes(T, V);
  DeviceBuffer<unsigned char> scratch(bytes);
  cuda::linear_cross_entropy_forward(d_losses.get(), d_h.get(), d_w.get(), d_t.get(), T, C, V, scratch.get(), bytes,
                                     blas, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  const Vec l = d_losses.download();
  EXPECT_TRUE(std::isfinite(l[0]) && l[0] > 0.0f);
  EXPECT_TRUE(std::isnan(l[1]));
  EXPECT_EQ(l[2], 0.0f);
  EXPECT_TRUE(std::isfinite(l[3]) && l[3] > 0.0f);
}
