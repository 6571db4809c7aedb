#include "src/gpu/llama_gpu.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/linear_cross_entropy.cuh"
#include "kernels/cuda/matmul.cuh"
#include "kernels/cuda/rmsnorm.cuh"
#include "kernels/cuda/rope.cuh"
#include "kernels/cuda/swiglu.cuh"
#include "src/common/error.hpp"

namespace longtune::gpu {

namespace {

// Sizes of one model and micro-batch capacity, named once.
struct Dims {
  int64_t T, C, F, L, NH, NKV, HD, QD, KVD, QKVD, V;
  Dims(const LlamaConfig& c, int64_t max_tokens)
      : T(max_tokens), C(c.hidden_size), F(c.intermediate_size), L(c.num_hidden_layers),
        NH(c.num_attention_heads), NKV(c.num_key_value_heads), HD(c.head_dim), QD(c.q_dim()), KVD(c.kv_dim()),
        QKVD(c.q_dim() + 2 * c.kv_dim()), V(c.vocab_size) {}
};

int64_t loss_chunk_tokens(const Dims& d, const GpuModelOptions& opt) {
  if (opt.loss_chunk > 0) return std::min(opt.loss_chunk, d.T);
  // About 1.5 GiB of fp32 logits + storage-type dlogits, in multiples of 128 tokens.
  const int64_t per_token = 6 * d.V;
  int64_t chunk = (int64_t(3) << 29) / std::max<int64_t>(per_token, 1);
  chunk = std::max<int64_t>(128, chunk / 128 * 128);
  return std::min(chunk, d.T);
}

// Rows of one MLP tile: the option with Recompute::kLayer, else the whole micro-batch (kNone keeps
// gate|up of every layer for its backward, so it never tiles).
int64_t mlp_tile_rows(const Dims& d, const GpuModelOptions& opt) {
  if (opt.recompute == Recompute::kLayer && opt.mlp_chunk > 0) return std::min(opt.mlp_chunk, d.T);
  return d.T;
}

// Offloaded layer inputs: the device ring holds resid[i] in slot i % kResidRing. After the forward the
// last two (resid[L-1], resid[L]) are still there, so only resid[0 .. L-2] go to the host.
constexpr int64_t kResidRing = 2;
int64_t host_resid_slices(const Dims& d) { return std::max<int64_t>(d.L - 1, 0); }

void validate(const GpuModelOptions& opt) {
  if (opt.offload_activations && opt.recompute != Recompute::kLayer)
    throw ConfigError("activation offload needs per-layer recomputation (--recompute layer)");
  if (opt.mlp_chunk < 0)
    throw ConfigError("MLP chunk: expected a token count >= 0, got " + std::to_string(opt.mlp_chunk));
}

// What one decoder layer keeps for its backward (one set per layer with Recompute::kNone, one
// shared set with kLayer, refilled by the recomputation).
template <typename scalar_t>
struct LayerActs {
  scalar_t* qkv = nullptr;    // (T, QKVD) q|k|v after RoPE
  scalar_t* att = nullptr;    // (T, QD) attention output
  float* lse = nullptr;       // (T, NH)
  scalar_t* resid2 = nullptr; // (T, C) residual stream after attention
  float* rstd2 = nullptr;     // (T)
  scalar_t* gu = nullptr;     // (T, 2F) gate|up; with kLayer one MLP tile of it, (mlp rows, 2F)
};

// Walks the buffer layout: with a null arena it only counts bytes (the plan), with an arena it
// carves. Both passes take the same pieces in the same order.
class Carver {
 public:
  explicit Carver(DeviceArena* arena) : arena_(arena) {}
  template <typename T>
  T* take(int64_t n) {
    const size_t bytes = align_up(size_t(std::max<int64_t>(n, 1)) * sizeof(T));
    bytes_ += bytes;
    return arena_ ? static_cast<T*>(arena_->take(bytes)) : nullptr;
  }
  void* take_bytes(size_t bytes) {
    bytes = align_up(std::max<size_t>(bytes, 1));
    bytes_ += bytes;
    return arena_ ? arena_->take(bytes) : nullptr;
  }
  size_t bytes() const { return bytes_; }

