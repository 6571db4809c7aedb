// Training records of `longtune prepare` (docs/data.md): a JSONL line is a chat conversation
// {"messages": [{"role", "content"}, ...]} (LongCite-45K style) or a text document {"text": ...};
// conversations are rendered in the Llama 3.1 chat format with a loss mask.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "io/tokenizer.hpp"

namespace longtune {

struct ChatMessage {
  std::string role;  // system, user or assistant
  std::string content;
};

// What is wrong with a line, as InputError's parts: "<field>: expected <expected>, got <got>".
struct RecordProblem {
  std::string field, expected, got;
  std::string text() const { return field + ": expected " + expected + (got.empty() ? "" : ", got " + got); }
};

enum class RecordKind { kChat, kText };
// Which records a JSONL line may hold: --format chat, text, or auto (whichever key is present).
enum class RecordFormat { kAuto, kChat, kText };

struct Record {
  RecordKind kind = RecordKind::kText;
  std::vector<ChatMessage> messages;  // kChat
  std::string text;                   // kText
};

// Parses one JSONL line. Returns false and fills *problem when the line is not a valid record:
// invalid JSON, not an object, no messages/text, an empty message list, a role other than
// system/user/assistant, a content that is not a string or is empty after trimming, or (when
// require_assistant) a conversation without an assistant message.
bool parse_record(std::string_view line, RecordFormat format, bool require_assistant, Record* out,
                  RecordProblem* problem);

// Python's str.strip(), which the Llama 3.1 chat template's `| trim` applies: removes leading and
// trailing code points that Python's str.isspace() accepts (Unicode White_Space and U+001C..U+001F).
std::string_view python_strip(std::string_view s);

enum class LossMaskMode { kAssistant, kAll };

// The special tokens of the Llama 3 chat format, looked up in the tokenizer (an InputError names
// the tokenizer file when one is missing).
struct Llama3ChatTokens {
  int32_t begin_of_text, end_of_text, start_header, end_header, eot;
  explicit Llama3ChatTokens(const Tokenizer& tok);
};

// Appends the Llama 3.1 rendering of a conversation:
//   <|begin_of_text|> then per message
//   <|start_header_id|>{role}<|end_header_id|>\n\n{content | trim}<|eot_id|>
// Message text is encoded with special-token text treated as plain text (a "<|eot_id|>" typed in a
// message cannot end the turn). Mask: 1 on the assistant content tokens and their <|eot_id|>
// (kAssistant), or on every token (kAll).
void render_llama3_chat(TokenizerSession& session, const Llama3ChatTokens& special,
                        const std::vector<ChatMessage>& messages, LossMaskMode mode, std::vector<int32_t>& ids,
                        std::vector<uint8_t>& mask);

}  // namespace longtune
