#include "src/gpu/gpu_engine.hpp"

#include <cmath>
#include <vector>

#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/random.cuh"
#include "src/common/error.hpp"
#include "src/memory/host_memory.hpp"

namespace longtune::gpu {

namespace {

size_t state_bytes(int64_t n) { return 4 * align_up(size_t(n) * sizeof(float)); }

}  // namespace

cuda::AdamWScalars device_adamw_scalars(const AdamWConfig& cfg, int64_t step, double lr, float grad_coef) {
  const AdamWStepScalars h = adamw_step_scalars(cfg, step, lr, grad_coef);
  cuda::AdamWScalars s;
  s.lr = h.lr, s.beta1 = h.beta1, s.beta2 = h.beta2, s.eps = h.eps, s.weight_decay = h.weight_decay;
  s.one_minus_beta1 = h.one_minus_beta1, s.one_minus_beta2 = h.one_minus_beta2, s.lr_times_wd = h.lr_times_wd;
  s.step_size = h.step_size, s.sqrt_bc2 = h.sqrt_bc2, s.grad_coef = h.grad_coef, s.decay_factor = h.decay_factor;
  return s;
}

std::optional<float> LossScaler::decide(double norm_sq, bool nonfinite, int64_t step, const AdamW& rules,
                                        GpuStepInfo* info) {
  info->loss_scale = scale_;
  if (nonfinite) {
    if (!fp16_)
      throw NumericalError("step " + std::to_string(step) + ": non-finite gradient in bf16 training (inf/nan); "
                           "lower --lr or check the data");
    // Skip the update, halve the scale (torch.cuda.amp.GradScaler).
    info->skipped = true;
    info->optim.grad_norm = std::nan("");
    scale_ = std::max(scale_ * 0.5, 1.0);
    good_steps_ = 0;
    return std::nullopt;
  }
  info->optim.grad_norm = std::sqrt(norm_sq) / scale_;
  info->optim.clip_coef = rules.clip_coefficient(info->optim.grad_norm);
  // The gradient is divided by the loss scale on the fly: a power of two, so exact.
  const float grad_coef = info->optim.clip_coef * float(1.0 / scale_);
  if (fp16_ && ++good_steps_ >= window_) {
    scale_ *= 2.0;
    good_steps_ = 0;
  }
  return grad_coef;
}

std::string GpuMemoryPlan::describe() const {
  std::string s = "state " + format_bytes(double(state)) + " + weights " + format_bytes(double(weights)) +
                  " + activations " + format_bytes(double(activations)) + " + libraries " +
                  format_bytes(double(library)) + " = " + format_bytes(double(total()));
  if (host_pinned) s += "; host: pinned activations " + format_bytes(double(host_pinned));
  return s;
}

GpuMemoryPlan GpuEngine::plan(const LlamaConfig& cfg, const GpuEngineOptions& opt) {
  const ParamTable table(cfg);
  GpuMemoryPlan p;
  const int64_t n = table.total_elements();
  p.state = state_bytes(n);
  p.weights = align_up(size_t(n) * 2);
  p.activations = LlamaGpu::activation_bytes(cfg, opt.model);
  p.library = LlamaGpu::library_bytes(opt.model);
  p.host_pinned = round_up_to_pages(LlamaGpu::host_activation_bytes(cfg, opt.model));
  return p;
}

void GpuEngine::apply_recompute(const std::string& name, const LlamaConfig& cfg, GpuEngineOptions* opt,
                                size_t device_free) {
  apply_recompute_option(name, opt, device_free, [&](const GpuEngineOptions& o) { return plan(cfg, o).total(); });
}

GpuEngine::GpuEngine(const LlamaConfig& cfg, const ParamTable& table, const AdamWConfig& adamw,
                     const GpuEngineOptions& opt)
    : table_(table),
      adamw_cfg_(adamw),
      opt_(opt),
      plan_(plan(cfg, opt)),
      scaler_(opt.model.compute_dtype, opt.initial_loss_scale, opt.loss_scale_window) {
  baseline_used_ = check_device_memory(plan_.total(), plan_.describe(),
                                       "shorter --seq-len, smaller --micro-batch, --recompute layer, "
                                       "--offload-activations true, --mlp-chunk 4096; longtune plan");
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));

  const int64_t n = table.total_elements();
  const std::vector<OptimRange> ranges = optim_ranges(table);
  num_ranges_ = int64_t(ranges.size());
  const size_t ranges_bytes = align_up(ranges.size() * sizeof(cuda::DeviceOptimRange));
  const size_t scratch_bytes = align_up(cuda::adamw_reduce_scratch_bytes(n));
  state_arena_.allocate(plan_.state + plan_.weights + ranges_bytes + scratch_bytes + 2 * kDeviceAlign,
                        "GPU training state");
  master_ = state_arena_.take_n<float>(n);
  exp_avg_ = state_arena_.take_n<float>(n);
  exp_avg_sq_ = state_arena_.take_n<float>(n);
  grad_ = state_arena_.take_n<float>(n);
  weights_ = state_arena_.take_n<uint16_t>(n);
  ranges_ = state_arena_.take(ranges_bytes);
  reduce_scratch_ = state_arena_.take(scratch_bytes);
  norm_sq_ = state_arena_.take_n<double>(1);
  nonfinite_ = state_arena_.take_n<int32_t>(1);
  std::vector<cuda::DeviceOptimRange> dev_ranges;
  for (const OptimRange& r : ranges) dev_ranges.push_back({r.offset, r.numel, r.decay ? 1 : 0});
  CUDA_CHECK(cudaMemcpy(ranges_, dev_ranges.data(), dev_ranges.size() * sizeof(cuda::DeviceOptimRange),
                        cudaMemcpyHostToDevice));
  // Everything zero: padding included, so the compute copy's gaps are defined.
  CUDA_CHECK(cudaMemsetAsync(master_, 0, state_bytes(n) + align_up(size_t(n) * 2), stream_));
  host_flags_ = std::make_unique<PinnedBuffer>(sizeof(double) + sizeof(int32_t));
  host_rules_ = std::make_unique<AdamW>(ranges, n, adamw);

  act_arena_.allocate(plan_.activations, "GPU activations");
  model_ = std::make_unique<LlamaGpu>(cfg, table, opt.model, act_arena_, stream_);
  synchronize();
}

