// Attention CUDA kernels (FlashAttention-2 forward and backward) against the CPU reference on fresh
// random inputs, rounded to the storage type; plus a disabled throughput benchmark
// (CudaAttentionBench, run with --gtest_also_run_disabled_tests).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/attention.hpp"
#include "kernels/cuda/attention.cuh"
#include "src/common/dtype.hpp"
#include "tests/cuda/gpu_test_util.hpp"

using namespace longtune;
using longtune::test::DeviceBuffer;
using longtune::test::random_vector;
using longtune::test::rel_error;

namespace {

enum class Dt { kBf16, kFp16 };

uint16_t to_bits(float x, Dt dt) { return dt == Dt::kBf16 ? float_to_bf16(x) : float_to_fp16(x); }
float from_bits(uint16_t b, Dt dt) { return dt == Dt::kBf16 ? bf16_to_float(b) : fp16_to_float(b); }

// Rounded to bf16, then to fp16: exact in both (up to the rare fp16 subnormal).
std::vector<float> round_both(std::vector<float> v) {
  for (auto& x : v) x = fp16_to_float(float_to_fp16(bf16_to_float(float_to_bf16(x))));
  return v;
}

struct Case {
  int64_t HD, NH, NKV;
  std::vector<int32_t> seglens;
  bool fused;  // q, k, v (and dq, dk, dv) as slices of one padded buffer
};

struct Variant {
  cuda::AttentionKernel kernel;
  Dt dt;
  bool nondet;
  const char* name;
};

const Variant kVariants[] = {
    {cuda::AttentionKernel::kTensorCore, Dt::kBf16, false, "tc-bf16"},
    {cuda::AttentionKernel::kTensorCore, Dt::kFp16, false, "tc-fp16"},
    {cuda::AttentionKernel::kTensorCoreSm75, Dt::kFp16, false, "sm75-fp16"},
    {cuda::AttentionKernel::kTensorCore, Dt::kBf16, true, "tc-bf16-nondet"},
    {cuda::AttentionKernel::kTensorCoreSm75, Dt::kFp16, true, "sm75-fp16-nondet"},
    // cuDNN fused attention (packed documents as a ragged batch).
    {cuda::AttentionKernel::kCudnn, Dt::kBf16, true, "cudnn-bf16"},
    {cuda::AttentionKernel::kCudnn, Dt::kFp16, true, "cudnn-fp16"},
};

// Scatters rows of a dense (T, W) matrix into column `col0` of a (T, ld) buffer, and back.
void scatter(std::vector<uint16_t>& dst, int64_t ld, int64_t col0, const std::vector<uint16_t>& src, int64_t T, int64_t W) {
  for (int64_t t = 0; t < T; ++t) std::copy_n(&src[t * W], W, &dst[t * ld + col0]);
}
std::vector<uint16_t> gather(const std::vector<uint16_t>& src, int64_t ld, int64_t col0, int64_t T, int64_t W) {
  std::vector<uint16_t> out(size_t(T * W));
  for (int64_t t = 0; t < T; ++t) std::copy_n(&src[t * ld + col0], W, &out[t * W]);
  return out;
}
std::vector<uint16_t> to_bits(const std::vector<float>& v, Dt dt) {
  std::vector<uint16_t> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = to_bits(v[i], dt);
  return r;
}
std::vector<float> from_bits(const std::vector<uint16_t>& v, Dt dt) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = from_bits(v[i], dt);
  return r;
}
template <typename S>
S* as(DeviceBuffer<uint16_t>& b) { return reinterpret_cast<S*>(b.get()); }

struct Outputs {
  std::vector<uint16_t> out, dq, dk, dv;
  std::vector<float> lse;
};

