// RMSNorm on the GPU (kernels/cuda/rmsnorm.cuh), plain and fused with the residual add.
//
// Forward: one block per row; each thread keeps its MAXV vectors of VEC elements (16-byte accesses
// when C and the pointers allow) in registers, so a row is read once. Sums in fp32, fixed tree.
// Backward: one block per group of consecutive rows (the grouping depends on T only); per row the
// block computes dinp as in the forward, and each thread accumulates dweight for its columns over
// the group's rows in registers. The group partials (G x C fp32, stream-ordered allocation) are
// then added in group order in double: deterministic, no atomics.
#include <algorithm>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/rmsnorm.cuh"
#include "kernels/cuda/storage_vec.cuh"

namespace longtune::cuda {

namespace {

using detail::aligned16;
using detail::kVec16;
using detail::load_f32;
using detail::store_f32;

constexpr int64_t kMaxGroups = 1024;  // backward: row groups (dweight partials)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result, and
// the same inputs give the same bits.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // sh may still be read by the previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  float total = 0.0f;
  for (int w = 0; w < nw; ++w) total += sh[w];
  return total;
}

// residual = inp + branch (RESIDUAL), then out = x * rstd * weight with x = the (rounded) residual.
template <typename T, int VEC, int MAXV, bool RESIDUAL>
__global__ void __launch_bounds__(1024) rmsnorm_forward_kernel(T* residual, T* __restrict__ out, float* __restrict__ rstd,
                                                               const T* inp, const T* branch, const T* __restrict__ weight,
                                                               int64_t C, float eps) {
  __shared__ float sh[32];
  const int64_t row = blockIdx.x;
  const int nvec = int(C / VEC);
  float x[MAXV][VEC];
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < MAXV; ++j) {
    const int v = threadIdx.x + j * blockDim.x;
    if (v < nvec) {
      const int64_t off = row * C + int64_t(v) * VEC;
      load_f32<T, VEC>(x[j], inp + off);
      if constexpr (RESIDUAL) {
        float b[VEC];
        load_f32<T, VEC>(b, branch + off);
        detail::Pack<T, VEC> r;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          r.v[i] = detail::from_f32<T>(x[j][i] + b[i]);
          x[j][i] = detail::to_f32(r.v[i]);
        }
        *reinterpret_cast<detail::Pack<T, VEC>*>(residual + off) = r;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) ss += x[j][i] * x[j][i];
    }
  }
  const float r = 1.0f / sqrtf(block_sum(ss, sh) / float(C) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
  for (int j = 0; j < MAXV; ++j) {
    const int v = threadIdx.x + j * blockDim.x;
    if (v < nvec) {
      float w[VEC], y[VEC];
      load_f32<T, VEC>(w, weight + int64_t(v) * VEC);
#pragma unroll
      for (int i = 0; i < VEC; ++i) y[i] = x[j][i] * r * w[i];
      store_f32<T, VEC>(out + row * C + int64_t(v) * VEC, y);
    }
  }
}

// Rows [g * rows_per_group, ...) of group g = blockIdx.x:
//   dinp = r * (dout * w - x * r^2 * mean_c(dout * w * x))  (+ dresidual when RESIDUAL)
//   partial[g, c] = sum over the group's rows of dout * x * r
template <typename T, int VEC, int MAXV, bool RESIDUAL>
__global__ void __launch_bounds__(1024) rmsnorm_backward_kernel(T* dinp, float* __restrict__ partial, const T* __restrict__ dout,
                                                                const T* dresidual, const T* __restrict__ inp,
                                                                const T* __restrict__ weight, const float* __restrict__ rstd,
                                                                int64_t T_, int64_t C, int64_t rows_per_group) {
  __shared__ float sh[32];
  const int nvec = int(C / VEC);
  const int64_t r0 = int64_t(blockIdx.x) * rows_per_group;
  const int64_t r1 = min(r0 + rows_per_group, T_);
  float w[MAXV][VEC], dw[MAXV][VEC];
#pragma unroll
  for (int j = 0; j < MAXV; ++j) {
    const int v = threadIdx.x + j * blockDim.x;
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw[j][i] = 0.0f;
    if (v < nvec) load_f32<T, VEC>(w[j], weight + int64_t(v) * VEC);
  }
  const float inv_c = 1.0f / float(C);
  for (int64_t row = r0; row < r1; ++row) {
    float x[MAXV][VEC], dy[MAXV][VEC];
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < MAXV; ++j) {
      const int v = threadIdx.x + j * blockDim.x;
      if (v < nvec) {
        const int64_t off = row * C + int64_t(v) * VEC;
        load_f32<T, VEC>(x[j], inp + off);
        load_f32<T, VEC>(dy[j], dout + off);
#pragma unroll
        for (int i = 0; i < VEC; ++i) dot += dy[j][i] * w[j][i] * x[j][i];
      }
    }
    const float r = rstd[row];
    const float k = r * r * (block_sum(dot, sh) * inv_c);
#pragma unroll
    for (int j = 0; j < MAXV; ++j) {
      const int v = threadIdx.x + j * blockDim.x;
      if (v < nvec) {
        const int64_t off = row * C + int64_t(v) * VEC;
        float dx[VEC];
        if constexpr (RESIDUAL) load_f32<T, VEC>(dx, dresidual + off);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float g = r * (dy[j][i] * w[j][i] - x[j][i] * k);
          if constexpr (RESIDUAL) dx[i] += g;
          else dx[i] = g;
          dw[j][i] += dy[j][i] * x[j][i] * r;
        }
        store_f32<T, VEC>(dinp + off, dx);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < MAXV; ++j) {
    const int v = threadIdx.x + j * blockDim.x;
    if (v < nvec) {
      float* p = partial + int64_t(blockIdx.x) * C + int64_t(v) * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) p[i] = dw[j][i];
    }
  }
}

