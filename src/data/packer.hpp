// Sequence packing (design brief §3 "Dataset"): documents of a TokenDataset are packed into rows
// of seq_len tokens; attention never crosses a document (or chunk) and positions restart at 0.
//
// The packing rule, exactly:
//
//  * Order. Documents are taken in a given order: a vector of document indices, normally from
//    document_order() (file order, or a seeded shuffle that is identical on every platform).
//
//  * Rows. Each row has seq_len slots and is filled left to right with segments.
//      - A document of length 0 is skipped.
//      - A document of length n <= seq_len goes into the current row when it fits in the
//        remaining space; otherwise the row is closed and the document starts a new row.
//        (So a document of exactly seq_len tokens is exactly one row.)
//      - A document of length n > seq_len is split into chunks of seq_len tokens, the last one
//        shorter (or full when seq_len divides n). Every chunk starts a new row (a partly filled
//        current row is closed first). The full chunks fill their rows; the final chunk then
//        behaves like a short document: following documents may share its row.
//    A closed row's remaining slots are padding.
//
//  * Segments. Each document, or chunk of a long document, is one segment: positions run
//    0, 1, 2, ... within it and attention never crosses it. The padding run at the end of a row
//    is a segment of its own (positions from 0) so no real token ever attends to padding.
//    Every row boundary is a segment boundary. cu_seqlens lists the segment starts over the
//    flattened micro-batch (rows * seq_len tokens) and ends with rows * seq_len.
//
//  * Padding: token 0, target -1.
//
//  * Targets. The token at global index i of document d (off[d] <= i < off[d+1]) has target
//    tokens[i+1] when i+1 < off[d+1] and (the dataset has no loss mask, or loss_mask[i+1] == 1);
//    otherwise -1. A chunk boundary does not stop the target: the last token of a chunk predicts
//    the first token of the next chunk of the same document. A document of length 1 contributes
//    one token with target -1.
//
//  * Cursor. Packing state between rows is fully described by (order_index, offset_in_doc): the
//    position in the order and the token offset inside that document (non-zero only when a long
//    document continues into the next row; then it is a multiple of seq_len). next_rows() always
//    stops at a row boundary, so saving cursor() and later calling set_cursor() on a fresh packer
//    of the same dataset/order/seq_len gives exactly the rows an uninterrupted packer would.
#pragma once
#include <cstdint>
#include <vector>

#include "io/token_dataset.hpp"
#include "src/data/packed_batch.hpp"

namespace longtune {

// The order in which an epoch visits documents: 0..num_docs-1 when !shuffle, else a permutation
// by Fisher–Yates (i from num_docs-1 down to 1, swap i with j uniform in [0, i]) driven by
// std::mt19937_64(seed) and rejection-sampled indices (portable_random.hpp), so the order is the
// same on every platform and standard library.
std::vector<int64_t> document_order(int64_t num_docs, uint64_t seed, bool shuffle);

// Where the packer stands: the next row starts at token offset_in_doc of document
// order[order_index]. order_index == order.size() means the epoch is exhausted.
struct PackerCursor {
  int64_t order_index = 0;
  int64_t offset_in_doc = 0;
  bool operator==(const PackerCursor&) const = default;
};

class SequencePacker {
 public:
  // Keeps a reference to `ds` (it must outlive the packer) and a copy of `order`. Throws
  // ConfigError when seq_len < 1 or an order entry is not a document index of `ds`.
  SequencePacker(const TokenDataset& ds, std::vector<int64_t> order, int64_t seq_len);

  // Fills `out` with the next micro-batch of up to `rows` rows (fewer only when the epoch runs out;
  // out->rows says how many; every row is complete, padding included). Returns false, leaving
  // out->rows == 0 and the vectors empty, when no real token is left.
  bool next_rows(int64_t rows, PackedBatch* out);

  PackerCursor cursor() const { return cur_; }
  // Throws ConfigError when the cursor cannot come from this dataset/order/seq_len.
  void set_cursor(const PackerCursor& c);
  // True when no real token is left (trailing empty documents do not count).
  bool done() const;

  // Rows a whole epoch produces (from the start, independent of the cursor), without packing.
  int64_t count_rows() const;

  int64_t seq_len() const { return seq_len_; }
  const std::vector<int64_t>& order() const { return order_; }

 private:
  // Appends one row to `out` (tokens/targets/positions and its segment ends to cu_seqlens);
  // returns false (appending nothing) when no real token is left.
  bool fill_row(PackedBatch* out);
  void append_segment(PackedBatch* out, int64_t doc, int64_t begin, int64_t len) const;

  const TokenDataset& ds_;
  std::vector<int64_t> order_;
  int64_t seq_len_;
  PackerCursor cur_;
};

// Packs a whole epoch into micro-batches of `rows` rows (the last one may have fewer rows).
std::vector<PackedBatch> pack_all(const TokenDataset& ds, const std::vector<int64_t>& order,
                                  int64_t seq_len, int64_t rows);

}  // namespace longtune
