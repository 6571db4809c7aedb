// io/safetensors: round trips, sharded directories, and every malformed-file check (corrupt files
// are written byte by byte here).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.hpp"
#include "src/common/error.hpp"

namespace longtune {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

class IoSafetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("lt_io_st_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // A safetensors file from a header text and data bytes; `len` overrides the length field.
  std::string write_raw(const std::string& name, const std::string& header, const std::string& data,
                        int64_t len = -1) {
    const std::string p = path(name);
    std::ofstream f(p, std::ios::binary);
    const uint64_t n = len >= 0 ? uint64_t(len) : header.size();
    for (int i = 0; i < 8; ++i) f.put(char((n >> (8 * i)) & 0xff));
    f << header << data;
    return p;
  }
  std::string write_raw(const std::string& name, const json& header, size_t data_bytes) {
    return write_raw(name, header.dump(), std::string(data_bytes, '\x01'));
  }

  fs::path dir_;
};

void check_message(const std::string& msg, const std::string& file, const std::string& field,
                   const std::string& extra = "") {
  if (std::getenv("LONGTUNE_SHOW_ERRORS")) std::cerr << "[error] " << msg << "\n";
  EXPECT_NE(msg.find(file), std::string::npos) << "file '" << file << "' not in: " << msg;
  EXPECT_NE(msg.find(field), std::string::npos) << "field '" << field << "' not in: " << msg;
  if (!extra.empty()) {
    EXPECT_NE(msg.find(extra), std::string::npos) << "'" << extra << "' not in: " << msg;
  }
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

template <class F>
void expect_input_error(F&& f, const std::string& file, const std::string& field, const std::string& extra = "") {
  try {
    f();
    ADD_FAILURE() << "no InputError (expected field " << field << ")";
  } catch (const InputError& e) {
    EXPECT_EQ(e.file(), file);
    EXPECT_EQ(e.field(), field) << e.what();
    check_message(e.what(), file, field, extra);
  }
}

// Values exactly representable in bf16 (and so in fp16 and fp32).
std::vector<float> exact_values(size_t n, float scale = 1.0f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * float(int(i % 255) - 127) / 64.0f;
  return v;
}

std::vector<uint16_t> raw_u16(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo* t = f.find(name);
  EXPECT_NE(t, nullptr);
  std::vector<uint16_t> out(size_t(t->numel()));
  f.read_raw(*t, out.data());
  return out;
}

TEST_F(IoSafetensors, RoundTripEachDtype) {
  const std::vector<float> a = exact_values(64 * 32), b = exact_values(7, 0.5f), c = exact_values(12, 4.0f),
                           d = exact_values(5);
  const std::string p = path("m.safetensors");
  write_safetensors(p,
                    {{"a", {64, 32}, a.data(), DType::F32},
                     {"b", {7}, b.data(), DType::F16},
                     {"c", {3, 2, 2}, c.data(), DType::BF16},
                     {"d", {5}, d.data(), DType::F64},
                     {"empty", {0, 4}, nullptr, DType::BF16}},
                    {{"format", "pt"}, {"note", "x"}});
  // Header length is a multiple of 8 and the data section holds exactly the tensors' bytes.
  std::ifstream in(p, std::ios::binary);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(in.get())) << (8 * i);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(fs::file_size(p), 8 + n + 64 * 32 * 4 + 7 * 2 + 12 * 2 + 5 * 8);

  const SafetensorsFile f(p);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("note"), "x");
  ASSERT_EQ(f.tensors().size(), 5u);
  // data_offsets follow the order the tensors were given in.
  EXPECT_EQ(f.find("a")->begin, 0u);
  EXPECT_EQ(f.find("b")->begin, 64u * 32 * 4);
  EXPECT_EQ(f.find("c")->begin, f.find("b")->end);
  EXPECT_EQ(f.find("d")->begin, f.find("c")->end);
  EXPECT_EQ(f.find("b")->dtype, DType::F16);
  EXPECT_EQ(f.find("c")->shape, (std::vector<int64_t>{3, 2, 2}));
  EXPECT_EQ(f.find("missing"), nullptr);
  auto check = [&](const std::string& name, const std::vector<float>& want) {
    const TensorInfo* t = f.find(name);
    ASSERT_NE(t, nullptr);
    std::vector<float> got(want.size(), -1.0f);
    f.read_f32(*t, got.data());
    EXPECT_EQ(got, want) << name;
  };
  check("a", a);
  check("b", b);
  check("c", c);
  check("d", d);
  check("empty", {});
  // Raw bytes are the dtype's encoding.
  const std::vector<uint16_t> raw_c = raw_u16(f, "c");
  for (size_t i = 0; i < c.size(); ++i) EXPECT_EQ(raw_c[i], float_to_bf16(c[i]));
  const std::vector<uint16_t> raw_b = raw_u16(f, "b");
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(raw_b[i], float_to_fp16(b[i]));
  // No temporary files are left behind.
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir_)) files += e.is_regular_file();
  EXPECT_EQ(files, 1u);
}