// dweight[c] += sum_g partial[g, c] in double, in a fixed order. Block (32 columns x 32 ways): way w
// sums groups w, w + 32, ...; the 32 ways are then added in order.
constexpr int kFinCols = 32, kFinWays = 32;
__global__ void __launch_bounds__(kFinCols * kFinWays) dweight_finalize_kernel(float* __restrict__ dweight,
                                                                               const float* __restrict__ partial,
                                                                               int64_t groups, int64_t C) {
  __shared__ double sh[kFinWays][kFinCols];
  const int cx = threadIdx.x % kFinCols, way = threadIdx.x / kFinCols;
  const int64_t c = int64_t(blockIdx.x) * kFinCols + cx;
  double acc = 0.0;
  if (c < C)
    for (int64_t g = way; g < groups; g += kFinWays) acc += double(partial[g * C + c]);
  sh[way][cx] = acc;
  __syncthreads();
  if (way == 0 && c < C) {
    double total = 0.0;
    for (int w = 0; w < kFinWays; ++w) total += sh[w][cx];
    dweight[c] += float(total);
  }
}

// Threads per block and vectors per thread for a row of nvec vectors: the fewest vectors per thread
// (1, 2, 4, 8) that keep the block at <= 256 threads, else at <= 1024.
struct RowPlan {
  int threads = 0, maxv = 0;
};
RowPlan row_plan(int64_t nvec) {
  for (int limit : {256, 1024})
    for (int m : {1, 2, 4, 8})
      if ((nvec + m - 1) / m <= limit) {
        const int64_t t = (nvec + m - 1) / m;
        return {int(std::max<int64_t>(32, (t + 31) / 32 * 32)), m};
      }
  return {};
}

template <typename T, int VEC, bool RESIDUAL>
void forward_vec(T* residual, T* out, float* rstd, const T* inp, const T* branch, const T* weight, int64_t T_, int64_t C,
                 float eps, cudaStream_t stream) {
  const RowPlan p = row_plan(C / VEC);
  LT_CHECK(p.threads > 0, "rmsnorm_forward: C = " + std::to_string(C) + " too large for one block per row");
  const dim3 grid{unsigned(T_)};
#define LT_LAUNCH(M)                                                                                               \
  rmsnorm_forward_kernel<T, VEC, M, RESIDUAL><<<grid, p.threads, 0, stream>>>(residual, out, rstd, inp, branch, weight, C, \
                                                                               eps)
  switch (p.maxv) {
    case 1: LT_LAUNCH(1); break;
    case 2: LT_LAUNCH(2); break;
    case 4: LT_LAUNCH(4); break;
    default: LT_LAUNCH(8); break;
  }
#undef LT_LAUNCH
  CUDA_CHECK_LAUNCH();
}

template <typename T, bool RESIDUAL>
void forward_impl(T* residual, T* out, float* rstd, const T* inp, const T* branch, const T* weight, int64_t T_, int64_t C,
                  float eps, cudaStream_t stream) {
  if (T_ == 0 || C == 0) return;
  constexpr int V = kVec16<T>;
  const bool vec = C % V == 0 && aligned16(out) && aligned16(inp) && aligned16(weight) &&
                   (!RESIDUAL || (aligned16(residual) && aligned16(branch)));
  if (vec) forward_vec<T, V, RESIDUAL>(residual, out, rstd, inp, branch, weight, T_, C, eps, stream);
  else forward_vec<T, 1, RESIDUAL>(residual, out, rstd, inp, branch, weight, T_, C, eps, stream);
}

