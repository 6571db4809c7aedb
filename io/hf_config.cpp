#include "io/hf_config.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "io/atomic_file.hpp"
#include "io/json_util.hpp"
#include "src/common/error.hpp"

namespace longtune {
namespace {

using jsonutil::describe;
using jsonutil::json;

// Upper bound on every size field: keeps products such as vocab x hidden far from int64 overflow.
constexpr int64_t kMaxSize = int64_t(1) << 24;

std::string num_text(double v) {
  // Shortest text that reads back as the same double, like the JSON writer.
  return json(v).dump();
}

// Typed access to the members of one JSON object, with errors naming `prefix + key`.
struct Fields {
  const json& obj;
  const std::string& file;
  std::string prefix;  // "" or "rope_scaling." etc.

  std::string name(const char* key) const { return prefix + key; }

  // nullptr when absent or null.
  const json* get(const char* key) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return nullptr;
    return &*it;
  }
  [[noreturn]] void missing(const char* key, const std::string& what) const {
    auto it = obj.find(key);
    throw InputError(file, name(key), what + " (required field)",
                     it == obj.end() ? std::string("missing") : describe(*it));
  }
  int64_t as_int(const char* key, const json& v) const {
    if (v.is_number_unsigned()) {
      if (v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
        throw InputError(file, name(key), "an integer in int64 range", describe(v));
      return int64_t(v.get<uint64_t>());
    }
    if (v.is_number_integer()) return v.get<int64_t>();
    throw InputError(file, name(key), "an integer", describe(v));
  }
  double as_num(const char* key, const json& v) const {
    if (!v.is_number()) throw InputError(file, name(key), "a number", describe(v));
    const double d = v.get<double>();
    if (!std::isfinite(d)) throw InputError(file, name(key), "a finite number", describe(v));
    return d;
  }
  std::optional<int64_t> opt_int(const char* key) const {
    const json* v = get(key);
    return v ? std::optional<int64_t>(as_int(key, *v)) : std::nullopt;
  }
  int64_t req_int(const char* key) const {
    const json* v = get(key);
    if (!v) missing(key, "an integer");
    return as_int(key, *v);
  }
  std::optional<double> opt_num(const char* key) const {
    const json* v = get(key);
    return v ? std::optional<double>(as_num(key, *v)) : std::nullopt;
  }
  double req_num(const char* key) const {
    const json* v = get(key);
    if (!v) missing(key, "a number");
    return as_num(key, *v);
  }
  std::optional<bool> opt_bool(const char* key) const {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) throw InputError(file, name(key), "true or false", describe(*v));
    return v->get<bool>();
  }
  std::optional<std::string> opt_string(const char* key) const {
    const json* v = get(key);
    if (!v) return std::nullopt;
    if (!v->is_string()) throw InputError(file, name(key), "a string", describe(*v));
    return v->get<std::string>();
  }
};

// One rope dict: `rope_scaling` (4.x) or `rope_parameters` (5.x). `where` is the key's name.
RopeScaling parse_rope_dict(const json& d, const std::string& file, const std::string& where) {
  if (!d.is_object()) throw InputError(file, where, "an object or null", describe(d));
  Fields f{d, file, where + "."};
  std::string type = "default";
  const char* type_key = "rope_type";
  if (auto t = f.opt_string("rope_type")) {
    type = *t;
  } else if (auto legacy = f.opt_string("type")) {  // transformers < 4.43 spelling
    type = *legacy;
    type_key = "type";
  }
  RopeScaling rope;
  if (type == "default") {
    rope.type = RopeScaling::Type::Default;
    return rope;
  }
  if (type != "llama3")
    throw InputError(file, f.name(type_key), "\"default\" or \"llama3\" (the supported rope types)",
                     "\"" + type + "\"");
  rope.type = RopeScaling::Type::Llama3;
  rope.factor = f.req_num("factor");
  rope.low_freq_factor = f.req_num("low_freq_factor");
  rope.high_freq_factor = f.req_num("high_freq_factor");
  rope.original_max_position_embeddings = f.req_int("original_max_position_embeddings");
  if (!(rope.factor > 0)) throw InputError(file, f.name("factor"), "a positive number", num_text(rope.factor));
  if (!(rope.low_freq_factor > 0))
    throw InputError(file, f.name("low_freq_factor"), "a positive number", num_text(rope.low_freq_factor));
  if (!(rope.high_freq_factor > rope.low_freq_factor))
    throw InputError(file, f.name("high_freq_factor"),
                     "a number greater than low_freq_factor (" + num_text(rope.low_freq_factor) + ")",
                     num_text(rope.high_freq_factor));
  if (rope.original_max_position_embeddings <= 0)
    throw InputError(file, f.name("original_max_position_embeddings"), "a positive integer",
                     std::to_string(rope.original_max_position_embeddings));
  return rope;
}

bool same_rope(const RopeScaling& a, const RopeScaling& b) {
  if (a.type != b.type) return false;
  if (a.type == RopeScaling::Type::Default) return true;
  return a.factor == b.factor && a.low_freq_factor == b.low_freq_factor &&
         a.high_freq_factor == b.high_freq_factor &&
         a.original_max_position_embeddings == b.original_max_position_embeddings;
}

}  // namespace

