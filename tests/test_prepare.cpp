// src/data/prepare (`longtune prepare`): chat rendering and masks against ids computed in Python
// with the tokenizers library (tests/fixtures/tokenizer/chat_cases.json), text documents, bad
// lines, overwrite refusal, truncation, and independence from threads and batch size.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/token_dataset.hpp"
#include "io/tokenizer.hpp"
#include "src/common/error.hpp"
#include "src/data/prepare.hpp"
#include "tests/test_paths.hpp"

namespace longtune {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string tok_path() { return (test::fixture_dir() / "tokenizer" / "tokenizer.json").string(); }

json chat_cases() {
  std::ifstream in(test::fixture_dir() / "tokenizer" / "chat_cases.json");
  return json::parse(in);
}

class PrepareTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("lt-prepare-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& content) {
    const fs::path p = dir_ / name;
    fs::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary) << content;
    return p.string();
  }
  PrepareOptions options(std::vector<std::string> inputs, const std::string& out = "out.h5") {
    PrepareOptions o;
    o.tokenizer = tok_path();
    o.inputs = std::move(inputs);
    o.out = (dir_ / out).string();
    o.log = nullptr;
    return o;
  }
  static std::vector<int32_t> doc(const TokenDataset& ds, int64_t d) {
    return {ds.tokens.begin() + ds.doc_offsets[size_t(d)], ds.tokens.begin() + ds.doc_offsets[size_t(d) + 1]};
  }
  static std::vector<uint8_t> doc_mask(const TokenDataset& ds, int64_t d) {
    return {ds.loss_mask.begin() + ds.doc_offsets[size_t(d)], ds.loss_mask.begin() + ds.doc_offsets[size_t(d) + 1]};
  }
  // Every regular file of the test folder (to see that no temporary file is left behind).
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    for (const auto& e : fs::recursive_directory_iterator(dir_))
      if (e.is_regular_file()) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }

  fs::path dir_;
};

std::string chat_jsonl(const json& cases) {
  std::string out;
  for (const json& c : cases["chat"]) out += json{{"messages", c["messages"]}}.dump() + "\n";
  return out;
}

TEST_F(PrepareTest, ChatRenderingAndMaskMatchPython) {
  const json cases = chat_cases();
  const std::string in = write("chat.jsonl", chat_jsonl(cases));
  PrepareOptions o = options({in});
  o.threads = 2;
  o.batch_bytes = 2000;  // many batches: order must survive the pipeline
  const PrepareStats st = prepare_dataset(o);
  const TokenDataset ds = load_token_dataset(o.out);
  ASSERT_EQ(ds.num_documents(), int64_t(cases["chat"].size()));
  EXPECT_EQ(st.documents, ds.num_documents());
  EXPECT_EQ(st.bad_lines, 0);
  EXPECT_EQ(ds.vocab_size, cases["vocab_size"].get<int64_t>());
  EXPECT_EQ(ds.bos_id, cases["bos_id"].get<int64_t>());
  EXPECT_EQ(ds.eos_id, cases["eos_id"].get<int64_t>());
  int64_t masked = 0;
  for (int64_t d = 0; d < ds.num_documents(); ++d) {
    const json& c = cases["chat"][size_t(d)];
    EXPECT_EQ(doc(ds, d), c["ids"].get<std::vector<int32_t>>()) << "conversation " << d;
    EXPECT_EQ(doc_mask(ds, d), c["mask"].get<std::vector<uint8_t>>()) << "conversation " << d;
    for (uint8_t m : doc_mask(ds, d)) masked += m;
  }
  EXPECT_EQ(st.masked_tokens, masked);
  EXPECT_EQ(st.tokens, ds.num_tokens());
}

TEST_F(PrepareTest, LossMaskAllMarksEveryToken) {
  const json cases = chat_cases();
  PrepareOptions o = options({write("chat.jsonl", chat_jsonl(cases))});
  o.loss_mask = LossMaskMode::kAll;
  prepare_dataset(o);
  const TokenDataset ds = load_token_dataset(o.out);
  EXPECT_EQ(doc(ds, 0), cases["chat"][0]["ids"].get<std::vector<int32_t>>());
  for (uint8_t m : ds.loss_mask) ASSERT_EQ(m, 1);
}

