// Attention forward, FlashAttention-2 algorithm on mma.sync tensor cores (see attention.cuh).
//
// One CTA per (query tile of BM = 16 * MT * NW rows, query head, segment); each warp owns 16 * MT
// query rows. The CTA walks the KV tiles of its segment from the diagonal
// down to 0 (KS-stage cp.async pipeline), with an online softmax in fp32 (exp2 of log2e-prescaled
// scores). Only the tiles that cross the diagonal are masked.
#include <algorithm>
#include <cmath>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/attention_cudnn.cuh"

namespace longtune::cuda {

namespace attn_detail {

int current_device_cc() {
  int dev = 0, major = 0, minor = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major * 10 + minor;
}

Strides check_attention_args(const void* q, const void* k, const void* v, int64_t num_segments, int64_t T,
                             int64_t NH, int64_t NKV, int64_t HD, const AttentionOptions& opt) {
  if (HD != 64 && HD != 128) throw ConfigError("attention: head_dim must be 64 or 128, got " + std::to_string(HD));
  if (NH <= 0 || NKV <= 0 || NH % NKV != 0)
    throw ConfigError("attention: NH must be a positive multiple of NKV (NH " + std::to_string(NH) + ", NKV " +
                      std::to_string(NKV) + ")");
  if (T < 0 || num_segments < 0) throw ConfigError("attention: negative T or num_segments");
  if (opt.max_seqlen <= 0) throw ConfigError("attention: AttentionOptions::max_seqlen must be > 0");
  if (T > INT32_MAX / 2) throw ConfigError("attention: T too large");
  if (num_segments > 65535) throw ConfigError("attention: at most 65535 segments per launch");
  const Strides s{opt.ld_q ? opt.ld_q : NH * HD, opt.ld_k ? opt.ld_k : NKV * HD, opt.ld_v ? opt.ld_v : NKV * HD};
  if (s.q < NH * HD || s.k < NKV * HD || s.v < NKV * HD)
    throw ConfigError("attention: row strides ld_q/ld_k/ld_v must cover a whole row of heads");
  if (s.q % 8 || s.k % 8 || s.v % 8)
    throw ConfigError("attention: row strides must be multiples of 8 elements (16-byte loads)");
  auto misaligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 != 0; };
  if (misaligned(q) || misaligned(k) || misaligned(v))
    throw ConfigError("attention: q, k, v must be 16-byte aligned");
  return s;
}

namespace {

template <typename T, int HD, int NW, int MT, int BN, int KS, bool kSm75>
struct FwdCfg {
  static constexpr int BM = 16 * MT * NW, NT = 32 * NW, LDS = HD + 8;
  static constexpr size_t kSmem = size_t(BM + 2 * KS * BN) * LDS * sizeof(T);
};

// NW warps, each owning MT blocks of 16 query rows (the K/V fragments read from shared memory are
// shared by the MT blocks: MT = 2 halves the shared-memory traffic per flop). With MT = 1 the Q
// fragments stay in registers; with MT = 2 they are re-read from shared memory per k-step.
template <typename T, int HD, int NW, int MT, int BN, int KS, bool kSm75>
__global__ void __launch_bounds__(NW * 32) attn_fwd_kernel(const FwdParams<T> p) {
  using Cfg = FwdCfg<T, HD, NW, MT, BN, KS, kSm75>;
  constexpr int BM = Cfg::BM, NT = Cfg::NT, LDS = Cfg::LDS;
  constexpr bool kAsync = !kSm75;
  constexpr bool kQinRegs = MT == 1;
  static_assert(KS == 1 || KS == 2, "one or two KV stages");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * LDS;
  T* sV = sK + KS * BN * LDS;

  const int h = blockIdx.x;
  const int qt = gridDim.y - 1 - blockIdx.y;  // heaviest (last) query tiles first
  const int seg_start = p.cu_seqlens[blockIdx.z];
  const int seg_len = p.cu_seqlens[blockIdx.z + 1] - seg_start;
  const int q0 = qt * BM;
  if (q0 >= seg_len) return;
  const int kvh = h / p.group;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  const T* gq = p.q + int64_t(seg_start) * p.ldq + int64_t(h) * HD;
  const T* gk = p.k + int64_t(seg_start) * p.ldk + int64_t(kvh) * HD;
  const T* gv = p.v + int64_t(seg_start) * p.ldv + int64_t(kvh) * HD;
  const int n_kv = ((seg_len < q0 + BM ? seg_len : q0 + BM) + BN - 1) / BN;

  auto load_kv = [&](int j, int stage) {
    load_rows<BN, HD, NT, kAsync>(sK + stage * BN * LDS, LDS, gk, p.ldk, j * BN, seg_len, tid);
    load_rows<BN, HD, NT, kAsync>(sV + stage * BN * LDS, LDS, gv, p.ldv, j * BN, seg_len, tid);
  };

  load_rows<BM, HD, NT, kAsync>(sQ, LDS, gq, p.ldq, q0, seg_len, tid);
  cp_async_commit<kAsync>();
  load_kv(n_kv - 1, 0);
  cp_async_commit<kAsync>();
  cp_async_wait<kAsync, 1>();
  __syncthreads();

  const int wrow = warp * 16 * MT;  // first row of this warp in the tile
  uint32_t qf[kQinRegs ? HD / 16 : 1][4];
  if constexpr (kQinRegs) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk)
      ldsm4(qf[kk], smem_u32(sQ + (wrow + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
  }

  float o[MT][HD / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.0f;
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.0f;
  const float sl2 = p.scale_log2;
  const int row_a = q0 + wrow + (lane >> 2);  // rows of block mt: row_a + 16 mt, + 8

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

    // S = Q K^T (16 MT x BN per warp)
    float s[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < BN / 8; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t a[MT][4];
      if constexpr (kQinRegs) {
#pragma unroll
        for (int x = 0; x < 4; ++x) a[0][x] = qf[kk][x];
      } else {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ldsm4(a[mt], smem_u32(sQ + (wrow + mt * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8));
      }
#pragma unroll
      for (int nb2 = 0; nb2 < BN / 16; ++nb2) {
        uint32_t b[4];
        ldsm4(b, smem_u32(cK + (nb2 * 16 + (lane >> 4) * 8 + (lane & 7)) * LDS + kk * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T, kSm75>(s[mt][2 * nb2], a[mt], b[0], b[1]);
          mma16816<T, kSm75>(s[mt][2 * nb2 + 1], a[mt], b[2], b[3]);
        }
      }
    }
    // causal mask on tiles that reach past the first row of this CTA
    if (j * BN + BN - 1 > q0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = j * BN + nb * 8 + 2 * (lane & 3) + (e & 1);
            if (col > row_a + mt * 16 + (e >> 1) * 8) s[mt][nb][e] = -INFINITY;
          }
    }
    // online softmax
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) {
        mx[0] = fmaxf(mx[0], fmaxf(s[mt][nb][0], s[mt][nb][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[mt][nb][2], s[mt][nb][3]));
      }
      float mu[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        const float mn = fmaxf(m[mt][r], mx[r] * sl2);
        mu[r] = mn == -INFINITY ? 0.0f : mn;  // a row with nothing unmasked yet: keep p = 0
        const float corr = fast_exp2(m[mt][r] - mu[r]);
        m[mt][r] = mn;
        l[mt][r] *= corr;
#pragma unroll
        for (int nb = 0; nb < HD / 8; ++nb) {
          o[mt][nb][2 * r] *= corr;
          o[mt][nb][2 * r + 1] *= corr;
        }
      }
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) {
        s[mt][nb][0] = fast_exp2(fmaf(s[mt][nb][0], sl2, -mu[0]));
        s[mt][nb][1] = fast_exp2(fmaf(s[mt][nb][1], sl2, -mu[0]));
        s[mt][nb][2] = fast_exp2(fmaf(s[mt][nb][2], sl2, -mu[1]));
        s[mt][nb][3] = fast_exp2(fmaf(s[mt][nb][3], sl2, -mu[1]));
        l[mt][0] += s[mt][nb][0] + s[mt][nb][1];
        l[mt][1] += s[mt][nb][2] + s[mt][nb][3];
      }
    }
    // O += P V
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
        ldsm4_t(b, smem_u32(cV + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDS + nb2 * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T, kSm75>(o[mt][2 * nb2], a[mt], b[0], b[1]);
          mma16816<T, kSm75>(o[mt][2 * nb2 + 1], a[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this stage is refilled next iteration
    if (KS == 1 && it + 1 < n_kv) {
      load_kv(j - 1, 0);
      cp_async_commit<kAsync>();
    }
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float lr = l[mt][r];
      lr += __shfl_xor_sync(0xffffffffu, lr, 1);
      lr += __shfl_xor_sync(0xffffffffu, lr, 2);
      const int row = row_a + mt * 16 + r * 8;
      if (row < seg_len) {
        const float inv = 1.0f / lr;
        const int64_t tok = int64_t(seg_start + row);
        T* dst = p.out + (tok * p.NH + h) * HD + 2 * (lane & 3);
#pragma unroll
        for (int nb = 0; nb < HD / 8; ++nb)
          *reinterpret_cast<uint32_t*>(dst + nb * 8) = pack2<T>(o[mt][nb][2 * r] * inv, o[mt][nb][2 * r + 1] * inv);
        if ((lane & 3) == 0) p.lse[tok * p.NH + h] = (m[mt][r] + __log2f(lr)) * kLn2;
      }
    }
}

// Tile configurations (warps, 16-row blocks per warp, KV tile rows, KV stages); overridable for
// tuning builds.
#ifndef LT_ATTN_FWD_CFG128
#define LT_ATTN_FWD_CFG128 4, 2, 64, 2
#endif
#ifndef LT_ATTN_FWD_CFG64
#define LT_ATTN_FWD_CFG64 4, 2, 64, 2
#endif

template <typename T, int HD, int NW, int MT, int BN, int KS, bool kSm75>
void launch_fwd(const FwdParams<T>& p, int64_t max_seqlen, int64_t num_segments, cudaStream_t stream) {
  using Cfg = FwdCfg<T, HD, NW, MT, BN, KS, kSm75>;
  auto kernel = attn_fwd_kernel<T, HD, NW, MT, BN, KS, kSm75>;
  set_smem_limit(kernel, Cfg::kSmem);
  const int64_t tiles = (max_seqlen + Cfg::BM - 1) / Cfg::BM;
  if (tiles > 65535) throw ConfigError("attention: max_seqlen too large for one launch");
  const dim3 grid(unsigned(p.NH), unsigned(tiles), unsigned(num_segments));
  kernel<<<grid, Cfg::NT, Cfg::kSmem, stream>>>(p);
  CUDA_CHECK_LAUNCH();
}

template <typename T, int HD>
void dispatch_fwd(AttentionKernel kind, const FwdParams<T>& p, int64_t max_seqlen, int64_t num_segments,
                  cudaStream_t stream) {
  if (kind == AttentionKernel::kTensorCoreSm75) {
    if constexpr (std::is_same_v<T, __half>) {
      // sm_75 has 64 KB of shared memory per block.
      launch_fwd<T, HD, 4, 1, HD == 128 ? 32 : 64, 2, true>(p, max_seqlen, num_segments, stream);
    }
    return;
  }
  if constexpr (HD == 128)
    launch_fwd<T, HD, LT_ATTN_FWD_CFG128, false>(p, max_seqlen, num_segments, stream);
  else
    launch_fwd<T, HD, LT_ATTN_FWD_CFG64, false>(p, max_seqlen, num_segments, stream);
}

}  // namespace
}  // namespace attn_detail

template <typename scalar_t>
void attention_forward(scalar_t* out, float* lse, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                       const int32_t* cu_seqlens, int64_t num_segments, int64_t T, int64_t NH, int64_t NKV,
                       int64_t HD, const AttentionOptions& opt, cudaStream_t stream) {
  using namespace attn_detail;
  const Strides ld = check_attention_args(q, k, v, num_segments, T, NH, NKV, HD, opt);
  if (reinterpret_cast<uintptr_t>(out) % 16) throw ConfigError("attention: out must be 16-byte aligned");
  AttentionKernel kind = resolve_kernel<scalar_t>(opt.kernel);
  if (T == 0 || num_segments == 0) return;
  if (kind == AttentionKernel::kCudnn) {
    if (cudnn_runs(num_segments, T, std::max({ld.q, ld.k, ld.v, NH * HD}), opt)) {
      cudnn_attention_forward(cudnn_dtype<scalar_t>(), out, lse, q, k, v, cu_seqlens, num_segments, opt.max_seqlen,
                              T, NH, NKV, HD, ld.q, ld.k, ld.v, stream);
      return;
    }
    kind = AttentionKernel::kTensorCore;
  }
  FwdParams<scalar_t> p{};
  p.out = out;
  p.lse = lse;
  p.q = q;
  p.k = k;
  p.v = v;
  p.cu_seqlens = cu_seqlens;
  p.ldq = ld.q;
  p.ldk = ld.k;
  p.ldv = ld.v;
  p.NH = int(NH);
  p.group = int(NH / NKV);
  p.scale_log2 = float(1.0 / std::sqrt(double(HD))) * kLog2e;
  if (HD == 128)
    dispatch_fwd<scalar_t, 128>(kind, p, opt.max_seqlen, num_segments, stream);
  else
    dispatch_fwd<scalar_t, 64>(kind, p, opt.max_seqlen, num_segments, stream);
}

template void attention_forward<__nv_bfloat16>(__nv_bfloat16*, float*, const __nv_bfloat16*, const __nv_bfloat16*,
                                               const __nv_bfloat16*, const int32_t*, int64_t, int64_t, int64_t,
                                               int64_t, int64_t, const AttentionOptions&, cudaStream_t);
template void attention_forward<__half>(__half*, float*, const __half*, const __half*, const __half*,
                                        const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                        const AttentionOptions&, cudaStream_t);

}  // namespace longtune::cuda
