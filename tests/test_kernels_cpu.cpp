// Tests of the CPU reference kernels (kernels/cpu): every backward is checked against central
// finite differences of its forward, plus the conventions (parameter gradients +=, activation
// gradients =), and the properties the model relies on (segments never mix, GQA, ...).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/attention.hpp"
#include "kernels/cpu/cross_entropy.hpp"
#include "kernels/cpu/embedding.hpp"
#include "kernels/cpu/matmul.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "kernels/cpu/rope.hpp"
#include "kernels/cpu/swiglu.hpp"
#include "src/common/error.hpp"

namespace {

namespace cpu = longtune::cpu;
using Vec = std::vector<float>;

// ---- helpers ---------------------------------------------------------------------------------

Vec randn(size_t n, std::mt19937& rng, float stddev = 1.0f) {
  std::normal_distribution<float> dist(0.0f, stddev);
  Vec x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

Vec uniform(size_t n, std::mt19937& rng, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  Vec x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

Vec garbage(size_t n) { return Vec(n, std::numeric_limits<float>::quiet_NaN()); }

// L = sum(out * R), accumulated in double.
double weighted_sum(const Vec& out, const Vec& R) {
  double acc = 0.0;
  for (size_t i = 0; i < out.size(); ++i) acc += static_cast<double>(out[i]) * R[i];
  return acc;
}

bool bit_equal(const Vec& a, const Vec& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Central differences of loss() with respect to x[i] for i in idx (x is perturbed in place and
// restored), compared with analytic[i]: returns ||fd - analytic|| / ||analytic||.
// The step actually taken is (x + eps) - (x - eps) after fp32 rounding.
double fd_rel_error(Vec& x, const Vec& analytic, const std::function<double()>& loss, float eps,
                    const std::vector<size_t>& idx, const char* name) {
  double err2 = 0.0, ref2 = 0.0;
  for (size_t i : idx) {
    const float x0 = x[i];
    const float xp = x0 + eps, xm = x0 - eps;
    x[i] = xp;
    const double lp = loss();
    x[i] = xm;
    const double lm = loss();
    x[i] = x0;
    const double fd = (lp - lm) / (static_cast<double>(xp) - static_cast<double>(xm));
    err2 += (fd - analytic[i]) * (fd - analytic[i]);
    ref2 += static_cast<double>(analytic[i]) * analytic[i];
  }
  const double rel = std::sqrt(err2) / std::max(std::sqrt(ref2), 1e-30);
  std::printf("    [fd] %-28s %4zu elements  rel err %.2e\n", name, idx.size(), rel);
  return rel;
}

// All indices of x (every test here is small enough to check each element).
std::vector<size_t> every(const Vec& x) {
  std::vector<size_t> idx(x.size());
  std::iota(idx.begin(), idx.end(), size_t{0});
  return idx;
}

// Finite-difference step and tolerance on the relative norm error ||fd - analytic|| / ||analytic||.
// Measured errors of the correct kernels are 5e-7..2e-5 (fp32 rounding of the outputs over a
// 2e-2 step, plus the O(eps^2) truncation of the nonlinear ops); every broken backward we
// tried gave 3e-2 or more (see the report of the kernel work).
constexpr float kEps = 1e-2f;
constexpr double kTol = 3e-4;

// ---- embedding --------------------------------------------------------------------------------

TEST(CpuKernelEmbedding, ForwardCopiesRows) {
  std::mt19937 rng(1);
  const int64_t V = 5, C = 3, T = 4;
  const Vec wte = randn(V * C, rng);
  const std::vector<int32_t> tokens = {4, 0, 4, 2};
  Vec out = garbage(T * C);
  cpu::embedding_forward(out.data(), tokens.data(), wte.data(), T, C);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) EXPECT_EQ(out[t * C + c], wte[tokens[t] * C + c]);
}

TEST(CpuKernelEmbedding, GradientMatchesFiniteDifferences) {
  std::mt19937 rng(2);
  const int64_t V = 7, C = 6, T = 12;
  std::vector<int32_t> tokens = {3, 1, 3, 6, 0, 3, 1, 5, 5, 2, 3, 0};  // repeats; token 4 unused
  Vec wte = randn(V * C, rng);
  const Vec R = randn(T * C, rng);
  Vec out(T * C);
  auto loss = [&] {
    cpu::embedding_forward(out.data(), tokens.data(), wte.data(), T, C);
    return weighted_sum(out, R);
  };
  Vec dwte(V * C, 0.0f);
  cpu::embedding_backward(dwte.data(), R.data(), tokens.data(), T, C);
  EXPECT_LT(fd_rel_error(wte, dwte, loss, kEps, every(wte), "embedding dwte"), kTol);
  for (int64_t c = 0; c < C; ++c) EXPECT_EQ(dwte[4 * C + c], 0.0f);  // unused row untouched
}

TEST(CpuKernelEmbedding, BackwardAccumulates) {
  std::mt19937 rng(3);
  const int64_t C = 5, T = 9;
  const std::vector<int32_t> tokens = {2, 0, 2, 1, 2, 3, 0, 1, 2};
  const Vec dout = randn(T * C, rng);
  Vec once(4 * C, 0.0f);
  cpu::embedding_backward(once.data(), dout.data(), tokens.data(), T, C);
  Vec twice(4 * C, 0.0f);
  cpu::embedding_backward(twice.data(), dout.data(), tokens.data(), T, C);
  cpu::embedding_backward(twice.data(), dout.data(), tokens.data(), T, C);
  for (size_t i = 0; i < once.size(); ++i) EXPECT_EQ(twice[i], 2.0f * once[i]);
  const Vec base = randn(4 * C, rng);
  Vec acc = base;
  cpu::embedding_backward(acc.data(), dout.data(), tokens.data(), T, C);
  for (size_t i = 0; i < acc.size(); ++i) EXPECT_EQ(acc[i], base[i] + once[i]);
}

// ---- matmul -----------------------------------------------------------------------------------

TEST(CpuKernelMatmul, ForwardSpotValue) {
  // inp (2, 3), weight (2, 3): out = inp @ weight^T
  const Vec inp = {1, 2, 3, 4, 5, 6};
  const Vec w = {1, 0, -1, 0.5f, 0.25f, 2};
  Vec out(4);
  cpu::matmul_forward(out.data(), inp.data(), w.data(), 2, 3, 2);
  EXPECT_EQ(out[0], 1 - 3);
  EXPECT_EQ(out[1], 0.5f + 0.5f + 6);
  EXPECT_EQ(out[2], 4 - 6);
  EXPECT_EQ(out[3], 2 + 1.25f + 12);
}

TEST(CpuKernelMatmul, GradientMatchesFiniteDifferences) {
  std::mt19937 rng(4);
  const int64_t T = 7, C = 9, OC = 5;
  Vec inp = randn(T * C, rng), w = randn(OC * C, rng, 0.5f);
  const Vec R = randn(T * OC, rng);
  Vec out(T * OC);
  auto loss = [&] {
    cpu::matmul_forward(out.data(), inp.data(), w.data(), T, C, OC);
    return weighted_sum(out, R);
  };
  Vec dinp = garbage(T * C), dw(OC * C, 0.0f);
  cpu::matmul_backward(dinp.data(), dw.data(), R.data(), inp.data(), w.data(), T, C, OC);
  EXPECT_LT(fd_rel_error(inp, dinp, loss, kEps, every(inp), "matmul dinp"), kTol);
  EXPECT_LT(fd_rel_error(w, dw, loss, kEps, every(w), "matmul dweight"), kTol);
}

TEST(CpuKernelMatmul, GradientSemantics) {
  std::mt19937 rng(5);
  const int64_t T = 6, C = 4, OC = 3;
  const Vec inp = randn(T * C, rng), w = randn(OC * C, rng), dout = randn(T * OC, rng);
  Vec dinp0(T * C, 0.0f), dw_once(OC * C, 0.0f);
  cpu::matmul_backward(dinp0.data(), dw_once.data(), dout.data(), inp.data(), w.data(), T, C, OC);
  // dinp assigned: garbage on entry does not matter
  Vec dinp = garbage(T * C), dw_twice(OC * C, 0.0f);
  cpu::matmul_backward(dinp.data(), dw_twice.data(), dout.data(), inp.data(), w.data(), T, C, OC);
  EXPECT_TRUE(bit_equal(dinp, dinp0));
  // dweight +=: a second call doubles it
  cpu::matmul_backward(dinp.data(), dw_twice.data(), dout.data(), inp.data(), w.data(), T, C, OC);
  for (size_t i = 0; i < dw_once.size(); ++i) EXPECT_EQ(dw_twice[i], 2.0f * dw_once[i]);
  // dinp == nullptr: only dweight
  Vec dw_null(OC * C, 0.0f);
  cpu::matmul_backward(nullptr, dw_null.data(), dout.data(), inp.data(), w.data(), T, C, OC);
  EXPECT_TRUE(bit_equal(dw_null, dw_once));
}

// ---- rmsnorm ----------------------------------------------------------------------------------

TEST(CpuKernelRmsnorm, ForwardSpotValue) {
  // A constant row a: mean(x^2) = a^2, out = w * a / sqrt(a^2 + eps).
  const int64_t T = 2, C = 4;
  const float eps = 1e-5f;
  const Vec inp = {3, 3, 3, 3, -1, 1, -1, 1};
  const Vec w = {1, 2, 0.5f, -1};
  Vec out(T * C), rstd(T);
  cpu::rmsnorm_forward(out.data(), rstd.data(), inp.data(), w.data(), T, C, eps);
  const double r0 = 1.0 / std::sqrt(9.0 + eps), r1 = 1.0 / std::sqrt(1.0 + eps);
  EXPECT_FLOAT_EQ(rstd[0], static_cast<float>(r0));
  EXPECT_FLOAT_EQ(rstd[1], static_cast<float>(r1));
  for (int64_t c = 0; c < C; ++c) {
    EXPECT_FLOAT_EQ(out[c], static_cast<float>(w[c] * 3 * r0));
    EXPECT_FLOAT_EQ(out[C + c], static_cast<float>(w[c] * inp[C + c] * r1));
  }
}

TEST(CpuKernelRmsnorm, GradientMatchesFiniteDifferences) {
  std::mt19937 rng(6);
  const int64_t T = 5, C = 16;
  const float eps = 1e-5f;
  // rms of 3, not 1: rstd ~ 1/3, so a wrong power of rstd cannot hide
  Vec inp = randn(T * C, rng, 3.0f), w = uniform(C, rng, 0.5f, 1.5f);
  const Vec R = randn(T * C, rng);
  Vec out(T * C), rstd(T);
  auto loss = [&] {
    cpu::rmsnorm_forward(out.data(), rstd.data(), inp.data(), w.data(), T, C, eps);
    return weighted_sum(out, R);
  };
  loss();  // rstd for the unperturbed input
  const Vec rstd0 = rstd;
  Vec dinp = garbage(T * C), dw(C, 0.0f);
  cpu::rmsnorm_backward(dinp.data(), dw.data(), R.data(), inp.data(), w.data(), rstd0.data(), T, C);
  EXPECT_LT(fd_rel_error(inp, dinp, loss, kEps, every(inp), "rmsnorm dinp"), kTol);
  EXPECT_LT(fd_rel_error(w, dw, loss, kEps, every(w), "rmsnorm dweight"), kTol);
}

TEST(CpuKernelRmsnorm, GradientSemantics) {
  std::mt19937 rng(7);
  const int64_t T = 3, C = 8;
  const Vec inp = randn(T * C, rng), w = randn(C, rng), dout = randn(T * C, rng);
  Vec out(T * C), rstd(T);
  cpu::rmsnorm_forward(out.data(), rstd.data(), inp.data(), w.data(), T, C, 1e-6f);
  Vec dinp0(T * C, 0.0f), dw_once(C, 0.0f);
  cpu::rmsnorm_backward(dinp0.data(), dw_once.data(), dout.data(), inp.data(), w.data(), rstd.data(), T, C);
  Vec dinp = garbage(T * C), dw_twice(C, 0.0f);
  cpu::rmsnorm_backward(dinp.data(), dw_twice.data(), dout.data(), inp.data(), w.data(), rstd.data(), T, C);
  cpu::rmsnorm_backward(dinp.data(), dw_twice.data(), dout.data(), inp.data(), w.data(), rstd.data(), T, C);
  EXPECT_TRUE(bit_equal(dinp, dinp0));
  for (int64_t c = 0; c < C; ++c) EXPECT_EQ(dw_twice[c], 2.0f * dw_once[c]);
}

// ---- rope -------------------------------------------------------------------------------------

std::vector<float> llama_inv_freq(int64_t HD, double theta = 10000.0) {
  std::vector<float> f(HD / 2);
  for (int64_t i = 0; i < HD / 2; ++i)
    f[i] = static_cast<float>(1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(HD)));
  return f;
}

TEST(CpuKernelRope, SpotValueRotateHalfLayout) {
  // HD = 4: pairs (x0, x2) at frequency 1 and (x1, x3) at frequency 0.5; position 3.
  const Vec inv_freq = {1.0f, 0.5f};
  const std::vector<int32_t> pos = {3};
  const Vec x = {1.0f, 2.0f, 3.0f, 4.0f};
  Vec out(4);
  cpu::rope_forward(out.data(), x.data(), pos.data(), inv_freq.data(), 1, 1, 4);
  const double a0 = 3.0, a1 = 1.5;
  EXPECT_FLOAT_EQ(out[0], static_cast<float>(1 * std::cos(a0) - 3 * std::sin(a0)));
  EXPECT_FLOAT_EQ(out[2], static_cast<float>(3 * std::cos(a0) + 1 * std::sin(a0)));
  EXPECT_FLOAT_EQ(out[1], static_cast<float>(2 * std::cos(a1) - 4 * std::sin(a1)));
  EXPECT_FLOAT_EQ(out[3], static_cast<float>(4 * std::cos(a1) + 2 * std::sin(a1)));
}

TEST(CpuKernelRope, AngleIsFormedInFp32) {
  // At a large position the fp32 product differs from the exact one; the kernel must use the
  // fp32 product (as transformers does), then cos/sin in double.
  const Vec inv_freq = {0.1f};
  const std::vector<int32_t> pos = {123457};
  const Vec x = {1.0f, 0.0f};
  Vec out(2);
  cpu::rope_forward(out.data(), x.data(), pos.data(), inv_freq.data(), 1, 1, 2);
  const float angle32 = static_cast<float>(pos[0]) * inv_freq[0];
  const double angle64 = static_cast<double>(pos[0]) * static_cast<double>(inv_freq[0]);
  ASSERT_NE(static_cast<double>(angle32), angle64);
  EXPECT_EQ(out[0], static_cast<float>(std::cos(static_cast<double>(angle32))));
  EXPECT_EQ(out[1], static_cast<float>(std::sin(static_cast<double>(angle32))));
}

TEST(CpuKernelRope, GradientMatchesFiniteDifferences) {
  std::mt19937 rng(8);
  const int64_t T = 6, NH = 3, HD = 8;
  const std::vector<int32_t> pos = {0, 1, 2, 0, 1, 7};
  const Vec inv_freq = llama_inv_freq(HD, 10.0);  // small theta: every pair rotates noticeably
  Vec inp = randn(T * NH * HD, rng);
  const Vec R = randn(T * NH * HD, rng);
  Vec out(T * NH * HD);
  auto loss = [&] {
    cpu::rope_forward(out.data(), inp.data(), pos.data(), inv_freq.data(), T, NH, HD);
    return weighted_sum(out, R);
  };
  Vec dinp = garbage(T * NH * HD);
  cpu::rope_backward(dinp.data(), R.data(), pos.data(), inv_freq.data(), T, NH, HD);
  EXPECT_LT(fd_rel_error(inp, dinp, loss, kEps, every(inp), "rope dinp"), kTol);
}

TEST(CpuKernelRope, ForwardThenBackwardIsIdentityAndInPlaceIsSafe) {
  std::mt19937 rng(9);
  const int64_t T = 5, NH = 2, HD = 16;
  const std::vector<int32_t> pos = {0, 5, 17, 300, 4095};
  const Vec inv_freq = llama_inv_freq(HD);
  const Vec x = randn(T * NH * HD, rng);
  Vec y(T * NH * HD), back = garbage(T * NH * HD);
  cpu::rope_forward(y.data(), x.data(), pos.data(), inv_freq.data(), T, NH, HD);
  cpu::rope_backward(back.data(), y.data(), pos.data(), inv_freq.data(), T, NH, HD);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(back[i], x[i], 1e-6f * (1.0f + std::fabs(x[i])));
  // in place, forward and backward, bit-for-bit equal to out of place
  Vec inplace = x;
  cpu::rope_forward(inplace.data(), inplace.data(), pos.data(), inv_freq.data(), T, NH, HD);
  EXPECT_TRUE(bit_equal(inplace, y));
  cpu::rope_backward(inplace.data(), inplace.data(), pos.data(), inv_freq.data(), T, NH, HD);
  EXPECT_TRUE(bit_equal(inplace, back));
}

TEST(CpuKernelRope, PositionZeroIsIdentityAndPositionsRestartPerSegment) {
  std::mt19937 rng(10);
  const int64_t NH = 2, HD = 8, T = 9;
  const Vec inv_freq = llama_inv_freq(HD);
  // packed stream of segments of lengths 4, 1, 4, positions restarting at 0
  const std::vector<int32_t> cu = {0, 4, 5, 9};
  const std::vector<int32_t> pos = {0, 1, 2, 3, 0, 0, 1, 2, 3};
  Vec x = randn(T * NH * HD, rng);
  // segment 3 carries the same tokens as segment 1: identical outputs expected
  std::copy(x.begin(), x.begin() + 4 * NH * HD, x.begin() + 5 * NH * HD);
  Vec y(T * NH * HD);
  cpu::rope_forward(y.data(), x.data(), pos.data(), inv_freq.data(), T, NH, HD);
  const int64_t row = NH * HD;
  for (int64_t i = 0; i < 4 * row; ++i) EXPECT_EQ(y[5 * row + i], y[i]);
  // position 0 leaves the vector unchanged, exactly
  for (int64_t t : {0, 4, 5})
    for (int64_t i = 0; i < row; ++i) EXPECT_EQ(y[t * row + i], x[t * row + i]);
  // each segment on its own (positions from 0) equals its part of the packed call
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    const int64_t t0 = cu[s], len = cu[s + 1] - cu[s];
    Vec ys(len * row);
    cpu::rope_forward(ys.data(), x.data() + t0 * row, pos.data() + t0, inv_freq.data(), len, NH, HD);
    EXPECT_TRUE(bit_equal(ys, Vec(y.begin() + t0 * row, y.begin() + (t0 + len) * row)));
  }
}

// ---- swiglu -----------------------------------------------------------------------------------

TEST(CpuKernelSwiglu, ForwardSpotValues) {
  const Vec gate = {0.0f, 1.0f, -2.0f, 30.0f, -100.0f};
  const Vec up = {5.0f, 2.0f, 3.0f, 0.5f, 7.0f};
  Vec out(5);
  cpu::swiglu_forward(out.data(), gate.data(), up.data(), 1, 5);
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_FLOAT_EQ(out[1], static_cast<float>(2.0 / (1.0 + std::exp(-1.0))));
  EXPECT_FLOAT_EQ(out[2], static_cast<float>(3.0 * -2.0 / (1.0 + std::exp(2.0))));
  EXPECT_FLOAT_EQ(out[3], 15.0f);  // silu(x) -> x
  EXPECT_NEAR(out[4], 0.0f, 1e-30f);  // silu(x) -> 0, no NaN
}

TEST(CpuKernelSwiglu, GradientMatchesFiniteDifferences) {
  std::mt19937 rng(11);
  const int64_t T = 6, F = 10;
  Vec gate = randn(T * F, rng, 2.0f), up = randn(T * F, rng);
  const Vec R = randn(T * F, rng);
  Vec out(T * F);
  auto loss = [&] {
    cpu::swiglu_forward(out.data(), gate.data(), up.data(), T, F);
    return weighted_sum(out, R);
  };
  Vec dgate = garbage(T * F), dup = garbage(T * F);
  cpu::swiglu_backward(dgate.data(), dup.data(), R.data(), gate.data(), up.data(), T, F);
  EXPECT_LT(fd_rel_error(gate, dgate, loss, kEps, every(gate), "swiglu dgate"), kTol);
  EXPECT_LT(fd_rel_error(up, dup, loss, kEps, every(up), "swiglu dup"), kTol);
}

// ---- cross-entropy ----------------------------------------------------------------------------

TEST(CpuKernelCrossEntropy, UniformLogitsGiveLogV) {
  const int64_t T = 3, V = 50;
  const Vec logits(T * V, 0.7f);
  const std::vector<int32_t> targets = {0, 49, 17};
  Vec losses(T);
  const double total = cpu::cross_entropy_forward(losses.data(), logits.data(), targets.data(), T, V);
  for (int64_t t = 0; t < T; ++t) EXPECT_FLOAT_EQ(losses[t], static_cast<float>(std::log(50.0)));
  EXPECT_NEAR(total, 3.0 * std::log(50.0), 1e-12);
}

TEST(CpuKernelCrossEntropy, IgnoredTargetsAndStability) {
  std::mt19937 rng(12);
  const int64_t T = 5, V = 4;
  Vec logits = randn(T * V, rng);
  // row 3: huge logits, computed stably
  const float row3[4] = {1000.0f, 0.0f, -1000.0f, 999.0f};
  std::copy(row3, row3 + 4, logits.begin() + 3 * V);
  const std::vector<int32_t> targets = {2, -1, 0, 3, -100};
  Vec losses = garbage(T);
  const double total = cpu::cross_entropy_forward(losses.data(), logits.data(), targets.data(), T, V);
  EXPECT_EQ(losses[1], 0.0f);
  EXPECT_EQ(losses[4], 0.0f);
  EXPECT_FLOAT_EQ(losses[3], static_cast<float>(std::log1p(std::exp(1.0))));
  double sum = 0.0;
  for (float l : losses) sum += l;
  EXPECT_NEAR(total, sum, 1e-5);
  Vec d = garbage(T * V);
  cpu::cross_entropy_backward(d.data(), logits.data(), targets.data(), 0.5f, T, V);
  for (int64_t v = 0; v < V; ++v) {
    EXPECT_EQ(d[1 * V + v], 0.0f);
    EXPECT_EQ(d[4 * V + v], 0.0f);
  }
  for (float g : d) EXPECT_TRUE(std::isfinite(g));
  // every counted row of the gradient sums to 0 (softmax minus one-hot)
  for (int64_t t : {0, 2, 3}) {
    double s = 0.0;
    for (int64_t v = 0; v < V; ++v) s += d[t * V + v];
    EXPECT_NEAR(s, 0.0, 1e-6);
  }
  const std::vector<int32_t> bad = {0, 4, 0, 0, 0};
  EXPECT_THROW(cpu::cross_entropy_forward(losses.data(), logits.data(), bad.data(), T, V), longtune::InternalError);
}

TEST(CpuKernelCrossEntropy, GradientMatchesFiniteDifferencesAndInPlace) {
  std::mt19937 rng(13);
  const int64_t T = 6, V = 11;
  Vec logits = randn(T * V, rng, 2.0f);
  const std::vector<int32_t> targets = {3, -1, 0, 10, 7, 3};
  const float scale = 0.37f;
  Vec losses(T);
  auto loss = [&] {
    return static_cast<double>(scale) *
           cpu::cross_entropy_forward(losses.data(), logits.data(), targets.data(), T, V);
  };
  Vec d = garbage(T * V);
  cpu::cross_entropy_backward(d.data(), logits.data(), targets.data(), scale, T, V);
  EXPECT_LT(fd_rel_error(logits, d, loss, kEps, every(logits), "cross_entropy dlogits"), kTol);
  Vec inplace = logits;
  cpu::cross_entropy_backward(inplace.data(), inplace.data(), targets.data(), scale, T, V);
  EXPECT_TRUE(bit_equal(inplace, d));
}

// ---- attention --------------------------------------------------------------------------------

struct AttnShape {
  std::vector<int32_t> cu;  // cu_seqlens
  int64_t NH, NKV, HD;
  int64_t T() const { return cu.back(); }
  int64_t segments() const { return static_cast<int64_t>(cu.size()) - 1; }
};

// Odd segment lengths 1, 3, 1, 5, 1, 2.
const std::vector<int32_t> kOddSegments = {0, 1, 4, 5, 10, 11, 13};

struct AttnData {
  AttnShape s;
  Vec q, k, v, out, lse;
  AttnData(AttnShape shape, std::mt19937& rng) : s(std::move(shape)) {
    q = randn(s.T() * s.NH * s.HD, rng);
    k = randn(s.T() * s.NKV * s.HD, rng);
    v = randn(s.T() * s.NKV * s.HD, rng);
    out.resize(s.T() * s.NH * s.HD);
    lse.resize(s.T() * s.NH);
  }
  void forward() {
    cpu::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), s.cu.data(), s.segments(), s.T(),
                           s.NH, s.NKV, s.HD);
  }
  void backward(Vec& dq, Vec& dk, Vec& dv, const Vec& dout) const {
    cpu::attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(), out.data(),
                            lse.data(), s.cu.data(), s.segments(), s.T(), s.NH, s.NKV, s.HD);
  }
};

