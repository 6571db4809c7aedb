// Linear layers through cuBLASLt (see matmul.cuh).
//
// Row-major <-> column-major: cuBLASLt is column-major, and a row-major (R, K) matrix with row
// stride ld is the column-major (K, R) matrix with leading dimension ld. So, with ^T the
// transposes cuBLASLt sees:
//   forward   out (T, OC)   = inp (T, C) @ W (OC, C)^T  <=>  out^T (OC, T) = op_T(W: C x OC) @ inp^T (C, T)
//   dinp      dinp (T, C)   = dout (T, OC) @ W (OC, C)  <=>  dinp^T (C, T) = W^T (C, OC) @ dout^T (OC, T)
//   dweight   dW (OC, C)   += dout^T @ inp              <=>  dW^T (C, OC) += inp^T (C, T) @ op_T(dout^T: OC x T)
// (m, n, k) = (OC, T, C), (C, T, OC) and (C, OC, T) respectively.
//
// Precision: every GEMM runs with CUBLAS_COMPUTE_32F and fp32 alpha/beta. For float storage this
// is the exact fp32 path (no TF32: that needs CUBLAS_COMPUTE_32F_FAST_TF32, which is never
// requested). dweight is fp32 C/D with storage-type A/B (bf16/fp16 A/B + fp32 C/D is a supported
// cuBLASLt combination), beta = 1, so the storage type never rounds an accumulated gradient.
//
// Determinism: cuBLAS gives bit-identical results run to run for a fixed algorithm on one
// architecture/SM count, as long as the reduction across split-K slices is not done with
// atomics. Here (1) the heuristic runs once per (device, workspace size, shape, types, ops,
// leading dimensions, pointer alignments) and its first algorithm is cached and reused, so a
// shape always runs the same kernel; (2) the preference restricts split-K reduction schemes to
// NONE (no split) and COMPUTE_TYPE (fp32 partials in the workspace, reduced by a separate kernel
// in a fixed order); INPLACE (counters in the output buffer, rounding partials to the output
// type) and OUTPUT_TYPE (partials rounded to bf16/fp16) are excluded, for precision as much as
// for order; (3) the chosen algorithm's reduction scheme is read back and checked against that
// mask. One Blas per stream (cuBLAS only promises reproducibility with one active stream per
// handle/workspace).
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/matmul.cuh"

// cuBLASLt returns cublasStatus_t, so CUBLAS_CHECK (cuda_check.cuh) covers it.
#ifndef CUBLASLT_CHECK
#define CUBLASLT_CHECK(call) CUBLAS_CHECK(call)
#endif

namespace longtune::cuda {

Blas::Blas(size_t workspace_bytes) : workspace_bytes_(workspace_bytes) {
  CUBLASLT_CHECK(cublasLtCreate(&handle_));
  if (workspace_bytes_ > 0) {
    const cudaError_t err = cudaMalloc(&workspace_, workspace_bytes_);
    if (err != cudaSuccess) {
      cublasLtDestroy(handle_);
      throw_cuda_error(err, "cudaMalloc(&workspace_, workspace_bytes_)", __FILE__, __LINE__);
    }
  }
}

Blas::~Blas() {
  if (workspace_ != nullptr) cudaFree(workspace_);
  if (handle_ != nullptr) cublasLtDestroy(handle_);
}

namespace detail {

// One column-major GEMM: D (m, n; ldd) = op(A) @ op(B) + beta * C, C of D's type and layout
// (C == D for accumulation, or another buffer such as a residual). A/B of type ab, C/D of type cd.
struct GemmSpec {
  cudaDataType_t ab, cd;
  bool trans_a, trans_b;
  int64_t m, n, k, lda, ldb, ldd;
};

void lt_gemm(const GemmSpec& s, const void* A, const void* B, float beta, const void* Cm, void* D, const Blas& blas,
             cudaStream_t stream);

// logits-style GEMM with an fp32 output whatever the storage type: out (T, OC) fp32 = inp @ weight^T.
template <typename scalar_t>
void matmul_forward_f32_out(float* out, const scalar_t* inp, const scalar_t* weight, int64_t T, int64_t C, int64_t OC,
                            const Blas& blas, cudaStream_t stream);

}  // namespace detail

namespace {

template <typename T> constexpr cudaDataType_t dtype_of();
template <> constexpr cudaDataType_t dtype_of<float>() { return CUDA_R_32F; }
template <> constexpr cudaDataType_t dtype_of<__nv_bfloat16>() { return CUDA_R_16BF; }
template <> constexpr cudaDataType_t dtype_of<__half>() { return CUDA_R_16F; }

// Allowed split-K reduction schemes (see the file comment).
constexpr uint32_t kReductionMask = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;

// Largest power of two (<= 256) dividing the address: the heuristic must not assume more.
uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a % al) != 0) al >>= 1;
  return al;
}