 private:
  DeviceArena* arena_;
  size_t bytes_ = 0;
};

}  // namespace

struct LlamaGpu::Impl {
  virtual ~Impl() = default;
  virtual LossSum run(GpuParamAccess& params, const PackedBatch& batch, double grad_scale, bool backward) = 0;
};

namespace {

template <typename scalar_t>
class LlamaGpuImpl final : public LlamaGpu::Impl {
 public:
  LlamaGpuImpl(const LlamaConfig& cfg, const ParamTable& table, const GpuModelOptions& opt, DeviceArena* arena,
               cudaStream_t stream)
      : cfg_(cfg), table_(table), opt_(opt), d_(cfg, opt.max_tokens), stream_(stream) {
    validate(opt_);
    offload_ = opt_.offload_activations;
    mlp_rows_ = mlp_tile_rows(d_, opt_);
    Carver c(arena);
    carve(c);
    bytes_ = c.bytes();
    for (size_t e = 0; e < table_.entries().size(); ++e) block_of_.push_back(table_.block_of(e));
    wbase_.assign(size_t(table_.num_blocks()), nullptr);
    gbase_.assign(size_t(table_.num_blocks()), nullptr);
    if (arena) {
      blas_ = std::make_unique<cuda::Blas>();
      const std::vector<float> inv_freq = rope_inv_freq(cfg_);
      CUDA_CHECK(cudaMemcpyAsync(inv_freq_, inv_freq.data(), inv_freq.size() * sizeof(float),
                                 cudaMemcpyHostToDevice, stream_));
      staging_ = std::make_unique<PinnedBuffer>(size_t(4 * d_.T + 1) * sizeof(int32_t));
      loss_host_ = std::make_unique<PinnedBuffer>(sizeof(double));
      check_fusion();
      if (offload_) {
        if (host_resid_slices(d_) > 0)
          host_resid_ = std::make_unique<PinnedBuffer>(size_t(host_resid_slices(d_) * d_.T * d_.C) * sizeof(scalar_t));
        CUDA_CHECK(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking));
        CUDA_CHECK(cudaEventCreateWithFlags(&ev_compute_, cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&ev_copy_, cudaEventDisableTiming));
        for (cudaEvent_t& e : ev_slot_) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      }
    }
  }

  ~LlamaGpuImpl() override {
    // Nothing may still copy from or into buffers about to go away (run() leaves the copy stream
    // joined to the compute stream; this covers a run that threw half-way).
    if (copy_stream_) cudaStreamSynchronize(copy_stream_);
    for (cudaEvent_t e : ev_slot_)
      if (e) cudaEventDestroy(e);
    if (ev_copy_) cudaEventDestroy(ev_copy_);
    if (ev_compute_) cudaEventDestroy(ev_compute_);
    if (copy_stream_) cudaStreamDestroy(copy_stream_);
  }

  size_t bytes() const { return bytes_; }

  LossSum run(GpuParamAccess& params, const PackedBatch& b, double grad_scale, bool backward) override {
    const int64_t T = b.num_tokens();
    LT_CHECK(T > 0 && T <= d_.T, "micro-batch of " + std::to_string(T) + " tokens exceeds the planned " +
                                     std::to_string(d_.T));
    params_ = &params;
    upload_batch(b);
    LossSum loss;
    loss.count = b.num_targets();
    forward_layers(T, backward);  // leaves the head block acquired
    // lm_head + cross-entropy over the final norm's output; in training its backward runs in the
    // same pass, so the logits never exist beyond one chunk.
    if (table_.tied()) acquire(ParamTable::kEmbedBlock);  // the lm_head is the embedding
    const scalar_t* w_head = w(table_.lm_head());
    if (backward) {
      cuda::linear_cross_entropy_forward_backward<scalar_t>(losses_, dln_, g(table_.lm_head()), ln_a_, w_head,
                                                            targets_, float(grad_scale), T, d_.C, d_.V, ce_scratch_,
                                                            ce_scratch_bytes_, *blas_, stream_);
    } else {
      cuda::linear_cross_entropy_forward<scalar_t>(losses_, ln_a_, w_head, targets_, T, d_.C, d_.V, ce_scratch_,
                                                   ce_scratch_bytes_, *blas_, stream_);
    }
    cuda::sum_deterministic(loss_sum_, losses_, T, reduce_scratch_, stream_);
    auto* host_sum = static_cast<double*>(loss_host_->get());
    CUDA_CHECK(cudaMemcpyAsync(host_sum, loss_sum_, sizeof(double), cudaMemcpyDeviceToHost, stream_));
    if (table_.tied()) release(ParamTable::kEmbedBlock);
    if (backward) backward_layers(T);  // releases the head block
    else release(table_.head_block());
    params_->enqueued();
    params_ = nullptr;
    if (offload_) {
      // Join the copy stream (everything on it is already consumed in training; this keeps the
      // next run from racing with a copy in any case).
      CUDA_CHECK(cudaEventRecord(ev_copy_, copy_stream_));
      CUDA_CHECK(cudaStreamWaitEvent(stream_, ev_copy_, 0));
    }
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    loss.sum = *host_sum;
    return loss;
  }

