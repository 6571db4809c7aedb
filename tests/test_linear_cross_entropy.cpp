// The CPU reference of the fused lm_head + cross-entropy (kernels/cpu/linear_cross_entropy): equal to
// the unchunked composition of cpu::matmul and cpu::cross_entropy, gradients checked against central
// finite differences of its own forward, and the conventions (dweight +=, dhidden =).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/cross_entropy.hpp"
#include "kernels/cpu/linear_cross_entropy.hpp"
#include "kernels/cpu/matmul.hpp"
#include "src/common/error.hpp"

namespace {

namespace cpu = longtune::cpu;
using Vec = std::vector<float>;

Vec randn(size_t n, std::mt19937& rng, float stddev = 1.0f) {
  std::normal_distribution<float> dist(0.0f, stddev);
  Vec x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

std::vector<int32_t> make_targets(int64_t T, int64_t V, std::mt19937& rng) {
  std::uniform_int_distribution<int32_t> pick(0, int32_t(V - 1));
  std::vector<int32_t> t(static_cast<size_t>(T));
  for (size_t i = 0; i < t.size(); ++i) t[i] = (i % 7 == 3) ? -1 : pick(rng);
  return t;
}

bool bit_equal(const Vec& a, const Vec& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

double rel_error(const Vec& a, const Vec& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace

// Chunking (256 tokens) changes nothing per token: losses and dhidden are bit-identical to the whole
// (T, V) composition; dweight only regroups its fp32 sum per chunk.
TEST(CpuKernelLinearCrossEntropy, MatchesUnchunkedComposition) {
  std::mt19937 rng(51);
  const int64_t T = 600, C = 16, V = 50;
  const float scale = 1.0f / 500.0f;
  const Vec h = randn(size_t(T * C), rng), w = randn(size_t(V * C), rng, 0.5f), dw0 = randn(size_t(V * C), rng);
  const auto targets = make_targets(T, V, rng);

  Vec logits(size_t(T * V)), losses_ref(static_cast<size_t>(T)), dh_ref(size_t(T * C)), dw_ref = dw0;
  cpu::matmul_forward(logits.data(), h.data(), w.data(), T, C, V);
  const double total_ref = cpu::cross_entropy_forward(losses_ref.data(), logits.data(), targets.data(), T, V);
  cpu::cross_entropy_backward(logits.data(), logits.data(), targets.data(), scale, T, V);
  cpu::matmul_backward(dh_ref.data(), dw_ref.data(), logits.data(), h.data(), w.data(), T, C, V);

  Vec losses(static_cast<size_t>(T), std::numeric_limits<float>::quiet_NaN());
  Vec dh(size_t(T * C), std::numeric_limits<float>::quiet_NaN()), dw = dw0;
  const double total = cpu::linear_cross_entropy_forward_backward(losses.data(), dh.data(), dw.data(), h.data(),
                                                                  w.data(), targets.data(), scale, T, C, V);
  EXPECT_TRUE(bit_equal(losses, losses_ref));
  EXPECT_TRUE(bit_equal(dh, dh_ref));
  EXPECT_LT(rel_error(dw, dw_ref), 1e-6);
  EXPECT_NEAR(total, total_ref, 1e-9 * std::abs(total_ref));

  Vec losses_fwd(static_cast<size_t>(T), std::numeric_limits<float>::quiet_NaN());
  const double total_fwd =
      cpu::linear_cross_entropy_forward(losses_fwd.data(), h.data(), w.data(), targets.data(), T, C, V);
  EXPECT_TRUE(bit_equal(losses_fwd, losses_ref));
  EXPECT_EQ(total_fwd, total);
  for (int64_t t = 0; t < T; ++t) {
    if (targets[size_t(t)] < 0) {
      EXPECT_EQ(losses[size_t(t)], 0.0f);
    }
  }
}

// d(scale * sum losses)/d(hidden, weight) against central differences of the forward (double sum).
TEST(CpuKernelLinearCrossEntropy, GradientsMatchFiniteDifferences) {
  std::mt19937 rng(52);
  const int64_t T = 5, C = 8, V = 11;
  const float scale = 0.37f;
  Vec h = randn(size_t(T * C), rng), w = randn(size_t(V * C), rng, 0.7f);
  const auto targets = make_targets(T, V, rng);  // t = 3 is masked
  ASSERT_LT(targets[3], 0);

  Vec losses(static_cast<size_t>(T)), dh(size_t(T * C)), dw(size_t(V * C), 0.0f);
  cpu::linear_cross_entropy_forward_backward(losses.data(), dh.data(), dw.data(), h.data(), w.data(), targets.data(),
                                             scale, T, C, V);
  auto loss = [&]() {
    Vec l(static_cast<size_t>(T));
    return double(scale) * cpu::linear_cross_entropy_forward(l.data(), h.data(), w.data(), targets.data(), T, C, V);
  };
  auto check = [&](Vec& x, const Vec& grad, const char* what) {
    for (size_t i = 0; i < x.size(); ++i) {
      const float x0 = x[i];
      const float eps = 1e-2f;
      x[i] = x0 + eps;
      const double lp = loss();
      const double dp = double(x[i]) - x0;
      x[i] = x0 - eps;
      const double lm = loss();
      const double dm = x0 - double(x[i]);
      x[i] = x0;
      const double fd = (lp - lm) / (dp + dm);
      EXPECT_NEAR(grad[i], fd, 1e-4 + 2e-3 * std::abs(fd)) << what << "[" << i << "]";
    }
  };
  check(h, dh, "dhidden");
  check(w, dw, "dweight");
  for (int64_t k = 0; k < C; ++k) EXPECT_EQ(dh[size_t(3 * C + k)], 0.0f);  // masked row
}

// dweight accumulates (+=) and dhidden is assigned (garbage on entry is overwritten); either may be null.
TEST(CpuKernelLinearCrossEntropy, AccumulatesDweightAssignsDhidden) {
  std::mt19937 rng(53);
  const int64_t T = 300, C = 12, V = 40;
  const float scale = 0.01f;
  const Vec h = randn(size_t(T * C), rng), w = randn(size_t(V * C), rng), dw0 = randn(size_t(V * C), rng);
  const auto targets = make_targets(T, V, rng);

  Vec losses(static_cast<size_t>(T)), dh_clean(size_t(T * C), 0.0f), dw_from_zero(size_t(V * C), 0.0f);
  cpu::linear_cross_entropy_forward_backward(losses.data(), dh_clean.data(), dw_from_zero.data(), h.data(), w.data(),
                                             targets.data(), scale, T, C, V);
  Vec dh(size_t(T * C), std::numeric_limits<float>::quiet_NaN()), dw = dw0;
  cpu::linear_cross_entropy_forward_backward(losses.data(), dh.data(), dw.data(), h.data(), w.data(), targets.data(),
                                             scale, T, C, V);
  EXPECT_TRUE(bit_equal(dh, dh_clean));
  Vec expected(dw0.size());
  for (size_t i = 0; i < dw0.size(); ++i) expected[i] = dw0[i] + dw_from_zero[i];
  EXPECT_LT(rel_error(dw, expected), 1e-6);

  Vec dh2(size_t(T * C), std::numeric_limits<float>::quiet_NaN()), dw2 = dw0;
  cpu::linear_cross_entropy_forward_backward(losses.data(), nullptr, dw2.data(), h.data(), w.data(), targets.data(),
                                             scale, T, C, V);
  EXPECT_TRUE(bit_equal(dw2, dw));
  cpu::linear_cross_entropy_forward_backward(losses.data(), dh2.data(), nullptr, h.data(), w.data(), targets.data(),
                                             scale, T, C, V);
  EXPECT_TRUE(bit_equal(dh2, dh_clean));
}

TEST(CpuKernelLinearCrossEntropy, TargetBeyondVocabularyThrows) {
  std::mt19937 rng(54);
  const int64_t T = 3, C = 4, V = 6;
  const Vec h = randn(size_t(T * C), rng), w = randn(size_t(V * C), rng);
  const std::vector<int32_t> targets = {1, int32_t(V), 2};
  Vec losses(static_cast<size_t>(T));
  EXPECT_THROW(cpu::linear_cross_entropy_forward(losses.data(), h.data(), w.data(), targets.data(), T, C, V),
               longtune::Error);
}
