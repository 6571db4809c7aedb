#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "io/checkpoint.hpp"
#include "io/hf_config.hpp"
#include "src/cli/commands.hpp"
#include "src/cli/options.hpp"
#include "src/common/error.hpp"
#include "src/model/hf_adapter.hpp"

namespace fs = std::filesystem;
namespace po = boost::program_options;

namespace longtune::cli {

namespace {

// The value of `key = value` in the [model] section of a resolved INI config, or "".
std::string ini_value(const std::string& ini, const std::string& key) {
  std::istringstream in(ini);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) {
      const auto eq = line.find('=');
      if (eq == std::string::npos) continue;
      std::string v = line.substr(eq + 1);
      v.erase(0, v.find_first_not_of(' '));
      return v;
    }
  }
  return "";
}

}  // namespace

int run_export(int argc, char** argv) {
  po::options_description desc(
      "longtune export: write a checkpoint as a Hugging Face model directory (config.json,\n"
      "safetensors, tokenizer files of the source model) that transformers loads.\n\nOptions");
  std::string run_dir, checkpoint, out, dtype_name;
  uint64_t shard_mib = 5120;
  desc.add_options()
      ("help,h", "show this help")
      ("run-dir", po::value(&run_dir), "run directory of `longtune train` (its newest checkpoint is exported)")
      ("checkpoint", po::value(&checkpoint), "a checkpoint directory (step-XXXXXXXX) instead of the newest")
      ("out", po::value(&out), "output directory (must not exist or be empty)")
      ("dtype", po::value(&dtype_name)->default_value("bf16"), "bf16, fp16 or fp32")
      ("max-shard-mib", po::value(&shard_mib)->default_value(5120), "largest safetensors shard");
  po::variables_map vm;
  if (!parse_command_line(argc, argv, desc, vm)) return 0;  // --help
  if (out.empty()) throw ConfigError("--out: expected an output directory, got none");
  if (run_dir.empty() && checkpoint.empty()) throw ConfigError("--run-dir: expected a run directory or --checkpoint");
  DType dtype;
  if (dtype_name == "bf16") dtype = DType::BF16;
  else if (dtype_name == "fp16") dtype = DType::F16;
  else if (dtype_name == "fp32") dtype = DType::F32;
  else throw ConfigError("--dtype: expected bf16, fp16 or fp32, got '" + dtype_name + "'");
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    throw ConfigError(out + ": out: expected a new or empty directory, got an existing one (nothing is overwritten)");

  std::optional<CheckpointRef> ref;
  std::vector<std::string> warnings;
  if (!checkpoint.empty()) {
    ref = open_checkpoint(checkpoint);
  } else {
    ref = find_latest_checkpoint((fs::path(run_dir) / "ckpt").string(), &warnings);
    for (const auto& w : warnings) std::fprintf(stderr, "[export] warning: %s\n", w.c_str());
    if (!ref) throw InputError(run_dir, "ckpt", "a complete checkpoint", "none");
  }
  if (run_dir.empty()) run_dir = fs::path(ref->dir).parent_path().parent_path().string();
  const TrainerState ts = read_trainer_state(*ref);
  const LlamaConfig cfg = load_hf_config((fs::path(run_dir) / "model_config.json").string());
  const ParamTable table(cfg);
  check_param_table(*ref, table);
  std::vector<float> master(size_t(table.total_elements())), m(master.size()), v(master.size());
  read_shard(*ref, 0, table.total_elements(), master.data(), m.data(), v.data());

  // Written beside the target and renamed into place, so a failed export leaves nothing behind.
  const fs::path target = fs::absolute(out);
  const fs::path tmp = target.parent_path() / (target.filename().string() + ".tmp-export");
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  save_hf_model(tmp.string(), cfg, table, master.data(), dtype, shard_mib << 20);
  const std::string source = ini_value(ts.resolved_config, "model-dir");
  int copied = 0;
  for (const char* name : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                           "generation_config.json"}) {
    if (!source.empty() && fs::exists(fs::path(source) / name)) {
      fs::copy_file(fs::path(source) / name, tmp / name);
      ++copied;
    }
  }
  if (fs::exists(target)) fs::remove(target);  // an empty directory (checked above)
  fs::rename(tmp, target);
  std::printf("[export] step %lld of %s -> %s (%s, %lld parameters, %d tokenizer/generation files copied)\n",
              (long long)ts.step, ref->dir.c_str(), target.c_str(), dtype_name.c_str(),
              (long long)table.num_parameters(), copied);
  return 0;
}

}  // namespace longtune::cli
