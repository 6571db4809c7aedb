// The built-in demo task: what `longtune eval` / `longtune train` use when no model and no data
// are given. It is tiny on purpose: `longtune train` with no model and no data trains the model
// below from scratch on a 2-core CPU in one to two minutes, and the loss falls and the retrieval
// accuracy on held-out documents rises.
//
// Model: a 2-layer Llama, hidden 64, SwiGLU width 128, 4 query heads and 2 KV heads (GQA) of
// head_dim 16, default RoPE (theta 10000), untied lm_head, vocab kBuiltinVocab = 172 (about 0.11 M
// parameters).
//
// Task: multi-needle key–value retrieval ("passkey" retrieval with several keys) over documents
// of up to kBuiltinMaxDocLength = 512 tokens. Token ids:
//   0 padding (never in a document), 1 BOS, 2 EOS, 3 SEP,
//   filler  [kBuiltinFirstFiller, +kBuiltinFillers)          the haystack,
//   needle  [kBuiltinFirstNeedle, +kBuiltinSlots * kBuiltinDigits)  needle (s, d) = first + s * digits + d:
//           "key s has value d", one token,
//   query   [kBuiltinFirstQuery, +kBuiltinSlots)             "what is the value of key s?",
//   answer  [kBuiltinFirstAnswer, +kBuiltinDigits)           the value d.
// Every document is
//
//     BOS  h_1 ... (haystack of H filler tokens with the S = kBuiltinSlots needles inserted) ...  SEP
//          Q_{s_1} A_{d(s_1)}  Q_{s_2} A_{d(s_2)}  ...  Q_{s_S} A_{d(s_S)}  EOS
//
// with H uniform in [kBuiltinMinHaystack, kBuiltinMaxHaystack], one needle per key s (its digit
// d(s) uniform over the kBuiltinDigits values, independently), each inserted at a uniformly random
// place of the haystack, and the queries asking every key once in a random order. The answer A_d
// after Q_s is determined only by the needle of key s, which lies anywhere in the haystack: on
// average about H/2 + 2S tokens back, up to the whole document (over 500 tokens). The model must
// attend from the query to the one needle of that key, however far back, and turn the needle's
// digit into the answer token. The digits are independent and uniform, so nothing but retrieval
// beats chance: greedy accuracy 1/kBuiltinDigits = 6.25%, loss ln(16) = 2.77; a model that
// solved the task reaches accuracy 1 and loss 0. The loss mask is 1 exactly on the S answers
// (everything else is random: filler, needles, the order of the queries).
//
// (Two-token key–value pairs, "k v" ... "k ?" as in MQAR, need an induction circuit: a
// previous-token head composed with a content-matching head. With the reference CPU kernels
// (about 4000 tokens per core-second at these lengths) that circuit did not form within the two
// minutes this demo may take; its above-chance accuracy came from in-context value statistics, not
// retrieval. A needle that carries key and value in one token is retrieved by a single attention
// hop, which the tiny model learns within the budget while attending hundreds of tokens back.)
#pragma once
#include <cstdint>

#include "io/token_dataset.hpp"
#include "src/model/llama_config.hpp"
#include "src/model/param_table.hpp"

namespace longtune {

class LlamaCpu;

inline constexpr int32_t kBuiltinBos = 1;
inline constexpr int32_t kBuiltinEos = 2;
inline constexpr int32_t kBuiltinSep = 3;
inline constexpr int64_t kBuiltinFillers = 16;
inline constexpr int64_t kBuiltinSlots = 8;    // keys, = needles = queries per document
inline constexpr int64_t kBuiltinDigits = 16;  // values
inline constexpr int32_t kBuiltinFirstFiller = 4;
inline constexpr int32_t kBuiltinFirstNeedle = kBuiltinFirstFiller + int32_t(kBuiltinFillers);
inline constexpr int32_t kBuiltinFirstQuery = kBuiltinFirstNeedle + int32_t(kBuiltinSlots * kBuiltinDigits);
inline constexpr int32_t kBuiltinFirstAnswer = kBuiltinFirstQuery + int32_t(kBuiltinSlots);
inline constexpr int64_t kBuiltinVocab = kBuiltinFirstAnswer + kBuiltinDigits;
inline constexpr int64_t kBuiltinMaxDocLength = 512;
// Document length = H + 3 * kBuiltinSlots + 3.
inline constexpr int64_t kBuiltinMinHaystack = 1;
inline constexpr int64_t kBuiltinMaxHaystack = kBuiltinMaxDocLength - 3 * kBuiltinSlots - 3;

// The tiny built-in Llama described above.
LlamaConfig builtin_model_config();
// Its GPU variant: the CUDA attention runs head_dim 64 and 128 only, so `train --device cuda`
// uses hidden 128 as 2 query heads / 1 KV head of 64 (intermediate 256), same vocabulary and task.
// Not tuned like the CPU model: after the default 600 steps it reaches 26% held-out retrieval
// accuracy on an H200 (the 4 x 64-head variant at hidden 256 reached 7%), against 75% for the CPU
// model.
LlamaConfig builtin_model_config_gpu();

// Deterministic initialization of the flat fp32 parameter buffer `flat` (table.total_elements()
// floats): RMSNorm weights 1, every matrix normal(0, kBuiltinInitStd), drawn in table order from
// one std::mt19937_64(seed) through the written-out Box–Muller of portable_random.hpp; the
// alignment gaps are zero. (HF's initializer_range 0.02 is made for hidden sizes in the
// thousands; at hidden 64 it leaves the attention nearly uniform for hundreds of steps.)
inline constexpr double kBuiltinInitStd = 0.1;
void builtin_init_weights(const LlamaConfig& cfg, const ParamTable& table, uint64_t seed, float* flat);

// `num_docs` documents of the task above, deterministic in `seed` (std::mt19937_64 with the
// portable index draws of portable_random.hpp): per document H, the H filler ids, then for
// s = 0..S-1 the digit d(s) and the insertion place (uniform in [0, current length], the needle
// goes before the token there), then the query order (Fisher–Yates: i from S-1 down to 1, swap
// with j uniform in [0, i]). vocab_size kBuiltinVocab, bos_id 1, eos_id 2, loss_mask 1 exactly on
// the answers.
// Train and held-out sets come from different seeds. Throws ConfigError when num_docs < 0.
TokenDataset builtin_dataset(int64_t num_docs, uint64_t seed);

// The training recipe of the demo (what `longtune train` uses when no model and no data are
// given), tuned to learn the task in about a minute on 2 CPU cores.
struct BuiltinTrainDefaults {
  int64_t seq_len, micro_batch, grad_accum, steps, warmup_steps;
  double lr, weight_decay, clip;
  int64_t train_docs, eval_docs;
};
BuiltinTrainDefaults builtin_train_defaults();

// Greedy retrieval accuracy: the fraction of counted targets (the answers) where the argmax
// of the logits over the whole vocabulary (lowest id on ties) equals the target.
struct RetrievalAccuracy {
  int64_t correct = 0, total = 0;
  double accuracy() const { return total > 0 ? double(correct) / double(total) : 0.0; }
};
// Packs `heldout` with SequencePacker in file order into rows of seq_len tokens (one row per
// forward) and scores every counted target. Works for any dataset with a loss mask.
RetrievalAccuracy builtin_retrieval_accuracy(LlamaCpu& model, const float* params, const TokenDataset& heldout,
                                             int64_t seq_len);

}  // namespace longtune
