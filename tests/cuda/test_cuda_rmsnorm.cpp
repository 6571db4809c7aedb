// RMSNorm CUDA kernels against the CPU reference on fresh random inputs.
#include <cuda_bf16.h>

#include "kernels/cpu/rmsnorm.hpp"
#include "kernels/cuda/rmsnorm.cuh"
#include "src/common/dtype.hpp"
#include "tests/cuda/gpu_test_util.hpp"

using namespace longtune;
using longtune::test::DeviceBuffer;
using longtune::test::random_vector;
using longtune::test::rel_error;

namespace {

struct Shape { int64_t T, C; };
const Shape kShapes[] = {{1, 64}, {7, 1000}, {129, 2048}, {300, 4096}};

std::vector<float> round_bf16(const std::vector<float>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = bf16_to_float(float_to_bf16(v[i]));
  return r;
}
std::vector<__nv_bfloat16> to_bf16(const std::vector<float>& v) {
  std::vector<__nv_bfloat16> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    __nv_bfloat16_raw raw;
    raw.x = float_to_bf16(v[i]);
    r[i] = raw;
  }
  return r;
}
std::vector<float> from_bf16(const std::vector<__nv_bfloat16>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    r[i] = bf16_to_float(static_cast<__nv_bfloat16_raw>(v[i]).x);
  }
  return r;
}

}  // namespace

TEST(CudaRmsnorm, Fp32MatchesCpuReference) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(11);
  for (const Shape s : kShapes) {
    SCOPED_TRACE("T=" + std::to_string(s.T) + " C=" + std::to_string(s.C));
    const size_t n = size_t(s.T * s.C);
    const auto x = random_vector(n, rng, 0.3f, 2.0f), w = random_vector(size_t(s.C), rng, 1.0f, 0.2f);
    const auto dy = random_vector(n, rng);
    std::vector<float> out(n), rstd(size_t(s.T)), dx(n), dw(size_t(s.C), 0.5f);
    cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), s.T, s.C, 1e-5f);
    cpu::rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rstd.data(), s.T, s.C);

    DeviceBuffer<float> d_x(x), d_w(w), d_dy(dy), d_out(n), d_rstd(size_t(s.T)), d_dx(n);
    DeviceBuffer<float> d_dw(std::vector<float>(size_t(s.C), 0.5f));  // += semantics
    cuda::rmsnorm_forward(d_out.get(), d_rstd.get(), d_x.get(), d_w.get(), s.T, s.C, 1e-5f, nullptr);
    cuda::rmsnorm_backward(d_dx.get(), d_dw.get(), d_dy.get(), d_x.get(), d_w.get(), d_rstd.get(), s.T, s.C, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_LT(rel_error(d_out.download(), out), 1e-6);
    EXPECT_LT(rel_error(d_rstd.download(), rstd), 1e-6);
    EXPECT_LT(rel_error(d_dx.download(), dx), 1e-5);
    EXPECT_LT(rel_error(d_dw.download(), dw), 1e-5);
  }
}

TEST(CudaRmsnorm, Bf16MatchesCpuReferenceOnRoundedInputs) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(12);
  for (const Shape s : kShapes) {
    SCOPED_TRACE("T=" + std::to_string(s.T) + " C=" + std::to_string(s.C));
    const size_t n = size_t(s.T * s.C);
    const auto x = round_bf16(random_vector(n, rng, 0.3f, 2.0f));
    const auto dy = round_bf16(random_vector(n, rng));
    const auto w = random_vector(size_t(s.C), rng, 1.0f, 0.2f);
    std::vector<float> out(n), rstd(size_t(s.T)), dx(n), dw(size_t(s.C), 0.0f);
    cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), s.T, s.C, 1e-5f);
    cpu::rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rstd.data(), s.T, s.C);

    DeviceBuffer<__nv_bfloat16> d_x(to_bf16(x)), d_dy(to_bf16(dy)), d_out(n), d_dx(n);
    DeviceBuffer<float> d_w(w), d_rstd(size_t(s.T)), d_dw(std::vector<float>(size_t(s.C), 0.0f));
    cuda::rmsnorm_forward(d_out.get(), d_rstd.get(), d_x.get(), d_w.get(), s.T, s.C, 1e-5f, nullptr);
    cuda::rmsnorm_backward(d_dx.get(), d_dw.get(), d_dy.get(), d_x.get(), d_w.get(), d_rstd.get(), s.T, s.C, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    // bf16 output rounding is 2^-8 relative per element.
    EXPECT_LT(rel_error(from_bf16(d_out.download()), out), 5e-3);
    EXPECT_LT(rel_error(d_rstd.download(), rstd), 1e-6);
    EXPECT_LT(rel_error(from_bf16(d_dx.download()), dx), 5e-3);
    EXPECT_LT(rel_error(d_dw.download(), dw), 1e-5);
  }
}
