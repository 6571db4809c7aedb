// longtune: the one place where errors become messages and exit codes.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "src/cli/bench.hpp"
#include "src/cli/commands.hpp"
#include "src/common/error.hpp"

namespace {

constexpr const char* kUsage =
    "usage: longtune <command> [options]\n"
    "\n"
    "commands:\n"
    "  prepare  JSONL chat / text files -> an HDF5 token dataset (tokenize, chat format, loss mask)\n"
    "  train    full-parameter training; with no options, the built-in tiny model and task\n"
    "  eval     mean loss and perplexity of a model over a dataset (CPU)\n"
    "  export   a checkpoint as a Hugging Face model directory\n"
    "  plan     will it fit? device and host memory per rank for each placement, the longest seq_len\n"
    "  bench    benchmarks: `longtune bench adamw|checkpoint|train|comm`\n"
    "  help     this text\n"
    "\n"
    "`longtune <command> --help` lists a command's options.\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "help") == 0 || std::strcmp(argv[1], "--help") == 0 ||
      std::strcmp(argv[1], "-h") == 0) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  try {
    if (command == "train") return longtune::cli::run_train(argc - 1, argv + 1);
    if (command == "eval") return longtune::cli::run_eval(argc - 1, argv + 1);
    if (command == "export") return longtune::cli::run_export(argc - 1, argv + 1);
    if (command == "prepare") return longtune::cli::run_prepare(argc - 1, argv + 1);
    if (command == "plan") {
#if LONGTUNE_HAVE_CUDA
      return longtune::cli::run_plan(argc - 1, argv + 1);
#else
      std::fprintf(stderr, "longtune plan: needs a CUDA build (the plan is the GPU engines' own memory layout)\n");
      return 2;
#endif
    }
    if (command == "bench") {
      if (argc >= 3 && std::strcmp(argv[2], "adamw") == 0) return longtune::cli::run_bench_adamw(argc - 2, argv + 2);
      if (argc >= 3 && std::strcmp(argv[2], "checkpoint") == 0)
        return longtune::cli::run_bench_checkpoint(argc - 2, argv + 2);
#if LONGTUNE_HAVE_CUDA
      if (argc >= 3 && std::strcmp(argv[2], "train") == 0) return longtune::cli::run_bench_train(argc - 2, argv + 2);
      if (argc >= 3 && std::strcmp(argv[2], "comm") == 0) return longtune::cli::run_bench_comm(argc - 2, argv + 2);
      std::fprintf(stderr, "longtune bench: expected a benchmark name: adamw, checkpoint, train, comm\n");
#else
      std::fprintf(stderr,
                   "longtune bench: expected a benchmark name: adamw, checkpoint (train and comm need a CUDA build)\n");
#endif
      return 2;
    }
    std::fprintf(stderr, "longtune: unknown command '%s'\n%s", command.c_str(), kUsage);
    return 2;
  } catch (const longtune::InputError& e) {
    std::fprintf(stderr, "longtune %s: error: %s\n", command.c_str(), e.what());
    return 2;
  } catch (const longtune::ConfigError& e) {
    std::fprintf(stderr, "longtune %s: error: %s (see longtune %s --help)\n", command.c_str(), e.what(),
                 command.c_str());
    return 2;
  } catch (const longtune::Error& e) {
    std::fprintf(stderr, "longtune %s: error: %s\n", command.c_str(), e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "longtune %s: unexpected error: %s\n", command.c_str(), e.what());
    return 1;
  }
}
