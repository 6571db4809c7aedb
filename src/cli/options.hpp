// Shared helpers for the subcommands' Boost.Program_options parsing.
#pragma once
#include <string>
#include <vector>

#include <boost/program_options.hpp>

namespace longtune::cli {

// Parses argv (after the subcommand) into `vm`; an unknown or malformed option becomes a
// ConfigError naming the option and, for unknown ones, the closest valid option. When `desc` has
// a "help" option and it was given, prints the description and returns false (the command is done).
bool parse_command_line(int argc, char** argv, const boost::program_options::options_description& desc,
                        boost::program_options::variables_map& vm);

// The valid option names closest to `name` by edit distance (for "did you mean").
std::string closest_option(const std::string& name, const boost::program_options::options_description& desc);

}  // namespace longtune::cli
