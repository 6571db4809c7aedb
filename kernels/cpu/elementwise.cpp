#include "kernels/cpu/elementwise.hpp"

#include "src/common/dtype.hpp"

namespace longtune::cpu {

void accumulate_f32(float* acc, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}

void accumulate_bf16(uint16_t* acc, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = float_to_bf16(bf16_to_float(acc[i]) + x[i]);
}

}  // namespace longtune::cpu
