#pragma once
#include <cstdint>

namespace longtune::cpu {

// lm_head + cross-entropy over chunks of tokens, so the (T, V) logits never exist at once: twin of
// kernels/cuda/linear_cross_entropy.cuh (same names and argument order, minus scratch/blas/stream).
// A composition of matmul_forward/backward and cross_entropy_forward/backward, chunk by chunk.
//
// losses (T) = logsumexp(logits[t]) - logits[t, targets[t]], 0 where targets[t] < 0, with
// logits = hidden (T, C) @ weight (V, C)^T. Returns the sum of losses (double).
double linear_cross_entropy_forward(float* losses, const float* hidden, const float* weight, const int32_t* targets,
                                    int64_t T, int64_t C, int64_t V);
// Also the gradients of sum_t(losses[t]) * scale: dhidden (T, C) assigned (skipped when null),
// dweight (V, C) += (skipped when null). Returns the sum of losses (double).
double linear_cross_entropy_forward_backward(float* losses, float* dhidden, float* dweight, const float* hidden,
                                             const float* weight, const int32_t* targets, float scale, int64_t T,
                                             int64_t C, int64_t V);

}  // namespace longtune::cpu
