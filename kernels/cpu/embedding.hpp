#pragma once
#include <cstdint>

namespace longtune::cpu {

// out (T, C) = wte[tokens[t], :] ; wte (V, C)
void embedding_forward(float* out, const int32_t* tokens, const float* wte, int64_t T, int64_t C);
// dwte (V, C) += dout rows scattered by token id
void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t T, int64_t C);

}  // namespace longtune::cpu
