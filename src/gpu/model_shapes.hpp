// The Llama 3.x shapes the benchmarks and the planner name (bench/anchor_torch.py CONFIGS), or a
// model directory's config.json.
#pragma once
#include <string>

#include "src/model/hf_adapter.hpp"
#include "src/model/llama_config.hpp"

namespace longtune::gpu {

inline LlamaConfig llama_shape_by_name(const std::string& name) {
  LlamaConfig c;
  c.vocab_size = 128256;
  c.max_position_embeddings = 131072;
  c.rope_theta = 500000.0;
  c.rope.type = RopeScaling::Type::Llama3;
  c.rope.factor = 8.0;
  c.rope.low_freq_factor = 1.0;
  c.rope.high_freq_factor = 4.0;
  c.rope.original_max_position_embeddings = 8192;
  c.rms_norm_eps = 1e-5;
  if (name == "1b") {
    c.hidden_size = 2048, c.num_hidden_layers = 16, c.num_attention_heads = 32, c.num_key_value_heads = 8;
    c.intermediate_size = 8192, c.tie_word_embeddings = true;
  } else if (name == "3b") {
    c.hidden_size = 3072, c.num_hidden_layers = 28, c.num_attention_heads = 24, c.num_key_value_heads = 8;
    c.intermediate_size = 8192, c.tie_word_embeddings = true;
  } else if (name == "8b") {
    c.hidden_size = 4096, c.num_hidden_layers = 32, c.num_attention_heads = 32, c.num_key_value_heads = 8;
    c.intermediate_size = 14336, c.tie_word_embeddings = false;
  } else {
    return load_hf_model_config(name);  // a model directory: its config.json
  }
  c.head_dim = c.hidden_size / c.num_attention_heads;
  return c;
}

}  // namespace longtune::gpu
