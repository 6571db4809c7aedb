// The whole Llama model on one GPU: forward and backward over one packed micro-batch, built from
// the CUDA kernels (kernels/cuda). Twin of src/model/llama_cpu.hpp, which is its oracle.
//
// Weights are read block by block (ParamTable blocks: embedding, each decoder layer, head) through
// a GpuParamAccess, in the compute dtype (bf16 or fp16), ParamTable layout; gradients are added
// (+=) in fp32, same layout. The single-GPU engine hands out one flat buffer (FlatGpuParams); the
// sharded and offloading engine gathers or streams each block into a slot and reduces each block's
// gradient as soon as it is complete -- the model cannot tell the difference. q/k/v and gate/up run
// as one fused projection each when the table stores them back to back (it does for every real
// model shape). Activation memory is planned once for micro-batches of up to max_tokens tokens:
//   Recompute::kNone   every layer keeps what its backward needs (fastest, most memory);
//   Recompute::kLayer  only each layer's input is kept; backward recomputes the layer's forward.
// With kLayer, two options bound the long-sequence memory (issue 6, point 3):
//   offload_activations  the L+1 layer inputs live in pinned host memory (host_activation_bytes):
//                        forward copies each one out on a copy stream as soon as it exists, backward
//                        prefetches layer l-1's input while layer l runs; the device keeps a ring of
//                        two (T, C) buffers. Stream-ordered with events; the results are bit-identical.
//   mlp_chunk            the MLP runs over tiles of that many tokens (forward, and recomputed tile by
//                        tile in backward), so gate|up, SwiGLU and their gradients take
//                        12 * F * mlp_chunk bytes (bf16) instead of 12 * F * T. Loss and gradients
//                        equal the untiled ones up to float rounding (the GEMM shapes change).
// The model knows nothing of optimizers or parallelism.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "kernels/cuda/attention.cuh"
#include "src/common/dtype.hpp"
#include "src/data/packed_batch.hpp"
#include "src/gpu/device_memory.hpp"
#include "src/model/llama_config.hpp"
#include "src/model/llama_cpu.hpp"  // LossSum
#include "src/model/param_table.hpp"

namespace longtune::gpu {

enum class Recompute { kNone, kLayer };

struct GpuModelOptions {
  DType compute_dtype = DType::BF16;  // BF16 or F16
  Recompute recompute = Recompute::kLayer;
  cuda::AttentionKernel attention_kernel = cuda::AttentionKernel::kAuto;
  bool nondeterministic_attention = false;  // fp32 atomics for dq (faster, not bit-reproducible)
  int64_t max_tokens = 0;                   // rows * seq_len of the largest micro-batch
  int64_t loss_chunk = 0;                   // tokens per lm_head + cross-entropy chunk (0: auto, ~1.5 GiB scratch)
  // Recompute::kLayer only (ConfigError with kNone): the layer inputs in pinned host memory, a ring of
  // two on the device (see above).
  bool offload_activations = false;
  // Recompute::kLayer only (ignored with kNone, which keeps gate|up for its backward): tokens per MLP
  // tile, 0 = the whole micro-batch in one tile.
  int64_t mlp_chunk = 0;
};

// The CUDA twin of src/model/param_access.hpp. Calls are made on the host in stream order: what
// acquire() returns may be used by work enqueued on the model's stream after the call.
class GpuParamAccess {
 public:
  virtual ~GpuParamAccess() = default;
  // Block `block`'s weights: a base pointer B such that B + table.at(entry).offset (elements of the
  // compute dtype) addresses every entry of the block. Valid until release(block).
  virtual const void* acquire(int block) = 0;
  virtual void release(int block) = 0;
  // Block `block`'s fp32 gradient, same addressing (grads accumulate with +=); valid from the first
  // call for the block until grads_done(block), which says they are complete for this micro-batch.
  virtual float* grads(int block) = 0;
  virtual void grads_done(int block) = 0;
  // Every kernel of the micro-batch is enqueued and the model is about to wait for the stream: host
  // work placed here overlaps the GPU (the offload engine's delayed CPU update).
  virtual void enqueued() {}
};

// Everything in two flat device buffers of ParamTable layout.
class FlatGpuParams final : public GpuParamAccess {
 public:
  FlatGpuParams(const void* weights, float* grads) : weights_(weights), grads_(grads) {}
  const void* acquire(int) override { return weights_; }
  void release(int) override {}
  float* grads(int) override { return grads_; }
  void grads_done(int) override {}

 private:
  const void* weights_;
  float* grads_;
};

// A base pointer for GpuParamAccess::acquire/grads: `slot` holds the block that starts at flat
// element `block_begin`. (Address arithmetic on integers: the base may lie before the slot.)
inline const void* block_base(const void* slot, int64_t block_begin, size_t elem_bytes) {
  return reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(slot) - uintptr_t(block_begin) * elem_bytes);
}

// "auto" | "tensor-core" (sm_80+, bf16/fp16) | "sm75" (fp16, V100/T4-class instructions only) |
// "cudnn" (cuDNN fused attention, sm_80+, not bit-reproducible):
// the --attention option. Throws ConfigError for other names.
cuda::AttentionKernel attention_kernel_from_name(const std::string& name);

class LlamaGpu {
 public:
  // Device bytes the model's activations and scratch take for these options (the planner's number).
  static size_t activation_bytes(const LlamaConfig& cfg, const GpuModelOptions& opt);
  // Pinned host bytes the model allocates for offloaded layer inputs (0 without offload_activations).
  static size_t host_activation_bytes(const LlamaConfig& cfg, const GpuModelOptions& opt);
  // Device memory the libraries allocate themselves: cuBLASLt handle + workspace, CUDA context
  // growth, and with --attention cudnn the plans' workspace (measured 256 MiB at 16K on H200).
  static size_t library_bytes(const GpuModelOptions& opt);

  // Carves its buffers from `arena` (activation_bytes of it). Runs on `stream`.
  LlamaGpu(const LlamaConfig& cfg, const ParamTable& table, const GpuModelOptions& opt, DeviceArena& arena,
           cudaStream_t stream);
  ~LlamaGpu();
  LlamaGpu(const LlamaGpu&) = delete;
  LlamaGpu& operator=(const LlamaGpu&) = delete;

  // Loss of one micro-batch (evaluation). weights: compute dtype, ParamTable layout, on the device.
  LossSum forward(const void* weights, const PackedBatch& batch);
  LossSum forward(GpuParamAccess& params, const PackedBatch& batch);
  // Forward and backward: grads (fp32, ParamTable layout, device) += d(loss_sum * grad_scale)/d params.
  // grad_scale = loss scale / counted targets of the global batch. Returns after the loss is known
  // (the gradients may still be in flight on the stream).
  LossSum forward_backward(const void* weights, float* grads, const PackedBatch& batch, double grad_scale);
  LossSum forward_backward(GpuParamAccess& params, const PackedBatch& batch, double grad_scale);

  const GpuModelOptions& options() const { return opt_; }

  struct Impl;  // per storage type, in the .cpp

 private:
  GpuModelOptions opt_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace longtune::gpu
