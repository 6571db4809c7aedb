// lm_head + cross-entropy, chunk by chunk (see linear_cross_entropy.cuh).
//
// Per chunk of Tc tokens:
//   1. logits (Tc, V) fp32 = hidden[chunk] @ W^T           cuBLASLt, storage-type A/B, fp32 D
//   2. one block per row: max and sum of exp in one online pass (fp32), loss = lse - logit[target];
//      forward_backward: second pass writes dlogits = scale * (softmax - onehot) in the storage type
//      (a zero row where target < 0)
//   3. dhidden[chunk] = dlogits @ W (assigned), dW += dlogits^T @ hidden[chunk] (fp32, beta = 1)
//      through matmul_backward.
// The (T, V) logits never exist; the scratch holds one chunk of fp32 logits plus one chunk of
// storage-type dlogits; the chunks are as few as fit, of balanced sizes (multiples of 64 tokens
// where possible). Results are bit-identical run to run for a given scratch size (the chunking decides
// the order in which dW sums its chunks).
//
// fp16 storage: dlogits in fp16 carry the loss scale, |dlogits| <= scale, so scale must stay below
// the fp16 maximum (65504); the smallest probabilities underflow to fp16 subnormals/zero exactly as
// any fp16 activation gradient does under loss scaling. bf16 has fp32's exponent range.
//
// Measured (H200, bf16, T=16384, C=2048, V=128256, 4 chunks of 4096): 42.3-43.5 ms for
// forward_backward, ~600 TFLOP/s effective (6TCV); per chunk the logits GEMM takes 3.3-3.5 ms, the
// dhidden+dW GEMMs 5.9-6.2 ms, the row kernel ~1.2 ms (at HBM bandwidth). Storing the logits in
// bf16 instead (half the row kernel's traffic, but every logit rounded to 8 bits before the
// softmax) measured 43.3 vs 43.5 ms: no gain worth the precision, so the logits stay fp32.
//
// A target >= V gives a NaN loss (and a NaN dlogits row) rather than reading out of bounds: the
// CPU reference throws there, a kernel cannot.
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/linear_cross_entropy.cuh"

namespace longtune::cuda {

namespace detail {
// Defined in matmul.cu: out (T, OC) fp32 = inp (T, C) @ weight (OC, C)^T, fp32 accumulation.
template <typename scalar_t>
void matmul_forward_f32_out(float* out, const scalar_t* inp, const scalar_t* weight, int64_t T, int64_t C, int64_t OC,
                            const Blas& blas, cudaStream_t stream);
}  // namespace detail

namespace {

constexpr int kThreads = 256;  // one block per token row
constexpr size_t kAlign = 256;

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

template <typename T> __device__ inline T from_float(float x);
template <> __device__ inline float from_float<float>(float x) { return x; }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Merges the running (max, sum of exp(x - max)) pair b into a.
__device__ inline void merge(float& m, float& s, float mb, float sb) {
  const float mn = fmaxf(m, mb);
  if (mn == -INFINITY) return;  // both empty
  s = s * expf(m - mn) + sb * expf(mb - mn);
  m = mn;
}

// (max, sum) over the block, merged in a fixed order; every thread gets the result.
__device__ void block_max_sum(float& m, float& s) {
  __shared__ float sm[kThreads / 32], ss[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    const float mo = __shfl_xor_sync(0xffffffffu, m, o), so = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, mo, so);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  m = sm[0];
  s = ss[0];
  for (int w = 1; w < kThreads / 32; ++w) merge(m, s, sm[w], ss[w]);
}

// One block per row of the chunk, fp32 logits; grad_t: the storage type of dlogits (unused without kBackward). kVec elements per access.
template <typename grad_t, bool kBackward, int kVec>
__global__ void __launch_bounds__(kThreads) cross_entropy_rows_kernel(float* losses, grad_t* dlogits,
                                                                      const float* logits, const int32_t* targets,
                                                                      float scale, int64_t V) {
  const int64_t row = blockIdx.x;
  const int32_t target = targets[row];
  const float* x = logits + row * V;
  const int64_t nvec = V / kVec;
  if (target < 0 || target >= V) {
    // Not a prediction target: loss 0, zero gradient. Out of range: NaN, so the bug surfaces.
    const float fill = target < 0 ? 0.0f : NAN;
    if (threadIdx.x == 0) losses[row] = fill;
    if constexpr (kBackward) {
      Pack<grad_t, kVec> p;
      for (int j = 0; j < kVec; ++j) p.v[j] = from_float<grad_t>(fill);
      auto* d = reinterpret_cast<Pack<grad_t, kVec>*>(dlogits + row * V);
      for (int64_t i = threadIdx.x; i < nvec; i += kThreads) d[i] = p;
    }
    return;
  }

  // Pass 1: online max / sum of exp.
  float m = -INFINITY, s = 0.0f;
  const auto* xv = reinterpret_cast<const Pack<float, kVec>*>(x);
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    const Pack<float, kVec> p = xv[i];
    float v[kVec];
    float lm = -INFINITY;
    for (int j = 0; j < kVec; ++j) {
      v[j] = p.v[j];
      lm = fmaxf(lm, v[j]);
    }
    float ls = 0.0f;
    for (int j = 0; j < kVec; ++j) ls += expf(v[j] - lm);
    merge(m, s, lm, ls);
  }
  block_max_sum(m, s);
  const float lse = m + logf(s);
  if (threadIdx.x == 0) losses[row] = lse - x[target];

