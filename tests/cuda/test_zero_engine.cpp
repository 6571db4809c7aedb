// The sharded / offloading GPU engine (src/gpu/zero_engine.hpp) on one rank against the
// single-GPU engine (src/gpu/gpu_engine.hpp) on the golden model: same micro-batches, same AdamW.
// Without clipping both updates are elementwise and bit-identical (the host AdamW and the CUDA one
// are, by construction), and the gradients are the same sums: the final states must be equal bit for
// bit, whichever place the optimizer and the weights live in. With clipping the global norm is
// summed in another order (host vs device), so the clip coefficient may differ in its last bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "src/comm/comm.hpp"
#include "src/gpu/device_memory.hpp"
#include "src/gpu/gpu_engine.hpp"
#include "src/gpu/model_shapes.hpp"
#include "src/gpu/zero_engine.hpp"
#include "src/optim/kokkos_scope.hpp"
#include "src/train/sharded_state.hpp"
#include "tests/cuda/gpu_test_util.hpp"
#include "tests/golden_fixture.hpp"

using namespace longtune;

namespace {

const char* kCase = "gqa_hd64_gpu";

struct Case {
  gpu::OptimizerPlace optimizer;
  gpu::WeightPlace weights;
  const char* name;
};
const Case kCases[] = {
    {gpu::OptimizerPlace::kHost, gpu::WeightPlace::kResident, "offload optimizer, weights resident"},
    {gpu::OptimizerPlace::kHost, gpu::WeightPlace::kStreamed, "offload optimizer, weights streamed"},
    {gpu::OptimizerPlace::kDevice, gpu::WeightPlace::kStreamed, "optimizer on GPU, weights streamed"},
    {gpu::OptimizerPlace::kDevice, gpu::WeightPlace::kResident, "optimizer on GPU, weights resident"},
};

struct State {
  std::vector<float> master, m, v;
  std::vector<double> losses;
};

// What the model does with its activations beyond recomputing each layer (issue 6, point 3).
struct Activations {
  bool offload = false;   // layer inputs in pinned host memory
  int64_t mlp_chunk = 0;  // tokens per MLP tile
};

gpu::GpuModelOptions model_options(DType dtype, int64_t max_tokens, const Activations& act = {}) {
  gpu::GpuModelOptions o;
  o.compute_dtype = dtype;
  o.recompute = gpu::Recompute::kLayer;
  o.max_tokens = max_tokens;
  o.loss_chunk = 64;
  o.offload_activations = act.offload;
  o.mlp_chunk = act.mlp_chunk;
  return o;
}

// `steps` optimizer steps of `micro` copies of the golden batch each, with the single-GPU engine.
State run_reference(const test::GoldenModel& g, const PackedBatch& batch, const AdamWConfig& a, DType dtype, int steps,
                    int micro, const Activations& act = {}) {
  gpu::GpuEngineOptions o;
  o.model = model_options(dtype, batch.num_tokens(), act);
  o.initial_loss_scale = 1024.0;
  gpu::GpuEngine engine(g.cfg, *g.table, a, o);
  engine.upload_state(g.weights.data(), nullptr, nullptr);
  State s;
  for (int step = 1; step <= steps; ++step) {
    LossSum l;
    for (int k = 0; k < micro; ++k) l += engine.accumulate(batch, batch.num_targets() * micro);
    EXPECT_FALSE(engine.optimizer_step(step, a.lr).skipped);
    s.losses.push_back(l.mean());
  }
  const size_t n = g.weights.size();
  s.master.resize(n), s.m.resize(n), s.v.resize(n);
  engine.download_state(s.master.data(), s.m.data(), s.v.data());
  return s;
}

// The lean host state (offload only): bf16 host gradients, weights fetched from the fp32 master.
struct LeanHost {
  bool bf16_grads = false;
  bool from_master = false;
};

State run_zero(const test::GoldenModel& g, const PackedBatch& batch, const AdamWConfig& a, DType dtype, int steps,
               int micro, const Case& c, bool delayed = false, const Activations& act = {},
               const LeanHost& lean = {}) {
  std::unique_ptr<Comm> comm = make_comm();
  ShardedTrainState state(*g.table, *comm, a, NumaPlacement{}, lean.bf16_grads ? DType::BF16 : DType::F32);
  state.load_full(g.weights.data());
  gpu::ZeroEngineOptions o;
  o.model = model_options(dtype, batch.num_tokens(), act);
  o.optimizer = c.optimizer;
  o.weights = c.weights;
  o.initial_loss_scale = 1024.0;
  o.delayed_update = delayed;
  o.host_grad_dtype = lean.bf16_grads ? DType::BF16 : DType::F32;
  o.fetch_from_master = lean.from_master;
  gpu::ZeroEngine engine(g.cfg, *g.table, a, o, state);
  const std::vector<PackedBatch> mbs(size_t(micro), batch);
  State s;
  for (int step = 1; step <= steps; ++step) {
    LossSum l;
    EXPECT_FALSE(engine.train_step(mbs, batch.num_targets() * micro, step, a.lr, &l).skipped);
    s.losses.push_back(l.mean());
  }
  engine.sync_state();
  const size_t n = g.weights.size();
  s.master.assign(state.master(), state.master() + n);
  s.m.assign(state.exp_avg(), state.exp_avg() + n);
  s.v.assign(state.exp_avg_sq(), state.exp_avg_sq() + n);
  return s;
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

AdamWConfig adamw(double clip) {
  AdamWConfig a;
  a.lr = 1e-3;
  a.weight_decay = 0.1;
  a.clip = clip;
  return a;
}

}  // namespace

TEST(GpuZeroEngine, BitIdenticalToTheSingleGpuEngineWithoutClipping) {
  SKIP_WITHOUT_GPU();
  const KokkosScope kokkos;
  const test::GoldenModel g = test::load_golden_model(kCase);
  const PackedBatch batch = test::load_batch(test::golden_dir() / kCase / "batch.json");
  for (DType dtype : {DType::BF16, DType::F16}) {
    const State ref = run_reference(g, batch, adamw(0.0), dtype, 3, 1);
    for (const Case& c : kCases) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + ", " + c.name);
      const State z = run_zero(g, batch, adamw(0.0), dtype, 3, 1, c);
      for (size_t s = 0; s < ref.losses.size(); ++s) EXPECT_EQ(z.losses[s], ref.losses[s]) << "step " << s + 1;
      EXPECT_EQ(0, std::memcmp(z.master.data(), ref.master.data(), z.master.size() * 4)) << rel(z.master, ref.master);
      EXPECT_EQ(0, std::memcmp(z.m.data(), ref.m.data(), z.m.size() * 4)) << rel(z.m, ref.m);
      EXPECT_EQ(0, std::memcmp(z.v.data(), ref.v.data(), z.v.size() * 4)) << rel(z.v, ref.v);
      std::printf("[zero-engine] %s, %s: bit-identical after 3 steps, loss %.6f\n",
                  std::string(dtype_name(dtype)).c_str(), c.name, z.losses.back());
    }
  }
}

