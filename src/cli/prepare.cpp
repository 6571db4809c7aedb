#include <cstdio>
#include <string>
#include <vector>

#include "src/cli/commands.hpp"
#include "src/cli/options.hpp"
#include "src/common/error.hpp"
#include "src/data/prepare.hpp"

namespace po = boost::program_options;

namespace longtune::cli {

int run_prepare(int argc, char** argv) {
  po::options_description desc(
      "longtune prepare: JSONL chat or text files -> an HDF5 token dataset for `longtune train`.\n"
      "Chat lines {\"messages\": [{\"role\", \"content\"}, ...]} are rendered in the Llama 3.1 chat format;\n"
      "text documents (a text file, or a JSONL line {\"text\": ...}) become <|begin_of_text|> text <|end_of_text|>.\n"
      "See docs/data.md.\n\nOptions");
  PrepareOptions opt;
  std::string format = "auto", loss_mask = "assistant", on_bad_line = "skip";
  desc.add_options()
      ("help,h", "show this help")
      ("tokenizer", po::value(&opt.tokenizer), "tokenizer.json (Llama 3 byte-level BPE), e.g. the model directory's")
      ("input", po::value(&opt.inputs)->multitoken(), "JSONL files (.jsonl/.json), text files, or folders of .txt files")
      ("format", po::value(&format)->default_value("auto"), "chat, text, or auto (per JSONL line: messages or text)")
      ("out", po::value(&opt.out), "the HDF5 dataset to write")
      ("loss-mask", po::value(&loss_mask)->default_value("assistant"), "chat targets: assistant (replies and their <|eot_id|>) or all")
      ("on-bad-line", po::value(&on_bad_line)->default_value("skip"), "skip (report file:line and go on) or fail")
      ("threads", po::value(&opt.threads)->default_value(1), "tokenizing threads")
      ("max-tokens", po::value(&opt.max_tokens)->default_value(0), "truncate documents to this many tokens (0: no limit)")
      ("batch-mb", po::value<size_t>()->default_value(2), "input megabytes per batch; two are in flight (their tokens take ~5-10x the text)")
      ("force", po::bool_switch(&opt.force), "replace an existing --out");
  po::variables_map vm;
  if (!parse_command_line(argc, argv, desc, vm)) return 0;  // --help
  if (format == "auto") opt.format = RecordFormat::kAuto;
  else if (format == "chat") opt.format = RecordFormat::kChat;
  else if (format == "text") opt.format = RecordFormat::kText;
  else throw ConfigError("--format: expected chat, text or auto, got " + format);
  if (loss_mask == "assistant") opt.loss_mask = LossMaskMode::kAssistant;
  else if (loss_mask == "all") opt.loss_mask = LossMaskMode::kAll;
  else throw ConfigError("--loss-mask: expected assistant or all, got " + loss_mask);
  if (on_bad_line == "skip") opt.fail_on_bad_line = false;
  else if (on_bad_line == "fail") opt.fail_on_bad_line = true;
  else throw ConfigError("--on-bad-line: expected skip or fail, got " + on_bad_line);
  const size_t batch_mb = vm["batch-mb"].as<size_t>();
  if (batch_mb < 1 || batch_mb > 4096) throw ConfigError("--batch-mb: expected 1 to 4096, got " + std::to_string(batch_mb));
  opt.batch_bytes = batch_mb << 20;

  const PrepareStats st = prepare_dataset(opt);
  std::fputs(prepare_summary(st).c_str(), stdout);
  std::printf("[prepare] wrote %s\n", opt.out.c_str());
  return 0;
}

}  // namespace longtune::cli