TEST_F(PrepareTest, TextDocumentsFromJsonlFilesAndFolders) {
  const json cases = chat_cases();
  std::string jsonl;
  for (const json& t : cases["text"]) jsonl += json{{"text", t["text"]}}.dump() + "\n";
  const std::string in = write("docs.jsonl", jsonl);
  // The same texts as .txt files of a folder (sorted by name), plus a non-.txt file that is ignored.
  for (size_t i = 0; i < cases["text"].size(); ++i)
    write("folder/doc" + std::to_string(100 + i) + ".txt", cases["text"][i]["text"].get<std::string>());
  write("folder/notes.md", "ignored");
  PrepareOptions o = options({in, (dir_ / "folder").string()});
  o.format = RecordFormat::kText;
  const PrepareStats st = prepare_dataset(o);
  const TokenDataset ds = load_token_dataset(o.out);
  const size_t n = cases["text"].size();
  ASSERT_EQ(ds.num_documents(), int64_t(2 * n - 1));
  EXPECT_EQ(st.bad_lines, 1);  // the "   " text is empty after trimming: a bad JSONL line
  for (size_t i = 0, d = 0; i < n; ++i) {
    const auto want = cases["text"][i]["ids"].get<std::vector<int32_t>>();
    if (cases["text"][i]["text"] != "   ") {
      EXPECT_EQ(doc(ds, int64_t(d++)), want) << "jsonl text " << i;
    }
    EXPECT_EQ(doc(ds, int64_t(n - 1 + i)), want) << "txt file " << i;  // the folder keeps "   " (one file = one document)
  }
  for (uint8_t m : ds.loss_mask) ASSERT_EQ(m, 1);
}

TEST_F(PrepareTest, LargeTextFileIsCutWithoutChangingTokens) {
  // Over 4 MB, text files are tokenized in pieces cut at safe places; the ids must equal one encode.
  const json cases = chat_cases();
  std::string text;
  for (int i = 0; text.size() < (size_t(9) << 20); ++i) {
    text += cases["text"][size_t(i) % 6]["text"].get<std::string>();
    text += (i % 7 == 0) ? "\n\n" : (i % 3 == 0 ? "\n" : " ");
  }
  PrepareOptions o = options({write("big.txt", text)});
  o.threads = 2;
  o.batch_bytes = size_t(1) << 20;
  prepare_dataset(o);
  const TokenDataset ds = load_token_dataset(o.out);
  ASSERT_EQ(ds.num_documents(), 1);
  const Tokenizer tok = Tokenizer::load(tok_path());
  std::vector<int32_t> want{tok.require_token("<|begin_of_text|>")};
  const std::vector<int32_t> body = tok.encode(text, false);
  want.insert(want.end(), body.begin(), body.end());
  want.push_back(tok.require_token("<|end_of_text|>"));
  EXPECT_TRUE(ds.tokens == want) << ds.tokens.size() << " vs " << want.size() << " tokens";
}

const char* kBadJsonl =
    "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n"
    "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"tool\", \"content\": \"x\"}]}\n"
    "{\"messages\": \n"
    "\n"
    "{\"text\": \"no messages\"}\n"
    "{\"messages\": []}\n"
    "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}\n"
    "{\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}\n"
    "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"  \\n \"}]}\n"
    "[1, 2]\n"
    "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}";