TEST(GpuZeroEngine, FollowsTheSingleGpuEngineWithClippingAndAccumulation) {
  SKIP_WITHOUT_GPU();
  const KokkosScope kokkos;
  const test::GoldenModel g = test::load_golden_model(kCase);
  const PackedBatch batch = test::load_batch(test::golden_dir() / kCase / "batch.json");
  // clip 0.05: far below the golden model's gradient norm, so every step clips.
  const State ref = run_reference(g, batch, adamw(0.05), DType::BF16, 3, 3);
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    const State z = run_zero(g, batch, adamw(0.05), DType::BF16, 3, 3, c);
    for (size_t s = 0; s < ref.losses.size(); ++s) EXPECT_NEAR(z.losses[s], ref.losses[s], 1e-5 * ref.losses[s]);
    std::vector<float> du(g.weights.size()), dr(g.weights.size());
    for (size_t i = 0; i < du.size(); ++i) du[i] = z.master[i] - g.weights[i], dr[i] = ref.master[i] - g.weights[i];
    const double err = rel(du, dr);
    std::printf("[zero-engine] %s, clip + 3 micro-batches: update rel %.2e\n", c.name, err);
    EXPECT_LT(err, 1e-4);
  }
}

// Delayed update: step t + 1 runs on the weights before step t's update. With the same batch every
// step, step 2 sees the initial weights again (its loss equals step 1's) and step 3 sees the weights
// after one update (its loss equals the exact schedule's step 2); the update order itself is exact,
// and one step plus a sync gives exactly the first update.
TEST(GpuZeroEngine, DelayedUpdateIsOneStepStale) {
  SKIP_WITHOUT_GPU();
  const KokkosScope kokkos;
  const test::GoldenModel g = test::load_golden_model(kCase);
  const PackedBatch batch = test::load_batch(test::golden_dir() / kCase / "batch.json");
  const Case offload = kCases[0];
  const State ref = run_reference(g, batch, adamw(0.0), DType::BF16, 3, 1);
  const State one = run_zero(g, batch, adamw(0.0), DType::BF16, 1, 1, offload, /*delayed=*/true);
  EXPECT_EQ(0, std::memcmp(one.master.data(), run_reference(g, batch, adamw(0.0), DType::BF16, 1, 1).master.data(),
                           one.master.size() * 4))
      << "one step and a sync apply exactly the first update";
  const State z = run_zero(g, batch, adamw(0.0), DType::BF16, 3, 1, offload, /*delayed=*/true);
  EXPECT_EQ(z.losses[0], ref.losses[0]);
  EXPECT_EQ(z.losses[1], ref.losses[0]) << "step 2 still sees the initial weights";
  EXPECT_EQ(z.losses[2], ref.losses[1]) << "step 3 sees the weights after one update";
  std::printf("[zero-engine] delayed update losses %.6f %.6f %.6f (exact schedule %.6f %.6f %.6f)\n", z.losses[0],
              z.losses[1], z.losses[2], ref.losses[0], ref.losses[1], ref.losses[2]);
}

