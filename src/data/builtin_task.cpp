#include "src/data/builtin_task.hpp"

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "src/common/error.hpp"
#include "src/data/packer.hpp"
#include "src/data/portable_random.hpp"
#include "src/model/llama_cpu.hpp"

namespace longtune {

LlamaConfig builtin_model_config() {
  LlamaConfig c;
  c.vocab_size = kBuiltinVocab;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = kBuiltinMaxDocLength;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.rope = RopeScaling{};
  c.tie_word_embeddings = false;
  c.bos_token_id = kBuiltinBos;
  c.eos_token_ids = {kBuiltinEos};
  c.torch_dtype = "float32";
  return c;
}

LlamaConfig builtin_model_config_gpu() {
  LlamaConfig c = builtin_model_config();
  c.hidden_size = 128;
  c.intermediate_size = 256;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 64;
  return c;
}

void builtin_init_weights(const LlamaConfig& cfg, const ParamTable& table, uint64_t seed, float* flat) {
  (void)cfg;  // the table already carries every shape
  LT_CHECK(flat != nullptr, "builtin_init_weights: null buffer");
  std::fill(flat, flat + table.total_elements(), 0.0f);
  std::mt19937_64 rng(seed);
  for (const ParamEntry& e : table.entries()) {
    float* p = flat + e.offset;
    if (e.shape.size() == 1) {
      std::fill(p, p + e.numel, 1.0f);
    } else {
      for (int64_t i = 0; i < e.numel; ++i) p[i] = float(kBuiltinInitStd * standard_normal(rng));
    }
  }
}

TokenDataset builtin_dataset(int64_t num_docs, uint64_t seed) {
  if (num_docs < 0) throw ConfigError("builtin_dataset: num_docs must be >= 0, got " + std::to_string(num_docs));
  TokenDataset ds;
  ds.path = "<builtin>";
  ds.vocab_size = kBuiltinVocab;
  ds.bos_id = kBuiltinBos;
  ds.eos_id = kBuiltinEos;
  ds.doc_offsets.reserve(size_t(num_docs) + 1);
  ds.doc_offsets.push_back(0);
  std::mt19937_64 rng(seed);
  std::vector<int32_t> hay, digit(static_cast<size_t>(kBuiltinSlots)), order(static_cast<size_t>(kBuiltinSlots));
  auto put = [&ds](int32_t tok, uint8_t m) {
    ds.tokens.push_back(tok);
    ds.loss_mask.push_back(m);
  };
  for (int64_t d = 0; d < num_docs; ++d) {
    const auto H = kBuiltinMinHaystack +
                   int64_t(uniform_below(rng, uint64_t(kBuiltinMaxHaystack - kBuiltinMinHaystack + 1)));
    hay.resize(size_t(H));
    for (auto& t : hay) t = kBuiltinFirstFiller + int32_t(uniform_below(rng, uint64_t(kBuiltinFillers)));
    for (int64_t s = 0; s < kBuiltinSlots; ++s) {
      digit[size_t(s)] = int32_t(uniform_below(rng, uint64_t(kBuiltinDigits)));
      const auto at = int64_t(uniform_below(rng, uint64_t(hay.size()) + 1));
      hay.insert(hay.begin() + at, kBuiltinFirstNeedle + int32_t(s * kBuiltinDigits) + digit[size_t(s)]);
    }
    std::iota(order.begin(), order.end(), 0);
    for (int64_t i = kBuiltinSlots - 1; i > 0; --i) {
      const auto j = int64_t(uniform_below(rng, uint64_t(i + 1)));
      std::swap(order[size_t(i)], order[size_t(j)]);
    }
    put(kBuiltinBos, 0);
    for (int32_t t : hay) put(t, 0);
    put(kBuiltinSep, 0);
    for (int32_t s : order) {
      put(kBuiltinFirstQuery + s, 0);
      put(kBuiltinFirstAnswer + digit[size_t(s)], 1);
    }
    put(kBuiltinEos, 0);
    ds.doc_offsets.push_back(int64_t(ds.tokens.size()));
  }
  return ds;
}

BuiltinTrainDefaults builtin_train_defaults() {
  BuiltinTrainDefaults d{};
  d.seq_len = kBuiltinMaxDocLength;  // every document fits one row; short ones share rows
  d.micro_batch = 2;                 // about 4 documents (32 answers) per step
  d.grad_accum = 1;
  d.steps = 600;
  d.warmup_steps = 20;
  d.lr = 3e-3;
  d.weight_decay = 0.0;
  d.clip = 1.0;
  d.train_docs = 4000;  // more than the steps consume: no document is seen twice
  d.eval_docs = 64;
  return d;
}

RetrievalAccuracy builtin_retrieval_accuracy(LlamaCpu& model, const float* params, const TokenDataset& heldout,
                                             int64_t seq_len) {
  std::vector<int64_t> order(static_cast<size_t>(heldout.num_documents()));
  std::iota(order.begin(), order.end(), int64_t(0));
  SequencePacker packer(heldout, std::move(order), seq_len);
  const int64_t V = model.config().vocab_size;
  RetrievalAccuracy acc;
  PackedBatch batch;
  std::vector<float> logits;
  while (packer.next_rows(1, &batch)) {
    logits.resize(size_t(batch.num_tokens() * V));
    model.forward(params, batch, logits.data());
    for (int64_t t = 0; t < batch.num_tokens(); ++t) {
      const int32_t target = batch.targets[size_t(t)];
      if (target < 0) continue;
      const float* row = logits.data() + t * V;
      const auto best = int64_t(std::max_element(row, row + V) - row);
      acc.correct += best == target;
      ++acc.total;
    }
  }
  return acc;
}

}  // namespace longtune
