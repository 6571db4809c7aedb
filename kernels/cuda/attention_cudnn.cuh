// cuDNN's fused flash attention as an alternative attention backend (AttentionKernel::kCudnn).
// Our own kernels (attention_forward.cu / attention_backward.cu) remain the default and the
// reference; this backend is opt-in because cuDNN's backward accumulates dq with fp32 atomics
// (not bit-reproducible), like AttentionOptions::nondeterministic_dq.
//
// The graphs are built through the cuDNN backend API (cudnn_graph.h), no frontend library:
// forward  S = scale * Q K^T, causal mask, softmax (stats = max + log sum exp), O = P V;
// backward the FlashAttention-2 recurrences with dq accumulated in an fp32 buffer.
// Packed documents (cu_seqlens) run as a ragged batch: one batch entry per document, offsets into
// the token stream, a padding mask. Execution plans are cached per shape, with the document count
// and the longest document rounded up to powers of two so a run builds only a few.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels/cuda/attention.cuh"

namespace longtune::cuda {

namespace attn_detail {

enum class CudnnDtype { kBf16, kFp16 };

// Same arguments as attention_forward.
void cudnn_attention_forward(CudnnDtype dt, void* out, float* lse, const void* q, const void* k, const void* v,
                             const int32_t* cu_seqlens, int64_t num_segments, int64_t max_seqlen, int64_t T,
                             int64_t NH, int64_t NKV, int64_t HD, int64_t ldq, int64_t ldk, int64_t ldv,
                             cudaStream_t stream);

// Same arguments as attention_backward; workspace is attention_backward_workspace_bytes with kCudnn:
// softmax_sum (T x NH fp32) at 0, the fp32 dq accumulator 256-byte aligned after it: T x NH x HD,
// or T x ld_q for packed documents.
void cudnn_attention_backward(CudnnDtype dt, void* dq, void* dk, void* dv, const void* dout, const void* q,
                              const void* k, const void* v, const void* out, const float* lse,
                              const int32_t* cu_seqlens, int64_t num_segments, int64_t max_seqlen, int64_t T,
                              int64_t NH, int64_t NKV, int64_t HD, int64_t ldq, int64_t ldk, int64_t ldv,
                              void* workspace, cudaStream_t stream);

// kCudnn runs cuDNN unless the ragged offsets (int32 elements) of a packed batch would overflow;
// then our kernels run, with nondeterministic dq.
inline bool cudnn_runs(int64_t num_segments, int64_t T, int64_t max_ld, const AttentionOptions& opt) {
  return (num_segments == 1 && opt.max_seqlen == T) || T * max_ld < (int64_t(1) << 31);
}
template <typename T>
constexpr CudnnDtype cudnn_dtype() {
  return std::is_same_v<T, __half> ? CudnnDtype::kFp16 : CudnnDtype::kBf16;
}

}  // namespace attn_detail
}  // namespace longtune::cuda
