// Sharded training under mpirun -np 1/2/3/4 (oversubscribed; the parameter count does not divide
// evenly by 3 or 4, so shards are padded).
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "io/checkpoint.hpp"
#include "io/safetensors.hpp"
#include "src/cli/commands.hpp"
#include "src/comm/comm.hpp"
#include "src/comm/serial_comm.hpp"
#include "src/data/builtin_task.hpp"
#include "src/data/global_batch.hpp"
#include "src/model/hf_adapter.hpp"
#include "src/train/sharded_state.hpp"
#include "src/train/train_config.hpp"
#include "src/train/train_step.hpp"
#include "src/train/trainer.hpp"
#include "tests/test_paths.hpp"

namespace fs = std::filesystem;
using namespace longtune;

namespace {

double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// A run directory shared by all ranks (rank 0 picks the name).
std::string shared_dir(Comm& comm, const std::string& tag) {
  char name[256] = {0};
  if (comm.rank() == 0) {
    const fs::path p = fs::temp_directory_path() / ("lt-mpi-" + tag + "-" + std::to_string(::getpid()));
    fs::remove_all(p);
    std::snprintf(name, sizeof name, "%s", p.c_str());
  }
  comm.broadcast(name, sizeof name, 0);
  return name;
}

TrainConfig small_config(const std::string& run_dir, int64_t steps, int64_t grad_accum) {
  std::vector<std::string> words = {"train", "--seq-len", "96", "--micro-batch", "1", "--grad-accum",
                                    std::to_string(grad_accum), "--steps", std::to_string(steps), "--warmup-steps",
                                    "1", "--run-dir", run_dir, "--log-every", "1000", "--eval-every", "-1", "--clip", "0.5",
                                    "--weight-decay", "0.1"};
  std::vector<char*> argv;
  for (auto& w : words) argv.push_back(w.data());
  TrainConfig cfg;
  EXPECT_TRUE(parse_train_config(int(argv.size()), argv.data(), &cfg));
  return cfg;
}

// small_config on a Hugging Face model directory and a token dataset.
TrainConfig hf_config(const std::string& run_dir, const std::string& model_dir, int64_t steps, int64_t grad_accum) {
  const std::string data = (test::fixture_dir() / "tiny_dataset.h5").string();
  std::vector<std::string> words = {"train", "--model-dir", model_dir, "--data", data, "--seq-len", "32",
                                    "--micro-batch", "1", "--grad-accum", std::to_string(grad_accum), "--steps",
                                    std::to_string(steps), "--warmup-steps", "1", "--lr", "1e-3", "--run-dir", run_dir,
                                    "--log-every", "1000", "--eval-every", "-1"};
  std::vector<char*> argv;
  for (auto& w : words) argv.push_back(w.data());
  TrainConfig cfg;
  EXPECT_TRUE(parse_train_config(int(argv.size()), argv.data(), &cfg));
  return cfg;
}

std::vector<float> latest_master(const std::string& run_dir) {
  std::vector<std::string> warnings;
  auto ref = find_latest_checkpoint(run_dir + "/ckpt", &warnings);
  EXPECT_TRUE(ref.has_value());
  std::vector<float> m(size_t(ref->total_len));
  read_shard(*ref, 0, ref->total_len, m.data(), nullptr, nullptr);
  return m;
}

}  // namespace

