// Sequence packer (src/data/packer.hpp) and the built-in demo task (src/data/builtin_task.hpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "src/common/error.hpp"
#include "src/data/builtin_task.hpp"
#include "src/data/packer.hpp"
#include "src/data/portable_random.hpp"
#include "src/model/param_table.hpp"

namespace longtune {
namespace {

using I32 = std::vector<int32_t>;

TokenDataset make_ds(const std::vector<I32>& docs, const std::vector<std::vector<uint8_t>>& masks = {}) {
  TokenDataset ds;
  ds.path = "<test>";
  ds.vocab_size = 100;
  ds.doc_offsets.push_back(0);
  for (size_t d = 0; d < docs.size(); ++d) {
    ds.tokens.insert(ds.tokens.end(), docs[d].begin(), docs[d].end());
    if (!masks.empty()) ds.loss_mask.insert(ds.loss_mask.end(), masks[d].begin(), masks[d].end());
    ds.doc_offsets.push_back(int64_t(ds.tokens.size()));
  }
  return ds;
}

std::vector<int64_t> file_order(const TokenDataset& ds) { return document_order(ds.num_documents(), 0, false); }

void expect_batch(const PackedBatch& b, int64_t rows, int64_t seq_len, const I32& tokens, const I32& targets,
                  const I32& positions, const I32& cu) {
  EXPECT_EQ(b.rows, rows);
  EXPECT_EQ(b.seq_len, seq_len);
  EXPECT_EQ(b.tokens, tokens);
  EXPECT_EQ(b.targets, targets);
  EXPECT_EQ(b.positions, positions);
  EXPECT_EQ(b.cu_seqlens, cu);
}

// Docs shorter, equal and longer than seq_len, a one-token and an empty document, padding.
TokenDataset mixed_ds() {
  return make_ds({{10, 11, 12},
                  {20, 21},
                  {30, 31, 32, 33},
                  {40, 41, 42, 43, 44, 45, 46, 47, 48, 49},
                  {50},
                  {},
                  {60, 61}});
}

TEST(PackerHand, MixedDocumentsOneBatch) {
  const TokenDataset ds = mixed_ds();
  SequencePacker p(ds, file_order(ds), 4);
  EXPECT_EQ(p.count_rows(), 7);
  PackedBatch b;
  ASSERT_TRUE(p.next_rows(100, &b));
  expect_batch(b, 7, 4,
               // row0         row1          row2            row3            row4            row5          row6
               {10, 11, 12, 0, 20, 21, 0, 0, 30, 31, 32, 33, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 0, 60, 61, 0, 0},
               {11, 12, -1, -1, 21, -1, -1, -1, 31, 32, 33, -1, 41, 42, 43, 44, 45, 46, 47, 48, 49, -1, -1, -1, 61,
                -1, -1, -1},
               {0, 1, 2, 0, 0, 1, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0, 0, 0, 1, 0, 1},
               {0, 3, 4, 6, 8, 12, 16, 20, 22, 23, 24, 26, 28});
  EXPECT_EQ(b.num_targets(), 16);  // (n - 1) per document: 2 + 1 + 3 + 9 + 0 + 1
  EXPECT_FALSE(p.next_rows(100, &b));
  EXPECT_EQ(b.rows, 0);
  EXPECT_TRUE(b.tokens.empty());
  EXPECT_TRUE(b.cu_seqlens.empty());
  EXPECT_TRUE(p.done());
}

TEST(PackerHand, MixedDocumentsBatchesOfThreeRows) {
  const TokenDataset ds = mixed_ds();
  const auto batches = pack_all(ds, file_order(ds), 4, 3);
  ASSERT_EQ(batches.size(), 3u);
  expect_batch(batches[0], 3, 4, {10, 11, 12, 0, 20, 21, 0, 0, 30, 31, 32, 33},
               {11, 12, -1, -1, 21, -1, -1, -1, 31, 32, 33, -1}, {0, 1, 2, 0, 0, 1, 0, 1, 0, 1, 2, 3},
               {0, 3, 4, 6, 8, 12});
  expect_batch(batches[1], 3, 4, {40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 0},
               {41, 42, 43, 44, 45, 46, 47, 48, 49, -1, -1, -1}, {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0, 0},
               {0, 4, 8, 10, 11, 12});
  // The last batch is short in rows, never in row length.
  expect_batch(batches[2], 1, 4, {60, 61, 0, 0}, {61, -1, -1, -1}, {0, 1, 0, 1}, {0, 2, 4});
}

TEST(PackerHand, ExactlySeqLenDocumentsAreOneRowEach) {
  const TokenDataset ds = make_ds({{1, 2, 3, 4}, {5, 6, 7, 8}, {9, 10, 11, 12}});
  const auto batches = pack_all(ds, file_order(ds), 4, 8);
  ASSERT_EQ(batches.size(), 1u);
  expect_batch(batches[0], 3, 4, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12},
               {2, 3, 4, -1, 6, 7, 8, -1, 10, 11, 12, -1}, {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3}, {0, 4, 8, 12});
}

TEST(PackerHand, LongDocumentClosesPartialRowAndTailSharesRow) {
  // seq_len 4: [1 2] then a 9-token doc: row closes, chunks 4 + 4 + 1, the tail shares with [7 8].
  const TokenDataset ds = make_ds({{1, 2}, {10, 11, 12, 13, 14, 15, 16, 17, 18}, {7, 8}, {9, 9, 9}});
  SequencePacker p(ds, file_order(ds), 4);
  EXPECT_EQ(p.count_rows(), 5);
  PackedBatch b;
  ASSERT_TRUE(p.next_rows(5, &b));
  expect_batch(b, 5, 4, {1, 2, 0, 0, 10, 11, 12, 13, 14, 15, 16, 17, 18, 7, 8, 0, 9, 9, 9, 0},
               {2, -1, -1, -1, 11, 12, 13, 14, 15, 16, 17, 18, -1, 8, -1, -1, 9, 9, -1, -1},
               {0, 1, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 1, 0, 0, 1, 2, 0},
               {0, 2, 4, 8, 12, 13, 15, 16, 19, 20});
}

TEST(PackerHand, LongDocumentMultipleOfSeqLen) {
  const TokenDataset ds = make_ds({{1, 2, 3, 4, 5, 6}, {7}});
  const auto batches = pack_all(ds, file_order(ds), 3, 10);
  ASSERT_EQ(batches.size(), 1u);
  expect_batch(batches[0], 3, 3, {1, 2, 3, 4, 5, 6, 7, 0, 0}, {2, 3, 4, 5, 6, -1, -1, -1, -1},
               {0, 1, 2, 0, 1, 2, 0, 0, 1}, {0, 3, 6, 7, 9});
}

TEST(PackerHand, LossMask) {
  const TokenDataset ds = make_ds({{10, 11, 12, 13}, {20, 21, 22}}, {{0, 1, 0, 1}, {1, 1, 0}});
  const auto batches = pack_all(ds, file_order(ds), 8, 1);
  ASSERT_EQ(batches.size(), 1u);
  expect_batch(batches[0], 1, 8, {10, 11, 12, 13, 20, 21, 22, 0}, {11, -1, 13, -1, 21, -1, -1, -1},
               {0, 1, 2, 3, 0, 1, 2, 0}, {0, 4, 7, 8});
}

TEST(PackerHand, LossMaskAcrossChunkBoundary) {
  const TokenDataset ds = make_ds({{10, 11, 12, 13, 14}}, {{1, 1, 1, 0, 1}});
  const auto batches = pack_all(ds, file_order(ds), 2, 2);
  ASSERT_EQ(batches.size(), 2u);
  expect_batch(batches[0], 2, 2, {10, 11, 12, 13}, {11, 12, -1, 14}, {0, 1, 0, 1}, {0, 2, 4});
  expect_batch(batches[1], 1, 2, {14, 0}, {-1, -1}, {0, 0}, {0, 1, 2});
}

TEST(PackerHand, ZeroAndOneLengthDocuments) {
  const TokenDataset ds = make_ds({{}, {7}, {}, {8}, {}});
  SequencePacker p(ds, file_order(ds), 3);
  EXPECT_EQ(p.count_rows(), 1);
  PackedBatch b;
  ASSERT_TRUE(p.next_rows(4, &b));
  expect_batch(b, 1, 3, {7, 8, 0}, {-1, -1, -1}, {0, 0, 0}, {0, 1, 2, 3});
  EXPECT_FALSE(p.next_rows(4, &b));
}

TEST(PackerHand, NoDataAtAll) {
  const TokenDataset empty_docs = make_ds({{}, {}});
  SequencePacker p(empty_docs, file_order(empty_docs), 4);
  EXPECT_TRUE(p.done());
  EXPECT_EQ(p.count_rows(), 0);
  PackedBatch b;
  EXPECT_FALSE(p.next_rows(2, &b));
  EXPECT_TRUE(pack_all(empty_docs, {}, 4, 2).empty());
  const TokenDataset none = make_ds({});
  EXPECT_TRUE(pack_all(none, file_order(none), 4, 2).empty());
}

TEST(PackerHand, GivenOrderIsFollowed) {
  const TokenDataset ds = make_ds({{1, 2}, {3}, {4, 5, 6}});
  const auto batches = pack_all(ds, {2, 0, 1}, 3, 4);
  ASSERT_EQ(batches.size(), 1u);
  expect_batch(batches[0], 2, 3, {4, 5, 6, 1, 2, 3}, {5, 6, -1, 2, -1, -1}, {0, 1, 2, 0, 1, 0}, {0, 3, 5, 6});
}

TEST(PackerHand, BadArguments) {
  const TokenDataset ds = make_ds({{1, 2}, {3}});
  EXPECT_THROW(SequencePacker(ds, {0, 2}, 4), ConfigError);
  EXPECT_THROW(SequencePacker(ds, {-1}, 4), ConfigError);
  EXPECT_THROW(SequencePacker(ds, {0, 1}, 0), ConfigError);
  SequencePacker p(ds, {0, 1}, 4);
  PackedBatch b;
  EXPECT_THROW(p.next_rows(0, &b), ConfigError);
  EXPECT_THROW(p.set_cursor({3, 0}), ConfigError);
  EXPECT_THROW(p.set_cursor({0, 1}), ConfigError);   // doc 0 is short: no continuation
  EXPECT_THROW(p.set_cursor({2, 1}), ConfigError);   // past the end with an offset
  EXPECT_THROW(p.set_cursor({-1, 0}), ConfigError);
  EXPECT_NO_THROW(p.set_cursor({2, 0}));
  EXPECT_FALSE(p.next_rows(1, &b));
}

// ---- Invariants on random datasets --------------------------------------------------------

struct RandomCase {
  TokenDataset ds;
  int64_t seq_len;
  int64_t rows;
};

RandomCase random_case(uint64_t seed) {
  std::mt19937_64 rng(seed);
  RandomCase c;
  c.seq_len = 1 + int64_t(uniform_below(rng, 16));
  c.rows = 1 + int64_t(uniform_below(rng, 5));
  const int64_t D = int64_t(uniform_below(rng, 40));
  const bool masked = uniform_below(rng, 2) == 1;
  std::vector<I32> docs;
  std::vector<std::vector<uint8_t>> masks;
  for (int64_t d = 0; d < D; ++d) {
    // Mostly short documents, some empty, some several seq_len long.
    const uint64_t kind = uniform_below(rng, 10);
    int64_t n = kind == 0 ? 0 : kind < 7 ? 1 + int64_t(uniform_below(rng, uint64_t(c.seq_len)))
                                          : int64_t(uniform_below(rng, uint64_t(4 * c.seq_len + 1)));
    I32 doc;
    std::vector<uint8_t> m;
    for (int64_t i = 0; i < n; ++i) {
      doc.push_back(1 + int32_t(uniform_below(rng, 99)));  // never 0: 0 marks padding below
      m.push_back(uint8_t(uniform_below(rng, 2)));
    }
    docs.push_back(doc);
    masks.push_back(m);
  }
  c.ds = make_ds(docs, masked ? masks : std::vector<std::vector<uint8_t>>{});
  return c;
}

void check_invariants(const TokenDataset& ds, const std::vector<int64_t>& order, int64_t L, int64_t rows,
                      const std::vector<PackedBatch>& batches) {
  // The expected stream of real tokens: every document in order, as global indices.
  std::vector<int64_t> stream, stream_doc;
  for (int64_t d : order)
    for (int64_t i = ds.doc_offsets[size_t(d)]; i < ds.doc_offsets[size_t(d) + 1]; ++i) {
      stream.push_back(i);
      stream_doc.push_back(d);
    }
  size_t pos = 0;  // next expected entry of `stream`
  int64_t total_rows = 0;
  for (size_t bi = 0; bi < batches.size(); ++bi) {
    const PackedBatch& b = batches[bi];
    ASSERT_GE(b.rows, 1);
    if (bi + 1 < batches.size()) {
      ASSERT_EQ(b.rows, rows);
    }
    ASSERT_LE(b.rows, rows);
    total_rows += b.rows;
    const int64_t T = b.rows * L;
    ASSERT_EQ(b.seq_len, L);
    ASSERT_EQ(b.num_tokens(), T);
    ASSERT_EQ(int64_t(b.targets.size()), T);
    ASSERT_EQ(int64_t(b.positions.size()), T);
    ASSERT_GE(b.cu_seqlens.size(), 2u);
    ASSERT_EQ(b.cu_seqlens.front(), 0);
    ASSERT_EQ(b.cu_seqlens.back(), T);
    for (size_t s = 1; s < b.cu_seqlens.size(); ++s) ASSERT_LT(b.cu_seqlens[s - 1], b.cu_seqlens[s]);
    // Every row boundary is a segment boundary.
    const std::set<int32_t> starts(b.cu_seqlens.begin(), b.cu_seqlens.end());
    for (int64_t r = 0; r <= b.rows; ++r) ASSERT_TRUE(starts.count(int32_t(r * L))) << "row " << r;
    for (int64_t s = 0; s < b.num_segments(); ++s) {
      const int32_t a = b.cu_seqlens[size_t(s)], e = b.cu_seqlens[size_t(s) + 1];
      ASSERT_LE(e - a, L);
      const bool pad = b.tokens[size_t(a)] == 0;
      int64_t seg_doc = -1;
      for (int32_t t = a; t < e; ++t) {
        ASSERT_EQ(b.positions[size_t(t)], t - a);  // positions restart per segment
        if (pad) {
          ASSERT_EQ(b.tokens[size_t(t)], 0);
          ASSERT_EQ(b.targets[size_t(t)], -1);
          continue;
        }
        ASSERT_LT(pos, stream.size());
        const int64_t i = stream[pos];
        const int64_t d = stream_doc[pos];
        ++pos;
        if (seg_doc < 0) seg_doc = d;
        ASSERT_EQ(d, seg_doc) << "a segment crosses a document";
        ASSERT_EQ(b.tokens[size_t(t)], ds.tokens[size_t(i)]);
        const bool counted = i + 1 < ds.doc_offsets[size_t(d) + 1] &&
                             (ds.loss_mask.empty() || ds.loss_mask[size_t(i) + 1] == 1);
        ASSERT_EQ(b.targets[size_t(t)], counted ? ds.tokens[size_t(i) + 1] : -1);
      }
      if (pad) {
        ASSERT_EQ(e % L, 0) << "padding only at the end of a row";
      } else if (ds.doc_length(seg_doc) <= L) {
        ASSERT_EQ(e - a, ds.doc_length(seg_doc)) << "a short document is never split";
      }
    }
  }
  EXPECT_EQ(pos, stream.size()) << "every real token exactly once";
  SequencePacker p(ds, order, L);
  EXPECT_EQ(p.count_rows(), total_rows);
}

TEST(PackerInvariants, RandomDatasets) {
  for (uint64_t seed = 1; seed <= 300; ++seed) {
    SCOPED_TRACE(seed);
    const RandomCase c = random_case(seed);
    for (bool shuffle : {false, true}) {
      const auto order = document_order(c.ds.num_documents(), seed * 7 + 3, shuffle);
      const auto batches = pack_all(c.ds, order, c.seq_len, c.rows);
      check_invariants(c.ds, order, c.seq_len, c.rows, batches);
      if (HasFatalFailure()) return;
    }
  }
}

TEST(PackerInvariants, FileOrderRowsOfExactDocuments) {
  // Documents of exactly seq_len tokens in file order: one row each, no padding.
  std::vector<I32> docs;
  for (int d = 0; d < 7; ++d) docs.push_back(I32(5, int32_t(d + 1)));
  const TokenDataset ds = make_ds(docs);
  const auto batches = pack_all(ds, file_order(ds), 5, 7);
  ASSERT_EQ(batches.size(), 1u);
  EXPECT_EQ(batches[0].rows, 7);
  EXPECT_EQ(batches[0].num_segments(), 7);
  EXPECT_EQ(std::count(batches[0].tokens.begin(), batches[0].tokens.end(), 0), 0);
}

// ---- Cursor --------------------------------------------------------------------------------

bool same_batch(const PackedBatch& a, const PackedBatch& b) {
  return a.rows == b.rows && a.seq_len == b.seq_len && a.tokens == b.tokens && a.targets == b.targets &&
         a.positions == b.positions && a.cu_seqlens == b.cu_seqlens;
}

TEST(PackerCursor, ExactResume) {
  for (uint64_t seed = 1; seed <= 60; ++seed) {
    SCOPED_TRACE(seed);
    const RandomCase c = random_case(seed);
    const auto order = document_order(c.ds.num_documents(), seed, true);
    const auto all = pack_all(c.ds, order, c.seq_len, c.rows);
    for (size_t k = 0; k <= all.size(); ++k) {
      SequencePacker a(c.ds, order, c.seq_len);
      PackedBatch b;
      for (size_t i = 0; i < k; ++i) ASSERT_TRUE(a.next_rows(c.rows, &b));
      const PackerCursor saved = a.cursor();
      SequencePacker resumed(c.ds, order, c.seq_len);
      resumed.set_cursor(saved);
      EXPECT_EQ(resumed.cursor(), saved);
      PackedBatch x, y;
      for (size_t i = k; i < all.size(); ++i) {
        ASSERT_TRUE(a.next_rows(c.rows, &x));
        ASSERT_TRUE(resumed.next_rows(c.rows, &y));
        ASSERT_TRUE(same_batch(x, y)) << "batch " << i << " after resuming at " << k;
        ASSERT_TRUE(same_batch(x, all[i]));
      }
      EXPECT_FALSE(a.next_rows(c.rows, &x));
      EXPECT_FALSE(resumed.next_rows(c.rows, &y));
    }
  }
}

TEST(PackerCursor, MidDocumentCursor) {
  // Stop inside a long document: the cursor carries the offset.
  const TokenDataset ds = make_ds({{1, 2, 3, 4, 5, 6, 7}, {8, 9}});
  SequencePacker p(ds, file_order(ds), 3);
  PackedBatch b;
  ASSERT_TRUE(p.next_rows(1, &b));
  EXPECT_EQ(p.cursor(), (PackerCursor{0, 3}));
  ASSERT_TRUE(p.next_rows(1, &b));
  EXPECT_EQ(p.cursor(), (PackerCursor{0, 6}));
  SequencePacker q(ds, file_order(ds), 3);
  q.set_cursor({0, 6});
  ASSERT_TRUE(q.next_rows(5, &b));
  expect_batch(b, 1, 3, {7, 8, 9}, {-1, 9, -1}, {0, 0, 1}, {0, 1, 3});
  EXPECT_EQ(q.cursor(), (PackerCursor{2, 0}));
  ASSERT_TRUE(p.next_rows(5, &b));
  expect_batch(b, 1, 3, {7, 8, 9}, {-1, 9, -1}, {0, 0, 1}, {0, 1, 3});
}

// ---- document_order ---------------------------------------------------------------------------

bool is_permutation_of_iota(const std::vector<int64_t>& v) {
  std::vector<int64_t> s = v;
  std::sort(s.begin(), s.end());
  for (size_t i = 0; i < s.size(); ++i)
    if (s[i] != int64_t(i)) return false;
  return true;
}

TEST(PackerOrder, FileOrderWithoutShuffle) {
  std::vector<int64_t> iota(37);
  std::iota(iota.begin(), iota.end(), 0);
  EXPECT_EQ(document_order(37, 123, false), iota);
  EXPECT_TRUE(document_order(0, 1, true).empty());
  EXPECT_EQ(document_order(1, 1, true), std::vector<int64_t>{0});
}

TEST(PackerOrder, ShuffleIsADeterministicPermutation) {
  for (int64_t n : {2, 3, 10, 1000}) {
    const auto a = document_order(n, 42, true);
    EXPECT_TRUE(is_permutation_of_iota(a));
    EXPECT_EQ(a, document_order(n, 42, true));
  }
  const auto a = document_order(1000, 1, true), b = document_order(1000, 2, true);
  EXPECT_NE(a, b);
  std::vector<int64_t> iota(1000);
  std::iota(iota.begin(), iota.end(), 0);
  EXPECT_NE(a, iota);
}

TEST(PackerOrder, PinnedValues) {
  // Pins the portable algorithm (mt19937_64 + rejection-sampled Fisher–Yates): any platform or
  // standard library must give this order.
  // (Cross-checked against an independent Python implementation of mt19937_64.)
  EXPECT_EQ(document_order(10, 0, true), (std::vector<int64_t>{7, 2, 0, 8, 3, 9, 6, 1, 5, 4}));
  EXPECT_EQ(document_order(10, 12345, true), (std::vector<int64_t>{3, 1, 7, 4, 9, 2, 0, 8, 5, 6}));
}

TEST(PackerOrder, RoughlyUniform) {
  // Position of element 0 over many seeds: each of 4 slots about 1/4 of the time.
  std::vector<int> hits(4, 0);
  for (uint64_t s = 0; s < 4000; ++s) {
    const auto o = document_order(4, s, true);
    hits[size_t(std::find(o.begin(), o.end(), 0) - o.begin())]++;
  }
  for (int h : hits) EXPECT_NEAR(h, 1000, 150);
}

// ---- Built-in task --------------------------------------------------------------------------------

TEST(BuiltinTask, ModelConfig) {
  const LlamaConfig c = builtin_model_config();
  EXPECT_EQ(c.vocab_size, kBuiltinVocab);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 128);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.q_dim(), c.hidden_size);
  EXPECT_EQ(c.num_attention_heads % c.num_key_value_heads, 0);
  EXPECT_EQ(c.rope.type, RopeScaling::Type::Default);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
  EXPECT_GE(c.max_position_embeddings, kBuiltinMaxDocLength);
  EXPECT_EQ(kBuiltinVocab, 4 + kBuiltinFillers + kBuiltinSlots * kBuiltinDigits + kBuiltinSlots + kBuiltinDigits);
  EXPECT_EQ(kBuiltinMaxDocLength, kBuiltinMaxHaystack + 3 * kBuiltinSlots + 3);
}

