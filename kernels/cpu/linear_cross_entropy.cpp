#include "kernels/cpu/linear_cross_entropy.hpp"

#include <algorithm>
#include <vector>

#include "kernels/cpu/cross_entropy.hpp"
#include "kernels/cpu/matmul.hpp"
#include "src/common/error.hpp"

namespace longtune::cpu {

namespace {
constexpr int64_t kChunk = 256;  // tokens per logits chunk: (kChunk, V) fp32 at a time
}  // namespace

double linear_cross_entropy_forward(float* losses, const float* hidden, const float* weight, const int32_t* targets,
                                    int64_t T, int64_t C, int64_t V) {
  std::vector<float> logits(static_cast<size_t>(std::min(kChunk, T) * V));
  double total = 0.0;
  for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
    const int64_t n = std::min(kChunk, T - t0);
    matmul_forward(logits.data(), hidden + t0 * C, weight, n, C, V);
    total += cross_entropy_forward(losses + t0, logits.data(), targets + t0, n, V);
  }
  return total;
}

double linear_cross_entropy_forward_backward(float* losses, float* dhidden, float* dweight, const float* hidden,
                                             const float* weight, const int32_t* targets, float scale, int64_t T,
                                             int64_t C, int64_t V) {
  std::vector<float> logits(static_cast<size_t>(std::min(kChunk, T) * V));
  std::vector<float> dweight_sink(dweight == nullptr && T > 0 ? size_t(V * C) : 0);
  double total = 0.0;
  for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
    const int64_t n = std::min(kChunk, T - t0);
    matmul_forward(logits.data(), hidden + t0 * C, weight, n, C, V);
    total += cross_entropy_forward(losses + t0, logits.data(), targets + t0, n, V);
    cross_entropy_backward(logits.data(), logits.data(), targets + t0, scale, n, V);  // in place: dlogits
    // cpu::matmul_backward always accumulates dweight: a null dweight goes to a sink.
    matmul_backward(dhidden != nullptr ? dhidden + t0 * C : nullptr,
                    dweight != nullptr ? dweight : dweight_sink.data(), logits.data(), hidden + t0 * C, weight, n, C,
                    V);
  }
  return total;
}

}  // namespace longtune::cpu
