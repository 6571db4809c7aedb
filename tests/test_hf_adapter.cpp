// src/model/hf_adapter: HF model directory <-> flat parameter buffer.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <random>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/hf_config.hpp"
#include "io/safetensors.hpp"
#include "src/common/error.hpp"
#include "src/model/hf_adapter.hpp"
#include "src/model/param_table.hpp"

namespace longtune {
namespace {

namespace fs = std::filesystem;

LlamaConfig tiny_config(bool tied) {
  LlamaConfig c;
  c.vocab_size = 64;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.rope.type = RopeScaling::Type::Llama3;
  c.rope.factor = 8.0;
  c.rope.original_max_position_embeddings = 64;
  c.tie_word_embeddings = tied;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

// Parameters exactly representable in bf16, different for every tensor; padding NaN so a
// reader that forgets to zero it is caught.
std::vector<float> make_params(const ParamTable& t) {
  std::vector<float> flat(size_t(t.total_elements()), std::numeric_limits<float>::quiet_NaN());
  for (size_t i = 0; i < t.entries().size(); ++i) {
    const ParamEntry& e = t.at(i);
    for (int64_t k = 0; k < e.numel; ++k) flat[size_t(e.offset + k)] = float(int((k * 7 + i * 13) % 201) - 100) / 32.0f;
  }
  return flat;
}

class HfAdapter : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("lt_hf_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // Writes the table's tensors plus `extra` as model.safetensors into `name`, with config.json.
  std::string write_model(const std::string& name, const LlamaConfig& cfg, const std::vector<float>& flat,
                          const std::vector<TensorToWrite>& extra = {}, const std::string& skip = "") {
    const ParamTable t(cfg);
    std::vector<TensorToWrite> ts;
    for (const ParamEntry& e : t.entries())
      if (e.name != skip) ts.push_back({e.name, e.shape, flat.data() + e.offset, DType::F32});
    ts.insert(ts.end(), extra.begin(), extra.end());
    const std::string d = path(name);
    write_safetensors_dir(d, ts);
    std::ofstream(d + "/config.json") << hf_config_to_json(cfg);
    return d;
  }

  fs::path dir_;
};

void expect_zero_padding_and_equal(const ParamTable& t, const std::vector<float>& want, const std::vector<float>& got) {
  ASSERT_EQ(got.size(), size_t(t.total_elements()));
  size_t next = 0;
  for (const ParamEntry& e : t.entries()) {
    for (size_t k = next; k < size_t(e.offset); ++k) ASSERT_EQ(got[k], 0.0f) << "padding before " << e.name;
    for (int64_t k = 0; k < e.numel; ++k)
      ASSERT_EQ(got[size_t(e.offset + k)], want[size_t(e.offset + k)]) << e.name << "[" << k << "]";
    next = size_t(e.offset + e.numel);
  }
  for (size_t k = next; k < got.size(); ++k) ASSERT_EQ(got[k], 0.0f) << "trailing padding";
}

void check_message(const std::string& msg, const std::string& file, const std::string& field,
                   const std::string& extra) {
  if (std::getenv("LONGTUNE_SHOW_ERRORS")) std::cerr << "[error] " << msg << "\n";
  EXPECT_NE(msg.find(file), std::string::npos) << msg;
  EXPECT_NE(msg.find(field), std::string::npos) << msg;
  EXPECT_NE(msg.find(extra), std::string::npos) << "'" << extra << "' not in: " << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

TEST_F(HfAdapter, SaveLoadRoundTripBf16) {
  const LlamaConfig cfg = tiny_config(false);
  const ParamTable table(cfg);
  const std::vector<float> flat = make_params(table);
  const std::string out = path("export");
  save_hf_model(out, cfg, table, flat.data(), DType::BF16, uint64_t(5) << 30);
  EXPECT_TRUE(fs::exists(out + "/config.json"));
  EXPECT_TRUE(fs::exists(out + "/model.safetensors"));

  const LlamaConfig back = load_hf_model_config(out);
  EXPECT_EQ(back.torch_dtype, "bfloat16");
  EXPECT_EQ(back.rope.type, RopeScaling::Type::Llama3);
  EXPECT_EQ(back.rope.factor, 8.0);
  EXPECT_EQ(back.rope_theta, 500000.0);
  EXPECT_EQ(back.num_key_value_heads, 2);
  EXPECT_FALSE(back.tie_word_embeddings);

  const SafetensorsDir dir(out);
  EXPECT_EQ(dir.names().size(), table.entries().size());
  const SafetensorsFile* file = nullptr;
  ASSERT_NE(dir.find("model.layers.1.mlp.down_proj.weight", &file), nullptr);
  EXPECT_EQ(dir.find("model.layers.1.mlp.down_proj.weight")->dtype, DType::BF16);
  EXPECT_EQ(file->metadata().at("format"), "pt");

  std::vector<float> got(size_t(table.total_elements()), std::numeric_limits<float>::quiet_NaN());
  load_hf_weights(dir, ParamTable(back), got.data());
  expect_zero_padding_and_equal(table, flat, got);
}

TEST_F(HfAdapter, ShardedF32RoundTrip) {
  const LlamaConfig cfg = tiny_config(false);
  const ParamTable table(cfg);
  const std::vector<float> flat = make_params(table);
  const std::string out = path("sharded");
  save_hf_model(out, cfg, table, flat.data(), DType::F32, 16 * 1024);
  ASSERT_TRUE(fs::exists(out + "/model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(out + "/model.safetensors"));
  EXPECT_EQ(load_hf_model_config(out).torch_dtype, "float32");
  std::vector<float> got(size_t(table.total_elements()), 1.0f);
  load_hf_weights(SafetensorsDir(out), table, got.data());
  expect_zero_padding_and_equal(table, flat, got);
}

TEST_F(HfAdapter, TiedModelWithoutLmHead) {
  const LlamaConfig cfg = tiny_config(true);
  const ParamTable table(cfg);
  ASSERT_TRUE(table.tied());
  const std::vector<float> flat = make_params(table);
  const std::string out = path("tied");
  save_hf_model(out, cfg, table, flat.data(), DType::F16, uint64_t(1) << 30);
  const SafetensorsDir dir(out);
  EXPECT_EQ(dir.find("lm_head.weight"), nullptr);  // transformers ties it to the embedding
  EXPECT_TRUE(load_hf_model_config(out).tie_word_embeddings);
  std::vector<float> got(size_t(table.total_elements()));
  load_hf_weights(dir, table, got.data());
  expect_zero_padding_and_equal(table, flat, got);
}

TEST_F(HfAdapter, TiedModelIgnoresPresentLmHead) {
  const LlamaConfig cfg = tiny_config(true);
  const ParamTable table(cfg);
  const std::vector<float> flat = make_params(table);
  const std::vector<float> other(64 * 32, 3.0f);
  const std::string d = write_model("tied_with_head", cfg, flat, {{"lm_head.weight", {64, 32}, other.data(), DType::F32}});
  std::vector<float> got(size_t(table.total_elements()));
  load_hf_weights(SafetensorsDir(d), table, got.data());
  expect_zero_padding_and_equal(table, flat, got);  // embedding from embed_tokens, lm_head ignored

  // ... but a lm_head of another shape means the config is not this model's.
  const std::string bad = write_model("tied_bad_head", cfg, flat, {{"lm_head.weight", {32, 64}, other.data(), DType::F32}});
  try {
    load_hf_weights(SafetensorsDir(bad), table, got.data());
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    check_message(e.what(), bad + "/model.safetensors", "lm_head.weight", "[64, 32]");
  }
}

TEST_F(HfAdapter, UntiedModelMissingLmHead) {
  const LlamaConfig cfg = tiny_config(false);
  const ParamTable table(cfg);
  const std::vector<float> flat = make_params(table);
  const std::string d = write_model("no_head", cfg, flat, {}, "lm_head.weight");
  std::vector<float> got(size_t(table.total_elements()));
  try {
    load_hf_weights(SafetensorsDir(d), table, got.data());
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "lm_head.weight");
    check_message(e.what(), d, "lm_head.weight", "tie_word_embeddings false");
  }
}

TEST_F(HfAdapter, MissingTensor) {
  const LlamaConfig cfg = tiny_config(true);
  const ParamTable table(cfg);
  const std::vector<float> flat = make_params(table);
  const std::string d = write_model("no_norm", cfg, flat, {}, "model.layers.1.post_attention_layernorm.weight");
  std::vector<float> got(size_t(table.total_elements()));
  try {
    load_hf_weights(SafetensorsDir(d), table, got.data());
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    check_message(e.what(), d, "model.layers.1.post_attention_layernorm.weight", "[32]");
  }
}

TEST_F(HfAdapter, ExtraTensorsIgnoredExceptExtraLayers) {
  const LlamaConfig cfg = tiny_config(true);
  const ParamTable table(cfg);
  const std::vector<float> flat = make_params(table);
  const std::vector<float> inv_freq(4, 0.5f);
  const std::string ok = write_model("extra", cfg, flat,
                                     {{"model.layers.0.self_attn.rotary_emb.inv_freq", {4}, inv_freq.data(), DType::F32},
                                      {"model.rotary_emb.inv_freq", {4}, inv_freq.data(), DType::F32}});
  std::vector<float> got(size_t(table.total_elements()));
  EXPECT_NO_THROW(load_hf_weights(SafetensorsDir(ok), table, got.data()));
  expect_zero_padding_and_equal(table, flat, got);

  const std::vector<float> w(32, 1.0f);
  const std::string bad = write_model("layer2", cfg, flat, {{"model.layers.2.input_layernorm.weight", {32}, w.data(), DType::F32}});
  try {
    load_hf_weights(SafetensorsDir(bad), table, got.data());
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "model.layers.2.input_layernorm.weight");
    check_message(e.what(), bad + "/model.safetensors", "model.layers.2.input_layernorm.weight",
                  "num_hidden_layers (2)");
  }
}

TEST_F(HfAdapter, MisshapedTensor) {
  // Weights of a model with intermediate_size 40 under a config saying 48.
  LlamaConfig small = tiny_config(true);
  small.intermediate_size = 40;
  const ParamTable small_table(small);
  const std::vector<float> flat = make_params(small_table);
  const std::string d = write_model("misshaped", small, flat);
  const LlamaConfig cfg = tiny_config(true);
  const ParamTable table(cfg);
  std::vector<float> got(size_t(table.total_elements()));
  try {
    load_hf_weights(SafetensorsDir(d), table, got.data());
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    check_message(e.what(), d + "/model.safetensors", "model.layers.0.mlp.gate_proj.weight",
                  "expected shape [48, 32], got shape [40, 32]");
  }
}

// Ranges of the flat space read by load_hf_weights_range equal that slice of the full load, for
// F32 shards, BF16 and F16 files, tied and untied: empty ones, ones starting or ending inside a
// tensor or in an alignment gap, ZeRO shards of several world sizes, and random ones. Guard
// elements around the output catch writes outside [begin, end).
TEST_F(HfAdapter, RangeLoadEqualsSliceOfFullLoad) {
  struct Case {
    bool tied;
    DType dtype;
    uint64_t shard_bytes;
  };
  for (const Case& c : {Case{false, DType::F32, 16 * 1024}, Case{false, DType::BF16, uint64_t(1) << 30},
                        Case{true, DType::F16, 8 * 1024}}) {
    SCOPED_TRACE(std::string(c.tied ? "tied " : "untied ") + std::string(dtype_name(c.dtype)));
    const LlamaConfig cfg = tiny_config(c.tied);
    const ParamTable table(cfg);
    const std::string out = path("range_" + std::string(dtype_name(c.dtype)));
    save_hf_model(out, cfg, table, make_params(table).data(), c.dtype, c.shard_bytes);
    const SafetensorsDir dir(out);
    const int64_t total = table.total_elements();
    std::vector<float> full(size_t(total), std::numeric_limits<float>::quiet_NaN());
    load_hf_weights(dir, table, full.data());
    expect_zero_padding_and_equal(table, make_params(table), full);  // the reference, independently

    // A norm weight (32 elements, gap of 32 after it) and a matrix, by name.
    const ParamEntry& norm = table.at(size_t(table.find("model.layers.0.input_layernorm.weight")));
    const ParamEntry& q = table.at(size_t(table.find("model.layers.1.self_attn.q_proj.weight")));
    ASSERT_NE(norm.numel % ParamTable::kAlign, 0) << "the test needs a gap after " << norm.name;
    const int64_t gap = norm.offset + norm.numel;  // first padding element after the norm
    std::vector<std::pair<int64_t, int64_t>> ranges = {
        {0, 0}, {total, total}, {gap + 3, gap + 3}, {0, total},
        {gap, gap + 5},                        // inside one gap only
        {gap + 7, q.offset + 10},              // gap to inside a later tensor
        {q.offset + 5, q.offset + 6},          // one element
        {q.offset + 17, q.offset + q.numel - 3},  // inside one tensor
        {norm.offset + 1, gap + 2},            // tensor into its gap
        {q.offset + 9, total},                 // to the end (trailing gap)
        {1, total - 1}};
    for (int world = 1; world <= 8; ++world) {  // ZeRO shards, clipped to the table
      const int64_t len = (total + world - 1) / world;
      for (int r = 0; r < world; ++r) ranges.push_back({std::min(total, r * len), std::min(total, (r + 1) * len)});
    }
    std::mt19937_64 rng(42);
    for (int i = 0; i < 200; ++i) {
      int64_t a = int64_t(rng() % uint64_t(total + 1)), b = int64_t(rng() % uint64_t(total + 1));
      if (i % 4 == 0) b = std::min(total, a + int64_t(rng() % 100));  // short ones too
      ranges.push_back({std::min(a, b), std::max(a, b)});
    }

    constexpr int64_t kGuard = 16;
    constexpr float kSentinel = -12345.0f;
    for (const auto& [begin, end] : ranges) {
      std::vector<float> got(size_t(end - begin + 2 * kGuard), kSentinel);
      load_hf_weights_range(dir, table, begin, end, got.data() + kGuard);
      for (int64_t k = 0; k < kGuard; ++k) {
        ASSERT_EQ(got[size_t(k)], kSentinel) << "write before [" << begin << ", " << end << ")";
        ASSERT_EQ(got[size_t(end - begin + kGuard + k)], kSentinel) << "write after [" << begin << ", " << end << ")";
      }
      for (int64_t i = begin; i < end; ++i)
        ASSERT_EQ(got[size_t(i - begin + kGuard)], full[size_t(i)])
            << "flat[" << i << "] of [" << begin << ", " << end << ")";
    }
  }
}

// A range that does not reach a broken tensor still refuses the directory (metadata checks on
// every tensor), so every rank of a job fails the same way instead of some entering training.
TEST_F(HfAdapter, RangeLoadValidatesTensorsOutsideTheRange) {
  const LlamaConfig cfg = tiny_config(true);
  const ParamTable table(cfg);
  const std::vector<float> flat = make_params(table);
  const std::string d = write_model("no_norm_range", cfg, flat, {}, "model.layers.1.post_attention_layernorm.weight");
  std::vector<float> got(16);
  try {
    load_hf_weights_range(SafetensorsDir(d), table, 0, 16, got.data());  // inside the embedding
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    check_message(e.what(), d, "model.layers.1.post_attention_layernorm.weight", "[32]");
  }

  LlamaConfig small = tiny_config(true);
  small.intermediate_size = 40;
  const std::string m = write_model("misshaped_range", small, make_params(ParamTable(small)));
  try {
    load_hf_weights_range(SafetensorsDir(m), table, 0, 0, got.data());  // empty
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    check_message(e.what(), m + "/model.safetensors", "model.layers.0.mlp.gate_proj.weight",
                  "expected shape [48, 32], got shape [40, 32]");
  }
}

TEST_F(HfAdapter, MissingConfig) {
  const std::string d = path("empty");
  fs::create_directories(d);
  try {
    load_hf_model_config(d);
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    check_message(e.what(), d + "/config.json", "file", "no such file");
  }
}

}  // namespace
}  // namespace longtune
