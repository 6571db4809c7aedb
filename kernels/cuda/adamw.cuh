// AdamW and the gradient reductions on the GPU, with exactly the per-element arithmetic of
// src/optim/adamw.hpp (torch.optim.AdamW order, fp32, no FMA contraction: __fmul_rn/__fadd_rn),
// so a GPU step and a CPU step from the same state give bit-identical fp32 weights.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "src/common/dtype.hpp"

namespace longtune::cuda {

// A run of trained elements of the flat arrays (src/optim/adamw.hpp OptimRange), on the device.
struct DeviceOptimRange {
  int64_t offset;
  int64_t numel;
  int32_t decay;
};

// Scalars of one update, all rounded to fp32 on the host as src/optim/adamw.cpp does.
struct AdamWScalars {
  float lr, beta1, beta2, eps, weight_decay;
  float one_minus_beta1, one_minus_beta2, lr_times_wd, step_size, sqrt_bc2;
  float grad_coef;  // clip coefficient times 1/loss_scale (fp16), applied to g on the fly
  // float(1 - lr * weight_decay) rounded once from double (1 when weight_decay == 0): decay ranges
  // multiply p by it, as the CPU does (1 - lr_times_wd in fp32 can differ in the last bit). Fill
  // the struct from longtune::adamw_step_scalars (src/optim/adamw.hpp); adamw_update rejects <= 0.
  float decay_factor;
};

// Sum over the ranges of g^2 (squares and sums in double, as the CPU), deterministic: fixed blocks,
// block partials added in block order. total_elements: the length of the flat arrays (padding
// included; every range must end at or before it). Result written to *out_sum
// (device double). Also sets *out_nonfinite (device int) to 1 if any gradient is inf/nan, else 0.
// scratch: adamw_reduce_scratch_bytes(total) bytes.
void grad_norm_sq(double* out_sum, int32_t* out_nonfinite, const float* grad, const DeviceOptimRange* ranges,
                  int64_t num_ranges, int64_t total_elements, void* scratch, cudaStream_t stream);
size_t adamw_reduce_scratch_bytes(int64_t total_elements);

// master, exp_avg, exp_avg_sq updated in place over the ranges; compute (optional) receives
// bf16/fp16(master) (round to nearest even), padding never touched.
void adamw_update(float* master, float* exp_avg, float* exp_avg_sq, const float* grad, uint16_t* compute,
                  DType compute_dtype, const DeviceOptimRange* ranges, int64_t num_ranges, const AdamWScalars& s,
                  cudaStream_t stream);

// out[0] = sum_i x[i] in double, deterministic (fixed-order tree). scratch as above for n.
void sum_deterministic(double* out, const float* x, int64_t n, void* scratch, cudaStream_t stream);

// x[i] = fp32 -> storage dtype conversions of whole flat arrays (weights to the compute copy).
void convert_f32(uint16_t* out, DType out_dtype, const float* inp, int64_t n, cudaStream_t stream);

// out[i] = inp[i] (bf16 or fp16; F32 copies) widened to fp32, exact (NaN payloads kept): a gradient
// piece reduced in bf16 back into the fp32 accumulators. CPU twin: longtune::convert_to_f32 in
// src/common/dtype.hpp, bit for bit.
void convert_to_f32(float* out, const uint16_t* inp, DType inp_dtype, int64_t n, cudaStream_t stream);

// acc[i] += x[i] (fp32): a rank's gradient shard accumulating one micro-batch's reduced piece.
// CPU twin: accumulate_f32 in kernels/cpu/elementwise.hpp.
void accumulate_f32(float* acc, const float* x, int64_t n, cudaStream_t stream);

}  // namespace longtune::cuda
