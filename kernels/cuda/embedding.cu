// Token embedding on the GPU (kernels/cuda/embedding.cuh).
//
// Backward, deterministic without float atomics:
//  1. The token positions are sorted by id, stably (CUB radix sort of (id, t) pairs), so the
//     rows of one id form a segment in increasing t.
//  2. The sorted positions are cut into fixed chunks of R positions (R depends on C only). One
//     block per (chunk, column slice) walks its chunk in order, summing rows in fp32. A segment
//     that lies entirely inside the chunk is added to dwte directly (no other block touches that
//     row); the at most two pieces of segments crossing a chunk boundary go to a partial buffer.
//  3. One block per (crossing segment, column slice) adds its pieces in chunk order (double) and
//     then adds the sum to dwte.
// Every sum has a fixed order that depends only on (tokens, T, C): bit-identical on every run.
// Token ids must lie in [0, V); they are not checked on the device.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/storage_vec.cuh"

namespace longtune::cuda {

namespace {

using detail::aligned16;
using detail::kVec16;
using detail::load_f32;
using detail::Pack;

constexpr int kFwdThreads = 128;
constexpr int kBwdThreads = 64;
constexpr int kUnroll = 4;                 // sorted rows loaded ahead in the chunk kernel
constexpr int64_t kPartialFloatsPerToken = 64;  // partial buffer: 64 * T floats

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

// ---- forward ---------------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void embedding_forward_kernel(T* __restrict__ out, const int32_t* __restrict__ tokens,
                                         const T* __restrict__ wte, int64_t C) {
  const int64_t t = blockIdx.x;
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;
  const int64_t id = tokens[t];
  *reinterpret_cast<Pack<T, VEC>*>(out + t * C + c) = *reinterpret_cast<const Pack<T, VEC>*>(wte + id * C + c);
}

// ---- backward --------------------------------------------------------------------------------

__global__ void iota_kernel(int32_t* x, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = int32_t(i);
}

// fp32 row pieces of VEC elements, 16-byte accesses when VEC is a multiple of 4.
template <int VEC>
__device__ __forceinline__ void load_row(float (&dst)[VEC], const float* src) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      const float4 d = *reinterpret_cast<const float4*>(src + j);
      dst[j] = d.x;
      dst[j + 1] = d.y;
      dst[j + 2] = d.z;
      dst[j + 3] = d.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) dst[j] = src[j];
  }
}

template <int VEC>
__device__ __forceinline__ void store_row(float* dst, const float (&src)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4)
      *reinterpret_cast<float4*>(dst + j) = make_float4(src[j], src[j + 1], src[j + 2], src[j + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) dst[j] = src[j];
  }
}

// Chunk k = sorted positions [k R, min((k+1) R, T)). partial slot (2k + 1): the piece of the segment
// crossing the chunk's end; slot 2k: the piece of the segment crossing its start (when that piece is
// not also the last one).
template <typename T, int VEC>
__global__ void __launch_bounds__(kBwdThreads) embedding_backward_chunk_kernel(
    float* __restrict__ dwte, float* __restrict__ partial, const T* __restrict__ dout, const int32_t* __restrict__ sid,
    const int32_t* __restrict__ st, int64_t T_, int64_t C, int64_t R) {
  const int64_t k = blockIdx.x;
  const int64_t lo = k * R, hi = min(lo + R, T_);
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;  // no block-wide synchronization below
  const bool head_spans = lo > 0 && sid[lo - 1] == sid[lo];
  const bool tail_spans = hi < T_ && sid[hi] == sid[hi - 1];
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
  bool first_piece = true;
  for (int64_t i = lo; i < hi; i += kUnroll) {
    int32_t ids[kUnroll + 1];
    Pack<T, VEC> rows[kUnroll];
#pragma unroll
    for (int u = 0; u <= kUnroll; ++u) ids[u] = (i + u < hi) ? sid[i + u] : -1;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u < hi) rows[u] = *reinterpret_cast<const Pack<T, VEC>*>(dout + int64_t(st[i + u]) * C + c);
    // The dwte rows of the pieces ending in this window, loaded together with dout: only this block
    // writes a row whose segment lies inside the chunk, so the value cannot change before the flush.
    float pre[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u < hi && ids[u + 1] != ids[u]) load_row<VEC>(pre[u], dwte + int64_t(ids[u]) * C + c);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u >= hi) break;
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += detail::to_f32(rows[u].v[j]);
      if (ids[u + 1] != ids[u]) {  // the segment's piece in this chunk ends here
        const bool last_piece = i + u + 1 == hi;
        if (last_piece && tail_spans) {
          store_row<VEC>(partial + (2 * k + 1) * C + c, acc);
        } else if (first_piece && head_spans) {
          store_row<VEC>(partial + (2 * k) * C + c, acc);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) pre[u][j] += acc[j];
          store_row<VEC>(dwte + int64_t(ids[u]) * C + c, pre[u]);
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
        first_piece = false;
      }
    }
  }
}