LlamaConfig parse_hf_config(const std::string& json_text, const std::string& file) {
  const json j = jsonutil::parse(json_text, file);
  if (!j.is_object()) throw InputError(file, "json", "a JSON object at the top level", describe(j));
  Fields f{j, file, ""};

  // Which model this is.
  if (auto mt = f.opt_string("model_type"); mt && *mt != "llama")
    throw InputError(file, "model_type", "\"llama\"", "\"" + *mt + "\"");
  if (const json* a = f.get("architectures")) {
    bool found = false;
    if (a->is_array())
      for (const auto& e : *a) found = found || (e.is_string() && e.get<std::string>() == "LlamaForCausalLM");
    if (!found) throw InputError(file, "architectures", "a list containing \"LlamaForCausalLM\"", describe(*a));
  }
  for (const char* key : {"attention_bias", "mlp_bias"})
    if (f.opt_bool(key).value_or(false))
      throw InputError(file, key, "false (linear layers with bias are not supported)", "true");
  if (auto act = f.opt_string("hidden_act"); act && *act != "silu")
    throw InputError(file, "hidden_act", "\"silu\" (SwiGLU)", "\"" + *act + "\"");

  LlamaConfig cfg;
  cfg.vocab_size = f.req_int("vocab_size");
  cfg.hidden_size = f.req_int("hidden_size");
  cfg.intermediate_size = f.req_int("intermediate_size");
  cfg.num_hidden_layers = f.req_int("num_hidden_layers");
  cfg.num_attention_heads = f.req_int("num_attention_heads");
  cfg.num_key_value_heads = f.opt_int("num_key_value_heads").value_or(cfg.num_attention_heads);
  if (auto hd = f.opt_int("head_dim")) {
    cfg.head_dim = *hd;
  } else if (cfg.num_attention_heads > 0) {
    if (cfg.hidden_size % cfg.num_attention_heads != 0)
      throw InputError(file, "hidden_size",
                       "a multiple of num_attention_heads (" + std::to_string(cfg.num_attention_heads) +
                           ") when head_dim is absent",
                       std::to_string(cfg.hidden_size));
    cfg.head_dim = cfg.hidden_size / cfg.num_attention_heads;
  }
  cfg.max_position_embeddings = f.req_int("max_position_embeddings");
  cfg.rms_norm_eps = f.req_num("rms_norm_eps");
  cfg.tie_word_embeddings = f.opt_bool("tie_word_embeddings").value_or(false);

  cfg.bos_token_id = f.opt_int("bos_token_id").value_or(-1);
  if (cfg.bos_token_id < -1)
    throw InputError(file, "bos_token_id", "a token id >= 0 or null", std::to_string(cfg.bos_token_id));
  if (const json* e = f.get("eos_token_id")) {
    if (e->is_array()) {
      for (const auto& v : *e) {
        if (!v.is_number_integer())
          throw InputError(file, "eos_token_id", "an integer, a list of integers or null", describe(*e));
        cfg.eos_token_ids.push_back(f.as_int("eos_token_id", v));
      }
    } else {
      cfg.eos_token_ids.push_back(f.as_int("eos_token_id", *e));
    }
    for (int64_t id : cfg.eos_token_ids)
      if (id < 0) throw InputError(file, "eos_token_id", "token ids >= 0", std::to_string(id));
  }
  if (auto dt = f.opt_string("dtype")) cfg.torch_dtype = *dt;  // transformers >= 5
  else if (auto tdt = f.opt_string("torch_dtype")) cfg.torch_dtype = *tdt;

  // RoPE: rope_parameters (5.x, rope_theta inside) or rope_scaling (4.x, rope_theta top-level).
  const std::optional<double> top_theta = f.opt_num("rope_theta");
  const json* rp = f.get("rope_parameters");
  const json* rs = f.get("rope_scaling");
  cfg.rope_theta = top_theta.value_or(10000.0);
  if (rp) {
    cfg.rope = parse_rope_dict(*rp, file, "rope_parameters");
    Fields rf{*rp, file, "rope_parameters."};
    if (auto theta = rf.opt_num("rope_theta")) {
      if (top_theta && *top_theta != *theta)
        throw InputError(file, "rope_theta", "the value of rope_parameters.rope_theta (" + num_text(*theta) + ")",
                         num_text(*top_theta));
      cfg.rope_theta = *theta;
    }
    if (rs && !same_rope(parse_rope_dict(*rs, file, "rope_scaling"), cfg.rope))
      throw InputError(file, "rope_scaling", "the same rope settings as rope_parameters (or only one of them)",
                       describe(*rs));
  } else if (rs) {
    cfg.rope = parse_rope_dict(*rs, file, "rope_scaling");
  }

  validate_llama_config(cfg, file);
  return cfg;
}