// The activation options through the sharded engine, every placement. Offloading only moves the layer
// inputs: bit-identical to the single-GPU engine doing the same math (no tiles, or the same tiles).
// The tiles change the GEMM shapes: against the untiled run the loss and the first moment (a running
// mean of the gradients: the update's direction) agree within the rounding that
// GpuModel.OffloadAndMlpTilingOnTheGoldenModel allows the gradients (bf16 2e-2, fp16 5e-3).
TEST(GpuZeroEngine, ActivationOffloadAndMlpTilesKeepTheResults) {
  SKIP_WITHOUT_GPU();
  const KokkosScope kokkos;
  const test::GoldenModel g = test::load_golden_model(kCase);
  const PackedBatch batch = test::load_batch(test::golden_dir() / kCase / "batch.json");
  const Activations offload{true, 0}, tiles{false, 64}, both{true, 64};  // 192 tokens: three tiles
  for (DType dtype : {DType::BF16, DType::F16}) {
    const bool bf16 = dtype == DType::BF16;
    const std::string dname(dtype_name(dtype));
    const State ref = run_reference(g, batch, adamw(0.0), dtype, 3, 1);
    const State ref_tiled = run_reference(g, batch, adamw(0.0), dtype, 3, 1, tiles);
    for (const Case& c : kCases) {
      for (const Activations& act : {offload, both}) {
        SCOPED_TRACE(dname + ", " + c.name + (act.mlp_chunk ? ", layer inputs on the host, MLP tiles"
                                                            : ", layer inputs on the host"));
        const State& same_math = act.mlp_chunk ? ref_tiled : ref;
        const State z = run_zero(g, batch, adamw(0.0), dtype, 3, 1, c, false, act);
        for (size_t s = 0; s < same_math.losses.size(); ++s)
          EXPECT_EQ(z.losses[s], same_math.losses[s]) << "step " << s + 1;
        EXPECT_EQ(0, std::memcmp(z.master.data(), same_math.master.data(), z.master.size() * 4))
            << rel(z.master, same_math.master);
        EXPECT_EQ(0, std::memcmp(z.m.data(), same_math.m.data(), z.m.size() * 4)) << rel(z.m, same_math.m);
        EXPECT_EQ(0, std::memcmp(z.v.data(), same_math.v.data(), z.v.size() * 4)) << rel(z.v, same_math.v);
      }
    }
    // One step with both options against one without either (sharded engine, offload optimizer).
    const State plain = run_zero(g, batch, adamw(0.0), dtype, 1, 1, kCases[0]);
    const State z = run_zero(g, batch, adamw(0.0), dtype, 1, 1, kCases[0], false, both);
    const double loss_rel = std::abs(z.losses[0] - plain.losses[0]) / plain.losses[0];
    const double m_rel = rel(z.m, plain.m);
    std::vector<float> du(g.weights.size()), dp(g.weights.size());
    for (size_t i = 0; i < du.size(); ++i) du[i] = z.master[i] - g.weights[i], dp[i] = plain.master[i] - g.weights[i];
    std::printf("[zero-engine] %s, layer inputs on the host + MLP tiles of 64: bit-identical to the single-GPU engine "
                "in every placement; against no options: loss rel %.2e, first moment rel %.2e, update rel %.2e\n",
                dname.c_str(), loss_rel, m_rel, rel(du, dp));
    EXPECT_LT(loss_rel, bf16 ? 2e-3 : 5e-4);
    EXPECT_LT(m_rel, bf16 ? 2e-2 : 5e-3);
  }
}