// One block per chunk k0 in which a boundary-crossing segment starts: sums its pieces in chunk order.
template <int VEC>
__global__ void __launch_bounds__(kBwdThreads) embedding_backward_combine_kernel(
    float* __restrict__ dwte, const float* __restrict__ partial, const int32_t* __restrict__ sid, int64_t T_, int64_t C,
    int64_t R) {
  const int64_t k0 = blockIdx.x;
  const int64_t lo = k0 * R, hi = min(lo + R, T_);
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;
  if (!(hi < T_ && sid[hi] == sid[hi - 1])) return;  // nothing crosses this chunk's end
  const int32_t id = sid[hi - 1];
  if (lo > 0 && sid[lo - 1] == id) return;  // the crossing segment started in an earlier chunk
  double acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = partial[(2 * k0 + 1) * C + c + j];
  for (int64_t k = k0 + 1;; ++k) {
    const int64_t hk = min((k + 1) * R, T_);
    const bool whole = hk < T_ && sid[hk] == id;  // the segment also crosses chunk k's end
    const float* p = partial + (2 * k + (whole ? 1 : 0)) * C + c;
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] += p[j];
    if (!whole) break;
  }
  float* d = dwte + int64_t(id) * C + c;
#pragma unroll
  for (int j = 0; j < VEC; ++j) d[j] += float(acc[j]);
}

struct ScratchLayout {
  size_t keys_out, vals_in, vals_out, partial, cub, cub_bytes, total;
};

ScratchLayout scratch_layout(int64_t T) {
  ScratchLayout s{};
  const size_t ints = align_up(size_t(T) * sizeof(int32_t));
  s.keys_out = 0;
  s.vals_in = s.keys_out + ints;
  s.vals_out = s.vals_in + ints;
  s.partial = s.vals_out + ints;
  s.cub = s.partial + align_up(size_t(T) * size_t(kPartialFloatsPerToken) * sizeof(float));
  size_t cub_bytes = 0;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    // Planning on a machine without a GPU (`longtune plan` on a login node, CI): CUB's query needs
    // a device. Its temporary storage here is only the per-pass digit histograms and tile
    // look-back state (the key/value buffers are ours): bounded generously.
    cudaGetLastError();
    cub_bytes = (size_t(1) << 20) + 2 * size_t(std::max<int64_t>(T, 1));
  } else {
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const int32_t*>(nullptr),
                                               static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                               static_cast<int32_t*>(nullptr), int(std::max<int64_t>(T, 1))));
  }
  s.cub_bytes = cub_bytes;
  s.total = s.cub + align_up(cub_bytes);
  return s;
}

// Rows per chunk: the smallest power of two >= 16 with 2 * num_chunks * C <= 64 T (the partial
// buffer); a single chunk needs no partials.
int64_t chunk_rows(int64_t T, int64_t C) {
  int64_t R = 16;
  while (R < T && 2 * ((T + R - 1) / R) * C > kPartialFloatsPerToken * T) R *= 2;
  return R;
}