template <typename S>
Outputs run_gpu(const Case& c, const Variant& var, int64_t T, const std::vector<int32_t>& cu, int64_t max_seqlen,
                const std::vector<uint16_t>& q, const std::vector<uint16_t>& k, const std::vector<uint16_t>& v,
                const std::vector<uint16_t>& dout, int passes_bwd, std::vector<uint16_t>* dq_dk_dv_second) {
  const int64_t HD = c.HD, NH = c.NH, NKV = c.NKV;
  const int64_t wq = NH * HD, wk = NKV * HD;
  const int64_t ld = c.fused ? wq + 2 * wk + 8 : 0;  // + 8: a stride that is not just the heads
  cuda::AttentionOptions opt;
  opt.max_seqlen = max_seqlen;
  opt.kernel = var.kernel;
  opt.nondeterministic_dq = var.nondet;
  opt.ld_q = opt.ld_k = opt.ld_v = ld;

  const uint16_t kNaN = 0xFFFF;  // NaN in both bf16 and fp16
  DeviceBuffer<int32_t> d_cu(cu);
  DeviceBuffer<uint16_t> d_dout(dout), d_out(std::vector<uint16_t>(size_t(T * wq), kNaN));
  DeviceBuffer<float> d_lse(std::vector<float>(size_t(T * NH), NAN));
  std::vector<uint16_t> qkv_host;
  if (c.fused) {
    qkv_host.assign(size_t(T * ld), 0);
    scatter(qkv_host, ld, 0, q, T, wq);
    scatter(qkv_host, ld, wq, k, T, wk);
    scatter(qkv_host, ld, wq + wk, v, T, wk);
  }
  DeviceBuffer<uint16_t> d_qkv(c.fused ? qkv_host : std::vector<uint16_t>(1));
  DeviceBuffer<uint16_t> d_q(c.fused ? std::vector<uint16_t>(1) : q), d_k(c.fused ? std::vector<uint16_t>(1) : k),
      d_v(c.fused ? std::vector<uint16_t>(1) : v);
  const S* pq = c.fused ? as<S>(d_qkv) : as<S>(d_q);
  const S* pk = c.fused ? as<S>(d_qkv) + wq : as<S>(d_k);
  const S* pv = c.fused ? as<S>(d_qkv) + wq + wk : as<S>(d_v);

  cuda::attention_forward<S>(as<S>(d_out), d_lse.get(), pq, pk, pv, d_cu.get(), int64_t(cu.size()) - 1, T, NH, NKV, HD,
                             opt, nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  Outputs res;
  res.out = d_out.download();
  res.lse = d_lse.download();

  DeviceBuffer<char> ws(std::max<size_t>(cuda::attention_backward_workspace_bytes(T, NH, NKV, HD, opt), 16));
  for (int pass = 0; pass < passes_bwd; ++pass) {
    const size_t n_grad = c.fused ? size_t(T * ld) : size_t(T * wq);
    DeviceBuffer<uint16_t> d_dqkv(std::vector<uint16_t>(c.fused ? n_grad : 1, kNaN));
    DeviceBuffer<uint16_t> d_dq(std::vector<uint16_t>(c.fused ? 1 : size_t(T * wq), kNaN));
    DeviceBuffer<uint16_t> d_dk(std::vector<uint16_t>(c.fused ? 1 : size_t(T * wk), kNaN));
    DeviceBuffer<uint16_t> d_dv(std::vector<uint16_t>(c.fused ? 1 : size_t(T * wk), kNaN));
    S* pdq = c.fused ? as<S>(d_dqkv) : as<S>(d_dq);
    S* pdk = c.fused ? as<S>(d_dqkv) + wq : as<S>(d_dk);
    S* pdv = c.fused ? as<S>(d_dqkv) + wq + wk : as<S>(d_dv);
    cuda::attention_backward<S>(pdq, pdk, pdv, as<S>(d_dout), pq, pk, pv, as<S>(d_out), d_lse.get(), d_cu.get(),
                                int64_t(cu.size()) - 1, T, NH, NKV, HD, opt, ws.get(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<uint16_t> dq, dk, dv;
    if (c.fused) {
      const auto all = d_dqkv.download();
      dq = gather(all, ld, 0, T, wq);
      dk = gather(all, ld, wq, T, wk);
      dv = gather(all, ld, wq + wk, T, wk);
    } else {
      dq = d_dq.download();
      dk = d_dk.download();
      dv = d_dv.download();
    }
    if (pass == 0) {
      res.dq = dq;
      res.dk = dk;
      res.dv = dv;
    } else if (dq_dk_dv_second) {
      *dq_dk_dv_second = dq;
      dq_dk_dv_second->insert(dq_dk_dv_second->end(), dk.begin(), dk.end());
      dq_dk_dv_second->insert(dq_dk_dv_second->end(), dv.begin(), dv.end());
    }
  }
  return res;
}

void run_case(const Case& c, uint32_t seed) {
  SKIP_WITHOUT_GPU();
  const int64_t HD = c.HD, NH = c.NH, NKV = c.NKV;
  std::vector<int32_t> cu{0};
  int64_t max_seqlen = 0;
  for (int32_t s : c.seglens) {
    cu.push_back(cu.back() + s);
    max_seqlen = std::max<int64_t>(max_seqlen, s);
  }
  const int64_t T = cu.back(), S = int64_t(c.seglens.size());
  std::mt19937 rng(seed);
  const auto q = round_both(random_vector(size_t(T * NH * HD), rng));
  const auto k = round_both(random_vector(size_t(T * NKV * HD), rng));
  const auto v = round_both(random_vector(size_t(T * NKV * HD), rng));
  const auto dout = round_both(random_vector(size_t(T * NH * HD), rng));

  std::vector<float> out(q.size()), lse(size_t(T * NH)), dq(q.size()), dk(k.size()), dv(v.size());
  cpu::attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), cu.data(), S, T, NH, NKV, HD);
  cpu::attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(), out.data(),
                          lse.data(), cu.data(), S, T, NH, NKV, HD);

  for (const Variant& var : kVariants) {
    if (var.kernel == cuda::AttentionKernel::kCudnn && !cuda::cudnn_attention_unavailable_reason().empty()) {
      std::printf("[attn] %s skipped: %s\n", var.name, cuda::cudnn_attention_unavailable_reason().c_str());
      continue;
    }
    SCOPED_TRACE(std::string(var.name) + " HD=" + std::to_string(HD) + " NH/NKV=" + std::to_string(NH) + "/" +
                 std::to_string(NKV) + " T=" + std::to_string(T) + " segments=" + std::to_string(S) +
                 (c.fused ? " fused" : ""));
    const bool det = !var.nondet;
    std::vector<uint16_t> second;
    const auto qb = to_bits(q, var.dt), kb = to_bits(k, var.dt), vb = to_bits(v, var.dt), dob = to_bits(dout, var.dt);
    const Outputs r = var.dt == Dt::kBf16
                          ? run_gpu<__nv_bfloat16>(c, var, T, cu, max_seqlen, qb, kb, vb, dob, det ? 2 : 1, &second)
                          : run_gpu<__half>(c, var, T, cu, max_seqlen, qb, kb, vb, dob, det ? 2 : 1, &second);
    const double tol = var.dt == Dt::kBf16 ? 2e-2 : 5e-3;
    const double e_out = rel_error(from_bits(r.out, var.dt), out);
    const double e_lse = rel_error(r.lse, lse);
    const double e_dq = rel_error(from_bits(r.dq, var.dt), dq);
    const double e_dk = rel_error(from_bits(r.dk, var.dt), dk);
    const double e_dv = rel_error(from_bits(r.dv, var.dt), dv);
    std::printf("[attn] %-16s HD=%3lld NH/NKV=%2lld/%lld T=%5lld segs=%3lld%s  out %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n",
                var.name, (long long)HD, (long long)NH, (long long)NKV, (long long)T, (long long)S,
                c.fused ? " fused" : "      ", e_out, e_lse, e_dq, e_dk, e_dv);
    EXPECT_LT(e_out, tol);
    EXPECT_LT(e_lse, 1e-3);
    EXPECT_LT(e_dq, tol);
    EXPECT_LT(e_dk, tol);
    EXPECT_LT(e_dv, tol);
    if (det) {
      std::vector<uint16_t> first = r.dq;
      first.insert(first.end(), r.dk.begin(), r.dk.end());
      first.insert(first.end(), r.dv.begin(), r.dv.end());
      ASSERT_EQ(first.size(), second.size());
      EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * sizeof(uint16_t)), 0)
          << "deterministic backward is not bit-identical across two runs";
    }
  }
}

