#pragma once
#include <cstdint>

namespace longtune::cpu {

// losses (T) = logsumexp(logits[t]) - logits[t, targets[t]], and 0 where targets[t] < 0 (a token
// that is not a prediction target: loss mask 0, end of document, padding). logits (T, V).
// Returns the sum of losses (double).
double cross_entropy_forward(float* losses, const float* logits, const int32_t* targets, int64_t T, int64_t V);
// dlogits (T, V) = scale * (softmax(logits[t]) - onehot(targets[t])), zero rows where targets[t] < 0
// (assigned). scale is d(total loss)/d(losses[t]), e.g. 1 / (counted targets of the global batch).
// dlogits may alias logits.
void cross_entropy_backward(float* dlogits, const float* logits, const int32_t* targets, float scale, int64_t T,
                            int64_t V);

}  // namespace longtune::cpu
