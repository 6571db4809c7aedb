// Helpers for GPU tests: skip when no GPU is visible, device buffers, random inputs.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cuda/cuda_check.cuh"
#include "src/common/dtype.hpp"

namespace longtune::test {

#define SKIP_WITHOUT_GPU()                                                    \
  do {                                                                        \
    if (::longtune::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device visible"; \
  } while (0)

template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) { CUDA_CHECK(cudaMalloc(&ptr_, n * sizeof(T) + 1)); }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() { return ptr_; }
  void upload(const std::vector<T>& host) {
    CUDA_CHECK(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    CUDA_CHECK(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t n_;
};

inline std::vector<float> random_vector(size_t n, std::mt19937& rng, float mean = 0.0f, float stddev = 1.0f) {
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// ||a - b|| / ||b||
inline double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// ---- storage types (float, __nv_bfloat16, __half) on the host ---------------------------------
// Conversions round to nearest even with the exact helpers of src/common/dtype.hpp.

template <typename T> inline T to_dtype(float x);
template <> inline float to_dtype<float>(float x) { return x; }
template <> inline __nv_bfloat16 to_dtype<__nv_bfloat16>(float x) {
  __nv_bfloat16_raw raw;
  raw.x = float_to_bf16(x);
  return __nv_bfloat16(raw);
}
template <> inline __half to_dtype<__half>(float x) {
  __half_raw raw;
  raw.x = float_to_fp16(x);
  return __half(raw);
}

inline float from_dtype(float x) { return x; }
inline float from_dtype(__nv_bfloat16 x) { return bf16_to_float(static_cast<__nv_bfloat16_raw>(x).x); }
inline float from_dtype(__half x) { return fp16_to_float(static_cast<__half_raw>(x).x); }

// fp32 host vector -> storage type (to upload), and back (after a download).
template <typename T>
std::vector<T> to_device_dtype(const std::vector<float>& v) {
  std::vector<T> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = to_dtype<T>(v[i]);
  return r;
}
template <typename T>
std::vector<float> from_device_dtype(const std::vector<T>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = from_dtype(v[i]);
  return r;
}
// v rounded to T and back: the inputs a CPU reference must see to match a T kernel.
template <typename T>
std::vector<float> round_to_dtype(const std::vector<float>& v) {
  return from_device_dtype<T>(to_device_dtype<T>(v));
}

// Relative (norm) tolerance of a T output against the fp32/double CPU reference on T-rounded
// inputs: dominated by the final rounding to T (2^-9 bf16, 2^-12 f16 relative per element).
template <typename T> inline double dtype_tolerance();
template <> inline double dtype_tolerance<float>() { return 1e-5; }
template <> inline double dtype_tolerance<__nv_bfloat16>() { return 1e-2; }
template <> inline double dtype_tolerance<__half>() { return 2e-3; }

template <typename T> inline const char* dtype_label();
template <> inline const char* dtype_label<float>() { return "f32"; }
template <> inline const char* dtype_label<__nv_bfloat16>() { return "bf16"; }
template <> inline const char* dtype_label<__half>() { return "f16"; }

// gtest name generator for TYPED_TEST_SUITE over the storage types: CudaX/f32.Name etc.
struct DtypeName {
  template <typename T>
  static std::string GetName(int) {
    return dtype_label<T>();
  }
};

// The storage types every kernel is instantiated for, for TYPED_TEST_SUITE(..., StorageTypes, DtypeName).
using StorageTypes = ::testing::Types<float, __nv_bfloat16, __half>;

// Fast random inputs for the large tests (hundreds of millions of values): uniform with the given
// mean and standard deviation, from a splitmix64 stream seeded by rng.
inline std::vector<float> fast_random(size_t n, std::mt19937& rng, float mean = 0.0f, float stddev = 1.0f) {
  uint64_t state = (uint64_t(rng()) << 32) ^ rng();
  const float half_width = 1.7320508f * stddev;  // uniform on [-a, a] has stddev a / sqrt(3)
  std::vector<float> v(n);
  for (auto& x : v) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float u = float(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    x = mean + half_width * (2.0f * u - 1.0f);
  }
  return v;
}

// Fills n elements of device memory with all-ones bytes: NaN in f32, bf16 and f16 alike, so an
// element a kernel should write but does not fails the comparison.
template <typename T>
void poison_nan(T* dev, size_t n) {
  CUDA_CHECK(cudaMemset(dev, 0xff, n * sizeof(T)));
}

// Same bytes (bit-identical results, NaN payloads included).
template <typename T>
bool bit_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

}  // namespace longtune::test
