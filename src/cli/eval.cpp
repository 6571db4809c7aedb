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
#include "src/train/evaluate.hpp"

namespace po = boost::program_options;

namespace longtune::cli {

int run_eval(int argc, char** argv) {
  po::options_description desc(
      "longtune eval: mean loss and perplexity of a model over a dataset, on the CPU.\n"
      "Documents are read in file order and packed into seq_len sequences (docs/formats.md).\n"
      "With no --model-dir / --data, the built-in tiny model (random init) and task are used.\n\nOptions");
  std::string model_dir, data_path;
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
      ("seed", po::value(&seed)->default_value(1234), "seed of the built-in model and task");
  po::variables_map vm;
  if (!parse_command_line(argc, argv, desc, vm)) return 0;  // --help
  if (seq_len < 2) throw ConfigError("--seq-len: expected an integer >= 2, got " + std::to_string(seq_len));
  if (micro_batch < 1) throw ConfigError("--micro-batch: expected an integer >= 1, got " + std::to_string(micro_batch));
  if (model_dir.empty() != data_path.empty() && data_path.empty())
    throw ConfigError("--model-dir given without --data: expected both, or neither for the built-in task");

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
    cfg = builtin_model_config();
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

  std::printf("[eval] model: %s\n", model_label.c_str());
  std::printf("[eval] %lld layers, hidden %lld, heads %lld/%lld, vocab %lld, %.3f M parameters\n",
              (long long)cfg.num_hidden_layers, (long long)cfg.hidden_size, (long long)cfg.num_attention_heads,
              (long long)cfg.num_key_value_heads, (long long)cfg.vocab_size, double(table->num_parameters()) / 1e6);
  std::printf("[eval] data: %s: %lld documents, %lld tokens; seq_len %lld, micro-batch %lld, %d threads\n",
              data.path.c_str(), (long long)data.num_documents(), (long long)data.num_tokens(), (long long)seq_len,
              (long long)micro_batch, omp_get_max_threads());

  LlamaCpu model(cfg, *table);
  const auto t0 = std::chrono::steady_clock::now();
  const EvalResult r = evaluate_dataset(model, params.data(), data, seq_len, micro_batch, max_batches);
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