  if constexpr (kBackward) {
    // Pass 2: dlogits = scale * (softmax - onehot).
    auto* d = reinterpret_cast<Pack<grad_t, kVec>*>(dlogits + row * V);
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      const Pack<float, kVec> p = xv[i];
      Pack<grad_t, kVec> q;
      for (int j = 0; j < kVec; ++j) {
        const float prob = expf(p.v[j] - lse);
        const float onehot = (i * kVec + j == target) ? 1.0f : 0.0f;
        q.v[j] = from_float<grad_t>(scale * (prob - onehot));
      }
      d[i] = q;
    }
  }
}

template <typename grad_t, bool kBackward>
void launch_rows(float* losses, grad_t* dlogits, const float* logits, const int32_t* targets, float scale,
                 int64_t rows, int64_t V, cudaStream_t stream) {
  if (rows == 0) return;
  const bool vec = V % 4 == 0 && reinterpret_cast<uintptr_t>(logits) % (4 * sizeof(float)) == 0 &&
                   (!kBackward || reinterpret_cast<uintptr_t>(dlogits) % (4 * sizeof(grad_t)) == 0);
  if (vec) {
    cross_entropy_rows_kernel<grad_t, kBackward, 4>
        <<<unsigned(rows), kThreads, 0, stream>>>(losses, dlogits, logits, targets, scale, V);
  } else {
    cross_entropy_rows_kernel<grad_t, kBackward, 1>
        <<<unsigned(rows), kThreads, 0, stream>>>(losses, dlogits, logits, targets, scale, V);
  }
  CUDA_CHECK_LAUNCH();
}

// Scratch, aligned: [logits (chunk, V) fp32][dlogits (chunk, V) scalar_t] with the largest chunk
// that fits (dlogits only when backward).
struct ChunkPlan {
  int64_t chunk;
  void* logits;
  void* dlogits;
};

ChunkPlan plan_chunks(void* scratch, size_t scratch_bytes, int64_t T, int64_t V, size_t grad_size) {
  const auto base = reinterpret_cast<uintptr_t>(scratch);
  const uintptr_t aligned = align_up(base, kAlign);
  LT_CHECK(scratch != nullptr && scratch_bytes > aligned - base, "linear_cross_entropy: no scratch");
  const size_t bytes = scratch_bytes - (aligned - base);
  const size_t logits_row = size_t(V) * sizeof(float), grad_row = size_t(V) * grad_size;
  // chunk * logits_row rounded up to kAlign, then chunk * grad_row.
  int64_t chunk = int64_t(bytes / (logits_row + grad_row));
  while (chunk > 0 && align_up(size_t(chunk) * logits_row, kAlign) + size_t(chunk) * grad_row > bytes) --chunk;
  LT_CHECK(chunk >= 1, "linear_cross_entropy: scratch smaller than one token's logits (see "
                       "linear_cross_entropy_scratch_bytes)");
  if (chunk >= T) {
    chunk = T;
  } else {
    // As few chunks as fit, of balanced sizes, a multiple of 64 tokens (GEMM tiles) where possible.
    const int64_t num_chunks = (T + chunk - 1) / chunk;
    const int64_t balanced = ((T + num_chunks - 1) / num_chunks + 63) / 64 * 64;
    if (balanced <= chunk) {
      chunk = balanced;
    } else if (chunk >= 64) {
      chunk -= chunk % 64;
    }
  }
  void* logits = reinterpret_cast<void*>(aligned);
  void* dlogits = reinterpret_cast<void*>(aligned + align_up(size_t(chunk) * logits_row, kAlign));
  return {chunk, logits, dlogits};
}