// Independent dense reference: full T x T scores with a mask "same segment and j <= i".
void naive_attention(Vec& out, Vec& lse, const AttnData& a) {
  const int64_t T = a.s.T(), NH = a.s.NH, NKV = a.s.NKV, HD = a.s.HD;
  std::vector<int> seg(T);
  for (int64_t s = 0; s < a.s.segments(); ++s)
    for (int64_t i = a.s.cu[s]; i < a.s.cu[s + 1]; ++i) seg[i] = static_cast<int>(s);
  out.assign(T * NH * HD, 0.0f);
  lse.assign(T * NH, 0.0f);
  for (int64_t h = 0; h < NH; ++h) {
    const int64_t g = h * NKV / NH;
    for (int64_t i = 0; i < T; ++i) {
      std::vector<double> w(T, 0.0);
      double total = 0.0;
      for (int64_t j = 0; j < T; ++j) {
        if (seg[j] != seg[i] || j > i) continue;
        double sc = 0.0;
        for (int64_t d = 0; d < HD; ++d) sc += static_cast<double>(a.q[(i * NH + h) * HD + d]) * a.k[(j * NKV + g) * HD + d];
        w[j] = std::exp(sc / std::sqrt(static_cast<double>(HD)));
        total += w[j];
      }
      lse[i * NH + h] = static_cast<float>(std::log(total));
      for (int64_t d = 0; d < HD; ++d) {
        double o = 0.0;
        for (int64_t j = 0; j < T; ++j) o += w[j] / total * a.v[(j * NKV + g) * HD + d];
        out[(i * NH + h) * HD + d] = static_cast<float>(o);
      }
    }
  }
}

