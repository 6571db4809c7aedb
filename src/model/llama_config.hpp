// The Llama architecture hyper-parameters, as read from a Hugging Face config.json
// (io/hf_config.hpp) or built in (src/data/builtin_task.hpp).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace longtune {

struct RopeScaling {
  enum class Type { Default, Llama3 };
  Type type = Type::Default;
  // llama3 only (transformers' _compute_llama3_parameters):
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct LlamaConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;          // C
  int64_t intermediate_size = 0;    // F (SwiGLU width)
  int64_t num_hidden_layers = 0;    // L
  int64_t num_attention_heads = 0;  // NH
  int64_t num_key_value_heads = 0;  // NKV (GQA: NH % NKV == 0; MQA: NKV = 1)
  int64_t head_dim = 0;             // HD (defaults to C / NH when config.json has none)
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;
  std::string torch_dtype = "bfloat16";  // as written by the checkpoint (informational)

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
};

// Model FLOPs per trained token, as the brief counts them for MFU: 6 x matmul parameters (lm_head
// included, embedding lookup excluded) + 6 x layers x seq_len x hidden (causal attention, fwd+bwd).
double model_flops_per_token(const LlamaConfig& cfg, int64_t seq_len);

// RoPE inverse frequencies (HD/2 of them), computed exactly as transformers does it: in fp32,
// with llama3 scaling applied when configured.
std::vector<float> rope_inv_freq(const LlamaConfig& cfg);

}  // namespace longtune
