#pragma once
#include <cstdint>

namespace longtune::cpu {

// out (T, C) = inp * rstd[t] * weight ; rstd (T) = 1 / sqrt(mean_c inp^2 + eps), saved for backward
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t T, int64_t C,
                     float eps);
// dinp (T, C) = ... (assigned) ; dweight (C) += sum_t dout * inp * rstd
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t T, int64_t C);

}  // namespace longtune::cpu
