// Attention backward, FlashAttention-2 algorithm on mma.sync tensor cores (see attention.cuh).
//
//   1. preprocess: D = rowsum(dout * out), fp32 (T, NH), in the workspace.
//   2. dK/dV kernel: one CTA per (KV tile of BN = 16 * NW keys, KV head, segment). The CTA loops over
//      every query head of its group and every query tile at or below the diagonal (cp.async double
//      buffer of Q, dO, lse, D), recomputing P^T from lse:
//        S^T = K Q^T, P^T = exp2(S^T * scale*log2e - lse*log2e), dV += P^T dO,
//        dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q.
//      HD 64 (2a): each warp owns 16 keys and runs all four products. HD 128 (2b): warps work in
//      pairs on 32 keys, one warp S^T / P^T / dV, the other dP^T / dS^T / dK, P^T passed through
//      shared memory (each Q / dO fragment then feeds 32 rows instead of 16).
//      dK and dV stay in registers and are written once: no atomics, deterministic.
//   3. dQ, deterministic (default): a separate kernel per (query tile, head, segment) walks the KV
//      tiles and recomputes S, P, dP, dS; dQ += dS K in registers.
//      nondeterministic_dq: the dK/dV kernel stages dS in shared memory and adds dS K into an fp32
//      accumulator with atomics (FlashAttention-2's scheme); a last kernel scales and converts it.
#include <algorithm>
#include <cmath>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/attention_cudnn.cuh"

// Warp tile of the atomic dQ product: 1 = 32 query rows per warp where the split allows, 0 = 16.
#ifndef LT_ATTN_DQ_MQ2
#define LT_ATTN_DQ_MQ2 1
#endif
// Atomic dQ of query tile i done at the start of iteration i + 1 (dS double-buffered): one CTA barrier
// less per iteration, and the dQ product overlaps other warps' work.
#ifndef LT_ATTN_DQ_DEFER
#define LT_ATTN_DQ_DEFER 0
#endif
// Diagnostics only (wrong results): 1 = skip the dQ kernel (det) and the dQ atomics (nondet).
#ifndef LT_ATTN_DIAG
#define LT_ATTN_DIAG 0
#endif

namespace longtune::cuda {

namespace attn_detail {
namespace {

// ---- 1. D = rowsum(dout * out) ------------------------------------------------------------------

template <typename T, int HD>
__global__ void attn_bwd_preprocess_kernel(float* D, const T* dout, const T* out, int64_t rows) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  constexpr int kPer = HD / 32;  // 2 or 4 elements per lane
  const T* a = dout + row * HD + lane * kPer;
  const T* b = out + row * HD + lane * kPer;
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc += float(a[i]) * float(b[i]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) D[row] = acc;
}

// ---- 2. dK, dV (and atomic dQ) ----------------------------------------------------------------

__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t v);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<__half2*>(&v));
}

// 2a. HD 64: each warp owns 16 keys and runs all four products itself (no pair barrier). For HD 64 the
//     exp work per flop is twice HD 128's, and the paired kernel below, which serializes the exp
//     between the two warps of a pair, measured slower here (det 13.1 vs 12.9 ms, nondet 14.7 vs 11.5 ms).
template <typename T, int HD, int NW, int BMQ, int QS, bool kSm75, bool kAtomicDq>
struct Dkdv16Cfg {
  static constexpr int BN = 16 * NW, NT = 32 * NW, LDS = HD + 8, LDSS = BMQ + 8;
  static constexpr size_t kBytesT = size_t(2 * BN + 2 * QS * BMQ) * LDS * sizeof(T);
  static constexpr size_t kBytesF = size_t(2 * QS * BMQ) * sizeof(float);
  static constexpr size_t kBytesDs = kAtomicDq ? size_t(BN) * LDSS * sizeof(T) : 0;
  static constexpr size_t kSmem = kBytesT + kBytesF + kBytesDs;
};

