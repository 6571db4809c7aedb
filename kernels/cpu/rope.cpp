#include "kernels/cpu/rope.hpp"

#include <cmath>

#include "src/common/error.hpp"

namespace longtune::cpu {

namespace {

// Rotates every head of every token by +angle (sign = +1) or -angle (sign = -1, the transpose).
// Pair (a, b) = (x[i], x[i + HD/2]):  a' = a cos - b sin ;  b' = b cos + a sin.
// Both elements are read before either is written, so out may alias inp.
void rotate(float* out, const float* inp, const int32_t* positions, const float* inv_freq, int64_t T, int64_t NH,
            int64_t HD, double sign) {
  LT_CHECK(HD % 2 == 0, "rope: head dim must be even");
  const int64_t half = HD / 2;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(positions[t]) * inv_freq[i];  // fp32, as transformers
      const double cs = std::cos(static_cast<double>(angle));
      const double sn = sign * std::sin(static_cast<double>(angle));
      for (int64_t h = 0; h < NH; ++h) {
        const int64_t base = (t * NH + h) * HD;
        const double a = inp[base + i];
        const double b = inp[base + i + half];
        out[base + i] = static_cast<float>(a * cs - b * sn);
        out[base + i + half] = static_cast<float>(b * cs + a * sn);
      }
    }
  }
}

}  // namespace

void rope_forward(float* out, const float* inp, const int32_t* positions, const float* inv_freq, int64_t T,
                  int64_t NH, int64_t HD) {
  rotate(out, inp, positions, inv_freq, T, NH, HD, +1.0);
}

// The rotation is orthogonal: its gradient is the transpose, i.e. rotation by -angle.
void rope_backward(float* dinp, const float* dout, const int32_t* positions, const float* inv_freq, int64_t T,
                   int64_t NH, int64_t HD) {
  rotate(dinp, dout, positions, inv_freq, T, NH, HD, -1.0);
}

}  // namespace longtune::cpu
