#pragma once
#include <cstdint>

namespace longtune::cpu {

// out (T, F) = silu(gate) * up, silu(x) = x / (1 + exp(-x)) ; gate, up (T, F)
void swiglu_forward(float* out, const float* gate, const float* up, int64_t T, int64_t F);
// dgate, dup (T, F): assigned
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t T,
                     int64_t F);

}  // namespace longtune::cpu