// Splitting one global batch of 12 micro-batches as ranks x accumulation (1x12, 2x6, 3x4, 4x3)
// gives the weights of the single-process step (train_step over all 12), up to float rounding.
TEST(ShardedTraining, RanksTimesAccumulationEqualsSingleProcess) {
  auto comm = make_comm();
  const int world = comm->size();
  ASSERT_EQ(12 % world, 0);
  const int64_t accum = 12 / world;
  const LlamaConfig cfg = builtin_model_config();
  const ParamTable table(cfg);
  const TokenDataset data = builtin_dataset(60, 11);
  std::vector<float> init(size_t(table.total_elements()), 0.0f);
  builtin_init_weights(cfg, table, 7, init.data());
  AdamWConfig adamw;
  adamw.lr = 3e-3;
  adamw.weight_decay = 0.1;
  adamw.clip = 0.5;  // active: the first steps' norms are larger

  // Sharded.
  LlamaCpu model(cfg, table);
  ShardedTrainState state(table, *comm, adamw);
  state.load_full(init.data());
  GlobalBatchStream stream(data, 96, 1, accum, world, comm->rank(), 3, true);
  std::vector<double> losses;
  for (int64_t step = 1; step <= 3; ++step) {
    const RankBatch b = stream.next();
    losses.push_back(sharded_train_step(model, state, b.micro_batches, b.global_targets, step, adamw.lr).loss.mean());
  }
  const std::vector<float> sharded = state.gather_full();

  // Single process, the same global batches.
  HostTrainState single(table, adamw);
  std::copy(init.begin(), init.end(), single.master());
  GlobalBatchStream all(data, 96, 1, 12, 1, 0, 3, true);
  for (int64_t step = 1; step <= 3; ++step) {
    const RankBatch b = all.next();
    const StepResult r = train_step(model, single, b.micro_batches, step, adamw.lr);
    EXPECT_NEAR(r.loss.mean(), losses[size_t(step - 1)], 1e-5 * r.loss.mean());
    if (step == 1) {
      EXPECT_LT(r.optim.clip_coef, 1.0f) << "clipping should be active";
    }
  }
  const std::vector<float> ref(single.master(), single.master() + table.total_elements());
  const double err = rel_error(sharded, ref);
  if (comm->rank() == 0) std::printf("[sharded] world %d x accum %lld: weights rel error %.2e\n", world, (long long)accum, err);
  EXPECT_LT(err, 1e-6);
}

// N steps straight and N/2 + stop + resume end with byte-identical weights, under MPI.
TEST(ShardedTraining, ResumeAtSameWorldSizeIsBitExact) {
  auto comm = make_comm();
  const std::string a = shared_dir(*comm, "straight"), b = shared_dir(*comm, "resumed");
  Trainer(small_config(a, 6, 2), *comm).run();
  TrainConfig first = small_config(b, 6, 2);
  first.stop_after = 3;
  Trainer(first, *comm).run();
  Trainer(small_config(b, 6, 2), *comm).run();
  comm->barrier();
  const auto wa = latest_master(a), wb = latest_master(b);
  ASSERT_EQ(wa.size(), wb.size());
  EXPECT_EQ(0, std::memcmp(wa.data(), wb.data(), wa.size() * sizeof(float)));
  comm->barrier();
  if (comm->rank() == 0) {
    // Export consolidates the shards of this world size into one HF directory.
    std::vector<std::string> words = {"export", "--run-dir", b, "--out", b + "/hf", "--dtype", "fp32"};
    std::vector<char*> argv;
    for (auto& w : words) argv.push_back(w.data());
    ASSERT_EQ(cli::run_export(int(argv.size()), argv.data()), 0);
    const ParamTable table(builtin_model_config());
    SafetensorsDir st(b + "/hf");
    for (const ParamEntry& e : table.entries()) {
      std::vector<float> got(size_t(e.numel));
      st.read_f32(e.name, e.shape, got.data());
      EXPECT_EQ(0, std::memcmp(got.data(), wb.data() + e.offset, got.size() * sizeof(float))) << e.name;
    }
    fs::remove_all(a);
    fs::remove_all(b);
  }
}

