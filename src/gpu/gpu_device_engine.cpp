// The trainer's DeviceEngine on one GPU (src/train/device_engine.hpp), built on GpuEngine.
#include <cuda_runtime.h>

#include <string>

#include "kernels/cuda/cuda_check.cuh"
#include "src/common/error.hpp"
#include "src/gpu/gpu_engine.hpp"
#include "src/train/device_engine.hpp"

namespace longtune {

namespace {

// Dense bf16/fp16 tensor-core FLOP/s: per-SM rate per clock of the architecture x SMs x clock.
double device_peak_flops(int device) {
  cudaDeviceProp p{};
  CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  int clock_khz = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
  const double per_sm_per_clock = p.major >= 9 ? 4096.0 : (p.major == 8 && p.minor == 0) ? 2048.0 : 1024.0;
  return per_sm_per_clock * double(p.multiProcessorCount) * double(clock_khz) * 1e3;
}

class GpuDeviceEngine final : public DeviceEngine {
 public:
  GpuDeviceEngine(const LlamaConfig& cfg, const ParamTable& table, const AdamWConfig& adamw,
                  const gpu::GpuEngineOptions& opt)
      : engine_(cfg, table, adamw, opt), opt_(opt) {
    CUDA_CHECK(cudaGetDevice(&device_));
    peak_flops_ = device_peak_flops(device_);
  }

  void upload_state(const float* master, const float* m, const float* v) override { engine_.upload_state(master, m, v); }
  void download_state(float* master, float* m, float* v) override { engine_.download_state(master, m, v); }

  DeviceStepResult train_step(const std::vector<PackedBatch>& micro_batches, int64_t global_targets, int64_t step,
                              double lr) override {
    DeviceStepResult r;
    r.loss_scale = engine_.loss_scale();
    if (global_targets == 0) {  // nothing to learn from: no update (as the CPU engine does)
      r.skipped = true;
      return r;
    }
    for (const PackedBatch& b : micro_batches) r.loss += engine_.accumulate(b, global_targets);
    const gpu::GpuStepInfo info = engine_.optimizer_step(step, lr);
    r.optim = info.optim;
    r.skipped = info.skipped;
    r.loss_scale = info.loss_scale;
    return r;
  }

  LossSum evaluate(const PackedBatch& batch) override { return engine_.evaluate(batch); }
  double loss_scale() const override { return engine_.loss_scale(); }
  void set_loss_scale(double s) override { engine_.set_loss_scale(s); }

  std::string describe() const override {
    cudaDeviceProp p{};
    CUDA_CHECK(cudaGetDeviceProperties(&p, device_));
    return "GPU " + std::to_string(device_) + ": " + p.name + " (sm_" + std::to_string(p.major) +
           std::to_string(p.minor) + ") | " +
           (opt_.model.compute_dtype == DType::F16 ? "fp16 + loss scaling" : "bf16") + " | recompute " +
           (opt_.model.recompute == gpu::Recompute::kNone ? "none" : "per layer") + " | device memory: " +
           engine_.memory_plan().describe();
  }
  double peak_memory_gib() const override { return double(engine_.peak_device_bytes()) / double(1ull << 30); }
  double peak_flops() const override { return peak_flops_; }

 private:
  gpu::GpuEngine engine_;
  gpu::GpuEngineOptions opt_;
  int device_ = 0;
  double peak_flops_ = 0;
};

}  // namespace

void check_device(const TrainConfig& cfg) {
  if (cuda::device_count() == 0)
    throw ConfigError("--device cuda: expected a visible CUDA GPU, found none (CUDA_VISIBLE_DEVICES, driver?)");
  if (cfg.dtype == "bf16") {
    cudaDeviceProp p{};
    CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
    if (p.major < 8)
      throw ConfigError("--dtype bf16: expected a GPU of compute capability 8.0 or newer, got " + std::string(p.name) +
                        " (sm_" + std::to_string(p.major) + std::to_string(p.minor) + "): use --dtype fp16");
  }
}

std::unique_ptr<DeviceEngine> make_device_engine(const DeviceEngineOptions& o, const LlamaConfig& model_cfg,
                                                 const ParamTable& table) {
  if (cuda::device_count() == 0)
    throw ConfigError("--device cuda: expected a visible CUDA GPU, found none (CUDA_VISIBLE_DEVICES, driver?)");
  gpu::GpuEngineOptions opt;
  opt.model.compute_dtype = o.dtype == "fp16" ? DType::F16 : DType::BF16;
  opt.model.max_tokens = o.max_tokens;
  opt.model.attention_kernel = gpu::attention_kernel_from_name(o.attention);
  opt.model.recompute = gpu::GpuEngine::choose_recompute(o.recompute, model_cfg, opt);
  if (opt.model.compute_dtype == DType::BF16) {
    cudaDeviceProp p{};
    CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
    if (p.major < 8)
      throw ConfigError("--dtype bf16: expected a GPU of compute capability 8.0 or newer, got " + std::string(p.name) +
                        " (sm_" + std::to_string(p.major) + std::to_string(p.minor) + "): use --dtype fp16");
  }
  return std::make_unique<GpuDeviceEngine>(model_cfg, table, o.adamw, opt);
}

}  // namespace longtune
