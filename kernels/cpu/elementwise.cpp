#include "kernels/cpu/elementwise.hpp"

namespace longtune::cpu {

void accumulate_f32(float* acc, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
}

}  // namespace longtune::cpu
