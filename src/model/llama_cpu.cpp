#include "src/model/llama_cpu.hpp"

#include <algorithm>
#include <string>

#include "kernels/cpu/attention.hpp"
#include "kernels/cpu/cross_entropy.hpp"
#include "kernels/cpu/embedding.hpp"
#include "kernels/cpu/matmul.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "kernels/cpu/rope.hpp"
#include "kernels/cpu/swiglu.hpp"
#include "src/common/error.hpp"

namespace longtune {

namespace {
// The lm_head + cross-entropy runs over this many tokens at a time, so the (T, V) logits
// never exist at once (V = 128K at T = 64K would be 32 GiB in fp32).
constexpr int64_t kLossChunk = 256;

void add_into(float* dst, const float* src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] += src[i];
}
}  // namespace

struct LlamaCpu::LayerActs {
  std::vector<float> x_in;           // (T, C) residual stream entering the layer
  std::vector<float> ln1, rstd1;     // (T, C), (T)
  std::vector<float> q, k, v;        // (T, NH*HD), (T, NKV*HD) x2, after RoPE
  std::vector<float> att, lse;       // (T, NH*HD), (T, NH)
  std::vector<float> x_mid;          // (T, C) after the attention residual
  std::vector<float> ln2, rstd2;     // (T, C), (T)
  std::vector<float> gate, up, hid;  // (T, F) x3, hid = silu(gate) * up
};

LlamaCpu::LlamaCpu(const LlamaConfig& cfg, const ParamTable& table)
    : cfg_(cfg), table_(table), inv_freq_(rope_inv_freq(cfg)) {}

LlamaCpu::~LlamaCpu() = default;

void LlamaCpu::check_batch(const PackedBatch& b) const {
  const int64_t T = b.num_tokens();
  LT_CHECK(T > 0 && T == b.rows * b.seq_len, "batch size must be rows * seq_len");
  LT_CHECK(int64_t(b.targets.size()) == T && int64_t(b.positions.size()) == T, "batch arrays must have T entries");
  LT_CHECK(b.cu_seqlens.size() >= 2 && b.cu_seqlens.front() == 0 && b.cu_seqlens.back() == T,
           "cu_seqlens must span the batch");
  for (int64_t t = 0; t < T; ++t) {
    LT_CHECK(b.tokens[size_t(t)] >= 0 && b.tokens[size_t(t)] < cfg_.vocab_size,
             "token id out of range at " + std::to_string(t));
    LT_CHECK(b.targets[size_t(t)] < cfg_.vocab_size, "target id out of range at " + std::to_string(t));
  }
}