 private:
  // ---- layout -------------------------------------------------------------------------------
  void carve(Carver& c) {
    const Dims& d = d_;
    const bool keep_all = opt_.recompute == Recompute::kNone;
    // Layer inputs: all L+1 on the device, or a ring of kResidRing with the rest on the host.
    resid_.resize(offload_ ? size_t(kResidRing) : size_t(d.L + 1));
    for (auto& r : resid_) r = c.template take<scalar_t>(d.T * d.C);
    acts_.resize(keep_all ? size_t(d.L) : 1);
    for (auto& a : acts_) {
      a.qkv = c.template take<scalar_t>(d.T * d.QKVD);
      a.att = c.template take<scalar_t>(d.T * d.QD);
      a.lse = c.template take<float>(d.T * d.NH);
      a.resid2 = c.template take<scalar_t>(d.T * d.C);
      a.rstd2 = c.template take<float>(d.T);
      a.gu = c.template take<scalar_t>(mlp_rows_ * 2 * d.F);
    }
    ln_a_ = c.template take<scalar_t>(d.T * d.C);
    ln_b_ = c.template take<scalar_t>(d.T * d.C);
    rstd_a_ = c.template take<float>(d.T);
    rstd_b_ = c.template take<float>(d.T);
    branch_ = c.template take<scalar_t>(d.T * d.C);
    hid_ = c.template take<scalar_t>(mlp_rows_ * d.F);
    // Backward.
    d_stream_ = c.template take<scalar_t>(d.T * d.C);
    d_resid2_ = c.template take<scalar_t>(d.T * d.C);
    dln_ = c.template take<scalar_t>(d.T * d.C);
    dhid_ = c.template take<scalar_t>(mlp_rows_ * d.F);
    dgu_ = c.template take<scalar_t>(mlp_rows_ * 2 * d.F);
    datt_ = c.template take<scalar_t>(d.T * d.QD);
    dqkv_ = c.template take<scalar_t>(d.T * d.QKVD);
    // Batch, loss, scratch.
    tokens_ = c.template take<int32_t>(d.T);
    targets_ = c.template take<int32_t>(d.T);
    positions_ = c.template take<int32_t>(d.T);
    cu_seqlens_ = c.template take<int32_t>(d.T + 1);
    inv_freq_ = c.template take<float>(d.HD / 2);
    losses_ = c.template take<float>(d.T);
    loss_sum_ = c.template take<double>(1);
    reduce_scratch_ = c.take_bytes(cuda::adamw_reduce_scratch_bytes(d.T));
    embed_scratch_ = c.take_bytes(cuda::embedding_backward_scratch_bytes(d.T));
    cuda::AttentionOptions ao = attention_options(d.T);
    attn_workspace_ = c.take_bytes(cuda::attention_backward_workspace_bytes(d.T, d.NH, d.NKV, d.HD, ao));
    ce_scratch_bytes_ = cuda::linear_cross_entropy_scratch_bytes(loss_chunk_tokens(d, opt_), d.V);
    ce_scratch_ = c.take_bytes(ce_scratch_bytes_);
  }

  cuda::AttentionOptions attention_options(int64_t max_seqlen) const {
    cuda::AttentionOptions o;
    o.max_seqlen = max_seqlen;
    o.ld_q = o.ld_k = o.ld_v = d_.QKVD;
    o.kernel = opt_.attention_kernel;
    o.nondeterministic_dq = opt_.nondeterministic_attention;
    return o;
  }

  // q|k|v and gate|up run as one GEMM each when their weights are adjacent in the table.
  void check_fusion() {
    for (int64_t l = 0; l < d_.L; ++l) {
      const LayerParamIndex& ix = table_.layer(l);
      fused_qkv_ = fused_qkv_ && table_.at(ix.k_proj).offset == table_.at(ix.q_proj).offset + d_.QD * d_.C &&
                   table_.at(ix.v_proj).offset == table_.at(ix.k_proj).offset + d_.KVD * d_.C;
      fused_gu_ = fused_gu_ && table_.at(ix.up_proj).offset == table_.at(ix.gate_proj).offset + d_.F * d_.C;
    }
  }