double max_rel_diff(const Vec& a, const Vec& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return num / std::max(den, 1e-30);
}

TEST(CpuKernelAttention, ForwardMatchesDenseMaskedReference) {
  std::mt19937 rng(14);
  for (auto [NH, NKV] : {std::pair<int64_t, int64_t>{4, 2}, {3, 1}, {2, 2}}) {
    AttnData a({kOddSegments, NH, NKV, 8}, rng);
    a.forward();
    Vec out_ref, lse_ref;
    naive_attention(out_ref, lse_ref, a);
    EXPECT_LT(max_rel_diff(a.out, out_ref), 1e-6) << "NH=" << NH << " NKV=" << NKV;
    EXPECT_LT(max_rel_diff(a.lse, lse_ref), 1e-6) << "NH=" << NH << " NKV=" << NKV;
  }
}

TEST(CpuKernelAttention, GradientMatchesFiniteDifferences) {
  std::mt19937 rng(15);
  for (auto [NH, NKV] : {std::pair<int64_t, int64_t>{4, 2}, {3, 1}, {2, 2}}) {
    SCOPED_TRACE("NH=" + std::to_string(NH) + " NKV=" + std::to_string(NKV));
    AttnData a({kOddSegments, NH, NKV, 8}, rng);
    const Vec R = randn(a.out.size(), rng);
    auto loss = [&] {
      a.forward();
      return weighted_sum(a.out, R);
    };
    loss();
    Vec dq = garbage(a.q.size()), dk = garbage(a.k.size()), dv = garbage(a.v.size());
    a.backward(dq, dk, dv, R);
    EXPECT_LT(fd_rel_error(a.q, dq, loss, kEps, every(a.q), "attention dq"), kTol);
    EXPECT_LT(fd_rel_error(a.k, dk, loss, kEps, every(a.k), "attention dk"), kTol);
    EXPECT_LT(fd_rel_error(a.v, dv, loss, kEps, every(a.v), "attention dv"), kTol);
  }
}

