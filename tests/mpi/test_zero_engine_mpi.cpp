// The sharded GPU engine (src/gpu/zero_engine.hpp) on several ranks, one GPU each (NCCL), against
// the single-GPU engine run on every rank with the whole global batch: each rank trains on one copy
// of the golden batch, the reference accumulates `world` copies. Gradients are summed in another
// order (NCCL's reduction vs one accumulator), so updates agree to float rounding, not bit for bit.
// Every placement of the optimizer (GPU, host) and of the weights (resident, streamed) is run.
// Skipped on every rank together when a node has fewer visible GPUs than ranks (CI has none).
#if LONGTUNE_HAVE_CUDA
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.cuh"
#include "src/comm/comm.hpp"
#include "src/gpu/gpu_engine.hpp"
#include "src/gpu/zero_engine.hpp"
#include "src/optim/kokkos_scope.hpp"
#include "src/train/sharded_state.hpp"
#include "tests/golden_fixture.hpp"

namespace longtune {
namespace {

const char* kCase = "gqa_hd64_gpu";

gpu::GpuModelOptions model_options(int64_t max_tokens) {
  gpu::GpuModelOptions o;
  o.compute_dtype = DType::BF16;
  o.recompute = gpu::Recompute::kLayer;
  o.max_tokens = max_tokens;
  o.loss_chunk = 64;
  return o;
}

double rel_update(const std::vector<float>& a, const std::vector<float>& b, const std::vector<float>& init) {
  double num = 0, den = 0;
  for (size_t i = 0; i < init.size(); ++i) {
    const double da = double(a[i]) - init[i], db = double(b[i]) - init[i];
    num += (da - db) * (da - db);
    den += db * db;
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

TEST(ZeroEngineMpi, FollowsTheSingleGpuEngineOnTheWholeBatch) {
  std::unique_ptr<Comm> comm = make_comm();
  double missing = cuda::device_count() <= comm->local_rank() ? 1.0 : 0.0;
  comm->all_reduce_max(&missing, 1);
  if (missing != 0.0) GTEST_SKIP() << "fewer visible CUDA GPUs than ranks on a node";
  CUDA_CHECK(cudaSetDevice(comm->local_rank()));
  const KokkosScope kokkos;
  const int world = comm->size();
  const test::GoldenModel g = test::load_golden_model(kCase);
  const PackedBatch batch = test::load_batch(test::golden_dir() / kCase / "batch.json");
  AdamWConfig a;
  a.lr = 1e-3;
  a.weight_decay = 0.1;
  a.clip = 0.05;  // every step clips: the global norm must be the all-reduced one
  const int steps = 3;
  const int64_t global_targets = batch.num_targets() * world;

  std::vector<float> ref(g.weights.size());
  std::vector<double> ref_losses;
  {
    gpu::GpuEngineOptions o;
    o.model = model_options(batch.num_tokens());
    gpu::GpuEngine engine(g.cfg, *g.table, a, o);
    engine.upload_state(g.weights.data(), nullptr, nullptr);
    for (int s = 1; s <= steps; ++s) {
      LossSum l;
      for (int k = 0; k < world; ++k) l += engine.accumulate(batch, global_targets);
      engine.optimizer_step(s, a.lr);
      ref_losses.push_back(l.mean());
    }
    engine.download_state(ref.data(), nullptr, nullptr);
  }

  struct Case {
    gpu::OptimizerPlace optimizer;
    gpu::WeightPlace weights;
    const char* name;
  };
  for (const Case& c : {Case{gpu::OptimizerPlace::kDevice, gpu::WeightPlace::kResident, "GPU optimizer, resident"},
                        Case{gpu::OptimizerPlace::kDevice, gpu::WeightPlace::kStreamed, "GPU optimizer, streamed"},
                        Case{gpu::OptimizerPlace::kHost, gpu::WeightPlace::kResident, "host optimizer, resident"},
                        Case{gpu::OptimizerPlace::kHost, gpu::WeightPlace::kStreamed, "host optimizer, streamed"}}) {
    SCOPED_TRACE(c.name);
    ShardedTrainState state(*g.table, *comm, a);
    state.load_full(g.weights.data());
    gpu::ZeroEngineOptions o;
    o.model = model_options(batch.num_tokens());
    o.optimizer = c.optimizer;
    o.weights = c.weights;
    gpu::ZeroEngine engine(g.cfg, *g.table, a, o, state);
    const std::vector<PackedBatch> mbs = {batch};
    for (int s = 1; s <= steps; ++s) {
      LossSum l;
      ASSERT_FALSE(engine.train_step(mbs, global_targets, s, a.lr, &l).skipped);
      EXPECT_NEAR(l.mean(), ref_losses[size_t(s - 1)], 1e-5 * ref_losses[size_t(s - 1)]) << "step " << s;
    }
    engine.sync_state();
    const std::vector<float> full = state.gather_full();
    const double err = rel_update(full, ref, g.weights);
    if (comm->rank() == 0)
      std::printf("[zero-mpi] %d ranks, %s: update rel %.2e vs one GPU on the whole batch\n", world, c.name, err);
    EXPECT_LT(err, 1e-4);
  }
}

}  // namespace
}  // namespace longtune
#endif  // LONGTUNE_HAVE_CUDA