GpuEngine::~GpuEngine() {
  model_.reset();
  if (stream_) cudaStreamDestroy(stream_);
}

void GpuEngine::synchronize() { CUDA_CHECK(cudaStreamSynchronize(stream_)); }

void GpuEngine::upload_state(const float* master, const float* exp_avg, const float* exp_avg_sq) {
  const size_t bytes = size_t(table_.total_elements()) * sizeof(float);
  CUDA_CHECK(cudaMemcpyAsync(master_, master, bytes, cudaMemcpyHostToDevice, stream_));
  if (exp_avg) CUDA_CHECK(cudaMemcpyAsync(exp_avg_, exp_avg, bytes, cudaMemcpyHostToDevice, stream_));
  else CUDA_CHECK(cudaMemsetAsync(exp_avg_, 0, bytes, stream_));
  if (exp_avg_sq) CUDA_CHECK(cudaMemcpyAsync(exp_avg_sq_, exp_avg_sq, bytes, cudaMemcpyHostToDevice, stream_));
  else CUDA_CHECK(cudaMemsetAsync(exp_avg_sq_, 0, bytes, stream_));
  CUDA_CHECK(cudaMemsetAsync(grad_, 0, bytes, stream_));
  cuda::convert_f32(weights_, opt_.model.compute_dtype, master_, table_.total_elements(), stream_);
  synchronize();
}

