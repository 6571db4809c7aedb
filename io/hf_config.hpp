// Hugging Face config.json for LlamaForCausalLM <-> LlamaConfig.
#pragma once
#include <string>

#include "src/model/llama_config.hpp"

namespace longtune {

// Parses and validates config.json text. `file` names the file in error messages.
// Accepts rope settings as `rope_scaling` (transformers <= 4.x, with top-level rope_theta) or as
// `rope_parameters` (transformers >= 5, rope_theta inside), rope types "default"/absent and "llama3".
// Throws InputError("<file>: <field>: expected ...") for anything malformed or unsupported.
LlamaConfig parse_hf_config(const std::string& json_text, const std::string& file);
// Reads <path> (a config.json) and parses it.
LlamaConfig load_hf_config(const std::string& path);
// config.json text for a LlamaConfig (transformers >= 5 layout, rope_parameters), loadable by
// transformers' LlamaForCausalLM.
std::string hf_config_to_json(const LlamaConfig& cfg);
// Throws InputError naming `file` and the field when the sizes are inconsistent.
void validate_llama_config(const LlamaConfig& cfg, const std::string& file);

}  // namespace longtune
