// Single-GPU training engine: the model (LlamaGpu), fp32 master weights, AdamW moments and the fp32
// gradient accumulator all on the device, plus the compute-dtype weight copy the kernels read.
// One optimizer step = accumulate() per micro-batch, then optimizer_step().
//
// fp16 (V100): dynamic loss scaling as torch.cuda.amp.GradScaler does it: the loss is multiplied
// by the scale before backward; a step whose gradients hold inf/nan is skipped and the scale
// halved; after `loss_scale_window` good steps in a row it doubles. The update divides the
// gradient by the scale on the fly (exact: the scale is a power of two). bf16 uses scale 1.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "src/gpu/device_memory.hpp"
#include "src/gpu/llama_gpu.hpp"
#include "src/optim/adamw.hpp"

namespace longtune::gpu {

struct GpuEngineOptions {
  GpuModelOptions model;
  double initial_loss_scale = 65536.0;  // fp16 only
  int64_t loss_scale_window = 2000;     // good steps before the scale doubles
};

// Device memory of the whole engine, by part (what `train` prints and refuses on).
struct GpuMemoryPlan {
  size_t state = 0;        // fp32 master + exp_avg + exp_avg_sq + grad
  size_t weights = 0;      // compute-dtype copy
  size_t activations = 0;  // LlamaGpu::activation_bytes
  size_t library = 0;      // cuBLASLt workspace and context, allowance
  size_t total() const { return state + weights + activations + library; }
  std::string describe() const;
};

struct GpuStepInfo {
  AdamWStepInfo optim;
  bool skipped = false;      // fp16 overflow: no update
  double loss_scale = 1.0;   // scale used for this step's gradients
};

class GpuEngine {
 public:
  static GpuMemoryPlan plan(const LlamaConfig& cfg, const GpuEngineOptions& opt);
  // The --recompute option: "none", "layer", or "auto" (none when the plan fits in 95% of the free
  // device memory, else layer). ConfigError for other names.
  static Recompute choose_recompute(const std::string& name, const LlamaConfig& cfg, GpuEngineOptions opt);

  // Allocates everything (ConfigError with the plan's numbers when it does not fit).
  GpuEngine(const LlamaConfig& cfg, const ParamTable& table, const AdamWConfig& adamw, const GpuEngineOptions& opt);
  ~GpuEngine();
  GpuEngine(const GpuEngine&) = delete;
  GpuEngine& operator=(const GpuEngine&) = delete;

  // Host flat arrays (ParamTable layout, table.total_elements()) to and from the device state.
  // exp_avg / exp_avg_sq may be null on upload (zeros).
  void upload_state(const float* master, const float* exp_avg, const float* exp_avg_sq);
  void download_state(float* master, float* exp_avg, float* exp_avg_sq);
  // The fp32 gradient accumulator (tests).
  void download_grads(float* grads);
  // Synthetic weights: N(0, std) for matrices, 1 for norm weights (benchmarks), moments zero.
  void init_random(uint64_t seed, float std = 0.02f);

  // One micro-batch: loss, and gradients += d(loss_sum / global_targets)/d params.
  LossSum accumulate(const PackedBatch& batch, int64_t global_targets);
  // Clip, AdamW (or skip on fp16 overflow), zero the gradients.
  GpuStepInfo optimizer_step(int64_t step, double lr);
  LossSum evaluate(const PackedBatch& batch);

  double loss_scale() const { return loss_scale_; }
  void set_loss_scale(double s) { loss_scale_ = s; }
  const GpuMemoryPlan& memory_plan() const { return plan_; }
  size_t peak_device_bytes() const;  // what the process holds on the device, library allocations included
  cudaStream_t stream() const { return stream_; }
  void synchronize();

 private:
  const ParamTable& table_;
  AdamWConfig adamw_cfg_;
  GpuEngineOptions opt_;
  GpuMemoryPlan plan_;
  cudaStream_t stream_ = nullptr;
  DeviceArena state_arena_, act_arena_;
  float *master_ = nullptr, *exp_avg_ = nullptr, *exp_avg_sq_ = nullptr, *grad_ = nullptr;
  uint16_t* weights_ = nullptr;
  void* ranges_ = nullptr;  // cuda::DeviceOptimRange[num_ranges_]
  int64_t num_ranges_ = 0;
  void* reduce_scratch_ = nullptr;
  double* norm_sq_ = nullptr;
  int32_t* nonfinite_ = nullptr;
  std::unique_ptr<PinnedBuffer> host_flags_;
  std::unique_ptr<AdamW> host_rules_;  // clip coefficient and scalars, shared with the CPU engine
  std::unique_ptr<LlamaGpu> model_;
  double loss_scale_ = 1.0;
  int64_t good_steps_ = 0;
  size_t baseline_used_ = 0;  // device memory in use before the engine allocated
};

}  // namespace longtune::gpu
