#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <sstream>
#include <string>

#include "io/hf_config.hpp"
#include "io/safetensors.hpp"
#include "io/token_dataset.hpp"
#include "src/cli/commands.hpp"
#include "src/cli/options.hpp"
#include "src/common/error.hpp"
#include "src/data/builtin_task.hpp"
#include "src/model/hf_adapter.hpp"
#include "src/model/llama_cpu.hpp"
#include "src/train/device_engine.hpp"
#include "src/train/evaluate.hpp"

namespace po = boost::program_options;

namespace longtune::cli {

int run_eval(int argc, char** argv) {
  po::options_description desc(
      "longtune eval: mean loss and perplexity of a model over a dataset, on the CPU or one GPU.\n"
      "Documents are read in file order and packed into seq_len sequences (docs/formats.md).\n"
      "With no --model-dir / --data, the built-in tiny model (random init) and task are used\n"
      "(with --device cuda: its GPU variant, head_dim 64).\n\nOptions");
  std::string model_dir, data_path, device = "cpu", dtype = "bf16", attention = "auto";
  int64_t seq_len = 0, micro_batch = 1, max_batches = 0, builtin_docs = 0;
  uint64_t seed = 0;
  desc.add_options()
      ("help,h", "show this help")
      ("model-dir", po::value(&model_dir), "Hugging Face model directory (config.json + safetensors)")
      ("data", po::value(&data_path), "HDF5 token dataset (/tokens, /doc_offsets, optional /loss_mask)")
      ("seq-len", po::value(&seq_len)->default_value(256), "tokens per packed sequence")
      ("micro-batch", po::value(&micro_batch)->default_value(1), "sequences per forward pass")
      ("max-batches", po::value(&max_batches)->default_value(0), "stop after this many micro-batches (0: all)")
      ("builtin-docs", po::value(&builtin_docs)->default_value(64), "documents of the built-in task")
      ("seed", po::value(&seed)->default_value(1234), "seed of the built-in model and task")
      ("device", po::value(&device)->default_value("cpu"), "cpu or cuda (the forward on one GPU)")
      ("dtype", po::value(&dtype)->default_value("bf16"), "GPU compute dtype: bf16 or fp16")
      ("attention", po::value(&attention)->default_value("auto"),
       "GPU attention kernel: auto, tensor-core (sm_80+), sm75 (fp16 only), cudnn (sm_80+)");
  po::variables_map vm;
  if (!parse_command_line(argc, argv, desc, vm)) return 0;  // --help
  if (seq_len < 2) throw ConfigError("--seq-len: expected an integer >= 2, got " + std::to_string(seq_len));
  if (micro_batch < 1) throw ConfigError("--micro-batch: expected an integer >= 1, got " + std::to_string(micro_batch));
  if (model_dir.empty() != data_path.empty() && data_path.empty())
    throw ConfigError("--model-dir given without --data: expected both, or neither for the built-in task");
  if (device != "cpu" && device != "cuda") throw ConfigError("--device: expected cpu or cuda, got '" + device + "'");
  if (dtype != "bf16" && dtype != "fp16") throw ConfigError("--dtype: expected bf16 or fp16, got '" + dtype + "'");
  if (attention != "auto" && attention != "tensor-core" && attention != "sm75" && attention != "cudnn")
    throw ConfigError("--attention: expected auto, tensor-core, sm75 or cudnn, got '" + attention + "'");
  if (attention == "sm75" && dtype != "fp16")
    throw ConfigError("--attention: expected --dtype fp16 with the sm75 kernel (it has no bf16), got --dtype " + dtype);
  const bool on_gpu = device == "cuda";

  // Everything that can be wrong with the inputs is checked before any compute.
  LlamaConfig cfg;
  std::unique_ptr<ParamTable> table;
  std::vector<float> params;
  TokenDataset data;
  std::string model_label;
  if (!model_dir.empty()) {
    cfg = load_hf_model_config(model_dir);
    table = std::make_unique<ParamTable>(cfg);
    params.assign(size_t(table->total_elements()), 0.0f);
    load_hf_weights(SafetensorsDir(model_dir), *table, params.data());
    model_label = model_dir;
  } else {
    cfg = on_gpu ? builtin_model_config_gpu() : builtin_model_config();
    table = std::make_unique<ParamTable>(cfg);
    params.assign(size_t(table->total_elements()), 0.0f);
    builtin_init_weights(cfg, *table, seed, params.data());
    model_label = "built-in tiny Llama (random init, seed " + std::to_string(seed) + ")";
  }
  if (!data_path.empty()) {
    data = load_token_dataset(data_path, cfg.vocab_size);
  } else {
    data = builtin_dataset(builtin_docs, seed);
    data.path = "built-in copy task";
  }

  // --device cuda: the GPU engine (src/gpu) through the trainer's interface, weights uploaded, forward
  // only; a missing GPU or a model that does not fit is refused here, before any compute.
  std::unique_ptr<DeviceEngine> engine;
  if (on_gpu) {
    DeviceEngineOptions opt;
    opt.device = device;
    opt.dtype = dtype;
    opt.attention = attention;
    opt.max_tokens = seq_len * micro_batch;
    engine = make_device_engine(opt, cfg, *table);
    engine->upload_state(params.data(), nullptr, nullptr);
  }

  std::printf("[eval] model: %s\n", model_label.c_str());
  std::printf("[eval] %lld layers, hidden %lld, heads %lld/%lld, vocab %lld, %.3f M parameters\n",
              (long long)cfg.num_hidden_layers, (long long)cfg.hidden_size, (long long)cfg.num_attention_heads,
              (long long)cfg.num_key_value_heads, (long long)cfg.vocab_size, double(table->num_parameters()) / 1e6);
  std::printf("[eval] data: %s: %lld documents, %lld tokens; seq_len %lld, micro-batch %lld, %d threads\n",
              data.path.c_str(), (long long)data.num_documents(), (long long)data.num_tokens(), (long long)seq_len,
              (long long)micro_batch, omp_get_max_threads());

  EvalResult r;
  std::chrono::steady_clock::time_point t0;
  if (engine) {
    std::printf("[eval] %s\n", engine->describe().c_str());
    t0 = std::chrono::steady_clock::now();
    r = evaluate_dataset([&](const PackedBatch& b) { return engine->evaluate(b); }, data, seq_len, micro_batch,
                         max_batches);
  } else {
    LlamaCpu model(cfg, *table);
    t0 = std::chrono::steady_clock::now();
    r = evaluate_dataset(model, params.data(), data, seq_len, micro_batch, max_batches);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const LossSum& total = r.loss;
  const int64_t batches = r.micro_batches, tokens = r.tokens;
  if (total.count == 0) throw InputError(data.path, "loss_mask", "at least one counted target token", "none");
  std::printf("[eval] %lld micro-batches, %lld tokens, %lld counted targets, %.2f s (%.0f tokens/s)\n",
              (long long)batches, (long long)tokens, (long long)total.count, secs, double(tokens) / secs);
  std::printf("[eval] loss %.6f  perplexity %.4f\n", total.mean(), std::exp(total.mean()));
  return 0;
}

}  // namespace longtune::cli
