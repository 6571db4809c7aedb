#include "src/train/evaluate.hpp"

#include "src/data/packer.hpp"

namespace longtune {

EvalResult evaluate_dataset(LlamaCpu& model, const float* params, const TokenDataset& data, int64_t seq_len,
                            int64_t micro_batch, int64_t max_batches) {
  return evaluate_dataset([&](const PackedBatch& b) { return model.forward(params, b); }, data, seq_len, micro_batch,
                          max_batches);
}

EvalResult evaluate_dataset(const std::function<LossSum(const PackedBatch&)>& forward, const TokenDataset& data,
                            int64_t seq_len, int64_t micro_batch, int64_t max_batches) {
  SequencePacker packer(data, document_order(data.num_documents(), 0, /*shuffle=*/false), seq_len);
  PackedBatch batch;
  EvalResult r;
  while ((max_batches <= 0 || r.micro_batches < max_batches) && packer.next_rows(micro_batch, &batch)) {
    r.loss += forward(batch);
    r.tokens += batch.num_tokens();
    ++r.micro_batches;
  }
  return r;
}

}  // namespace longtune
