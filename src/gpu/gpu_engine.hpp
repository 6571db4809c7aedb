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
#include <optional>
#include <string>

#include "kernels/cuda/adamw.cuh"
#include "src/common/error.hpp"
#include "src/gpu/device_memory.hpp"
#include "src/gpu/llama_gpu.hpp"
#include "src/optim/adamw.hpp"

namespace longtune::gpu {

struct GpuEngineOptions {
  GpuModelOptions model;
  double initial_loss_scale = 65536.0;  // fp16 only
  int64_t loss_scale_window = 2000;     // good steps before the scale doubles
};

// Memory of the whole engine, by part (what `train` prints and refuses on).
struct GpuMemoryPlan {
  // device
  size_t state = 0;        // fp32 master + exp_avg + exp_avg_sq + grad
  size_t weights = 0;      // compute-dtype copy
  size_t activations = 0;  // LlamaGpu::activation_bytes
  size_t library = 0;      // cuBLASLt workspace and context, allowance
  // host
  size_t host_pinned = 0;  // offloaded layer inputs (LlamaGpu::host_activation_bytes, whole pages)
  size_t total() const { return state + weights + activations + library; }  // device
  std::string describe() const;
};

struct GpuStepInfo {
  AdamWStepInfo optim;
  bool skipped = false;      // fp16 overflow: no update
  double loss_scale = 1.0;   // scale used for this step's gradients
};

// The CPU's AdamW scalars of one step (src/optim/adamw.hpp) in the CUDA update's struct, so a GPU
// step equals a CPU step bit for bit.
cuda::AdamWScalars device_adamw_scalars(const AdamWConfig& cfg, int64_t step, double lr, float grad_coef);

// What a step does with its global gradient norm, for both GPU engines: fp16 dynamic loss scaling
// (skip and halve on inf/nan, double after `window` good steps), bf16 refusing non-finite
// gradients, and the clip coefficient.
class LossScaler {
 public:
  LossScaler(DType compute_dtype, double initial_scale, int64_t window)
      : fp16_(compute_dtype == DType::F16), scale_(fp16_ ? initial_scale : 1.0), window_(window) {}
  double scale() const { return scale_; }
  void set_scale(double s) { scale_ = s; }
  // norm_sq: global sum of squares of the scaled gradients. Fills info; returns the coefficient the
  // update multiplies the gradients by (clip / scale: exact, the scale is a power of two), or
  // nothing when the step is skipped. Throws NumericalError for non-finite bf16 gradients.
  std::optional<float> decide(double norm_sq, bool nonfinite, int64_t step, const AdamW& rules, GpuStepInfo* info);

 private:
  bool fp16_;
  double scale_;
  int64_t window_, good_steps_ = 0;
};

// --recompute none | layer | auto into opt->model, for either engine's options: auto keeps every
// activation (kNone, and then no layer inputs to offload) when device_bytes(that choice) fits in 95%
// of `device_free` (0: the current GPU's free memory), else recomputes per layer with the
// activation options as asked. ConfigError for other names, and for none with offload_activations.
template <class EngineOptions, class DeviceBytes>
void apply_recompute_option(const std::string& name, EngineOptions* opt, size_t device_free,
                            DeviceBytes device_bytes) {
  if (name != "none" && name != "layer" && name != "auto")
    throw ConfigError("--recompute: expected none, layer or auto, got '" + name + "'");
  if (name == "none" && opt->model.offload_activations)
    throw ConfigError("--offload-activations: expected --recompute layer or auto, got --recompute none");
  if (name != "auto") {
    opt->model.recompute = name == "none" ? Recompute::kNone : Recompute::kLayer;
    return;
  }
  EngineOptions keep = *opt;
  keep.model.recompute = Recompute::kNone;
  keep.model.offload_activations = false;
  if (device_free == 0) device_free = device_memory_info().free;
  if (double(device_bytes(keep)) <= 0.95 * double(device_free)) *opt = keep;
  else opt->model.recompute = Recompute::kLayer;
}

class GpuEngine {
 public:
  static GpuMemoryPlan plan(const LlamaConfig& cfg, const GpuEngineOptions& opt);
  // The --recompute option into opt->model: "none", "layer", or "auto" (none when the plan fits in
  // 95% of `device_free` bytes, 0: the current GPU's free memory; else layer). Activation offload
  // needs layer: auto turns it off when it picks none, and keeps what the user asked for with
  // layer. ConfigError for other names, and for none with offload_activations.
  static void apply_recompute(const std::string& name, const LlamaConfig& cfg, GpuEngineOptions* opt,
                              size_t device_free = 0);

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

  double loss_scale() const { return scaler_.scale(); }
  void set_loss_scale(double s) { scaler_.set_scale(s); }
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
  LossScaler scaler_;
  size_t baseline_used_ = 0;  // device memory in use before the engine allocated
};

}  // namespace longtune::gpu
