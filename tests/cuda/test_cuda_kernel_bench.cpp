// Bandwidth of the memory-bound kernels at a Llama-1B-like shape (T = 16384, C = 2048, F = 8192,
// bf16), against a device-to-device cudaMemcpy measured in the same run. Disabled by default:
//   longtune_tests --gtest_also_run_disabled_tests --gtest_filter='*CudaKernelBench*'
// GB/s = bytes each kernel must move once (reads + writes) / median time of 20 runs (cudaEvent).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/rmsnorm.cuh"
#include "kernels/cuda/rope.cuh"
#include "kernels/cuda/swiglu.cuh"
#include "src/optim/adamw.hpp"
#include "tests/cuda/gpu_test_util.hpp"

using namespace longtune;
using namespace longtune::test;

namespace {

template <typename F>
double median_ms(F&& f, int iters = 20) {
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 2; ++i) f();  // warm up
  std::vector<float> ms;
  for (int i = 0; i < iters; ++i) {
    CUDA_CHECK(cudaEventRecord(a));
    f();
    CUDA_CHECK(cudaEventRecord(b));
    CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CUDA_CHECK(cudaEventDestroy(a));
  CUDA_CHECK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return double(ms[ms.size() / 2]);
}

// Fills n elements with a random 1M-element block tiled by device copies.
template <typename T>
void fill_random(T* dev, size_t n, std::mt19937& rng, float mean = 0.0f, float stddev = 1.0f) {
  const size_t block = std::min<size_t>(n, size_t(1) << 20);
  const auto host = to_device_dtype<T>(random_vector(block, rng, mean, stddev));
  CUDA_CHECK(cudaMemcpy(dev, host.data(), block * sizeof(T), cudaMemcpyHostToDevice));
  for (size_t done = block; done < n; done += std::min(done, n - done))
    CUDA_CHECK(cudaMemcpy(dev + done, dev, std::min(done, n - done) * sizeof(T), cudaMemcpyDeviceToDevice));
}

struct Row {
  std::string op;
  double ms, bytes;
};

}  // namespace