template <typename T, int VEC, bool RESIDUAL>
void backward_vec(T* dinp, float* partial, const T* dout, const T* dresidual, const T* inp, const T* weight,
                  const float* rstd, int64_t T_, int64_t C, int64_t rows_per_group, int64_t groups, cudaStream_t stream) {
  const RowPlan p = row_plan(C / VEC);
  LT_CHECK(p.threads > 0, "rmsnorm_backward: C = " + std::to_string(C) + " too large for one block per row");
  const dim3 grid{unsigned(groups)};
#define LT_LAUNCH(M)                                                                                                  \
  rmsnorm_backward_kernel<T, VEC, M, RESIDUAL><<<grid, p.threads, 0, stream>>>(dinp, partial, dout, dresidual, inp, weight, \
                                                                                rstd, T_, C, rows_per_group)
  switch (p.maxv) {
    case 1: LT_LAUNCH(1); break;
    case 2: LT_LAUNCH(2); break;
    case 4: LT_LAUNCH(4); break;
    default: LT_LAUNCH(8); break;
  }
#undef LT_LAUNCH
  CUDA_CHECK_LAUNCH();
}

template <typename T, bool RESIDUAL>
void backward_impl(T* dinp, float* dweight, const T* dout, const T* dresidual, const T* inp, const T* weight,
                   const float* rstd, int64_t T_, int64_t C, cudaStream_t stream) {
  if (T_ == 0 || C == 0) return;
  const int64_t rows_per_group = (T_ + kMaxGroups - 1) / kMaxGroups;
  const int64_t groups = (T_ + rows_per_group - 1) / rows_per_group;
  float* partial = nullptr;
  CUDA_CHECK(cudaMallocAsync(&partial, size_t(groups * C) * sizeof(float), stream));
  constexpr int V = kVec16<T>;
  const bool vec = C % V == 0 && aligned16(dinp) && aligned16(dout) && aligned16(inp) && aligned16(weight) &&
                   (!RESIDUAL || aligned16(dresidual));
  if (vec) backward_vec<T, V, RESIDUAL>(dinp, partial, dout, dresidual, inp, weight, rstd, T_, C, rows_per_group, groups, stream);
  else backward_vec<T, 1, RESIDUAL>(dinp, partial, dout, dresidual, inp, weight, rstd, T_, C, rows_per_group, groups, stream);
  dweight_finalize_kernel<<<unsigned((C + kFinCols - 1) / kFinCols), kFinCols * kFinWays, 0, stream>>>(dweight, partial,
                                                                                                     groups, C);
  CUDA_CHECK_LAUNCH();
  CUDA_CHECK(cudaFreeAsync(partial, stream));
}

}  // namespace

template <typename scalar_t>
void rmsnorm_forward(scalar_t* out, float* rstd, const scalar_t* inp, const scalar_t* weight, int64_t T, int64_t C,
                     float eps, cudaStream_t stream) {
  forward_impl<scalar_t, false>(nullptr, out, rstd, inp, nullptr, weight, T, C, eps, stream);
}

template <typename scalar_t>
void rmsnorm_backward(scalar_t* dinp, float* dweight, const scalar_t* dout, const scalar_t* inp, const scalar_t* weight,
                      const float* rstd, int64_t T, int64_t C, cudaStream_t stream) {
  backward_impl<scalar_t, false>(dinp, dweight, dout, nullptr, inp, weight, rstd, T, C, stream);
}

template <typename scalar_t>
void residual_rmsnorm_forward(scalar_t* residual, scalar_t* out, float* rstd, const scalar_t* inp, const scalar_t* branch,
                              const scalar_t* weight, int64_t T, int64_t C, float eps, cudaStream_t stream) {
  forward_impl<scalar_t, true>(residual, out, rstd, inp, branch, weight, T, C, eps, stream);
}

template <typename scalar_t>
void residual_rmsnorm_backward(scalar_t* dinp, float* dweight, const scalar_t* dout, const scalar_t* dresidual,
                               const scalar_t* residual, const scalar_t* weight, const float* rstd, int64_t T, int64_t C,
                               cudaStream_t stream) {
  backward_impl<scalar_t, true>(dinp, dweight, dout, dresidual, residual, weight, rstd, T, C, stream);
}

#define LT_INSTANTIATE(T)                                                                                              \
  template void rmsnorm_forward<T>(T*, float*, const T*, const T*, int64_t, int64_t, float, cudaStream_t);            \
  template void rmsnorm_backward<T>(T*, float*, const T*, const T*, const T*, const float*, int64_t, int64_t,         \
                                    cudaStream_t);                                                                     \
  template void residual_rmsnorm_forward<T>(T*, T*, float*, const T*, const T*, const T*, int64_t, int64_t, float,    \
                                            cudaStream_t);                                                             \
  template void residual_rmsnorm_backward<T>(T*, float*, const T*, const T*, const T*, const T*, const float*, int64_t, \
                                             int64_t, cudaStream_t);
LT_INSTANTIATE(float)
LT_INSTANTIATE(__nv_bfloat16)
LT_INSTANTIATE(__half)
#undef LT_INSTANTIATE

}  // namespace longtune::cuda