template <typename scalar_t>
void forward_impl(float* losses, const scalar_t* hidden, const scalar_t* weight, const int32_t* targets, int64_t T,
                  int64_t C, int64_t V, void* scratch, size_t scratch_bytes, const Blas& blas, cudaStream_t stream) {
  if (T == 0) return;
  const ChunkPlan cp = plan_chunks(scratch, scratch_bytes, T, V, 0);
  auto* logits = static_cast<float*>(cp.logits);
  for (int64_t t0 = 0; t0 < T; t0 += cp.chunk) {
    const int64_t n = cp.chunk < T - t0 ? cp.chunk : T - t0;
    detail::matmul_forward_f32_out(logits, hidden + t0 * C, weight, n, C, V, blas, stream);
    launch_rows<scalar_t, false>(losses + t0, nullptr, logits, targets + t0, 0.0f, n, V, stream);
  }
}

template <typename scalar_t>
void forward_backward_impl(float* losses, scalar_t* dhidden, float* dweight, const scalar_t* hidden,
                           const scalar_t* weight, const int32_t* targets, float scale, int64_t T, int64_t C,
                           int64_t V, void* scratch, size_t scratch_bytes, const Blas& blas, cudaStream_t stream) {
  if (T == 0) return;
  const ChunkPlan cp = plan_chunks(scratch, scratch_bytes, T, V, sizeof(scalar_t));
  auto* logits = static_cast<float*>(cp.logits);
  auto* dlogits = static_cast<scalar_t*>(cp.dlogits);
  for (int64_t t0 = 0; t0 < T; t0 += cp.chunk) {
    const int64_t n = cp.chunk < T - t0 ? cp.chunk : T - t0;
    detail::matmul_forward_f32_out(logits, hidden + t0 * C, weight, n, C, V, blas, stream);
    launch_rows<scalar_t, true>(losses + t0, dlogits, logits, targets + t0, scale, n, V, stream);
    matmul_backward(dhidden != nullptr ? dhidden + t0 * C : nullptr, dweight, dlogits, hidden + t0 * C, weight, n, C,
                    V, blas, stream);
  }
}

}  // namespace

size_t linear_cross_entropy_scratch_bytes(int64_t chunk_tokens, int64_t V) {
  // Enough for every storage type (float dlogits being the largest), plus alignment slack.
  const size_t n = size_t(chunk_tokens) * size_t(V);
  return kAlign + align_up(n * sizeof(float), kAlign) + n * sizeof(float);
}

template <typename scalar_t>
void linear_cross_entropy_forward(float* losses, const scalar_t* hidden, const scalar_t* weight,
                                  const int32_t* targets, int64_t T, int64_t C, int64_t V, void* scratch,
                                  size_t scratch_bytes, const Blas& blas, cudaStream_t stream) {
  forward_impl(losses, hidden, weight, targets, T, C, V, scratch, scratch_bytes, blas, stream);
}

template <typename scalar_t>
void linear_cross_entropy_forward_backward(float* losses, scalar_t* dhidden, float* dweight, const scalar_t* hidden,
                                           const scalar_t* weight, const int32_t* targets, float scale, int64_t T,
                                           int64_t C, int64_t V, void* scratch, size_t scratch_bytes,
                                           const Blas& blas, cudaStream_t stream) {
  forward_backward_impl(losses, dhidden, dweight, hidden, weight, targets, scale, T, C, V, scratch,
                               scratch_bytes, blas, stream);
}

#define LONGTUNE_INSTANTIATE_LCE(S)                                                                                \
  template void linear_cross_entropy_forward<S>(float*, const S*, const S*, const int32_t*, int64_t, int64_t,     \
                                                int64_t, void*, size_t, const Blas&, cudaStream_t);               \
  template void linear_cross_entropy_forward_backward<S>(float*, S*, float*, const S*, const S*, const int32_t*,  \
                                                         float, int64_t, int64_t, int64_t, void*, size_t,          \
                                                         const Blas&, cudaStream_t);
LONGTUNE_INSTANTIATE_LCE(float)
LONGTUNE_INSTANTIATE_LCE(__nv_bfloat16)
LONGTUNE_INSTANTIATE_LCE(__half)
#undef LONGTUNE_INSTANTIATE_LCE

}  // namespace longtune::cuda