  void upload_batch(const PackedBatch& b) {
    const int64_t T = b.num_tokens(), S = b.num_segments();
    // One pinned staging copy, one upload per array (the arrays are small next to the step).
    auto* h = static_cast<int32_t*>(staging_->get());
    std::copy(b.tokens.begin(), b.tokens.end(), h);
    std::copy(b.targets.begin(), b.targets.end(), h + T);
    std::copy(b.positions.begin(), b.positions.end(), h + 2 * T);
    std::copy(b.cu_seqlens.begin(), b.cu_seqlens.end(), h + 3 * T);
    CUDA_CHECK(cudaMemcpyAsync(tokens_, h, size_t(T) * 4, cudaMemcpyHostToDevice, stream_));
    CUDA_CHECK(cudaMemcpyAsync(targets_, h + T, size_t(T) * 4, cudaMemcpyHostToDevice, stream_));
    CUDA_CHECK(cudaMemcpyAsync(positions_, h + 2 * T, size_t(T) * 4, cudaMemcpyHostToDevice, stream_));
    CUDA_CHECK(cudaMemcpyAsync(cu_seqlens_, h + 3 * T, size_t(S + 1) * 4, cudaMemcpyHostToDevice, stream_));
    num_segments_ = S;
    max_seqlen_ = 0;
    for (int64_t s = 0; s < S; ++s)
      max_seqlen_ = std::max<int64_t>(max_seqlen_, b.cu_seqlens[size_t(s + 1)] - b.cu_seqlens[size_t(s)]);
  }

  // ---- weights and gradients, block by block -------------------------------------------------
  void acquire(int block) { wbase_[size_t(block)] = static_cast<const scalar_t*>(params_->acquire(block)); }
  void release(int block) {
    params_->release(block);
    wbase_[size_t(block)] = nullptr;
  }
  void grads_done(int block) {
    params_->grads_done(block);
    gbase_[size_t(block)] = nullptr;
  }
  const scalar_t* w(size_t entry) const {
    const scalar_t* base = wbase_[size_t(block_of_[entry])];
    LT_CHECK(base != nullptr, "LlamaGpu: weights of " + table_.at(entry).name + " used outside acquire/release");
    return base + table_.at(entry).offset;
  }
  float* g(size_t entry) {
    float*& base = gbase_[size_t(block_of_[entry])];
    if (!base) base = params_->grads(block_of_[entry]);
    return base + table_.at(entry).offset;
  }

