#include "src/model/llama_config.hpp"

namespace longtune {

double model_flops_per_token(const LlamaConfig& c, int64_t seq_len) {
  const double d = double(c.hidden_size), L = double(c.num_hidden_layers), ff = double(c.intermediate_size);
  const double q = double(c.q_dim()), kv = double(c.kv_dim());
  const double per_layer = d * q * 2 + d * kv * 2 + 3 * d * ff;  // q,o + k,v + gate,up,down
  return 6 * (L * per_layer + d * double(c.vocab_size)) + 6 * L * double(seq_len) * d;
}

}  // namespace longtune
