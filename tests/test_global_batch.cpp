// The global batch and its per-rank partition (no MPI: ranks are simulated in one process).
#include <gtest/gtest.h>

#include <cmath>

#include "src/data/builtin_task.hpp"
#include "src/data/global_batch.hpp"
#include "src/model/llama_cpu.hpp"

using namespace longtune;

namespace {

TokenDataset small_data() { return builtin_dataset(40, 5); }

bool same(const PackedBatch& a, const PackedBatch& b) {
  return a.tokens == b.tokens && a.targets == b.targets && a.positions == b.positions && a.cu_seqlens == b.cu_seqlens;
}

}  // namespace

TEST(GlobalBatch, RankSharesTileTheSingleRankStream) {
  const TokenDataset data = small_data();
  for (const auto& [world, accum] : {std::pair{2, 2}, std::pair{4, 1}, std::pair{3, 2}}) {
    SCOPED_TRACE("world " + std::to_string(world) + " x accum " + std::to_string(accum));
    GlobalBatchStream single(data, 128, 2, int64_t(world) * accum, 1, 0, 9, true);
    std::vector<GlobalBatchStream> ranks;
    for (int r = 0; r < world; ++r) ranks.emplace_back(data, 128, 2, accum, world, r, 9, true);
    for (int step = 0; step < 40; ++step) {  // crosses epoch boundaries
      const RankBatch all = single.next();
      size_t k = 0;
      for (int r = 0; r < world; ++r) {
        const RankBatch mine = ranks[size_t(r)].next();
        EXPECT_EQ(mine.global_targets, all.global_targets);
        EXPECT_EQ(mine.global_tokens, all.global_tokens);
        ASSERT_EQ(mine.micro_batches.size(), size_t(accum));
        for (const PackedBatch& b : mine.micro_batches) EXPECT_TRUE(same(b, all.micro_batches[k++]));
        EXPECT_EQ(ranks[size_t(r)].cursor().epoch, single.cursor().epoch);
        EXPECT_EQ(ranks[size_t(r)].cursor().packer, single.cursor().packer);
      }
    }
    EXPECT_GT(single.cursor().epoch, 0);
  }
}

TEST(GlobalBatch, CursorRestoresTheStreamExactly) {
  const TokenDataset data = small_data();
  GlobalBatchStream a(data, 96, 3, 2, 1, 0, 4, true);
  for (int i = 0; i < 7; ++i) a.next();
  GlobalBatchStream b(data, 96, 3, 2, 1, 0, 4, true);
  b.set_cursor(a.cursor());
  for (int i = 0; i < 10; ++i) {
    const RankBatch x = a.next(), y = b.next();
    ASSERT_EQ(x.micro_batches.size(), y.micro_batches.size());
    for (size_t j = 0; j < x.micro_batches.size(); ++j) EXPECT_TRUE(same(x.micro_batches[j], y.micro_batches[j]));
  }
}

// The loss rule: summing the ranks' gradients (each scaled by 1 / global targets) gives the
// single-process gradient of the global mean loss, for any split.
TEST(GlobalBatch, SummedRankGradientsEqualTheSingleProcessGradient) {
  const TokenDataset data = small_data();
  const LlamaConfig cfg = builtin_model_config();
  const ParamTable table(cfg);
  std::vector<float> params(size_t(table.total_elements()), 0.0f);
  builtin_init_weights(cfg, table, 3, params.data());
  LlamaCpu model(cfg, table);

  auto grads_for = [&](int world, int64_t accum) {
    std::vector<double> total(params.size(), 0.0);
    for (int r = 0; r < world; ++r) {
      GlobalBatchStream s(data, 128, 1, accum, world, r, 2, true);
      const RankBatch rb = s.next();
      std::vector<float> g(params.size(), 0.0f);
      for (const PackedBatch& b : rb.micro_batches)
        model.forward_backward(params.data(), g.data(), b, 1.0 / double(rb.global_targets));
      for (size_t i = 0; i < g.size(); ++i) total[i] += g[i];
    }
    return total;
  };
  const auto ref = grads_for(1, 4);
  for (const auto& [world, accum] : {std::pair{2, int64_t(2)}, std::pair{4, int64_t(1)}}) {
    const auto got = grads_for(world, accum);
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      num += (got[i] - ref[i]) * (got[i] - ref[i]);
      den += ref[i] * ref[i];
    }
    EXPECT_LT(std::sqrt(num / den), 1e-6) << world << " x " << accum;
  }
}
