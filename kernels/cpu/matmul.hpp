#pragma once
#include <cstdint>

namespace longtune::cpu {

// out (T, OC) = inp (T, C) @ weight (OC, C)^T   (nn.Linear without bias)
void matmul_forward(float* out, const float* inp, const float* weight, int64_t T, int64_t C, int64_t OC);
// dinp (T, C) = dout @ weight (assigned; skipped when dinp is null) ; dweight (OC, C) += dout^T @ inp
void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                     int64_t T, int64_t C, int64_t OC);

}  // namespace longtune::cpu
