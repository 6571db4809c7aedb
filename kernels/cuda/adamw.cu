// AdamW and the deterministic reductions on the GPU (kernels/cuda/adamw.cuh).
//
// adamw_update: elementwise, with exactly the operations of src/optim/adamw.cpp's adamw_element()
// in the same order, each an explicitly rounded IEEE fp32 operation (__fmul_rn, __fadd_rn, __fsub_rn,
// __fdiv_rn, __fsqrt_rn: nvcc cannot contract them to FMA), and the compute copy rounded by the same
// integer formulas as src/common/dtype.*: a GPU step equals a CPU step bit for bit. Every block walks
// the ranges (staged in shared memory); the float4 units of a range are spread over the grid starting
// at a block that depends on the range's offset, so many small ranges do not pile up on block 0.
//
// grad_norm_sq / sum_deterministic: the flat index space [0, total) is cut into G contiguous regions,
// G = min(kMaxBlocks, ceil(total / kChunk)) fixed by the sizes (not the GPU); block b sums the range
// elements inside region b. Each thread sums its elements in double in a fixed order, the block adds
// its threads in a fixed tree, and one final block adds the G partials in a fixed tree: the same
// inputs give the same bits on every run and every GPU. Range elements at or past `total` are not
// seen: total must cover every range (the flat length, padding included).
#include <algorithm>

#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/cuda_check.cuh"

namespace longtune::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 2048;        // reduction: elements per block per step (8 loads per thread)
constexpr int kMaxBlocks = 1024;    // reduction blocks (= partials)
constexpr int kRangeBatch = 256;    // ranges staged in shared memory at a time

enum OutKind { kOutNone = 0, kOutBF16 = 1, kOutF16 = 2 };

// src/common/dtype.hpp float_to_bf16, bit for bit (NaN stays a quiet NaN with its payload).
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return uint16_t((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

// src/common/dtype.cpp float_to_fp16, bit for bit.
__device__ __forceinline__ uint16_t f32_to_fp16_bits(float f) {
  const uint32_t bits = __float_as_uint(f);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);
  if (abs < 0x38800000u) {  // fp16 subnormal: |x| * 2^24 is exact, then round to nearest even
    const uint32_t m = __float2uint_rn(__fmul_rn(__uint_as_float(abs), 16777216.0f));
    return uint16_t(sign | m);
  }
  const uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u);
  return uint16_t(sign | ((r - 0x38000000u) >> 13));
}

template <int OUT>
__device__ __forceinline__ uint16_t to_out(float p) {
  if constexpr (OUT == kOutBF16) return f32_to_bf16_bits(p);
  else return f32_to_fp16_bits(p);
}

// Scalars of one update in the form the element update uses.
struct Coef {
  float gcoef, wdf_decay, w1, b2, omb2, bc2s, eps, neg_step;
};

// adamw_element() of src/optim/adamw.cpp.
__device__ __forceinline__ void adamw_element(float& p, float& m, float& v, float g, const Coef& c, float wdf) {
  g = __fmul_rn(g, c.gcoef);
  p = __fmul_rn(p, wdf);
  m = __fadd_rn(m, __fmul_rn(c.w1, __fsub_rn(g, m)));
  v = __fadd_rn(__fmul_rn(v, c.b2), __fmul_rn(__fmul_rn(c.omb2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), c.bc2s), c.eps);
  p = __fadd_rn(p, __fdiv_rn(__fmul_rn(c.neg_step, m), denom));
}

