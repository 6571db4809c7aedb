// Internal to attention_forward.cu / attention_backward.cu: warp-level matrix primitives (mma.sync,
// ldmatrix, cp.async), tile loaders, kernel parameters and the host-side kernel choice.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A 16x16 row-major : a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B 16x8  col-major : b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   C 16x8            : c0 c1 (g, 2t..2t+1)  c2 c3 (g+8, 2t..2t+1)
// Two C tiles side by side (n 0..15) are, packed to 16 bits, exactly an A operand (k 0..15): P and
// dS go from one product into the next without touching shared memory.
// Shared-memory tiles are row-major with rows padded by 8 elements (16 bytes): ldmatrix's eight row
// addresses then fall in eight different 16-byte bank groups, with no conflicts.
// The sm_75 path (kSm75) splits each m16n8k16 into two m16n8k8 (f16 only) and fills shared memory
// with plain 16-byte loads and stores instead of cp.async.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/cuda_check.cuh"

namespace longtune::cuda::attn_detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- device primitives ------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// c += a * b for one 16x8x16 tile, fp32 accumulate.
template <typename T, bool kSm75>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kSm75) {
    static_assert(std::is_same_v<T, __half>, "the sm_75 path is fp16 only");
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[2]), "r"(a[3]), "r"(b1));
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
      asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#else
    (void)c; (void)a; (void)b0; (void)b1;
    __trap();  // sm_80 kernels are never launched below sm_80 (see resolve_kernel)
#endif
  }
}

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 16 bytes global -> shared; zero-filled when !valid (src is then not read).
template <bool kAsync>
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
  if constexpr (kAsync) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
#else
    (void)dst; (void)src; (void)valid;
    __trap();
#endif
  } else {
    const uint4 val = valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
    *reinterpret_cast<uint4*>(dst) = val;
  }
}
// 4 bytes (one float) global -> shared; zero when !valid.
template <bool kAsync>
__device__ __forceinline__ void copy4(float* dst, const float* src, bool valid) {
  if constexpr (kAsync) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
#else
    (void)dst; (void)src; (void)valid;
    __trap();
#endif
  } else {
    *dst = valid ? *src : 0.0f;
  }
}
template <bool kAsync>
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kAsync) asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N committed groups are still in flight (no-op for plain loads).
template <bool kAsync, int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kAsync) asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ROWS x HD tile, rows [row0, row0 + ROWS) of a matrix with row stride ld, into shared memory
// (row stride lds); rows >= nvalid are zero-filled. 16-byte chunks spread over NT threads.
template <int ROWS, int HD, int NT, bool kAsync, typename T>
__device__ __forceinline__ void load_rows(T* s, int lds, const T* g, int64_t ld, int row0, int nvalid, int tid) {
  constexpr int kChunksPerRow = HD / 8;
  constexpr int kTotal = ROWS * kChunksPerRow;
#pragma unroll
  for (int c0 = 0; c0 < kTotal; c0 += NT) {
    const int c = c0 + tid;
    if (kTotal % NT == 0 || c < kTotal) {
      const int r = c / kChunksPerRow, cc = c % kChunksPerRow;
      const int row = row0 + r;
      const bool valid = row < nvalid;
      const T* src = g + (valid ? int64_t(row) * ld + cc * 8 : 0);
      copy16<kAsync>(s + r * lds + cc * 8, src, valid);
    }
  }
}

// ---- kernel parameters ------------------------------------------------------------------------

template <typename T>
struct FwdParams {
  T* out;
  float* lse;
  const T *q, *k, *v;
  const int32_t* cu_seqlens;
  int64_t ldq, ldk, ldv;
  int NH, group;
  float scale_log2;
};

template <typename T>
struct BwdParams {
  T *dq, *dk, *dv;
  float* dq_accum;  // nondeterministic dq: fp32 (T, NH, HD), zeroed; else null
  const T *dout, *q, *k, *v, *out;
  const float* lse;
  const float* D;  // rowsum(dout * out), (T, NH)
  const int32_t* cu_seqlens;
  int64_t ldq, ldk, ldv;
  int NH, group;
  float scale, scale_log2;
};

// ---- host helpers -----------------------------------------------------------------------------

// Compute capability of the current device, as 10 * major + minor.
int current_device_cc();

// kAuto -> the kernel for this GPU and dtype; an explicit choice the GPU or dtype cannot run
// throws ConfigError.
template <typename T>
AttentionKernel resolve_kernel(AttentionKernel requested) {
  constexpr bool is_half = std::is_same_v<T, __half>;
  const int cc = current_device_cc();
  const std::string gpu = "sm_" + std::to_string(cc);
  switch (requested) {
    case AttentionKernel::kAuto:
      if (cc >= 80) return AttentionKernel::kTensorCore;
      if (cc >= 75 && is_half) return AttentionKernel::kTensorCoreSm75;
      if (cc >= 75)
        throw ConfigError("attention: bf16 needs sm_80 or newer; this GPU is " + gpu +
                          " (train in fp16 with loss scaling there)");
      throw ConfigError("attention: needs sm_75 or newer; this GPU is " + gpu);
    case AttentionKernel::kTensorCore:
      if (cc < 80) throw ConfigError("attention: kTensorCore needs sm_80 or newer; this GPU is " + gpu);
      return requested;
    case AttentionKernel::kCudnn:
      if (const std::string why = cudnn_attention_unavailable_reason(); !why.empty())
        throw ConfigError("attention: --attention cudnn: " + why);
      return requested;
    case AttentionKernel::kTensorCoreSm75:
      if (!is_half) throw ConfigError("attention: kTensorCoreSm75 runs fp16 only");
      if (cc < 75) throw ConfigError("attention: kTensorCoreSm75 needs sm_75 or newer; this GPU is " + gpu);
      return requested;
  }
  throw ConfigError("attention: unknown AttentionKernel value");
}

// Shape and option checks shared by forward and backward; returns the resolved row strides.
struct Strides {
  int64_t q, k, v;
};
Strides check_attention_args(const void* q, const void* k, const void* v, int64_t num_segments, int64_t T,
                             int64_t NH, int64_t NKV, int64_t HD, const AttentionOptions& opt);

// Raises the dynamic shared-memory limit of a kernel when it needs more than the default 48 KB.
template <typename Kernel>
void set_smem_limit(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

}  // namespace longtune::cuda::attn_detail
