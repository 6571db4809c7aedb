#pragma once
#include <cstdint>

namespace longtune::cpu {

// Rotary embedding in transformers' rotate_half layout: element i of a head pairs with
// element i + HD/2 and is rotated by angle = positions[t] * inv_freq[i] (i < HD/2).
// The angle is formed in fp32, as transformers does even for fp64 models, then cos/sin are
// taken in double. x (T, NH, HD); out may alias inp.
void rope_forward(float* out, const float* inp, const int32_t* positions, const float* inv_freq, int64_t T,
                  int64_t NH, int64_t HD);
// dinp (T, NH, HD) = inverse rotation of dout (assigned); dinp may alias dout.
void rope_backward(float* dinp, const float* dout, const int32_t* positions, const float* inv_freq, int64_t T,
                   int64_t NH, int64_t HD);

}  // namespace longtune::cpu