  // ---- offloaded layer inputs ----------------------------------------------------------------
  // resid[i] on the device: its own buffer, or ring slot i % kResidRing with offload.
  scalar_t* resid(int64_t i) const {
    return offload_ ? resid_[size_t(i % kResidRing)] : resid_[size_t(i)];
  }
  // Whether resid[i] leaves the device between its forward and its layer's backward.
  bool on_host(int64_t i) const { return offload_ && i >= 0 && i < host_resid_slices(d_); }
  scalar_t* host_resid(int64_t i) const {
    return static_cast<scalar_t*>(host_resid_->get()) + size_t(i) * size_t(d_.T * d_.C);
  }
  // Forward: resid[i] was just written on the compute stream; copy it out on the copy stream.
  void save_input(int64_t i, int64_t T) {
    if (!on_host(i)) return;
    CUDA_CHECK(cudaEventRecord(ev_compute_, stream_));
    CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, ev_compute_, 0));
    CUDA_CHECK(cudaMemcpyAsync(host_resid(i), resid(i), size_t(T * d_.C) * sizeof(scalar_t), cudaMemcpyDeviceToHost,
                               copy_stream_));
    CUDA_CHECK(cudaEventRecord(ev_slot_[size_t(i % kResidRing)], copy_stream_));
  }
  // Forward: resid[i] is about to be written into the slot resid[i - kResidRing] held; the compute
  // stream waits for that one's copy-out (issued a whole layer earlier: normally long done).
  void before_overwrite(int64_t i) {
    if (on_host(i - kResidRing)) CUDA_CHECK(cudaStreamWaitEvent(stream_, ev_slot_[size_t(i % kResidRing)], 0));
  }
  // Backward: bring resid[i] back into its slot, once the compute stream is done with what the slot
  // holds (resid[i + kResidRing], last read by the backward stage enqueued before this call).
  void prefetch_input(int64_t i, int64_t T) {
    if (!on_host(i)) return;
    CUDA_CHECK(cudaEventRecord(ev_compute_, stream_));
    CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, ev_compute_, 0));
    CUDA_CHECK(cudaMemcpyAsync(resid(i), host_resid(i), size_t(T * d_.C) * sizeof(scalar_t), cudaMemcpyHostToDevice,
                               copy_stream_));
    CUDA_CHECK(cudaEventRecord(ev_slot_[size_t(i % kResidRing)], copy_stream_));
  }
  // Backward: the compute stream waits for resid[i]'s prefetch.
  void wait_input(int64_t i) {
    if (on_host(i)) CUDA_CHECK(cudaStreamWaitEvent(stream_, ev_slot_[size_t(i % kResidRing)], 0));
  }

  // ---- forward --------------------------------------------------------------------------------
  // One layer's attention and MLP from ln1 = rmsnorm(resid[l]) (in ln_a_): fills `a` and leaves the
  // MLP output in branch_. With `mlp_out` false (recomputation) it stops at ln2 = rmsnorm(resid2)
  // in ln_b_: the backward recomputes the MLP tile by tile.
  void layer_forward(int64_t l, int64_t T, LayerActs<scalar_t>& a, bool mlp_out) {
    const Dims& d = d_;
    const LayerParamIndex& ix = table_.layer(l);
    // q|k|v
    if (fused_qkv_) {
      cuda::matmul_forward<scalar_t>(a.qkv, ln_a_, w(ix.q_proj), T, d.C, d.QKVD, *blas_, stream_);
    } else {
      cuda::MatmulOptions mo;
      mo.ld_out = d.QKVD;
      cuda::matmul_forward<scalar_t>(a.qkv, ln_a_, w(ix.q_proj), T, d.C, d.QD, *blas_, stream_, mo);
      cuda::matmul_forward<scalar_t>(a.qkv + d.QD, ln_a_, w(ix.k_proj), T, d.C, d.KVD, *blas_, stream_, mo);
      cuda::matmul_forward<scalar_t>(a.qkv + d.QD + d.KVD, ln_a_, w(ix.v_proj), T, d.C, d.KVD, *blas_, stream_, mo);
    }
    cuda::rope_forward<scalar_t>(a.qkv, a.qkv, positions_, inv_freq_, T, d.NH, d.HD, stream_, d.QKVD);
    cuda::rope_forward<scalar_t>(a.qkv + d.QD, a.qkv + d.QD, positions_, inv_freq_, T, d.NKV, d.HD, stream_, d.QKVD);
    cuda::attention_forward<scalar_t>(a.att, a.lse, a.qkv, a.qkv + d.QD, a.qkv + d.QD + d.KVD, cu_seqlens_,
                                      num_segments_, T, d.NH, d.NKV, d.HD, attention_options(max_seqlen_), stream_);
    cuda::matmul_forward<scalar_t>(branch_, a.att, w(ix.o_proj), T, d.QD, d.C, *blas_, stream_);
    // resid2 = resid + attention branch ; ln_b = rmsnorm(resid2)
    cuda::residual_rmsnorm_forward<scalar_t>(a.resid2, ln_b_, a.rstd2, resid(l), branch_, w(ix.post_norm), T, d.C,
                                             float(cfg_.rms_norm_eps), stream_);
    if (!mlp_out) return;
    // MLP, over tiles of token rows (one tile with kNone or without mlp_chunk; with kNone a.gu is
    // the layer's whole gate|up, kept for backward).
    for (int64_t r0 = 0; r0 < T; r0 += mlp_rows_) {
      const int64_t n = std::min(mlp_rows_, T - r0);
      gate_up_forward(ix, n, a.gu, ln_b_ + r0 * d.C);
      cuda::swiglu_forward<scalar_t>(hid_, a.gu, a.gu + d.F, n, d.F, stream_, 2 * d.F);
      cuda::matmul_forward<scalar_t>(branch_ + r0 * d.C, hid_, w(ix.down_proj), n, d.F, d.C, *blas_, stream_);
    }
  }

  void gate_up_forward(const LayerParamIndex& ix, int64_t T, scalar_t* gu, const scalar_t* inp) {
    const Dims& d = d_;
    if (fused_gu_) {
      cuda::matmul_forward<scalar_t>(gu, inp, w(ix.gate_proj), T, d.C, 2 * d.F, *blas_, stream_);
    } else {
      cuda::MatmulOptions mo;
      mo.ld_out = 2 * d.F;
      cuda::matmul_forward<scalar_t>(gu, inp, w(ix.gate_proj), T, d.C, d.F, *blas_, stream_, mo);
      cuda::matmul_forward<scalar_t>(gu + d.F, inp, w(ix.up_proj), T, d.C, d.F, *blas_, stream_, mo);
    }
  }

  // Embedding, every layer, and the final norm into ln_a_.
  void forward_layers(int64_t T, bool training) {
    const Dims& d = d_;
    const float eps = float(cfg_.rms_norm_eps);
    // Layer inputs go to the host only when a backward will need them.
    const bool save = training && offload_;
    acquire(ParamTable::kEmbedBlock);
    cuda::embedding_forward<scalar_t>(resid(0), tokens_, w(table_.embed()), T, d.C, stream_);
    release(ParamTable::kEmbedBlock);
    if (save) save_input(0, T);
    acquire(table_.layer_block(0));
    cuda::rmsnorm_forward<scalar_t>(ln_a_, rstd_a_, resid(0), w(table_.layer(0).input_norm), T, d.C, eps, stream_);
    for (int64_t l = 0; l < d.L; ++l) {
      LayerActs<scalar_t>& a = acts_[training && opt_.recompute == Recompute::kNone ? size_t(l) : 0];
      layer_forward(l, T, a, /*mlp_out=*/true);
      // The next block's input norm (or the final norm) closes this layer.
      acquire(l + 1 < d.L ? table_.layer_block(l + 1) : table_.head_block());
      const scalar_t* next_norm =
          l + 1 < d.L ? w(table_.layer(l + 1).input_norm) : w(table_.final_norm());
      // resid[l+1] = resid2 + MLP branch ; ln_a = rmsnorm(resid[l+1]) (the next layer's input norm,
      // or the final norm).
      if (save) before_overwrite(l + 1);
      cuda::residual_rmsnorm_forward<scalar_t>(resid(l + 1), ln_a_, rstd_a_, a.resid2, branch_, next_norm, T, d.C,
                                               eps, stream_);
      if (save) save_input(l + 1, T);
      release(table_.layer_block(l));
    }
  }

  // ---- backward -------------------------------------------------------------------------------
  // The MLP's backward from ln2 (ln_b_) and d(MLP output) (d_stream_) to d(ln2) (dln_), tile by
  // tile: with kLayer each tile's gate|up is recomputed, with kNone a.gu holds all of it.
  void mlp_backward(const LayerParamIndex& ix, int64_t T, LayerActs<scalar_t>& a) {
    const Dims& d = d_;
    const bool recompute = opt_.recompute == Recompute::kLayer;
    for (int64_t r0 = 0; r0 < T; r0 += mlp_rows_) {
      const int64_t n = std::min(mlp_rows_, T - r0);
      const scalar_t* ln2 = ln_b_ + r0 * d.C;
      scalar_t* dln2 = dln_ + r0 * d.C;
      if (recompute) gate_up_forward(ix, n, a.gu, ln2);
      cuda::swiglu_forward<scalar_t>(hid_, a.gu, a.gu + d.F, n, d.F, stream_, 2 * d.F);
      cuda::matmul_backward<scalar_t>(dhid_, g(ix.down_proj), d_stream_ + r0 * d.C, hid_, w(ix.down_proj), n, d.F,
                                      d.C, *blas_, stream_);
      cuda::swiglu_backward<scalar_t>(dgu_, dgu_ + d.F, dhid_, a.gu, a.gu + d.F, n, d.F, stream_, 2 * d.F);
      if (fused_gu_) {
        cuda::matmul_backward<scalar_t>(dln2, g(ix.gate_proj), dgu_, ln2, w(ix.gate_proj), n, d.C, 2 * d.F, *blas_,
                                        stream_);
      } else {
        cuda::MatmulOptions mo;
        mo.ld_out = 2 * d.F;
        cuda::matmul_backward<scalar_t>(dln2, g(ix.gate_proj), dgu_, ln2, w(ix.gate_proj), n, d.C, d.F, *blas_,
                                        stream_, mo);
        mo.accumulate_dinp = true;
        cuda::matmul_backward<scalar_t>(dln2, g(ix.up_proj), dgu_ + d.F, ln2, w(ix.up_proj), n, d.C, d.F, *blas_,
                                        stream_, mo);
      }
    }
  }

  void backward_layers(int64_t T) {
    const Dims& d = d_;
    const float eps = float(cfg_.rms_norm_eps);
    // Final norm: dln_ holds d(loss)/d(final norm output) from the fused cross-entropy.
    cuda::rmsnorm_backward<scalar_t>(d_stream_, g(table_.final_norm()), dln_, resid(d.L), w(table_.final_norm()),
                                     rstd_a_, T, d.C, stream_);
    grads_done(table_.head_block());
    release(table_.head_block());
    for (int64_t l = d.L - 1; l >= 0; --l) {
      const LayerParamIndex& ix = table_.layer(l);
      if (offload_) {
        // Before acquire(), so the prefetch waits only for the previous backward stage.
        prefetch_input(l - 1, T);  // overlaps this layer's backward
        wait_input(l);             // prefetched while layer l+1 ran (resid[L-1] never left the device)
      }
      acquire(table_.layer_block(l));
      LayerActs<scalar_t>& a = acts_[opt_.recompute == Recompute::kNone ? size_t(l) : 0];
      // ln1 = rmsnorm(resid[l]) is needed by the q|k|v weight gradient (and by the recomputation).
      cuda::rmsnorm_forward<scalar_t>(ln_a_, rstd_a_, resid(l), w(ix.input_norm), T, d.C, eps, stream_);
      if (opt_.recompute == Recompute::kLayer) {
        layer_forward(l, T, a, /*mlp_out=*/false);  // leaves ln2 in ln_b_
      } else {
        cuda::rmsnorm_forward<scalar_t>(ln_b_, rstd_b_, a.resid2, w(ix.post_norm), T, d.C, eps, stream_);
      }
      // MLP: d_stream_ is d(loss)/d(resid[l+1]) = d(MLP branch) = d(resid2) through the residual.
      mlp_backward(ix, T, a);
      // resid2 feeds the post-attention norm and the residual path.
      cuda::residual_rmsnorm_backward<scalar_t>(d_resid2_, g(ix.post_norm), dln_, d_stream_, a.resid2,
                                                w(ix.post_norm), a.rstd2, T, d.C, stream_);
      // Attention.
      cuda::matmul_backward<scalar_t>(datt_, g(ix.o_proj), d_resid2_, a.att, w(ix.o_proj), T, d.QD, d.C,
                                      *blas_, stream_);
      cuda::attention_backward<scalar_t>(dqkv_, dqkv_ + d.QD, dqkv_ + d.QD + d.KVD, datt_, a.qkv, a.qkv + d.QD,
                                         a.qkv + d.QD + d.KVD, a.att, a.lse, cu_seqlens_, num_segments_, T, d.NH,
                                         d.NKV, d.HD, attention_options(max_seqlen_), attn_workspace_, stream_);
      cuda::rope_backward<scalar_t>(dqkv_, dqkv_, positions_, inv_freq_, T, d.NH, d.HD, stream_, d.QKVD);
      cuda::rope_backward<scalar_t>(dqkv_ + d.QD, dqkv_ + d.QD, positions_, inv_freq_, T, d.NKV, d.HD, stream_,
                                    d.QKVD);
      if (fused_qkv_) {
        cuda::matmul_backward<scalar_t>(dln_, g(ix.q_proj), dqkv_, ln_a_, w(ix.q_proj), T, d.C, d.QKVD, *blas_,
                                        stream_);
      } else {
        cuda::MatmulOptions mo;
        mo.ld_out = d.QKVD;
        cuda::matmul_backward<scalar_t>(dln_, g(ix.q_proj), dqkv_, ln_a_, w(ix.q_proj), T, d.C, d.QD, *blas_,
                                        stream_, mo);
        mo.accumulate_dinp = true;
        cuda::matmul_backward<scalar_t>(dln_, g(ix.k_proj), dqkv_ + d.QD, ln_a_, w(ix.k_proj), T, d.C, d.KVD,
                                        *blas_, stream_, mo);
        cuda::matmul_backward<scalar_t>(dln_, g(ix.v_proj), dqkv_ + d.QD + d.KVD, ln_a_, w(ix.v_proj), T, d.C,
                                        d.KVD, *blas_, stream_, mo);
      }
      // resid[l] feeds the input norm and the residual path: d(resid[l]) into d_stream_.
      cuda::residual_rmsnorm_backward<scalar_t>(d_stream_, g(ix.input_norm), dln_, d_resid2_, resid(l),
                                                w(ix.input_norm), rstd_a_, T, d.C, stream_);
      grads_done(table_.layer_block(l));
      release(table_.layer_block(l));
    }
    cuda::embedding_backward<scalar_t>(g(table_.embed()), d_stream_, tokens_, T, d.C, embed_scratch_, stream_);
    grads_done(ParamTable::kEmbedBlock);
  }

  LlamaConfig cfg_;
  const ParamTable& table_;
  GpuModelOptions opt_;
  Dims d_;
  GpuParamAccess* params_ = nullptr;   // during run()
  std::vector<int> block_of_;          // per table entry
  std::vector<const scalar_t*> wbase_;  // per block, while acquired
  std::vector<float*> gbase_;           // per block, from the first grads() to grads_done()
  cudaStream_t stream_;
  size_t bytes_ = 0;
  std::unique_ptr<cuda::Blas> blas_;
  std::unique_ptr<PinnedBuffer> staging_, loss_host_;
  bool fused_qkv_ = true, fused_gu_ = true;
  int64_t num_segments_ = 0, max_seqlen_ = 0;

  bool offload_ = false;          // layer inputs in host memory (opt_.offload_activations)
  int64_t mlp_rows_ = 0;          // tokens per MLP tile
  std::vector<scalar_t*> resid_;  // (L+1) x (T, C): each layer's input, and the final residual stream;
                                  // with offload a ring of kResidRing of them
  std::unique_ptr<PinnedBuffer> host_resid_;  // offload: resid[0 .. L-2], (T, C) each
  cudaStream_t copy_stream_ = nullptr;        // offload: device <-> host copies of the layer inputs
  cudaEvent_t ev_compute_ = nullptr;          // compute stream progress, for the copy stream to wait on
  cudaEvent_t ev_copy_ = nullptr;             // copy stream joined at the end of run()
  cudaEvent_t ev_slot_[kResidRing] = {};      // last copy out of / into each ring slot
  std::vector<LayerActs<scalar_t>> acts_;
  scalar_t *ln_a_ = nullptr, *ln_b_ = nullptr, *branch_ = nullptr, *hid_ = nullptr;
  float *rstd_a_ = nullptr, *rstd_b_ = nullptr;
  scalar_t *d_stream_ = nullptr, *d_resid2_ = nullptr, *dln_ = nullptr, *dhid_ = nullptr, *dgu_ = nullptr,
           *datt_ = nullptr, *dqkv_ = nullptr;
  int32_t *tokens_ = nullptr, *targets_ = nullptr, *positions_ = nullptr, *cu_seqlens_ = nullptr;
  float *inv_freq_ = nullptr, *losses_ = nullptr;
  double* loss_sum_ = nullptr;
  void *reduce_scratch_ = nullptr, *embed_scratch_ = nullptr, *attn_workspace_ = nullptr, *ce_scratch_ = nullptr;
  size_t ce_scratch_bytes_ = 0;
};

