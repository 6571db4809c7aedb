// Rotary embedding on the GPU (kernels/cuda/rope.cuh).
//
// One thread per (token, group of kHeads heads, VEC consecutive pair indices i): it forms the VEC
// angles positions[t] * inv_freq[i] in fp32 exactly as kernels/cpu/rope.cpp does (one IEEE fp32
// multiply), takes sincosf once, and rotates the pairs (i, i + HD/2) of its heads. All the heads'
// elements are loaded before any is stored, so out may alias inp.
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/rope.cuh"
#include "kernels/cuda/storage_vec.cuh"

namespace longtune::cuda {

namespace {

using detail::aligned16;
using detail::kVec16;
using detail::store_f32;

constexpr int kThreads = 256;
constexpr int kHeads = 2;  // heads per thread (cos/sin reused across them)

// SIGN = +1: a' = a cos - b sin, b' = b cos + a sin ; SIGN = -1: rotation by -angle (the transpose).
template <typename T, int VEC, int SIGN>
__global__ void __launch_bounds__(kThreads, 4) rope_kernel(T* out, const T* inp, const int32_t* __restrict__ positions,
                                                        const float* __restrict__ inv_freq, int64_t T_, int64_t NH,
                                                        int64_t HD, int64_t ld) {
  const int64_t half = HD / 2;
  const int64_t nig = half / VEC;                      // vector groups along i
  const int64_t nhg = (NH + kHeads - 1) / kHeads;      // head groups
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T_ * nhg * nig) return;
  const int64_t ig = idx % nig;
  const int64_t rest = idx / nig;
  const int64_t hg = rest % nhg;
  const int64_t t = rest / nhg;
  const int64_t i0 = ig * VEC;
  const float pos = float(positions[t]);
  float cs[VEC], sn[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const float angle = __fmul_rn(pos, inv_freq[i0 + v]);  // fp32, as the CPU reference
    sincosf(angle, &sn[v], &cs[v]);
    if (SIGN < 0) sn[v] = -sn[v];
  }
  const int64_t h0 = hg * kHeads;
  detail::Pack<T, VEC> a[kHeads], b[kHeads];  // packed: fewer registers than fp32 copies
#pragma unroll
  for (int k = 0; k < kHeads; ++k) {
    if (h0 + k < NH) {
      const int64_t base = t * ld + (h0 + k) * HD + i0;
      a[k] = *reinterpret_cast<const detail::Pack<T, VEC>*>(inp + base);
      b[k] = *reinterpret_cast<const detail::Pack<T, VEC>*>(inp + base + half);
    }
  }
#pragma unroll
  for (int k = 0; k < kHeads; ++k) {
    if (h0 + k < NH) {
      const int64_t base = t * ld + (h0 + k) * HD + i0;
      float ra[VEC], rb[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float av = detail::to_f32(a[k].v[v]), bv = detail::to_f32(b[k].v[v]);
        ra[v] = av * cs[v] - bv * sn[v];
        rb[v] = bv * cs[v] + av * sn[v];
      }
      store_f32<T, VEC>(out + base, ra);
      store_f32<T, VEC>(out + base + half, rb);
    }
  }
}

template <typename T, int SIGN>
void rope_impl(T* out, const T* inp, const int32_t* positions, const float* inv_freq, int64_t T_, int64_t NH, int64_t HD,
               int64_t ld, cudaStream_t stream) {
  LT_CHECK(HD % 2 == 0, "rope: head dim must be even");
  if (ld == 0) ld = NH * HD;
  LT_CHECK(ld >= NH * HD, "rope: row stride smaller than NH * HD");
  if (T_ == 0 || NH == 0 || HD == 0) return;
  const int64_t half = HD / 2, nhg = (NH + kHeads - 1) / kHeads;
  constexpr int V = kVec16<T>;
  if (half % V == 0 && ld % V == 0 && aligned16(out) && aligned16(inp)) {
    const int64_t n = T_ * nhg * (half / V);
    rope_kernel<T, V, SIGN><<<unsigned((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(out, inp, positions, inv_freq,
                                                                                              T_, NH, HD, ld);
  } else {
    const int64_t n = T_ * nhg * half;
    rope_kernel<T, 1, SIGN><<<unsigned((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(out, inp, positions, inv_freq,
                                                                                              T_, NH, HD, ld);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace

template <typename scalar_t>
void rope_forward(scalar_t* out, const scalar_t* inp, const int32_t* positions, const float* inv_freq, int64_t T,
                  int64_t NH, int64_t HD, cudaStream_t stream, int64_t ld) {
  rope_impl<scalar_t, +1>(out, inp, positions, inv_freq, T, NH, HD, ld, stream);
}

template <typename scalar_t>
void rope_backward(scalar_t* dinp, const scalar_t* dout, const int32_t* positions, const float* inv_freq, int64_t T,
                   int64_t NH, int64_t HD, cudaStream_t stream, int64_t ld) {
  rope_impl<scalar_t, -1>(dinp, dout, positions, inv_freq, T, NH, HD, ld, stream);
}

#define LT_INSTANTIATE(T)                                                                                           \
  template void rope_forward<T>(T*, const T*, const int32_t*, const float*, int64_t, int64_t, int64_t, cudaStream_t, \
                                int64_t);                                                                           \
  template void rope_backward<T>(T*, const T*, const int32_t*, const float*, int64_t, int64_t, int64_t, cudaStream_t, \
                                 int64_t);
LT_INSTANTIATE(float)
LT_INSTANTIATE(__nv_bfloat16)
LT_INSTANTIATE(__half)
#undef LT_INSTANTIATE

}  // namespace longtune::cuda
