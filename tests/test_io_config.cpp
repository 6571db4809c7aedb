// io/hf_config: config.json parsing (transformers 4.x and 5.x rope layouts), validation, writing.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "io/hf_config.hpp"
#include "src/common/error.hpp"

namespace longtune {
namespace {

using nlohmann::json;
const std::string kFile = "/models/tiny/config.json";

// Every InputError must be one line naming the file and the field.
void check_message(const std::string& msg, const std::string& file, const std::string& field,
                   const std::string& extra = "") {
  if (std::getenv("LONGTUNE_SHOW_ERRORS")) std::cerr << "[error] " << msg << "\n";
  EXPECT_NE(msg.find(file), std::string::npos) << msg;
  EXPECT_NE(msg.find(field), std::string::npos) << "field '" << field << "' not in: " << msg;
  if (!extra.empty()) {
    EXPECT_NE(msg.find(extra), std::string::npos) << "'" << extra << "' not in: " << msg;
  }
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

// Parses `j`, expecting an InputError whose field is `field`.
void expect_bad(const json& j, const std::string& field, const std::string& extra = "") {
  try {
    parse_hf_config(j.dump(), kFile);
    ADD_FAILURE() << "no error for field " << field << " in " << j.dump();
  } catch (const InputError& e) {
    EXPECT_EQ(e.file(), kFile);
    EXPECT_EQ(e.field(), field) << e.what();
    check_message(e.what(), kFile, field, extra);
  }
}

// Llama-3.2-style config, transformers 4.x layout (rope_scaling + top-level rope_theta).
json llama3_v4() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": [2, 3], "head_dim": 16, "hidden_act": "silu",
    "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96,
    "max_position_embeddings": 4096, "mlp_bias": false, "model_type": "llama",
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 512, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0", "use_cache": true, "vocab_size": 128})");
}

// The same model as transformers 5.x writes it (rope_parameters with rope_theta inside).
json llama3_v5() {
  json j = llama3_v4();
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j.erase("torch_dtype");
  j["dtype"] = "bfloat16";
  j["rope_parameters"] = json::parse(R"({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
      "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 512})");
  return j;
}

// A plain-rope config (Llama-2 style, no head_dim, no rope scaling).
json plain_v4() {
  return json::parse(R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 3, "num_attention_heads": 8,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-06, "vocab_size": 100,
    "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": null, "rope_theta": 10000.0})");
}

void expect_same(const LlamaConfig& a, const LlamaConfig& b) {
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.rope.type, b.rope.type);
  EXPECT_EQ(a.rope.factor, b.rope.factor);
  EXPECT_EQ(a.rope.low_freq_factor, b.rope.low_freq_factor);
  EXPECT_EQ(a.rope.high_freq_factor, b.rope.high_freq_factor);
  EXPECT_EQ(a.rope.original_max_position_embeddings, b.rope.original_max_position_embeddings);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
  EXPECT_EQ(a.torch_dtype, b.torch_dtype);
}

TEST(IoConfig, ParsesLlama3Transformers4) {
  const LlamaConfig c = parse_hf_config(llama3_v4().dump(), kFile);
  EXPECT_EQ(c.vocab_size, 128);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 96);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope.type, RopeScaling::Type::Llama3);
  EXPECT_EQ(c.rope.factor, 32.0);
  EXPECT_EQ(c.rope.low_freq_factor, 1.0);
  EXPECT_EQ(c.rope.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 512);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(c.torch_dtype, "bfloat16");
}

