// Causal grouped-query attention over a packed token stream, FlashAttention-2 algorithm: tiles of
// Q against tiles of K/V with an online softmax, nothing of size (seq x seq) in memory, P recomputed
// in backward from the saved log-sum-exp. Twin of kernels/cpu/attention.hpp (same cu_seqlens
// semantics: token i attends to tokens j <= i of its own segment).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace longtune::cuda {

// Which kernel runs. All give the same function up to rounding.
enum class AttentionKernel {
  kAuto,           // the fastest one this GPU and dtype support
  kTensorCore,     // mma.sync m16n8k16, cp.async pipelining (sm_80+, bf16 or fp16)
  kTensorCoreSm75, // fp16 only, instructions sm_75 has (m16n8k8 mma, ldmatrix, no cp.async): V100/T4 class
  kCudnn           // cuDNN's fused flash attention (sm_80+, cuDNN 9; dq by fp32 atomics, so never
                   // bit-reproducible; packed documents as a ragged batch). See attention_cudnn.cuh.
};

struct AttentionOptions {
  int64_t max_seqlen = 0;  // longest segment (cu_seqlens[s+1] - cu_seqlens[s]); required, > 0
  // Row strides in elements between consecutive tokens (0 = dense: NH*HD for q/out, NKV*HD for k/v).
  // A fused q|k|v projection gives q = buf, k = buf + NH*HD, v = k + NKV*HD, all with ld = (NH+2*NKV)*HD.
  int64_t ld_q = 0, ld_k = 0, ld_v = 0;
  AttentionKernel kernel = AttentionKernel::kAuto;
  // Backward: false (default) = bit-reproducible; true allows fp32 atomics for dq (faster).
  bool nondeterministic_dq = false;
};

// out (T, NH, HD) dense ; lse (T, NH) fp32 = log-sum-exp of the scaled scores (natural log).
// q (T, NH, HD), k and v (T, NKV, HD); query head h reads kv head h / (NH / NKV); HD is 64 or 128;
// scale 1/sqrt(HD). cu_seqlens (num_segments + 1) int32 on the device.
template <typename scalar_t>
void attention_forward(scalar_t* out, float* lse, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                       const int32_t* cu_seqlens, int64_t num_segments, int64_t T, int64_t NH, int64_t NKV,
                       int64_t HD, const AttentionOptions& opt, cudaStream_t stream);

// dq (T, NH, HD), dk, dv (T, NKV, HD): assigned, with the same row strides as q, k, v
// (so they can be slices of one fused dq|dk|dv buffer). dout and out dense.
// workspace: attention_backward_workspace_bytes(...) bytes of device memory.
template <typename scalar_t>
void attention_backward(scalar_t* dq, scalar_t* dk, scalar_t* dv, const scalar_t* dout, const scalar_t* q,
                        const scalar_t* k, const scalar_t* v, const scalar_t* out, const float* lse,
                        const int32_t* cu_seqlens, int64_t num_segments, int64_t T, int64_t NH, int64_t NKV,
                        int64_t HD, const AttentionOptions& opt, void* workspace, cudaStream_t stream);
size_t attention_backward_workspace_bytes(int64_t T, int64_t NH, int64_t NKV, int64_t HD,
                                          const AttentionOptions& opt);

// Empty when AttentionKernel::kCudnn can run on the current device, otherwise why not (no cuDNN
// in the build, cuDNN older than 9, GPU older than sm_80).
std::string cudnn_attention_unavailable_reason();

}  // namespace longtune::cuda
