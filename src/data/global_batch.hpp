// The global batch of a step and each rank's share of it.
//
// A step trains on world_size x grad_accum micro-batches taken in order from the packed stream;
// rank r owns micro-batches [r * grad_accum, (r + 1) * grad_accum). Every rank walks the same
// deterministic stream (same seed, same order), so each knows the global number of counted targets
// -- the loss normalizer -- without communicating, and the split never changes the result: 1 rank x
// accum 4, 2 x 2 and 4 x 1 see the same global batch. Epochs roll over with a fresh document order
// (seed + epoch); the state (epoch, packer cursor) is what a checkpoint saves.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "io/token_dataset.hpp"
#include "src/data/packed_batch.hpp"
#include "src/data/packer.hpp"

namespace longtune {

struct GlobalBatchCursor {
  int64_t epoch = 0;
  PackerCursor packer;
};

struct RankBatch {
  std::vector<PackedBatch> micro_batches;  // this rank's grad_accum micro-batches
  int64_t global_targets = 0;              // counted targets of the whole global batch
  int64_t global_tokens = 0;               // packed tokens of the whole global batch
};

class GlobalBatchStream {
 public:
  GlobalBatchStream(const TokenDataset& data, int64_t seq_len, int64_t micro_batch, int64_t grad_accum,
                    int world_size, int rank, uint64_t seed, bool shuffle);
  // The next step's share for this rank.
  RankBatch next();
  GlobalBatchCursor cursor() const;
  void set_cursor(const GlobalBatchCursor& c);

 private:
  void start_epoch(int64_t epoch);
  const TokenDataset& data_;
  int64_t seq_len_, micro_batch_, grad_accum_;
  int world_size_, rank_;
  uint64_t seed_;
  bool shuffle_;
  int64_t epoch_ = 0;
  std::unique_ptr<SequencePacker> packer_;
};

}  // namespace longtune
