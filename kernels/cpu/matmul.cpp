#include "kernels/cpu/matmul.hpp"

#include <algorithm>
#include <vector>

namespace longtune::cpu {

void matmul_forward(float* out, const float* inp, const float* weight, int64_t T, int64_t C, int64_t OC) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t o = 0; o < OC; ++o) {
      const float* x = inp + t * C;
      const float* w = weight + o * C;
      double acc = 0.0;
      for (int64_t c = 0; c < C; ++c) acc += static_cast<double>(x[c]) * w[c];
      out[t * OC + o] = static_cast<float>(acc);
    }
  }
}

void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                     int64_t T, int64_t C, int64_t OC) {
  // dinp[t, c] = sum_o dout[t, o] * weight[o, c]   (assigned), one row t per iteration.
  if (dinp != nullptr) {
#pragma omp parallel
    {
      std::vector<double> acc(static_cast<size_t>(C));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t o = 0; o < OC; ++o) {
          const double d = dout[t * OC + o];
          const float* w = weight + o * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += d * w[c];
        }
        for (int64_t c = 0; c < C; ++c) dinp[t * C + c] = static_cast<float>(acc[c]);
      }
    }
  }
  // dweight[o, c] += sum_t dout[t, o] * inp[t, c], one row o per iteration (t summed in order).
#pragma omp parallel
  {
    std::vector<double> acc(static_cast<size_t>(C));
#pragma omp for schedule(static)
    for (int64_t o = 0; o < OC; ++o) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t = 0; t < T; ++t) {
        const double d = dout[t * OC + o];
        const float* x = inp + t * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += d * x[c];
      }
      for (int64_t c = 0; c < C; ++c) dweight[o * C + c] += static_cast<float>(acc[c]);
    }
  }
}

}  // namespace longtune::cpu
