// Internal to longtune_io (nlohmann_json is a private dependency): parsing JSON text into one-line
// InputErrors and describing values in messages.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "src/common/error.hpp"

namespace longtune::jsonutil {

using json = nlohmann::json;

// Short description of a JSON value for "got ..." texts: `string "abc"`, `float 1.5`, `null`.
inline std::string describe(const json& v) {
  std::string kind;
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: kind = "boolean"; break;
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: kind = "integer"; break;
    case json::value_t::number_float: kind = "float"; break;
    case json::value_t::string: kind = "string"; break;
    case json::value_t::array: kind = "array"; break;
    case json::value_t::object: kind = "object"; break;
    default: kind = "value"; break;
  }
  std::string text = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return kind + " " + text;
}

// Parses `text`; bad JSON is InputError(file, field, "valid JSON", "<parser message>").
inline json parse(const std::string& text, const std::string& file, const std::string& field = "json") {
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    // e.what() reads "[json.exception.parse_error.101] parse error at line 1, column 5: ...".
    std::string msg = e.what();
    const auto pos = msg.find("] ");
    if (msg.rfind("[json.exception", 0) == 0 && pos != std::string::npos) msg = msg.substr(pos + 2);
    throw InputError(file, field, "valid JSON", msg + " (byte " + std::to_string(e.byte) + ")");
  }
}

}  // namespace longtune::jsonutil
