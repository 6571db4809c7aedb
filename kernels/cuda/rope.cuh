// Rotary embedding (transformers' rotate_half layout, llama3 scaling folded into inv_freq);
// twin of kernels/cpu/rope.hpp. The angle positions[t] * inv_freq[i] is formed in fp32 exactly as
// the CPU reference forms it; cos/sin in fp32 (sincosf, not the fast intrinsics).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace longtune::cuda {

// x (T, NH, HD) with row stride ld (elements between tokens; 0 = NH * HD), for inp and out alike;
// out may alias inp. inv_freq (HD/2) fp32 on the device.
template <typename scalar_t>
void rope_forward(scalar_t* out, const scalar_t* inp, const int32_t* positions, const float* inv_freq, int64_t T, int64_t NH,
                  int64_t HD, cudaStream_t stream, int64_t ld = 0);
// dinp = inverse rotation of dout (assigned); dinp may alias dout.
template <typename scalar_t>
void rope_backward(scalar_t* dinp, const scalar_t* dout, const int32_t* positions, const float* inv_freq, int64_t T, int64_t NH,
                   int64_t HD, cudaStream_t stream, int64_t ld = 0);

}  // namespace longtune::cuda
