#include "src/data/packer.hpp"

#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>

#include "src/common/error.hpp"
#include "src/data/portable_random.hpp"

namespace longtune {

std::vector<int64_t> document_order(int64_t num_docs, uint64_t seed, bool shuffle) {
  if (num_docs < 0) throw ConfigError("document_order: num_docs must be >= 0, got " + std::to_string(num_docs));
  std::vector<int64_t> order(static_cast<size_t>(num_docs));
  std::iota(order.begin(), order.end(), int64_t(0));
  if (!shuffle) return order;
  std::mt19937_64 rng(seed);
  for (int64_t i = num_docs - 1; i >= 1; --i) {
    const auto j = int64_t(uniform_below(rng, uint64_t(i) + 1));
    std::swap(order[size_t(i)], order[size_t(j)]);
  }
  return order;
}

SequencePacker::SequencePacker(const TokenDataset& ds, std::vector<int64_t> order, int64_t seq_len)
    : ds_(ds), order_(std::move(order)), seq_len_(seq_len) {
  if (seq_len_ < 1 || seq_len_ > std::numeric_limits<int32_t>::max())
    throw ConfigError("seq_len must be in [1, 2^31), got " + std::to_string(seq_len_));
  const int64_t D = ds_.num_documents();
  LT_CHECK(D >= 0, "TokenDataset without doc_offsets");
  LT_CHECK(ds_.doc_offsets.back() == ds_.num_tokens(), "TokenDataset: doc_offsets must end at N");
  LT_CHECK(ds_.loss_mask.empty() || ds_.loss_mask.size() == ds_.tokens.size(),
           "TokenDataset: loss_mask length must be N");
  for (size_t k = 0; k < order_.size(); ++k)
    if (order_[k] < 0 || order_[k] >= D)
      throw ConfigError("document order entry " + std::to_string(k) + " is " + std::to_string(order_[k]) +
                        ", expected a document index in [0, " + std::to_string(D) + ")");
}

void SequencePacker::set_cursor(const PackerCursor& c) {
  const auto n = int64_t(order_.size());
  bool ok = c.order_index >= 0 && c.order_index <= n && c.offset_in_doc >= 0;
  if (ok && c.order_index == n) ok = c.offset_in_doc == 0;
  if (ok && c.order_index < n && c.offset_in_doc > 0) {
    const int64_t len = ds_.doc_length(order_[size_t(c.order_index)]);
    ok = c.offset_in_doc < len && c.offset_in_doc % seq_len_ == 0;
  }
  if (!ok)
    throw ConfigError("data cursor (order_index " + std::to_string(c.order_index) + ", offset_in_doc " +
                      std::to_string(c.offset_in_doc) + ") does not fit this dataset: expected order_index in [0, " +
                      std::to_string(n) + "] and offset_in_doc a multiple of seq_len " + std::to_string(seq_len_) +
                      " inside the document");
  cur_ = c;
}

bool SequencePacker::done() const {
  if (cur_.offset_in_doc > 0) return false;
  for (size_t k = size_t(cur_.order_index); k < order_.size(); ++k)
    if (ds_.doc_length(order_[k]) > 0) return false;
  return true;
}

void SequencePacker::append_segment(PackedBatch* out, int64_t doc, int64_t begin, int64_t len) const {
  const int64_t doc_begin = ds_.doc_offsets[size_t(doc)];
  const int64_t doc_end = ds_.doc_offsets[size_t(doc) + 1];
  const bool masked = !ds_.loss_mask.empty();
  for (int64_t p = 0; p < len; ++p) {
    const int64_t i = doc_begin + begin + p;
    out->tokens.push_back(ds_.tokens[size_t(i)]);
    const bool counted = i + 1 < doc_end && (!masked || ds_.loss_mask[size_t(i) + 1] == 1);
    out->targets.push_back(counted ? ds_.tokens[size_t(i) + 1] : -1);
    out->positions.push_back(int32_t(p));
  }
  out->cu_seqlens.push_back(int32_t(out->tokens.size()));
}

bool SequencePacker::fill_row(PackedBatch* out) {
  const int64_t L = seq_len_;
  const auto n_order = int64_t(order_.size());
  int64_t used = 0;
  while (cur_.order_index < n_order) {
    const int64_t d = order_[size_t(cur_.order_index)];
    const int64_t n = ds_.doc_length(d);
    if (cur_.offset_in_doc > 0) {
      // Continuation of a long document: only ever at the start of a row.
      LT_CHECK(used == 0, "packer: a document continuation must start a row");
      const int64_t rest = n - cur_.offset_in_doc;
      if (rest > L) {
        append_segment(out, d, cur_.offset_in_doc, L);
        cur_.offset_in_doc += L;
        used = L;
        break;
      }
      append_segment(out, d, cur_.offset_in_doc, rest);  // final chunk: behaves like a short doc
      used = rest;
      cur_.offset_in_doc = 0;
      ++cur_.order_index;
      continue;
    }
    if (n == 0) {
      ++cur_.order_index;
      continue;
    }
    if (n <= L) {
      if (used + n > L) break;  // does not fit: close the row
      append_segment(out, d, 0, n);
      used += n;
      ++cur_.order_index;
      continue;
    }
    // Long document: its first chunk starts a new row.
    if (used > 0) break;
    append_segment(out, d, 0, L);
    cur_.offset_in_doc = L;
    used = L;
    break;
  }
  if (used == 0) return false;
  if (used < L) {  // padding run: its own segment
    for (int64_t p = 0; p < L - used; ++p) {
      out->tokens.push_back(0);
      out->targets.push_back(-1);
      out->positions.push_back(int32_t(p));
    }
    out->cu_seqlens.push_back(int32_t(out->tokens.size()));
  }
  return true;
}

bool SequencePacker::next_rows(int64_t rows, PackedBatch* out) {
  if (rows < 1) throw ConfigError("micro-batch rows must be >= 1, got " + std::to_string(rows));
  if (rows > std::numeric_limits<int32_t>::max() / seq_len_)
    throw ConfigError("micro-batch of " + std::to_string(rows) + " rows x seq_len " + std::to_string(seq_len_) +
                      " exceeds 2^31-1 tokens");
  out->rows = 0;
  out->seq_len = seq_len_;
  out->tokens.clear();
  out->targets.clear();
  out->positions.clear();
  out->cu_seqlens.clear();
  const auto cap = size_t(rows * seq_len_);
  out->tokens.reserve(cap);
  out->targets.reserve(cap);
  out->positions.reserve(cap);
  out->cu_seqlens.push_back(0);
  while (out->rows < rows && fill_row(out)) ++out->rows;
  if (out->rows == 0) {
    out->cu_seqlens.clear();
    return false;
  }
  return true;
}

int64_t SequencePacker::count_rows() const {
  const int64_t L = seq_len_;
  int64_t rows = 0, used = 0;  // used: tokens in the open row (0 = no open row)
  for (const int64_t d : order_) {
    const int64_t n = ds_.doc_length(d);
    if (n == 0) continue;
    if (n <= L) {
      if (used > 0 && used + n <= L) {
        used += n;
      } else {
        ++rows;
        used = n;
      }
      continue;
    }
    // Long document: (n - 1) / L full chunks, each its own row, then the final chunk opens a row.
    const int64_t full = (n - 1) / L;
    rows += full + 1;
    used = n - full * L;
  }
  return rows;
}

std::vector<PackedBatch> pack_all(const TokenDataset& ds, const std::vector<int64_t>& order, int64_t seq_len,
                                  int64_t rows) {
  SequencePacker packer(ds, order, seq_len);
  std::vector<PackedBatch> batches;
  PackedBatch b;
  while (packer.next_rows(rows, &b)) batches.push_back(std::move(b));
  return batches;
}

}  // namespace longtune
