// SwiGLU on the GPU; twin of kernels/cpu/swiglu.hpp.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace longtune::cuda {

// out (T, F) = silu(gate) * up (dense, row stride F). gate, up are (T, F) with row stride
// ld_gate_up (0 = F): with one fused gate|up projection, gate = buf, up = buf + F, ld = 2F.
template <typename scalar_t>
void swiglu_forward(scalar_t* out, const scalar_t* gate, const scalar_t* up, int64_t T, int64_t F, cudaStream_t stream,
                    int64_t ld_gate_up = 0);
// dgate, dup (T, F) assigned, with the same row stride ld_gate_up as gate/up; dout dense.
template <typename scalar_t>
void swiglu_backward(scalar_t* dgate, scalar_t* dup, const scalar_t* dout, const scalar_t* gate, const scalar_t* up, int64_t T, int64_t F,
                     cudaStream_t stream, int64_t ld_gate_up = 0);

}  // namespace longtune::cuda
