// `longtune prepare`: JSONL / text files -> the HDF5 token dataset (docs/data.md). Streaming:
// input is read in bounded batches, tokenized on N threads (output order = input order) and
// appended to the dataset, so memory stays bounded whatever the input size.
#pragma once
#include <array>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "src/data/chat_format.hpp"

namespace longtune {

struct PrepareOptions {
  std::string tokenizer;            // tokenizer.json
  std::vector<std::string> inputs;  // JSONL files (.jsonl, .json), text files, or folders of .txt files
  RecordFormat format = RecordFormat::kAuto;
  std::string out;                  // the HDF5 dataset
  LossMaskMode loss_mask = LossMaskMode::kAssistant;
  bool fail_on_bad_line = false;    // else: report and skip
  int threads = 1;                  // tokenizing threads
  int64_t max_tokens = 0;           // > 0: documents are truncated to this many tokens
  bool force = false;               // replace an existing --out
  size_t batch_bytes = size_t(2) << 20;  // input bytes per batch (two batches are in flight)
  FILE* log = stderr;               // progress, bad lines and the summary; nullptr: silent
  double progress_every_s = 5.0;    // progress line period when `log` is not a terminal
  size_t max_reported_bad_lines = 100;  // printed one by one; the rest only counted
};

struct PrepareStats {
  int64_t documents = 0, tokens = 0, masked_tokens = 0, truncated_documents = 0;
  int64_t bad_lines = 0;
  uint64_t input_bytes = 0;
  double seconds = 0;
  std::array<int64_t, 64> length_histogram{};  // [b]: documents with 2^b <= length < 2^(b+1)
  std::vector<std::string> bad_line_messages;  // "file:line: field: expected ..., got ..." (first ones)
};

// Runs the whole conversion. Bad options are ConfigError; a missing input, a bad tokenizer, an
// existing --out without `force`, or a bad line with fail_on_bad_line are InputError (a bad
// line's reads "<file>:<line>: <field>: expected ..."). Nothing is left under `out` on failure.
PrepareStats prepare_dataset(const PrepareOptions& opt);

// The summary printed at the end (documents, tokens, masked share, length histogram, bad lines).
std::string prepare_summary(const PrepareStats& s);

}  // namespace longtune
