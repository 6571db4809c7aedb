// End-to-end training golden tests: several AdamW steps of the CPU engine (train_step on a
// HostTrainState, the code `longtune train` runs) on the golden fixture models, the same batch
// every step, with gradient clipping and weight decay active, against transformers +
// torch.optim.AdamW in float64 (tests/golden/generate_training.py writes training.json and
// training.safetensors next to a case).
//
// TrainingGolden.StepsMatchTorchAdamW: per-step loss and pre-clip gradient norm 1e-5 relative;
// the fp32 export (save_hf_model), read back with the real safetensors reader, 1e-5 relative per
// tensor (||ours - ref|| / ||ref||); the update itself (params - initial) is reported and held to
// 1e-3 relative (see kUpdateTol).
// TrainingGolden.ExportLoadsInTransformers: the export plus the logits longtune computes with the
// trained weights go to tests/golden/check_export.py, which loads the directory with
// transformers (float64) and compares the logits (1e-5 relative). The interpreter is
// LONGTUNE_PYTHON, else `python3`; the test skips when `python3` is missing or lacks torch +
// transformers (CI), and fails when the LONGTUNE_PYTHON one does.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "io/safetensors.hpp"
#include "src/model/hf_adapter.hpp"
#include "src/model/llama_cpu.hpp"
#include "src/optim/adamw.hpp"
#include "src/optim/kokkos_scope.hpp"
#include "src/train/train_step.hpp"
#include "tests/golden_fixture.hpp"

namespace fs = std::filesystem;
using namespace longtune;

