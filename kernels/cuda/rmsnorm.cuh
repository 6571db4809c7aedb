// RMSNorm on the GPU, plain and fused with the residual add; twin of kernels/cpu/rmsnorm.hpp.
// weight is in the storage type (it comes from the compute-dtype weight copy); rstd is fp32;
// every sum accumulates in fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace longtune::cuda {

// out (T, C) = inp * rstd[t] * weight ; rstd (T)
template <typename scalar_t>
void rmsnorm_forward(scalar_t* out, float* rstd, const scalar_t* inp, const scalar_t* weight, int64_t T, int64_t C, float eps,
                     cudaStream_t stream);
// dinp (T, C) assigned ; dweight (C) += (deterministic: per-block partials reduced in a fixed order)
template <typename scalar_t>
void rmsnorm_backward(scalar_t* dinp, float* dweight, const scalar_t* dout, const scalar_t* inp, const scalar_t* weight, const float* rstd,
                      int64_t T, int64_t C, cudaStream_t stream);

// Fused residual add + RMSNorm (one pass):
//   residual (T, C) = inp + branch            (the new residual stream; may alias inp)
//   out      (T, C) = rmsnorm(residual) * weight ; rstd (T)
template <typename scalar_t>
void residual_rmsnorm_forward(scalar_t* residual, scalar_t* out, float* rstd, const scalar_t* inp, const scalar_t* branch, const scalar_t* weight,
                              int64_t T, int64_t C, float eps, cudaStream_t stream);
// Backward of the fused op. The residual stream's gradient is the sum of what flows back through
// the norm and what flows straight down the residual path:
//   dinp (T, C) = dresidual + d(rmsnorm)/d(residual)^T dout     (assigned; it is also d(branch))
//   dweight (C) += sum_t dout * residual * rstd
// dinp may alias dresidual.
template <typename scalar_t>
void residual_rmsnorm_backward(scalar_t* dinp, float* dweight, const scalar_t* dout, const scalar_t* dresidual, const scalar_t* residual,
                               const scalar_t* weight, const float* rstd, int64_t T, int64_t C, cudaStream_t stream);

}  // namespace longtune::cuda