TEST(IoConfig, OldAndNewRopeFormatsParseIdentically) {
  expect_same(parse_hf_config(llama3_v4().dump(), kFile), parse_hf_config(llama3_v5().dump(), kFile));
  // Legacy "type" key (transformers < 4.43) means the same as "rope_type".
  json legacy = llama3_v4();
  legacy["rope_scaling"].erase("rope_type");
  legacy["rope_scaling"]["type"] = "llama3";
  expect_same(parse_hf_config(legacy.dump(), kFile), parse_hf_config(llama3_v5().dump(), kFile));
  // Plain rope: rope_scaling null / absent / {"rope_type": "default"} and rope_parameters default.
  json p4 = plain_v4();
  json p4_absent = plain_v4();
  p4_absent.erase("rope_scaling");
  json p5 = plain_v4();
  p5.erase("rope_scaling");
  p5.erase("rope_theta");
  p5["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 10000.0}};
  const LlamaConfig a = parse_hf_config(p4.dump(), kFile);
  EXPECT_EQ(a.rope.type, RopeScaling::Type::Default);
  expect_same(a, parse_hf_config(p4_absent.dump(), kFile));
  expect_same(a, parse_hf_config(p5.dump(), kFile));
  // Both present and agreeing is fine.
  json both = llama3_v5();
  both["rope_scaling"] = llama3_v4()["rope_scaling"];
  both["rope_theta"] = 500000.0;
  expect_same(parse_hf_config(both.dump(), kFile), parse_hf_config(llama3_v5().dump(), kFile));
}

TEST(IoConfig, Defaults) {
  json j = plain_v4();
  const LlamaConfig c = parse_hf_config(j.dump(), kFile);
  EXPECT_EQ(c.num_key_value_heads, 8);  // = num_attention_heads
  EXPECT_EQ(c.head_dim, 8);             // = hidden / heads
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2}));
  EXPECT_EQ(c.rope_theta, 10000.0);
  j["head_dim"] = nullptr;
  j["num_key_value_heads"] = nullptr;
  j["bos_token_id"] = nullptr;
  j["eos_token_id"] = nullptr;
  j.erase("rope_theta");
  const LlamaConfig d = parse_hf_config(j.dump(), kFile);
  EXPECT_EQ(d.head_dim, 8);
  EXPECT_EQ(d.num_key_value_heads, 8);
  EXPECT_EQ(d.bos_token_id, -1);
  EXPECT_TRUE(d.eos_token_ids.empty());
  EXPECT_EQ(d.rope_theta, 10000.0);
}

TEST(IoConfig, ToJsonRoundTripsInTransformers5Layout) {
  for (const json& src : {llama3_v4(), plain_v4()}) {
    const LlamaConfig c = parse_hf_config(src.dump(), kFile);
    const std::string text = hf_config_to_json(c);
    const json out = json::parse(text);
    EXPECT_EQ(out["model_type"], "llama");
    EXPECT_EQ(out["architectures"], json::array({"LlamaForCausalLM"}));
    ASSERT_TRUE(out.contains("rope_parameters"));
    EXPECT_FALSE(out.contains("rope_scaling"));
    EXPECT_EQ(out["rope_parameters"]["rope_theta"], c.rope_theta);
    EXPECT_EQ(out["head_dim"], c.head_dim);
    EXPECT_EQ(out["tie_word_embeddings"], c.tie_word_embeddings);
    expect_same(parse_hf_config(text, kFile), c);
  }
  const json out = json::parse(hf_config_to_json(parse_hf_config(llama3_v4().dump(), kFile)));
  EXPECT_EQ(out["rope_parameters"]["rope_type"], "llama3");
  EXPECT_EQ(out["rope_parameters"]["factor"], 32.0);
  EXPECT_EQ(out["rope_parameters"]["original_max_position_embeddings"], 512);
  EXPECT_EQ(out["eos_token_id"], json::array({2, 3}));
}

TEST(IoConfig, LoadFromFileAndMissingFile) {
  const auto dir = std::filesystem::temp_directory_path() / ("lt_io_config_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "config.json").string();
  { std::ofstream(path) << llama3_v5().dump(2); }
  expect_same(load_hf_config(path), parse_hf_config(llama3_v5().dump(), kFile));
  const std::string missing = (dir / "nope.json").string();
  try {
    load_hf_config(missing);
    ADD_FAILURE() << "no error for a missing file";
  } catch (const InputError& e) {
    check_message(e.what(), missing, "file");
  }
  { std::ofstream(path) << "{\"hidden_size\": 64,,}"; }
  try {
    load_hf_config(path);
    ADD_FAILURE() << "no error for bad JSON";
  } catch (const InputError& e) {
    check_message(e.what(), path, "json", "byte");
  }
  std::filesystem::remove_all(dir);
}

TEST(IoConfig, BadJson) {
  for (const char* text : {"", "{", "{\"hidden_size\": 64,}", "{\"a\": tru}", "nul"}) {
    try {
      parse_hf_config(text, kFile);
      ADD_FAILURE() << "no error for " << text;
    } catch (const InputError& e) {
      EXPECT_EQ(e.field(), "json");
      check_message(e.what(), kFile, "json", "valid JSON");
      EXPECT_NE(std::string(e.what()).find("byte"), std::string::npos) << e.what();
    }
  }
  expect_bad(json::array({1, 2}), "json", "object");
}

TEST(IoConfig, MissingRequiredField) {
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "max_position_embeddings", "rms_norm_eps"}) {
    json j = llama3_v4();
    j.erase(key);
    expect_bad(j, key, "missing");
  }
  json j = llama3_v4();
  j["hidden_size"] = nullptr;  // null is not a value for a required field
  expect_bad(j, "hidden_size", "null");
}

