// RMSNorm CUDA kernels (plain and fused with the residual add) against the CPU reference on fresh
// random inputs rounded to the storage type, for f32, bf16 and f16.
#include <string>
#include <vector>

#include "kernels/cpu/rmsnorm.hpp"
#include "kernels/cuda/rmsnorm.cuh"
#include "tests/cuda/gpu_test_util.hpp"

using namespace longtune;
using namespace longtune::test;

namespace {

struct Shape {
  int64_t T, C;
};
const Shape kShapes[] = {{1, 64}, {7, 1001}, {129, 2048}, {300, 3072}, {1030, 4096}, {2500, 2048}};
constexpr float kEps = 1e-5f;

template <typename T>
class CudaRmsnorm : public ::testing::Test {};
using longtune::test::StorageTypes;
TYPED_TEST_SUITE(CudaRmsnorm, StorageTypes, DtypeName);

std::string trace(const Shape& s) { return "T=" + std::to_string(s.T) + " C=" + std::to_string(s.C); }

}  // namespace

TYPED_TEST(CudaRmsnorm, MatchesCpuReference) {
  using T = TypeParam;
  SKIP_WITHOUT_GPU();
  const double tol = dtype_tolerance<T>();
  std::mt19937 rng(11);
  for (const Shape s : kShapes) {
    SCOPED_TRACE(trace(s));
    const size_t n = size_t(s.T * s.C), C = size_t(s.C);
    const auto x = round_to_dtype<T>(random_vector(n, rng, 0.3f, 2.0f));
    const auto dy = round_to_dtype<T>(random_vector(n, rng));
    const auto w = round_to_dtype<T>(random_vector(C, rng, 1.0f, 0.2f));
    const auto dw0 = random_vector(C, rng);  // dweight accumulates
    std::vector<float> out(n), rstd(size_t(s.T)), dx(n), dw(dw0);
    cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), s.T, s.C, kEps);
    cpu::rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rstd.data(), s.T, s.C);

    DeviceBuffer<T> d_x(to_device_dtype<T>(x)), d_w(to_device_dtype<T>(w)), d_dy(to_device_dtype<T>(dy)), d_out(n), d_dx(n);
    DeviceBuffer<float> d_rstd(size_t(s.T)), d_dw(dw0);
    poison_nan(d_out.get(), n);
    poison_nan(d_rstd.get(), size_t(s.T));
    poison_nan(d_dx.get(), n);
    cuda::rmsnorm_forward(d_out.get(), d_rstd.get(), d_x.get(), d_w.get(), s.T, s.C, kEps, nullptr);
    cuda::rmsnorm_backward(d_dx.get(), d_dw.get(), d_dy.get(), d_x.get(), d_w.get(), d_rstd.get(), s.T, s.C, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    const auto g_out = d_out.download();
    const auto g_rstd = d_rstd.download();
    const auto g_dx = d_dx.download();
    const auto g_dw = d_dw.download();
    EXPECT_LT(rel_error(from_device_dtype(g_out), out), tol);
    EXPECT_LT(rel_error(g_rstd, rstd), 2e-6);
    EXPECT_LT(rel_error(from_device_dtype(g_dx), dx), tol);
    EXPECT_LT(rel_error(g_dw, dw), 1e-5);

    // Determinism: the same inputs give the same bits.
    d_dw.upload(dw0);
    poison_nan(d_out.get(), n);
    poison_nan(d_dx.get(), n);
    cuda::rmsnorm_forward(d_out.get(), d_rstd.get(), d_x.get(), d_w.get(), s.T, s.C, kEps, nullptr);
    cuda::rmsnorm_backward(d_dx.get(), d_dw.get(), d_dy.get(), d_x.get(), d_w.get(), d_rstd.get(), s.T, s.C, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(bit_equal(d_out.download(), g_out));
    EXPECT_TRUE(bit_equal(d_rstd.download(), g_rstd));
    EXPECT_TRUE(bit_equal(d_dx.download(), g_dx));
    EXPECT_TRUE(bit_equal(d_dw.download(), g_dw));
  }
}