template <typename scalar_t>
size_t plan_bytes(const LlamaConfig& cfg, const GpuModelOptions& opt) {
  // A counting pass over the same layout (no arena, no allocation).
  const ParamTable table(cfg);
  LlamaGpuImpl<scalar_t> plan(cfg, table, opt, nullptr, nullptr);
  return plan.bytes();
}

}  // namespace

cuda::AttentionKernel attention_kernel_from_name(const std::string& name) {
  if (name == "auto") return cuda::AttentionKernel::kAuto;
  if (name == "tensor-core") return cuda::AttentionKernel::kTensorCore;
  if (name == "sm75") return cuda::AttentionKernel::kTensorCoreSm75;
  if (name == "cudnn") return cuda::AttentionKernel::kCudnn;
  throw ConfigError("--attention: expected auto, tensor-core, sm75 or cudnn, got '" + name + "'");
}

size_t LlamaGpu::library_bytes(const GpuModelOptions& opt) {
  const size_t base = size_t(512) << 20;  // measured, with margin
  return base + (opt.attention_kernel == cuda::AttentionKernel::kCudnn ? size_t(320) << 20 : 0);
}

size_t LlamaGpu::host_activation_bytes(const LlamaConfig& cfg, const GpuModelOptions& opt) {
  validate(opt);
  if (!opt.offload_activations) return 0;
  const Dims d(cfg, opt.max_tokens);
  const size_t elem = opt.compute_dtype == DType::F16 || opt.compute_dtype == DType::BF16 ? 2 : 0;
  if (elem == 0)
    throw ConfigError("compute dtype: expected bf16 or fp16, got " + std::string(dtype_name(opt.compute_dtype)));
  return size_t(host_resid_slices(d) * d.T * d.C) * elem;
}

