// Hugging Face model directories <-> the flat fp32 parameter buffer described by a ParamTable.
#pragma once
#include <cstdint>
#include <string>

#include "io/safetensors.hpp"
#include "src/common/dtype.hpp"
#include "src/model/llama_config.hpp"
#include "src/model/param_table.hpp"

namespace longtune {

// Reads <model_dir>/config.json (io/hf_config.hpp): parsed and validated.
LlamaConfig load_hf_model_config(const std::string& model_dir);

// Fills `flat` (table.total_elements() floats) with every tensor of `table`, converted to fp32
// after an exact shape check; the alignment gaps between tensors are zeroed.
// - Tied model (no lm_head entry in the table): a `lm_head.weight` in the files is ignored (its
//   values are not read) but must have the embedding's shape, else the config does not match.
// - Untied model: a missing `lm_head.weight` is an InputError naming it.
// - Tensors the table does not know (e.g. rotary_emb.inv_freq buffers) are ignored, except
//   "model.layers.<N>.*" with N >= num_hidden_layers, which means config.json and the weights
//   disagree: InputError naming the tensor.
void load_hf_weights(const SafetensorsDir& dir, const ParamTable& table, float* flat);

// Flat elements [begin, end) only (0 <= begin <= end <= table.total_elements()): out[0] is
// flat[begin], alignment gaps are zeroed, and only the overlapping part of each tensor is read
// from disk, so a ZeRO rank loads its shard without ever holding the full model. Every tensor
// is validated as above whatever the range (metadata only), so all ranks of a job refuse the same
// directory with the same error. load_hf_weights is this over [0, total_elements()).
void load_hf_weights_range(const SafetensorsDir& dir, const ParamTable& table, int64_t begin, int64_t end,
                           float* out);

// Writes a Hugging Face model directory: the tensors of `table` from `flat`, converted to `dtype`
// (F32, F16 or BF16), as model.safetensors or shards of at most max_shard_bytes plus
// model.safetensors.index.json, then config.json (hf_config_to_json, its dtype set to match).
// A tied model gets no lm_head.weight (transformers ties it to the embedding). Every file is
// replaced atomically.
void save_hf_model(const std::string& out_dir, const LlamaConfig& cfg, const ParamTable& table, const float* flat,
                   DType dtype = DType::BF16, uint64_t max_shard_bytes = uint64_t(5) << 30);

}  // namespace longtune
