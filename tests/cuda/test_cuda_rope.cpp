// RoPE CUDA kernels against the CPU reference: dense and strided rows (a head slice of a fused qkv
// row), in place and out of place, positions up to 128K, for f32, bf16 and f16.
#include <cmath>
#include <string>
#include <vector>

#include "kernels/cpu/rope.hpp"
#include "kernels/cuda/rope.cuh"
#include "tests/cuda/gpu_test_util.hpp"

using namespace longtune;
using namespace longtune::test;

namespace {

template <typename T>
class CudaRope : public ::testing::Test {};
using longtune::test::StorageTypes;
TYPED_TEST_SUITE(CudaRope, StorageTypes, DtypeName);

struct Case {
  int64_t T, NH, HD;
  int64_t row_heads;  // heads per buffer row (>= NH): the slice is heads [head0, head0 + NH)
  int64_t head0;
  bool in_place;
};
const Case kCases[] = {
    {5, 3, 6, 3, 0, false},           // half = 3: scalar path
    {64, 4, 64, 4, 0, true},          //
    {300, 32, 128, 32, 0, false},     // Llama q, dense
    {1000, 8, 128, 48, 32, true},     // k slice of a fused qkv row (32 + 8 + 8 heads)
    {777, 5, 96, 7, 1, false},        // odd head count, strided
    {2048, 16, 128, 16, 0, true},
};

// Llama-3 style inverse frequencies (theta 500000), formed in double then rounded.
std::vector<float> inv_freq_for(int64_t HD) {
  std::vector<float> f(size_t(HD / 2));
  for (int64_t i = 0; i < HD / 2; ++i) f[size_t(i)] = float(1.0 / std::pow(500000.0, double(2 * i) / double(HD)));
  return f;
}

std::string trace(const Case& c) {
  return "T=" + std::to_string(c.T) + " NH=" + std::to_string(c.NH) + " HD=" + std::to_string(c.HD) +
         " row_heads=" + std::to_string(c.row_heads) + (c.in_place ? " in place" : "");
}

template <typename T>
void check_rope(bool forward) {
  const double tol = dtype_tolerance<T>();
  std::mt19937 rng(forward ? 31 : 32);
  for (const Case& c : kCases) {
    SCOPED_TRACE(trace(c) + (forward ? " forward" : " backward"));
    const int64_t ld = c.row_heads * c.HD, dense = c.NH * c.HD;
    const size_t n_buf = size_t(c.T * ld), n_dense = size_t(c.T * dense);
    const auto buf = round_to_dtype<T>(random_vector(n_buf, rng));
    std::vector<int32_t> pos(size_t(c.T));
    std::uniform_int_distribution<int32_t> big(0, 131071);
    for (int64_t t = 0; t < c.T; ++t) pos[size_t(t)] = t % 3 == 0 ? int32_t(t) : big(rng);  // sequential and large
    const auto inv_freq = inv_freq_for(c.HD);

    // CPU reference on the dense slice.
    std::vector<float> x(n_dense), ref(n_dense);
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t j = 0; j < dense; ++j) x[size_t(t * dense + j)] = buf[size_t(t * ld + c.head0 * c.HD + j)];
    if (forward) cpu::rope_forward(ref.data(), x.data(), pos.data(), inv_freq.data(), c.T, c.NH, c.HD);
    else cpu::rope_backward(ref.data(), x.data(), pos.data(), inv_freq.data(), c.T, c.NH, c.HD);

    DeviceBuffer<T> d_in(to_device_dtype<T>(buf)), d_out_sep(n_buf);
    DeviceBuffer<int32_t> d_pos(pos);
    DeviceBuffer<float> d_freq(inv_freq);
    T* d_out = c.in_place ? d_in.get() : d_out_sep.get();
    if (!c.in_place) poison_nan(d_out_sep.get(), n_buf);
    const int64_t ld_arg = ld == dense ? 0 : ld;
    const T* src = d_in.get() + c.head0 * c.HD;
    T* dst = d_out + c.head0 * c.HD;
    auto launch = [&] {
      if (forward) cuda::rope_forward(dst, src, d_pos.get(), d_freq.get(), c.T, c.NH, c.HD, nullptr, ld_arg);
      else cuda::rope_backward(dst, src, d_pos.get(), d_freq.get(), c.T, c.NH, c.HD, nullptr, ld_arg);
    };
    launch();
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> got(n_buf);
    CUDA_CHECK(cudaMemcpy(got.data(), d_out, n_buf * sizeof(T), cudaMemcpyDeviceToHost));
    const auto gotf = from_device_dtype(got);
    std::vector<float> slice(n_dense);
    bool outside_untouched = true;
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t j = 0; j < ld; ++j) {
        const size_t i = size_t(t * ld + j);
        const int64_t k = j - c.head0 * c.HD;
        if (k >= 0 && k < dense) slice[size_t(t * dense + k)] = gotf[i];
        else if (c.in_place && !(gotf[i] == buf[i])) outside_untouched = false;
      }
    EXPECT_LT(rel_error(slice, ref), tol);
    EXPECT_TRUE(outside_untouched) << "elements outside the head slice changed";

    if (!c.in_place) {  // determinism
      poison_nan(d_out_sep.get(), n_buf);
      launch();
      CUDA_CHECK(cudaDeviceSynchronize());
      EXPECT_TRUE(bit_equal(d_out_sep.download(), got));
    }
  }
}

}  // namespace

TYPED_TEST(CudaRope, ForwardMatchesCpuReference) {
  SKIP_WITHOUT_GPU();
  check_rope<TypeParam>(true);
}

TYPED_TEST(CudaRope, BackwardMatchesCpuReference) {
  SKIP_WITHOUT_GPU();
  check_rope<TypeParam>(false);
}

// Forward then backward is the identity (the rotation is orthogonal), up to rounding.
TYPED_TEST(CudaRope, BackwardInvertsForward) {
  using T = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(33);
  const int64_t Tn = 513, NH = 8, HD = 128;
  const size_t n = size_t(Tn * NH * HD);
  const auto x = round_to_dtype<T>(random_vector(n, rng));
  std::vector<int32_t> pos(static_cast<size_t>(Tn));
  for (int64_t t = 0; t < Tn; ++t) pos[size_t(t)] = int32_t(t * 97);
  DeviceBuffer<T> d_x(to_device_dtype<T>(x));
  DeviceBuffer<int32_t> d_pos(pos);
  DeviceBuffer<float> d_freq(inv_freq_for(HD));
  cuda::rope_forward(d_x.get(), d_x.get(), d_pos.get(), d_freq.get(), Tn, NH, HD, nullptr);
  cuda::rope_backward(d_x.get(), d_x.get(), d_pos.get(), d_freq.get(), Tn, NH, HD, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_LT(rel_error(from_device_dtype(d_x.download()), x), 2 * dtype_tolerance<T>());
}