// The bf16 wire's device buffers (the largest block and the largest reduced piece in bf16, that piece
// widened to fp32: the fp32 wire reduces in place instead) are
// in the plan's gradients part, and only where something goes on the wire. No GPU needed.
TEST(GpuZeroEngine, PlanCountsTheBf16WireBuffers) {
  const LlamaConfig cfg = gpu::llama_shape_by_name("1b");
  const ParamTable table(cfg);
  gpu::ZeroEngineOptions o;
  o.model = model_options(DType::BF16, 4096);
  for (gpu::OptimizerPlace place : {gpu::OptimizerPlace::kDevice, gpu::OptimizerPlace::kHost}) {
    o.optimizer = place;
    for (int world : {1, 2, 4}) {
      SCOPED_TRACE("world " + std::to_string(world));
      o.grad_wire_dtype = DType::F32;
      const gpu::ZeroMemoryPlan f32 = gpu::ZeroEngine::plan(cfg, o, world);
      o.grad_wire_dtype = DType::BF16;
      const gpu::ZeroMemoryPlan b16 = gpu::ZeroEngine::plan(cfg, o, world);
      const ShardLayout layout(table.total_elements(), world);
      int64_t max_block = 0, max_piece = 0;
      for (int b = 0; b < table.num_blocks(); ++b) {
        max_block = std::max(max_block, table.block_end(b) - table.block_begin(b));
        for (int64_t c : layout.counts(table.block_begin(b), table.block_end(b))) max_piece = std::max(max_piece, c);
      }
      // Plus the fp32 piece the bf16 sum is widened into (the fp32 wire reduces in place).
      const size_t wire = world == 1 ? 0
                                     : gpu::align_up(size_t(max_block) * 2) + gpu::align_up(size_t(max_piece) * 2) +
                                           gpu::align_up(size_t(max_piece) * 4);
      EXPECT_EQ(b16.grads, f32.grads + wire);
      EXPECT_EQ(b16.device_total(), f32.device_total() + wire);
      EXPECT_EQ(b16.host_total(), f32.host_total());
    }
  }
}

// Fetching the weights from the fp32 master (converted on the GPU) instead of the host's bf16/fp16
// copy: the same rounding, so bit-identical, resident and streamed, with the delayed update too.
TEST(GpuZeroEngine, FetchFromMasterIsBitIdentical) {
  SKIP_WITHOUT_GPU();
  const KokkosScope kokkos;
  const test::GoldenModel g = test::load_golden_model(kCase);
  const PackedBatch batch = test::load_batch(test::golden_dir() / kCase / "batch.json");
  LeanHost lean;
  lean.from_master = true;
  for (DType dtype : {DType::BF16, DType::F16}) {
    for (const Case& c : kCases) {
      if (c.optimizer != gpu::OptimizerPlace::kHost) continue;
      SCOPED_TRACE(std::string(dtype_name(dtype)) + ", " + c.name);
      const State ref = run_zero(g, batch, adamw(1.0), dtype, 3, 2, c);
      const State z = run_zero(g, batch, adamw(1.0), dtype, 3, 2, c, false, {}, lean);
      EXPECT_EQ(z.losses, ref.losses);
      EXPECT_EQ(0, std::memcmp(z.master.data(), ref.master.data(), z.master.size() * 4)) << rel(z.master, ref.master);
      EXPECT_EQ(0, std::memcmp(z.m.data(), ref.m.data(), z.m.size() * 4));
      EXPECT_EQ(0, std::memcmp(z.v.data(), ref.v.data(), z.v.size() * 4));
    }
    const Case& resident = kCases[0];
    const State ref = run_zero(g, batch, adamw(1.0), dtype, 3, 1, resident, true);
    const State z = run_zero(g, batch, adamw(1.0), dtype, 3, 1, resident, true, {}, lean);
    EXPECT_EQ(z.losses, ref.losses) << "delayed update";
    EXPECT_EQ(0, std::memcmp(z.master.data(), ref.master.data(), z.master.size() * 4)) << "delayed update";
  }
}