// VEC4: every base pointer is 16-byte aligned (compute 8-byte), so units of 4 elements starting at a
// multiple of 4 can be moved with vector accesses.
template <int OUT, bool VEC4>
__global__ void __launch_bounds__(kThreads) adamw_update_kernel(float* __restrict__ master, float* __restrict__ exp_avg,
                                                                float* __restrict__ exp_avg_sq, const float* __restrict__ grad,
                                                                uint16_t* __restrict__ compute,
                                                                const DeviceOptimRange* __restrict__ ranges,
                                                                int64_t num_ranges, Coef c) {
  __shared__ DeviceOptimRange sr[kRangeBatch];
  const int64_t nthreads = int64_t(gridDim.x) * kThreads;
  for (int64_t r0 = 0; r0 < num_ranges; r0 += kRangeBatch) {
    const int nb = int(min(int64_t(kRangeBatch), num_ranges - r0));
    __syncthreads();
    if (threadIdx.x < nb) sr[threadIdx.x] = ranges[r0 + threadIdx.x];
    __syncthreads();
    for (int j = 0; j < nb; ++j) {
      const int64_t off = sr[j].offset, n = sr[j].numel;
      if (n <= 0) continue;
      const float wdf = sr[j].decay ? c.wdf_decay : 1.0f;
      // This thread's position in the grid, rotated so the range starts at block (off / 1024) mod grid.
      const int64_t rot = (off / (4 * kThreads)) % gridDim.x;
      const int64_t gt = ((int64_t(blockIdx.x) - rot + gridDim.x) % gridDim.x) * kThreads + threadIdx.x;
      int64_t head = 0, units = 0;
      if constexpr (VEC4) {
        head = min(n, int64_t((4 - (off & 3)) & 3));
        units = (n - head) / 4;
      }
      const int64_t tail_begin = head + 4 * units;
      for (int64_t u = gt; u < units; u += nthreads) {
        const int64_t e = off + head + 4 * u;
        float4 p = *reinterpret_cast<const float4*>(master + e);
        float4 m = *reinterpret_cast<const float4*>(exp_avg + e);
        float4 v = *reinterpret_cast<const float4*>(exp_avg_sq + e);
        const float4 g = *reinterpret_cast<const float4*>(grad + e);
        adamw_element(p.x, m.x, v.x, g.x, c, wdf);
        adamw_element(p.y, m.y, v.y, g.y, c, wdf);
        adamw_element(p.z, m.z, v.z, g.z, c, wdf);
        adamw_element(p.w, m.w, v.w, g.w, c, wdf);
        *reinterpret_cast<float4*>(master + e) = p;
        *reinterpret_cast<float4*>(exp_avg + e) = m;
        *reinterpret_cast<float4*>(exp_avg_sq + e) = v;
        if constexpr (OUT != kOutNone) {
          const uint2 h = make_uint2(uint32_t(to_out<OUT>(p.x)) | (uint32_t(to_out<OUT>(p.y)) << 16),
                                     uint32_t(to_out<OUT>(p.z)) | (uint32_t(to_out<OUT>(p.w)) << 16));
          *reinterpret_cast<uint2*>(compute + e) = h;
        }
      }
      // Scalar elements: the unaligned head and the tail (all of the range without VEC4).
      const int64_t scalars = head + (n - tail_begin);
      for (int64_t s = gt; s < scalars; s += nthreads) {
        const int64_t e = off + (s < head ? s : tail_begin + (s - head));
        float p = master[e], m = exp_avg[e], v = exp_avg_sq[e];
        adamw_element(p, m, v, grad[e], c, wdf);
        master[e] = p;
        exp_avg[e] = m;
        exp_avg_sq[e] = v;
        if constexpr (OUT != kOutNone) compute[e] = to_out<OUT>(p);
      }
    }
  }
}

// ---- deterministic reductions --------------------------------------------------------------------

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Fixed-tree block sum (result valid in thread 0).
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double sh[kThreads / 32];
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += sh[w];
  return total;
}

// partial[b] = sum over the elements of the ranges inside block b's flat region [b span, (b+1) span),
// of x^2 (SQUARE) or x, in double; flags[b] = any of them non-finite. ranges == nullptr: one range
// [0, n). Each block streams its region's pieces range by range; thread t takes the elements
// t, t + 256, ... of a piece, 8 loads in flight, in a fixed order.
template <bool SQUARE>
__global__ void __launch_bounds__(kThreads) reduce_partial_kernel(double* __restrict__ partial, int32_t* __restrict__ flags,
                                                                  const float* __restrict__ x,
                                                                  const DeviceOptimRange* __restrict__ ranges,
                                                                  int64_t num_ranges, int64_t n, int64_t span) {
  __shared__ DeviceOptimRange sr[kRangeBatch];
  constexpr int kLoads = kChunk / kThreads;
  const int64_t b = blockIdx.x;
  const int64_t lo = b * span, hi = min(lo + span, n);
  double acc = 0.0;
  bool bad = false;
  for (int64_t r0 = 0; r0 < num_ranges; r0 += kRangeBatch) {
    const int nb = int(min(int64_t(kRangeBatch), num_ranges - r0));
    __syncthreads();
    if (threadIdx.x < nb) sr[threadIdx.x] = ranges ? ranges[r0 + threadIdx.x] : DeviceOptimRange{0, n, 0};
    __syncthreads();
    for (int j = 0; j < nb; ++j) {
      const int64_t a = max(sr[j].offset, lo), e = min(sr[j].offset + sr[j].numel, hi);
      for (int64_t i = a + threadIdx.x; i < e; i += kChunk) {
        float vals[kLoads];
#pragma unroll
        for (int k = 0; k < kLoads; ++k) {
          const int64_t idx = i + int64_t(k) * kThreads;
          vals[k] = idx < e ? x[idx] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kLoads; ++k) {
          bad |= (__float_as_uint(vals[k]) & 0x7f800000u) == 0x7f800000u;
          const double d = vals[k];
          acc = SQUARE ? fma(d, d, acc) : acc + d;  // d * d is exact in double: one rounding, as the CPU
        }
      }
    }
  }
  const int any_bad = __syncthreads_or(bad ? 1 : 0);
  const double total = block_sum(acc);
  if (threadIdx.x == 0) {
    partial[b] = total;
    flags[b] = any_bad;
  }
}