TEST(CpuKernelAttention, BackwardAssignsGradients) {
  std::mt19937 rng(16);
  AttnData a({kOddSegments, 4, 2, 8}, rng);
  a.forward();
  const Vec dout = randn(a.out.size(), rng);
  Vec dq0(a.q.size(), 0.0f), dk0(a.k.size(), 0.0f), dv0(a.v.size(), 0.0f);
  a.backward(dq0, dk0, dv0, dout);
  Vec dq = garbage(a.q.size()), dk = garbage(a.k.size()), dv = garbage(a.v.size());
  a.backward(dq, dk, dv, dout);
  EXPECT_TRUE(bit_equal(dq, dq0));
  EXPECT_TRUE(bit_equal(dk, dk0));
  EXPECT_TRUE(bit_equal(dv, dv0));
  Vec big(a.q.size(), 1e30f), bigk(a.k.size(), 1e30f), bigv(a.v.size(), 1e30f);
  a.backward(big, bigk, bigv, dout);
  EXPECT_TRUE(bit_equal(big, dq0));
  EXPECT_TRUE(bit_equal(bigk, dk0));
  EXPECT_TRUE(bit_equal(bigv, dv0));
}

TEST(CpuKernelAttention, SegmentsNeverMix) {
  std::mt19937 rng(17);
  AttnData a({kOddSegments, 4, 2, 8}, rng);
  a.forward();
  Vec dout = randn(a.out.size(), rng);
  Vec dq(a.q.size()), dk(a.k.size()), dv(a.v.size());
  a.backward(dq, dk, dv, dout);
  const Vec out0 = a.out, lse0 = a.lse, dq0 = dq, dk0 = dk, dv0 = dv;
  // change every input of segment 3 (tokens [5, 10)): q, k, v and dout
  const int64_t A0 = 5, A1 = 10, qrow = 4 * 8, kvrow = 2 * 8;
  for (int64_t i = A0 * qrow; i < A1 * qrow; ++i) {
    a.q[i] += 0.5f;
    dout[i] *= -2.0f;
  }
  for (int64_t i = A0 * kvrow; i < A1 * kvrow; ++i) {
    a.k[i] -= 0.75f;
    a.v[i] *= 3.0f;
  }
  a.forward();
  a.backward(dq, dk, dv, dout);
  // expected_changed: tokens of segment 3 whose value must move (dq of a segment's first token
  // is exactly 0 whatever its inputs: it attends to itself only).
  auto check = [&](const Vec& now, const Vec& before, int64_t row, const char* what, int64_t expected_changed) {
    int64_t changed_inside = 0;
    for (int64_t t = 0; t < a.s.T(); ++t) {
      const bool same = std::memcmp(now.data() + t * row, before.data() + t * row, row * sizeof(float)) == 0;
      if (t >= A0 && t < A1)
        changed_inside += same ? 0 : 1;
      else
        EXPECT_TRUE(same) << what << " of token " << t << " changed";
    }
    EXPECT_EQ(changed_inside, expected_changed) << what;  // the perturbation did reach segment 3
  };
  check(a.out, out0, qrow, "out", A1 - A0);
  check(a.lse, lse0, 4, "lse", A1 - A0);
  check(dq, dq0, qrow, "dq", A1 - A0 - 1);
  check(dk, dk0, kvrow, "dk", A1 - A0);
  check(dv, dv0, kvrow, "dv", A1 - A0);
}

