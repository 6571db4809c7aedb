#include "src/model/param_table.hpp"

#include "src/common/error.hpp"

namespace longtune {

size_t ParamTable::add(std::string name, std::vector<int64_t> shape, int layer) {
  ParamEntry e;
  e.name = std::move(name);
  e.shape = std::move(shape);
  e.numel = 1;
  for (int64_t d : e.shape) e.numel *= d;
  e.offset = total_;
  e.layer = layer;
  total_ += (e.numel + kAlign - 1) / kAlign * kAlign;
  entries_.push_back(std::move(e));
  return entries_.size() - 1;
}

ParamTable::ParamTable(const LlamaConfig& cfg) {
  const int64_t C = cfg.hidden_size, F = cfg.intermediate_size, V = cfg.vocab_size;
  LT_CHECK(C > 0 && F > 0 && V > 0 && cfg.num_hidden_layers > 0 && cfg.head_dim > 0,
           "ParamTable needs a validated LlamaConfig");
  embed_ = add("model.embed_tokens.weight", {V, C}, -1);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const int li = int(l);
    LayerParamIndex ix{};
    ix.input_norm = add(p + "input_layernorm.weight", {C}, li);
    ix.q_proj = add(p + "self_attn.q_proj.weight", {cfg.q_dim(), C}, li);
    ix.k_proj = add(p + "self_attn.k_proj.weight", {cfg.kv_dim(), C}, li);
    ix.v_proj = add(p + "self_attn.v_proj.weight", {cfg.kv_dim(), C}, li);
    ix.o_proj = add(p + "self_attn.o_proj.weight", {C, cfg.q_dim()}, li);
    ix.post_norm = add(p + "post_attention_layernorm.weight", {C}, li);
    ix.gate_proj = add(p + "mlp.gate_proj.weight", {F, C}, li);
    ix.up_proj = add(p + "mlp.up_proj.weight", {F, C}, li);
    ix.down_proj = add(p + "mlp.down_proj.weight", {C, F}, li);
    layers_.push_back(ix);
  }
  final_norm_ = add("model.norm.weight", {C}, -1);
  lm_head_ = cfg.tie_word_embeddings ? embed_ : add("lm_head.weight", {V, C}, -1);
}

int ParamTable::block_of(size_t entry) const {
  const ParamEntry& e = entries_.at(entry);
  if (e.layer >= 0) return layer_block(e.layer);
  return entry == embed_ ? kEmbedBlock : head_block();
}

int64_t ParamTable::block_begin(int b) const {
  LT_CHECK(b >= 0 && b < num_blocks(), "block index out of range");
  if (b == kEmbedBlock) return entries_[embed_].offset;
  if (b == head_block()) return entries_[final_norm_].offset;
  return entries_[layers_[size_t(b - 1)].input_norm].offset;
}

int64_t ParamTable::block_end(int b) const {
  return b + 1 < num_blocks() ? block_begin(b + 1) : total_;
}

long ParamTable::find(const std::string& name) const {
  for (size_t i = 0; i < entries_.size(); ++i)
    if (entries_[i].name == name) return long(i);
  return -1;
}

int64_t ParamTable::num_parameters() const {
  int64_t n = 0;
  for (const auto& e : entries_) n += e.numel;
  return n;
}

}  // namespace longtune