LlamaConfig load_hf_config(const std::string& path) { return parse_hf_config(read_text_file(path), path); }

void validate_llama_config(const LlamaConfig& cfg, const std::string& file) {
  auto size = [&](const char* field, int64_t v) {
    if (v <= 0) throw InputError(file, field, "a positive integer", std::to_string(v));
    if (v > kMaxSize)
      throw InputError(file, field, "at most " + std::to_string(kMaxSize), std::to_string(v));
  };
  size("vocab_size", cfg.vocab_size);
  size("hidden_size", cfg.hidden_size);
  size("intermediate_size", cfg.intermediate_size);
  size("num_hidden_layers", cfg.num_hidden_layers);
  size("num_attention_heads", cfg.num_attention_heads);
  size("num_key_value_heads", cfg.num_key_value_heads);
  size("head_dim", cfg.head_dim);
  if (cfg.max_position_embeddings <= 0)
    throw InputError(file, "max_position_embeddings", "a positive integer",
                     std::to_string(cfg.max_position_embeddings));
  if (cfg.num_key_value_heads > cfg.num_attention_heads || cfg.num_attention_heads % cfg.num_key_value_heads != 0)
    throw InputError(file, "num_key_value_heads",
                     "a divisor of num_attention_heads (" + std::to_string(cfg.num_attention_heads) + ")",
                     std::to_string(cfg.num_key_value_heads));
  if (cfg.head_dim % 2 != 0)
    throw InputError(file, "head_dim", "an even number (RoPE rotates pairs)", std::to_string(cfg.head_dim));
  if (!(cfg.rms_norm_eps > 0) || !std::isfinite(cfg.rms_norm_eps))
    throw InputError(file, "rms_norm_eps", "a positive number", num_text(cfg.rms_norm_eps));
  if (!(cfg.rope_theta > 0) || !std::isfinite(cfg.rope_theta))
    throw InputError(file, "rope_theta", "a positive number", num_text(cfg.rope_theta));
  if (cfg.rope.type == RopeScaling::Type::Llama3) {
    const RopeScaling& r = cfg.rope;
    if (!(r.factor > 0) || !std::isfinite(r.factor))
      throw InputError(file, "rope_parameters.factor", "a positive number", num_text(r.factor));
    if (!(r.low_freq_factor > 0) || !std::isfinite(r.low_freq_factor))
      throw InputError(file, "rope_parameters.low_freq_factor", "a positive number", num_text(r.low_freq_factor));
    if (!(r.high_freq_factor > r.low_freq_factor) || !std::isfinite(r.high_freq_factor))
      throw InputError(file, "rope_parameters.high_freq_factor",
                       "a number greater than low_freq_factor (" + num_text(r.low_freq_factor) + ")",
                       num_text(r.high_freq_factor));
    if (r.original_max_position_embeddings <= 0)
      throw InputError(file, "rope_parameters.original_max_position_embeddings", "a positive integer",
                       std::to_string(r.original_max_position_embeddings));
  }
  const std::string vocab = "[0, vocab_size=" + std::to_string(cfg.vocab_size) + ")";
  if (cfg.bos_token_id < -1 || cfg.bos_token_id >= cfg.vocab_size)
    throw InputError(file, "bos_token_id", "a token id in " + vocab + " or null", std::to_string(cfg.bos_token_id));
  for (int64_t id : cfg.eos_token_ids)
    if (id < 0 || id >= cfg.vocab_size)
      throw InputError(file, "eos_token_id", "token ids in " + vocab, std::to_string(id));
}