TEST(BuiltinTask, TrainDefaults) {
  const BuiltinTrainDefaults d = builtin_train_defaults();
  EXPECT_GE(d.seq_len, kBuiltinMaxDocLength);  // every document fits one row
  EXPECT_GE(d.micro_batch, 1);
  EXPECT_GE(d.grad_accum, 1);
  EXPECT_GT(d.steps, d.warmup_steps);
  EXPECT_GT(d.lr, 0.0);
  EXPECT_GE(d.weight_decay, 0.0);
  EXPECT_GT(d.train_docs, 0);
  EXPECT_GT(d.eval_docs, 0);
}

TEST(BuiltinTask, InitWeights) {
  const LlamaConfig c = builtin_model_config();
  const ParamTable t(c);
  std::vector<float> w(size_t(t.total_elements()), 7.0f), w2(w.size(), -3.0f), w3(w.size());
  builtin_init_weights(c, t, 5, w.data());
  builtin_init_weights(c, t, 5, w2.data());
  builtin_init_weights(c, t, 6, w3.data());
  EXPECT_EQ(w, w2);
  EXPECT_NE(w, w3);
  std::vector<bool> covered(w.size(), false);
  double sum = 0, sq = 0;
  int64_t n = 0;
  for (const ParamEntry& e : t.entries()) {
    for (int64_t i = 0; i < e.numel; ++i) {
      const float v = w[size_t(e.offset + i)];
      covered[size_t(e.offset + i)] = true;
      if (e.shape.size() == 1) {
        ASSERT_EQ(v, 1.0f) << e.name;
      } else {
        sum += v;
        sq += double(v) * v;
        ++n;
      }
    }
  }
  for (size_t i = 0; i < w.size(); ++i)
    if (!covered[i]) {
      ASSERT_EQ(w[i], 0.0f) << "padding at " << i;
    }
  const double mean = sum / double(n), sd = std::sqrt(sq / double(n) - mean * mean);
  EXPECT_NEAR(mean, 0.0, 0.025 * kBuiltinInitStd);
  EXPECT_NEAR(sd, kBuiltinInitStd, 0.025 * kBuiltinInitStd);
}

