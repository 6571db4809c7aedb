// The HDF5 token dataset (docs/formats.md): /tokens int32 [N], /doc_offsets int64 [D+1],
// optional /loss_mask uint8 [N] (1 = this token is a prediction target); attributes vocab_size,
// optional bos_id, eos_id.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace longtune {

struct TokenDataset {
  std::string path;
  std::vector<int32_t> tokens;       // (N)
  std::vector<int64_t> doc_offsets;  // (D+1): document d is tokens[off[d] : off[d+1]]
  std::vector<uint8_t> loss_mask;    // (N) or empty, meaning every token is a target
  int64_t vocab_size = 0;
  int64_t bos_id = -1, eos_id = -1;  // -1 when absent

  int64_t num_documents() const { return int64_t(doc_offsets.size()) - 1; }
  int64_t num_tokens() const { return int64_t(tokens.size()); }
  int64_t doc_length(int64_t d) const { return doc_offsets[size_t(d) + 1] - doc_offsets[size_t(d)]; }
};

// Reads and validates a dataset: offsets start at 0, are non-decreasing and end at N; tokens in
// [0, vocab_size); mask length N and values 0/1; vocab_size <= model_vocab_size when that is > 0.
// Throws InputError naming the file, the dataset/attribute and what was expected.
TokenDataset load_token_dataset(const std::string& path, int64_t model_vocab_size = 0);
// Writes a dataset (atomically: temporary name then rename). Validates it first.
void write_token_dataset(const std::string& path, const TokenDataset& ds);

// Writes a dataset document by document with bounded memory: /tokens, /loss_mask and
// /doc_offsets are chunked, extendible datasets filled from buffers of a few MB. Everything goes
// to a temporary file next to `path`; commit() writes the attributes and renames it over `path`
// (so readers never see a partial file), and destroying an uncommitted writer removes it.
class TokenDatasetWriter {
 public:
  // bos_id / eos_id: -1 for none. with_mask: write /loss_mask (append() then needs masks).
  TokenDatasetWriter(const std::string& path, int64_t vocab_size, int64_t bos_id, int64_t eos_id, bool with_mask);
  TokenDatasetWriter(const TokenDatasetWriter&) = delete;
  TokenDatasetWriter& operator=(const TokenDatasetWriter&) = delete;
  ~TokenDatasetWriter();

  // Appends tokens (and their mask: same length, values 0/1) to the current document. Token ids
  // outside [0, vocab_size) are an InternalError: the producer is wrong, not the user's file.
  void append(std::span<const int32_t> tokens, std::span<const uint8_t> mask = {});
  // Closes the current document (an empty one is allowed, as in the format).
  void end_document();
  void add_document(std::span<const int32_t> tokens, std::span<const uint8_t> mask = {}) {
    append(tokens, mask);
    end_document();
  }
  int64_t num_documents() const;
  int64_t num_tokens() const;
  // Flushes, writes the attributes, closes, fsyncs and renames the file to `path`. A dataset
  // without tokens or documents is an InputError (the format needs at least one of each).
  void commit();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace longtune