namespace {

// Kokkos is initialized once for the test program: tests/test_environment.cpp.

constexpr double kTol = 1e-5;  // loss, grad norm, exported parameters, logits (the bound)
// The update (params after K steps - initial params) is 0.8-14 % of a tensor's norm, so the 1e-5
// bound on the parameters alone allows up to ~1.3e-3 relative error in the smallest update. The
// update is held to 1e-3 for every tensor; measured <= 2e-5 (torch's own fp32 run of the same
// training, the control in generate_training.py, lands at <= 5e-5). fp32 and float64 differ most
// in elements whose gradient is near eps, where Adam's lr * m / (sqrt(v) + eps) has slope up to
// lr / eps (why the fixtures use eps 1e-6, see tests/golden/README.md).
constexpr double kUpdateTol = 1e-3;

using longtune::test::golden_dir;
using longtune::test::load_batch;
using longtune::test::read_f64;

double rel(double a, double b) { return std::abs(a - b) / std::abs(b); }

// ||(a - base) - (b - base)|| / ||b - base|| with base = nullptr meaning 0.
double rel_error(const float* a, const std::vector<double>& b, const float* base = nullptr) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    const double o = base ? double(base[i]) : 0.0;
    const double x = double(a[i]) - o, y = b[i] - o;
    num += (x - y) * (x - y);
    den += y * y;
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

struct TrainingCase {
  fs::path dir;
  int steps = 0;
  AdamWConfig adamw;
};

TrainingCase read_training_json(const fs::path& dir) {
  std::ifstream in(dir / "training.json");
  const auto j = nlohmann::json::parse(in);
  TrainingCase c;
  c.dir = dir;
  c.steps = j.at("steps").get<int>();
  c.adamw.lr = j.at("lr").get<double>();
  c.adamw.beta1 = j.at("betas").at(0).get<double>();
  c.adamw.beta2 = j.at("betas").at(1).get<double>();
  c.adamw.eps = j.at("eps").get<double>();
  c.adamw.weight_decay = j.at("weight_decay").get<double>();
  c.adamw.clip = j.at("clip").get<double>();
  return c;
}

std::vector<TrainingCase> training_cases() {
  std::vector<TrainingCase> cases;
  if (fs::exists(golden_dir()))
    for (const auto& entry : fs::directory_iterator(golden_dir()))
      if (entry.is_directory() && fs::exists(entry.path() / "training.json"))
        cases.push_back(read_training_json(entry.path()));
  std::sort(cases.begin(), cases.end(), [](const auto& a, const auto& b) { return a.dir < b.dir; });
  return cases;
}

// A case trained for its K steps with train_step; the step results and the initial weights kept.
struct Trained {
  LlamaConfig cfg;
  std::unique_ptr<ParamTable> table;
  std::unique_ptr<HostTrainState> state;
  std::unique_ptr<LlamaCpu> model;
  std::vector<float> initial;
  PackedBatch batch;
  std::vector<StepResult> steps;
};

Trained train(const TrainingCase& c) {
  Trained t;
  t.cfg = load_hf_model_config(c.dir.string());
  t.table = std::make_unique<ParamTable>(t.cfg);
  t.state = std::make_unique<HostTrainState>(*t.table, c.adamw);
  load_hf_weights(SafetensorsDir(c.dir.string()), *t.table, t.state->master());
  t.initial.assign(t.state->master(), t.state->master() + t.state->length());
  t.batch = load_batch(c.dir / "batch.json");
  t.model = std::make_unique<LlamaCpu>(t.cfg, *t.table);
  const std::vector<PackedBatch> micro{t.batch};
  for (int k = 1; k <= c.steps; ++k) t.steps.push_back(train_step(*t.model, *t.state, micro, k, c.adamw.lr));
  return t;
}

// A fresh temporary directory for this process.
fs::path temp_dir(const std::string& tag) {
  const fs::path p = fs::temp_directory_path() / ("longtune_training_golden_" + std::to_string(::getpid()) + "_" + tag);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

}  // namespace

TEST(TrainingGolden, StepsMatchTorchAdamW) {
  const auto cases = training_cases();
  ASSERT_GE(cases.size(), 2u) << "training fixtures missing in " << golden_dir();
  const fs::path tmp = temp_dir("steps");
  for (const TrainingCase& c : cases) {
    const std::string name = c.dir.filename().string();
    SCOPED_TRACE(name);
    ASSERT_GE(c.steps, 1);
    EXPECT_GT(c.adamw.weight_decay, 0.0);
    EXPECT_GT(c.adamw.clip, 0.0);
    const SafetensorsFile ref((c.dir / "training.safetensors").string());
    const std::vector<double> ref_loss = read_f64(ref, "loss"), ref_norm = read_f64(ref, "grad_norm");
    ASSERT_EQ(ref_loss.size(), size_t(c.steps));
    ASSERT_EQ(ref_norm.size(), size_t(c.steps));

    const Trained t = train(c);
    double worst_loss = 0, worst_norm = 0;
    int clipped = 0;
    for (int k = 0; k < c.steps; ++k) {
      const StepResult& s = t.steps[size_t(k)];
      ASSERT_FALSE(s.skipped);
      const double el = rel(s.loss.mean(), ref_loss[size_t(k)]), en = rel(s.optim.grad_norm, ref_norm[size_t(k)]);
      worst_loss = std::max(worst_loss, el);
      worst_norm = std::max(worst_norm, en);
      EXPECT_LE(el, kTol) << "loss of step " << k + 1;
      EXPECT_LE(en, kTol) << "grad norm of step " << k + 1;
      // The reference clips exactly where its pre-clip norm exceeds the threshold (the fixture
      // keeps every norm >= 1 % away from it), and so must we.
      EXPECT_EQ(s.optim.clip_coef < 1.0f, ref_norm[size_t(k)] > c.adamw.clip) << "step " << k + 1;
      clipped += s.optim.clip_coef < 1.0f;
      std::printf("[training] %-12s step %d  loss %.6f (ref %.6f)  grad norm %.6f (ref %.6f)  clip coef %.4f\n",
                  name.c_str(), k + 1, s.loss.mean(), ref_loss[size_t(k)], s.optim.grad_norm, ref_norm[size_t(k)],
                  double(s.optim.clip_coef));
    }
    EXPECT_GE(clipped, 1) << "clipping never active: the fixture does not test it";

    // Export in fp32 and read it back with the real reader.
    const fs::path out = tmp / name;
    save_hf_model(out.string(), t.cfg, *t.table, t.state->master(), DType::F32);
    const SafetensorsDir exported(out.string());
    std::set<std::string> want;
    for (const ParamEntry& e : t.table->entries()) want.insert(e.name);
    const auto names = exported.names();
    EXPECT_EQ(std::set<std::string>(names.begin(), names.end()), want) << "exported tensor names";
    if (t.table->tied()) {
      EXPECT_EQ(exported.find("lm_head.weight"), nullptr);
    }

    double worst_p = 0, worst_u = 0;
    std::string worst_p_name, worst_u_name;
    for (const ParamEntry& e : t.table->entries()) {
      const TensorInfo* info = exported.find(e.name);
      ASSERT_NE(info, nullptr) << e.name;
      EXPECT_EQ(info->dtype, DType::F32) << e.name;
      std::vector<float> got(size_t(e.numel));
      exported.read_f32(e.name, e.shape, got.data());
      EXPECT_EQ(std::memcmp(got.data(), t.state->master() + e.offset, got.size() * sizeof(float)), 0)
          << e.name << ": the fp32 export is not the master weights";
      const std::vector<double> want_p = read_f64(ref, "param/" + e.name);
      ASSERT_EQ(want_p.size(), got.size()) << e.name;
      const double ep = rel_error(got.data(), want_p);
      const double eu = rel_error(got.data(), want_p, t.initial.data() + e.offset);
      EXPECT_LE(ep, kTol) << e.name;
      EXPECT_LE(eu, kUpdateTol) << e.name << " (update)";
      if (ep >= worst_p) {
        worst_p = ep;
        worst_p_name = e.name;
      }
      if (eu >= worst_u) {
        worst_u = eu;
        worst_u_name = e.name;
      }
    }
    std::printf("[training] %-12s %d steps, %d clipped: worst loss rel %.2e, worst grad norm rel %.2e\n", name.c_str(),
                c.steps, clipped, worst_loss, worst_norm);
    std::printf("[training] %-12s exported params: worst rel %.2e (%s); update: worst rel %.2e (%s)\n", name.c_str(),
                worst_p, worst_p_name.c_str(), worst_u, worst_u_name.c_str());
  }
  fs::remove_all(tmp);
}

TEST(TrainingGolden, ExportLoadsInTransformers) {
  const auto cases = training_cases();
  ASSERT_GE(cases.size(), 2u) << "training fixtures missing in " << golden_dir();
  const fs::path script = golden_dir().parent_path().parent_path() / "golden" / "check_export.py";
  ASSERT_TRUE(fs::exists(script)) << script;
  const fs::path tmp = temp_dir("export");
  std::string dirs;
  for (const TrainingCase& c : cases) {
    const std::string name = c.dir.filename().string();
    SCOPED_TRACE(name);
    Trained t = train(c);
    const fs::path out = tmp / name;
    save_hf_model(out.string(), t.cfg, *t.table, t.state->master(), DType::F32);
    // The logits of the trained model on the case's batch, for the script to compare.
    std::vector<float> logits(size_t(t.batch.num_tokens() * t.cfg.vocab_size));
    const LossSum loss = t.model->forward(t.state->master(), t.batch, logits.data());
    const float loss_f = float(loss.mean());
    write_safetensors((out / "longtune_logits.safetensors").string(),
                      {{"logits", {t.batch.num_tokens(), t.cfg.vocab_size}, logits.data(), DType::F32},
                       {"loss", {1}, &loss_f, DType::F32}});
    fs::copy_file(c.dir / "batch.json", out / "batch.json");
    dirs += " '" + out.string() + "'";
  }
  const char* env = std::getenv("LONGTUNE_PYTHON");
  const std::string python = env && *env ? env : "python3";
  const std::string cmd = "'" + python + "' '" + script.string() + "'" + dirs;
  std::printf("[training] %s\n", cmd.c_str());
  std::fflush(stdout);
  const int status = std::system(cmd.c_str());
  ASSERT_NE(status, -1) << "could not run " << cmd;
  ASSERT_TRUE(WIFEXITED(status)) << cmd << " did not exit normally (status " << status << ")";
  const int code = WEXITSTATUS(status);
  fs::remove_all(tmp);
  // Without LONGTUNE_PYTHON a missing interpreter or module skips (CI has no torch); an interpreter
  // named on purpose must work.
  const bool named = env && *env;
  if (code == 77 || code == 126 || code == 127) {
    const std::string why = code == 77 ? python + " has no torch + transformers" : "no Python interpreter " + python;
    if (named) FAIL() << why << " (LONGTUNE_PYTHON)";
    GTEST_SKIP() << why << " (set LONGTUNE_PYTHON to one that has them)";
  }
  EXPECT_EQ(code, 0) << cmd << ": transformers' logits on the export differ from longtune's (see above)";
}