std::vector<int32_t> short_docs(std::mt19937& rng, int n) {
  std::uniform_int_distribution<int32_t> len(1, 300);
  std::vector<int32_t> s;
  for (int i = 0; i < n; ++i) s.push_back(i % 5 == 0 ? 1 : len(rng));  // every fifth a length-1 document
  s.push_back(300);
  s.push_back(1);
  return s;
}

}  // namespace

TEST(CudaAttention, OneLongSegmentHd128Mha) { run_case({128, 4, 4, {1000}, false}, 1); }
TEST(CudaAttention, OneLongSegmentHd64Gqa4Fused) { run_case({64, 8, 2, {2048}, true}, 2); }
TEST(CudaAttention, OneLongSegmentHd128Gqa4Fused) { run_case({128, 16, 4, {1531}, true}, 10); }
TEST(CudaAttention, ShortDocumentsHd128Gqa4Fused) {
  std::mt19937 rng(3);
  run_case({128, 32, 8, short_docs(rng, 14), true}, 3);
}
TEST(CudaAttention, ShortDocumentsHd64Gqa4) {
  std::mt19937 rng(4);
  run_case({64, 32, 8, short_docs(rng, 20), false}, 4);
}
TEST(CudaAttention, MidSegmentsHd64Mqa6) { run_case({64, 6, 1, {517, 1, 700, 333, 64}, false}, 5); }
TEST(CudaAttention, MidSegmentsHd128Gqa4Fused) { run_case({128, 8, 2, {3, 600, 129, 1234}, true}, 6); }
TEST(CudaAttention, MidSegmentsHd128Mqa6) { run_case({128, 6, 1, {130, 257, 1, 900}, false}, 7); }

