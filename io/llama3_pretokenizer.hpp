// The pre-tokenizer of Llama 3's tokenizer.json: a Split on the regex kLlama3Pattern (behavior
// "Isolated"), implemented as a hand-written matcher over code points because std::regex has no
// \p{L} / \p{N}. The code point classes come from io/unicode_tables.inc (io/gen_unicode_tables.py).
#pragma once
#include <cstdint>
#include <string_view>
#include <vector>

namespace longtune {

// The Split pattern this matcher implements, exactly as tokenizer.json spells it.
extern const char* const kLlama3Pattern;

// \s (Unicode White_Space), \p{L}, \p{N}, or none of them.
enum class CodePointClass : uint8_t { kWhite = 0, kLetter = 1, kNumber = 2, kOther = 3 };
CodePointClass code_point_class(uint32_t cp);
// The Unicode version of the class tables.
const char* unicode_tables_version();

// Splits text into the pieces the regex matches (they tile the text). Keeps its scratch buffers
// between calls; one instance per thread.
class Llama3PreTokenizer {
 public:
  // `text` must be valid UTF-8. Fills `ends` with the byte offset where each piece ends.
  void split(std::string_view text, std::vector<uint32_t>& ends);

 private:
  size_t match(size_t i) const;  // end (code point index) of the match starting at code point i
  std::vector<uint32_t> cps_;    // code points of the text
  std::vector<uint32_t> off_;    // byte offset of each code point (+ the end)
  std::vector<CodePointClass> cls_;
};

}  // namespace longtune
