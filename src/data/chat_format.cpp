#include "src/data/chat_format.hpp"

#include <nlohmann/json.hpp>

#include "io/json_util.hpp"
#include "io/llama3_pretokenizer.hpp"
#include "io/utf8.hpp"

namespace longtune {

using json = nlohmann::json;

namespace {

using jsonutil::describe;

bool fail(RecordProblem* p, std::string field, std::string expected, std::string got) {
  *p = RecordProblem{std::move(field), std::move(expected), std::move(got)};
  return false;
}

bool python_space(uint32_t cp) {
  return (cp >= 0x1C && cp <= 0x1F) || code_point_class(cp) == CodePointClass::kWhite;
}

}  // namespace

std::string_view python_strip(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t begin = 0;
  while (begin < s.size()) {
    const size_t len = utf8_sequence_length(s, begin);
    if (len == 0 || !python_space(utf8_decode(p + begin, len))) break;
    begin += len;
  }
  size_t end = s.size();
  while (end > begin) {
    size_t start = end - 1;  // back to the lead byte of the last character
    while (start > begin && (p[start] & 0xC0) == 0x80) --start;
    const size_t len = utf8_sequence_length(s, start);
    if (len != end - start || !python_space(utf8_decode(p + start, len))) break;
    end = start;
  }
  return s.substr(begin, end - begin);
}

bool parse_record(std::string_view line, RecordFormat format, bool require_assistant, Record* out,
                  RecordProblem* problem) {
  if (python_strip(line).empty()) return fail(problem, "line", "a JSON object", "an empty line");
  json j = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    // Re-parse for the parser's message (only on bad lines).
    try {
      const json again = json::parse(line.begin(), line.end());
    } catch (const json::parse_error& e) {
      std::string msg = e.what();
      const auto pos = msg.find("] ");
      if (pos != std::string::npos) msg = msg.substr(pos + 2);
      return fail(problem, "json", "valid JSON", msg);
    }
    return fail(problem, "json", "valid JSON", "a parse error");
  }
  if (!j.is_object()) return fail(problem, "json", "an object", describe(j));
  const auto msgs = j.find("messages");
  const auto text = j.find("text");
  const bool chat = format == RecordFormat::kChat || (format == RecordFormat::kAuto && msgs != j.end());
  if (!chat) {
    if (text == j.end())
      return fail(problem, "text",
                  format == RecordFormat::kAuto ? "a \"messages\" list or a \"text\" string" : "a \"text\" string",
                  "missing");
    if (!text->is_string()) return fail(problem, "text", "a string", describe(*text));
    out->kind = RecordKind::kText;
    out->text = text->get<std::string>();
    if (python_strip(out->text).empty()) return fail(problem, "text", "a non-empty string", describe(*text));
    return true;
  }
  if (msgs == j.end()) return fail(problem, "messages", "a list of {role, content} objects", "missing");
  if (!msgs->is_array()) return fail(problem, "messages", "a list of {role, content} objects", describe(*msgs));
  if (msgs->empty()) return fail(problem, "messages", "at least one message", "an empty list");
  out->kind = RecordKind::kChat;
  out->messages.clear();
  bool any_assistant = false;
  for (size_t i = 0; i < msgs->size(); ++i) {
    const json& m = (*msgs)[i];
    const std::string f = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) return fail(problem, f, "an object {role, content}", describe(m));
    const auto role = m.find("role");
    if (role == m.end()) return fail(problem, f + ".role", "system, user or assistant", "missing");
    if (!role->is_string() || (*role != "system" && *role != "user" && *role != "assistant"))
      return fail(problem, f + ".role", "system, user or assistant", describe(*role));
    const auto content = m.find("content");
    if (content == m.end()) return fail(problem, f + ".content", "a string", "missing");
    if (!content->is_string()) return fail(problem, f + ".content", "a string", describe(*content));
    ChatMessage cm{role->get<std::string>(), content->get<std::string>()};
    if (python_strip(cm.content).empty())
      return fail(problem, f + ".content", "a non-empty string", describe(*content));
    any_assistant = any_assistant || cm.role == "assistant";
    out->messages.push_back(std::move(cm));
  }
  if (require_assistant && !any_assistant)
    return fail(problem, "messages", "at least one assistant message (the loss targets)", "none");
  return true;
}

Llama3ChatTokens::Llama3ChatTokens(const Tokenizer& tok)
    : begin_of_text(tok.require_token("<|begin_of_text|>")),
      end_of_text(tok.require_token("<|end_of_text|>")),
      start_header(tok.require_token("<|start_header_id|>")),
      end_header(tok.require_token("<|end_header_id|>")),
      eot(tok.require_token("<|eot_id|>")) {}

void render_llama3_chat(TokenizerSession& session, const Llama3ChatTokens& special,
                        const std::vector<ChatMessage>& messages, LossMaskMode mode, std::vector<int32_t>& ids,
                        std::vector<uint8_t>& mask) {
  const uint8_t all = mode == LossMaskMode::kAll ? 1 : 0;
  auto fill_mask = [&](uint8_t v) { mask.resize(ids.size(), uint8_t(v | all)); };
  ids.push_back(special.begin_of_text);
  fill_mask(0);
  for (const ChatMessage& m : messages) {
    ids.push_back(special.start_header);
    session.encode(m.role, false, ids);
    ids.push_back(special.end_header);
    // "\n\n" is a pre-token of its own since the trimmed content starts with a non-space, so
    // encoding it apart gives the ids of the whole "\n\n{content}".
    session.encode("\n\n", false, ids);
    fill_mask(0);
    session.encode(python_strip(m.content), false, ids);
    ids.push_back(special.eot);
    fill_mask(m.role == "assistant" ? 1 : 0);
  }
}

}  // namespace longtune