template <typename T, int VEC>
void backward_launch(float* dwte, const T* dout, const int32_t* sid, const int32_t* st, float* partial, int64_t T_,
                     int64_t C, cudaStream_t stream) {
  const int64_t R = chunk_rows(T_, C);
  const int64_t chunks = (T_ + R - 1) / R;
  const int64_t per_block = int64_t(kBwdThreads) * VEC;
  const dim3 grid(unsigned(chunks), unsigned((C + per_block - 1) / per_block));
  embedding_backward_chunk_kernel<T, VEC><<<grid, kBwdThreads, 0, stream>>>(dwte, partial, dout, sid, st, T_, C, R);
  CUDA_CHECK_LAUNCH();
  if (chunks > 1) {
    embedding_backward_combine_kernel<VEC><<<grid, kBwdThreads, 0, stream>>>(dwte, partial, sid, T_, C, R);
    CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

template <typename scalar_t>
void embedding_forward(scalar_t* out, const int32_t* tokens, const scalar_t* wte, int64_t T, int64_t C,
                       cudaStream_t stream) {
  if (T == 0 || C == 0) return;
  constexpr int V = kVec16<scalar_t>;
  if (C % V == 0 && aligned16(out) && aligned16(wte)) {
    const int64_t per_block = int64_t(kFwdThreads) * V;
    const dim3 grid(unsigned(T), unsigned((C + per_block - 1) / per_block));
    embedding_forward_kernel<scalar_t, V><<<grid, kFwdThreads, 0, stream>>>(out, tokens, wte, C);
  } else {
    const dim3 grid(unsigned(T), unsigned((C + kFwdThreads - 1) / kFwdThreads));
    embedding_forward_kernel<scalar_t, 1><<<grid, kFwdThreads, 0, stream>>>(out, tokens, wte, C);
  }
  CUDA_CHECK_LAUNCH();
}

size_t embedding_backward_scratch_bytes(int64_t T) { return scratch_layout(T).total; }

template <typename scalar_t>
void embedding_backward(float* dwte, const scalar_t* dout, const int32_t* tokens, int64_t T, int64_t C, void* scratch,
                        cudaStream_t stream) {
  if (T == 0 || C == 0) return;
  LT_CHECK(T <= int64_t(INT32_MAX), "embedding_backward: T must fit in int32");
  const ScratchLayout s = scratch_layout(T);
  char* base = static_cast<char*>(scratch);
  auto* keys_out = reinterpret_cast<int32_t*>(base + s.keys_out);
  auto* vals_in = reinterpret_cast<int32_t*>(base + s.vals_in);
  auto* vals_out = reinterpret_cast<int32_t*>(base + s.vals_out);
  auto* partial = reinterpret_cast<float*>(base + s.partial);
  iota_kernel<<<unsigned((T + 255) / 256), 256, 0, stream>>>(vals_in, T);
  CUDA_CHECK_LAUNCH();
  size_t cub_bytes = s.cub_bytes;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(base + s.cub, cub_bytes, tokens, keys_out, vals_in, vals_out, int(T), 0,
                                             int(sizeof(int32_t) * 8), stream));
  constexpr int V = kVec16<scalar_t>;  // 4 or 8: dwte rows are touched with float4 accesses
  if (C % V == 0 && aligned16(dout) && aligned16(dwte))
    backward_launch<scalar_t, V>(dwte, dout, keys_out, vals_out, partial, T, C, stream);
  else
    backward_launch<scalar_t, 1>(dwte, dout, keys_out, vals_out, partial, T, C, stream);
}

#define LT_INSTANTIATE(T)                                                                                         \
  template void embedding_forward<T>(T*, const int32_t*, const T*, int64_t, int64_t, cudaStream_t);              \
  template void embedding_backward<T>(float*, const T*, const int32_t*, int64_t, int64_t, void*, cudaStream_t);
LT_INSTANTIATE(float)
LT_INSTANTIATE(__nv_bfloat16)
LT_INSTANTIATE(__half)
#undef LT_INSTANTIATE

}  // namespace longtune::cuda
