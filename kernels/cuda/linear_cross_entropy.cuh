// lm_head + cross-entropy fused: streams over chunks of tokens, so the (T, V) logits never exist at
// once; forward and backward in one pass. Twin of kernels/cpu/linear_cross_entropy.hpp.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/matmul.cuh"

namespace longtune::cuda {

// Scratch for one chunk of `chunk_tokens` tokens: fp32 logits (chunk, V) plus the storage-type
// dlogits. The launcher picks the chunk from the scratch it is given (at least 1 token's worth).
size_t linear_cross_entropy_scratch_bytes(int64_t chunk_tokens, int64_t V);

// losses (T) fp32 = logsumexp(logits[t]) - logits[t, targets[t]], 0 where targets[t] < 0,
// with logits = hidden (T, C) @ weight (V, C)^T computed in fp32 accumulation.
template <typename scalar_t>
void linear_cross_entropy_forward(float* losses, const scalar_t* hidden, const scalar_t* weight,
                                  const int32_t* targets, int64_t T, int64_t C, int64_t V, void* scratch,
                                  size_t scratch_bytes, const Blas& blas, cudaStream_t stream);
// Also the gradients of sum_t(losses[t]) * scale:
//   dhidden (T, C) assigned ; dweight (V, C) fp32 +=.
// scale is d(total loss)/d(losses[t]) (1 / counted targets of the global batch, times the loss
// scale in fp16 training).
template <typename scalar_t>
void linear_cross_entropy_forward_backward(float* losses, scalar_t* dhidden, float* dweight, const scalar_t* hidden,
                                           const scalar_t* weight, const int32_t* targets, float scale, int64_t T,
                                           int64_t C, int64_t V, void* scratch, size_t scratch_bytes,
                                           const Blas& blas, cudaStream_t stream);

}  // namespace longtune::cuda