TEST(CudaKernelBench, DISABLED_MemoryBoundOps) {
  SKIP_WITHOUT_GPU();
  using bf = __nv_bfloat16;
  const int64_t T = 16384, C = 2048, F = 8192, NH = 16, HD = 128, V = 128256;
  const size_t TC = size_t(T * C), TF = size_t(T * F);
  std::mt19937 rng(91);

  DeviceBuffer<bf> x{TC}, y{TC}, z{TC}, branch{TC}, res{TC}, w{size_t(C)};
  DeviceBuffer<float> rstd{size_t(T)}, dw{size_t(C)};
  fill_random(x.get(), TC, rng);
  fill_random(y.get(), TC, rng);
  fill_random(branch.get(), TC, rng);
  fill_random(w.get(), size_t(C), rng, 1.0f, 0.1f);
  CUDA_CHECK(cudaMemset(dw.get(), 0, size_t(C) * 4));

  std::vector<Row> rows;
  auto add = [&](const std::string& op, double bytes, auto&& f) { rows.push_back({op, median_ms(f), bytes}); };

  // Reference: device-to-device copy of 2 * T * F bf16 (512 MiB): read + write.
  {
    DeviceBuffer<bf> a(2 * TF), b(2 * TF);
    CUDA_CHECK(cudaMemset(a.get(), 0, 2 * TF * 2));
    add("cudaMemcpy D2D", 2.0 * 2 * TF * 2, [&] {
      CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), 2 * TF * 2, cudaMemcpyDeviceToDevice));
    });
  }

  const double act = double(TC) * 2;  // one (T, C) bf16 tensor
  add("rmsnorm_forward", 2 * act + T * 4.0 + C * 2.0,
      [&] { cuda::rmsnorm_forward(y.get(), rstd.get(), x.get(), w.get(), T, C, 1e-5f, nullptr); });
  add("rmsnorm_backward", 3 * act + T * 4.0 + C * 2.0,
      [&] { cuda::rmsnorm_backward(z.get(), dw.get(), y.get(), x.get(), w.get(), rstd.get(), T, C, nullptr); });
  add("residual_rmsnorm_forward", 4 * act + T * 4.0 + C * 2.0, [&] {
    cuda::residual_rmsnorm_forward(res.get(), y.get(), rstd.get(), x.get(), branch.get(), w.get(), T, C, 1e-5f, nullptr);
  });
  add("residual_rmsnorm_backward", 4 * act + T * 4.0 + C * 2.0, [&] {
    cuda::residual_rmsnorm_backward(z.get(), dw.get(), y.get(), branch.get(), res.get(), w.get(), rstd.get(), T, C, nullptr);
  });

  // RoPE on q (T, 16 heads, 128), in place, and on the k slice of a fused qkv row (16 + 4 + 4 heads).
  {
    std::vector<int32_t> pos(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) pos[size_t(t)] = int32_t(t);
    std::vector<float> freq(size_t(HD / 2));
    for (int64_t i = 0; i < HD / 2; ++i) freq[size_t(i)] = float(1.0 / std::pow(500000.0, double(2 * i) / double(HD)));
    DeviceBuffer<int32_t> d_pos(pos);
    DeviceBuffer<float> d_freq(freq);
    add("rope_forward (q, in place)", 2 * act,
        [&] { cuda::rope_forward(x.get(), x.get(), d_pos.get(), d_freq.get(), T, NH, HD, nullptr); });
    add("rope_backward (q, in place)", 2 * act,
        [&] { cuda::rope_backward(x.get(), x.get(), d_pos.get(), d_freq.get(), T, NH, HD, nullptr); });
    const int64_t NKV = 4, ld = (NH + 2 * NKV) * HD;
    DeviceBuffer<bf> qkv(size_t(T * ld));
    fill_random(qkv.get(), size_t(T * ld), rng);
    add("rope_forward (k slice, ld)", 2.0 * T * NKV * HD * 2, [&] {
      cuda::rope_forward(qkv.get() + NH * HD, qkv.get() + NH * HD, d_pos.get(), d_freq.get(), T, NKV, HD, nullptr, ld);
    });
  }

  // SwiGLU on a fused gate|up buffer (row stride 2F).
  {
    DeviceBuffer<bf> gu(2 * TF), out(TF), dgu(2 * TF);
    fill_random(gu.get(), 2 * TF, rng, 0.0f, 2.0f);
    fill_random(out.get(), TF, rng);
    const double tf = double(TF) * 2;
    add("swiglu_forward (fused, ld 2F)", 3 * tf,
        [&] { cuda::swiglu_forward(out.get(), gu.get(), gu.get() + F, T, F, nullptr, 2 * F); });
    add("swiglu_backward (fused, ld 2F)", 5 * tf, [&] {
      cuda::swiglu_backward(dgu.get(), dgu.get() + F, out.get(), gu.get(), gu.get() + F, T, F, nullptr, 2 * F);
    });
  }

  // Embedding with V = 128256, uniform random tokens.
  {
    std::vector<int32_t> tok(static_cast<size_t>(T));
    std::uniform_int_distribution<int32_t> id(0, int32_t(V - 1));
    for (auto& t : tok) t = id(rng);
    const double distinct = double(std::set<int32_t>(tok.begin(), tok.end()).size());
    DeviceBuffer<int32_t> d_tok(tok);
    DeviceBuffer<bf> wte(size_t(V * C));
    DeviceBuffer<float> dwte(size_t(V * C));
    CUDA_CHECK(cudaMemset(wte.get(), 0, size_t(V * C) * 2));
    CUDA_CHECK(cudaMemset(dwte.get(), 0, size_t(V * C) * 4));
    DeviceBuffer<char> scratch(cuda::embedding_backward_scratch_bytes(T));
    add("embedding_forward", 2 * act, [&] { cuda::embedding_forward(y.get(), d_tok.get(), wte.get(), T, C, nullptr); });
    add("embedding_backward (sort incl.)", act + distinct * C * 8.0,
        [&] { cuda::embedding_backward(dwte.get(), x.get(), d_tok.get(), T, C, scratch.get(), nullptr); });
  }

  // AdamW over 64M fp32 elements in 200 ranges, bf16 compute copy.
  {
    const int64_t n = int64_t(64) << 20, nr = 200;
    std::vector<cuda::DeviceOptimRange> r;
    for (int64_t i = 0; i < nr; ++i) r.push_back({i * (n / nr), n / nr - 64, int32_t(i % 2)});
    int64_t trained = 0;
    for (const auto& x_ : r) trained += x_.numel;
    DeviceBuffer<cuda::DeviceOptimRange> d_r(r);
    DeviceBuffer<float> p{size_t(n)}, m{size_t(n)}, v{size_t(n)}, g{size_t(n)};
    DeviceBuffer<uint16_t> out{size_t(n)};
    fill_random(p.get(), size_t(n), rng, 0.0f, 0.02f);
    fill_random(g.get(), size_t(n), rng, 0.0f, 0.01f);
    CUDA_CHECK(cudaMemset(m.get(), 0, size_t(n) * 4));
    CUDA_CHECK(cudaMemset(v.get(), 0, size_t(n) * 4));
    AdamWConfig cfg;
    const AdamWStepScalars hs = adamw_step_scalars(cfg, 10, 1e-4, 1.0f);
    cuda::AdamWScalars s{};
    s.lr = hs.lr, s.beta1 = hs.beta1, s.beta2 = hs.beta2, s.eps = hs.eps, s.weight_decay = hs.weight_decay;
    s.one_minus_beta1 = hs.one_minus_beta1, s.one_minus_beta2 = hs.one_minus_beta2, s.lr_times_wd = hs.lr_times_wd;
    s.step_size = hs.step_size, s.sqrt_bc2 = hs.sqrt_bc2, s.grad_coef = hs.grad_coef, s.decay_factor = hs.decay_factor;
    add("adamw_update (64M, bf16 copy)", trained * 30.0, [&] {
      cuda::adamw_update(p.get(), m.get(), v.get(), g.get(), out.get(), DType::BF16, d_r.get(), nr, s, nullptr);
    });
    DeviceBuffer<char> scratch(cuda::adamw_reduce_scratch_bytes(n));
    DeviceBuffer<double> sum(1);
    DeviceBuffer<int32_t> flag(1);
    add("grad_norm_sq (64M)", trained * 4.0, [&] {
      cuda::grad_norm_sq(sum.get(), flag.get(), g.get(), d_r.get(), nr, n, scratch.get(), nullptr);
    });
    add("convert_f32 -> bf16 (64M)", n * 6.0, [&] { cuda::convert_f32(out.get(), DType::BF16, p.get(), n, nullptr); });
  }

  int dev = 0;
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  const double copy_gbs = rows[0].bytes / (rows[0].ms * 1e6);
  std::printf("\n[CudaKernelBench] %s, T=%lld C=%lld F=%lld bf16, median of 20\n", prop.name, (long long)T, (long long)C,
              (long long)F);
  std::printf("%-34s %10s %10s %9s\n", "op", "time us", "GB/s", "% copy");
  for (const Row& r : rows) {
    const double gbs = r.bytes / (r.ms * 1e6);
    std::printf("%-34s %10.1f %10.1f %8.1f%%\n", r.op.c_str(), r.ms * 1e3, gbs, 100.0 * gbs / copy_gbs);
  }
  std::fflush(stdout);
}