void GpuEngine::download_state(float* master, float* exp_avg, float* exp_avg_sq) {
  const size_t bytes = size_t(table_.total_elements()) * sizeof(float);
  CUDA_CHECK(cudaMemcpyAsync(master, master_, bytes, cudaMemcpyDeviceToHost, stream_));
  if (exp_avg) CUDA_CHECK(cudaMemcpyAsync(exp_avg, exp_avg_, bytes, cudaMemcpyDeviceToHost, stream_));
  if (exp_avg_sq) CUDA_CHECK(cudaMemcpyAsync(exp_avg_sq, exp_avg_sq_, bytes, cudaMemcpyDeviceToHost, stream_));
  synchronize();
}

void GpuEngine::download_grads(float* grads) {
  CUDA_CHECK(cudaMemcpyAsync(grads, grad_, size_t(table_.total_elements()) * sizeof(float), cudaMemcpyDeviceToHost,
                             stream_));
  synchronize();
}

void GpuEngine::init_random(uint64_t seed, float std) {
  const int64_t n = table_.total_elements();
  CUDA_CHECK(cudaMemsetAsync(master_, 0, size_t(n) * 4 * 4, stream_));
  const float one = 1.0f;
  for (size_t e = 0; e < table_.entries().size(); ++e) {
    const ParamEntry& pe = table_.at(e);
    if (pe.shape.size() >= 2) {
      cuda::fill_normal(master_ + pe.offset, pe.numel, 0.0f, std, seed + e, stream_);
    } else {
      // Norm weights start at 1, as transformers initializes them.
      std::vector<float> ones(size_t(pe.numel), one);
      CUDA_CHECK(cudaMemcpyAsync(master_ + pe.offset, ones.data(), ones.size() * 4, cudaMemcpyHostToDevice, stream_));
      synchronize();
    }
  }
  cuda::convert_f32(weights_, opt_.model.compute_dtype, master_, n, stream_);
  synchronize();
}

LossSum GpuEngine::accumulate(const PackedBatch& batch, int64_t global_targets) {
  const double scale = global_targets > 0 ? scaler_.scale() / double(global_targets) : 0.0;
  return model_->forward_backward(weights_, grad_, batch, scale);
}

LossSum GpuEngine::evaluate(const PackedBatch& batch) { return model_->forward(weights_, batch); }

GpuStepInfo GpuEngine::optimizer_step(int64_t step, double lr) {
  GpuStepInfo info;
  info.loss_scale = scaler_.scale();
  info.optim.lr = lr;
  const int64_t n = table_.total_elements();
  cuda::grad_norm_sq(norm_sq_, nonfinite_, grad_, static_cast<const cuda::DeviceOptimRange*>(ranges_), num_ranges_, n,
                     reduce_scratch_, stream_);
  auto* host = static_cast<char*>(host_flags_->get());
  CUDA_CHECK(cudaMemcpyAsync(host, norm_sq_, sizeof(double), cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaMemcpyAsync(host + sizeof(double), nonfinite_, sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
  synchronize();
  const double norm_sq = *reinterpret_cast<double*>(host);
  const bool nonfinite = *reinterpret_cast<int32_t*>(host + sizeof(double)) != 0;
  if (const std::optional<float> grad_coef = scaler_.decide(norm_sq, nonfinite, step, *host_rules_, &info)) {
    const cuda::AdamWScalars s = device_adamw_scalars(adamw_cfg_, step, lr, *grad_coef);
    cuda::adamw_update(master_, exp_avg_, exp_avg_sq_, grad_, weights_, opt_.model.compute_dtype,
                       static_cast<const cuda::DeviceOptimRange*>(ranges_), num_ranges_, s, stream_);
  }
  CUDA_CHECK(cudaMemsetAsync(grad_, 0, size_t(n) * sizeof(float), stream_));
  return info;
}

size_t GpuEngine::peak_device_bytes() const {
  const DeviceMemoryInfo mem = device_memory_info();
  return mem.total - mem.free - baseline_used_;
}

}  // namespace longtune::gpu
