#include "src/common/error.hpp"

namespace longtune {

static std::string input_message(const std::string& file, const std::string& field,
                                 const std::string& expected, const std::string& got) {
  std::string msg = file + ": " + field + ": expected " + expected;
  if (!got.empty()) msg += ", got " + got;
  // One line, always: newlines from nested library messages would break log parsing.
  for (char& c : msg)
    if (c == '\n' || c == '\r') c = ' ';
  return msg;
}

InputError::InputError(const std::string& file, const std::string& field, const std::string& expected,
                       const std::string& got)
    : Error(input_message(file, field, expected, got)), file_(file), field_(field) {}

void fail_check(const char* condition, const char* file, int line, const std::string& what) {
  throw InternalError(std::string(file) + ":" + std::to_string(line) + ": check '" + condition +
                      "' failed: " + what);
}

}  // namespace longtune
