// SwiGLU on the GPU (kernels/cuda/swiglu.cuh). Elementwise: one thread per VEC elements of a row
// (16-byte accesses when F, the row stride and the pointers allow), fp32 math. Every thread loads its
// inputs before storing, so the gradients may overwrite gate/up in place.
#include <initializer_list>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/storage_vec.cuh"
#include "kernels/cuda/swiglu.cuh"

namespace longtune::cuda {

namespace {

using detail::aligned16;
using detail::kVec16;
using detail::load_f32;
using detail::store_f32;

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Block b covers row b / col_blocks, vectors [(b % col_blocks) * kThreads, ...) of it.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) swiglu_forward_kernel(T* __restrict__ out, const T* gate, const T* up, int64_t F,
                                                                  int64_t ld, unsigned col_blocks) {
  const int64_t row = blockIdx.x / col_blocks;
  const int64_t c = (int64_t(blockIdx.x % col_blocks) * kThreads + threadIdx.x) * VEC;
  if (c >= F) return;
  float g[VEC], u[VEC], y[VEC];
  load_f32<T, VEC>(g, gate + row * ld + c);
  load_f32<T, VEC>(u, up + row * ld + c);
#pragma unroll
  for (int i = 0; i < VEC; ++i) y[i] = g[i] * sigmoid(g[i]) * u[i];
  store_f32<T, VEC>(out + row * F + c, y);
}

// dgate = dout * up * s (1 + g (1 - s)), dup = dout * g * s, s = sigmoid(g)
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) swiglu_backward_kernel(T* dgate, T* dup, const T* dout, const T* gate, const T* up,
                                                                   int64_t F, int64_t ld, unsigned col_blocks) {
  const int64_t row = blockIdx.x / col_blocks;
  const int64_t c = (int64_t(blockIdx.x % col_blocks) * kThreads + threadIdx.x) * VEC;
  if (c >= F) return;
  float g[VEC], u[VEC], dy[VEC], dg[VEC], du[VEC];
  load_f32<T, VEC>(g, gate + row * ld + c);
  load_f32<T, VEC>(u, up + row * ld + c);
  load_f32<T, VEC>(dy, dout + row * F + c);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float s = sigmoid(g[i]);
    dg[i] = dy[i] * u[i] * (s + g[i] * s * (1.0f - s));
    du[i] = dy[i] * g[i] * s;
  }
  store_f32<T, VEC>(dgate + row * ld + c, dg);
  store_f32<T, VEC>(dup + row * ld + c, du);
}

template <typename T>
bool use_vec(int64_t F, int64_t ld, std::initializer_list<const void*> ptrs) {
  constexpr int V = kVec16<T>;
  if (F % V != 0 || ld % V != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

template <int VEC>
unsigned col_blocks_for(int64_t F) {
  return unsigned((F / VEC + kThreads - 1) / kThreads);
}

}  // namespace

template <typename scalar_t>
void swiglu_forward(scalar_t* out, const scalar_t* gate, const scalar_t* up, int64_t T, int64_t F, cudaStream_t stream,
                    int64_t ld_gate_up) {
  const int64_t ld = ld_gate_up == 0 ? F : ld_gate_up;
  LT_CHECK(ld >= F, "swiglu_forward: row stride smaller than F");
  if (T == 0 || F == 0) return;
  constexpr int V = kVec16<scalar_t>;
  if (use_vec<scalar_t>(F, ld, {out, gate, up})) {
    const unsigned cb = col_blocks_for<V>(F);
    LT_CHECK(T * cb < (int64_t(1) << 31), "swiglu_forward: too many rows");
    swiglu_forward_kernel<scalar_t, V><<<unsigned(T * cb), kThreads, 0, stream>>>(out, gate, up, F, ld, cb);
  } else {
    const unsigned cb = col_blocks_for<1>(F);
    LT_CHECK(T * cb < (int64_t(1) << 31), "swiglu_forward: too many rows");
    swiglu_forward_kernel<scalar_t, 1><<<unsigned(T * cb), kThreads, 0, stream>>>(out, gate, up, F, ld, cb);
  }
  CUDA_CHECK_LAUNCH();
}

template <typename scalar_t>
void swiglu_backward(scalar_t* dgate, scalar_t* dup, const scalar_t* dout, const scalar_t* gate, const scalar_t* up, int64_t T,
                     int64_t F, cudaStream_t stream, int64_t ld_gate_up) {
  const int64_t ld = ld_gate_up == 0 ? F : ld_gate_up;
  LT_CHECK(ld >= F, "swiglu_backward: row stride smaller than F");
  if (T == 0 || F == 0) return;
  constexpr int V = kVec16<scalar_t>;
  if (use_vec<scalar_t>(F, ld, {dgate, dup, dout, gate, up})) {
    const unsigned cb = col_blocks_for<V>(F);
    LT_CHECK(T * cb < (int64_t(1) << 31), "swiglu_backward: too many rows");
    swiglu_backward_kernel<scalar_t, V><<<unsigned(T * cb), kThreads, 0, stream>>>(dgate, dup, dout, gate, up, F, ld, cb);
  } else {
    const unsigned cb = col_blocks_for<1>(F);
    LT_CHECK(T * cb < (int64_t(1) << 31), "swiglu_backward: too many rows");
    swiglu_backward_kernel<scalar_t, 1><<<unsigned(T * cb), kThreads, 0, stream>>>(dgate, dup, dout, gate, up, F, ld, cb);
  }
  CUDA_CHECK_LAUNCH();
}

#define LT_INSTANTIATE(T)                                                                                        \
  template void swiglu_forward<T>(T*, const T*, const T*, int64_t, int64_t, cudaStream_t, int64_t);             \
  template void swiglu_backward<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t, cudaStream_t, int64_t);
LT_INSTANTIATE(float)
LT_INSTANTIATE(__nv_bfloat16)
LT_INSTANTIATE(__half)
#undef LT_INSTANTIATE

}  // namespace longtune::cuda