// A checkpoint written by one process is resumed by all ranks (and one written by all ranks by
// one process): the run continues to the same weights up to rounding.
TEST(ShardedTraining, ResumeAtAnotherWorldSizeReshards) {
  auto comm = make_comm();
  const int world = comm->size();
  const int64_t accum = 12 / world;
  const std::string ref_dir = shared_dir(*comm, "ref"), up = shared_dir(*comm, "up"), down = shared_dir(*comm, "down");
  if (comm->rank() == 0) {
    SerialComm one;
    Trainer(small_config(ref_dir, 6, 12), one).run();  // uninterrupted, one process
    TrainConfig c = small_config(up, 6, 12);
    c.stop_after = 3;
    Trainer(c, one).run();  // first half on one process
  }
  comm->barrier();
  Trainer(small_config(up, 6, accum), *comm).run();  // second half on all ranks

  TrainConfig c = small_config(down, 6, accum);
  c.stop_after = 3;
  Trainer(c, *comm).run();  // first half on all ranks
  comm->barrier();
  if (comm->rank() == 0) {
    SerialComm one;
    Trainer(small_config(down, 6, 12), one).run();  // second half on one process
    const auto ref = latest_master(ref_dir);
    const double e_up = rel_error(latest_master(up), ref), e_down = rel_error(latest_master(down), ref);
    std::printf("[sharded] reshard 1 -> %d ranks: rel error %.2e; %d -> 1: %.2e\n", world, e_up, world, e_down);
    EXPECT_LT(e_up, 1e-6);
    EXPECT_LT(e_down, 1e-6);
    fs::remove_all(ref_dir);
    fs::remove_all(up);
    fs::remove_all(down);
  }
  comm->barrier();
}

// Every rank reads only its shard of a Hugging Face model (load_range + load_hf_weights_range);
// the shards put together are the full load, and the world-size padding is zero.
TEST(ShardedTraining, HfWeightsLoadedPerShardEqualFullLoad) {
  auto comm = make_comm();
  for (const char* name : {"mha_tied", "gqa_untied"}) {
    SCOPED_TRACE(name);
    const std::string dir = (test::fixture_dir() / "golden" / name).string();
    const LlamaConfig cfg = load_hf_model_config(dir);
    const ParamTable table(cfg);
    ShardedTrainState state(table, *comm, AdamWConfig{});
    std::fill_n(state.master(), state.shard_len(), 1.0f);  // the padding must be rewritten
    const SafetensorsDir st(dir);
    state.load_range(
        [&](int64_t begin, int64_t end, float* dst) { load_hf_weights_range(st, table, begin, end, dst); });
    for (int64_t i = state.shard_data_len(); i < state.shard_len(); ++i) ASSERT_EQ(state.master()[i], 0.0f) << i;
    const std::vector<float> gathered = state.gather_full();
    std::vector<float> full(size_t(table.total_elements()));
    load_hf_weights(st, table, full.data());
    ASSERT_EQ(gathered.size(), full.size());
    EXPECT_EQ(0, std::memcmp(gathered.data(), full.data(), full.size() * sizeof(float)));
  }
}

// The trainer on a Hugging Face model (each rank loading its shard) trains to the weights of the
// single-process run on the same global batches, up to rounding.
TEST(ShardedTraining, HfModelRanksEqualSingleProcess) {
  auto comm = make_comm();
  const int world = comm->size();
  const int64_t accum = 12 / world;
  const std::string model = (test::fixture_dir() / "golden" / "gqa_untied").string();
  const std::string ref_dir = shared_dir(*comm, "hf-ref"), run = shared_dir(*comm, "hf-ranks");
  if (comm->rank() == 0) {
    SerialComm one;
    Trainer(hf_config(ref_dir, model, 3, 12), one).run();
  }
  comm->barrier();
  Trainer(hf_config(run, model, 3, accum), *comm).run();
  comm->barrier();
  if (comm->rank() == 0) {
    const double err = rel_error(latest_master(run), latest_master(ref_dir));
    std::printf("[sharded] HF model, world %d x accum %lld: weights rel error %.2e\n", world, (long long)accum, err);
    EXPECT_LT(err, 1e-6);
    fs::remove_all(ref_dir);
    fs::remove_all(run);
  }
  comm->barrier();
}