std::string hf_config_to_json(const LlamaConfig& cfg) {
  json j = json::object();
  j["architectures"] = json::array({"LlamaForCausalLM"});
  j["model_type"] = "llama";
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["mlp_bias"] = false;
  j["hidden_act"] = "silu";
  j["initializer_range"] = 0.02;
  j["use_cache"] = true;
  j["vocab_size"] = cfg.vocab_size;
  j["hidden_size"] = cfg.hidden_size;
  j["intermediate_size"] = cfg.intermediate_size;
  j["num_hidden_layers"] = cfg.num_hidden_layers;
  j["num_attention_heads"] = cfg.num_attention_heads;
  j["num_key_value_heads"] = cfg.num_key_value_heads;
  j["head_dim"] = cfg.head_dim;
  j["max_position_embeddings"] = cfg.max_position_embeddings;
  j["rms_norm_eps"] = cfg.rms_norm_eps;
  j["tie_word_embeddings"] = cfg.tie_word_embeddings;
  j["bos_token_id"] = cfg.bos_token_id >= 0 ? json(cfg.bos_token_id) : json(nullptr);
  if (cfg.eos_token_ids.empty()) j["eos_token_id"] = nullptr;
  else if (cfg.eos_token_ids.size() == 1) j["eos_token_id"] = cfg.eos_token_ids[0];
  else j["eos_token_id"] = cfg.eos_token_ids;
  j["dtype"] = cfg.torch_dtype;
  json rope = json::object();
  rope["rope_theta"] = cfg.rope_theta;
  if (cfg.rope.type == RopeScaling::Type::Llama3) {
    rope["rope_type"] = "llama3";
    rope["factor"] = cfg.rope.factor;
    rope["low_freq_factor"] = cfg.rope.low_freq_factor;
    rope["high_freq_factor"] = cfg.rope.high_freq_factor;
    rope["original_max_position_embeddings"] = cfg.rope.original_max_position_embeddings;
  } else {
    rope["rope_type"] = "default";
  }
  j["rope_parameters"] = rope;
  return j.dump(2) + "\n";
}

}  // namespace longtune
