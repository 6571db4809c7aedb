// Whole-array elementwise ops of the training engines (not of the model).
#pragma once
#include <cstdint>

namespace longtune::cpu {

// acc[i] += x[i]: a gradient shard accumulating one micro-batch's piece.
void accumulate_f32(float* acc, const float* x, int64_t n);
// acc[i] = bf16(float(acc[i]) + x[i]) (round to nearest even): a bf16 host gradient accumulating
// a later micro-batch's fp32 piece.
void accumulate_bf16(uint16_t* acc, const float* x, int64_t n);

}  // namespace longtune::cpu