TEST(BuiltinTask, DatasetValidAndDeterministic) {
  const TokenDataset ds = builtin_dataset(200, 11);
  EXPECT_EQ(ds.num_documents(), 200);
  EXPECT_EQ(ds.vocab_size, kBuiltinVocab);
  EXPECT_EQ(ds.bos_id, 1);
  EXPECT_EQ(ds.eos_id, 2);
  // io validation rules: offsets start at 0, non-decreasing, end at N; tokens in range; mask 0/1.
  ASSERT_EQ(ds.doc_offsets.front(), 0);
  ASSERT_EQ(ds.doc_offsets.back(), ds.num_tokens());
  for (size_t i = 1; i < ds.doc_offsets.size(); ++i) ASSERT_LE(ds.doc_offsets[i - 1], ds.doc_offsets[i]);
  for (int32_t t : ds.tokens) ASSERT_TRUE(t > 0 && t < ds.vocab_size);  // 0 (padding) never occurs
  ASSERT_EQ(ds.loss_mask.size(), ds.tokens.size());
  for (uint8_t m : ds.loss_mask) ASSERT_TRUE(m == 0 || m == 1);

  const TokenDataset again = builtin_dataset(200, 11);
  EXPECT_EQ(ds.tokens, again.tokens);
  EXPECT_EQ(ds.doc_offsets, again.doc_offsets);
  EXPECT_EQ(ds.loss_mask, again.loss_mask);
  EXPECT_NE(ds.tokens, builtin_dataset(200, 12).tokens);
  // A prefix of the documents does not depend on how many are asked for.
  const TokenDataset few = builtin_dataset(20, 11);
  EXPECT_TRUE(std::equal(few.tokens.begin(), few.tokens.end(), ds.tokens.begin()));
  EXPECT_EQ(builtin_dataset(0, 1).num_documents(), 0);
  EXPECT_THROW(builtin_dataset(-1, 1), ConfigError);
}