TEST(CpuKernelAttention, PackedEqualsEachSegmentAlone) {
  std::mt19937 rng(18);
  AttnData a({kOddSegments, 4, 2, 8}, rng);
  a.forward();
  const Vec dout = randn(a.out.size(), rng);
  Vec dq(a.q.size()), dk(a.k.size()), dv(a.v.size());
  a.backward(dq, dk, dv, dout);
  const int64_t qrow = 4 * 8, kvrow = 2 * 8;
  for (int64_t s = 0; s < a.s.segments(); ++s) {
    const int64_t t0 = a.s.cu[s], t1 = a.s.cu[s + 1], len = t1 - t0;
    const std::vector<int32_t> cu1 = {0, static_cast<int32_t>(len)};
    Vec out(len * qrow), lse(len * 4), sdq(len * qrow), sdk(len * kvrow), sdv(len * kvrow);
    cpu::attention_forward(out.data(), lse.data(), a.q.data() + t0 * qrow, a.k.data() + t0 * kvrow,
                           a.v.data() + t0 * kvrow, cu1.data(), 1, len, 4, 2, 8);
    cpu::attention_backward(sdq.data(), sdk.data(), sdv.data(), dout.data() + t0 * qrow, a.q.data() + t0 * qrow,
                            a.k.data() + t0 * kvrow, a.v.data() + t0 * kvrow, out.data(), lse.data(), cu1.data(), 1,
                            len, 4, 2, 8);
    EXPECT_TRUE(bit_equal(out, Vec(a.out.begin() + t0 * qrow, a.out.begin() + t1 * qrow))) << "segment " << s;
    EXPECT_TRUE(bit_equal(lse, Vec(a.lse.begin() + t0 * 4, a.lse.begin() + t1 * 4))) << "segment " << s;
    EXPECT_TRUE(bit_equal(sdq, Vec(dq.begin() + t0 * qrow, dq.begin() + t1 * qrow))) << "segment " << s;
    EXPECT_TRUE(bit_equal(sdk, Vec(dk.begin() + t0 * kvrow, dk.begin() + t1 * kvrow))) << "segment " << s;
    EXPECT_TRUE(bit_equal(sdv, Vec(dv.begin() + t0 * kvrow, dv.begin() + t1 * kvrow))) << "segment " << s;
  }
}

