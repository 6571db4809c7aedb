#include <cmath>

#include "src/model/llama_config.hpp"

namespace longtune {

// Mirrors transformers' _compute_default_rope_parameters and _compute_llama3_parameters
// operation by operation in fp32, so the frequencies match bit for bit where possible.
std::vector<float> rope_inv_freq(const LlamaConfig& cfg) {
  const int64_t half = cfg.head_dim / 2;
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    // 1.0 / (base ** (arange(0, dim, 2).float() / dim)): the exponent is an fp32 tensor and
    // torch evaluates python-float ** fp32-tensor in fp32.
    const float exponent = float(2 * i) / float(cfg.head_dim);
    inv_freq[size_t(i)] = 1.0f / std::pow(float(cfg.rope_theta), exponent);
  }
  if (cfg.rope.type == RopeScaling::Type::Llama3) {
    const float factor = float(cfg.rope.factor);
    const float low = float(cfg.rope.low_freq_factor), high = float(cfg.rope.high_freq_factor);
    const double old_len = double(cfg.rope.original_max_position_embeddings);
    const float low_freq_wavelen = float(old_len / cfg.rope.low_freq_factor);
    const float high_freq_wavelen = float(old_len / cfg.rope.high_freq_factor);
    for (auto& f : inv_freq) {
      const float wavelen = float(2.0 * M_PI) / f;
      float scaled = wavelen > low_freq_wavelen ? f / factor : f;
      const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
      if (medium) {
        const float smooth = (float(old_len) / wavelen - low) / (high - low);
        scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
      }
      f = scaled;
    }
  }
  return inv_freq;
}

}  // namespace longtune