TEST(BuiltinTask, PinnedFirstDocument) {
  // Portable generation, cross-checked against an independent Python mt19937_64 with the same
  // rejection-sampled draws: H = 340; digits of keys 0..7: 4 5 6 4 13 15 9 0; queries ask keys
  // 6 1 2 4 3 7 5 0 in that order.
  const TokenDataset ds = builtin_dataset(1, 0);
  ASSERT_EQ(ds.doc_offsets, (std::vector<int64_t>{0, 367}));
  EXPECT_EQ(I32(ds.tokens.begin(), ds.tokens.begin() + 12), (I32{1, 15, 13, 18, 16, 18, 19, 12, 10, 13, 7, 12}));
  EXPECT_EQ(I32(ds.tokens.end() - 18, ds.tokens.end()),
            (I32{3, 154, 165, 149, 161, 150, 162, 152, 169, 151, 160, 155, 156, 153, 171, 148, 160, 2}));
  const std::vector<size_t> at = {117, 120, 175, 178, 234, 241, 292, 335};
  const I32 needles = {97, 58, 72, 115, 24, 125, 132, 41};
  for (size_t i = 0; i < at.size(); ++i) EXPECT_EQ(ds.tokens[at[i]], needles[i]) << i;
  int64_t sum = 0, sumsq = 0;
  for (int32_t t : ds.tokens) {
    sum += t;
    sumsq += int64_t(t) * t;
  }
  EXPECT_EQ(sum, 7077);
  EXPECT_EQ(sumsq, 514701);
}