// Small enough for compute-sanitizer (memcheck, racecheck).
TEST(CudaAttention, SmallSegmentsBothHeadDims) {
  run_case({64, 4, 2, {1, 77, 130, 16}, true}, 8);
  run_case({128, 4, 2, {129, 1, 64}, false}, 9);
}

TEST(CudaAttention, RejectsBadConfigurations) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<int32_t> cu(std::vector<int32_t>{0, 16});
  DeviceBuffer<uint16_t> buf(16 * 4 * 128);
  DeviceBuffer<float> lse(64);
  cuda::AttentionOptions opt;
  opt.max_seqlen = 16;
  auto* b = reinterpret_cast<__nv_bfloat16*>(buf.get());
  auto* h = reinterpret_cast<__half*>(buf.get());
  opt.kernel = cuda::AttentionKernel::kTensorCoreSm75;  // fp16 only
  EXPECT_THROW(cuda::attention_forward(b, lse.get(), b, b, b, cu.get(), 1, 16, 1, 1, 128, opt, nullptr), ConfigError);
  opt.kernel = cuda::AttentionKernel::kAuto;
  EXPECT_THROW(cuda::attention_forward(h, lse.get(), h, h, h, cu.get(), 1, 16, 1, 1, 96, opt, nullptr), ConfigError);
  opt.max_seqlen = 0;
  EXPECT_THROW(cuda::attention_forward(h, lse.get(), h, h, h, cu.get(), 1, 16, 1, 1, 128, opt, nullptr), ConfigError);
  opt.max_seqlen = 16;
  opt.ld_q = 131;
  EXPECT_THROW(cuda::attention_forward(h, lse.get(), h, h, h, cu.get(), 1, 16, 1, 1, 128, opt, nullptr), ConfigError);
}

// ---- throughput -------------------------------------------------------------------------------

namespace {

std::vector<uint16_t> fast_random_bf16(size_t n, uint64_t seed) {
  std::vector<uint16_t> v(n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const float u = float(int32_t(s >> 40) - (1 << 23)) / float(1 << 23);  // uniform (-1, 1)
    v[i] = float_to_bf16(1.7f * u);                                         // std ~1
  }
  return v;
}

template <typename F>
double median_ms(F&& fn, int reps = 10) {
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  fn();
  fn();
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK(cudaEventRecord(a));
    fn();
    CUDA_CHECK(cudaEventRecord(b));
    CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CUDA_CHECK(cudaEventDestroy(a));
  CUDA_CHECK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return 0.5 * (t[(reps - 1) / 2] + t[reps / 2]);
}

}  // namespace

