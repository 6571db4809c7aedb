#include "src/train/train_step.hpp"

#include <algorithm>

namespace longtune {

HostTrainState::HostTrainState(const ParamTable& table, const AdamWConfig& adamw, const NumaPlacement& placement)
    : length_(table.total_elements()),
      arena_(HostArena::bytes_for(std::vector<size_t>(4, size_t(table.total_elements()) * sizeof(float))), placement),
      master_(arena_.carve<float>(size_t(length_))),
      exp_avg_(arena_.carve<float>(size_t(length_))),
      exp_avg_sq_(arena_.carve<float>(size_t(length_))),
      grad_(arena_.carve<float>(size_t(length_))),
      adamw_(optim_ranges(table), table.total_elements(), adamw) {
  // First touch with the optimizer's own thread split, so each page lands where its updater runs.
  AdamWBuffers b{master_, exp_avg_, exp_avg_sq_, grad_, nullptr, DType::BF16};
  adamw_.first_touch(b);
  std::fill_n(master_, length_, 0.0f);
  std::fill_n(exp_avg_, length_, 0.0f);
  std::fill_n(exp_avg_sq_, length_, 0.0f);
  std::fill_n(grad_, length_, 0.0f);
}

StepResult train_step(LlamaCpu& model, HostTrainState& state, const std::vector<PackedBatch>& micro_batches,
                      int64_t step, double lr) {
  int64_t global_targets = 0;
  for (const PackedBatch& b : micro_batches) global_targets += b.num_targets();
  return train_step(model, state, micro_batches, global_targets, step, lr);
}

StepResult train_step(LlamaCpu& model, HostTrainState& state, const std::vector<PackedBatch>& micro_batches,
                      int64_t global_count, int64_t step, double lr) {
  StepResult r;
  std::fill_n(state.grad(), state.length(), 0.0f);
  if (global_count == 0) {
    r.skipped = true;
    return r;
  }
  const double grad_scale = 1.0 / double(global_count);
  for (const PackedBatch& b : micro_batches) {
    r.loss += model.forward_backward(state.master(), state.grad(), b, grad_scale);
    r.tokens += b.num_tokens();
  }
  AdamWBuffers buffers{state.master(), state.exp_avg(), state.exp_avg_sq(), state.grad(), nullptr, DType::BF16};
  r.optim = state.optimizer().step(buffers, step, lr);
  return r;
}

}  // namespace longtune
