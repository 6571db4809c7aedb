// A packed micro-batch: `rows` sequences of `seq_len` tokens, flattened to one token stream of
// T = rows * seq_len tokens that is cut into segments (documents, or chunks of long ones).
// Attention never crosses a segment; every row boundary is a segment boundary; positions restart
// at 0 in each segment. This is the cu_seqlens metadata the CUDA attention consumes too.
#pragma once
#include <cstdint>
#include <vector>

namespace longtune {

struct PackedBatch {
  int64_t rows = 0;
  int64_t seq_len = 0;
  std::vector<int32_t> tokens;      // (T) input token ids (padding: 0)
  std::vector<int32_t> targets;     // (T) next token to predict, or -1 when not counted
  std::vector<int32_t> positions;   // (T) position within the segment, from 0
  std::vector<int32_t> cu_seqlens;  // (S+1) segment starts, cu_seqlens[0] = 0, back() = T

  int64_t num_tokens() const { return int64_t(tokens.size()); }
  int64_t num_segments() const { return int64_t(cu_seqlens.size()) - 1; }
  int64_t num_targets() const {
    int64_t n = 0;
    for (int32_t t : targets) n += t >= 0;
    return n;
  }
};

}  // namespace longtune
