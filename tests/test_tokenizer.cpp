// io/tokenizer: parity with the Hugging Face tokenizers library on the fixture tokenizer
// (tests/golden/make_tokenizer_fixture.py), round trips, invalid UTF-8, malformed tokenizer.json.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/llama3_pretokenizer.hpp"
#include "io/tokenizer.hpp"
#include "io/utf8.hpp"
#include "src/common/error.hpp"
#include "tests/test_paths.hpp"

namespace longtune {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

fs::path tok_dir() { return test::fixture_dir() / "tokenizer"; }
std::string tok_path() { return (tok_dir() / "tokenizer.json").string(); }

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out.push_back(char(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

std::vector<int32_t> ids_of(const json& v) { return v.get<std::vector<int32_t>>(); }

struct Case {
  std::string input;
  bool valid_utf8;
  std::vector<int32_t> ids, ids_plain;
  std::string decoded;
};

std::vector<Case> load_cases() {
  const json j = json::parse(read_all(tok_dir() / "cases.json"));
  std::vector<Case> out;
  for (const json& c : j["texts"]) {
    Case k;
    k.valid_utf8 = c.contains("text");
    k.input = k.valid_utf8 ? c["text"].get<std::string>() : from_hex(c["bytes_hex"].get<std::string>());
    k.ids = ids_of(c["ids"]);
    k.ids_plain = c.contains("ids_plain") ? ids_of(c["ids_plain"]) : k.ids;
    k.decoded = k.valid_utf8 ? k.input : c["decoded"].get<std::string>();
    out.push_back(std::move(k));
  }
  return out;
}

std::string show(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f) out.push_back(char(c));
    else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  return out.size() > 120 ? out.substr(0, 120) + "..." : out;
}

TEST(TokenizerParity, EncodeMatchesTokenizersLibrary) {
  const Tokenizer tok = Tokenizer::load(tok_path());
  EXPECT_EQ(tok.vocab_size(), 2053);
  const std::vector<Case> cases = load_cases();
  ASSERT_GE(cases.size(), 200u);
  TokenizerSession session(tok);
  for (int pass = 0; pass < 2; ++pass) {  // the second pass runs from the session's cache
    for (const Case& c : cases) {
      std::vector<int32_t> got;
      session.encode(c.input, true, got);
      EXPECT_EQ(got, c.ids) << "text: " << show(c.input);
      got.clear();
      session.encode(c.input, false, got);
      EXPECT_EQ(got, c.ids_plain) << "specials as text: " << show(c.input);
    }
  }
}

TEST(TokenizerParity, DecodeRoundTrips) {
  const Tokenizer tok = Tokenizer::load(tok_path());
  for (const Case& c : load_cases()) {
    EXPECT_EQ(tok.decode(c.ids), c.decoded) << show(c.input);
    if (c.valid_utf8) {
      EXPECT_EQ(tok.decode(tok.encode(c.input)), c.input) << show(c.input);
    }
  }
  const json j = json::parse(read_all(tok_dir() / "cases.json"));
  for (const json& d : j["decodes"]) EXPECT_EQ(tok.decode(ids_of(d["ids"])), d["text"].get<std::string>());
  // skip_special drops <|eot_id|> and friends.
  const int32_t eot = tok.require_token("<|eot_id|>");
  std::vector<int32_t> ids = tok.encode("hi");
  ids.push_back(eot);
  EXPECT_EQ(tok.decode(ids, true), "hi");
  EXPECT_EQ(tok.decode(ids, false), "hi<|eot_id|>");
}

TEST(TokenizerParity, LegacyStringMergesGiveTheSameIds) {
  // Older tokenizer.json files (Llama 3's own) write merges as "a b" strings.
  json j = json::parse(read_all(tok_path()));
  for (json& m : j["model"]["merges"]) m = m[0].get<std::string>() + " " + m[1].get<std::string>();
  const Tokenizer legacy = Tokenizer::parse(j.dump(), "legacy.json");
  const Tokenizer tok = Tokenizer::load(tok_path());
  for (const Case& c : load_cases()) EXPECT_EQ(legacy.encode(c.input), c.ids) << show(c.input);
  EXPECT_EQ(legacy.vocab_size(), tok.vocab_size());
}

TEST(TokenizerParity, WithoutIgnoreMergesTheModelStillMatchesOnFixtureCases) {
  // ignore_merges only short-cuts words that are whole vocabulary entries; for a BPE trained by
  // the library those merge to the same entry anyway.
  json j = json::parse(read_all(tok_path()));
  j["model"]["ignore_merges"] = false;
  const Tokenizer t = Tokenizer::parse(j.dump(), "no_ignore.json");
  for (const Case& c : load_cases()) EXPECT_EQ(t.encode(c.input), c.ids) << show(c.input);
}

TEST(TokenizerUtf8, MaximalSubpartReplacement) {
  std::string buf;
  EXPECT_EQ(std::string(utf8_repair("ok", buf)), "ok");
  const std::string fffd = "\xEF\xBF\xBD";
  EXPECT_EQ(std::string(utf8_repair("\xE0\x80\xAF", buf)), fffd + fffd + fffd);  // E0 needs A0..BF next
  EXPECT_EQ(std::string(utf8_repair("\xE2\x82", buf)), fffd);                     // truncated: one subpart
  EXPECT_EQ(std::string(utf8_repair("\xF0\x9F\x98!", buf)), fffd + "!");
  EXPECT_EQ(std::string(utf8_repair("\xED\xA0\x80", buf)), fffd + fffd + fffd);  // a surrogate
  EXPECT_EQ(std::string(utf8_repair("a\xC3", buf)), "a" + fffd);
}

TEST(TokenizerPreTokenizer, SplitsLikeTheLlama3Regex) {
  Llama3PreTokenizer pre;
  std::vector<uint32_t> ends;
  auto pieces = [&](const std::string& s) {
    pre.split(s, ends);
    std::vector<std::string> out;
    uint32_t b = 0;
    for (uint32_t e : ends) {
      out.push_back(s.substr(b, e - b));
      b = e;
    }
    return out;
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(pieces("Hello world"), (V{"Hello", " world"}));
  EXPECT_EQ(pieces("DON'T 1234567"), (V{"DON", "'T", " ", "123", "456", "7"}));
  EXPECT_EQ(pieces("a  b"), (V{"a", " ", " b"}));
  EXPECT_EQ(pieces("x\r\n\r\n  y "), (V{"x", "\r\n\r\n", " ", " y", " "}));
  EXPECT_EQ(pieces(" ?!\n\nz"), (V{" ?!\n\n", "z"}));
  EXPECT_EQ(code_point_class(0x4E2D), CodePointClass::kLetter);  // 中
  EXPECT_EQ(code_point_class(0x0663), CodePointClass::kNumber);  // ٣
  EXPECT_EQ(code_point_class(0x3000), CodePointClass::kWhite);
  EXPECT_EQ(code_point_class(0x1F600), CodePointClass::kOther);
  EXPECT_EQ(std::string(unicode_tables_version()), "16.0.0");
}

// ---- malformed tokenizer.json: one line naming the file and the field ---------------------------

void expect_error(const std::function<void(json&)>& edit, const std::string& field, const std::string& what) {
  json j = json::parse(read_all(tok_path()));
  edit(j);
  try {
    Tokenizer::parse(j.dump(), "bad/tokenizer.json");
    ADD_FAILURE() << "no error for " << field;
  } catch (const InputError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(e.file(), "bad/tokenizer.json");
    EXPECT_EQ(e.field(), field) << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos);
  }
}

TEST(TokenizerErrors, MalformedFilesNameTheField) {
  expect_error([](json& j) { j["model"].erase("merges"); }, "model.merges", "missing");
  expect_error([](json& j) { j["model"]["type"] = "WordPiece"; }, "model.type", "\"WordPiece\"");
  expect_error([](json& j) { j.erase("model"); }, "model", "missing");
  expect_error([](json& j) { j["model"]["merges"] = 3; }, "model.merges", "integer 3");
  expect_error([](json& j) { j["model"]["merges"][5] = "abc"; }, "model.merges[5]", "two tokens");
  expect_error([](json& j) { j["model"]["merges"][7] = json::array({"zzzqq", "x"}); }, "model.merges[7]",
               "\"zzzqq\" is not in the vocabulary");
  expect_error([](json& j) { j["model"]["vocab"].erase("a"); }, "model.vocab", "byte 97");
  expect_error([](json& j) { j["model"]["vocab"]["a"] = "x"; }, "model.vocab[\"a\"]", "a token id");
  expect_error([](json& j) { j["model"]["dropout"] = 0.1; }, "model.dropout", "no BPE dropout");
  expect_error([](json& j) { j["normalizer"] = json{{"type", "NFC"}}; }, "normalizer", "NFC");
  expect_error([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\s+"; },
               "pre_tokenizer.pretokenizers[0].pattern", "Llama 3 regex");
  expect_error([](json& j) { j["pre_tokenizer"]["pretokenizers"][1]["use_regex"] = true; },
               "pre_tokenizer.pretokenizers[1].use_regex", "false");
  expect_error([](json& j) { j["pre_tokenizer"] = json{{"type", "Whitespace"}}; }, "pre_tokenizer", "Sequence");
  expect_error([](json& j) { j["decoder"] = nullptr; }, "decoder", "ByteLevel");
  expect_error([](json& j) { j["added_tokens"][1]["lstrip"] = true; }, "added_tokens[1].lstrip", "not supported");
  expect_error([](json& j) { j["added_tokens"][0].erase("content"); }, "added_tokens[0].content", "missing");
}

TEST(TokenizerErrors, BadJsonAndMissingFile) {
  try {
    Tokenizer::parse("{\"model\": ", "x/tokenizer.json");
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "json");
    EXPECT_NE(std::string(e.what()).find("x/tokenizer.json: json: expected valid JSON"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Tokenizer::load("/nonexistent/tokenizer.json"), InputError);
  const Tokenizer tok = Tokenizer::load(tok_path());
  const std::vector<int32_t> bad{5000};
  EXPECT_THROW(tok.decode(bad), InputError);
  EXPECT_THROW(tok.require_token("<|no_such|>"), InputError);
}

TEST(TokenizerSpeed, ThroughputOnMixedText) {
  // Not a pass/fail number (machines differ); printed so regressions show in the log.
  const Tokenizer tok = Tokenizer::load(tok_path());
  std::string text;
  const std::vector<Case> cases = load_cases();
  while (text.size() < (size_t(8) << 20))
    for (const Case& c : cases)
      if (c.valid_utf8) text += c.input + " ";
  TokenizerSession s(tok);
  std::vector<int32_t> out;
  s.encode(text.substr(0, 1 << 20), true, out);  // warm the cache
  out.clear();
  const auto t0 = std::chrono::steady_clock::now();
  s.encode(text, true, out);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[tokenizer] %.1f MB in %.3f s: %.1f MB/s, %.2f bytes/token\n", double(text.size()) / 1e6, secs,
              double(text.size()) / 1e6 / secs, double(text.size()) / double(out.size()));
  EXPECT_GT(out.size(), 0u);
}

}  // namespace
}  // namespace longtune
