#include "kernels/cpu/cross_entropy.hpp"

#include <cmath>
#include <vector>

#include "src/common/error.hpp"

namespace longtune::cpu {

namespace {
// Stable log(sum_v exp(x[v])) in double.
double logsumexp(const float* x, int64_t V) {
  double mx = -INFINITY;
  for (int64_t v = 0; v < V; ++v) mx = std::fmax(mx, static_cast<double>(x[v]));
  double sum = 0.0;
  for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(x[v]) - mx);
  return mx + std::log(sum);
}
}  // namespace

double cross_entropy_forward(float* losses, const float* logits, const int32_t* targets, int64_t T, int64_t V) {
  for (int64_t t = 0; t < T; ++t) LT_CHECK(targets[t] < V, "cross_entropy_forward: target >= vocabulary size");
  std::vector<double> loss(static_cast<size_t>(T), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    if (targets[t] < 0) continue;
    const float* x = logits + t * V;
    loss[t] = logsumexp(x, V) - static_cast<double>(x[targets[t]]);
  }
  double total = 0.0;  // summed serially, in token order
  for (int64_t t = 0; t < T; ++t) {
    losses[t] = static_cast<float>(loss[t]);
    total += loss[t];
  }
  return total;
}

void cross_entropy_backward(float* dlogits, const float* logits, const int32_t* targets, float scale, int64_t T,
                            int64_t V) {
  for (int64_t t = 0; t < T; ++t) LT_CHECK(targets[t] < V, "cross_entropy_backward: target >= vocabulary size");
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    float* d = dlogits + t * V;
    if (targets[t] < 0) {
      for (int64_t v = 0; v < V; ++v) d[v] = 0.0f;
      continue;
    }
    const float* x = logits + t * V;
    const double lse = logsumexp(x, V);  // whole row read before any write: in-place safe
    for (int64_t v = 0; v < V; ++v) {
      const double p = std::exp(static_cast<double>(x[v]) - lse);
      const double onehot = (v == targets[t]) ? 1.0 : 0.0;
      d[v] = static_cast<float>(static_cast<double>(scale) * (p - onehot));
    }
  }
}

}  // namespace longtune::cpu
