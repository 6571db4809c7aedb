#include "src/data/builtin_task.hpp"

#include <algorithm>
#include <random>
#include <string>

#include "src/common/error.hpp"
#include "src/data/portable_random.hpp"

namespace longtune {

LlamaConfig builtin_model_config() {
  LlamaConfig c;
  c.vocab_size = kBuiltinVocab;
  c.hidden_size = 64;
  c.intermediate_size = 176;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.rope = RopeScaling{};
  c.tie_word_embeddings = false;
  c.bos_token_id = kBuiltinBos;
  c.eos_token_ids = {kBuiltinEos};
  c.torch_dtype = "float32";
  return c;
}

void builtin_init_weights(const LlamaConfig& cfg, const ParamTable& table, uint64_t seed, float* flat) {
  (void)cfg;  // the table already carries every shape
  LT_CHECK(flat != nullptr, "builtin_init_weights: null buffer");
  std::fill(flat, flat + table.total_elements(), 0.0f);
  std::mt19937_64 rng(seed);
  constexpr double kStd = 0.02;
  for (const ParamEntry& e : table.entries()) {
    float* p = flat + e.offset;
    if (e.shape.size() == 1) {
      std::fill(p, p + e.numel, 1.0f);
    } else {
      for (int64_t i = 0; i < e.numel; ++i) p[i] = float(kStd * standard_normal(rng));
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
  const auto n_content = uint64_t(kBuiltinVocab - kBuiltinFirstContent);
  std::vector<int32_t> s;
  for (int64_t d = 0; d < num_docs; ++d) {
    const int64_t k = kBuiltinMinLen + int64_t(uniform_below(rng, uint64_t(kBuiltinMaxLen - kBuiltinMinLen + 1)));
    s.resize(size_t(k));
    for (auto& t : s) t = kBuiltinFirstContent + int32_t(uniform_below(rng, n_content));
    auto put = [&ds](int32_t tok, uint8_t m) {
      ds.tokens.push_back(tok);
      ds.loss_mask.push_back(m);
    };
    put(kBuiltinBos, 0);
    for (int32_t t : s) put(t, 0);
    put(kBuiltinSep, 0);
    for (int32_t t : s) put(t, 1);
    put(kBuiltinEos, 1);
    ds.doc_offsets.push_back(int64_t(ds.tokens.size()));
  }
  return ds;
}

}  // namespace longtune