TEST_F(PrepareTest, BadLinesAreReportedWithFileAndLineAndSkipped) {
  const std::string in = write("bad.jsonl", kBadJsonl);
  PrepareOptions o = options({in});
  o.format = RecordFormat::kChat;
  o.batch_bytes = 100;
  const PrepareStats st = prepare_dataset(o);
  const std::vector<std::string> want = {
      in + ":2: messages[1].role: expected system, user or assistant, got string \"tool\"",
      in + ":3: json: expected valid JSON, got parse error at line 1, column 14: syntax error while parsing value - unexpected end of input; expected "
           "'[', '{', or a literal",
      in + ":4: line: expected a JSON object, got an empty line",
      in + ":5: messages: expected a list of {role, content} objects, got missing",
      in + ":6: messages: expected at least one message, got an empty list",
      in + ":7: messages[0].content: expected a string, got integer 5",
      in + ":8: messages: expected at least one assistant message (the loss targets), got none",
      in + ":9: messages[1].content: expected a non-empty string, got string \"  \\n \"",
      in + ":10: json: expected an object, got array [1,2]",
  };
  ASSERT_EQ(st.bad_line_messages.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(st.bad_line_messages[i], want[i]);
  EXPECT_EQ(st.bad_lines, int64_t(want.size()));
  EXPECT_EQ(st.documents, 2);
  EXPECT_EQ(load_token_dataset(o.out).num_documents(), 2);
}

TEST_F(PrepareTest, BadLineIsFatalWithOnBadLineFailAndLeavesNoFile) {
  const std::string in = write("bad.jsonl", kBadJsonl);
  PrepareOptions o = options({in});
  o.fail_on_bad_line = true;
  try {
    prepare_dataset(o);
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_EQ(std::string(e.what()), in + ":2: messages[1].role: expected system, user or assistant, got string \"tool\"");
  }
  EXPECT_EQ(files(), std::vector<std::string>{"bad.jsonl"});  // no out.h5, no temporary file
}

TEST_F(PrepareTest, RefusesToOverwriteWithoutForce) {
  const std::string in = write("chat.jsonl", chat_jsonl(chat_cases()));
  PrepareOptions o = options({in});
  write("out.h5", "precious");
  try {
    prepare_dataset(o);
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_EQ(e.file(), o.out);
    EXPECT_EQ(e.field(), "--out");
    EXPECT_NE(std::string(e.what()).find("--force"), std::string::npos);
  }
  std::ifstream f(o.out);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(f), {}), "precious");
  o.force = true;
  prepare_dataset(o);
  EXPECT_EQ(load_token_dataset(o.out).num_documents(), int64_t(chat_cases()["chat"].size()));
}

TEST_F(PrepareTest, MaxTokensTruncatesAndCounts) {
  const json cases = chat_cases();
  PrepareOptions o = options({write("chat.jsonl", chat_jsonl(cases))});
  o.max_tokens = 20;
  const PrepareStats st = prepare_dataset(o);
  const TokenDataset ds = load_token_dataset(o.out);
  int64_t longer = 0;
  for (int64_t d = 0; d < ds.num_documents(); ++d) {
    auto want = cases["chat"][size_t(d)]["ids"].get<std::vector<int32_t>>();
    longer += want.size() > 20;
    want.resize(std::min<size_t>(want.size(), 20));
    EXPECT_EQ(doc(ds, d), want);
  }
  EXPECT_EQ(st.truncated_documents, longer);
  EXPECT_GT(longer, 0);
  EXPECT_EQ(st.length_histogram[4], longer);  // 20 tokens: the [16, 32) bucket
}

TEST_F(PrepareTest, SameOutputForAnyThreadsAndBatchSize) {
  const json cases = chat_cases();
  std::string jsonl;
  for (int rep = 0; rep < 20; ++rep) jsonl += chat_jsonl(cases);
  const std::string in = write("chat.jsonl", jsonl);
  PrepareOptions a = options({in}, "a.h5"), b = options({in}, "b.h5");
  a.threads = 1;
  a.batch_bytes = size_t(1) << 20;
  b.threads = 3;
  b.batch_bytes = 777;
  prepare_dataset(a);
  prepare_dataset(b);
  const TokenDataset da = load_token_dataset(a.out), db = load_token_dataset(b.out);
  EXPECT_EQ(da.tokens, db.tokens);
  EXPECT_EQ(da.loss_mask, db.loss_mask);
  EXPECT_EQ(da.doc_offsets, db.doc_offsets);
  EXPECT_EQ(da.num_documents(), int64_t(20 * cases["chat"].size()));
}

TEST_F(PrepareTest, OptionErrors) {
  const std::string txt = write("a.txt", "hello");
  PrepareOptions o = options({txt});
  o.format = RecordFormat::kChat;
  EXPECT_THROW(prepare_dataset(o), ConfigError);  // chat needs JSONL
  o = options({(dir_ / "missing.jsonl").string()});
  EXPECT_THROW(prepare_dataset(o), InputError);
  o = options({txt});
  o.tokenizer = (dir_ / "no-tokenizer.json").string();
  EXPECT_THROW(prepare_dataset(o), InputError);
  o = options({txt});
  o.threads = 0;
  EXPECT_THROW(prepare_dataset(o), ConfigError);
  o = options({write("only_bad.jsonl", "{}\n")});
  EXPECT_THROW(prepare_dataset(o), InputError);  // no valid record at all
  EXPECT_FALSE(fs::exists(o.out));
}

}  // namespace
}  // namespace longtune