// residual = inp + branch (rounded to T), out = rmsnorm(residual); backward adds the residual
// path's gradient. Odd shapes run in place (residual over inp, dinp over dresidual).
TYPED_TEST(CudaRmsnorm, ResidualFusedMatchesCpuReference) {
  using T = TypeParam;
  SKIP_WITHOUT_GPU();
  const double tol = dtype_tolerance<T>();
  std::mt19937 rng(12);
  int k = 0;
  for (const Shape s : kShapes) {
    SCOPED_TRACE(trace(s));
    const bool in_place = (k++ % 2) == 1;
    const size_t n = size_t(s.T * s.C), C = size_t(s.C);
    const auto inp = round_to_dtype<T>(random_vector(n, rng, 0.1f, 1.5f));
    const auto branch = round_to_dtype<T>(random_vector(n, rng, 0.0f, 0.7f));
    const auto dout = round_to_dtype<T>(random_vector(n, rng));
    const auto dres = round_to_dtype<T>(random_vector(n, rng, 0.0f, 0.5f));
    const auto w = round_to_dtype<T>(random_vector(C, rng, 1.0f, 0.2f));
    const auto dw0 = random_vector(C, rng);
    std::vector<float> sum(n);
    for (size_t i = 0; i < n; ++i) sum[i] = inp[i] + branch[i];
    const auto residual = round_to_dtype<T>(sum);
    std::vector<float> out(n), rstd(size_t(s.T)), dx(n), dw(dw0);
    cpu::rmsnorm_forward(out.data(), rstd.data(), residual.data(), w.data(), s.T, s.C, kEps);
    cpu::rmsnorm_backward(dx.data(), dw.data(), dout.data(), residual.data(), w.data(), rstd.data(), s.T, s.C);
    for (size_t i = 0; i < n; ++i) dx[i] += dres[i];

    DeviceBuffer<T> d_inp(to_device_dtype<T>(inp)), d_branch(to_device_dtype<T>(branch)), d_w(to_device_dtype<T>(w));
    DeviceBuffer<T> d_res_sep(n), d_out(n), d_dout(to_device_dtype<T>(dout)), d_dres(to_device_dtype<T>(dres)), d_dx_sep(n);
    DeviceBuffer<float> d_rstd(size_t(s.T)), d_dw(dw0);
    T* d_res = in_place ? d_inp.get() : d_res_sep.get();
    T* d_dx = in_place ? d_dres.get() : d_dx_sep.get();
    if (!in_place) {
      poison_nan(d_res_sep.get(), n);
      poison_nan(d_dx_sep.get(), n);
    }
    poison_nan(d_out.get(), n);
    poison_nan(d_rstd.get(), size_t(s.T));
    cuda::residual_rmsnorm_forward(d_res, d_out.get(), d_rstd.get(), d_inp.get(), d_branch.get(), d_w.get(), s.T, s.C, kEps,
                                   nullptr);
    cuda::residual_rmsnorm_backward(d_dx, d_dw.get(), d_dout.get(), d_dres.get(), d_res, d_w.get(), d_rstd.get(), s.T, s.C,
                                    nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> g_res(n), g_dx(n);
    CUDA_CHECK(cudaMemcpy(g_res.data(), d_res, n * sizeof(T), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(g_dx.data(), d_dx, n * sizeof(T), cudaMemcpyDeviceToHost));
    EXPECT_TRUE(bit_equal(g_res, to_device_dtype<T>(residual)));  // one fp32 add, one rounding
    EXPECT_LT(rel_error(from_device_dtype(d_out.download()), out), tol);
    EXPECT_LT(rel_error(d_rstd.download(), rstd), 2e-6);
    EXPECT_LT(rel_error(from_device_dtype(g_dx), dx), tol);
    EXPECT_LT(rel_error(d_dw.download(), dw), 1e-5);
  }
}
