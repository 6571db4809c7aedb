#pragma once
#include <cstdint>

namespace longtune::cpu {

// Causal grouped-query attention over a packed token stream.
// The stream holds segments (documents, or chunks of long ones) [cu_seqlens[s], cu_seqlens[s+1]),
// s < num_segments, cu_seqlens[0] = 0, cu_seqlens[num_segments] = T. Token i attends to tokens j
// of its own segment with j <= i; never across a segment boundary.
// q (T, NH, HD), k and v (T, NKV, HD), query head h reads kv head h / (NH / NKV).
// out (T, NH, HD) ; lse (T, NH) = log-sum-exp of the scaled scores, saved for backward.
// scale = 1 / sqrt(HD).
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* cu_seqlens, int64_t num_segments, int64_t T, int64_t NH, int64_t NKV,
                       int64_t HD);
// dq (T, NH, HD), dk and dv (T, NKV, HD): all assigned.
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                        const float* v, const float* out, const float* lse, const int32_t* cu_seqlens,
                        int64_t num_segments, int64_t T, int64_t NH, int64_t NKV, int64_t HD);

}  // namespace longtune::cpu