template <typename T, int HD, int NW, int BMQ, int QS, bool kSm75, bool kAtomicDq>
__global__ void __launch_bounds__(NW * 32) attn_bwd_dkdv16_kernel(const BwdParams<T> p) {
  using Cfg = Dkdv16Cfg<T, HD, NW, BMQ, QS, kSm75, kAtomicDq>;
  constexpr int BN = Cfg::BN, NT = Cfg::NT, LDS = Cfg::LDS, LDSS = Cfg::LDSS;
  constexpr bool kAsync = !kSm75;
  static_assert(BMQ <= NT && BMQ % 16 == 0, "query tile");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * LDS;
  T* sQ = sV + BN * LDS;           // QS stages
  T* sdO = sQ + QS * BMQ * LDS;    // QS stages
  float* sL = reinterpret_cast<float*>(smem_raw + Cfg::kBytesT);  // QS stages of lse
  float* sD = sL + QS * BMQ;                                        // QS stages of D
  T* sdS = reinterpret_cast<T*>(smem_raw + Cfg::kBytesT + Cfg::kBytesF);

  const int kvh = blockIdx.x;
  const int seg_start = p.cu_seqlens[blockIdx.z];
  const int seg_len = p.cu_seqlens[blockIdx.z + 1] - seg_start;
  const int k0 = blockIdx.y * BN;  // key tile 0 has the most work and is scheduled first
  if (k0 >= seg_len) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int NH = p.NH;
  const int i_first = k0 / BMQ;
  const int n_qt = (seg_len + BMQ - 1) / BMQ - i_first;
  const int n_it = p.group * n_qt;
  const float sl2 = p.scale_log2;

  const T* gk = p.k + int64_t(seg_start) * p.ldk + int64_t(kvh) * HD;
  const T* gv = p.v + int64_t(seg_start) * p.ldv + int64_t(kvh) * HD;
  load_rows<BN, HD, NT, kAsync>(sK, LDS, gk, p.ldk, k0, seg_len, tid);
  load_rows<BN, HD, NT, kAsync>(sV, LDS, gv, p.ldv, k0, seg_len, tid);

  auto load_q = [&](int it, int stage) {
    const int h = kvh * p.group + it / n_qt;
    const int r0 = (i_first + it % n_qt) * BMQ;
    const T* gq = p.q + int64_t(seg_start) * p.ldq + int64_t(h) * HD;
    const T* gdo = p.dout + int64_t(seg_start) * NH * HD + int64_t(h) * HD;
    load_rows<BMQ, HD, NT, kAsync>(sQ + stage * BMQ * LDS, LDS, gq, p.ldq, r0, seg_len, tid);
    load_rows<BMQ, HD, NT, kAsync>(sdO + stage * BMQ * LDS, LDS, gdo, int64_t(NH) * HD, r0, seg_len, tid);
    if (tid < BMQ) {
      const int row = r0 + tid;
      const bool valid = row < seg_len;
      const int64_t idx = (int64_t(seg_start) + (valid ? row : 0)) * NH + h;
      copy4<kAsync>(sL + stage * BMQ + tid, p.lse + idx, valid);
      copy4<kAsync>(sD + stage * BMQ + tid, p.D + idx, valid);
    }
  };
  // Query rows past the segment end load as zeros (q, dout, lse, D): their P is 1 but dO = 0 and
  // dS = 1 * (0 - 0) = 0, so they add nothing to dK and dV and need no mask.
  load_q(0, 0);
  cp_async_commit<kAsync>();

  float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
  for (int i = 0; i < HD / 8; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.0f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.0f;
  }
  const int key_a = k0 + warp * 16 + (lane >> 2);  // this thread's keys: key_a, key_a + 8

  for (int it = 0; it < n_it; ++it) {
    const int stage = QS == 2 ? (it & 1) : 0;
    if (QS == 2 && it + 1 < n_it) {
      load_q(it + 1, stage ^ 1);
      cp_async_commit<kAsync>();
      cp_async_wait<kAsync, 1>();
    } else {
      cp_async_wait<kAsync, 0>();
    }
    __syncthreads();
    const int h = kvh * p.group + it / n_qt;
    const int r0 = (i_first + it % n_qt) * BMQ;
    const T* cQ = sQ + stage * BMQ * LDS;
    const T* cdO = sdO + stage * BMQ * LDS;
    const float* cL = sL + stage * BMQ;
    const float* cD = sD + stage * BMQ;

    // S^T = K_w Q^T (16 keys x BMQ queries per warp)
    float st[BMQ / 8][4];
#pragma unroll
    for (int i = 0; i < BMQ / 8; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t a[4];
      ldsm4(a, smem_u32(sK + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
#pragma unroll
      for (int nb2 = 0; nb2 < BMQ / 16; ++nb2) {
        uint32_t b[4];
        ldsm4(b, smem_u32(cQ + (nb2 * 16 + (lane >> 4) * 8 + (lane & 7)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8));
        mma16816<T, kSm75>(st[2 * nb2], a, b[0], b[1]);
        mma16816<T, kSm75>(st[2 * nb2 + 1], a, b[2], b[3]);
      }
    }
    // P^T, causal mask where some key of the tile is after some query of the tile
    const bool need_mask = k0 + BN - 1 > r0;
#pragma unroll
    for (int nb = 0; nb < BMQ / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nb * 8 + 2 * (lane & 3) + (e & 1);
        float pv = fast_exp2(fmaf(st[nb][e], sl2, -cL[col] * kLog2e));
        if (need_mask && key_a + (e >> 1) * 8 > r0 + col) pv = 0.0f;
        st[nb][e] = pv;
      }
    }
    // dV += P^T dO
#pragma unroll
    for (int kk = 0; kk < BMQ / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(st[2 * kk][0], st[2 * kk][1]), pack2<T>(st[2 * kk][2], st[2 * kk][3]),
                             pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                             pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
#pragma unroll
      for (int nb2 = 0; nb2 < HD / 16; ++nb2) {
        uint32_t b[4];
        ldsm4_t(b, smem_u32(cdO + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDS + nb2 * 16 + (lane >> 4) * 8));
        mma16816<T, kSm75>(dv[2 * nb2], a, b[0], b[1]);
        mma16816<T, kSm75>(dv[2 * nb2 + 1], a, b[2], b[3]);
      }
    }
    // dP^T = V_w dO^T
    float dpt[BMQ / 8][4];
#pragma unroll
    for (int i = 0; i < BMQ / 8; ++i) dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t a[4];
      ldsm4(a, smem_u32(sV + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
#pragma unroll
      for (int nb2 = 0; nb2 < BMQ / 16; ++nb2) {
        uint32_t b[4];
        ldsm4(b, smem_u32(cdO + (nb2 * 16 + (lane >> 4) * 8 + (lane & 7)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8));
        mma16816<T, kSm75>(dpt[2 * nb2], a, b[0], b[1]);
        mma16816<T, kSm75>(dpt[2 * nb2 + 1], a, b[2], b[3]);
      }
    }
    // dS^T = P^T (dP^T - D)
#pragma unroll
    for (int nb = 0; nb < BMQ / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nb * 8 + 2 * (lane & 3) + (e & 1);
        dpt[nb][e] = st[nb][e] * (dpt[nb][e] - cD[col]);
      }
    }
    // dK += dS^T Q
#pragma unroll
    for (int kk = 0; kk < BMQ / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]),
                             pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                             pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
      for (int nb2 = 0; nb2 < HD / 16; ++nb2) {
        uint32_t b[4];
        ldsm4_t(b, smem_u32(cQ + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDS + nb2 * 16 + (lane >> 4) * 8));
        mma16816<T, kSm75>(dk[2 * nb2], a, b[0], b[1]);
        mma16816<T, kSm75>(dk[2 * nb2 + 1], a, b[2], b[3]);
      }
    }
    if constexpr (kAtomicDq) {
      // dS (BMQ x BN) = (dS^T)^T through shared memory, then dQ_tile += dS K with fp32 atomics.
#pragma unroll
      for (int nb = 0; nb < BMQ / 8; ++nb)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + (lane >> 2) + 8 * r) * LDSS + nb * 8 + 2 * (lane & 3)) =
              pack2<T>(dpt[nb][2 * r], dpt[nb][2 * r + 1]);
      __syncthreads();
      constexpr int kMB = BMQ / 16;       // 16-row blocks of the query tile
      constexpr int kWPM = NW / kMB;      // warps per row block
      constexpr int kNCol = HD / kWPM;    // head-dim columns per warp
      static_assert(NW % kMB == 0 && kNCol % 16 == 0, "dq warp split");
      const int mb = warp % kMB, c0 = (warp / kMB) * kNCol;
      float acc[kNCol / 8][4];
#pragma unroll
      for (int i = 0; i < kNCol / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        ldsm4_t(a, smem_u32(sdS + (kk * 16 + (lane >> 4) * 8 + (lane & 7)) * LDSS + mb * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int nb2 = 0; nb2 < kNCol / 16; ++nb2) {
          uint32_t b[4];
          ldsm4_t(b, smem_u32(sK + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDS + c0 + nb2 * 16 + (lane >> 4) * 8));
          mma16816<T, kSm75>(acc[2 * nb2], a, b[0], b[1]);
          mma16816<T, kSm75>(acc[2 * nb2 + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = r0 + mb * 16 + (lane >> 2) + 8 * r;
        if (!LT_ATTN_DIAG && row < seg_len) {
          float* dst = p.dq_accum + ((int64_t(seg_start) + row) * NH + h) * HD + c0 + 2 * (lane & 3);
#pragma unroll
          for (int nb = 0; nb < kNCol / 8; ++nb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            atomicAdd(reinterpret_cast<float2*>(dst + nb * 8), make_float2(acc[nb][2 * r], acc[nb][2 * r + 1]));
#else
            atomicAdd(dst + nb * 8, acc[nb][2 * r]);
            atomicAdd(dst + nb * 8 + 1, acc[nb][2 * r + 1]);
#endif
          }
        }
      }
    }
    __syncthreads();  // this stage (and sdS) is refilled next iteration
    if (QS == 1 && it + 1 < n_it) {
      load_q(it + 1, 0);
      cp_async_commit<kAsync>();
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key_a + 8 * r;
    if (key < seg_len) {
      T* dkp = p.dk + (int64_t(seg_start) + key) * p.ldk + int64_t(kvh) * HD + 2 * (lane & 3);
      T* dvp = p.dv + (int64_t(seg_start) + key) * p.ldv + int64_t(kvh) * HD + 2 * (lane & 3);
#pragma unroll
      for (int nb = 0; nb < HD / 8; ++nb) {
        *reinterpret_cast<uint32_t*>(dkp + nb * 8) = pack2<T>(dk[nb][2 * r] * p.scale, dk[nb][2 * r + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dvp + nb * 8) = pack2<T>(dv[nb][2 * r], dv[nb][2 * r + 1]);
      }
    }
  }
}

// 2b. HD 128: warps come in pairs; a pair owns 32 keys (two 16-row blocks, so every Q / dO fragment
// read from shared memory feeds 32 rows). Warp 0 of a pair: S^T = K Q^T, P^T, dV += P^T dO. Warp 1:
// dP^T = V dO^T, dS^T = P^T (dP^T - D) with P^T (16-bit, in fragment order) from warp 0 through shared
// memory, dK += dS^T Q. Each warp keeps one 32 x HD accumulator in registers.
// kAtomicDq: dS also goes to shared memory and dQ += dS K is added into dq_accum with fp32 atomics.
template <typename T, int HD, int NW, int BMQ, int QS, bool kSm75, bool kAtomicDq>
struct DkdvCfg {
  static constexpr int BN = 16 * NW, NT = 32 * NW, NP = NW / 2, LDS = HD + 8, LDSS = BMQ + 8;
  static constexpr size_t kBytesT = size_t(2 * BN + 2 * QS * BMQ) * LDS * sizeof(T);
  static constexpr size_t kBytesF = size_t(2 * QS * BMQ) * sizeof(float);
  static constexpr size_t kBytesP = size_t(NP) * 2 * (BMQ / 16) * 32 * sizeof(uint4);
  static constexpr bool kDefer = kAtomicDq && LT_ATTN_DQ_DEFER && !kSm75;  // sm_75: 64 KB of smem
  static constexpr size_t kBytesDs = kAtomicDq ? size_t(kDefer ? 2 : 1) * BN * LDSS * sizeof(T) : 0;
  static constexpr size_t kSmem = kBytesT + kBytesF + kBytesP + kBytesDs;
};

template <typename T, int HD, int NW, int BMQ, int QS, bool kSm75, bool kAtomicDq>
__global__ void __launch_bounds__(NW * 32) attn_bwd_dkdv_kernel(const BwdParams<T> p) {
  using Cfg = DkdvCfg<T, HD, NW, BMQ, QS, kSm75, kAtomicDq>;
  constexpr int BN = Cfg::BN, NT = Cfg::NT, LDS = Cfg::LDS, LDSS = Cfg::LDSS;
  constexpr bool kAsync = !kSm75;
  static_assert(BMQ <= NT && BMQ % 16 == 0 && NW % 2 == 0 && NW / 2 <= 15, "query tile / warp pairs");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * LDS;
  T* sQ = sV + BN * LDS;           // QS stages
  T* sdO = sQ + QS * BMQ * LDS;    // QS stages
  float* sL = reinterpret_cast<float*>(smem_raw + Cfg::kBytesT);  // QS stages of lse
  float* sD = sL + QS * BMQ;                                        // QS stages of D
  uint4* sP = reinterpret_cast<uint4*>(smem_raw + Cfg::kBytesT + Cfg::kBytesF);
  T* sdS = reinterpret_cast<T*>(smem_raw + Cfg::kBytesT + Cfg::kBytesF + Cfg::kBytesP);

  const int kvh = blockIdx.x;
  const int seg_start = p.cu_seqlens[blockIdx.z];
  const int seg_len = p.cu_seqlens[blockIdx.z + 1] - seg_start;
  const int k0 = blockIdx.y * BN;  // key tile 0 has the most work and is scheduled first
  if (k0 >= seg_len) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // warps w and w + NW/2 form a pair: both run on the same SM sub-partition (warp % 4), so while one
  // waits at the pair barrier the other keeps that sub-partition's tensor core busy.
  const int pair = warp % (NW / 2), role = warp / (NW / 2);
  const int kb = pair * 32;  // first key of the pair within the tile
  const int NH = p.NH;
  const int i_first = k0 / BMQ;
  const int n_qt = (seg_len + BMQ - 1) / BMQ - i_first;
  const int n_it = p.group * n_qt;
  const float sl2 = p.scale_log2;

  const T* gk = p.k + int64_t(seg_start) * p.ldk + int64_t(kvh) * HD;
  const T* gv = p.v + int64_t(seg_start) * p.ldv + int64_t(kvh) * HD;
  load_rows<BN, HD, NT, kAsync>(sK, LDS, gk, p.ldk, k0, seg_len, tid);
  load_rows<BN, HD, NT, kAsync>(sV, LDS, gv, p.ldv, k0, seg_len, tid);

  auto load_q = [&](int it, int stage) {
    const int h = kvh * p.group + it / n_qt;
    const int r0 = (i_first + it % n_qt) * BMQ;
    const T* gq = p.q + int64_t(seg_start) * p.ldq + int64_t(h) * HD;
    const T* gdo = p.dout + int64_t(seg_start) * NH * HD + int64_t(h) * HD;
    load_rows<BMQ, HD, NT, kAsync>(sQ + stage * BMQ * LDS, LDS, gq, p.ldq, r0, seg_len, tid);
    load_rows<BMQ, HD, NT, kAsync>(sdO + stage * BMQ * LDS, LDS, gdo, int64_t(NH) * HD, r0, seg_len, tid);
    if (tid < BMQ) {
      const int row = r0 + tid;
      const bool valid = row < seg_len;
      const int64_t idx = (int64_t(seg_start) + (valid ? row : 0)) * NH + h;
      copy4<kAsync>(sL + stage * BMQ + tid, p.lse + idx, valid);
      copy4<kAsync>(sD + stage * BMQ + tid, p.D + idx, valid);
    }
  };
  // Query rows past the segment end load as zeros (q, dout, lse, D): their P is 1 but dO = 0 and
  // dS = 1 * (0 - 0) = 0, so they add nothing to dK and dV and need no mask.
  load_q(0, 0);
  cp_async_commit<kAsync>();

  // role 0: dV, role 1: dK (unscaled); rows key_a + 16 mt + 8 r
  float acc[2][HD / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.0f;
  const int key_a = k0 + kb + (lane >> 2);
  const T* sA1 = role == 0 ? sK : sV;  // A operand of the first product
  uint4* sPp = sP + pair * (2 * (BMQ / 16) * 32) + lane;

  // dS (BMQ x BN) = (dS^T)^T from shared memory; dQ_tile += dS K, added with fp32 atomics.
  auto dq_part = [&](int itq) {
    if constexpr (kAtomicDq) {
      const int h = kvh * p.group + itq / n_qt;
      const int r0 = (i_first + itq % n_qt) * BMQ;
      const T* sdSb = sdS + (Cfg::kDefer ? (itq & 1) * BN * LDSS : 0);
      // Warp tile: kMQ x 16 query rows by kNCol head-dim columns (32 rows where the split allows:
      // each K fragment then feeds two row blocks).
      constexpr int kMQ =
          (LT_ATTN_DQ_MQ2 && BMQ % 32 == 0 && NW % (BMQ / 32) == 0 && (HD / (NW / (BMQ / 32))) % 16 == 0) ? 2 : 1;
      constexpr int kMB = BMQ / (16 * kMQ);  // row blocks of the query tile
      constexpr int kWPM = NW / kMB;         // warps per row block
      constexpr int kNCol = HD / kWPM;       // head-dim columns per warp
      static_assert(NW % kMB == 0 && kNCol % 16 == 0, "dq warp split");
      const int mb = warp % kMB, c0 = (warp / kMB) * kNCol;
      float dqa[kMQ][kNCol / 8][4];
#pragma unroll
      for (int m = 0; m < kMQ; ++m)
#pragma unroll
        for (int i = 0; i < kNCol / 8; ++i) dqa[m][i][0] = dqa[m][i][1] = dqa[m][i][2] = dqa[m][i][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[kMQ][4];
#pragma unroll
        for (int m = 0; m < kMQ; ++m)
          ldsm4_t(a[m], smem_u32(sdSb + (kk * 16 + (lane >> 4) * 8 + (lane & 7)) * LDSS + (mb * kMQ + m) * 16 +
                                 ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int nb2 = 0; nb2 < kNCol / 16; ++nb2) {
          uint32_t b[4];
          ldsm4_t(b, smem_u32(sK + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDS + c0 + nb2 * 16 +
                              (lane >> 4) * 8));
#pragma unroll
          for (int m = 0; m < kMQ; ++m) {
            mma16816<T, kSm75>(dqa[m][2 * nb2], a[m], b[0], b[1]);
            mma16816<T, kSm75>(dqa[m][2 * nb2 + 1], a[m], b[2], b[3]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < kMQ; ++m)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = r0 + (mb * kMQ + m) * 16 + (lane >> 2) + 8 * r;
          if (!LT_ATTN_DIAG && row < seg_len) {
            float* dst = p.dq_accum + ((int64_t(seg_start) + row) * NH + h) * HD + c0 + 2 * (lane & 3);
#pragma unroll
            for (int nb = 0; nb < kNCol / 8; ++nb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
              atomicAdd(reinterpret_cast<float2*>(dst + nb * 8), make_float2(dqa[m][nb][2 * r], dqa[m][nb][2 * r + 1]));
#else
              atomicAdd(dst + nb * 8, dqa[m][nb][2 * r]);
              atomicAdd(dst + nb * 8 + 1, dqa[m][nb][2 * r + 1]);
#endif
            }
          }
        }

    }
  };

  for (int it = 0; it < n_it; ++it) {
    const int stage = QS == 2 ? (it & 1) : 0;
    if (QS == 2 && it + 1 < n_it) {
      load_q(it + 1, stage ^ 1);
      cp_async_commit<kAsync>();
      cp_async_wait<kAsync, 1>();
    } else {
      cp_async_wait<kAsync, 0>();
    }
    __syncthreads();
    if constexpr (Cfg::kDefer) {
      if (it > 0) dq_part(it - 1);
    }
    const int h = kvh * p.group + it / n_qt;
    const int r0 = (i_first + it % n_qt) * BMQ;
    const T* cQ = sQ + stage * BMQ * LDS;
    const T* cdO = sdO + stage * BMQ * LDS;
    const T* cB1 = role == 0 ? cQ : cdO;   // B of the first product (rows = queries)
    const T* cB2 = role == 0 ? cdO : cQ;   // B of the second product
    const float* cL = sL + stage * BMQ;
    const float* cD = sD + stage * BMQ;

    // role 0: S^T = K_p Q^T ; role 1: dP^T = V_p dO^T  (32 keys x BMQ queries)
    float st[2][BMQ / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < BMQ / 8; ++i) st[mt][i][0] = st[mt][i][1] = st[mt][i][2] = st[mt][i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        ldsm4(a[mt], smem_u32(sA1 + (kb + mt * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
#pragma unroll
      for (int nb2 = 0; nb2 < BMQ / 16; ++nb2) {
        uint32_t b[4];
        ldsm4(b, smem_u32(cB1 + (nb2 * 16 + (lane >> 4) * 8 + (lane & 7)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma16816<T, kSm75>(st[mt][2 * nb2], a[mt], b[0], b[1]);
          mma16816<T, kSm75>(st[mt][2 * nb2 + 1], a[mt], b[2], b[3]);
        }
      }
    }
    // A operand of the second product: P^T (role 0) or dS^T (role 1), 16-bit, [mt][16-query block]
    uint32_t pk[2][BMQ / 16][4];
    if (role == 0) {
      const bool need_mask = k0 + kb + 31 > r0;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nb = 0; nb < BMQ / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = nb * 8 + 2 * (lane & 3) + (e & 1);
            float pv = fast_exp2(fmaf(st[mt][nb][e], sl2, -cL[col] * kLog2e));
            if (need_mask && key_a + mt * 16 + (e >> 1) * 8 > r0 + col) pv = 0.0f;
            st[mt][nb][e] = pv;
          }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int kk = 0; kk < BMQ / 16; ++kk) {
          pk[mt][kk][0] = pack2<T>(st[mt][2 * kk][0], st[mt][2 * kk][1]);
          pk[mt][kk][1] = pack2<T>(st[mt][2 * kk][2], st[mt][2 * kk][3]);
          pk[mt][kk][2] = pack2<T>(st[mt][2 * kk + 1][0], st[mt][2 * kk + 1][1]);
          pk[mt][kk][3] = pack2<T>(st[mt][2 * kk + 1][2], st[mt][2 * kk + 1][3]);
          sPp[(mt * (BMQ / 16) + kk) * 32] = make_uint4(pk[mt][kk][0], pk[mt][kk][1], pk[mt][kk][2], pk[mt][kk][3]);
        }
      named_bar_arrive(1 + pair, 64);
    } else {
      named_bar_sync(1 + pair, 64);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int kk = 0; kk < BMQ / 16; ++kk) {
          const uint4 pp = sPp[(mt * (BMQ / 16) + kk) * 32];
          const uint32_t pw[4] = {pp.x, pp.y, pp.z, pp.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // j = 2 * (n block within kk) + row half
            const int nb = 2 * kk + (j >> 1);
            const int col = nb * 8 + 2 * (lane & 3);
            const float2 pf = unpack2<T>(pw[j]);
            const int e0 = (j & 1) * 2;
            pk[mt][kk][j] = pack2<T>(pf.x * (st[mt][nb][e0] - cD[col]), pf.y * (st[mt][nb][e0 + 1] - cD[col + 1]));
            if constexpr (kAtomicDq)
              *reinterpret_cast<uint32_t*>(sdS + (Cfg::kDefer ? (it & 1) * BN * LDSS : 0) +
                                           (kb + mt * 16 + (lane >> 2) + 8 * (j & 1)) * LDSS + col) = pk[mt][kk][j];
          }
        }
    }
    // role 0: dV += P^T dO ; role 1: dK += dS^T Q
#pragma unroll
    for (int kk = 0; kk < BMQ / 16; ++kk) {
#pragma unroll
      for (int nb2 = 0; nb2 < HD / 16; ++nb2) {
        uint32_t b[4];
        ldsm4_t(b, smem_u32(cB2 + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDS + nb2 * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma16816<T, kSm75>(acc[mt][2 * nb2], pk[mt][kk], b[0], b[1]);
          mma16816<T, kSm75>(acc[mt][2 * nb2 + 1], pk[mt][kk], b[2], b[3]);
        }
      }
    }
    if constexpr (kAtomicDq && !Cfg::kDefer) {
      __syncthreads();  // dS complete
      dq_part(it);
    }
    __syncthreads();  // this stage (and sP, sdS) is refilled next iteration
    if (QS == 1 && it + 1 < n_it) {
      load_q(it + 1, 0);
      cp_async_commit<kAsync>();
    }
  }

  if constexpr (Cfg::kDefer) {
    __syncthreads();
    dq_part(n_it - 1);  // n_it >= 1: the key tile's own diagonal query tile
  }

  const float osc = role == 0 ? 1.0f : p.scale;
  T* gout = role == 0 ? p.dv : p.dk;
  const int64_t ldo = role == 0 ? p.ldv : p.ldk;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = key_a + mt * 16 + 8 * r;
      if (key < seg_len) {
        T* dst = gout + (int64_t(seg_start) + key) * ldo + int64_t(kvh) * HD + 2 * (lane & 3);
#pragma unroll
        for (int nb = 0; nb < HD / 8; ++nb)
          *reinterpret_cast<uint32_t*>(dst + nb * 8) = pack2<T>(acc[mt][nb][2 * r] * osc, acc[mt][nb][2 * r + 1] * osc);
      }
    }
}

// ---- 3. dQ, deterministic ---------------------------------------------------------------------

template <typename T, int HD, int NW, int MT, int BN, int KS, bool kSm75>
struct DqCfg {
  static constexpr int BM = 16 * MT * NW, NT = 32 * NW, LDS = HD + 8;
  static constexpr size_t kSmem = size_t(2 * BM + 2 * KS * BN) * LDS * sizeof(T);
};

// NW warps, each owning MT blocks of 16 query rows (K/V fragments shared by the MT blocks).
template <typename T, int HD, int NW, int MT, int BN, int KS, bool kSm75>
__global__ void __launch_bounds__(NW * 32) attn_bwd_dq_kernel(const BwdParams<T> p) {
  using Cfg = DqCfg<T, HD, NW, MT, BN, KS, kSm75>;
  constexpr int BM = Cfg::BM, NT = Cfg::NT, LDS = Cfg::LDS;
  constexpr bool kAsync = !kSm75;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * LDS;
  T* sK = sdO + BM * LDS;      // KS stages
  T* sV = sK + KS * BN * LDS;  // KS stages

  const int h = blockIdx.x;
  const int qt = gridDim.y - 1 - blockIdx.y;
  const int seg_start = p.cu_seqlens[blockIdx.z];
  const int seg_len = p.cu_seqlens[blockIdx.z + 1] - seg_start;
  const int q0 = qt * BM;
  if (q0 >= seg_len) return;
  const int NH = p.NH;
  const int kvh = h / p.group;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const float sl2 = p.scale_log2;

  const T* gq = p.q + int64_t(seg_start) * p.ldq + int64_t(h) * HD;
  const T* gdo = p.dout + int64_t(seg_start) * NH * HD + int64_t(h) * HD;
  const T* gk = p.k + int64_t(seg_start) * p.ldk + int64_t(kvh) * HD;
  const T* gv = p.v + int64_t(seg_start) * p.ldv + int64_t(kvh) * HD;
  const int n_kv = ((seg_len < q0 + BM ? seg_len : q0 + BM) + BN - 1) / BN;
  auto load_kv = [&](int j, int stage) {
    load_rows<BN, HD, NT, kAsync>(sK + stage * BN * LDS, LDS, gk, p.ldk, j * BN, seg_len, tid);
    load_rows<BN, HD, NT, kAsync>(sV + stage * BN * LDS, LDS, gv, p.ldv, j * BN, seg_len, tid);
  };
  load_rows<BM, HD, NT, kAsync>(sQ, LDS, gq, p.ldq, q0, seg_len, tid);
  load_rows<BM, HD, NT, kAsync>(sdO, LDS, gdo, int64_t(NH) * HD, q0, seg_len, tid);
  load_kv(n_kv - 1, 0);
  cp_async_commit<kAsync>();

  const int wrow = warp * 16 * MT;
  const int row_a = q0 + wrow + (lane >> 2);  // rows of block mt: row_a + 16 mt, + 8
  float L[MT][2], Dr[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_a + mt * 16 + 8 * r;
      const bool valid = row < seg_len;
      const int64_t idx = (int64_t(seg_start) + (valid ? row : 0)) * NH + h;
      L[mt][r] = valid ? p.lse[idx] * kLog2e : 0.0f;
      Dr[mt][r] = valid ? p.D[idx] : 0.0f;
    }
  float dq[MT][HD / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) dq[mt][i][0] = dq[mt][i][1] = dq[mt][i][2] = dq[mt][i][3] = 0.0f;

  for (int it = 0; it < n_kv; ++it) {
    const int j = n_kv - 1 - it;
    const int stage = KS == 2 ? (it & 1) : 0;
    if (KS == 2 && it + 1 < n_kv) {
      load_kv(j - 1, stage ^ 1);
      cp_async_commit<kAsync>();
      cp_async_wait<kAsync, 1>();
    } else {
      cp_async_wait<kAsync, 0>();
    }
    __syncthreads();
    const T* cK = sK + stage * BN * LDS;
    const T* cV = sV + stage * BN * LDS;

    // S = Q K^T and dP = dO V^T (16 MT x BN per warp)
    float s[MT][BN / 8][4], dp[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) {
        s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.0f;
        dp[mt][i][0] = dp[mt][i][1] = dp[mt][i][2] = dp[mt][i][3] = 0.0f;
      }
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t a[MT][4], c[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        ldsm4(a[mt], smem_u32(sQ + (wrow + mt * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
        ldsm4(c[mt], smem_u32(sdO + (wrow + mt * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
      }
#pragma unroll
      for (int nb2 = 0; nb2 < BN / 16; ++nb2) {
        const int boff = (nb2 * 16 + (lane >> 4) * 8 + (lane & 7)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8;
        uint32_t b[4];
        ldsm4(b, smem_u32(cK + boff));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T, kSm75>(s[mt][2 * nb2], a[mt], b[0], b[1]);
          mma16816<T, kSm75>(s[mt][2 * nb2 + 1], a[mt], b[2], b[3]);
        }
        ldsm4(b, smem_u32(cV + boff));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T, kSm75>(dp[mt][2 * nb2], c[mt], b[0], b[1]);
          mma16816<T, kSm75>(dp[mt][2 * nb2 + 1], c[mt], b[2], b[3]);
        }
      }
    }
    // P from lse, causal mask on diagonal tiles; dS = P (dP - D)
    const bool need_mask = j * BN + BN - 1 > q0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          float pv = fast_exp2(fmaf(s[mt][nb][e], sl2, -L[mt][r]));
          if (need_mask && j * BN + nb * 8 + 2 * (lane & 3) + (e & 1) > row_a + mt * 16 + 8 * r) pv = 0.0f;
          s[mt][nb][e] = pv * (dp[mt][nb][e] - Dr[mt][r]);
        }
      }
    // dQ += dS K
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int nb2 = 0; nb2 < HD / 16; ++nb2) {
        uint32_t b[4];
        ldsm4_t(b, smem_u32(cK + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDS + nb2 * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T, kSm75>(dq[mt][2 * nb2], a[mt], b[0], b[1]);
          mma16816<T, kSm75>(dq[mt][2 * nb2 + 1], a[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();
    if (KS == 1 && it + 1 < n_kv) {
      load_kv(j - 1, 0);
      cp_async_commit<kAsync>();
    }
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_a + mt * 16 + 8 * r;
      if (row < seg_len) {
        T* dst = p.dq + (int64_t(seg_start) + row) * p.ldq + int64_t(h) * HD + 2 * (lane & 3);
#pragma unroll
        for (int nb = 0; nb < HD / 8; ++nb)
          *reinterpret_cast<uint32_t*>(dst + nb * 8) =
              pack2<T>(dq[mt][nb][2 * r] * p.scale, dq[mt][nb][2 * r + 1] * p.scale);
      }
    }
}

// dq (strided) = scale * dq_accum (dense fp32), two elements per thread.
template <typename T, int HD>
__global__ void attn_bwd_convert_dq_kernel(T* dq, const float* acc, int64_t ldq, int NH, int64_t rows, float scale) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // pair index
  if (i >= rows * (HD / 2)) return;
  const int64_t row = i / (HD / 2);  // (token, head)
  const int d = int(i % (HD / 2)) * 2;
  const int64_t tok = row / NH, h = row % NH;
  const float2 a = *reinterpret_cast<const float2*>(acc + row * HD + d);
  *reinterpret_cast<uint32_t*>(dq + tok * ldq + h * HD + d) = pack2<T>(a.x * scale, a.y * scale);
}

// Tile configurations; overridable for tuning builds.
//   dK/dV: warps (keys per CTA = 16 * warps), query tile rows, query stages
//   dQ: warps, 16-row query blocks per warp, KV tile rows, KV stages
#ifndef LT_ATTN_DKDV_CFG128
#define LT_ATTN_DKDV_CFG128 8, 64, 2
#endif
#ifndef LT_ATTN_DKDV_CFG64
#define LT_ATTN_DKDV_CFG64 8, 128, 2
#endif
#ifndef LT_ATTN_DQ_CFG128
#define LT_ATTN_DQ_CFG128 4, 2, 32, 2
#endif
#ifndef LT_ATTN_DQ_CFG64
#define LT_ATTN_DQ_CFG64 4, 2, 32, 2
#endif

template <typename T, int HD, int NW, int BMQ, int QS, bool kSm75, bool kAtomicDq>
void launch_dkdv_mode(const BwdParams<T>& p, const dim3& grid, cudaStream_t stream) {
  using Cfg = DkdvCfg<T, HD, NW, BMQ, QS, kSm75, kAtomicDq>;
  auto kernel = attn_bwd_dkdv_kernel<T, HD, NW, BMQ, QS, kSm75, kAtomicDq>;
  set_smem_limit(kernel, Cfg::kSmem);
  kernel<<<grid, Cfg::NT, Cfg::kSmem, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <typename T, int HD, int NW, int BMQ, int QS, bool kSm75>
void launch_dkdv(bool atomic_dq, const BwdParams<T>& p, int64_t NKV, int64_t max_seqlen, int64_t num_segments,
                 cudaStream_t stream) {
  const int64_t tiles = (max_seqlen + 16 * NW - 1) / (16 * NW);
  if (tiles > 65535) throw ConfigError("attention: max_seqlen too large for one launch");
  const dim3 grid{unsigned(NKV), unsigned(tiles), unsigned(num_segments)};
  if (atomic_dq)
    launch_dkdv_mode<T, HD, NW, BMQ, QS, kSm75, true>(p, grid, stream);
  else
    launch_dkdv_mode<T, HD, NW, BMQ, QS, kSm75, false>(p, grid, stream);
}

template <typename T, int HD, int NW, int BMQ, int QS, bool kSm75>
void launch_dkdv16(bool atomic_dq, const BwdParams<T>& p, int64_t NKV, int64_t max_seqlen, int64_t num_segments,
                 cudaStream_t stream) {
  const int64_t tiles = (max_seqlen + 16 * NW - 1) / (16 * NW);
  if (tiles > 65535) throw ConfigError("attention: max_seqlen too large for one launch");
  const dim3 grid{unsigned(NKV), unsigned(tiles), unsigned(num_segments)};
  if (atomic_dq) {
    using Cfg = Dkdv16Cfg<T, HD, NW, BMQ, QS, kSm75, true>;
    auto kernel = attn_bwd_dkdv16_kernel<T, HD, NW, BMQ, QS, kSm75, true>;
    set_smem_limit(kernel, Cfg::kSmem);
    kernel<<<grid, Cfg::NT, Cfg::kSmem, stream>>>(p);
  } else {
    using Cfg = Dkdv16Cfg<T, HD, NW, BMQ, QS, kSm75, false>;
    auto kernel = attn_bwd_dkdv16_kernel<T, HD, NW, BMQ, QS, kSm75, false>;
    set_smem_limit(kernel, Cfg::kSmem);
    kernel<<<grid, Cfg::NT, Cfg::kSmem, stream>>>(p);
  }
  CUDA_CHECK_LAUNCH();
}

template <typename T, int HD, int NW, int MT, int BN, int KS, bool kSm75>
void launch_dq(const BwdParams<T>& p, int64_t max_seqlen, int64_t num_segments, cudaStream_t stream) {
  using Cfg = DqCfg<T, HD, NW, MT, BN, KS, kSm75>;
  auto kernel = attn_bwd_dq_kernel<T, HD, NW, MT, BN, KS, kSm75>;
  set_smem_limit(kernel, Cfg::kSmem);
  const int64_t tiles = (max_seqlen + Cfg::BM - 1) / Cfg::BM;
  if (tiles > 65535) throw ConfigError("attention: max_seqlen too large for one launch");
  const dim3 grid(unsigned(p.NH), unsigned(tiles), unsigned(num_segments));
  kernel<<<grid, Cfg::NT, Cfg::kSmem, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <typename T, int HD>
void dispatch_bwd(AttentionKernel kind, bool atomic_dq, const BwdParams<T>& p, int64_t NKV, int64_t max_seqlen,
                  int64_t num_segments, cudaStream_t stream) {
  const bool dq_kernel = !atomic_dq && !LT_ATTN_DIAG;
  if (kind == AttentionKernel::kTensorCoreSm75) {
    if constexpr (std::is_same_v<T, __half>) {
      // sm_75: at most 64 KB of shared memory per block, one query / KV stage.
      if constexpr (HD == 128)
        launch_dkdv<T, HD, 4, 32, 1, true>(atomic_dq, p, NKV, max_seqlen, num_segments, stream);
      else
        launch_dkdv16<T, HD, 4, 32, 1, true>(atomic_dq, p, NKV, max_seqlen, num_segments, stream);
      if (dq_kernel) launch_dq<T, HD, 4, 1, HD == 128 ? 32 : 64, 1, true>(p, max_seqlen, num_segments, stream);
    }
    return;
  }
  if constexpr (HD == 128) {
    launch_dkdv<T, HD, LT_ATTN_DKDV_CFG128, false>(atomic_dq, p, NKV, max_seqlen, num_segments, stream);
    if (dq_kernel) launch_dq<T, HD, LT_ATTN_DQ_CFG128, false>(p, max_seqlen, num_segments, stream);
  } else {
    launch_dkdv16<T, HD, LT_ATTN_DKDV_CFG64, false>(atomic_dq, p, NKV, max_seqlen, num_segments, stream);
    if (dq_kernel) launch_dq<T, HD, LT_ATTN_DQ_CFG64, false>(p, max_seqlen, num_segments, stream);
  }
}

constexpr size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace
}  // namespace attn_detail

size_t attention_backward_workspace_bytes(int64_t T, int64_t NH, int64_t NKV, int64_t HD,
                                          const AttentionOptions& opt) {
  (void)NKV;
  // kCudnn: softmax_sum has the size of our D; its dq accumulator takes the row stride of dq in
  // packed batches (ours is dense, which its fallback for huge batches uses).
  size_t bytes = attn_detail::align256(size_t(T) * size_t(NH) * sizeof(float));  // D
  const int64_t dense = NH * HD;
  if (opt.kernel == AttentionKernel::kCudnn)
    bytes += attn_detail::align256(size_t(T) * size_t(std::max(opt.ld_q ? opt.ld_q : dense, dense)) * sizeof(float));
  else if (opt.nondeterministic_dq)
    bytes += attn_detail::align256(size_t(T) * size_t(dense) * sizeof(float));
  return bytes;
}

template <typename scalar_t>
void attention_backward(scalar_t* dq, scalar_t* dk, scalar_t* dv, const scalar_t* dout, const scalar_t* q,
                        const scalar_t* k, const scalar_t* v, const scalar_t* out, const float* lse,
                        const int32_t* cu_seqlens, int64_t num_segments, int64_t T, int64_t NH, int64_t NKV,
                        int64_t HD, const AttentionOptions& opt, void* workspace, cudaStream_t stream) {
  using namespace attn_detail;
  const Strides ld = check_attention_args(q, k, v, num_segments, T, NH, NKV, HD, opt);
  auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 != 0; };
  if (misaligned(dq) || misaligned(dk) || misaligned(dv) || misaligned(dout) || misaligned(out))
    throw ConfigError("attention: dq, dk, dv, dout and out must be 16-byte aligned");
  if (misaligned(workspace)) throw ConfigError("attention: workspace must be 16-byte aligned");
  AttentionKernel kind = resolve_kernel<scalar_t>(opt.kernel);
  if (T == 0 || num_segments == 0) return;
  bool atomic_dq = opt.nondeterministic_dq;
  if (kind == AttentionKernel::kCudnn) {
    if (cudnn_runs(num_segments, T, std::max({ld.q, ld.k, ld.v, NH * HD}), opt)) {
      cudnn_attention_backward(cudnn_dtype<scalar_t>(), dq, dk, dv, dout, q, k, v, out, lse, cu_seqlens,
                               num_segments, opt.max_seqlen, T, NH, NKV, HD, ld.q, ld.k, ld.v, workspace, stream);
      return;
    }
    kind = AttentionKernel::kTensorCore;
    atomic_dq = true;
  }

  float* D = static_cast<float*>(workspace);
  float* dq_accum = nullptr;
  if (atomic_dq) {
    dq_accum = reinterpret_cast<float*>(static_cast<char*>(workspace) + align256(size_t(T) * NH * sizeof(float)));
    CUDA_CHECK(cudaMemsetAsync(dq_accum, 0, size_t(T) * NH * HD * sizeof(float), stream));
  }
  const int64_t rows = T * NH;
  {
    const int warps = 8;
    const unsigned blocks = unsigned((rows + warps - 1) / warps);
    if (HD == 128)
      attn_bwd_preprocess_kernel<scalar_t, 128><<<blocks, warps * 32, 0, stream>>>(D, dout, out, rows);
    else
      attn_bwd_preprocess_kernel<scalar_t, 64><<<blocks, warps * 32, 0, stream>>>(D, dout, out, rows);
    CUDA_CHECK_LAUNCH();
  }

  BwdParams<scalar_t> p{};
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.dq_accum = dq_accum;
  p.dout = dout;
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.lse = lse;
  p.D = D;
  p.cu_seqlens = cu_seqlens;
  p.ldq = ld.q;
  p.ldk = ld.k;
  p.ldv = ld.v;
  p.NH = int(NH);
  p.group = int(NH / NKV);
  p.scale = float(1.0 / std::sqrt(double(HD)));
  p.scale_log2 = p.scale * kLog2e;
  if (HD == 128)
    dispatch_bwd<scalar_t, 128>(kind, atomic_dq, p, NKV, opt.max_seqlen, num_segments, stream);
  else
    dispatch_bwd<scalar_t, 64>(kind, atomic_dq, p, NKV, opt.max_seqlen, num_segments, stream);

  if (atomic_dq) {
    const int64_t pairs = rows * (HD / 2);
    const unsigned blocks = unsigned((pairs + 255) / 256);
    if (HD == 128)
      attn_bwd_convert_dq_kernel<scalar_t, 128><<<blocks, 256, 0, stream>>>(dq, dq_accum, ld.q, int(NH), rows, p.scale);
    else
      attn_bwd_convert_dq_kernel<scalar_t, 64><<<blocks, 256, 0, stream>>>(dq, dq_accum, ld.q, int(NH), rows, p.scale);
    CUDA_CHECK_LAUNCH();
  }
}

template void attention_backward<__nv_bfloat16>(__nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*, const __nv_bfloat16*,
                                                const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*,
                                                const __nv_bfloat16*, const float*, const int32_t*, int64_t, int64_t,
                                                int64_t, int64_t, int64_t, const AttentionOptions&, void*,
                                                cudaStream_t);
template void attention_backward<__half>(__half*, __half*, __half*, const __half*, const __half*, const __half*,
                                         const __half*, const __half*, const float*, const int32_t*, int64_t,
                                         int64_t, int64_t, int64_t, int64_t, const AttentionOptions&, void*,
                                         cudaStream_t);

}  // namespace longtune::cuda
