// The internal parameter table: every model tensor by its Hugging Face name, with its shape and
// its offset in one flat fp32 buffer. The flat buffer is what the optimizer, the sharding and the
// checkpoints see; the model reads its tensors through the offsets here.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "src/model/llama_config.hpp"

namespace longtune {

struct ParamEntry {
  std::string name;            // HF name, e.g. "model.layers.3.self_attn.q_proj.weight"
  std::vector<int64_t> shape;  // HF shape, e.g. {q_dim, hidden}
  int64_t offset = 0;          // first element in the flat buffer
  int64_t numel = 0;
  int layer = -1;              // decoder layer, -1 for embedding / final norm / lm_head
  bool decay() const { return shape.size() >= 2; }  // weight decay only on matrices
};

// Indices into ParamTable::entries for one decoder layer.
struct LayerParamIndex {
  size_t input_norm, q_proj, k_proj, v_proj, o_proj, post_norm, gate_proj, up_proj, down_proj;
};

class ParamTable {
 public:
  // Offsets are aligned to kAlign elements (256 bytes in fp32) so every tensor starts on a
  // vector/DMA-friendly boundary; the gaps are zero and never trained.
  static constexpr int64_t kAlign = 64;

  explicit ParamTable(const LlamaConfig& cfg);

  const std::vector<ParamEntry>& entries() const { return entries_; }
  const ParamEntry& at(size_t i) const { return entries_.at(i); }
  // Index of a tensor by HF name, or -1.
  long find(const std::string& name) const;
  int64_t total_elements() const { return total_; }  // flat buffer length, padding included
  int64_t num_parameters() const;                     // sum of numel (padding excluded)

  size_t embed() const { return embed_; }
  size_t final_norm() const { return final_norm_; }
  // lm_head is the embedding when the model ties them.
  size_t lm_head() const { return lm_head_; }
  bool tied() const { return lm_head_ == embed_; }
  const LayerParamIndex& layer(int64_t l) const { return layers_.at(size_t(l)); }

  // Blocks: the units in which a sharded engine gathers weights and reduces gradients.
  // Block 0 is the embedding, block 1 + l decoder layer l, the last block the final norm and the
  // untied lm_head. Each is a contiguous range of the flat buffer, padding included.
  int num_blocks() const { return int(layers_.size()) + 2; }
  static constexpr int kEmbedBlock = 0;
  int layer_block(int64_t l) const { return 1 + int(l); }
  int head_block() const { return num_blocks() - 1; }
  int block_of(size_t entry) const;
  int64_t block_begin(int b) const;
  int64_t block_end(int b) const;

 private:
  size_t add(std::string name, std::vector<int64_t> shape, int layer);
  std::vector<ParamEntry> entries_;
  std::vector<LayerParamIndex> layers_;
  size_t embed_ = 0, final_norm_ = 0, lm_head_ = 0;
  int64_t total_ = 0;
};

}  // namespace longtune