TEST(CpuKernelAttention, FirstTokenOfEverySegmentSeesOnlyItself) {
  // Includes the length-1 segments: out = v of the token, lse = its own score, dq = 0.
  std::mt19937 rng(19);
  AttnData a({kOddSegments, 4, 2, 8}, rng);
  a.forward();
  const Vec dout = randn(a.out.size(), rng);
  Vec dq(a.q.size()), dk(a.k.size()), dv(a.v.size());
  a.backward(dq, dk, dv, dout);
  for (int64_t s = 0; s < a.s.segments(); ++s) {
    const int64_t i = a.s.cu[s];
    for (int64_t h = 0; h < 4; ++h) {
      const int64_t g = h / 2;
      double sc = 0.0;
      for (int64_t d = 0; d < 8; ++d) {
        EXPECT_EQ(a.out[(i * 4 + h) * 8 + d], a.v[(i * 2 + g) * 8 + d]);
        EXPECT_NEAR(dq[(i * 4 + h) * 8 + d], 0.0f, 1e-6f);
        sc += static_cast<double>(a.q[(i * 4 + h) * 8 + d]) * a.k[(i * 2 + g) * 8 + d];
      }
      EXPECT_FLOAT_EQ(a.lse[i * 4 + h], static_cast<float>(sc / std::sqrt(8.0)));
    }
  }
}