TEST(IoConfig, WrongType) {
  auto with = [](const char* key, json v) {
    json j = llama3_v4();
    j[key] = std::move(v);
    return j;
  };
  expect_bad(with("hidden_size", "64"), "hidden_size", "string");
  expect_bad(with("hidden_size", 64.0), "hidden_size", "float");
  expect_bad(with("num_hidden_layers", 2.5), "num_hidden_layers", "an integer");
  expect_bad(with("vocab_size", true), "vocab_size", "boolean");
  expect_bad(with("num_key_value_heads", "2"), "num_key_value_heads", "an integer");
  expect_bad(with("head_dim", json::array({16})), "head_dim", "an integer");
  expect_bad(with("rms_norm_eps", "1e-5"), "rms_norm_eps", "a number");
  expect_bad(with("rope_theta", "500000"), "rope_theta", "a number");
  expect_bad(with("tie_word_embeddings", "true"), "tie_word_embeddings", "true or false");
  expect_bad(with("tie_word_embeddings", 1), "tie_word_embeddings", "true or false");
  expect_bad(with("eos_token_id", "2"), "eos_token_id", "an integer");
  expect_bad(with("eos_token_id", json::array({2, "3"})), "eos_token_id", "list of integers");
  expect_bad(with("bos_token_id", 1.0), "bos_token_id", "an integer");
  expect_bad(with("torch_dtype", 16), "torch_dtype", "a string");
  expect_bad(with("rope_scaling", "llama3"), "rope_scaling", "an object or null");
  expect_bad(with("max_position_embeddings", 18446744073709551615ull), "max_position_embeddings", "int64");
  json j = llama3_v4();
  j["rope_scaling"]["factor"] = "32";
  expect_bad(j, "rope_scaling.factor", "a number");
  j = llama3_v5();
  j["rope_parameters"]["original_max_position_embeddings"] = 512.0;
  expect_bad(j, "rope_parameters.original_max_position_embeddings", "an integer");
  j = llama3_v5();
  j["rope_parameters"]["rope_theta"] = "big";
  expect_bad(j, "rope_parameters.rope_theta", "a number");
}

TEST(IoConfig, UnsupportedRopeType) {
  for (const char* type : {"yarn", "linear", "dynamic", "longrope", "su"}) {
    json j4 = llama3_v4();
    j4["rope_scaling"]["rope_type"] = type;
    expect_bad(j4, "rope_scaling.rope_type", std::string("\"") + type + "\"");
    json legacy = llama3_v4();
    legacy["rope_scaling"].erase("rope_type");
    legacy["rope_scaling"]["type"] = type;
    expect_bad(legacy, "rope_scaling.type", type);
    json j5 = llama3_v5();
    j5["rope_parameters"]["rope_type"] = type;
    expect_bad(j5, "rope_parameters.rope_type", type);
  }
  json j = llama3_v4();
  j["rope_scaling"]["rope_type"] = 3;
  expect_bad(j, "rope_scaling.rope_type", "a string");
}

TEST(IoConfig, Llama3Parameters) {
  for (const char* key : {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}) {
    json j4 = llama3_v4();
    j4["rope_scaling"].erase(key);
    expect_bad(j4, std::string("rope_scaling.") + key, "missing");
    json j5 = llama3_v5();
    j5["rope_parameters"][key] = nullptr;
    expect_bad(j5, std::string("rope_parameters.") + key, "required");
  }
  json j = llama3_v5();
  j["rope_parameters"]["factor"] = -8.0;
  expect_bad(j, "rope_parameters.factor", "positive");
  j = llama3_v5();
  j["rope_parameters"]["low_freq_factor"] = 0;
  expect_bad(j, "rope_parameters.low_freq_factor", "positive");
  j = llama3_v5();
  j["rope_parameters"]["high_freq_factor"] = 1.0;  // == low
  expect_bad(j, "rope_parameters.high_freq_factor", "greater than low_freq_factor");
  j = llama3_v4();
  j["rope_scaling"]["original_max_position_embeddings"] = 0;
  expect_bad(j, "rope_scaling.original_max_position_embeddings", "positive");
  // Contradicting rope_parameters and rope_scaling / rope_theta.
  j = llama3_v5();
  j["rope_scaling"] = nullptr;
  j["rope_scaling"]["rope_type"] = "default";
  expect_bad(j, "rope_scaling", "rope_parameters");
  j = llama3_v5();
  j["rope_theta"] = 10000.0;
  expect_bad(j, "rope_theta", "rope_parameters.rope_theta");
  // Llama 3 values parse exactly, non-integral factors included.
  j = llama3_v5();
  j["rope_parameters"]["factor"] = 8;  // an integer is a fine number
  j["rope_parameters"]["low_freq_factor"] = 1.5;
  j["rope_parameters"]["high_freq_factor"] = 4.25;
  j["rope_parameters"]["original_max_position_embeddings"] = 8192;
  const LlamaConfig c = parse_hf_config(j.dump(), kFile);
  EXPECT_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.low_freq_factor, 1.5);
  EXPECT_EQ(c.rope.high_freq_factor, 4.25);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
}

