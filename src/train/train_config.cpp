#include "src/train/train_config.hpp"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include <boost/program_options.hpp>

#include "src/cli/options.hpp"
#include "src/common/error.hpp"
#include "src/data/builtin_task.hpp"

namespace po = boost::program_options;

namespace longtune {

namespace {

// Section of every option in a config file. The command line uses the bare name.
const std::map<std::string, std::string>& option_sections() {
  static const std::map<std::string, std::string> sections = {
      {"model-dir", "model"},       {"init-seed", "model"},
      {"data", "data"},             {"eval-data", "data"},        {"seq-len", "data"},
      {"micro-batch", "data"},      {"grad-accum", "data"},       {"shuffle", "data"},
      {"seed", "data"},
      {"lr", "optim"},              {"beta1", "optim"},           {"beta2", "optim"},
      {"eps", "optim"},             {"weight-decay", "optim"},    {"clip", "optim"},
      {"schedule", "optim"},        {"warmup-steps", "optim"},    {"min-lr-ratio", "optim"},
      {"steps", "train"},           {"run-dir", "train"},         {"checkpoint-every", "train"},
      {"keep-last", "train"},       {"resume", "train"},          {"eval-every", "train"},
      {"log-every", "train"},       {"threads", "train"},         {"stop-after", "train"},
      {"device", "gpu"},            {"dtype", "gpu"},             {"recompute", "gpu"},
      {"attention", "gpu"},         {"offload", "gpu"},           {"weights", "gpu"},
      {"gpu-mem-limit", "gpu"},     {"delayed-update", "gpu"},    {"host-grad-dtype", "gpu"},
      {"host-weights", "gpu"},
      {"offload-activations", "gpu"}, {"mlp-chunk", "gpu"}, {"grad-reduce-dtype", "gpu"},
  };
  return sections;
}

po::options_description make_description(TrainConfig* c) {
  po::options_description desc(
      "longtune train: full-parameter fine-tuning on the CPU or one GPU per rank.\n"
      "With no --model-dir / --data it trains the built-in tiny model on the built-in retrieval task.\n"
      "A config file (INI: [model] [data] [optim] [train] sections, keys as below) may hold any\n"
      "option; the command line overrides it.\n\nOptions");
  desc.add_options()
      ("help,h", "show this help")
      ("config", po::value<std::string>(), "INI config file")
      ("model-dir", po::value(&c->model_dir), "[model] Hugging Face model directory")
      ("init-seed", po::value(&c->init_seed), "[model] init seed of the built-in model (default 1234)")
      ("data", po::value(&c->data), "[data] HDF5 token dataset")
      ("eval-data", po::value(&c->eval_data), "[data] held-out HDF5 token dataset")
      ("seq-len", po::value(&c->seq_len), "[data] tokens per packed sequence")
      ("micro-batch", po::value(&c->micro_batch), "[data] sequences per forward/backward")
      ("grad-accum", po::value(&c->grad_accum), "[data] micro-batches per optimizer step")
      ("shuffle", po::value(&c->shuffle), "[data] shuffle documents by --seed (true/false, default true)")
      ("seed", po::value(&c->seed), "[data] seed of the document order (default 0)")
      ("lr", po::value(&c->adamw.lr), "[optim] peak learning rate")
      ("beta1", po::value(&c->adamw.beta1), "[optim] AdamW beta1 (default 0.9)")
      ("beta2", po::value(&c->adamw.beta2), "[optim] AdamW beta2 (default 0.95)")
      ("eps", po::value(&c->adamw.eps), "[optim] AdamW epsilon (default 1e-8)")
      ("weight-decay", po::value(&c->adamw.weight_decay), "[optim] decoupled weight decay on matrices")
      ("clip", po::value(&c->adamw.clip), "[optim] max global gradient norm; <= 0 disables")
      ("schedule", po::value(&c->schedule), "[optim] constant, cosine or linear (after warmup; default cosine, built-in task constant)")
      ("warmup-steps", po::value(&c->warmup_steps), "[optim] linear warmup steps")
      ("min-lr-ratio", po::value(&c->min_lr_ratio), "[optim] floor of the decay as a fraction of --lr")
      ("steps", po::value(&c->steps), "[train] optimizer steps")
      ("run-dir", po::value(&c->run_dir), "[train] run directory: config, metrics.jsonl, checkpoints")
      ("checkpoint-every", po::value(&c->checkpoint_every), "[train] checkpoint every N steps (0: at the end)")
      ("keep-last", po::value(&c->keep_last), "[train] complete checkpoints to keep (<= 0: all)")
      ("resume", po::value(&c->resume), "[train] auto (newest checkpoint of --run-dir), none, or a checkpoint path")
      ("eval-every", po::value(&c->eval_every), "[train] held-out evaluation every N steps (0: at the end only, -1: never)")
      ("log-every", po::value(&c->log_every), "[train] progress line every N steps")
      ("stop-after", po::value(&c->stop_after), "[train] stop this invocation after N steps, with a checkpoint (time-sliced jobs)")
      ("threads", po::value(&c->threads), "[train] host threads (0: OMP_NUM_THREADS or all cores)")
      ("device", po::value(&c->device), "[gpu] cpu or cuda (one GPU per rank; default cpu)")
      ("dtype", po::value(&c->dtype), "[gpu] GPU compute dtype: bf16 or fp16 (fp16: dynamic loss scaling, for V100)")
      ("recompute", po::value(&c->recompute), "[gpu] activations: none (keep all), layer (keep each layer's input and recompute), auto (none when it fits)")
      ("attention", po::value(&c->attention), "[gpu] attention kernel: auto, tensor-core (sm_80+), sm75 (fp16 with V100/T4-class instructions only), cudnn (cuDNN fused attention, sm_80+, not bit-reproducible)")
      ("offload", po::value(&c->offload), "[gpu] none, optimizer (fp32 master weights, AdamW moments and the CPU AdamW step in pinned host memory: ZeRO-Offload) or params (optimizer, and the compute weights streamed from the host per layer)")
      ("weights", po::value(&c->weights), "[gpu] resident (every GPU holds all compute weights) or streamed (each layer gathered from the ranks' shards just before use, ZeRO-3)")
      ("delayed-update", po::value(&c->delayed_update), "[gpu] with --offload optimizer: run step t's CPU update while the GPU computes step t + 1, whose gradients then see weights one step stale (ZeRO-Offload's DPU; true/false, default false)")
      ("grad-reduce-dtype", po::value(&c->grad_reduce_dtype), "[gpu] dtype of the gradient reduce-scatter between ranks: fp32 (default) or bf16 (half the bytes on the wire; the sum over ranks is rounded to bf16, more so with more ranks; one rank: unused)")
      ("gpu-mem-limit", po::value(&c->gpu_mem_limit), "[gpu] device memory this rank may use, e.g. 16GiB (emulates a smaller GPU; default: all)")
      ("host-grad-dtype", po::value(&c->host_grad_dtype), "[gpu] with --offload: the host gradient accumulator, fp32 (default) or bf16 (2 bytes per parameter less host memory and PCIe traffic; the update uses bf16-rounded gradients)")
      ("host-weights", po::value(&c->host_weights), "[gpu] with --offload: copy (default: a compute-dtype copy of the shard in pinned host memory feeds the GPU) or master (no copy: the fp32 master is fetched and converted on the GPU, 2 bytes per parameter less host memory, twice the fetch bytes)")
      ("offload-activations", po::value(&c->offload_activations), "[gpu] with --recompute layer or auto: keep the layers' saved inputs in pinned host memory, copied out in forward and prefetched in backward behind the compute (same results; true/false, default false; auto drops it when nothing is recomputed)")
      ("mlp-chunk", po::value(&c->mlp_chunk), "[gpu] with --recompute layer or auto: run the MLP over tiles of this many tokens, so its intermediates do not grow with the sequence (0: one tile, the default; e.g. 4096)");
  return desc;
}

// Reads an INI file into "--name=value" arguments for the flat description, so values from the
// file go through exactly the same parsing and checks as the command line.
std::vector<std::string> config_file_arguments(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError(path + ": config: expected a readable INI file, got cannot open it");
  po::options_description file_desc;
  for (const auto& [name, section] : option_sections())
    file_desc.add_options()((section + "." + name).c_str(), po::value<std::string>());
  po::parsed_options parsed(nullptr);
  try {
    parsed = po::parse_config_file(in, file_desc, /*allow_unregistered=*/true);
  } catch (const po::error& e) {
    throw ConfigError(path + ": expected INI syntax ([section] then key = value lines), got " + e.what());
  }
  std::vector<std::string> args;
  for (const auto& opt : parsed.options) {
    if (opt.unregistered) {
      // Suggest the closest section.key of all valid ones.
      po::options_description all;
      for (const auto& [name, section] : option_sections()) all.add_options()((section + "." + name).c_str(), "");
      throw ConfigError(path + ": unknown key '" + opt.string_key + "' (did you mean " +
                        cli::closest_option(opt.string_key, all) + "?)");
    }
    const std::string name = opt.string_key.substr(opt.string_key.find('.') + 1);
    for (const auto& v : opt.value) args.push_back("--" + name + "=" + v);
  }
  return args;
}

void require(bool ok, const std::string& option, const std::string& expected, const std::string& got) {
  if (!ok) throw ConfigError("--" + option + ": expected " + expected + ", got " + got);
}

std::string num(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace

bool parse_train_config(int argc, char** argv, TrainConfig* out) {
  TrainConfig c;
  po::options_description desc = make_description(&c);
  po::variables_map vm;
  // The command line is stored first, so it wins over the file.
  if (!cli::parse_command_line(argc, argv, desc, vm)) return false;  // --help
  if (vm.count("config")) {
    const std::string path = vm["config"].as<std::string>();
    std::vector<std::string> args = config_file_arguments(path);
    std::vector<char*> file_argv{argv[0]};
    for (auto& a : args) file_argv.push_back(a.data());
    try {
      po::store(po::command_line_parser(int(file_argv.size()), file_argv.data()).options(desc).run(), vm);
      po::notify(vm);
    } catch (const po::error& e) {
      throw ConfigError(path + ": " + e.what());
    }
  }
  auto unset = [&](const char* name) { return vm.count(name) == 0; };

  // Task defaults: the built-in task's tuned values, or conservative fine-tuning values.
  const bool builtin = c.builtin_model() && c.builtin_data();
  require(c.builtin_model() == c.builtin_data() || !c.builtin_model(), "data", "--model-dir as well (a dataset needs a model)",
          "--data without --model-dir");
  const BuiltinTrainDefaults d = builtin_train_defaults();
  if (unset("seq-len")) c.seq_len = builtin ? d.seq_len : 4096;
  if (unset("micro-batch")) c.micro_batch = builtin ? d.micro_batch : 1;
  if (unset("grad-accum")) c.grad_accum = builtin ? d.grad_accum : 1;
  if (unset("steps")) {
    require(builtin, "steps", "a number of optimizer steps (required with --model-dir)", "none");
    c.steps = d.steps;
  }
  if (unset("lr")) c.adamw.lr = builtin ? d.lr : 1e-5;
  // The built-in task is far from converged after its 600 steps: decaying the rate halves the
  // final retrieval accuracy (35% with cosine against 75% constant, measured). Real fine-tuning
  // decays.
  if (unset("schedule")) c.schedule = builtin ? "constant" : "cosine";
  if (unset("beta2")) c.adamw.beta2 = 0.95;
  if (unset("weight-decay")) c.adamw.weight_decay = builtin ? d.weight_decay : 0.1;
  if (unset("clip")) c.adamw.clip = builtin ? d.clip : 1.0;
  // Default warmup: the task's (built-in: tuned; else 100 steps), but at most a quarter of a
  // shortened run, so `--steps 10` alone never trips over it.
  if (unset("warmup-steps")) {
    const int64_t wanted = builtin ? d.warmup_steps : 100;
    c.warmup_steps = (builtin && unset("steps")) ? wanted : std::min(wanted, c.steps / 4);
  }

  require(c.seq_len >= 2, "seq-len", "an integer >= 2", std::to_string(c.seq_len));
  require(c.micro_batch >= 1, "micro-batch", "an integer >= 1", std::to_string(c.micro_batch));
  require(c.grad_accum >= 1, "grad-accum", "an integer >= 1", std::to_string(c.grad_accum));
  require(c.steps >= 1, "steps", "an integer >= 1", std::to_string(c.steps));
  require(c.seq_len * c.micro_batch <= (int64_t(1) << 31) - 1, "micro-batch", "seq-len x micro-batch < 2^31 tokens",
          std::to_string(c.seq_len * c.micro_batch));
  require(std::isfinite(c.adamw.lr) && c.adamw.lr > 0, "lr", "a positive number", num(c.adamw.lr));
  require(c.adamw.beta1 >= 0 && c.adamw.beta1 < 1, "beta1", "a number in [0, 1)", num(c.adamw.beta1));
  require(c.adamw.beta2 >= 0 && c.adamw.beta2 < 1, "beta2", "a number in [0, 1)", num(c.adamw.beta2));
  require(c.adamw.eps > 0, "eps", "a positive number", num(c.adamw.eps));
  require(c.adamw.weight_decay >= 0, "weight-decay", "a number >= 0", num(c.adamw.weight_decay));
  require(std::isfinite(c.adamw.clip), "clip", "a finite number", num(c.adamw.clip));
  require(c.schedule == "constant" || c.schedule == "cosine" || c.schedule == "linear", "schedule",
          "constant, cosine or linear", "'" + c.schedule + "'");
  require(c.warmup_steps >= 0 && c.warmup_steps <= c.steps, "warmup-steps", "an integer in [0, steps]",
          std::to_string(c.warmup_steps));
  require(c.min_lr_ratio >= 0 && c.min_lr_ratio <= 1, "min-lr-ratio", "a number in [0, 1]", num(c.min_lr_ratio));
  require(c.checkpoint_every >= 0, "checkpoint-every", "an integer >= 0", std::to_string(c.checkpoint_every));
  require(c.eval_every >= -1, "eval-every", "an integer >= -1", std::to_string(c.eval_every));
  require(c.log_every >= 1, "log-every", "an integer >= 1", std::to_string(c.log_every));
  require(c.stop_after >= 0, "stop-after", "an integer >= 0", std::to_string(c.stop_after));
  require(c.threads >= 0, "threads", "an integer >= 0", std::to_string(c.threads));
  require(!c.run_dir.empty(), "run-dir", "a directory path", "an empty string");
  require(!c.resume.empty(), "resume", "auto, none or a checkpoint path", "an empty string");
  require(c.device == "cpu" || c.device == "cuda", "device", "cpu or cuda", "'" + c.device + "'");
  require(c.dtype == "bf16" || c.dtype == "fp16", "dtype", "bf16 or fp16", "'" + c.dtype + "'");
  require(c.recompute == "auto" || c.recompute == "none" || c.recompute == "layer", "recompute",
          "auto, none or layer", "'" + c.recompute + "'");
  require(c.attention == "auto" || c.attention == "tensor-core" || c.attention == "sm75" || c.attention == "cudnn",
          "attention", "auto, tensor-core, sm75 or cudnn", "'" + c.attention + "'");
  require(c.attention != "sm75" || c.dtype == "fp16", "attention", "--dtype fp16 with the sm75 kernel (it has no bf16)",
          "--dtype " + c.dtype);
  require(c.offload == "none" || c.offload == "optimizer" || c.offload == "params", "offload",
          "none, optimizer or params", "'" + c.offload + "'");
  require(c.weights == "resident" || c.weights == "streamed", "weights", "resident or streamed", "'" + c.weights + "'");
  if (!c.gpu_mem_limit.empty()) parse_byte_size(c.gpu_mem_limit, "gpu-mem-limit");
  require(c.host_grad_dtype == "fp32" || c.host_grad_dtype == "bf16", "host-grad-dtype", "fp32 or bf16",
          "'" + c.host_grad_dtype + "'");
  require(c.host_weights == "copy" || c.host_weights == "master", "host-weights", "copy or master",
          "'" + c.host_weights + "'");
  require(c.offload != "none" || c.host_grad_dtype == "fp32", "host-grad-dtype",
          "--offload optimizer or params with --host-grad-dtype bf16", "--offload none");
  require(c.offload != "none" || c.host_weights == "copy", "host-weights",
          "--offload optimizer or params with --host-weights master", "--offload none");
  require(!c.delayed_update || (c.offload == "optimizer" && c.weights == "resident"), "delayed-update",
          "--offload optimizer with --weights resident", "--offload " + c.offload + " --weights " + c.weights);
  require(c.mlp_chunk >= 0, "mlp-chunk", "a token count >= 0 (0: no tiling)", std::to_string(c.mlp_chunk));
  // The layer inputs are what it moves to the host: without recomputation there are none to move.
  require(!c.offload_activations || c.recompute != "none", "offload-activations", "--recompute layer or auto",
          "--recompute none");
  require(c.grad_reduce_dtype == "fp32" || c.grad_reduce_dtype == "bf16", "grad-reduce-dtype", "fp32 or bf16",
          "'" + c.grad_reduce_dtype + "'");
  *out = c;
  return true;
}

int64_t parse_byte_size(const std::string& text, const std::string& what) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  std::string unit = text.substr(used);
  for (auto& ch : unit) ch = char(std::toupper(static_cast<unsigned char>(ch)));
  double scale = 0;
  if (unit.empty() || unit == "B") scale = 1;
  else if (unit == "K" || unit == "KIB" || unit == "KB") scale = 1024.0;
  else if (unit == "M" || unit == "MIB" || unit == "MB") scale = 1024.0 * 1024;
  else if (unit == "G" || unit == "GIB" || unit == "GB") scale = 1024.0 * 1024 * 1024;
  else if (unit == "T" || unit == "TIB" || unit == "TB") scale = 1024.0 * 1024 * 1024 * 1024;
  if (used == 0 || scale == 0 || !(value > 0) || value * scale > 9e18)
    throw ConfigError(what + ": expected a size like 16GiB, 48G or 512MiB, got '" + text + "'");
  return int64_t(value * scale);
}

std::string to_ini(const TrainConfig& c) {
  std::ostringstream s;
  s.precision(17);
  s << "# longtune train: resolved configuration\n";
  s << "[model]\n";
  if (!c.model_dir.empty()) s << "model-dir = " << c.model_dir << "\n";
  s << "init-seed = " << c.init_seed << "\n";
  s << "\n[data]\n";
  if (!c.data.empty()) s << "data = " << c.data << "\n";
  if (!c.eval_data.empty()) s << "eval-data = " << c.eval_data << "\n";
  s << "seq-len = " << c.seq_len << "\nmicro-batch = " << c.micro_batch << "\ngrad-accum = " << c.grad_accum
    << "\nshuffle = " << (c.shuffle ? "true" : "false") << "\nseed = " << c.seed << "\n";
  s << "\n[optim]\n";
  s << "lr = " << c.adamw.lr << "\nbeta1 = " << c.adamw.beta1 << "\nbeta2 = " << c.adamw.beta2
    << "\neps = " << c.adamw.eps << "\nweight-decay = " << c.adamw.weight_decay << "\nclip = " << c.adamw.clip
    << "\nschedule = " << c.schedule << "\nwarmup-steps = " << c.warmup_steps << "\nmin-lr-ratio = "
    << c.min_lr_ratio << "\n";
  s << "\n[train]\n";
  s << "steps = " << c.steps << "\nrun-dir = " << c.run_dir << "\ncheckpoint-every = " << c.checkpoint_every
    << "\nkeep-last = " << c.keep_last << "\nresume = " << c.resume << "\neval-every = " << c.eval_every
    << "\nlog-every = " << c.log_every << "\nthreads = " << c.threads << "\n";
  s << "\n[gpu]\n";
  s << "device = " << c.device << "\ndtype = " << c.dtype << "\nrecompute = " << c.recompute << "\nattention = "
    << c.attention << "\noffload = " << c.offload << "\nweights = " << c.weights
    << "\ndelayed-update = " << (c.delayed_update ? "true" : "false")
    << "\noffload-activations = " << (c.offload_activations ? "true" : "false") << "\nmlp-chunk = " << c.mlp_chunk
    << "\ngrad-reduce-dtype = " << c.grad_reduce_dtype
    << "\n";
  if (!c.gpu_mem_limit.empty()) s << "gpu-mem-limit = " << c.gpu_mem_limit << "\n";
  s << "host-grad-dtype = " << c.host_grad_dtype << "\nhost-weights = " << c.host_weights << "\n";
  // stop-after belongs to one invocation, not to the run: not saved.
  return s.str();
}

}  // namespace longtune