LossSum LlamaCpu::run_forward(ParamAccess& acc, const PackedBatch& b, float* logits, bool keep) {
  check_batch(b);
  const int64_t T = b.num_tokens(), C = cfg_.hidden_size, F = cfg_.intermediate_size;
  const int64_t NH = cfg_.num_attention_heads, NKV = cfg_.num_key_value_heads, HD = cfg_.head_dim;
  const int64_t QD = cfg_.q_dim(), KVD = cfg_.kv_dim(), V = cfg_.vocab_size;
  const int64_t L = cfg_.num_hidden_layers, S = b.num_segments();
  const float eps = float(cfg_.rms_norm_eps);
  auto P = [&](size_t i) { return acc.weight(i); };

  std::vector<float> x(size_t(T * C));
  acc.acquire(ParamTable::kEmbedBlock);
  cpu::embedding_forward(x.data(), b.tokens.data(), P(table_.embed()), T, C);
  acc.release(ParamTable::kEmbedBlock);

  acts_.clear();
  acts_.resize(keep ? size_t(L) : 1);
  std::vector<float> tmp(size_t(T * C));
  for (int64_t l = 0; l < L; ++l) {
    LayerActs& a = acts_[keep ? size_t(l) : 0];
    const LayerParamIndex& w = table_.layer(l);
    acc.acquire(table_.layer_block(l));
    a.x_in = x;
    a.ln1.resize(size_t(T * C)); a.rstd1.resize(size_t(T));
    a.q.resize(size_t(T * QD)); a.k.resize(size_t(T * KVD)); a.v.resize(size_t(T * KVD));
    a.att.resize(size_t(T * QD)); a.lse.resize(size_t(T * NH));
    a.ln2.resize(size_t(T * C)); a.rstd2.resize(size_t(T));
    a.gate.resize(size_t(T * F)); a.up.resize(size_t(T * F)); a.hid.resize(size_t(T * F));

    // attention block: x_mid = x + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))), n = rmsnorm(x)
    cpu::rmsnorm_forward(a.ln1.data(), a.rstd1.data(), x.data(), P(w.input_norm), T, C, eps);
    cpu::matmul_forward(a.q.data(), a.ln1.data(), P(w.q_proj), T, C, QD);
    cpu::matmul_forward(a.k.data(), a.ln1.data(), P(w.k_proj), T, C, KVD);
    cpu::matmul_forward(a.v.data(), a.ln1.data(), P(w.v_proj), T, C, KVD);
    cpu::rope_forward(a.q.data(), a.q.data(), b.positions.data(), inv_freq_.data(), T, NH, HD);
    cpu::rope_forward(a.k.data(), a.k.data(), b.positions.data(), inv_freq_.data(), T, NKV, HD);
    cpu::attention_forward(a.att.data(), a.lse.data(), a.q.data(), a.k.data(), a.v.data(), b.cu_seqlens.data(),
                           S, T, NH, NKV, HD);
    cpu::matmul_forward(tmp.data(), a.att.data(), P(w.o_proj), T, QD, C);
    add_into(x.data(), tmp.data(), x.size());
    a.x_mid = x;

    // MLP block: x_out = x_mid + down_proj(silu(gate_proj(n)) * up_proj(n)), n = rmsnorm(x_mid)
    cpu::rmsnorm_forward(a.ln2.data(), a.rstd2.data(), x.data(), P(w.post_norm), T, C, eps);
    cpu::matmul_forward(a.gate.data(), a.ln2.data(), P(w.gate_proj), T, C, F);
    cpu::matmul_forward(a.up.data(), a.ln2.data(), P(w.up_proj), T, C, F);
    cpu::swiglu_forward(a.hid.data(), a.gate.data(), a.up.data(), T, F);
    cpu::matmul_forward(tmp.data(), a.hid.data(), P(w.down_proj), T, F, C);
    add_into(x.data(), tmp.data(), x.size());
    acc.release(table_.layer_block(l));
  }

  acc.acquire(table_.head_block());
  if (table_.tied()) acc.acquire(ParamTable::kEmbedBlock);  // the lm_head is the embedding
  final_in_ = x;
  final_norm_.resize(size_t(T * C));
  final_rstd_.resize(size_t(T));
  cpu::rmsnorm_forward(final_norm_.data(), final_rstd_.data(), x.data(), P(table_.final_norm()), T, C, eps);

  LossSum loss;
  std::vector<float> chunk_logits(static_cast<size_t>(kLossChunk * V));
  std::vector<float> chunk_losses(static_cast<size_t>(kLossChunk));
  for (int64_t t0 = 0; t0 < T; t0 += kLossChunk) {
    const int64_t n = std::min(kLossChunk, T - t0);
    float* lg = logits ? logits + t0 * V : chunk_logits.data();
    cpu::matmul_forward(lg, final_norm_.data() + t0 * C, P(table_.lm_head()), n, C, V);
    loss.sum += cpu::cross_entropy_forward(chunk_losses.data(), lg, b.targets.data() + t0, n, V);
  }
  if (table_.tied()) acc.release(ParamTable::kEmbedBlock);
  acc.release(table_.head_block());
  loss.count = b.num_targets();
  return loss;
}

LossSum LlamaCpu::forward(ParamAccess& params, const PackedBatch& batch, float* logits) {
  return run_forward(params, batch, logits, /*keep_for_backward=*/false);
}

LossSum LlamaCpu::forward(const float* params, const PackedBatch& batch, float* logits) {
  FlatParams flat(table_, params);
  return forward(flat, batch, logits);
}

LossSum LlamaCpu::forward_backward(const float* params, float* grads, const PackedBatch& b, double grad_scale) {
  FlatParams flat(table_, params, grads);
  return forward_backward(flat, b, grad_scale);
}

