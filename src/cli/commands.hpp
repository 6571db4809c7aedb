// The subcommands of the longtune executable. Each returns the process exit code; errors are
// thrown as longtune::Error and turned into a message by main().
#pragma once

namespace longtune::cli {

// longtune eval: mean loss and perplexity of a model over a dataset (CPU).
int run_eval(int argc, char** argv);

}  // namespace longtune::cli
