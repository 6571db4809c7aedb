#include "kernels/cpu/swiglu.hpp"

#include <cmath>

namespace longtune::cpu {

namespace {
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
}  // namespace

// out = g * sigmoid(g) * u
void swiglu_forward(float* out, const float* gate, const float* up, int64_t T, int64_t F) {
  const int64_t n = T * F;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const double g = gate[i];
    out[i] = static_cast<float>(g * sigmoid(g) * up[i]);
  }
}

// d silu(g)/dg = s + g s (1 - s), s = sigmoid(g)
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t T,
                     int64_t F) {
  const int64_t n = T * F;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const double g = gate[i];
    const double s = sigmoid(g);
    const double dy = dout[i];
    dgate[i] = static_cast<float>(dy * up[i] * (s + g * s * (1.0 - s)));
    dup[i] = static_cast<float>(dy * g * s);
  }
}

}  // namespace longtune::cpu
