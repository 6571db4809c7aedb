#include "src/train/sharded_state.hpp"

#include <algorithm>
#include <cmath>

#include "src/common/error.hpp"

namespace longtune {

ShardLayout::ShardLayout(int64_t flat_len, int world_size) : world(world_size) {
  LT_CHECK(world_size >= 1, "world size must be >= 1");
  shard_len = (flat_len + world_size - 1) / world_size;
  total_len = shard_len * world_size;
}

std::vector<int64_t> ShardLayout::counts(int64_t lo, int64_t hi) const {
  std::vector<int64_t> c(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) c[size_t(r)] = std::max<int64_t>(0, std::min(hi, end(r)) - std::max(lo, begin(r)));
  return c;
}

size_t ShardedTrainState::arena_bytes(int64_t shard_len, DType grad_dtype) {
  const size_t n = size_t(shard_len);
  return HostArena::bytes_for({n * 4, n * 4, n * 4, n * dtype_size(grad_dtype)});
}

ShardedTrainState::ShardedTrainState(const ParamTable& table, Comm& comm, const AdamWConfig& adamw,
                                     const NumaPlacement& placement, DType grad_dtype)
    : table_(table),
      comm_(comm),
      layout_(table.total_elements(), comm.size()),
      arena_(arena_bytes(layout_.shard_len, grad_dtype), placement),
      master_(arena_.carve<float>(size_t(layout_.shard_len))),
      exp_avg_(arena_.carve<float>(size_t(layout_.shard_len))),
      exp_avg_sq_(arena_.carve<float>(size_t(layout_.shard_len))),
      grad_(grad_dtype == DType::F32 ? arena_.carve<float>(size_t(layout_.shard_len)) : nullptr),
      grad_bf16_(grad_dtype == DType::BF16 ? arena_.carve<uint16_t>(size_t(layout_.shard_len)) : nullptr),
      adamw_(shard_ranges(optim_ranges(table), layout_.begin(comm.rank()), layout_.end(comm.rank())),
             layout_.shard_len, adamw),
      blocks_(size_t(table.num_blocks())) {
  if (grad_dtype != DType::F32 && grad_dtype != DType::BF16)
    throw ConfigError("host gradient dtype: expected fp32 or bf16, got " + std::string(dtype_name(grad_dtype)));
  // First touch with the optimizer's own thread split, so each page lands where its updater runs.
  AdamWBuffers touch{master_, exp_avg_, exp_avg_sq_, grad_, nullptr, DType::BF16};
  touch.grad_bf16 = grad_bf16_;
  adamw_.first_touch(touch);
  std::fill_n(master_, layout_.shard_len, 0.0f);
  std::fill_n(exp_avg_, layout_.shard_len, 0.0f);
  std::fill_n(exp_avg_sq_, layout_.shard_len, 0.0f);
  zero_grads();
}

int64_t ShardedTrainState::shard_data_len() const {
  return std::max<int64_t>(0, std::min(shard_len(), table_.total_elements() - shard_begin()));
}

void ShardedTrainState::load_range(const std::function<void(int64_t, int64_t, float*)>& fill) {
  // Called on every rank, even one whose shard is all padding (empty range), so that a loader's
  // checks run, and fail, on all ranks alike.
  const int64_t b = std::min(shard_begin(), table_.total_elements()), n = shard_data_len();
  fill(b, b + n, master_);
  std::fill(master_ + n, master_ + layout_.shard_len, 0.0f);
}

void ShardedTrainState::load_full(const float* flat) {
  load_range([flat](int64_t begin, int64_t end, float* dst) { std::copy(flat + begin, flat + end, dst); });
}

std::vector<float> ShardedTrainState::gather_full() {
  std::vector<float> full(size_t(layout_.total_len));
  comm_.all_gather_v(full.data(), master_, std::vector<int64_t>(size_t(layout_.world), layout_.shard_len));
  full.resize(size_t(table_.total_elements()));
  return full;
}

void ShardedTrainState::zero_grads() {
  if (grad_) std::fill_n(grad_, layout_.shard_len, 0.0f);
  else std::fill_n(grad_bf16_, layout_.shard_len, uint16_t(0));
}

AdamWStepInfo ShardedTrainState::optimizer_step(int64_t step, double lr) {
  LT_CHECK(grad_, "ShardedTrainState: the CPU optimizer step needs fp32 gradients");
  double norm_sq = adamw_.grad_norm_sq(grad_);
  comm_.all_reduce_sum(&norm_sq, 1);
  AdamWStepInfo info;
  info.grad_norm = std::sqrt(norm_sq);
  info.clip_coef = adamw_.clip_coefficient(info.grad_norm);
  info.lr = lr;
  adamw_.update(AdamWBuffers{master_, exp_avg_, exp_avg_sq_, grad_, nullptr, DType::BF16}, step, lr,
                info.clip_coef);
  return info;
}

void ShardedTrainState::acquire(int block) {
  BlockBuffers& bb = blocks_.at(size_t(block));
  if (bb.acquired++ > 0) return;
  const int64_t lo = table_.block_begin(block), hi = table_.block_end(block);
  bb.weights.resize(size_t(hi - lo));
  const int64_t mine_lo = std::max(lo, shard_begin());
  const float* mine = master_ + std::min(mine_lo - shard_begin(), layout_.shard_len);
  comm_.all_gather_v(bb.weights.data(), mine, layout_.counts(lo, hi));
}

void ShardedTrainState::release(int block) {
  BlockBuffers& bb = blocks_.at(size_t(block));
  LT_CHECK(bb.acquired > 0, "release of a block that is not acquired");
  if (--bb.acquired == 0) std::vector<float>().swap(bb.weights);  // free: only live blocks use memory
}

const float* ShardedTrainState::weight(size_t entry) {
  const int b = table_.block_of(entry);
  const BlockBuffers& bb = blocks_[size_t(b)];
  LT_CHECK(bb.acquired > 0, "weight of a block that is not acquired: " + table_.at(entry).name);
  return bb.weights.data() + (table_.at(entry).offset - table_.block_begin(b));
}

float* ShardedTrainState::grad(size_t entry) {
  LT_CHECK(grad_, "ShardedTrainState: the CPU engine needs fp32 gradients");
  const int b = table_.block_of(entry);
  BlockBuffers& bb = blocks_[size_t(b)];
  if (bb.grads.empty()) bb.grads.assign(size_t(table_.block_end(b) - table_.block_begin(b)), 0.0f);
  return bb.grads.data() + (table_.at(entry).offset - table_.block_begin(b));
}

void ShardedTrainState::grads_done(int block) {
  BlockBuffers& bb = blocks_.at(size_t(block));
  const int64_t lo = table_.block_begin(block), hi = table_.block_end(block);
  if (bb.grads.empty()) bb.grads.assign(size_t(hi - lo), 0.0f);  // no gradient reached it: still collective
  const std::vector<int64_t> counts = layout_.counts(lo, hi);
  const int64_t n = counts[size_t(comm_.rank())];
  piece_.resize(size_t(std::max<int64_t>(n, 1)));
  comm_.reduce_scatter_v(piece_.data(), bb.grads.data(), counts);
  if (n > 0) {
    float* acc = grad_ + (std::max(lo, shard_begin()) - shard_begin());
    for (int64_t i = 0; i < n; ++i) acc[i] += piece_[size_t(i)];
  }
  std::vector<float>().swap(bb.grads);
}

ShardedStepResult sharded_train_step(LlamaCpu& model, ShardedTrainState& state,
                                     const std::vector<PackedBatch>& micro_batches, int64_t global_targets,
                                     int64_t step, double lr) {
  ShardedStepResult r;
  state.zero_grads();
  double sums[3] = {0.0, 0.0, 0.0};  // loss sum, counted targets, tokens (this rank)
  if (global_targets > 0) {
    const double grad_scale = 1.0 / double(global_targets);
    for (const PackedBatch& b : micro_batches) {
      const LossSum l = model.forward_backward(state, b, grad_scale);
      sums[0] += l.sum;
      sums[1] += double(l.count);
      sums[2] += double(b.num_tokens());
    }
  }
  state.comm().all_reduce_sum(sums, 3);
  r.loss.sum = sums[0];
  r.loss.count = int64_t(sums[1]);
  r.tokens = int64_t(sums[2]);
  if (global_targets == 0) {
    r.skipped = true;
    return r;
  }
  r.optim = state.optimizer_step(step, lr);
  return r;
}

}  // namespace longtune