TEST_F(IoSafetensors, Bf16AndFp16RoundingBitPatterns) {
  auto f32 = [](uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  };
  // fp32 bits -> expected bf16 bits (round to nearest, ties to even).
  const std::vector<std::pair<uint32_t, uint16_t>> bf16_cases = {
      {0x3F800000u, 0x3F80},  // 1.0
      {0x3F808000u, 0x3F80},  // 1 + 2^-8: tie, stays even
      {0x3F818000u, 0x3F82},  // 1 + 3*2^-8: tie, rounds up to even
      {0x3F808001u, 0x3F81},  // just above the tie
      {0x3F807FFFu, 0x3F80},  // just below the tie
      {0xBF80C000u, 0xBF81},  // negative, above the tie
      {0x80000000u, 0x8000},  // -0
      {0x7F7FFFFFu, 0x7F80},  // FLT_MAX rounds to +inf
      {0x7F800000u, 0x7F80},  // +inf
      {0x00000001u, 0x0000},  // smallest subnormal rounds to 0
      {0x40490FDBu, 0x4049},  // pi
  };
  const std::vector<std::pair<uint32_t, uint16_t>> fp16_cases = {
      {0x3F800000u, 0x3C00},  // 1.0
      {0x477FE000u, 0x7BFF},  // 65504 = fp16 max
      {0x477FF000u, 0x7C00},  // 65520 rounds to inf
      {0x33800000u, 0x0001},  // 2^-24, smallest fp16 subnormal
      {0x33000000u, 0x0000},  // 2^-25: tie between 0 and 2^-24, to even (0)
      {0xC0000000u, 0xC000},  // -2
      {0x3F801000u, 0x3C00},  // 1 + 2^-11: tie, stays even
      {0x3F803000u, 0x3C02},  // 1 + 3*2^-11: tie, rounds up to even
  };
  std::vector<float> in_bf16, in_fp16;
  for (auto [bits, want] : bf16_cases) in_bf16.push_back(f32(bits));
  for (auto [bits, want] : fp16_cases) in_fp16.push_back(f32(bits));
  const float nan = std::nanf("");
  in_bf16.push_back(nan);
  const std::string p = path("r.safetensors");
  write_safetensors(p, {{"bf", {int64_t(in_bf16.size())}, in_bf16.data(), DType::BF16},
                        {"hf", {int64_t(in_fp16.size())}, in_fp16.data(), DType::F16}});
  const SafetensorsFile f(p);
  const std::vector<uint16_t> bf = raw_u16(f, "bf"), hf = raw_u16(f, "hf");
  for (size_t i = 0; i < bf16_cases.size(); ++i)
    EXPECT_EQ(bf[i], bf16_cases[i].second) << std::hex << "fp32 0x" << bf16_cases[i].first;
  EXPECT_EQ(bf.back() & 0x7F80, 0x7F80);  // NaN stays NaN
  EXPECT_NE(bf.back() & 0x007F, 0);
  for (size_t i = 0; i < fp16_cases.size(); ++i)
    EXPECT_EQ(hf[i], fp16_cases[i].second) << std::hex << "fp32 0x" << fp16_cases[i].first;
}