struct PlanKey {
  int device;
  size_t workspace;
  int ab, cd;
  bool ta, tb;
  int64_t m, n, k, lda, ldb, ldd;
  uint32_t al_a, al_b, al_c, al_d;
  auto operator<=>(const PlanKey&) const = default;
};

// Descriptors, layouts and the chosen algorithm of one GEMM shape; read-only once built.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, cd = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace_needed = 0;
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (cd) cublasLtMatrixLayoutDestroy(cd);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

struct PlanCache {
  std::mutex mutex;
  std::map<PlanKey, std::unique_ptr<Plan>> plans;
};

PlanCache& plan_cache() {
  static PlanCache* cache = new PlanCache;  // never destroyed: usable from other static destructors
  return *cache;
}

std::string describe(const detail::GemmSpec& s) {
  return "m=" + std::to_string(s.m) + " n=" + std::to_string(s.n) + " k=" + std::to_string(s.k) +
         " lda=" + std::to_string(s.lda) + " ldb=" + std::to_string(s.ldb) + " ldd=" + std::to_string(s.ldd) +
         " ab=" + std::to_string(int(s.ab)) + " cd=" + std::to_string(int(s.cd)) + (s.trans_a ? " opA=T" : " opA=N") +
         (s.trans_b ? " opB=T" : " opB=N");
}

std::unique_ptr<Plan> make_plan(const PlanKey& key, const detail::GemmSpec& s, const Blas& blas) {
  auto plan = std::make_unique<Plan>();
  CUBLASLT_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = s.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = s.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  // Stored shapes (before op): A is m x k (or k x m transposed), B is k x n (or n x k).
  const uint64_t a_rows = uint64_t(s.trans_a ? s.k : s.m), a_cols = uint64_t(s.trans_a ? s.m : s.k);
  const uint64_t b_rows = uint64_t(s.trans_b ? s.n : s.k), b_cols = uint64_t(s.trans_b ? s.k : s.n);
  CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->a, s.ab, a_rows, a_cols, s.lda));
  CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->b, s.ab, b_rows, b_cols, s.ldb));
  CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->cd, s.cd, uint64_t(s.m), uint64_t(s.n), s.ldd));

  cublasLtMatmulPreference_t pref = nullptr;
  CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  struct PrefGuard {
    cublasLtMatmulPreference_t p;
    ~PrefGuard() { cublasLtMatmulPreferenceDestroy(p); }
  } guard{pref};
  const uint64_t ws = key.workspace;
  const uint32_t mask = kReductionMask;
  CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  CUBLASLT_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask, sizeof(mask)));
  CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.al_a,
                                                      sizeof(key.al_a)));
  CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.al_b,
                                                      sizeof(key.al_b)));
  CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.al_c,
                                                      sizeof(key.al_c)));
  CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.al_d,
                                                      sizeof(key.al_d)));

  constexpr int kRequested = 8;
  cublasLtMatmulHeuristicResult_t results[kRequested] = {};
  int found = 0;
  CUBLASLT_CHECK(cublasLtMatmulAlgoGetHeuristic(blas.handle(), plan->desc, plan->a, plan->b, plan->cd, plan->cd, pref,
                                                kRequested, results, &found));
  // Heuristic order is best first; take the first that fits and whose reduction scheme is allowed.
  for (int i = 0; i < found; ++i) {
    if (results[i].state != CUBLAS_STATUS_SUCCESS || results[i].workspaceSize > key.workspace) continue;
    uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
    size_t written = 0;
    CUBLASLT_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&results[i].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
                                                        &scheme, sizeof(scheme), &written));
    int32_t splits = 1;
    CUBLASLT_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&results[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits,
                                                        sizeof(splits), &written));
    if (splits > 1 && (scheme & ~kReductionMask) != 0) continue;
    plan->algo = results[i].algo;
    plan->workspace_needed = results[i].workspaceSize;
    return plan;
  }
  throw CudaError("cublasLtMatmulAlgoGetHeuristic: no deterministic algorithm for " + describe(s) + " (" +
                  std::to_string(found) + " candidates)");
}

const Plan& get_plan(const detail::GemmSpec& s, const void* A, const void* B, const void* Cm, const void* D,
                     const Blas& blas) {
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  const PlanKey key{device, blas.workspace_bytes(), int(s.ab), int(s.cd), s.trans_a, s.trans_b, s.m, s.n, s.k,
                    s.lda, s.ldb, s.ldd, alignment_of(A), alignment_of(B), alignment_of(Cm), alignment_of(D)};
  PlanCache& cache = plan_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  auto it = cache.plans.find(key);
  if (it == cache.plans.end()) it = cache.plans.emplace(key, make_plan(key, s, blas)).first;
  return *it->second;  // entries are never erased: the reference stays valid after unlocking
}

}  // namespace

