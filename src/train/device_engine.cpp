#include "src/train/device_engine.hpp"

#include "src/common/error.hpp"

namespace longtune {

DeviceEngineOptions device_engine_options(const TrainConfig& cfg) {
  DeviceEngineOptions o;
  o.device = cfg.device;
  o.dtype = cfg.dtype;
  o.recompute = cfg.recompute;
  o.attention = cfg.attention;
  o.offload = cfg.offload;
  o.weights = cfg.weights;
  o.delayed_update = cfg.delayed_update;
  o.host_grad_dtype = cfg.host_grad_dtype;
  o.host_weights = cfg.host_weights;
  o.offload_activations = cfg.offload_activations;
  o.mlp_chunk = cfg.mlp_chunk;
  o.grad_reduce_dtype = cfg.grad_reduce_dtype;
  if (!cfg.gpu_mem_limit.empty()) o.gpu_mem_limit = parse_byte_size(cfg.gpu_mem_limit, "gpu-mem-limit");
  o.max_tokens = cfg.seq_len * cfg.micro_batch;
  o.adamw = cfg.adamw;
  return o;
}

#if !LONGTUNE_HAVE_CUDA
// CPU-only build: src/gpu is not compiled.
void check_device(const TrainConfig& cfg) {
  throw ConfigError("--device " + cfg.device + ": expected cpu, this longtune was built without CUDA");
}

std::unique_ptr<DeviceEngine> make_device_engine(const DeviceEngineOptions& opt, const LlamaConfig& cfg,
                                                 const ParamTable& table, ShardedTrainState&) {
  return make_device_engine(opt, cfg, table);
}

void check_host_memory(const DeviceEngineOptions&, const LlamaConfig&, Comm&) {}

std::unique_ptr<DeviceEngine> make_device_engine(const DeviceEngineOptions& opt, const LlamaConfig&,
                                                 const ParamTable&) {
  throw ConfigError("--device " + opt.device + ": expected cpu, this longtune was built without CUDA");
}
#endif

}  // namespace longtune
