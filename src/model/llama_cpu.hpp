// The whole Llama model on the CPU: forward and backward over one packed micro-batch, built from
// the reference kernels. It is the oracle for the GPU engine and the engine of CPU training.
// The model knows nothing of parallelism or data loading: it reads parameters from a flat fp32
// buffer laid out by ParamTable and adds gradients into a buffer of the same layout.
#pragma once
#include <cstdint>
#include <vector>

#include "src/data/packed_batch.hpp"
#include "src/model/param_access.hpp"
#include "src/model/llama_config.hpp"
#include "src/model/param_table.hpp"

namespace longtune {

// Sum of the per-token cross-entropy over the counted targets of a batch, and their number.
// The training loss is sum / count over the whole global batch (all micro-batches, all ranks).
struct LossSum {
  double sum = 0.0;
  int64_t count = 0;
  double mean() const { return count > 0 ? sum / double(count) : 0.0; }
  LossSum& operator+=(const LossSum& o) {
    sum += o.sum;
    count += o.count;
    return *this;
  }
};

class LlamaCpu {
 public:
  LlamaCpu(const LlamaConfig& cfg, const ParamTable& table);
  ~LlamaCpu();  // out of line: LayerActs is complete only in the .cpp
  LlamaCpu(const LlamaCpu&) = delete;
  LlamaCpu& operator=(const LlamaCpu&) = delete;

  // Loss of one micro-batch. When `logits` is not null it receives the (T, V) logits.
  LossSum forward(ParamAccess& params, const PackedBatch& batch, float* logits = nullptr);
  LossSum forward(const float* params, const PackedBatch& batch, float* logits = nullptr);

  // Forward and backward of one micro-batch: grads (ParamTable layout) += d(loss_sum * grad_scale)/d params.
  // grad_scale is 1 / (number of counted targets in the global batch), so that summing over
  // micro-batches and ranks yields the gradient of the global mean loss.
  LossSum forward_backward(ParamAccess& params, const PackedBatch& batch, double grad_scale);
  LossSum forward_backward(const float* params, float* grads, const PackedBatch& batch, double grad_scale);

  const LlamaConfig& config() const { return cfg_; }

 private:
  struct LayerActs;  // saved activations of one decoder layer
  LossSum run_forward(ParamAccess& params, const PackedBatch& batch, float* logits, bool keep_for_backward);
  void check_batch(const PackedBatch& batch) const;

  LlamaConfig cfg_;
  const ParamTable& table_;
  std::vector<float> inv_freq_;  // (HD/2)
  // Saved by run_forward(keep_for_backward = true) for forward_backward.
  std::vector<LayerActs> acts_;
  std::vector<float> final_in_, final_norm_, final_rstd_;
};

}  // namespace longtune
