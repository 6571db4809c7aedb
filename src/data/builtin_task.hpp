// The built-in demo task: what `longtune eval` / `longtune train` use when no model and no data
// are given. It is tiny on purpose (trains in a minute or two on a 2-core CPU).
//
// Model: a 2-layer Llama, vocab 64, hidden 64, SwiGLU width 176, 4 query heads and 2 KV heads
// (GQA) of head_dim 16, default RoPE (theta 10000), untied lm_head, about 0.1 M parameters.
//
// Task: a copy / induction ("long-context recall") task. Every document is
//
//     BOS  s_1 s_2 ... s_k  SEP  s_1 s_2 ... s_k  EOS
//
// with BOS = 1, EOS = 2, SEP = 3, k uniform in [kBuiltinMinLen, kBuiltinMaxLen] and the s_j
// uniform over the content ids [4, 64). The first copy of the string is random, so it cannot be
// predicted; after SEP every token can be, by looking back k+1 positions (the pattern an
// induction head learns: find the previous occurrence of the current token and copy its
// successor). The loss mask is therefore 1 exactly on the copied s_1..s_k and on the EOS that
// follows them (the tokens predicted from SEP onwards), 0 on BOS, the first string and SEP.
// Chance level on the counted tokens is ln(60) ≈ 4.09 nats; a model that solved the task reaches ~0.
#pragma once
#include <cstdint>

#include "io/token_dataset.hpp"
#include "src/model/llama_config.hpp"
#include "src/model/param_table.hpp"

namespace longtune {

inline constexpr int32_t kBuiltinBos = 1;
inline constexpr int32_t kBuiltinEos = 2;
inline constexpr int32_t kBuiltinSep = 3;
inline constexpr int32_t kBuiltinFirstContent = 4;  // content ids are [4, vocab)
inline constexpr int64_t kBuiltinVocab = 64;
inline constexpr int64_t kBuiltinMinLen = 8;   // k, the string length: document length 2k+3
inline constexpr int64_t kBuiltinMaxLen = 48;

// The tiny built-in Llama described above.
LlamaConfig builtin_model_config();

// Deterministic initialization of the flat fp32 parameter buffer `flat` (table.total_elements()
// floats): RMSNorm weights 1, every matrix normal(0, 0.02) (HF's initializer_range), drawn in
// table order from one std::mt19937_64(seed) through the written-out Box–Muller of
// portable_random.hpp; the alignment gaps are zero.
void builtin_init_weights(const LlamaConfig& cfg, const ParamTable& table, uint64_t seed, float* flat);

// `num_docs` documents of the copy task above, deterministic in `seed` (std::mt19937_64 with
// portable index draws). vocab_size 64, bos_id 1, eos_id 2, loss_mask as described.
TokenDataset builtin_dataset(int64_t num_docs, uint64_t seed);

}  // namespace longtune