__global__ void __launch_bounds__(kThreads) reduce_final_kernel(double* __restrict__ out, int32_t* __restrict__ out_flag,
                                                                const double* __restrict__ partial,
                                                                const int32_t* __restrict__ flags, int G) {
  double acc = 0.0;
  int bad = 0;
  for (int i = threadIdx.x; i < G; i += kThreads) {
    acc += partial[i];
    bad |= flags[i];
  }
  const int any_bad = __syncthreads_or(bad);
  const double total = block_sum(acc);
  if (threadIdx.x == 0) {
    *out = total;
    if (out_flag) *out_flag = any_bad ? 1 : 0;
  }
}

int reduce_blocks(int64_t total) {
  return int(std::clamp<int64_t>((total + kChunk - 1) / kChunk, 1, kMaxBlocks));
}

template <bool SQUARE>
void reduce(double* out, int32_t* out_flag, const float* x, const DeviceOptimRange* ranges, int64_t num_ranges,
            int64_t total, void* scratch, cudaStream_t stream) {
  const int G = reduce_blocks(total);
  const int64_t span = (total + G - 1) / G;
  auto* partial = static_cast<double*>(scratch);
  auto* flags = reinterpret_cast<int32_t*>(partial + kMaxBlocks);
  if (num_ranges > 0) {
    reduce_partial_kernel<SQUARE><<<G, kThreads, 0, stream>>>(partial, flags, x, ranges, num_ranges, total, span);
    CUDA_CHECK_LAUNCH();
  } else {
    CUDA_CHECK(cudaMemsetAsync(scratch, 0, adamw_reduce_scratch_bytes(total), stream));
  }
  reduce_final_kernel<<<1, kThreads, 0, stream>>>(out, out_flag, partial, flags, G);
  CUDA_CHECK_LAUNCH();
}

// ---- convert_f32, convert_to_f32 ---------------------------------------------------------------

template <int OUT>
__global__ void convert_kernel(uint16_t* __restrict__ out, const float* __restrict__ inp, int64_t n, bool vec4) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec4) {
    const int64_t units = n / 4;
    for (int64_t u = t; u < units; u += stride) {
      const float4 p = *reinterpret_cast<const float4*>(inp + 4 * u);
      *reinterpret_cast<uint2*>(out + 4 * u) = make_uint2(uint32_t(to_out<OUT>(p.x)) | (uint32_t(to_out<OUT>(p.y)) << 16),
                                                          uint32_t(to_out<OUT>(p.z)) | (uint32_t(to_out<OUT>(p.w)) << 16));
    }
    done = units * 4;
  }
  for (int64_t i = done + t; i < n; i += stride) out[i] = to_out<OUT>(inp[i]);
}

// src/common/dtype.hpp bf16_to_float and dtype.cpp fp16_to_float, bit for bit.
template <DType IN>
__device__ __forceinline__ float widen(uint16_t h) {
  if constexpr (IN == DType::BF16) {
    return __uint_as_float(uint32_t(h) << 16);
  } else {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact
      const float f = __fmul_rn(__uint2float_rn(mant), 5.9604644775390625e-8f);
      return sign ? -f : f;
    }
    if (exp == 31) return __uint_as_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
    return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
  }
}

template <DType IN>
__global__ void widen_kernel(float* __restrict__ out, const uint16_t* __restrict__ inp, int64_t n, bool vec4) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec4) {
    const int64_t units = n / 4;
    for (int64_t u = t; u < units; u += stride) {
      const uint2 h = *reinterpret_cast<const uint2*>(inp + 4 * u);
      *reinterpret_cast<float4*>(out + 4 * u) = make_float4(widen<IN>(uint16_t(h.x)), widen<IN>(uint16_t(h.x >> 16)),
                                                            widen<IN>(uint16_t(h.y)), widen<IN>(uint16_t(h.y >> 16)));
    }
    done = units * 4;
  }
  for (int64_t i = done + t; i < n; i += stride) out[i] = widen<IN>(inp[i]);
}

int grid_for(int64_t work_units) {
  int dev = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t want = (work_units + kThreads - 1) / kThreads;
  return int(std::clamp<int64_t>(want, 1, int64_t(sms) * 8));
}

bool aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

}  // namespace

size_t adamw_reduce_scratch_bytes(int64_t /*total_elements*/) {
  return size_t(kMaxBlocks) * (sizeof(double) + sizeof(int32_t));
}