TEST(CpuKernelAttention, GqaEqualsMhaWithRepeatedKvHeads) {
  std::mt19937 rng(20);
  const int64_t NH = 6, NKV = 2, HD = 4, group = NH / NKV;
  AttnData gqa({kOddSegments, NH, NKV, HD}, rng);
  AttnData mha({kOddSegments, NH, NH, HD}, rng);
  mha.q = gqa.q;
  const int64_t T = gqa.s.T();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t d = 0; d < HD; ++d) {
        mha.k[(t * NH + h) * HD + d] = gqa.k[(t * NKV + h / group) * HD + d];
        mha.v[(t * NH + h) * HD + d] = gqa.v[(t * NKV + h / group) * HD + d];
      }
  gqa.forward();
  mha.forward();
  EXPECT_TRUE(bit_equal(gqa.out, mha.out));
  EXPECT_TRUE(bit_equal(gqa.lse, mha.lse));
  const Vec dout = randn(gqa.out.size(), rng);
  Vec dq_g(gqa.q.size()), dk_g(gqa.k.size()), dv_g(gqa.v.size());
  Vec dq_m(mha.q.size()), dk_m(mha.k.size()), dv_m(mha.v.size());
  gqa.backward(dq_g, dk_g, dv_g, dout);
  mha.backward(dq_m, dk_m, dv_m, dout);
  EXPECT_TRUE(bit_equal(dq_g, dq_m));
  // the kv gradient of a shared head is the sum over the query heads of its group
  Vec dk_sum(dk_g.size(), 0.0f), dv_sum(dv_g.size(), 0.0f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < NKV; ++g)
      for (int64_t d = 0; d < HD; ++d) {
        double sk = 0.0, sv = 0.0;
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          sk += dk_m[(t * NH + h) * HD + d];
          sv += dv_m[(t * NH + h) * HD + d];
        }
        dk_sum[(t * NKV + g) * HD + d] = static_cast<float>(sk);
        dv_sum[(t * NKV + g) * HD + d] = static_cast<float>(sv);
      }
  EXPECT_LT(max_rel_diff(dk_g, dk_sum), 1e-6);
  EXPECT_LT(max_rel_diff(dv_g, dv_sum), 1e-6);
}

