#include "kernels/cpu/embedding.hpp"

#include <algorithm>
#include <numeric>
#include <vector>

#include "src/common/error.hpp"

namespace longtune::cpu {

void embedding_forward(float* out, const int32_t* tokens, const float* wte, int64_t T, int64_t C) {
  for (int64_t t = 0; t < T; ++t) LT_CHECK(tokens[t] >= 0, "embedding_forward: negative token id");
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const float* row = wte + static_cast<int64_t>(tokens[t]) * C;
    float* o = out + t * C;
    for (int64_t c = 0; c < C; ++c) o[c] = row[c];
  }
}

void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t T, int64_t C) {
  for (int64_t t = 0; t < T; ++t) LT_CHECK(tokens[t] >= 0, "embedding_backward: negative token id");
  // Group the tokens by id (stable: each group keeps increasing t), so every vocabulary row is
  // summed by one thread, in double, in token order: deterministic whatever the thread count.
  std::vector<int64_t> order(static_cast<size_t>(T));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return tokens[a] < tokens[b]; });
  std::vector<int64_t> group_start;  // offsets into order where a new token id begins
  for (int64_t i = 0; i < T; ++i)
    if (i == 0 || tokens[order[i]] != tokens[order[i - 1]]) group_start.push_back(i);
  group_start.push_back(T);
  const int64_t num_groups = static_cast<int64_t>(group_start.size()) - 1;

#pragma omp parallel
  {
    std::vector<double> acc(static_cast<size_t>(C));
#pragma omp for schedule(dynamic)
    for (int64_t g = 0; g < num_groups; ++g) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t i = group_start[g]; i < group_start[g + 1]; ++i) {
        const float* d = dout + order[i] * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += d[c];
      }
      float* row = dwte + static_cast<int64_t>(tokens[order[group_start[g]]]) * C;
      for (int64_t c = 0; c < C; ++c) row[c] += static_cast<float>(acc[c]);
    }
  }
}

}  // namespace longtune::cpu
