// UTF-8 validation and repair. Invalid input is repaired the way Python's
// bytes.decode("utf-8", errors="replace") and Rust's String::from_utf8_lossy do it: each maximal
// subpart of an ill-formed sequence (Unicode 15, section 3.9, "U+FFFD substitution of maximal
// subparts") becomes one U+FFFD. The tokenizer applies it to its input, since the Hugging Face
// tokenizers library only ever sees Python str (already decoded that way), and to decoded bytes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace longtune {

// Length of the well-formed UTF-8 sequence starting at s[i], or 0 when s[i] starts an ill-formed
// one; then *bad_len (when given) is the length of its maximal subpart (>= 1).
size_t utf8_sequence_length(std::string_view s, size_t i, size_t* bad_len = nullptr);

// True when every byte of s belongs to a well-formed sequence.
bool utf8_valid(std::string_view s);

// `s` itself when valid; otherwise `buf` holding s with each maximal ill-formed subpart replaced by
// U+FFFD (EF BF BD), and a view of it.
std::string_view utf8_repair(std::string_view s, std::string& buf);

// Appends the UTF-8 encoding of code point cp (< 0x110000, not a surrogate).
void utf8_append(std::string& out, uint32_t cp);

// The code point of the well-formed sequence of length n at p (n from utf8_sequence_length).
inline uint32_t utf8_decode(const unsigned char* p, size_t n) {
  switch (n) {
    case 1: return p[0];
    case 2: return (uint32_t(p[0] & 0x1F) << 6) | (p[1] & 0x3F);
    case 3: return (uint32_t(p[0] & 0x0F) << 12) | (uint32_t(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
    default:
      return (uint32_t(p[0] & 0x07) << 18) | (uint32_t(p[1] & 0x3F) << 12) | (uint32_t(p[2] & 0x3F) << 6) |
             (p[3] & 0x3F);
  }
}

}  // namespace longtune
