// The subcommands of the longtune executable. Each returns the process exit code; errors are
// thrown as longtune::Error and turned into a message by main().
#pragma once

namespace longtune::cli {

// longtune eval: mean loss and perplexity of a model over a dataset (CPU).
int run_eval(int argc, char** argv);
// longtune train: full-parameter training (CPU engine).
int run_train(int argc, char** argv);
// longtune export: a checkpoint as a Hugging Face model directory.
int run_export(int argc, char** argv);
// longtune prepare: JSONL chat / text files -> an HDF5 token dataset.
int run_prepare(int argc, char** argv);

}  // namespace longtune::cli
