// SwiGLU CUDA kernels against the CPU reference: separate dense gate/up and one fused gate|up
// buffer (row stride 2F), for f32, bf16 and f16.
#include <string>
#include <vector>

#include "kernels/cpu/swiglu.hpp"
#include "kernels/cuda/swiglu.cuh"
#include "tests/cuda/gpu_test_util.hpp"

using namespace longtune;
using namespace longtune::test;

namespace {

template <typename T>
class CudaSwiglu : public ::testing::Test {};
using longtune::test::StorageTypes;
TYPED_TEST_SUITE(CudaSwiglu, StorageTypes, DtypeName);

struct Case {
  int64_t T, F;
  bool fused;  // gate = buf, up = buf + F, row stride 2F (else two dense arrays)
};
const Case kCases[] = {{1, 1, false},     {7, 1001, true},    {64, 3072, false},
                       {513, 4096, true}, {2000, 2048, true}, {1500, 8192, false}};

std::string trace(const Case& c) {
  return "T=" + std::to_string(c.T) + " F=" + std::to_string(c.F) + (c.fused ? " fused" : " dense");
}

}  // namespace

TYPED_TEST(CudaSwiglu, MatchesCpuReferenceAndIsDeterministic) {
  using T = TypeParam;
  SKIP_WITHOUT_GPU();
  const double tol = dtype_tolerance<T>();
  std::mt19937 rng(41);
  for (const Case& c : kCases) {
    SCOPED_TRACE(trace(c));
    const size_t n = size_t(c.T * c.F);
    const auto gate = round_to_dtype<T>(random_vector(n, rng, 0.0f, 3.0f));
    const auto up = round_to_dtype<T>(random_vector(n, rng));
    const auto dout = round_to_dtype<T>(random_vector(n, rng));
    std::vector<float> out(n), dgate(n), dup(n);
    cpu::swiglu_forward(out.data(), gate.data(), up.data(), c.T, c.F);
    cpu::swiglu_backward(dgate.data(), dup.data(), dout.data(), gate.data(), up.data(), c.T, c.F);

    // Device layout: gate/up (and dgate/dup) either fused (ld = 2F) or two dense arrays.
    const int64_t ld = c.fused ? 2 * c.F : c.F;
    const size_t n_gu = size_t(c.T * ld) * (c.fused ? 1 : 2);
    const size_t up_off = c.fused ? size_t(c.F) : n;  // element offset of up in the buffer
    std::vector<float> gu(n_gu);
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t f = 0; f < c.F; ++f) {
        gu[size_t(t * ld + f)] = gate[size_t(t * c.F + f)];
        gu[up_off + size_t(t * ld + f)] = up[size_t(t * c.F + f)];
      }
    DeviceBuffer<T> d_gu(to_device_dtype<T>(gu)), d_dgu(n_gu), d_out(n), d_dout(to_device_dtype<T>(dout));
    const int64_t ld_arg = c.fused ? ld : 0;
    auto run = [&] {
      poison_nan(d_out.get(), n);
      poison_nan(d_dgu.get(), n_gu);
      cuda::swiglu_forward(d_out.get(), d_gu.get(), d_gu.get() + up_off, c.T, c.F, nullptr, ld_arg);
      cuda::swiglu_backward(d_dgu.get(), d_dgu.get() + up_off, d_dout.get(), d_gu.get(), d_gu.get() + up_off, c.T, c.F,
                            nullptr, ld_arg);
      CUDA_CHECK(cudaDeviceSynchronize());
    };
    run();
    const auto g_out = d_out.download();
    const auto g_dgu = d_dgu.download();
    const auto dgu = from_device_dtype(g_dgu);
    std::vector<float> g_dgate(n), g_dup(n);
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t f = 0; f < c.F; ++f) {
        g_dgate[size_t(t * c.F + f)] = dgu[size_t(t * ld + f)];
        g_dup[size_t(t * c.F + f)] = dgu[up_off + size_t(t * ld + f)];
      }
    EXPECT_LT(rel_error(from_device_dtype(g_out), out), tol);
    EXPECT_LT(rel_error(g_dgate, dgate), tol);
    EXPECT_LT(rel_error(g_dup, dup), tol);

    run();
    EXPECT_TRUE(bit_equal(d_out.download(), g_out));
    EXPECT_TRUE(bit_equal(d_dgu.download(), g_dgu));
  }
}

// The gradients may overwrite gate/up in place (every element is read before it is written).
TYPED_TEST(CudaSwiglu, BackwardInPlaceOverGateUp) {
  using T = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(42);
  const int64_t Tn = 300, F = 2048;
  const size_t n = size_t(Tn * F);
  const auto gu = round_to_dtype<T>(random_vector(2 * n, rng));
  const auto dout = round_to_dtype<T>(random_vector(n, rng));
  DeviceBuffer<T> d_a(to_device_dtype<T>(gu)), d_b(to_device_dtype<T>(gu)), d_dout(to_device_dtype<T>(dout));
  DeviceBuffer<T> d_sep(2 * n);
  cuda::swiglu_backward(d_sep.get(), d_sep.get() + F, d_dout.get(), d_a.get(), d_a.get() + F, Tn, F, nullptr, 2 * F);
  cuda::swiglu_backward(d_b.get(), d_b.get() + F, d_dout.get(), d_b.get(), d_b.get() + F, Tn, F, nullptr, 2 * F);
  CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(bit_equal(d_b.download(), d_sep.download()));
}
