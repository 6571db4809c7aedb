#include "src/cli/options.hpp"

#include <algorithm>
#include <cstdio>
#include <sstream>

#include "src/common/error.hpp"

namespace po = boost::program_options;

namespace longtune::cli {

static size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string closest_option(const std::string& name, const po::options_description& desc) {
  std::string key = name;
  while (!key.empty() && key.front() == '-') key.erase(key.begin());
  std::string best;
  size_t best_d = std::string::npos;
  for (const auto& opt : desc.options()) {
    const size_t d = edit_distance(key, opt->long_name());
    if (d < best_d) { best_d = d; best = opt->long_name(); }
  }
  return best;
}

bool parse_command_line(int argc, char** argv, const po::options_description& desc, po::variables_map& vm) {
  try {
    po::store(po::command_line_parser(argc, argv).options(desc).run(), vm);
    po::notify(vm);
  } catch (const po::unknown_option& e) {
    throw ConfigError("unknown option '" + e.get_option_name() + "' (did you mean --" +
                      closest_option(e.get_option_name(), desc) + "?)");
  } catch (const po::error& e) {
    throw ConfigError(e.what());
  }
  if (vm.count("help")) {
    std::ostringstream text;
    text << desc;
    std::printf("%s\n", text.str().c_str());
    return false;
  }
  return true;
}

}  // namespace longtune::cli
