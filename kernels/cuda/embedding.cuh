// Token embedding lookup on the GPU; twin of kernels/cpu/embedding.hpp.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace longtune::cuda {

// out (T, C) = wte[tokens[t], :] ; wte (V, C)
template <typename scalar_t>
void embedding_forward(scalar_t* out, const int32_t* tokens, const scalar_t* wte, int64_t T, int64_t C, cudaStream_t stream);

// dwte (V, C) += dout rows scattered by token id, deterministically (no float atomics): rows of
// the same token are summed in token order. `scratch` holds embedding_backward_scratch_bytes(T)
// bytes of device memory (the token order sorted by id).
template <typename scalar_t>
void embedding_backward(float* dwte, const scalar_t* dout, const int32_t* tokens, int64_t T, int64_t C, void* scratch,
                        cudaStream_t stream);
size_t embedding_backward_scratch_bytes(int64_t T);

}  // namespace longtune::cuda
