#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/rmsnorm.cuh"

namespace longtune::cuda {

namespace {

constexpr int kThreads = 256;         // one block per token row
constexpr int kRowsPerPartial = 64;   // dweight: rows summed per block before the final pass

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T from_float(float x);
template <> __device__ inline float from_float<float>(float x) { return x; }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Sum over the block; every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  return total;
}

template <typename T>
__global__ void rmsnorm_forward_kernel(T* out, float* rstd, const T* inp, const float* weight, int64_t C, float eps) {
  const int64_t row = blockIdx.x;
  const T* x = inp + row * C;
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = to_float(x[c]);
    ss += v * v;
  }
  const float r = rsqrtf(block_sum(ss) / float(C) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) out[row * C + c] = from_float<T>(to_float(x[c]) * r * weight[c]);
}

// dinp = rstd * (w * dout) - rstd^3 / C * x * sum_c(w * dout * x)
template <typename T>
__global__ void rmsnorm_backward_dinp_kernel(T* dinp, const T* dout, const T* inp, const float* weight,
                                             const float* rstd, int64_t C) {
  const int64_t row = blockIdx.x;
  const T* x = inp + row * C;
  const T* dy = dout + row * C;
  float dot = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) dot += weight[c] * to_float(dy[c]) * to_float(x[c]);
  dot = block_sum(dot);
  const float r = rstd[row];
  const float k = r * r * r * dot / float(C);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    dinp[row * C + c] = from_float<T>(r * weight[c] * to_float(dy[c]) - k * to_float(x[c]));
}

// partial[p, c] = sum over rows [p*R, (p+1)*R) of dout * x * rstd
template <typename T>
__global__ void rmsnorm_backward_dweight_partial_kernel(float* partial, const T* dout, const T* inp, const float* rstd,
                                                        int64_t T_, int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t r0 = int64_t(blockIdx.y) * kRowsPerPartial;
  const int64_t r1 = r0 + kRowsPerPartial < T_ ? r0 + kRowsPerPartial : T_;
  float acc = 0.0f;
  for (int64_t r = r0; r < r1; ++r) acc += to_float(dout[r * C + c]) * to_float(inp[r * C + c]) * rstd[r];
  partial[int64_t(blockIdx.y) * C + c] = acc;
}

__global__ void sum_partials_kernel(float* dweight, const float* partial, int64_t num_partials, int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0.0f;
  for (int64_t p = 0; p < num_partials; ++p) acc += partial[p * C + c];
  dweight[c] += acc;
}

template <typename T>
void forward_impl(T* out, float* rstd, const T* inp, const float* weight, int64_t T_, int64_t C, float eps,
                  cudaStream_t stream) {
  if (T_ == 0) return;
  rmsnorm_forward_kernel<T><<<unsigned(T_), kThreads, 0, stream>>>(out, rstd, inp, weight, C, eps);
  CUDA_CHECK_LAUNCH();
}

template <typename T>
void backward_impl(T* dinp, float* dweight, const T* dout, const T* inp, const float* weight, const float* rstd,
                   int64_t T_, int64_t C, cudaStream_t stream) {
  if (T_ == 0) return;
  rmsnorm_backward_dinp_kernel<T><<<unsigned(T_), kThreads, 0, stream>>>(dinp, dout, inp, weight, rstd, C);
  CUDA_CHECK_LAUNCH();
  const int64_t num_partials = (T_ + kRowsPerPartial - 1) / kRowsPerPartial;
  float* partial = nullptr;
  CUDA_CHECK(cudaMallocAsync(&partial, size_t(num_partials * C) * sizeof(float), stream));
  const dim3 grid(unsigned((C + kThreads - 1) / kThreads), unsigned(num_partials));
  rmsnorm_backward_dweight_partial_kernel<T><<<grid, kThreads, 0, stream>>>(partial, dout, inp, rstd, T_, C);
  CUDA_CHECK_LAUNCH();
  sum_partials_kernel<<<unsigned((C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(dweight, partial,
                                                                                         num_partials, C);
  CUDA_CHECK_LAUNCH();
  CUDA_CHECK(cudaFreeAsync(partial, stream));
}

}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t T, int64_t C, float eps,
                     cudaStream_t stream) {
  forward_impl(out, rstd, inp, weight, T, C, eps, stream);
}
void rmsnorm_forward(__nv_bfloat16* out, float* rstd, const __nv_bfloat16* inp, const float* weight, int64_t T,
                     int64_t C, float eps, cudaStream_t stream) {
  forward_impl(out, rstd, inp, weight, T, C, eps, stream);
}
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t T, int64_t C, cudaStream_t stream) {
  backward_impl(dinp, dweight, dout, inp, weight, rstd, T, C, stream);
}
void rmsnorm_backward(__nv_bfloat16* dinp, float* dweight, const __nv_bfloat16* dout, const __nv_bfloat16* inp,
                      const float* weight, const float* rstd, int64_t T, int64_t C, cudaStream_t stream) {
  backward_impl(dinp, dweight, dout, inp, weight, rstd, T, C, stream);
}

}  // namespace longtune::cuda
