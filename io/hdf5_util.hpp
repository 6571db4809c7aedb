// HDF5 C API helpers shared by the io layer (token datasets, checkpoints): an RAII identifier,
// HDF5's error stack turned into one line of text, and an error context (the file) whose check()
// turns a failing call into an Hdf5Error naming the call, the file and the object.
#pragma once
#include <hdf5.h>

#include <string>
#include <vector>

#include "src/common/error.hpp"

namespace longtune {

// An HDF5 identifier closed by `closer` on destruction.
class H5Id {
 public:
  using Closer = herr_t (*)(hid_t);
  H5Id() = default;
  H5Id(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  H5Id(H5Id&& o) noexcept : id_(o.id_), closer_(o.closer_) { o.id_ = -1; }
  H5Id& operator=(H5Id&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      closer_ = o.closer_;
      o.id_ = -1;
    }
    return *this;
  }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  ~H5Id() { reset(); }
  hid_t get() const { return id_; }
  // Closes now and returns the closer's status (the destructor ignores it).
  herr_t close() {
    const hid_t id = id_;
    id_ = -1;
    return id >= 0 ? closer_(id) : 0;
  }

 private:
  void reset() {
    if (id_ >= 0) closer_(id_);
    id_ = -1;
  }
  hid_t id_ = -1;
  Closer closer_ = nullptr;
};

namespace hdf5_detail {
inline herr_t collect_error(unsigned, const H5E_error2_t* err, void* data) {
  if (err && err->desc) static_cast<std::vector<std::string>*>(data)->push_back(err->desc);
  return 0;
}
}  // namespace hdf5_detail

// The outermost and innermost messages of HDF5's error stack, which is then cleared.
inline std::string hdf5_error_text() {
  std::vector<std::string> msgs;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, hdf5_detail::collect_error, &msgs);
  H5Eclear2(H5E_DEFAULT);
  std::string text = msgs.empty() ? std::string("no HDF5 error message")
                     : msgs.size() == 1 ? msgs[0]
                                        : msgs.front() + ": " + msgs.back();
  for (char& c : text)
    if (c == '\n' || c == '\r') c = ' ';
  return text;
}

// HDF5 prints its error stack to stderr by default; longtune reports errors itself.
inline void quiet_hdf5(const std::string& path) {
  if (H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr) < 0)
    throw Hdf5Error("H5Eset_auto2(" + path + "): " + hdf5_error_text());
}

// Error context: the file, for messages.
struct H5 {
  std::string file;

  Hdf5Error error(const char* call, const std::string& object) const {
    return Hdf5Error(std::string(call) + "(" + file + (object.empty() ? "" : ", " + object) +
                     "): " + hdf5_error_text());
  }
  template <class T>
  T check(T status, const char* call, const std::string& object) const {
    if (status < 0) throw error(call, object);
    return status;
  }
  H5Id id(hid_t id, H5Id::Closer closer, const char* call, const std::string& object) const {
    if (id < 0) throw error(call, object);
    return H5Id(id, closer);
  }
};

// A short description of an HDF5 datatype for "expected X, got Y" messages.
inline std::string hdf5_type_text(const H5& h5, hid_t type, const std::string& object) {
  const H5T_class_t c = H5Tget_class(type);
  if (c < 0) throw h5.error("H5Tget_class", object);
  const size_t size = H5Tget_size(type);
  if (size == 0) throw h5.error("H5Tget_size", object);
  const std::string bytes = " of " + std::to_string(size) + " bytes";
  switch (c) {
    case H5T_INTEGER: return "integers" + bytes;
    case H5T_FLOAT: return "floating-point values" + bytes;
    case H5T_STRING: return "strings";
    case H5T_ENUM: return "an enum type (numpy bool?)" + bytes;
    case H5T_COMPOUND: return "a compound type";
    default: return "a non-integer type";
  }
}

}  // namespace longtune