TEST(IoConfig, InconsistentSizes) {
  auto with = [](const char* key, json v) {
    json j = llama3_v4();
    j[key] = std::move(v);
    return j;
  };
  expect_bad(with("num_key_value_heads", 3), "num_key_value_heads", "divisor of num_attention_heads (4)");
  expect_bad(with("num_key_value_heads", 8), "num_key_value_heads", "divisor");
  expect_bad(with("num_key_value_heads", 0), "num_key_value_heads", "positive");
  expect_bad(with("head_dim", 15), "head_dim", "even");
  expect_bad(with("head_dim", 0), "head_dim", "positive");
  expect_bad(with("num_hidden_layers", 0), "num_hidden_layers", "positive");
  expect_bad(with("hidden_size", -64), "hidden_size", "positive");
  expect_bad(with("vocab_size", int64_t(1) << 40), "vocab_size", "at most");
  expect_bad(with("num_attention_heads", 0), "num_attention_heads", "positive");
  expect_bad(with("max_position_embeddings", 0), "max_position_embeddings", "positive");
  expect_bad(with("rms_norm_eps", 0.0), "rms_norm_eps", "positive");
  expect_bad(with("rope_theta", -1.0), "rope_theta", "positive");
  expect_bad(with("bos_token_id", 128), "bos_token_id", "vocab_size=128");
  expect_bad(with("eos_token_id", json::array({2, -5})), "eos_token_id", ">= 0");
  expect_bad(with("eos_token_id", 500), "eos_token_id", "vocab_size=128");
  json j = plain_v4();
  j["num_attention_heads"] = 6;  // 64 % 6 != 0 and no head_dim
  expect_bad(j, "hidden_size", "multiple of num_attention_heads (6)");
  // head_dim given explicitly may differ from hidden / heads (as in some Llama derivatives).
  j["head_dim"] = 16;
  j["num_key_value_heads"] = 2;
  EXPECT_EQ(parse_hf_config(j.dump(), kFile).q_dim(), 96);
}

TEST(IoConfig, UnsupportedModels) {
  auto with = [](const char* key, json v) {
    json j = llama3_v4();
    j[key] = std::move(v);
    return j;
  };
  expect_bad(with("model_type", "mistral"), "model_type", "\"mistral\"");
  expect_bad(with("architectures", json::array({"MistralForCausalLM"})), "architectures", "LlamaForCausalLM");
  expect_bad(with("architectures", "LlamaForCausalLM"), "architectures", "LlamaForCausalLM");
  expect_bad(with("attention_bias", true), "attention_bias", "false");
  expect_bad(with("mlp_bias", true), "mlp_bias", "false");
  expect_bad(with("attention_bias", "no"), "attention_bias", "true or false");
  expect_bad(with("hidden_act", "gelu"), "hidden_act", "silu");
  // Absent identity fields are fine.
  json j = llama3_v4();
  j.erase("model_type");
  j.erase("architectures");
  j.erase("attention_bias");
  j.erase("mlp_bias");
  j.erase("hidden_act");
  EXPECT_NO_THROW(parse_hf_config(j.dump(), kFile));
}

TEST(IoConfig, ValidateBuiltConfig) {
  LlamaConfig c = parse_hf_config(llama3_v4().dump(), kFile);
  EXPECT_NO_THROW(validate_llama_config(c, "builtin"));
  c.rope.high_freq_factor = 0.5;
  try {
    validate_llama_config(c, "builtin");
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    check_message(e.what(), "builtin", "high_freq_factor");
  }
}

}  // namespace
}  // namespace longtune
