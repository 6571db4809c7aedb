#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/random.cuh"

namespace longtune::cuda {

namespace {

// splitmix64: a cheap, well-mixed hash of the counter.
__device__ inline uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__global__ void fill_normal_kernel(float* out, int64_t n, float mean, float stddev, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t r = mix(seed ^ mix(uint64_t(i)));
    // Box-Muller on two 24-bit uniforms in (0, 1].
    const float u1 = (float((r >> 40) & 0xffffff) + 1.0f) * (1.0f / 16777216.0f);
    const float u2 = float((r >> 16) & 0xffffff) * (1.0f / 16777216.0f);
    out[i] = mean + stddev * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
  }
}

__global__ void fill_uniform_int_kernel(int32_t* out, int64_t n, int32_t bound, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = int32_t(mix(seed ^ mix(uint64_t(i))) % uint64_t(bound));
}

int grid_for(int64_t n) { return int(std::min<int64_t>((n + 255) / 256, 65536)); }

}  // namespace

void fill_normal(float* out, int64_t n, float mean, float stddev, uint64_t seed, cudaStream_t stream) {
  if (n <= 0) return;
  fill_normal_kernel<<<grid_for(n), 256, 0, stream>>>(out, n, mean, stddev, seed);
  CUDA_CHECK_LAUNCH();
}

void fill_uniform_int(int32_t* out, int64_t n, int32_t bound, uint64_t seed, cudaStream_t stream) {
  if (n <= 0) return;
  fill_uniform_int_kernel<<<grid_for(n), 256, 0, stream>>>(out, n, bound, seed);
  CUDA_CHECK_LAUNCH();
}

}  // namespace longtune::cuda