// bf16 host gradients: the update is AdamW's on bf16-rounded gradients (the host AdamW widens them
// exactly; AdamWExact.Bf16GradientEqualsWidenedFp32Gradient), so it follows the fp32 one to about the
// rounding of one gradient (2^-9 relative): the first moment, a running mean of the gradients, within
// 1e-2; the second within 2e-2. Two micro-batches take the accumulate-into-bf16 path as well. And it
// must not be bit-identical: the gradients really went through bf16.
TEST(GpuZeroEngine, Bf16HostGradientsFollowFp32) {
  SKIP_WITHOUT_GPU();
  const KokkosScope kokkos;
  const test::GoldenModel g = test::load_golden_model(kCase);
  const PackedBatch batch = test::load_batch(test::golden_dir() / kCase / "batch.json");
  LeanHost lean;
  lean.bf16_grads = true;
  lean.from_master = true;
  for (DType dtype : {DType::BF16, DType::F16}) {
    for (const Case& c : kCases) {
      if (c.optimizer != gpu::OptimizerPlace::kHost) continue;
      for (int micro : {1, 2}) {
        SCOPED_TRACE(std::string(dtype_name(dtype)) + ", " + c.name + ", micro-batches " + std::to_string(micro));
        const State ref = run_zero(g, batch, adamw(1.0), dtype, 3, micro, c);
        const State z = run_zero(g, batch, adamw(1.0), dtype, 3, micro, c, false, {}, lean);
        EXPECT_EQ(z.losses[0], ref.losses[0]);  // the first forward sees the same weights
        for (size_t s = 1; s < z.losses.size(); ++s) EXPECT_NEAR(z.losses[s], ref.losses[s], 1e-3 * ref.losses[s]);
        const double m_rel = rel(z.m, ref.m), v_rel = rel(z.v, ref.v);
        std::printf("[zero-engine] %s, %s, %d micro-batch(es), bf16 host gradients vs fp32: first moment rel %.2e, "
                    "second %.2e\n", std::string(dtype_name(dtype)).c_str(), c.name, micro, m_rel, v_rel);
        EXPECT_LT(m_rel, 1e-2);
        EXPECT_LT(v_rel, 2e-2);
        EXPECT_NE(0, std::memcmp(z.m.data(), ref.m.data(), z.m.size() * 4));
      }
    }
  }
}

// The host check before the state is allocated (no GPU needed): a plan larger than this node's
// available memory is refused with its numbers, a small one passes.
TEST(GpuZeroEngine, HostMemoryCheckRefusesAPlanTheNodeCannotHold) {
  std::unique_ptr<Comm> comm = make_comm();
  const int64_t available = host_memory_available();
  if (available < 0) GTEST_SKIP() << "no MemAvailable on this system";
  gpu::ZeroMemoryPlan plan;
  plan.host_state = size_t(available) + (size_t(1) << 30);
  try {
    gpu::check_host_memory(plan, *comm);
    ADD_FAILURE() << "a plan 1 GiB above MemAvailable was accepted";
  } catch (const ConfigError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("host memory: this run needs"), std::string::npos) << what;
    EXPECT_NE(what.find("--host-grad-dtype bf16"), std::string::npos) << what;
  }
  plan.host_state = size_t(1) << 20;
  EXPECT_NO_THROW(gpu::check_host_memory(plan, *comm));
}