namespace detail {

void lt_gemm(const GemmSpec& s, const void* A, const void* B, float beta, const void* Cm, void* D, const Blas& blas,
             cudaStream_t stream) {
  if (s.m == 0 || s.n == 0) return;
  LT_CHECK(s.k > 0, "matmul: inner dimension must be positive");
  if (beta == 0.0f || Cm == nullptr) {
    Cm = D;  // not read when beta == 0
    beta = 0.0f;
  }
  const Plan& plan = get_plan(s, A, B, Cm, D, blas);
  const float alpha = 1.0f;
  CUBLASLT_CHECK(cublasLtMatmul(blas.handle(), plan.desc, &alpha, A, plan.a, B, plan.b, &beta, Cm, plan.cd, D,
                                plan.cd, &plan.algo, blas.workspace(), blas.workspace_bytes(), stream));
}

template <typename scalar_t>
void matmul_forward_f32_out(float* out, const scalar_t* inp, const scalar_t* weight, int64_t T, int64_t C, int64_t OC,
                            const Blas& blas, cudaStream_t stream) {
  const GemmSpec s{dtype_of<scalar_t>(), CUDA_R_32F, true, false, OC, T, C, C, C, OC};
  lt_gemm(s, weight, inp, 0.0f, nullptr, out, blas, stream);
}

template void matmul_forward_f32_out<float>(float*, const float*, const float*, int64_t, int64_t, int64_t,
                                            const Blas&, cudaStream_t);
template void matmul_forward_f32_out<__nv_bfloat16>(float*, const __nv_bfloat16*, const __nv_bfloat16*, int64_t,
                                                    int64_t, int64_t, const Blas&, cudaStream_t);
template void matmul_forward_f32_out<__half>(float*, const __half*, const __half*, int64_t, int64_t, int64_t,
                                             const Blas&, cudaStream_t);

}  // namespace detail

template <typename scalar_t>
void matmul_forward(scalar_t* out, const scalar_t* inp, const scalar_t* weight, int64_t T, int64_t C, int64_t OC,
                    const Blas& blas, cudaStream_t stream, const MatmulOptions& opt) {
  const int64_t ld_out = opt.ld_out != 0 ? opt.ld_out : OC;
  LT_CHECK(ld_out >= OC, "matmul_forward: ld_out < OC");
  const cudaDataType_t t = dtype_of<scalar_t>();
  // out^T (OC, T; ld_out) = op_T(W stored C x OC, ld C) @ inp^T (C x T, ld C) [+ residual^T]
  const detail::GemmSpec s{t, t, true, false, OC, T, C, C, C, ld_out};
  detail::lt_gemm(s, weight, inp, opt.residual != nullptr ? 1.0f : 0.0f, opt.residual, out, blas, stream);
}

template <typename scalar_t>
void matmul_backward(scalar_t* dinp, float* dweight, const scalar_t* dout, const scalar_t* inp,
                     const scalar_t* weight, int64_t T, int64_t C, int64_t OC, const Blas& blas,
                     cudaStream_t stream, const MatmulOptions& opt) {
  const int64_t ld_dout = opt.ld_out != 0 ? opt.ld_out : OC;
  LT_CHECK(ld_dout >= OC, "matmul_backward: ld_out < OC");
  const cudaDataType_t t = dtype_of<scalar_t>();
  if (dinp != nullptr) {
    // dinp^T (C, T; ld C) = W (stored C x OC, ld C) @ dout^T (stored OC x T, ld ld_dout)
    const detail::GemmSpec s{t, t, false, false, C, T, OC, C, ld_dout, C};
    detail::lt_gemm(s, weight, dout, opt.accumulate_dinp ? 1.0f : 0.0f, dinp, dinp, blas, stream);
  }
  if (dweight != nullptr) {
    // dW^T (C, OC; ld C) += inp^T (stored C x T, ld C) @ op_T(dout^T stored OC x T, ld ld_dout)
    const detail::GemmSpec s{t, CUDA_R_32F, false, true, C, OC, T, C, ld_dout, C};
    if (T == 0) return;  // nothing to add
    detail::lt_gemm(s, inp, dout, 1.0f, dweight, dweight, blas, stream);
  }
}

#define LONGTUNE_INSTANTIATE_MATMUL(S)                                                                            \
  template void matmul_forward<S>(S*, const S*, const S*, int64_t, int64_t, int64_t, const Blas&, cudaStream_t,   \
                                  const MatmulOptions&);                                                          \
  template void matmul_backward<S>(S*, float*, const S*, const S*, const S*, int64_t, int64_t, int64_t,           \
                                   const Blas&, cudaStream_t, const MatmulOptions&);
LONGTUNE_INSTANTIATE_MATMUL(float)
LONGTUNE_INSTANTIATE_MATMUL(__nv_bfloat16)
LONGTUNE_INSTANTIATE_MATMUL(__half)
#undef LONGTUNE_INSTANTIATE_MATMUL

}  // namespace longtune::cuda
