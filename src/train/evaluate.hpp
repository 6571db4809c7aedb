// Held-out evaluation: mean loss over a dataset, documents in file order, packed as in training.
#pragma once
#include <cstdint>
#include <functional>

#include "io/token_dataset.hpp"
#include "src/model/llama_cpu.hpp"

namespace longtune {

struct EvalResult {
  LossSum loss;
  int64_t micro_batches = 0;
  int64_t tokens = 0;  // packed tokens processed, padding included
};

// Packs `data` in file order into rows of seq_len and runs the model's forward over micro-batches
// of `micro_batch` rows; stops after max_batches micro-batches when that is > 0.
EvalResult evaluate_dataset(LlamaCpu& model, const float* params, const TokenDataset& data, int64_t seq_len,
                            int64_t micro_batch, int64_t max_batches = 0);

// The same over any engine: `forward` returns the loss of one micro-batch.
EvalResult evaluate_dataset(const std::function<LossSum(const PackedBatch&)>& forward, const TokenDataset& data,
                            int64_t seq_len, int64_t micro_batch, int64_t max_batches = 0);

}  // namespace longtune
