// RMSNorm on the GPU: same names, argument order and semantics as kernels/cpu/rmsnorm.hpp,
// plus the stream. Storage fp32 or bf16 (out/inp/dinp/dout share the dtype); weight and the
// saved rstd are fp32; every sum accumulates in fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace longtune::cuda {

// out (T, C) = inp * rstd[t] * weight ; rstd (T)
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t T, int64_t C, float eps,
                     cudaStream_t stream);
void rmsnorm_forward(__nv_bfloat16* out, float* rstd, const __nv_bfloat16* inp, const float* weight, int64_t T,
                     int64_t C, float eps, cudaStream_t stream);
// dinp (T, C) assigned ; dweight (C) += (deterministic: per-block partials reduced in a fixed order)
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t T, int64_t C, cudaStream_t stream);
void rmsnorm_backward(__nv_bfloat16* dinp, float* dweight, const __nv_bfloat16* dout, const __nv_bfloat16* inp,
                      const float* weight, const float* rstd, int64_t T, int64_t C, cudaStream_t stream);

}  // namespace longtune::cuda