void grad_norm_sq(double* out_sum, int32_t* out_nonfinite, const float* grad, const DeviceOptimRange* ranges,
                  int64_t num_ranges, int64_t total_elements, void* scratch, cudaStream_t stream) {
  reduce<true>(out_sum, out_nonfinite, grad, ranges, num_ranges, total_elements, scratch, stream);
}

void sum_deterministic(double* out, const float* x, int64_t n, void* scratch, cudaStream_t stream) {
  reduce<false>(out, nullptr, x, nullptr, n > 0 ? 1 : 0, n, scratch, stream);
}

void adamw_update(float* master, float* exp_avg, float* exp_avg_sq, const float* grad, uint16_t* compute,
                  DType compute_dtype, const DeviceOptimRange* ranges, int64_t num_ranges, const AdamWScalars& s,
                  cudaStream_t stream) {
  LT_CHECK(!compute || compute_dtype == DType::BF16 || compute_dtype == DType::F16,
           "adamw_update: the compute copy must be BF16 or F16");
  LT_CHECK(s.decay_factor > 0.0f, "adamw_update: AdamWScalars.decay_factor not set (fill it from adamw_step_scalars)");
  if (num_ranges <= 0) return;
  const Coef c{s.grad_coef, s.decay_factor, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.sqrt_bc2, s.eps, -s.step_size};
  const bool vec4 = aligned(master, 16) && aligned(exp_avg, 16) && aligned(exp_avg_sq, 16) && aligned(grad, 16) &&
                    (!compute || aligned(compute, 8));
  // Enough blocks to fill the GPU; the element results do not depend on the grid.
  const int grid = grid_for(int64_t(1) << 40);
  const int out = !compute ? kOutNone : compute_dtype == DType::F16 ? kOutF16 : kOutBF16;
#define LT_LAUNCH(O, V) \
  adamw_update_kernel<O, V><<<grid, kThreads, 0, stream>>>(master, exp_avg, exp_avg_sq, grad, compute, ranges, num_ranges, c)
  if (vec4) {
    if (out == kOutNone) LT_LAUNCH(kOutNone, true);
    else if (out == kOutBF16) LT_LAUNCH(kOutBF16, true);
    else LT_LAUNCH(kOutF16, true);
  } else {
    if (out == kOutNone) LT_LAUNCH(kOutNone, false);
    else if (out == kOutBF16) LT_LAUNCH(kOutBF16, false);
    else LT_LAUNCH(kOutF16, false);
  }
#undef LT_LAUNCH
  CUDA_CHECK_LAUNCH();
}

void convert_f32(uint16_t* out, DType out_dtype, const float* inp, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  if (out_dtype == DType::F32) {
    CUDA_CHECK(cudaMemcpyAsync(out, inp, size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, stream));
    return;
  }
  LT_CHECK(out_dtype == DType::BF16 || out_dtype == DType::F16, "convert_f32: output must be BF16, F16 or F32");
  const bool vec4 = aligned(inp, 16) && aligned(out, 8);
  const int grid = grid_for(vec4 ? (n + 3) / 4 : n);
  if (out_dtype == DType::BF16) convert_kernel<kOutBF16><<<grid, kThreads, 0, stream>>>(out, inp, n, vec4);
  else convert_kernel<kOutF16><<<grid, kThreads, 0, stream>>>(out, inp, n, vec4);
  CUDA_CHECK_LAUNCH();
}

void convert_to_f32(float* out, const uint16_t* inp, DType inp_dtype, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  if (inp_dtype == DType::F32) {
    CUDA_CHECK(cudaMemcpyAsync(out, inp, size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, stream));
    return;
  }
  LT_CHECK(inp_dtype == DType::BF16 || inp_dtype == DType::F16, "convert_to_f32: input must be BF16, F16 or F32");
  const bool vec4 = aligned(inp, 8) && aligned(out, 16);
  const int grid = grid_for(vec4 ? (n + 3) / 4 : n);
  if (inp_dtype == DType::BF16) widen_kernel<DType::BF16><<<grid, kThreads, 0, stream>>>(out, inp, n, vec4);
  else widen_kernel<DType::F16><<<grid, kThreads, 0, stream>>>(out, inp, n, vec4);
  CUDA_CHECK_LAUNCH();
}

// ---- accumulate_f32 ----------------------------------------------------------------------------

__global__ void accumulate_kernel(float* __restrict__ acc, const float* __restrict__ x, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) acc[i] += x[i];
}

void accumulate_f32(float* acc, const float* x, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  accumulate_kernel<<<grid_for(n), kThreads, 0, stream>>>(acc, x, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace longtune::cuda
