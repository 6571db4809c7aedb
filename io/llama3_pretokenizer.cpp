#include "io/llama3_pretokenizer.hpp"

#include <algorithm>
#include <array>

#include "io/utf8.hpp"
#include "src/common/error.hpp"

namespace longtune {
namespace {

struct CodePointRun {
  uint32_t start;
  CodePointClass cls;
};
constexpr CodePointClass kWhite = CodePointClass::kWhite, kLetter = CodePointClass::kLetter,
                         kNumber = CodePointClass::kNumber, kOther = CodePointClass::kOther;
#include "io/unicode_tables.inc"

// ASCII is most of most text: a direct table.
constexpr std::array<CodePointClass, 128> make_ascii_classes() {
  std::array<CodePointClass, 128> t{};
  for (uint32_t c = 0; c < 128; ++c) {
    if ((c >= 9 && c <= 13) || c == ' ') t[c] = kWhite;
    else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) t[c] = kLetter;
    else if (c >= '0' && c <= '9') t[c] = kNumber;
    else t[c] = kOther;
  }
  return t;
}
constexpr std::array<CodePointClass, 128> kAscii = make_ascii_classes();

bool is_newline(uint32_t c) { return c == '\r' || c == '\n'; }

// (?i:...) of the contractions: ASCII case folding, plus U+017F LATIN SMALL LETTER LONG S, which
// folds to 's' (the only non-ASCII code point folding to one of s t r e v m l d).
uint32_t fold(uint32_t c) {
  if (c >= 'A' && c <= 'Z') return c + ('a' - 'A');
  if (c == 0x17F) return 's';
  return c;
}

}  // namespace

const char* const kLlama3Pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

CodePointClass code_point_class(uint32_t cp) {
  if (cp < 128) return kAscii[cp];
  const auto* end = std::end(kCodePointRuns);
  const auto* it = std::upper_bound(std::begin(kCodePointRuns), end, cp,
                                    [](uint32_t c, const CodePointRun& r) { return c < r.start; });
  return (it - 1)->cls;
}

const char* unicode_tables_version() { return kUnicodeVersion; }

void Llama3PreTokenizer::split(std::string_view text, std::vector<uint32_t>& ends) {
  LT_CHECK(text.size() < (size_t(1) << 32), "pre-tokenizer input over 4 GiB (offsets are 32-bit)");
  ends.clear();
  cps_.clear();
  off_.clear();
  cls_.clear();
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  for (size_t i = 0; i < text.size();) {
    uint32_t cp;
    size_t len;
    if (p[i] < 0x80) {
      cp = p[i];
      len = 1;
      cls_.push_back(kAscii[cp]);
    } else {
      len = utf8_sequence_length(text, i);
      if (len == 0) len = 1;  // callers pass valid UTF-8; stay in bounds regardless
      cp = utf8_decode(p + i, len);
      cls_.push_back(code_point_class(cp));
    }
    cps_.push_back(cp);
    off_.push_back(uint32_t(i));
    i += len;
  }
  off_.push_back(uint32_t(text.size()));
  for (size_t i = 0; i < cps_.size();) {
    const size_t j = match(i);
    ends.push_back(off_[j]);
    i = j;
  }
}

// The alternatives in pattern order; the first that matches wins, each greedy with the
// backtracking the regex engine would do.
size_t Llama3PreTokenizer::match(size_t i) const {
  const size_t n = cps_.size();
  const uint32_t* cp = cps_.data();
  const CodePointClass* cls = cls_.data();
  auto run_of = [&](size_t k, CodePointClass c) {
    while (k < n && cls[k] == c) ++k;
    return k;
  };
  // (?i:'s|'t|'re|'ve|'m|'ll|'d)
  if (cp[i] == '\'' && i + 1 < n) {
    const uint32_t a = fold(cp[i + 1]);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if (i + 2 < n) {
      const uint32_t b = fold(cp[i + 2]);
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
  }
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (cls[i] == kLetter) return run_of(i, kLetter);
  if (!is_newline(cp[i]) && cls[i] != kNumber && i + 1 < n && cls[i + 1] == kLetter) return run_of(i + 1, kLetter);
  // \p{N}{1,3}
  if (cls[i] == kNumber) {
    size_t j = i + 1;
    while (j < n && j < i + 3 && cls[j] == kNumber) ++j;
    return j;
  }
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
  {
    size_t j = i;
    if (cp[j] == ' ' && j + 1 < n && cls[j + 1] == kOther) ++j;
    if (cls[j] == kOther) {
      j = run_of(j, kOther);
      while (j < n && is_newline(cp[j])) ++j;
      return j;
    }
  }
  // Only white space is left.
  const size_t end = run_of(i, kWhite);
  // \s*[\r\n]+ : up to and including the last newline of the white-space run.
  for (size_t k = end; k > i; --k)
    if (is_newline(cp[k - 1])) return k;
  // \s+(?!\S) : the run, less its last character when a non-space follows.
  if (end == n) return end;
  if (end - i >= 2) return end - 1;
  // \s+
  return end;
}

}  // namespace longtune