TEST_F(IoSafetensors, ShardedDirRoundTrip) {
  const std::vector<float> a = exact_values(100), b = exact_values(300, 2.0f), c = exact_values(50), d = exact_values(10);
  const std::vector<TensorToWrite> tensors = {{"a", {10, 10}, a.data(), DType::BF16},
                                              {"b", {300}, b.data(), DType::F32},  // 1200 bytes: a shard of its own
                                              {"c", {5, 10}, c.data(), DType::F16},
                                              {"d", {10}, d.data(), DType::BF16}};
  const std::string out = path("model");
  write_safetensors_dir(out, tensors, 256);
  EXPECT_FALSE(fs::exists(out + "/model.safetensors"));
  ASSERT_TRUE(fs::exists(out + "/model.safetensors.index.json"));
  json index = json::parse(std::ifstream(out + "/model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], 200 + 1200 + 100 + 20);
  EXPECT_EQ(index["weight_map"]["a"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["b"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["c"], "model-00003-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["d"], "model-00003-of-00003.safetensors");
  EXPECT_EQ(SafetensorsFile(out + "/model-00001-of-00003.safetensors").metadata().at("format"), "pt");

  const SafetensorsDir dir(out);
  EXPECT_EQ(dir.names(), (std::vector<std::string>{"a", "b", "c", "d"}));
  const SafetensorsFile* file = nullptr;
  ASSERT_NE(dir.find("c", &file), nullptr);
  EXPECT_EQ(file->path(), out + "/model-00003-of-00003.safetensors");
  EXPECT_EQ(dir.find("zzz"), nullptr);
  std::vector<float> got(300);
  dir.read_f32("a", {10, 10}, got.data());
  EXPECT_TRUE(std::equal(a.begin(), a.end(), got.begin()));
  dir.read_f32("b", {300}, got.data());
  EXPECT_TRUE(std::equal(b.begin(), b.end(), got.begin()));
  dir.read_f32("c", {5, 10}, got.data());
  EXPECT_TRUE(std::equal(c.begin(), c.end(), got.begin()));

  // Rewriting the same directory unsharded replaces the index: the directory stays consistent.
  write_safetensors_dir(out, tensors);
  EXPECT_TRUE(fs::exists(out + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(out + "/model.safetensors.index.json"));
  const SafetensorsDir single(out);
  single.read_f32("d", {10}, got.data());
  EXPECT_TRUE(std::equal(d.begin(), d.end(), got.begin()));
  EXPECT_EQ(single.names().size(), 4u);
}

TEST_F(IoSafetensors, MissingFileAndTinyFile) {
  const std::string missing = path("none.safetensors");
  expect_input_error([&] { SafetensorsFile f(missing); }, missing, "file", "no such file");
  const std::string tiny = path("tiny.safetensors");
  { std::ofstream(tiny) << "abc"; }
  expect_input_error([&] { SafetensorsFile f(tiny); }, tiny, "header length", "3 bytes");
}

TEST_F(IoSafetensors, HeaderLengthPastEnd) {
  const std::string p = write_raw("past.safetensors", std::string("{}"), "", 1000);
  expect_input_error([&] { SafetensorsFile f(p); }, p, "header length", "past the end");
  const std::string huge = write_raw("huge.safetensors", std::string("{}"), "", int64_t(1) << 62);
  expect_input_error([&] { SafetensorsFile f(huge); }, huge, "header length", "past the end");
}

TEST_F(IoSafetensors, HeaderNotJsonObject) {
  const std::string bad = write_raw("bad.safetensors", std::string("{\"a\": [1,}"), "");
  expect_input_error([&] { SafetensorsFile f(bad); }, bad, "header", "valid JSON");
  const std::string arr = write_raw("arr.safetensors", std::string("[1, 2]  "), "");
  expect_input_error([&] { SafetensorsFile f(arr); }, arr, "header", "a JSON object");
  const std::string meta = write_raw("meta.safetensors", json{{"__metadata__", {{"format", 1}}}}, 0);
  expect_input_error([&] { SafetensorsFile f(meta); }, meta, "__metadata__.format", "a string");
  const std::string entry = write_raw("entry.safetensors", json{{"w", 5}}, 0);
  expect_input_error([&] { SafetensorsFile f(entry); }, entry, "w", "dtype, shape and data_offsets");
}

TEST_F(IoSafetensors, UnsupportedDtype) {
  for (const char* dt : {"F8_E4M3", "I8", "BOOL", "U16"}) {
    const std::string p = write_raw(std::string(dt) + ".safetensors",
                                    json{{"w", {{"dtype", dt}, {"shape", {4}}, {"data_offsets", {0, 4}}}}}, 4);
    expect_input_error([&] { SafetensorsFile f(p); }, p, "w.dtype", std::string("\"") + dt + "\"");
  }
  const std::string missing = write_raw("nodtype.safetensors", json{{"w", {{"shape", {1}}, {"data_offsets", {0, 4}}}}}, 4);
  expect_input_error([&] { SafetensorsFile f(missing); }, missing, "w.dtype", "missing");
}

TEST_F(IoSafetensors, BadShape) {
  const std::string neg = write_raw("neg.safetensors", json{{"w", {{"dtype", "F32"}, {"shape", {2, -1}}, {"data_offsets", {0, 0}}}}}, 0);
  expect_input_error([&] { SafetensorsFile f(neg); }, neg, "w.shape", "non-negative");
  const std::string flt = write_raw("flt.safetensors", json{{"w", {{"dtype", "F32"}, {"shape", {2.0}}, {"data_offsets", {0, 8}}}}}, 8);
  expect_input_error([&] { SafetensorsFile f(flt); }, flt, "w.shape", "non-negative integers");
  const std::string big = write_raw("big.safetensors",
                                    json{{"w", {{"dtype", "F32"}, {"shape", {uint64_t(1) << 40, uint64_t(1) << 40}}, {"data_offsets", {0, 8}}}}}, 8);
  expect_input_error([&] { SafetensorsFile f(big); }, big, "w.shape", "64 bits");
}

TEST_F(IoSafetensors, TruncatedData) {
  // Two tensors of 16 bytes each, but the file holds only 20 data bytes.
  const json h = {{"a", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}},
                  {"b", {{"dtype", "F32"}, {"shape", {2, 2}}, {"data_offsets", {16, 32}}}}};
  const std::string p = write_raw("trunc.safetensors", h, 20);
  expect_input_error([&] { SafetensorsFile f(p); }, p, "b.data_offsets", "truncated");
}

TEST_F(IoSafetensors, OffsetsInconsistentWithShape) {
  const std::string p = write_raw("inc.safetensors",
                                  json{{"w", {{"dtype", "BF16"}, {"shape", {2, 3}}, {"data_offsets", {0, 24}}}}}, 24);
  expect_input_error([&] { SafetensorsFile f(p); }, p, "w.data_offsets", "end - begin = 12 bytes");
  const std::string rev = write_raw("rev.safetensors",
                                    json{{"w", {{"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {8, 4}}}}}, 8);
  expect_input_error([&] { SafetensorsFile f(rev); }, rev, "w.data_offsets", "begin <= end");
  const std::string three = write_raw("three.safetensors",
                                      json{{"w", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4, 8}}}}}, 8);
  expect_input_error([&] { SafetensorsFile f(three); }, three, "w.data_offsets", "[begin, end]");
}

TEST_F(IoSafetensors, OverlappingRanges) {
  const json h = {{"a", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}},
                  {"b", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {8, 24}}}},
                  {"z", {{"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {4, 4}}}}};  // empty: no overlap
  const std::string p = write_raw("overlap.safetensors", h, 24);
  expect_input_error([&] { SafetensorsFile f(p); }, p, "b.data_offsets", "not overlapping a [0, 16)");
}

TEST_F(IoSafetensors, FileShrinksAfterOpen) {
  const std::vector<float> a = exact_values(64);
  const std::string p = path("shrink.safetensors");
  write_safetensors(p, {{"a", {64}, a.data(), DType::F32}});
  const SafetensorsFile f(p);
  fs::resize_file(p, fs::file_size(p) - 10);
  std::vector<float> got(64);
  expect_input_error([&] { f.read_f32(*f.find("a"), got.data()); }, p, "a", "truncated");
}

TEST_F(IoSafetensors, MissingAndMisshapedTensor) {
  const std::vector<float> w = exact_values(64 * 32);
  const std::string model = path("model");
  write_safetensors_dir(model, {{"w", {32, 64}, w.data(), DType::BF16}});
  const SafetensorsDir dir(model);
  std::vector<float> out(64 * 32);
  expect_input_error([&] { dir.read_f32("v", {64, 32}, out.data()); }, model, "v", "missing");
  expect_input_error([&] { dir.read_f32("w", {64, 32}, out.data()); }, model + "/model.safetensors", "w",
                     "expected shape [64, 32], got shape [32, 64]");
  expect_input_error([&] { dir.read_f32("w", {32, 64, 1}, out.data()); }, model + "/model.safetensors", "w",
                     "[32, 64, 1]");
}

TEST_F(IoSafetensors, NonFloatingTensor) {
  const std::string p = write_raw("int.safetensors", json{{"ids", {{"dtype", "I32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}}}, 8);
  const SafetensorsFile f(p);
  int32_t raw[2];
  f.read_raw(*f.find("ids"), raw);
  EXPECT_EQ(raw[0], 0x01010101);
  float out[2];
  expect_input_error([&] { f.read_f32(*f.find("ids"), out); }, p, "ids.dtype", "floating");
}

TEST_F(IoSafetensors, DirWithoutWeights) {
  const std::string empty = path("empty");
  fs::create_directories(empty);
  expect_input_error([&] { SafetensorsDir d(empty); }, empty, "model.safetensors",
                     "a safetensors file or model.safetensors.index.json");
  const std::string none = path("does-not-exist");
  expect_input_error([&] { SafetensorsDir d(none); }, none, "directory", "no such directory");
}

TEST_F(IoSafetensors, IndexErrors) {
  const std::vector<float> a = exact_values(16);
  const std::string model = path("model");
  write_safetensors_dir(model, {{"a", {16}, a.data(), DType::F32}, {"b", {16}, a.data(), DType::F32}}, 64);
  const std::string index = model + "/model.safetensors.index.json";
  ASSERT_TRUE(fs::exists(index));
  const json good = json::parse(std::ifstream(index));
  EXPECT_NO_THROW(SafetensorsDir d(model));
  auto write_index = [&](const json& j) { std::ofstream(index) << j.dump(); };

  json j = good;
  j["weight_map"]["c"] = "model-00003-of-00003.safetensors";  // shard that does not exist
  write_index(j);
  expect_input_error([&] { SafetensorsDir d(model); }, index, "weight_map.c", "model-00003-of-00003.safetensors");

  j = good;
  j["weight_map"]["c"] = "model-00001-of-00002.safetensors";  // shard exists, tensor does not
  write_index(j);
  expect_input_error([&] { SafetensorsDir d(model); }, index, "weight_map.c", "no such tensor");

  j = good;
  j["weight_map"]["a"] = "../elsewhere.safetensors";
  write_index(j);
  expect_input_error([&] { SafetensorsDir d(model); }, index, "weight_map.a", "file name inside the model directory");

  j = good;
  j["weight_map"]["a"] = 1;
  write_index(j);
  expect_input_error([&] { SafetensorsDir d(model); }, index, "weight_map.a", "shard file name");

  j = good;
  j.erase("weight_map");
  write_index(j);
  expect_input_error([&] { SafetensorsDir d(model); }, index, "weight_map", "missing");

  std::ofstream(index) << "{\"weight_map\": ";
  expect_input_error([&] { SafetensorsDir d(model); }, index, "json", "valid JSON");
}

TEST_F(IoSafetensors, WriteIntoMissingDirectoryFails) {
  const std::vector<float> a = exact_values(4);
  const std::string p = path("no/such/dir/x.safetensors");
  try {
    write_safetensors(p, {{"a", {4}, a.data(), DType::F32}});
    ADD_FAILURE() << "no error";
  } catch (const IoError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("no/such/dir"), std::string::npos) << msg;
    EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace longtune