TEST(CudaAttentionBench, DISABLED_Causal) {
  SKIP_WITHOUT_GPU();
  using S = __nv_bfloat16;
  struct Shape { int64_t HD, seq; };
  const bool quick = std::getenv("ATTN_BENCH_QUICK") != nullptr;  // 16K only
  for (const Shape sh : {Shape{128, 16384}, Shape{64, 16384}, Shape{128, 65536}}) {
    if (quick && sh.seq > 16384) continue;
    const int64_t NH = 32, NKV = 8, HD = sh.HD, T = sh.seq;
    DeviceBuffer<int32_t> cu(std::vector<int32_t>{0, int32_t(T)});
    DeviceBuffer<uint16_t> q(fast_random_bf16(size_t(T * NH * HD), 1)), k(fast_random_bf16(size_t(T * NKV * HD), 2)),
        v(fast_random_bf16(size_t(T * NKV * HD), 3)), dout(fast_random_bf16(size_t(T * NH * HD), 4));
    DeviceBuffer<uint16_t> out(size_t(T * NH * HD)), dq(size_t(T * NH * HD)), dk(size_t(T * NKV * HD)),
        dv(size_t(T * NKV * HD));
    DeviceBuffer<float> lse(size_t(T * NH));
    cuda::AttentionOptions det, nondet;
    det.max_seqlen = nondet.max_seqlen = T;
    nondet.nondeterministic_dq = true;
    DeviceBuffer<char> ws(cuda::attention_backward_workspace_bytes(T, NH, NKV, HD, nondet));
    auto P = [](DeviceBuffer<uint16_t>& b) { return reinterpret_cast<S*>(b.get()); };
    auto fwd = [&] {
      cuda::attention_forward<S>(P(out), lse.get(), P(q), P(k), P(v), cu.get(), 1, T, NH, NKV, HD, det, nullptr);
    };
    auto bwd = [&](const cuda::AttentionOptions& o) {
      cuda::attention_backward<S>(P(dq), P(dk), P(dv), P(dout), P(q), P(k), P(v), P(out), lse.get(), cu.get(), 1, T, NH,
                                  NKV, HD, o, ws.get(), nullptr);
    };
    fwd();
    const double t_f = median_ms(fwd);
    const double t_bd = median_ms([&] { bwd(det); });
    const double t_bn = median_ms([&] { bwd(nondet); });
    const double t_fbd = median_ms([&] { fwd(); bwd(det); });
    const double t_fbn = median_ms([&] { fwd(); bwd(nondet); });
    const double fl = 4.0 * double(T) * double(T) * double(HD) * double(NH) / 2.0;  // causal forward
    auto tf = [](double flops, double ms) { return flops / (ms * 1e-3) / 1e12; };
    std::printf("RESULT ours hq=%lld hkv=%lld d=%lld seq=%lld  fwd %.2f ms %.1f TF | bwd det %.2f ms %.1f TF | "
                "bwd nondet %.2f ms %.1f TF | fwd+bwd det %.2f ms %.1f TF | fwd+bwd nondet %.2f ms %.1f TF\n",
                (long long)NH, (long long)NKV, (long long)HD, (long long)T, t_f, tf(fl, t_f), t_bd, tf(2.5 * fl, t_bd),
                t_bn, tf(2.5 * fl, t_bn), t_fbd, tf(3.5 * fl, t_fbd), t_fbn, tf(3.5 * fl, t_fbn));
    std::fflush(stdout);
    if (!cuda::cudnn_attention_unavailable_reason().empty()) continue;
    // The cuDNN backend on the same buffers (its plan is built by the first call, outside the timing).
    cuda::AttentionOptions cudnn = nondet;
    cudnn.kernel = cuda::AttentionKernel::kCudnn;
    auto fwd_cudnn = [&] {
      cuda::attention_forward<S>(P(out), lse.get(), P(q), P(k), P(v), cu.get(), 1, T, NH, NKV, HD, cudnn, nullptr);
    };
    fwd_cudnn();
    bwd(cudnn);
    const double c_f = median_ms(fwd_cudnn);
    const double c_b = median_ms([&] { bwd(cudnn); });
    const double c_fb = median_ms([&] { fwd_cudnn(); bwd(cudnn); });
    std::printf("RESULT cudnn-backend hq=%lld hkv=%lld d=%lld seq=%lld  fwd %.2f ms %.1f TF | bwd %.2f ms %.1f TF | "
                "fwd+bwd %.2f ms %.1f TF\n",
                (long long)NH, (long long)NKV, (long long)HD, (long long)T, c_f, tf(fl, c_f), c_b, tf(2.5 * fl, c_b),
                c_fb, tf(3.5 * fl, c_fb));
    std::fflush(stdout);
  }
}