size_t LlamaGpu::activation_bytes(const LlamaConfig& cfg, const GpuModelOptions& opt) {
  switch (opt.compute_dtype) {
    case DType::BF16: return plan_bytes<__nv_bfloat16>(cfg, opt);
    case DType::F16: return plan_bytes<__half>(cfg, opt);
    default: throw ConfigError("compute dtype: expected bf16 or fp16, got " + std::string(dtype_name(opt.compute_dtype)));
  }
}

LlamaGpu::LlamaGpu(const LlamaConfig& cfg, const ParamTable& table, const GpuModelOptions& opt, DeviceArena& arena,
                   cudaStream_t stream)
    : opt_(opt) {
  LT_CHECK(opt.max_tokens > 0, "LlamaGpu: max_tokens must be set");
  switch (opt.compute_dtype) {
    case DType::BF16: impl_ = std::make_unique<LlamaGpuImpl<__nv_bfloat16>>(cfg, table, opt, &arena, stream); break;
    case DType::F16: impl_ = std::make_unique<LlamaGpuImpl<__half>>(cfg, table, opt, &arena, stream); break;
    default: throw ConfigError("compute dtype: expected bf16 or fp16, got " + std::string(dtype_name(opt.compute_dtype)));
  }
}

LlamaGpu::~LlamaGpu() = default;

LossSum LlamaGpu::forward(const void* weights, const PackedBatch& batch) {
  FlatGpuParams flat(weights, nullptr);
  return impl_->run(flat, batch, 0.0, /*backward=*/false);
}

LossSum LlamaGpu::forward(GpuParamAccess& params, const PackedBatch& batch) {
  return impl_->run(params, batch, 0.0, /*backward=*/false);
}

LossSum LlamaGpu::forward_backward(const void* weights, float* grads, const PackedBatch& batch, double grad_scale) {
  FlatGpuParams flat(weights, grads);
  return impl_->run(flat, batch, grad_scale, /*backward=*/true);
}

LossSum LlamaGpu::forward_backward(GpuParamAccess& params, const PackedBatch& batch, double grad_scale) {
  return impl_->run(params, batch, grad_scale, /*backward=*/true);
}

}  // namespace longtune::gpu
