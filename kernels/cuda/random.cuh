// Counter-based random numbers on the device (benchmarks and synthetic initialization): the value
// of element i depends only on (seed, i), so any launch shape gives the same array.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace longtune::cuda {

// out[i] = mean + stddev * N(0, 1), i < n.
void fill_normal(float* out, int64_t n, float mean, float stddev, uint64_t seed, cudaStream_t stream);
// out[i] uniform in [0, bound), i < n.
void fill_uniform_int(int32_t* out, int64_t n, int32_t bound, uint64_t seed, cudaStream_t stream);

}  // namespace longtune::cuda
