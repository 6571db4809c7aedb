#include "src/data/global_batch.hpp"

#include "src/common/error.hpp"

namespace longtune {

GlobalBatchStream::GlobalBatchStream(const TokenDataset& data, int64_t seq_len, int64_t micro_batch,
                                     int64_t grad_accum, int world_size, int rank, uint64_t seed, bool shuffle)
    : data_(data), seq_len_(seq_len), micro_batch_(micro_batch), grad_accum_(grad_accum), world_size_(world_size),
      rank_(rank), seed_(seed), shuffle_(shuffle) {
  LT_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "rank must lie in [0, world_size)");
  LT_CHECK(micro_batch >= 1 && grad_accum >= 1, "micro_batch and grad_accum must be >= 1");
  start_epoch(0);
}

void GlobalBatchStream::start_epoch(int64_t epoch) {
  epoch_ = epoch;
  packer_ = std::make_unique<SequencePacker>(
      data_, document_order(data_.num_documents(), seed_ + uint64_t(epoch), shuffle_), seq_len_);
}

RankBatch GlobalBatchStream::next() {
  RankBatch out;
  const int64_t total = int64_t(world_size_) * grad_accum_;
  const int64_t first = int64_t(rank_) * grad_accum_;
  PackedBatch b;
  for (int64_t i = 0; i < total; ++i) {
    int64_t fresh_epochs = 0;
    while (!packer_->next_rows(micro_batch_, &b)) {  // epoch boundary: next shuffled order
      if (++fresh_epochs > 1) throw InputError(data_.path, "tokens", "at least one non-empty document", "none");
      start_epoch(epoch_ + 1);
    }
    out.global_targets += b.num_targets();
    out.global_tokens += b.num_tokens();
    if (i >= first && i < first + grad_accum_) out.micro_batches.push_back(std::move(b));
  }
  return out;
}

GlobalBatchCursor GlobalBatchStream::cursor() const { return {epoch_, packer_->cursor()}; }

void GlobalBatchStream::set_cursor(const GlobalBatchCursor& c) {
  start_epoch(c.epoch);
  packer_->set_cursor(c.packer);
}

}  // namespace longtune
