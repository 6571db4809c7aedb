#include "kernels/cpu/rmsnorm.hpp"

#include <cmath>

namespace longtune::cpu {

// y[c] = w[c] * x[c] * r,  r = (mean_c x^2 + eps)^(-1/2)
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t T, int64_t C,
                     float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const float* x = inp + t * C;
    double sumsq = 0.0;
    for (int64_t c = 0; c < C; ++c) sumsq += static_cast<double>(x[c]) * x[c];
    const double r = 1.0 / std::sqrt(sumsq / static_cast<double>(C) + static_cast<double>(eps));
    rstd[t] = static_cast<float>(r);
    float* y = out + t * C;
    for (int64_t c = 0; c < C; ++c) y[c] = static_cast<float>(static_cast<double>(weight[c]) * (x[c] * r));
  }
}

// dr/dx[j] = -r^3 x[j] / C, so
// dx[j] = r * (dy[j] w[j] - x[j] * r^2 * (1/C) sum_c dy[c] w[c] x[c]) ;  dw[c] += sum_t dy[c] x[c] r
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t T, int64_t C) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const float* x = inp + t * C;
    const float* dy = dout + t * C;
    const double r = rstd[t];
    double dot = 0.0;  // sum_c dy[c] w[c] x[c]
    for (int64_t c = 0; c < C; ++c) dot += static_cast<double>(dy[c]) * weight[c] * x[c];
    const double k = r * r * dot / static_cast<double>(C);
    float* dx = dinp + t * C;
    for (int64_t c = 0; c < C; ++c)
      dx[c] = static_cast<float>(r * (static_cast<double>(dy[c]) * weight[c] - x[c] * k));
  }
  // One column c per iteration, tokens summed in order: deterministic.
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    double acc = 0.0;
    for (int64_t t = 0; t < T; ++t) acc += static_cast<double>(dout[t * C + c]) * inp[t * C + c] * rstd[t];
    dweight[c] += static_cast<float>(acc);
  }
}

}  // namespace longtune::cpu
