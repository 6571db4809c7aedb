// The training loop end to end on the built-in task: bit-exact resume, run-directory protection,
// configuration parsing and export.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "io/checkpoint.hpp"
#include "io/safetensors.hpp"
#include "src/cli/commands.hpp"
#include "src/comm/serial_comm.hpp"
#include "src/common/error.hpp"
#include "src/data/builtin_task.hpp"
#include "src/model/param_table.hpp"
#include "src/train/train_config.hpp"
#include "src/train/trainer.hpp"

namespace fs = std::filesystem;
using namespace longtune;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("lt-trainer-" + std::to_string(::getpid()) + "-" +
                                        std::to_string(counter()++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  static int& counter() {
    static int n = 0;
    return n;
  }
};

// Parses a command line given as one vector of words (argv[0] is the command name).
TrainConfig parse(std::vector<std::string> words) {
  words.insert(words.begin(), "train");
  std::vector<char*> argv;
  for (auto& w : words) argv.push_back(w.data());
  TrainConfig cfg;
  EXPECT_TRUE(parse_train_config(int(argv.size()), argv.data(), &cfg));
  return cfg;
}

std::string parse_error(std::vector<std::string> words) {
  try {
    parse(std::move(words));
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

// A small, fast run of the built-in task.
std::vector<std::string> small_run(const fs::path& run_dir, int steps) {
  return {"--seq-len", "96", "--micro-batch", "2", "--grad-accum", "2", "--steps", std::to_string(steps),
          "--warmup-steps", steps > 2 ? "2" : "0", "--run-dir", run_dir.string(), "--log-every", "100", "--eval-every", "-1"};
}

void train(std::vector<std::string> words) {
  SerialComm comm;
  Trainer(parse(std::move(words)), comm).run();
}

struct Flat {
  std::vector<float> master, m, v;
};
Flat read_latest(const fs::path& run_dir) {
  std::vector<std::string> warnings;
  auto ref = find_latest_checkpoint((run_dir / "ckpt").string(), &warnings);
  EXPECT_TRUE(ref.has_value());
  Flat f;
  f.master.resize(size_t(ref->total_len));
  f.m.resize(f.master.size());
  f.v.resize(f.master.size());
  read_shard(*ref, 0, ref->total_len, f.master.data(), f.m.data(), f.v.data());
  return f;
}

std::vector<std::string> with(std::vector<std::string> base, std::initializer_list<std::string> more) {
  base.insert(base.end(), more);
  return base;
}

}  // namespace

TEST(TrainerResume, InterruptedRunEndsBitIdenticalToUninterrupted) {
  TempDir a, b;
  train(small_run(a.path, 6));

  // Interrupted: checkpoints at 2 and 3, stop after 3; then lose checkpoint 3 (as if killed
  // while writing it), so the resume falls back to step 2 and repeats step 3.
  train(with(small_run(b.path, 6), {"--checkpoint-every", "2", "--stop-after", "3"}));
  fs::remove_all(b.path / "ckpt" / checkpoint_dir_name(3));
  train(small_run(b.path, 6));

  const Flat fa = read_latest(a.path), fb = read_latest(b.path);
  ASSERT_EQ(fa.master.size(), fb.master.size());
  EXPECT_EQ(0, std::memcmp(fa.master.data(), fb.master.data(), fa.master.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(fa.m.data(), fb.m.data(), fa.m.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(fa.v.data(), fb.v.data(), fa.v.size() * sizeof(float)));

  // metrics.jsonl holds each step once, in order, despite the repeated step 3.
  std::ifstream in(b.path / "metrics.jsonl");
  std::string line;
  int64_t expect = 1;
  while (std::getline(in, line)) {
    if (line.find("\"loss\":") == std::string::npos) continue;  // evaluation records
    EXPECT_NE(line.find("{\"step\":" + std::to_string(expect) + ","), std::string::npos) << line;
    ++expect;
  }
  EXPECT_EQ(expect, 7);
}

TEST(TrainerRunDir, RefusesAnotherRunsCheckpointsWithoutResume) {
  TempDir a;
  train(small_run(a.path, 1));
  try {
    train(with(small_run(a.path, 2), {"--resume", "none"}));
    FAIL() << "expected a refusal";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(a.path.string()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("run-dir"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(fs::exists(a.path / "ckpt" / checkpoint_dir_name(1)));  // nothing lost
}

TEST(TrainConfigParse, ConfigFileCommandLineOverridesAndErrors) {
  TempDir d;
  const fs::path ini = d.path / "run.cfg";
  std::ofstream(ini) << "[data]\nseq-len = 512\nmicro-batch = 3\n[optim]\nlr = 0.002\nschedule = linear\n";
  TrainConfig c = parse({"--config", ini.string(), "--micro-batch", "5"});
  EXPECT_EQ(c.seq_len, 512);
  EXPECT_EQ(c.micro_batch, 5);  // the command line wins
  EXPECT_DOUBLE_EQ(c.adamw.lr, 0.002);
  EXPECT_EQ(c.schedule, "linear");

  std::ofstream(ini) << "[data]\nseq-lenn = 512\n";
  std::string err = parse_error({"--config", ini.string()});
  EXPECT_NE(err.find(ini.string()), std::string::npos) << err;
  EXPECT_NE(err.find("did you mean data.seq-len"), std::string::npos) << err;

  std::ofstream(ini) << "[optim]\nseq-len = 512\n";  // right key, wrong section
  err = parse_error({"--config", ini.string()});
  EXPECT_NE(err.find("did you mean data.seq-len"), std::string::npos) << err;

  std::ofstream(ini) << "[optim]\nlr = fast\n";
  err = parse_error({"--config", ini.string()});
  EXPECT_NE(err.find(ini.string()), std::string::npos) << err;
  EXPECT_NE(err.find("lr"), std::string::npos) << err;

  EXPECT_NE(parse_error({"--lr", "-1"}).find("--lr: expected a positive number"), std::string::npos);
  EXPECT_NE(parse_error({"--schedule", "cosin"}).find("constant, cosine or linear"), std::string::npos);
  EXPECT_NE(parse_error({"--grad-reduce-dtype", "fp16"}).find("--grad-reduce-dtype: expected fp32 or bf16, got 'fp16'"),
            std::string::npos);
  EXPECT_NE(parse_error({"--seq-lenn", "5"}).find("did you mean --seq-len"), std::string::npos);
  EXPECT_NE(parse_error({"--data", "x.h5"}).find("--model-dir"), std::string::npos);
  EXPECT_NE(parse_error({"--model-dir", "m"}).find("--steps"), std::string::npos);
  EXPECT_NE(parse_error({"--config", (d.path / "missing.cfg").string()}).find("missing.cfg"), std::string::npos);
  EXPECT_NE(parse_error({"--mlp-chunk", "-1"}).find("--mlp-chunk: expected a token count >= 0"), std::string::npos);
  EXPECT_NE(parse_error({"--offload-activations", "true", "--recompute", "none"})
                .find("--offload-activations: expected --recompute layer or auto, got --recompute none"),
            std::string::npos);
}

TEST(TrainConfigParse, ResolvedIniParsesBackToTheSameConfig) {
  TempDir d;
  const TrainConfig c = parse({"--seq-len", "200", "--lr", "0.0007", "--shuffle", "false", "--steps", "9",
                               "--offload-activations", "true", "--mlp-chunk", "4096", "--grad-reduce-dtype", "bf16",
                               "--offload", "optimizer", "--host-grad-dtype", "bf16", "--host-weights", "master"});
  std::ofstream(d.path / "resolved.cfg") << to_ini(c);
  const TrainConfig back = parse({"--config", (d.path / "resolved.cfg").string()});
  EXPECT_EQ(back.grad_reduce_dtype, "bf16");
  EXPECT_EQ(to_ini(back), to_ini(c));
  EXPECT_TRUE(back.offload_activations);
  EXPECT_EQ(back.mlp_chunk, 4096);
}

TEST(Export, WritesTheCheckpointAsHfSafetensorsAndNeverOverwrites) {
  TempDir run, out;
  train(small_run(run.path, 2));
  const Flat f = read_latest(run.path);
  const fs::path dst = out.path / "hf";
  std::vector<std::string> words = {"export", "--run-dir", run.path.string(), "--out", dst.string(), "--dtype", "fp32"};
  std::vector<char*> argv;
  for (auto& w : words) argv.push_back(w.data());
  ASSERT_EQ(cli::run_export(int(argv.size()), argv.data()), 0);
  EXPECT_TRUE(fs::exists(dst / "config.json"));
  const ParamTable table(builtin_model_config());
  SafetensorsDir st(dst.string());
  for (const ParamEntry& e : table.entries()) {
    std::vector<float> got(size_t(e.numel));
    st.read_f32(e.name, e.shape, got.data());
    EXPECT_EQ(0, std::memcmp(got.data(), f.master.data() + e.offset, got.size() * sizeof(float))) << e.name;
  }
  // A second export to the same place is refused.
  EXPECT_THROW(cli::run_export(int(argv.size()), argv.data()), ConfigError);
}