TEST(BuiltinTask, DocumentStructure) {
  const TokenDataset ds = builtin_dataset(300, 3);
  std::set<int64_t> haystacks;
  std::vector<int64_t> digit_hits(size_t(kBuiltinDigits), 0);
  int64_t far = 0, very_far = 0, answers = 0;
  auto is_filler = [](int32_t t) { return t >= kBuiltinFirstFiller && t < kBuiltinFirstNeedle; };
  auto is_needle = [](int32_t t) { return t >= kBuiltinFirstNeedle && t < kBuiltinFirstQuery; };
  for (int64_t d = 0; d < ds.num_documents(); ++d) {
    const int64_t a = ds.doc_offsets[size_t(d)], n = ds.doc_length(d);
    const int64_t S = kBuiltinSlots, H = n - 3 * S - 3;
    ASSERT_GE(H, kBuiltinMinHaystack);
    ASSERT_LE(H, kBuiltinMaxHaystack);
    ASSERT_LE(n, kBuiltinMaxDocLength);
    haystacks.insert(H);
    auto tok = [&](int64_t i) { return ds.tokens[size_t(a + i)]; };
    auto msk = [&](int64_t i) { return ds.loss_mask[size_t(a + i)]; };
    ASSERT_EQ(tok(0), kBuiltinBos);
    ASSERT_EQ(tok(n - 1), kBuiltinEos);
    const int64_t sep = 1 + H + S;
    ASSERT_EQ(tok(sep), kBuiltinSep);
    // The haystack: H filler tokens and exactly one needle per key.
    std::vector<int64_t> needle_at(size_t(S), -1);
    std::vector<int32_t> digit(size_t(S), -1);
    for (int64_t i = 1; i < sep; ++i) {
      const int32_t t = tok(i);
      ASSERT_TRUE(is_filler(t) || is_needle(t)) << t;
      if (is_needle(t)) {
        const int64_t key = (t - kBuiltinFirstNeedle) / kBuiltinDigits;
        ASSERT_EQ(needle_at[size_t(key)], -1) << "two needles of key " << key;
        needle_at[size_t(key)] = i;
        digit[size_t(key)] = (t - kBuiltinFirstNeedle) % kBuiltinDigits;
      }
    }
    for (int64_t k = 0; k < S; ++k) ASSERT_GE(needle_at[size_t(k)], 1);
    // The queries: every key once, each followed by the answer its needle holds.
    std::set<int32_t> asked;
    for (int64_t j = 0; j < S; ++j) {
      const int64_t q = sep + 1 + 2 * j;
      const int32_t key = tok(q) - kBuiltinFirstQuery;
      ASSERT_TRUE(key >= 0 && key < S);
      ASSERT_EQ(tok(q + 1), kBuiltinFirstAnswer + digit[size_t(key)]);
      asked.insert(key);
      digit_hits[size_t(digit[size_t(key)])]++;
      far += q + 1 - needle_at[size_t(key)] >= 100;
      very_far += q + 1 - needle_at[size_t(key)] >= 400;
      ++answers;
    }
    ASSERT_EQ(int64_t(asked.size()), S);
    // The mask is 1 exactly on the answers.
    for (int64_t i = 0; i < n; ++i) {
      const bool answer = i > sep && i < n - 1 && (i - sep) % 2 == 0;
      ASSERT_EQ(msk(i), answer ? 1 : 0) << "document " << d << " token " << i;
    }
  }
  EXPECT_GT(haystacks.size(), 200u);             // H varies
  for (int64_t h : digit_hits) EXPECT_GT(h, 50);  // 2400 answers over 16 digits
  EXPECT_GT(double(far) / double(answers), 0.45);  // about half the needles lie >= 100 tokens back
  EXPECT_GT(very_far, 50);                            // and some >= 400
}

TEST(BuiltinTask, PacksWithCountedTargetsOnAnswers) {
  const TokenDataset ds = builtin_dataset(40, 9);
  const auto order = document_order(ds.num_documents(), 1, true);
  const int64_t L = builtin_train_defaults().seq_len;
  const auto batches = pack_all(ds, order, L, 2);
  int64_t counted = 0;
  for (const auto& b : batches) counted += b.num_targets();
  EXPECT_EQ(counted, 40 * kBuiltinSlots);
  check_invariants(ds, order, L, 2, batches);
}

}  // namespace
}  // namespace longtune
