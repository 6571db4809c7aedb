#include "src/model/hf_adapter.hpp"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <vector>

#include "io/atomic_file.hpp"
#include "io/hf_config.hpp"
#include "src/common/error.hpp"

namespace longtune {

namespace {

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// The decoder layer index of "model.layers.<N>.<...>", or -1 for other names.
int64_t layer_of(const std::string& name) {
  static const std::string prefix = "model.layers.";
  if (name.compare(0, prefix.size(), prefix) != 0) return -1;
  size_t i = prefix.size();
  int64_t n = 0;
  bool digits = false;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9' && n < (int64_t(1) << 40)) {
    n = n * 10 + (name[i] - '0');
    ++i;
    digits = true;
  }
  return digits && (i == name.size() || name[i] == '.') ? n : -1;
}

const char* hf_dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    default: return nullptr;
  }
}

}  // namespace

LlamaConfig load_hf_model_config(const std::string& model_dir) {
  return load_hf_config((std::filesystem::path(model_dir) / "config.json").string());
}

void load_hf_weights(const SafetensorsDir& dir, const ParamTable& table, float* flat) {
  load_hf_weights_range(dir, table, 0, table.total_elements(), flat);
}

void load_hf_weights_range(const SafetensorsDir& dir, const ParamTable& table, int64_t begin, int64_t end,
                           float* out) {
  LT_CHECK(begin >= 0 && begin <= end && end <= table.total_elements(),
           "load_hf_weights_range: [" + std::to_string(begin) + ", " + std::to_string(end) + ") outside the " +
               std::to_string(table.total_elements()) + " flat elements");
  int64_t num_layers = 0;
  for (const ParamEntry& e : table.entries()) num_layers = std::max<int64_t>(num_layers, e.layer + 1);

  // Names the table cannot place: only layers beyond the configured depth are an error.
  for (const std::string& name : dir.names()) {
    if (table.find(name) >= 0) continue;
    const int64_t layer = layer_of(name);
    if (layer >= num_layers) {
      const SafetensorsFile* file = nullptr;
      dir.find(name, &file);
      throw InputError(file ? file->path() : dir.dir(), name,
                       "layers below num_hidden_layers (" + std::to_string(num_layers) + ") from config.json",
                       "a tensor of layer " + std::to_string(layer));
    }
  }
  if (table.tied()) {
    const SafetensorsFile* file = nullptr;
    if (const TensorInfo* t = dir.find("lm_head.weight", &file)) {
      const std::vector<int64_t>& want = table.at(table.embed()).shape;
      if (t->shape != want)
        throw InputError(file->path(), "lm_head.weight",
                         "shape " + shape_text(want) + " (tied to the embedding: tie_word_embeddings is true)",
                         "shape " + shape_text(t->shape));
    }
  } else if (!dir.find("lm_head.weight")) {
    throw InputError(dir.dir(), "lm_head.weight",
                     "a tensor of shape " + shape_text(table.at(table.lm_head()).shape) +
                         " (config.json has tie_word_embeddings false)",
                     "missing");
  }

  // Each entry is [offset, offset + numel) of data then its alignment gap; together they tile
  // [0, total). A tensor outside the range is still checked (count 0: no read).
  for (const ParamEntry& e : table.entries()) {
    const int64_t data_end = e.offset + e.numel;
    const int64_t padded_end = e.offset + (e.numel + ParamTable::kAlign - 1) / ParamTable::kAlign * ParamTable::kAlign;
    const int64_t lo = std::max(begin, e.offset), hi = std::min(end, data_end);
    if (lo < hi) dir.read_f32(e.name, e.shape, lo - e.offset, hi - lo, out + (lo - begin));
    else dir.read_f32(e.name, e.shape, 0, 0, out);
    const int64_t pad_lo = std::max(begin, data_end), pad_hi = std::min(end, padded_end);
    if (pad_lo < pad_hi) std::fill(out + (pad_lo - begin), out + (pad_hi - begin), 0.0f);
  }
}

void save_hf_model(const std::string& out_dir, const LlamaConfig& cfg, const ParamTable& table, const float* flat,
                   DType dtype, uint64_t max_shard_bytes) {
  const char* dtype_text = hf_dtype_name(dtype);
  LT_CHECK(dtype_text != nullptr, "save_hf_model: dtype must be F32, F16 or BF16");
  validate_llama_config(cfg, out_dir + "/config.json");
  LT_CHECK(table.tied() == cfg.tie_word_embeddings, "save_hf_model: ParamTable does not match the config");

  std::vector<TensorToWrite> tensors;
  tensors.reserve(table.entries().size());
  for (const ParamEntry& e : table.entries()) tensors.push_back({e.name, e.shape, flat + e.offset, dtype});
  write_safetensors_dir(out_dir, tensors, max_shard_bytes);

  LlamaConfig out = cfg;
  out.torch_dtype = dtype_text;
  write_file_atomic((std::filesystem::path(out_dir) / "config.json").string(), hf_config_to_json(out));
}

}  // namespace longtune
