// Typed errors. Library code throws these with enough context for a one-line message;
// only main() turns them into text on stderr and an exit code.
#pragma once
#include <stdexcept>
#include <string>

namespace longtune {

// Base of every longtune error.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Malformed user input: a config, model file, dataset or checkpoint. The message always reads
// "<file>: <field>: expected <expectation>[, got <actual>]" on one line.
class InputError : public Error {
 public:
  InputError(const std::string& file, const std::string& field, const std::string& expected,
             const std::string& got = "");
  const std::string& file() const { return file_; }
  const std::string& field() const { return field_; }

 private:
  std::string file_, field_;
};

// Invalid command-line or config option (kept apart from InputError so the CLI can print usage).
class ConfigError : public Error {
 public:
  using Error::Error;
};

// A failing call into a system library: what was called, where, and the library's own message.
class SystemError : public Error {
 public:
  using Error::Error;
};
class IoError : public SystemError { public: using SystemError::SystemError; };      // POSIX file I/O
class Hdf5Error : public SystemError { public: using SystemError::SystemError; };    // HDF5 C API
class CudaError : public SystemError { public: using SystemError::SystemError; };    // CUDA runtime, cuBLAS
class NcclError : public SystemError { public: using SystemError::SystemError; };
class MpiError : public SystemError { public: using SystemError::SystemError; };
class NumaError : public SystemError { public: using SystemError::SystemError; };

// Training diverged numerically (non-finite loss or gradient where no loss scaler can recover).
class NumericalError : public Error {
 public:
  using Error::Error;
};

// Internal invariant broken (a bug, not bad input).
class InternalError : public Error {
 public:
  using Error::Error;
};

// Throws InternalError naming the failed condition and its source location.
[[noreturn]] void fail_check(const char* condition, const char* file, int line, const std::string& what);

}  // namespace longtune

// LT_CHECK(cond, "message"): internal invariant; cheap enough to keep in release builds.
#define LT_CHECK(cond, what)                                                     \
  do {                                                                           \
    if (!(cond)) ::longtune::fail_check(#cond, __FILE__, __LINE__, (what));      \
  } while (0)
