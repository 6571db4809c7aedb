// cuBLASLt linear layers against the CPU reference (kernels/cpu/matmul) on fresh random inputs,
// rounded to the storage type first, so only the GPU's accumulation and output rounding differ.
// DISABLED_CudaMatmulBench (--gtest_also_run_disabled_tests) measures TFLOP/s.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/matmul.hpp"
#include "kernels/cuda/linear_cross_entropy.cuh"
#include "kernels/cuda/matmul.cuh"
#include "tests/cuda/gpu_test_util.hpp"

using namespace longtune;
using longtune::test::DeviceBuffer;
using longtune::test::DtypeName;
using longtune::test::fast_random;
using longtune::test::StorageTypes;
using longtune::test::from_device_dtype;
using longtune::test::rel_error;
using longtune::test::round_to_dtype;
using longtune::test::to_device_dtype;

namespace {

using Vec = std::vector<float>;

// Relative tolerance (of the norm) of a storage-type output; fp32 outputs (dweight) get kF32Tol
// from fp32 inputs and kAccTol<S> from rounded 16-bit inputs (exact products, fp32 sums).
template <typename S> constexpr double kTol = 1e-5;
template <> constexpr double kTol<__nv_bfloat16> = 1e-2;
template <> constexpr double kTol<__half> = 3e-3;
template <typename S> constexpr double kAccTol = 1e-5;
template <> constexpr double kAccTol<__nv_bfloat16> = 1e-4;
template <> constexpr double kAccTol<__half> = 1e-4;

template <typename S>
class CudaMatmul : public ::testing::Test {};
TYPED_TEST_SUITE(CudaMatmul, StorageTypes, DtypeName);

struct Shape { int64_t T, C, OC; };
const Shape kShapes[] = {{1, 64, 96},       {7, 64, 1000},       {333, 64, 96},   {7, 2048, 1000},
                         {333, 2048, 1000}, {1, 2048, 32000},    {7, 2048, 32000}, {3, 2048, 128256}};

std::string trace(const Shape& s) {
  return "T=" + std::to_string(s.T) + " C=" + std::to_string(s.C) + " OC=" + std::to_string(s.OC);
}

template <typename S>
DeviceBuffer<S> poisoned(size_t n) {
  return DeviceBuffer<S>(to_device_dtype<S>(Vec(n, NAN)));
}

bool bit_equal(const Vec& a, const Vec& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Inputs of one shape, rounded to S; weight scaled so outputs stay O(1).
template <typename S>
struct Inputs {
  Vec x, w, dout;
  Inputs(const Shape& s, std::mt19937& rng)
      : x(round_to_dtype<S>(fast_random(size_t(s.T * s.C), rng))),
        w(round_to_dtype<S>(fast_random(size_t(s.OC * s.C), rng, 0.0f, 1.0f / std::sqrt(float(s.C))))),
        dout(round_to_dtype<S>(fast_random(size_t(s.T * s.OC), rng))) {}
};

}  // namespace

TYPED_TEST(CudaMatmul, ForwardMatchesCpuReference) {
  using S = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(21);
  cuda::Blas blas;
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(trace(s));
    const Inputs<S> in(s, rng);
    Vec ref(size_t(s.T * s.OC));
    cpu::matmul_forward(ref.data(), in.x.data(), in.w.data(), s.T, s.C, s.OC);
    DeviceBuffer<S> d_x(to_device_dtype<S>(in.x)), d_w(to_device_dtype<S>(in.w));
    auto d_out = poisoned<S>(ref.size());
    cuda::matmul_forward(d_out.get(), d_x.get(), d_w.get(), s.T, s.C, s.OC, blas, nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_LT(rel_error(from_device_dtype(d_out.download()), ref), kTol<S>);
  }
}

TYPED_TEST(CudaMatmul, BackwardMatchesCpuReference) {
  using S = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(22);
  cuda::Blas blas;
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(trace(s));
    const Inputs<S> in(s, rng);
    const Vec dw0 = fast_random(size_t(s.OC * s.C), rng);  // dweight accumulates onto this
    Vec dinp_ref(size_t(s.T * s.C)), dw_ref = dw0;
    cpu::matmul_backward(dinp_ref.data(), dw_ref.data(), in.dout.data(), in.x.data(), in.w.data(), s.T, s.C, s.OC);
    DeviceBuffer<S> d_x(to_device_dtype<S>(in.x)), d_w(to_device_dtype<S>(in.w)),
        d_dout(to_device_dtype<S>(in.dout));
    auto d_dinp = poisoned<S>(dinp_ref.size());
    DeviceBuffer<float> d_dw(dw0);
    cuda::matmul_backward(d_dinp.get(), d_dw.get(), d_dout.get(), d_x.get(), d_w.get(), s.T, s.C, s.OC, blas,
                          nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_LT(rel_error(from_device_dtype(d_dinp.download()), dinp_ref), kTol<S>);
    EXPECT_LT(rel_error(d_dw.download(), dw_ref), kAccTol<S>);
  }
}

TYPED_TEST(CudaMatmul, NullGradientsAreSkipped) {
  using S = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(23);
  cuda::Blas blas;
  const Shape s{7, 64, 96};
  const Inputs<S> in(s, rng);
  const Vec dw0 = fast_random(size_t(s.OC * s.C), rng);
  Vec dinp_ref(size_t(s.T * s.C)), dw_ref = dw0;
  cpu::matmul_backward(dinp_ref.data(), dw_ref.data(), in.dout.data(), in.x.data(), in.w.data(), s.T, s.C, s.OC);
  DeviceBuffer<S> d_x(to_device_dtype<S>(in.x)), d_w(to_device_dtype<S>(in.w)), d_dout(to_device_dtype<S>(in.dout));
  auto d_dinp = poisoned<S>(dinp_ref.size());
  DeviceBuffer<float> d_dw(dw0);
  cuda::matmul_backward<S>(nullptr, d_dw.get(), d_dout.get(), d_x.get(), d_w.get(), s.T, s.C, s.OC, blas, nullptr);
  cuda::matmul_backward<S>(d_dinp.get(), nullptr, d_dout.get(), d_x.get(), d_w.get(), s.T, s.C, s.OC, blas, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_LT(rel_error(from_device_dtype(d_dinp.download()), dinp_ref), kTol<S>);
  EXPECT_LT(rel_error(d_dw.download(), dw_ref), kAccTol<S>);
}

// out written into a column slice of a wider buffer (ld_out), plus a residual of the same layout;
// every element outside the slice must stay untouched (NaN).
TYPED_TEST(CudaMatmul, ForwardResidualAndLdOut) {
  using S = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(24);
  cuda::Blas blas;
  for (const Shape& s : {Shape{7, 64, 96}, Shape{333, 2048, 1000}}) {
    for (const int64_t offset : {int64_t(0), int64_t(8), int64_t(40)}) {
      SCOPED_TRACE(trace(s) + " offset=" + std::to_string(offset));
      const int64_t ld = s.OC + 72;
      const Inputs<S> in(s, rng);
      const Vec res = round_to_dtype<S>(fast_random(size_t(s.T * ld), rng));
      Vec mm(size_t(s.T * s.OC));
      cpu::matmul_forward(mm.data(), in.x.data(), in.w.data(), s.T, s.C, s.OC);
      DeviceBuffer<S> d_x(to_device_dtype<S>(in.x)), d_w(to_device_dtype<S>(in.w)), d_res(to_device_dtype<S>(res));
      auto d_plain = poisoned<S>(size_t(s.T * ld));
      auto d_resid = poisoned<S>(size_t(s.T * ld));
      cuda::MatmulOptions opt;
      opt.ld_out = ld;
      cuda::matmul_forward(d_plain.get() + offset, d_x.get(), d_w.get(), s.T, s.C, s.OC, blas, nullptr, opt);
      opt.residual = d_res.get() + offset;
      cuda::matmul_forward(d_resid.get() + offset, d_x.get(), d_w.get(), s.T, s.C, s.OC, blas, nullptr, opt);
      // In place: out == residual.
      DeviceBuffer<S> d_inplace(to_device_dtype<S>(res));
      opt.residual = d_inplace.get() + offset;
      cuda::matmul_forward(d_inplace.get() + offset, d_x.get(), d_w.get(), s.T, s.C, s.OC, blas, nullptr, opt);
      CUDA_CHECK(cudaDeviceSynchronize());
      const Vec plain = from_device_dtype(d_plain.download()), resid = from_device_dtype(d_resid.download());
      const Vec inplace = from_device_dtype(d_inplace.download());
      Vec got_plain, got_resid, got_inplace, want_resid;
      int64_t untouched_bad = 0;
      for (int64_t t = 0; t < s.T; ++t) {
        for (int64_t j = 0; j < ld; ++j) {
          const size_t i = size_t(t * ld + j);
          if (j >= offset && j < offset + s.OC) {
            got_plain.push_back(plain[i]);
            got_resid.push_back(resid[i]);
            got_inplace.push_back(inplace[i]);
            want_resid.push_back(mm[size_t(t * s.OC + j - offset)] + res[i]);
          } else {
            untouched_bad += !std::isnan(plain[i]) + !std::isnan(resid[i]) + (inplace[i] != res[i]);
          }
        }
      }
      EXPECT_LT(rel_error(got_plain, mm), kTol<S>);
      EXPECT_LT(rel_error(got_resid, want_resid), kTol<S>);
      EXPECT_LT(rel_error(got_inplace, want_resid), kTol<S>);
      EXPECT_EQ(untouched_bad, 0) << "elements outside the ld_out slice were written";
    }
  }
}

// dout read from a column slice of a wider buffer; dinp accumulated onto its initial values.
TYPED_TEST(CudaMatmul, BackwardLdOutAndAccumulateDinp) {
  using S = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(25);
  cuda::Blas blas;
  for (const Shape& s : {Shape{7, 64, 96}, Shape{333, 2048, 1000}}) {
    SCOPED_TRACE(trace(s));
    const int64_t ld = s.OC + 40, offset = 24;
    const Inputs<S> in(s, rng);
    Vec wide = round_to_dtype<S>(fast_random(size_t(s.T * ld), rng));
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t o = 0; o < s.OC; ++o) wide[size_t(t * ld + offset + o)] = in.dout[size_t(t * s.OC + o)];
    const Vec dinp0 = round_to_dtype<S>(fast_random(size_t(s.T * s.C), rng));
    const Vec dw0 = fast_random(size_t(s.OC * s.C), rng);
    Vec mm(size_t(s.T * s.C)), dw_ref = dw0;
    cpu::matmul_backward(mm.data(), dw_ref.data(), in.dout.data(), in.x.data(), in.w.data(), s.T, s.C, s.OC);
    Vec dinp_ref(mm.size());
    for (size_t i = 0; i < mm.size(); ++i) dinp_ref[i] = dinp0[i] + mm[i];

    DeviceBuffer<S> d_x(to_device_dtype<S>(in.x)), d_w(to_device_dtype<S>(in.w)), d_wide(to_device_dtype<S>(wide));
    DeviceBuffer<S> d_dinp(to_device_dtype<S>(dinp0));
    DeviceBuffer<float> d_dw(dw0);
    cuda::MatmulOptions opt;
    opt.ld_out = ld;
    opt.accumulate_dinp = true;
    cuda::matmul_backward(d_dinp.get(), d_dw.get(), d_wide.get() + offset, d_x.get(), d_w.get(), s.T, s.C, s.OC, blas,
                          nullptr, opt);
    CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_LT(rel_error(from_device_dtype(d_dinp.download()), dinp_ref), kTol<S>);
    EXPECT_LT(rel_error(d_dw.download(), dw_ref), kAccTol<S>);
  }
}

// Two runs give bit-identical outputs, including a dweight GEMM with a long inner dimension
// (T = 16384 tokens, the shape most likely to be split along K).
TYPED_TEST(CudaMatmul, TwoRunsAreBitIdentical) {
  using S = TypeParam;
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(26);
  for (const Shape& s : {Shape{16384, 64, 96}, Shape{333, 2048, 1000}, Shape{2048, 256, 512}}) {
    SCOPED_TRACE(trace(s));
    const Inputs<S> in(s, rng);
    const Vec dw0 = fast_random(size_t(s.OC * s.C), rng);
    DeviceBuffer<S> d_x(to_device_dtype<S>(in.x)), d_w(to_device_dtype<S>(in.w)), d_dout(to_device_dtype<S>(in.dout));
    Vec out[2], dinp[2], dw[2];
    for (int run = 0; run < 2; ++run) {
      cuda::Blas blas;  // a fresh handle: the cached plan must not depend on it
      auto d_out = poisoned<S>(size_t(s.T * s.OC));
      auto d_dinp = poisoned<S>(size_t(s.T * s.C));
      DeviceBuffer<float> d_dw(dw0);
      cuda::matmul_forward(d_out.get(), d_x.get(), d_w.get(), s.T, s.C, s.OC, blas, nullptr);
      cuda::matmul_backward(d_dinp.get(), d_dw.get(), d_dout.get(), d_x.get(), d_w.get(), s.T, s.C, s.OC, blas,
                            nullptr);
      CUDA_CHECK(cudaDeviceSynchronize());
      out[run] = from_device_dtype(d_out.download());
      dinp[run] = from_device_dtype(d_dinp.download());
      dw[run] = d_dw.download();
    }
    EXPECT_TRUE(bit_equal(out[0], out[1]));
    EXPECT_TRUE(bit_equal(dinp[0], dinp[1]));
    EXPECT_TRUE(bit_equal(dw[0], dw[1]));
    Vec dw_ref = dw0, dinp_ref(size_t(s.T * s.C));
    cpu::matmul_backward(dinp_ref.data(), dw_ref.data(), in.dout.data(), in.x.data(), in.w.data(), s.T, s.C, s.OC);
    EXPECT_LT(rel_error(dw[0], dw_ref), kAccTol<S>);
    EXPECT_LT(rel_error(dinp[0], dinp_ref), kTol<S>);
  }
}

// ---- benchmarks (--gtest_also_run_disabled_tests) --------------------------------------------

namespace {

// Fills a device buffer with random values (a host block of random numbers, tiled; never zeros).
template <typename S>
void fill_random(S* dst, size_t n, std::mt19937& rng, float stddev) {
  const size_t block = std::min<size_t>(n, (size_t(1) << 20) + 7);
  const auto host = to_device_dtype<S>(fast_random(block, rng, 0.0f, stddev));
  for (size_t off = 0; off < n; off += block)
    CUDA_CHECK(cudaMemcpy(dst + off, host.data(), std::min(block, n - off) * sizeof(S), cudaMemcpyHostToDevice));
}

// Median milliseconds of `iters` timed calls (after `warmup` untimed ones), by cudaEvent.
template <typename F>
double median_ms(F&& f, int iters = 20, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) f();
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  std::vector<float> ms(size_t(iters), 0.0f);
  for (int i = 0; i < iters; ++i) {
    CUDA_CHECK(cudaEventRecord(a, nullptr));
    f();
    CUDA_CHECK(cudaEventRecord(b, nullptr));
    CUDA_CHECK(cudaEventSynchronize(b));
    CUDA_CHECK(cudaEventElapsedTime(&ms[size_t(i)], a, b));
  }
  CUDA_CHECK(cudaEventDestroy(a));
  CUDA_CHECK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

namespace longtune::cuda::detail {
// matmul.cu: out (T, OC) fp32 = inp @ weight^T.
template <typename scalar_t>
void matmul_forward_f32_out(float* out, const scalar_t* inp, const scalar_t* weight, int64_t T, int64_t C, int64_t OC,
                            const Blas& blas, cudaStream_t stream);
}  // namespace longtune::cuda::detail

TEST(DISABLED_CudaMatmulBench, Bf16LlamaShapes) {
  SKIP_WITHOUT_GPU();
  using S = __nv_bfloat16;
  struct Bench { const char* name; int64_t T, C, OC; };
  const Bench benches[] = {{"qkv (fused)", 16384, 2048, 3072},  {"o_proj", 16384, 2048, 2048},
                           {"gate|up (fused)", 16384, 2048, 16384}, {"down", 16384, 8192, 2048},
                           {"square 8192^3", 8192, 8192, 8192}};
  std::mt19937 rng(31);
  cuda::Blas blas;
  std::printf("%-18s %6s %6s %6s  %9s %9s   %9s %9s\n", "shape", "T", "C", "OC", "fwd ms", "fwd TF/s", "bwd ms",
              "bwd TF/s");
  for (const Bench& b : benches) {
    DeviceBuffer<S> x(size_t(b.T * b.C)), w(size_t(b.OC * b.C)), out(size_t(b.T * b.OC)), dout(size_t(b.T * b.OC)),
        dinp(size_t(b.T * b.C));
    DeviceBuffer<float> dw(size_t(b.OC * b.C));
    fill_random(x.get(), size_t(b.T * b.C), rng, 1.0f);
    fill_random(w.get(), size_t(b.OC * b.C), rng, 0.02f);
    fill_random(dout.get(), size_t(b.T * b.OC), rng, 1.0f);
    fill_random(dw.get(), size_t(b.OC * b.C), rng, 1.0f);
    const double flops = 2.0 * double(b.T) * double(b.C) * double(b.OC);
    const double fwd = median_ms([&] { cuda::matmul_forward(out.get(), x.get(), w.get(), b.T, b.C, b.OC, blas, nullptr); });
    const double bwd = median_ms([&] {
      cuda::matmul_backward(dinp.get(), dw.get(), dout.get(), x.get(), w.get(), b.T, b.C, b.OC, blas, nullptr);
    });
    std::printf("%-18s %6lld %6lld %6lld  %9.3f %9.1f   %9.3f %9.1f\n", b.name, (long long)b.T, (long long)b.C,
                (long long)b.OC, fwd, flops / fwd * 1e-9, bwd, 2.0 * flops / bwd * 1e-9);
  }
}

TEST(DISABLED_CudaMatmulBench, Bf16LinearCrossEntropy) {
  SKIP_WITHOUT_GPU();
  using S = __nv_bfloat16;
  const int64_t T = 16384, C = 2048, V = 128256;
  std::mt19937 rng(32);
  cuda::Blas blas;
  DeviceBuffer<S> hidden(size_t(T * C)), w(size_t(V * C)), dhidden(size_t(T * C));
  DeviceBuffer<float> losses(static_cast<size_t>(T)), dw(size_t(V * C));
  fill_random(hidden.get(), size_t(T * C), rng, 1.0f);
  fill_random(w.get(), size_t(V * C), rng, 0.05f);
  fill_random(dw.get(), size_t(V * C), rng, 1.0f);
  std::vector<int32_t> tg(static_cast<size_t>(T));
  std::uniform_int_distribution<int32_t> pick(0, int32_t(V - 1));
  for (auto& t : tg) t = pick(rng);
  DeviceBuffer<int32_t> targets(tg);
  const size_t scratch_bytes = cuda::linear_cross_entropy_scratch_bytes(4096, V);
  DeviceBuffer<uint8_t> scratch(scratch_bytes);
  const float scale = 1.0f / float(T);
  const double flops = 6.0 * double(T) * double(C) * double(V);
  const double fb = median_ms(
      [&] {
        cuda::linear_cross_entropy_forward_backward(losses.get(), dhidden.get(), dw.get(), hidden.get(), w.get(),
                                                    targets.get(), scale, T, C, V, scratch.get(), scratch_bytes, blas,
                                                    nullptr);
      },
      10, 2);
  const double fwd = median_ms(
      [&] {
        cuda::linear_cross_entropy_forward(losses.get(), hidden.get(), w.get(), targets.get(), T, C, V, scratch.get(),
                                           scratch_bytes, blas, nullptr);
      },
      10, 2);
  std::printf("linear_cross_entropy T=%lld C=%lld V=%lld bf16, scratch %.2f GB\n", (long long)T, (long long)C,
              (long long)V, double(scratch_bytes) * 1e-9);
  std::printf("  forward_backward %8.2f ms  %9.0f tokens/s  %6.1f TFLOP/s (6TCV)\n", fb,
              double(T) / fb * 1e3, flops / fb * 1e-9);
  std::printf("  forward only    %8.2f ms  %9.0f tokens/s  %6.1f TFLOP/s (2TCV)\n", fwd,
              double(T) / fwd * 1e3, flops / 3.0 / fwd * 1e-9);
  // Breakdown per 4096-token chunk (x4 for the whole batch): the logits GEMM (fp32 out), the two
  // backward GEMMs; the row kernel is the rest.
  const int64_t chunk = 4096;
  auto* logits = reinterpret_cast<float*>(scratch.get());
  auto* dlogits = reinterpret_cast<S*>(scratch.get() + size_t(chunk * V) * sizeof(float));
  const double g_logits = median_ms(
      [&] { cuda::detail::matmul_forward_f32_out(logits, hidden.get(), w.get(), chunk, C, V, blas, nullptr); }, 10, 2);
  const double g_bwd = median_ms(
      [&] {
        cuda::matmul_backward(dhidden.get(), dw.get(), dlogits, hidden.get(), w.get(), chunk, C, V, blas, nullptr);
      },
      10, 2);
  const double chunks = double(T / chunk), gemm_flops = 2.0 * double(chunk) * double(C) * double(V);
  std::printf("  per 4096-token chunk: logits GEMM %.2f ms (%.1f TFLOP/s), dhidden+dW GEMMs %.2f ms (%.1f TFLOP/s),"
              " rest (row kernel, launch) ~%.2f ms\n",
              g_logits, gemm_flops / g_logits * 1e-9, g_bwd, 2.0 * gemm_flops / g_bwd * 1e-9,
              fb / chunks - g_logits - g_bwd);
}