TEST(CpuKernelAttention, ValidatesCuSeqlens) {
  std::mt19937 rng(21);
  AttnData a({{0, 3, 6}, 2, 1, 4}, rng);
  auto run = [&](std::vector<int32_t> cu) {
    cpu::attention_forward(a.out.data(), a.lse.data(), a.q.data(), a.k.data(), a.v.data(), cu.data(),
                           static_cast<int64_t>(cu.size()) - 1, 6, 2, 1, 4);
  };
  EXPECT_NO_THROW(run({0, 3, 6}));
  EXPECT_NO_THROW(run({0, 3, 3, 6}));  // an empty segment is harmless
  EXPECT_THROW(run({1, 3, 6}), longtune::InternalError);
  EXPECT_THROW(run({0, 4, 3, 6}), longtune::InternalError);
  EXPECT_THROW(run({0, 3, 5}), longtune::InternalError);
  EXPECT_THROW(run({0, 3, 7}), longtune::InternalError);
  Vec dq(a.q.size()), dk(a.k.size()), dv(a.v.size());
  const std::vector<int32_t> bad = {0, 4, 3, 6};
  EXPECT_THROW(cpu::attention_backward(dq.data(), dk.data(), dv.data(), a.out.data(), a.q.data(), a.k.data(),
                                       a.v.data(), a.out.data(), a.lse.data(), bad.data(), 3, 6, 2, 1, 4),
               longtune::InternalError);
}

// ---- determinism ------------------------------------------------------------------------------

// Every kernel gives bit-identical results with 1 and with 3 threads.
TEST(CpuKernelDeterminism, ThreadCountDoesNotChangeResults) {
  auto run_all = [](int threads) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::mt19937 rng(22);
    std::vector<Vec> r;
    const int64_t T = 13, C = 24, OC = 10, V = 9;
    const Vec x = randn(T * C, rng), w = randn(OC * C, rng), dy = randn(T * OC, rng);
    Vec out(T * OC), dx(T * C), dw(OC * C, 0.0f);
    cpu::matmul_forward(out.data(), x.data(), w.data(), T, C, OC);
    cpu::matmul_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), T, C, OC);
    r.insert(r.end(), {out, dx, dw});
    const Vec nw = randn(C, rng), dn = randn(T * C, rng);
    Vec nout(T * C), rstd(T), ndx(T * C), ndw(C, 0.0f);
    cpu::rmsnorm_forward(nout.data(), rstd.data(), x.data(), nw.data(), T, C, 1e-5f);
    cpu::rmsnorm_backward(ndx.data(), ndw.data(), dn.data(), x.data(), nw.data(), rstd.data(), T, C);
    r.insert(r.end(), {nout, rstd, ndx, ndw});
    std::vector<int32_t> tokens(T);
    for (int64_t t = 0; t < T; ++t) tokens[t] = static_cast<int32_t>((t * 5) % V);
    Vec wte = randn(V * C, rng), emb(T * C), dwte(V * C, 0.0f);
    cpu::embedding_forward(emb.data(), tokens.data(), wte.data(), T, C);
    cpu::embedding_backward(dwte.data(), dn.data(), tokens.data(), T, C);
    r.insert(r.end(), {emb, dwte});
    std::vector<int32_t> targets(T);
    for (int64_t t = 0; t < T; ++t) targets[t] = t % 4 == 0 ? -1 : static_cast<int32_t>(t % V);
    const Vec logits = randn(T * V, rng);
    Vec losses(T), dlog(T * V);
    const double total = cpu::cross_entropy_forward(losses.data(), logits.data(), targets.data(), T, V);
    cpu::cross_entropy_backward(dlog.data(), logits.data(), targets.data(), 0.1f, T, V);
    r.insert(r.end(), {losses, dlog, Vec{static_cast<float>(total)}});
    Vec sg(T * C), dg(T * C), du(T * C);
    cpu::swiglu_forward(sg.data(), x.data(), dn.data(), T, C);
    cpu::swiglu_backward(dg.data(), du.data(), dn.data(), x.data(), dn.data(), T, C);
    r.insert(r.end(), {sg, dg, du});
    AttnData a({kOddSegments, 4, 2, 6}, rng);
    std::vector<int32_t> pos(T);  // positions restart at 0 in every segment
    for (int64_t s = 0; s < a.s.segments(); ++s)
      for (int32_t t = a.s.cu[s]; t < a.s.cu[s + 1]; ++t) pos[t] = t - a.s.cu[s];
    const Vec inv_freq = llama_inv_freq(6);
    cpu::rope_forward(a.q.data(), a.q.data(), pos.data(), inv_freq.data(), T, 4, 6);
    cpu::rope_forward(a.k.data(), a.k.data(), pos.data(), inv_freq.data(), T, 2, 6);
    a.forward();
    const Vec da = randn(a.out.size(), rng);
    Vec dq(a.q.size()), dk(a.k.size()), dv(a.v.size());
    a.backward(dq, dk, dv, da);
    cpu::rope_backward(dq.data(), dq.data(), pos.data(), inv_freq.data(), T, 4, 6);
    r.insert(r.end(), {a.q, a.k, a.out, a.lse, dq, dk, dv});
    omp_set_num_threads(saved);
    return r;
  };
  const std::vector<Vec> one = run_all(1), three = run_all(3);
  ASSERT_EQ(one.size(), three.size());
  for (size_t i = 0; i < one.size(); ++i) EXPECT_TRUE(bit_equal(one[i], three[i])) << "result " << i;
}

}  // namespace