LossSum LlamaCpu::forward_backward(ParamAccess& acc, const PackedBatch& b, double grad_scale) {
  const LossSum loss = run_forward(acc, b, nullptr, /*keep_for_backward=*/true);
  const int64_t T = b.num_tokens(), C = cfg_.hidden_size, F = cfg_.intermediate_size;
  const int64_t NH = cfg_.num_attention_heads, NKV = cfg_.num_key_value_heads, HD = cfg_.head_dim;
  const int64_t QD = cfg_.q_dim(), KVD = cfg_.kv_dim(), V = cfg_.vocab_size;
  const int64_t L = cfg_.num_hidden_layers, S = b.num_segments();
  auto P = [&](size_t i) { return acc.weight(i); };
  auto G = [&](size_t i) { return acc.grad(i); };

  // lm_head + cross-entropy, chunk by chunk (logits recomputed, never stored whole).
  acc.acquire(table_.head_block());
  if (table_.tied()) acc.acquire(ParamTable::kEmbedBlock);
  std::vector<float> dnorm(size_t(T * C));
  std::vector<float> chunk(size_t(kLossChunk * V));
  for (int64_t t0 = 0; t0 < T; t0 += kLossChunk) {
    const int64_t n = std::min(kLossChunk, T - t0);
    cpu::matmul_forward(chunk.data(), final_norm_.data() + t0 * C, P(table_.lm_head()), n, C, V);
    cpu::cross_entropy_backward(chunk.data(), chunk.data(), b.targets.data() + t0, float(grad_scale), n, V);
    cpu::matmul_backward(dnorm.data() + t0 * C, G(table_.lm_head()), chunk.data(), final_norm_.data() + t0 * C,
                         P(table_.lm_head()), n, C, V);
  }
  std::vector<float> dx(size_t(T * C));  // gradient of the residual stream
  cpu::rmsnorm_backward(dx.data(), G(table_.final_norm()), dnorm.data(), final_in_.data(), P(table_.final_norm()),
                        final_rstd_.data(), T, C);
  // A tied embedding's gradient is complete only after the embedding backward, at the very end.
  if (table_.tied()) acc.release(ParamTable::kEmbedBlock);
  acc.grads_done(table_.head_block());
  acc.release(table_.head_block());

  std::vector<float> dtmp(size_t(T * C)), dln(size_t(T * C));
  std::vector<float> dhid(size_t(T * F)), dgate(size_t(T * F)), dup(size_t(T * F));
  std::vector<float> datt(size_t(T * QD)), dq(size_t(T * QD)), dk(size_t(T * KVD)), dv(size_t(T * KVD));
  for (int64_t l = L - 1; l >= 0; --l) {
    const LayerActs& a = acts_[size_t(l)];
    const LayerParamIndex& w = table_.layer(l);
    acc.acquire(table_.layer_block(l));

    // MLP block. dx is the gradient w.r.t. x_out; the residual passes it through unchanged.
    cpu::matmul_backward(dhid.data(), G(w.down_proj), dx.data(), a.hid.data(), P(w.down_proj), T, F, C);
    cpu::swiglu_backward(dgate.data(), dup.data(), dhid.data(), a.gate.data(), a.up.data(), T, F);
    cpu::matmul_backward(dln.data(), G(w.gate_proj), dgate.data(), a.ln2.data(), P(w.gate_proj), T, C, F);
    cpu::matmul_backward(dtmp.data(), G(w.up_proj), dup.data(), a.ln2.data(), P(w.up_proj), T, C, F);
    add_into(dln.data(), dtmp.data(), dln.size());
    cpu::rmsnorm_backward(dtmp.data(), G(w.post_norm), dln.data(), a.x_mid.data(), P(w.post_norm), a.rstd2.data(),
                          T, C);
    add_into(dx.data(), dtmp.data(), dx.size());  // dx is now the gradient w.r.t. x_mid

    // Attention block.
    cpu::matmul_backward(datt.data(), G(w.o_proj), dx.data(), a.att.data(), P(w.o_proj), T, QD, C);
    cpu::attention_backward(dq.data(), dk.data(), dv.data(), datt.data(), a.q.data(), a.k.data(), a.v.data(),
                            a.att.data(), a.lse.data(), b.cu_seqlens.data(), S, T, NH, NKV, HD);
    cpu::rope_backward(dq.data(), dq.data(), b.positions.data(), inv_freq_.data(), T, NH, HD);
    cpu::rope_backward(dk.data(), dk.data(), b.positions.data(), inv_freq_.data(), T, NKV, HD);
    cpu::matmul_backward(dln.data(), G(w.q_proj), dq.data(), a.ln1.data(), P(w.q_proj), T, C, QD);
    cpu::matmul_backward(dtmp.data(), G(w.k_proj), dk.data(), a.ln1.data(), P(w.k_proj), T, C, KVD);
    add_into(dln.data(), dtmp.data(), dln.size());
    cpu::matmul_backward(dtmp.data(), G(w.v_proj), dv.data(), a.ln1.data(), P(w.v_proj), T, C, KVD);
    add_into(dln.data(), dtmp.data(), dln.size());
    cpu::rmsnorm_backward(dtmp.data(), G(w.input_norm), dln.data(), a.x_in.data(), P(w.input_norm), a.rstd1.data(),
                          T, C);
    add_into(dx.data(), dtmp.data(), dx.size());  // dx is now the gradient w.r.t. x_in
    acc.grads_done(table_.layer_block(l));
    acc.release(table_.layer_block(l));
  }
  cpu::embedding_backward(G(table_.embed()), dx.data(), b.tokens.data(), T, C);  // needs no weights
  acc.grads_done(ParamTable::kEmbedBlock);
  acts_.clear();
  return loss;
}

}  // namespace longtune
