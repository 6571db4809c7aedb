// A Hugging Face tokenizer.json of the byte-level BPE kind Llama 3 uses, in C++.
//
// Supported subset (anything else is refused with an InputError naming the field):
//   normalizer     null
//   pre_tokenizer  Sequence[Split(Llama 3 regex, Isolated), ByteLevel(add_prefix_space false,
//                  use_regex false)]
//   model          BPE: vocab, merges as "a b" strings or [a, b] pairs, ignore_merges; no dropout,
//                  no continuing_subword_prefix / end_of_word_suffix, no byte_fallback
//   decoder        ByteLevel
//   added_tokens   matched before the model, leftmost-longest, non-normalized ones first;
//                  single_word / lstrip / rstrip must be false
//   post_processor ignored: encode() never adds BOS/EOS (callers such as `prepare` add them)
// encode() gives the ids the tokenizers library gives for tok.encode(text, add_special_tokens=False)
// where text is `bytes.decode("utf-8", errors="replace")` of the input (see io/utf8.hpp).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace longtune {

class TokenizerSession;

class Tokenizer {
 public:
  // Reads and validates a tokenizer.json; errors are InputError(path, field, ...).
  static Tokenizer load(const std::string& path);
  // The same from JSON text; `file` names it in messages.
  static Tokenizer parse(const std::string& json_text, const std::string& file);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids of `text` (any bytes: invalid UTF-8 becomes U+FFFD). With allow_special false,
  // the text of special added tokens (`<|eot_id|>`) is encoded as plain text, like the tokenizers
  // library's `encode_special_tokens = True`. Convenience form: each call builds a session; use a
  // TokenizerSession for bulk work.
  std::vector<int32_t> encode(std::string_view text, bool allow_special = true) const;
  // Text of the ids; the bytes are repaired like String::from_utf8_lossy (a split multi-byte
  // character becomes U+FFFD). An id outside [0, vocab_size) is an InputError.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  // Largest id + 1 over the model vocabulary and the added tokens.
  int64_t vocab_size() const;
  // The id of an added token (by its content) or of a vocabulary entry (by its text, as the bytes
  // it stands for); nullopt when there is none.
  std::optional<int32_t> token_id(std::string_view text) const;
  // Like token_id, but a missing token is an InputError naming the file and the token.
  int32_t require_token(std::string_view text) const;
  // True when the content of some added token contains `s`.
  bool added_token_contains(std::string_view s) const;
  const std::string& path() const;

  struct Impl;

 private:
  friend class TokenizerSession;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Encoding state of one thread: scratch buffers and a cache of pre-token -> ids, so steady-state
// encoding allocates nothing. Not thread-safe; the tokenizer must outlive it.
class TokenizerSession {
 public:
  explicit TokenizerSession(const Tokenizer& tokenizer);
  TokenizerSession(TokenizerSession&&) noexcept;
  ~TokenizerSession();
  // Appends the ids of `text` to `out` (see Tokenizer::encode).
  void encode(std::string_view text, bool allow_special, std::vector<int32_t>& out);

  struct State;

 private:
  const Tokenizer::Impl* tok_;
  std::unique_ptr<State> st_;
};

}  // namespace longtune
