#include "io/checkpoint.hpp"

#include <fcntl.h>
#include <hdf5.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <thread>
#include <type_traits>

#include "io/atomic_file.hpp"
#include "io/hdf5_util.hpp"
#include "src/common/error.hpp"

// Checksums are taken over the bytes as they lie in memory and in the file (little-endian).
static_assert(std::endian::native == std::endian::little, "checkpoint checksums assume a little-endian host");

namespace longtune {
namespace {

namespace fs = std::filesystem;

constexpr const char* kChecksumAttr = "xxh3_64";
constexpr const char* kTensorNames[3] = {"/master", "/exp_avg", "/exp_avg_sq"};
constexpr const char* kStepPrefix = "step-";
constexpr const char* kTmpPrefix = ".tmp-step-";
constexpr const char* kReplacedPrefix = ".replaced-step-";
constexpr const char* kDeletingPrefix = ".deleting-step-";
// Elements per hyperslab read of a tensor dataset (16 MiB of fp32); the pread path uses at most
// 1 MiB pieces.
int64_t g_piece_elems = int64_t(1) << 22;
// checkpoint_testing::set_fail_data_writes (read by background writers too).
std::atomic<bool> g_fail_data_writes{false};

// ---- names ---------------------------------------------------------------------------------------

std::string zero_padded(int64_t v, int width) {
  std::string s = std::to_string(v);
  if (int(s.size()) < width) s.insert(0, size_t(width) - s.size(), '0');
  return s;
}

// The non-negative decimal number that is all of `s`, or nullopt.
std::optional<int64_t> parse_decimal(std::string_view s) {
  if (s.empty() || s.size() > 18) return std::nullopt;
  for (char c : s)
    if (c < '0' || c > '9') return std::nullopt;
  int64_t v = 0;
  std::from_chars(s.data(), s.data() + s.size(), v);
  return v;
}

// N from "<prefix>N".
std::optional<int64_t> parse_prefixed_step(std::string_view name, std::string_view prefix) {
  if (!name.starts_with(prefix)) return std::nullopt;
  return parse_decimal(name.substr(prefix.size()));
}

struct RankName {
  int rank, world;
};
std::optional<RankName> parse_rank_file_name(std::string_view name) {
  if (!name.starts_with("rank-") || !name.ends_with(".h5")) return std::nullopt;
  std::string_view mid = name.substr(5, name.size() - 5 - 3);
  const size_t of = mid.find("-of-");
  if (of == std::string_view::npos) return std::nullopt;
  const auto r = parse_decimal(mid.substr(0, of)), w = parse_decimal(mid.substr(of + 4));
  if (!r || !w || *w < 1 || *r >= *w || *w > INT32_MAX) return std::nullopt;
  return RankName{int(*r), int(*w)};
}

std::string join(const std::string& dir, const std::string& name) { return (fs::path(dir) / name).string(); }

// ---- POSIX / filesystem helpers (failing calls throw IoError naming the call) -------------------

bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::error_code ec;
  std::vector<std::string> names;
  fs::directory_iterator it(dir, ec);
  if (ec) throw IoError("opendir(" + dir + "): " + ec.message());
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    if (ec) break;
    names.push_back(it->path().filename().string());
  }
  if (ec) throw IoError("readdir(" + dir + "): " + ec.message());
  std::sort(names.begin(), names.end());
  return names;
}

void remove_tree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) throw IoError("remove_all(" + path + "): " + ec.message());
}

void rename_or_throw(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0)
    throw IoError("rename(" + from + " -> " + to + "): " + errno_text(errno));
}

void make_dir(const std::string& path) {
  if (::mkdir(path.c_str(), 0755) != 0) throw IoError("mkdir(" + path + "): " + errno_text(errno));
}

// Text made safe for a one-line message: printable ASCII, at most 60 characters.
std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (out.size() >= 60) {
      out += "...";
      break;
    }
    if (c >= 32 && c < 127) {
      out += char(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", unsigned(c));
      out += buf;
    }
  }
  return out;
}

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

std::string hex64(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// ---- checksums ---------------------------------------------------------------------------------

struct Xxh3StateDeleter {
  void operator()(XXH3_state_t* s) const { XXH3_freeState(s); }
};

class Xxh3 {
 public:
  Xxh3() : st_(XXH3_createState()) {
    if (!st_ || XXH3_64bits_reset(st_.get()) == XXH_ERROR) throw InternalError("XXH3_createState/reset failed");
  }
  void update(const void* p, size_t n) {
    if (n > 0 && XXH3_64bits_update(st_.get(), p, n) == XXH_ERROR) throw InternalError("XXH3_64bits_update failed");
  }
  uint64_t digest() const { return XXH3_64bits_digest(st_.get()); }

 private:
  std::unique_ptr<XXH3_state_t, Xxh3StateDeleter> st_;
};

uint64_t xxh3(const void* p, size_t n) { return XXH3_64bits(p, n); }

// Strings are checksummed as their UTF-8 bytes, each followed by one NUL byte.
uint64_t xxh3_strings(const std::vector<std::string>& v) {
  Xxh3 h;
  for (const std::string& s : v) h.update(s.c_str(), s.size() + 1);
  return h.digest();
}

// The canonical bytes of the trainer state (docs/checkpoints.md):
// struct.pack("<qqqqqQdq", step, tokens_seen, epoch, cursor_order_index, cursor_offset_in_doc,
// data_seed, loss_scale, format_version) + rng_state\0 + resolved_config\0 + run_id\0.
uint64_t trainer_state_checksum(const TrainerState& s) {
  std::string b;
  auto put = [&](const auto& v) { b.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(s.step);
  put(s.tokens_seen);
  put(s.epoch);
  put(s.cursor_order_index);
  put(s.cursor_offset_in_doc);
  put(s.data_seed);
  put(s.loss_scale);
  put(s.format_version);
  for (const std::string* str : {&s.rng_state, &s.resolved_config, &s.run_id}) b.append(str->c_str(), str->size() + 1);
  return xxh3(b.data(), b.size());
}

// ---- HDF5 writing ------------------------------------------------------------------------------

// Data objects of at least 1 MiB (the tensor datasets) start at a multiple of 1 MiB in files
// this code writes: page- and stripe-aligned for the pwrite/pread of their bytes.
constexpr hsize_t kDataAlignment = hsize_t(1) << 20;

H5Id file_access_plist(const H5& h5, bool for_writing = false) {
  H5Id fapl = h5.id(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, "H5Pcreate", "");
#if (H5_VERS_MAJOR == 1 && H5_VERS_MINOR == 10 && H5_VERS_RELEASE >= 7) || H5_VERSION_GE(1, 12, 1)
  // Lock as HDF5 does by default, but do not fail on file systems without flock (NFS, Lustre).
  h5.check(H5Pset_file_locking(fapl.get(), true, true), "H5Pset_file_locking", "");
#endif
  if (for_writing) h5.check(H5Pset_alignment(fapl.get(), kDataAlignment, kDataAlignment), "H5Pset_alignment", "");
  return fapl;
}

H5Id vlen_string_type(const H5& h5, const std::string& object) {
  H5Id t = h5.id(H5Tcopy(H5T_C_S1), H5Tclose, "H5Tcopy", object);
  h5.check(H5Tset_size(t.get(), H5T_VARIABLE), "H5Tset_size", object);
  h5.check(H5Tset_cset(t.get(), H5T_CSET_UTF8), "H5Tset_cset", object);
  return t;
}

template <class T>
void write_scalar_attr(const H5& h5, hid_t loc, const char* name, hid_t file_type, hid_t mem_type, const T& value) {
  H5Id space = h5.id(H5Screate(H5S_SCALAR), H5Sclose, "H5Screate", name);
  H5Id attr = h5.id(H5Acreate2(loc, name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose, "H5Acreate2",
                    name);
  h5.check(H5Awrite(attr.get(), mem_type, &value), "H5Awrite", name);
  h5.check(attr.close(), "H5Aclose", name);
}
void write_i64_attr(const H5& h5, hid_t loc, const char* name, int64_t v) {
  write_scalar_attr(h5, loc, name, H5T_STD_I64LE, H5T_NATIVE_INT64, v);
}
void write_u64_attr(const H5& h5, hid_t loc, const char* name, uint64_t v) {
  write_scalar_attr(h5, loc, name, H5T_STD_U64LE, H5T_NATIVE_UINT64, v);
}
void write_str_attr(const H5& h5, hid_t loc, const char* name, const std::string& v) {
  H5Id type = vlen_string_type(h5, name);
  const char* p = v.c_str();
  write_scalar_attr(h5, loc, name, type.get(), type.get(), p);
}

// A 1-D dataset of n elements with its checksum attribute.
void write_dataset(const H5& h5, hid_t loc, const char* name, hid_t file_type, hid_t mem_type, size_t n,
                   const void* data, uint64_t checksum) {
  const hsize_t dim = n;
  H5Id space = h5.id(H5Screate_simple(1, &dim, nullptr), H5Sclose, "H5Screate_simple", name);
  H5Id ds = h5.id(H5Dcreate2(loc, name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose,
                  "H5Dcreate2", name);
  if (n > 0) h5.check(H5Dwrite(ds.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), "H5Dwrite", name);
  write_u64_attr(h5, ds.get(), kChecksumAttr, checksum);
  h5.check(ds.close(), "H5Dclose", name);
}

// ---- HDF5 reading (malformed content throws InputError naming the file and the object) ----------

std::string attr_field(const std::string& object, const char* attr) {
  return (object == "/" ? std::string("root") : object) + " attribute " + attr;
}

// The attribute `name` of `loc` (object path `object`, for messages), opened; it must exist.
H5Id open_attr(const H5& h5, hid_t loc, const std::string& object, const char* name, const char* expected) {
  const htri_t ex = h5.check(H5Aexists(loc, name), "H5Aexists", attr_field(object, name));
  if (!ex) throw InputError(h5.file, attr_field(object, name), expected, "missing");
  return h5.id(H5Aopen(loc, name, H5P_DEFAULT), H5Aclose, "H5Aopen", attr_field(object, name));
}

void check_scalar_attr(const H5& h5, hid_t attr, const std::string& field, const char* expected) {
  H5Id space = h5.id(H5Aget_space(attr), H5Sclose, "H5Aget_space", field);
  const hssize_t points = h5.check(H5Sget_simple_extent_npoints(space.get()), "H5Sget_simple_extent_npoints", field);
  if (points != 1) throw InputError(h5.file, field, expected, std::to_string(points) + " values");
}

// An integer attribute (any stored integer type; read through HDF5's conversion).
template <class T>
T read_int_attr(const H5& h5, hid_t loc, const std::string& object, const char* name) {
  constexpr bool is_unsigned = std::is_unsigned_v<T>;
  const char* expected = is_unsigned ? "an unsigned 64-bit integer attribute" : "an integer attribute";
  const std::string field = attr_field(object, name);
  H5Id attr = open_attr(h5, loc, object, name, expected);
  H5Id type = h5.id(H5Aget_type(attr.get()), H5Tclose, "H5Aget_type", field);
  const H5T_class_t c = H5Tget_class(type.get());
  if (c < 0) throw h5.error("H5Tget_class", field);
  if (c != H5T_INTEGER) throw InputError(h5.file, field, expected, hdf5_type_text(h5, type.get(), field));
  check_scalar_attr(h5, attr.get(), field, expected);
  T v = 0;
  h5.check(H5Aread(attr.get(), is_unsigned ? H5T_NATIVE_UINT64 : H5T_NATIVE_INT64, &v), "H5Aread", field);
  return v;
}

double read_f64_attr(const H5& h5, hid_t loc, const std::string& object, const char* name) {
  const char* expected = "a floating-point attribute";
  const std::string field = attr_field(object, name);
  H5Id attr = open_attr(h5, loc, object, name, expected);
  H5Id type = h5.id(H5Aget_type(attr.get()), H5Tclose, "H5Aget_type", field);
  const H5T_class_t c = H5Tget_class(type.get());
  if (c < 0) throw h5.error("H5Tget_class", field);
  if (c != H5T_FLOAT) throw InputError(h5.file, field, expected, hdf5_type_text(h5, type.get(), field));
  check_scalar_attr(h5, attr.get(), field, expected);
  double v = 0;
  h5.check(H5Aread(attr.get(), H5T_NATIVE_DOUBLE, &v), "H5Aread", field);
  return v;
}

// A string attribute, variable-length (as longtune writes it) or fixed-length.
std::string read_str_attr(const H5& h5, hid_t loc, const std::string& object, const char* name) {
  const char* expected = "a string attribute";
  const std::string field = attr_field(object, name);
  H5Id attr = open_attr(h5, loc, object, name, expected);
  H5Id type = h5.id(H5Aget_type(attr.get()), H5Tclose, "H5Aget_type", field);
  const H5T_class_t c = H5Tget_class(type.get());
  if (c < 0) throw h5.error("H5Tget_class", field);
  if (c != H5T_STRING) throw InputError(h5.file, field, expected, hdf5_type_text(h5, type.get(), field));
  check_scalar_attr(h5, attr.get(), field, expected);
  const htri_t vlen = h5.check(H5Tis_variable_str(type.get()), "H5Tis_variable_str", field);
  if (vlen) {
    H5Id mem = vlen_string_type(h5, field);
    char* p = nullptr;
    h5.check(H5Aread(attr.get(), mem.get(), &p), "H5Aread", field);
    std::string s = p ? std::string(p) : std::string();
    if (p) H5free_memory(p);
    return s;
  }
  const size_t size = H5Tget_size(type.get());
  if (size == 0) throw h5.error("H5Tget_size", field);
  H5Id mem = h5.id(H5Tcopy(H5T_C_S1), H5Tclose, "H5Tcopy", field);
  h5.check(H5Tset_size(mem.get(), size), "H5Tset_size", field);
  std::string s(size, '\0');
  h5.check(H5Aread(attr.get(), mem.get(), s.data()), "H5Aread", field);
  s.resize(std::strlen(s.c_str()));
  return s;
}

// The object `name` inside `loc` (path `object` for messages): it must exist and be a dataset
// (want_group false) or a group.
H5Id open_object(const H5& h5, hid_t loc, const std::string& object, const char* name, bool want_group,
                 const std::string& expected) {
  const htri_t ex = h5.check(H5Lexists(loc, name, H5P_DEFAULT), "H5Lexists", object);
  if (!ex) throw InputError(h5.file, object, expected, want_group ? "no such group" : "no such dataset");
  H5Id obj = h5.id(H5Oopen(loc, name, H5P_DEFAULT), H5Oclose, "H5Oopen", object);
  const H5I_type_t kind = H5Iget_type(obj.get());
  if (kind == H5I_BADID) throw h5.error("H5Iget_type", object);
  if (want_group && kind != H5I_GROUP)
    throw InputError(h5.file, object, expected, kind == H5I_DATASET ? "a dataset" : "an object that is not a group");
  if (!want_group && kind != H5I_DATASET)
    throw InputError(h5.file, object, expected, kind == H5I_GROUP ? "a group" : "an object that is not a dataset");
  return obj;
}

enum class Elem { F32, I64, Str };

const char* elem_text(Elem e) {
  switch (e) {
    case Elem::F32: return "a 1-D float32 (little-endian) dataset";
    case Elem::I64: return "a 1-D int64 (little-endian) dataset";
    case Elem::Str: return "a 1-D dataset of variable-length strings";
  }
  return "";
}

// An opened 1-D dataset with its length and stored checksum.
struct Dataset {
  H5Id id;
  std::string object;
  int64_t len = 0;
  uint64_t checksum = 0;
};

// Opens `name` in `loc`, checks its element type, rank and (when expect_len >= 0) length, and
// reads its checksum attribute. len_source says where the expected length comes from.
Dataset open_dataset(const H5& h5, hid_t loc, const std::string& object, const char* name, Elem elem,
                     int64_t expect_len, const char* len_source = "") {
  const std::string expected = elem_text(elem);
  Dataset d;
  d.object = object;
  d.id = open_object(h5, loc, object, name, false, expected);
  {
    H5Id type = h5.id(H5Dget_type(d.id.get()), H5Tclose, "H5Dget_type", object);
    bool ok = false;
    if (elem == Elem::F32) {
      ok = h5.check(H5Tequal(type.get(), H5T_IEEE_F32LE), "H5Tequal", object) > 0;
    } else if (elem == Elem::I64) {
      ok = h5.check(H5Tequal(type.get(), H5T_STD_I64LE), "H5Tequal", object) > 0;
    } else {
      const H5T_class_t c = H5Tget_class(type.get());
      if (c < 0) throw h5.error("H5Tget_class", object);
      ok = c == H5T_STRING && h5.check(H5Tis_variable_str(type.get()), "H5Tis_variable_str", object) > 0;
    }
    if (!ok) {
      const H5T_class_t c = H5Tget_class(type.get());
      std::string got = hdf5_type_text(h5, type.get(), object);
      if (elem != Elem::Str && c == (elem == Elem::F32 ? H5T_FLOAT : H5T_INTEGER)) got += " (other type or byte order)";
      if (elem == Elem::Str && c == H5T_STRING) got = "fixed-length strings";
      throw InputError(h5.file, object, expected, got);
    }
  }
  H5Id space = h5.id(H5Dget_space(d.id.get()), H5Sclose, "H5Dget_space", object);
  const int ndims = h5.check(H5Sget_simple_extent_ndims(space.get()), "H5Sget_simple_extent_ndims", object);
  if (ndims != 1) throw InputError(h5.file, object, expected, "a " + std::to_string(ndims) + "-D dataset");
  hsize_t dim = 0;
  h5.check(H5Sget_simple_extent_dims(space.get(), &dim, nullptr), "H5Sget_simple_extent_dims", object);
  d.len = int64_t(dim);
  if (expect_len >= 0 && d.len != expect_len)
    throw InputError(h5.file, object, "length " + std::to_string(expect_len) + len_source,
                     "length " + std::to_string(d.len));
  d.checksum = read_int_attr<uint64_t>(h5, d.id.get(), object, kChecksumAttr);
  return d;
}

void checksum_mismatch(const H5& h5, const Dataset& d, uint64_t actual) {
  throw InputError(h5.file, d.object, "data matching its xxh3_64 checksum " + hex64(d.checksum),
                   "checksum " + hex64(actual) + " (corrupted data)");
}

std::vector<int64_t> read_i64_dataset(const H5& h5, hid_t loc, const std::string& object, const char* name,
                                      int64_t expect_len, const char* len_source) {
  Dataset d = open_dataset(h5, loc, object, name, Elem::I64, expect_len, len_source);
  std::vector<int64_t> v(size_t(d.len));
  if (d.len > 0) h5.check(H5Dread(d.id.get(), H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), "H5Dread", object);
  const uint64_t actual = xxh3(v.data(), v.size() * sizeof(int64_t));
  if (actual != d.checksum) checksum_mismatch(h5, d, actual);
  return v;
}

std::vector<std::string> read_str_dataset(const H5& h5, hid_t loc, const std::string& object, const char* name,
                                          int64_t expect_len) {
  Dataset d = open_dataset(h5, loc, object, name, Elem::Str, expect_len);
  std::vector<std::string> out;
  if (d.len > 0) {
    H5Id mem = vlen_string_type(h5, object);
    H5Id space = h5.id(H5Dget_space(d.id.get()), H5Sclose, "H5Dget_space", object);
    std::vector<char*> ptrs(size_t(d.len), nullptr);
    h5.check(H5Dread(d.id.get(), mem.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()), "H5Dread", object);
    out.reserve(ptrs.size());
    for (char* p : ptrs) out.emplace_back(p ? p : "");
#if H5_VERSION_GE(1, 12, 0)
    h5.check(H5Treclaim(mem.get(), space.get(), H5P_DEFAULT, ptrs.data()), "H5Treclaim", object);
#else
    h5.check(H5Dvlen_reclaim(mem.get(), space.get(), H5P_DEFAULT, ptrs.data()), "H5Dvlen_reclaim", object);
#endif
  }
  const uint64_t actual = xxh3_strings(out);
  if (actual != d.checksum) checksum_mismatch(h5, d, actual);
  return out;
}

// Opens a rank file read-only. Missing files, files without the HDF5 signature and files HDF5
// cannot open (truncated, corrupted superblock) are InputErrors.
H5Id open_rank_file(const H5& h5) {
  const std::string& path = h5.file;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) throw InputError(path, "file", "an existing rank file", "no such file");
    throw IoError("stat(" + path + "): " + errno_text(errno));
  }
  if (!S_ISREG(st.st_mode)) throw InputError(path, "file", "a regular HDF5 file", "not a regular file");
  H5Id fapl = file_access_plist(h5);
#if H5_VERSION_GE(1, 12, 0)
  const htri_t is_h5 = H5Fis_accessible(path.c_str(), fapl.get());
#else
  const htri_t is_h5 = H5Fis_hdf5(path.c_str());
#endif
  if (is_h5 < 0) throw InputError(path, "file", "a readable HDF5 file", hdf5_error_text());
  if (!is_h5) throw InputError(path, "file", "an HDF5 file", "no HDF5 signature");
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get());
  if (f < 0) throw InputError(path, "file", "a readable HDF5 file", hdf5_error_text());
  return H5Id(f, H5Fclose);
}

// What one rank file says about itself (everything but the tensor data).
struct RankFileMeta {
  int64_t shard_begin = 0, shard_len = 0, total_len = 0, rank = 0, world_size = 0;
  std::vector<ParamEntry> table;
  TrainerState state;
};

std::vector<ParamEntry> read_param_table_group(const H5& h5, hid_t file, int64_t total_len) {
  const std::string g = "/param_table";
  H5Id grp = open_object(h5, file, g, "param_table", true, "a group holding the parameter table");
  const std::vector<std::string> names = read_str_dataset(h5, grp.get(), g + "/names", "names", -1);
  const int64_t n = int64_t(names.size());
  const std::vector<int64_t> offsets = read_i64_dataset(h5, grp.get(), g + "/offsets", "offsets", n, " (one per entry of /param_table/names)");
  const std::vector<int64_t> numel = read_i64_dataset(h5, grp.get(), g + "/numel", "numel", n, " (one per entry of /param_table/names)");
  const std::vector<int64_t> ndims = read_i64_dataset(h5, grp.get(), g + "/ndims", "ndims", n, " (one per entry of /param_table/names)");
  int64_t total_dims = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (ndims[size_t(i)] < 0 || ndims[size_t(i)] > 8)
      throw InputError(h5.file, g + "/ndims", "values in [0, 8]",
                       "ndims[" + std::to_string(i) + "] = " + std::to_string(ndims[size_t(i)]));
    total_dims += ndims[size_t(i)];
  }
  const std::vector<int64_t> shapes = read_i64_dataset(h5, grp.get(), g + "/shapes", "shapes", total_dims,
                                                        " (the sum of /param_table/ndims)");
  std::vector<ParamEntry> table(static_cast<size_t>(n));
  size_t k = 0;
  for (size_t i = 0; i < size_t(n); ++i) {
    ParamEntry& e = table[i];
    e.name = names[i];
    e.offset = offsets[i];
    e.numel = numel[i];
    e.layer = -1;
    int64_t prod = 1;
    for (int64_t d = 0; d < ndims[i]; ++d) {
      const int64_t dim = shapes[k++];
      if (dim < 0)
        throw InputError(h5.file, g + "/shapes", "non-negative dimensions", "a dimension " + std::to_string(dim) +
                                                                                 " of tensor '" + e.name + "'");
      e.shape.push_back(dim);
      prod *= dim;
    }
    if (prod != e.numel)
      throw InputError(h5.file, g + "/numel", "the product of the shape of '" + e.name + "' (" + std::to_string(prod) + ")",
                       std::to_string(e.numel));
    if (e.offset < 0 || e.offset > total_len - e.numel)
      throw InputError(h5.file, g + "/offsets",
                       "tensor '" + e.name + "' inside the flat space [0, " + std::to_string(total_len) + ")",
                       "offset " + std::to_string(e.offset) + " with " + std::to_string(e.numel) + " elements");
  }
  return table;
}

TrainerState read_trainer_state_group(const H5& h5, hid_t file) {
  const std::string g = "/trainer_state";
  H5Id grp = open_object(h5, file, g, "trainer_state", true, "a group holding the trainer state");
  const hid_t loc = grp.get();
  TrainerState s;
  s.format_version = read_int_attr<int64_t>(h5, loc, g, "format_version");
  if (s.format_version != kCheckpointFormatVersion)
    throw InputError(h5.file, attr_field(g, "format_version"),
                     std::to_string(kCheckpointFormatVersion) + " (the format this longtune reads)",
                     std::to_string(s.format_version));
  s.step = read_int_attr<int64_t>(h5, loc, g, "step");
  s.tokens_seen = read_int_attr<int64_t>(h5, loc, g, "tokens_seen");
  s.epoch = read_int_attr<int64_t>(h5, loc, g, "epoch");
  s.cursor_order_index = read_int_attr<int64_t>(h5, loc, g, "cursor_order_index");
  s.cursor_offset_in_doc = read_int_attr<int64_t>(h5, loc, g, "cursor_offset_in_doc");
  s.data_seed = read_int_attr<uint64_t>(h5, loc, g, "data_seed");
  s.rng_state = read_str_attr(h5, loc, g, "rng_state");
  s.loss_scale = read_f64_attr(h5, loc, g, "loss_scale");
  s.resolved_config = read_str_attr(h5, loc, g, "resolved_config");
  s.run_id = read_str_attr(h5, loc, g, "run_id");
  const uint64_t stored = read_int_attr<uint64_t>(h5, loc, g, kChecksumAttr);
  const uint64_t actual = trainer_state_checksum(s);
  if (stored != actual)
    throw InputError(h5.file, attr_field(g, kChecksumAttr), "attributes matching their checksum " + hex64(stored),
                     "checksum " + hex64(actual) + " (corrupted trainer state)");
  return s;
}

RankFileMeta read_rank_meta(const std::string& path) {
  quiet_hdf5(path);
  const H5 h5{path};
  H5Id file = open_rank_file(h5);
  RankFileMeta m;
  {
    H5Id root = h5.id(H5Gopen2(file.get(), "/", H5P_DEFAULT), H5Gclose, "H5Gopen2", "/");
    m.shard_begin = read_int_attr<int64_t>(h5, root.get(), "/", "shard_begin");
    m.shard_len = read_int_attr<int64_t>(h5, root.get(), "/", "shard_len");
    m.total_len = read_int_attr<int64_t>(h5, root.get(), "/", "total_len");
    m.rank = read_int_attr<int64_t>(h5, root.get(), "/", "rank");
    m.world_size = read_int_attr<int64_t>(h5, root.get(), "/", "world_size");
  }
  if (m.total_len < 0) throw InputError(path, "root attribute total_len", "a non-negative length", std::to_string(m.total_len));
  if (m.shard_begin < 0 || m.shard_len < 0 || m.shard_begin > m.total_len - m.shard_len)
    throw InputError(path, "root attributes shard_begin, shard_len",
                     "a range inside [0, total_len=" + std::to_string(m.total_len) + ")",
                     "[" + std::to_string(m.shard_begin) + ", " + std::to_string(m.shard_begin) + " + " +
                         std::to_string(m.shard_len) + ")");
  for (const char* name : kTensorNames) open_dataset(h5, file.get(), name, name + 1, Elem::F32, m.shard_len, " (root attribute shard_len)");
  m.table = read_param_table_group(h5, file.get(), m.total_len);
  m.state = read_trainer_state_group(h5, file.get());
  h5.check(file.close(), "H5Fclose", "");
  return m;
}

// Streams the 1-D float dataset `d` (checksum-verified) in g_piece_elems pieces; elements
// [lo, hi) of it are copied to out[0 ..) when out is not null.
void stream_tensor(const H5& h5, const Dataset& d, int64_t lo, int64_t hi, float* out, std::vector<float>& scratch) {
  Xxh3 hash;
  H5Id fspace = h5.id(H5Dget_space(d.id.get()), H5Sclose, "H5Dget_space", d.object);
  for (int64_t p0 = 0; p0 < d.len; p0 += g_piece_elems) {
    const int64_t p1 = std::min(d.len, p0 + g_piece_elems);
    const hsize_t start = hsize_t(p0), count = hsize_t(p1 - p0);
    const bool direct = out && lo <= p0 && p1 <= hi;
    float* dst;
    if (direct) {
      dst = out + (p0 - lo);
    } else {
      if (scratch.size() < count) scratch.resize(size_t(count));
      dst = scratch.data();
    }
    h5.check(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &start, nullptr, &count, nullptr),
             "H5Sselect_hyperslab", d.object);
    H5Id mspace = h5.id(H5Screate_simple(1, &count, nullptr), H5Sclose, "H5Screate_simple", d.object);
    h5.check(H5Dread(d.id.get(), H5T_NATIVE_FLOAT, mspace.get(), fspace.get(), H5P_DEFAULT, dst), "H5Dread", d.object);
    hash.update(dst, size_t(count) * sizeof(float));
    if (out && !direct) {
      const int64_t a = std::max(lo, p0), b = std::min(hi, p1);
      if (a < b) std::copy(dst + (a - p0), dst + (b - p0), out + (a - lo));
    }
  }
  const uint64_t actual = hash.digest();
  if (actual != d.checksum) checksum_mismatch(h5, d, actual);
}

// ---- tensor data outside HDF5 ----------------------------------------------------------------------
//
// The tensor datasets this code writes are contiguous and unfiltered: their bytes lie at one offset
// of the file (H5Dget_offset). They are written and read with pwrite/pread, one thread per dataset,
// the checksum taken piece by piece while the piece is in cache. That keeps the bulk I/O outside
// the HDF5 library (which serializes every call, and is not thread-safe in every build) and reads
// and writes each byte once. Datasets stored otherwise (chunked or filtered by another writer) are
// read through HDF5 (stream_tensor).

// Bytes per pwrite/pread call while checksumming: the piece is hashed while it is in L2.
constexpr size_t kHashPiece = size_t(1) << 20;
// Bytes per pwrite call when no checksum is taken (larger pieces were not faster).
constexpr size_t kPlainPiece = size_t(1) << 20;

// Runs f(0), f(1), f(2) concurrently (f(0) on the calling thread); rethrows the first exception
// after all three ended.
template <class F>
void run_per_tensor(F&& f) {
  std::exception_ptr err[3];
  auto call = [&](int i) {
    try {
      f(i);
    } catch (...) {
      err[i] = std::current_exception();
    }
  };
  std::thread t1(call, 1), t2(call, 2);
  call(0);
  t1.join();
  t2.join();
  for (const auto& e : err)
    if (e) std::rethrow_exception(e);
}

// Bytes written between two sync_file_range calls.
constexpr size_t kWritebackPiece = size_t(8) << 20;

// Writes n floats at file offset `offset`; returns their XXH3-64 when `hash` (else 0). Writeback
// of every 8 MiB written is started at once (sync_file_range), so the disk works while the rest is
// copied and the final fsync has little left to do.
uint64_t pwrite_tensor(int fd, const std::string& path, const float* data, size_t n, uint64_t offset, bool hash) {
  const char* p = reinterpret_cast<const char*>(data);
  const size_t bytes = n * sizeof(float), piece = hash ? kHashPiece : kPlainPiece;
  Xxh3 h;
  if (g_fail_data_writes.load() && bytes > 0) throw IoError("pwrite(" + path + "): failure injected by checkpoint_testing");
  size_t flushed = 0;
  for (size_t done = 0; done < bytes;) {
    const size_t k = std::min(piece, bytes - done);
    if (hash) h.update(p + done, k);
    pwrite_full(fd, p + done, k, offset + done, path);
    done += k;
    if (done - flushed >= kWritebackPiece || done == bytes) {
      // Only a hint: the fsync that follows is what makes the data durable.
      (void)::sync_file_range(fd, off_t(offset + flushed), off_t(done - flushed), SYNC_FILE_RANGE_WRITE);
      flushed = done;
    }
  }
  return hash ? h.digest() : 0;
}

// Where a tensor dataset's bytes lie in its file, when they can be read with pread: contiguous
// layout, stored inside the file, allocated, len x 4 bytes.
std::optional<uint64_t> raw_data_offset(const H5& h5, const Dataset& d) {
  if (d.len == 0) return std::nullopt;
  H5Id dcpl = h5.id(H5Dget_create_plist(d.id.get()), H5Pclose, "H5Dget_create_plist", d.object);
  if (H5Pget_layout(dcpl.get()) != H5D_CONTIGUOUS || H5Pget_external_count(dcpl.get()) != 0 ||
      H5Pget_nfilters(dcpl.get()) != 0) {
    H5Eclear2(H5E_DEFAULT);
    return std::nullopt;
  }
  const haddr_t off = H5Dget_offset(d.id.get());
  if (off == HADDR_UNDEF) {
    H5Eclear2(H5E_DEFAULT);
    return std::nullopt;
  }
  if (H5Dget_storage_size(d.id.get()) != hsize_t(d.len) * sizeof(float)) return std::nullopt;
  return uint64_t(off);
}

// A tensor dataset to stream: where its bytes are (raw) or its open HDF5 dataset (fallback).
struct TensorSource {
  Dataset d;
  std::optional<uint64_t> offset;
};

// Like stream_tensor, with pread from `fd` at src.offset: every piece checksummed, elements
// [lo, hi) copied to out when out is not null.
void pread_tensor(int fd, const std::string& path, const TensorSource& src, int64_t lo, int64_t hi, float* out) {
  const Dataset& d = src.d;
  const int64_t piece = std::max<int64_t>(1, std::min<int64_t>(g_piece_elems, int64_t(kHashPiece / sizeof(float))));
  std::vector<float> scratch;
  Xxh3 hash;
  for (int64_t p0 = 0; p0 < d.len; p0 += piece) {
    const int64_t p1 = std::min(d.len, p0 + piece);
    const size_t bytes = size_t(p1 - p0) * sizeof(float);
    const bool direct = out && lo <= p0 && p1 <= hi;
    float* dst;
    if (direct) {
      dst = out + (p0 - lo);
    } else {
      if (scratch.size() < size_t(p1 - p0)) scratch.resize(size_t(piece));
      dst = scratch.data();
    }
    const uint64_t at = *src.offset + uint64_t(p0) * sizeof(float);
    const size_t got = pread_full(fd, dst, bytes, at, path);
    if (got != bytes)
      throw InputError(path, d.object, std::to_string(d.len * int64_t(sizeof(float))) + " bytes of data at offset " +
                                           std::to_string(*src.offset),
                       "end of file after " + std::to_string(at + got) + " bytes (truncated file)");
    hash.update(dst, bytes);
    if (out && !direct) {
      const int64_t a = std::max(lo, p0), b = std::min(hi, p1);
      if (a < b) std::copy(dst + (a - p0), dst + (b - p0), out + (a - lo));
    }
  }
  const uint64_t actual = hash.digest();
  if (actual != d.checksum)
    throw InputError(path, d.object, "data matching its xxh3_64 checksum " + hex64(d.checksum),
                     "checksum " + hex64(actual) + " (corrupted data)");
}

// Streams the tensor datasets `want` (by index into kTensorNames) of one rank file, checksummed;
// elements [lo, hi) of dataset i go to outs[i] (when not null). The three raw-readable datasets
// are read concurrently, HDF5 is only used for metadata and for datasets stored otherwise.
void stream_rank_tensors(const std::string& path, int64_t shard_len, const bool want[3], int64_t lo, int64_t hi,
                         float* const outs[3]) {
  quiet_hdf5(path);
  const H5 h5{path};
  TensorSource src[3];
  {
    H5Id file = open_rank_file(h5);
    bool all_raw = true;
    for (int i = 0; i < 3; ++i) {
      if (!want[i]) continue;
      src[i].d = open_dataset(h5, file.get(), kTensorNames[i], kTensorNames[i] + 1, Elem::F32, shard_len);
      src[i].offset = raw_data_offset(h5, src[i].d);
      all_raw = all_raw && src[i].offset;
    }
    if (!all_raw) {  // other storage, or empty (its checksum is still checked)
      std::vector<float> scratch;
      for (int i = 0; i < 3; ++i)
        if (want[i] && !src[i].offset) stream_tensor(h5, src[i].d, lo, hi, outs[i], scratch);
    }
    for (TensorSource& t : src) t.d.id = H5Id();  // HDF5 keeps nothing open during the raw reads
    h5.check(file.close(), "H5Fclose", "");
  }
  bool any_raw = false;
  for (int i = 0; i < 3; ++i) any_raw = any_raw || (want[i] && src[i].offset);
  if (!any_raw) return;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) throw IoError("open(" + path + "): " + errno_text(errno));
  (void)::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
  run_per_tensor([&](int i) {
    if (want[i] && src[i].offset) pread_tensor(fd.get(), path, src[i], lo, hi, outs[i]);
  });
  fd.close(path);
}

// Checksums the three tensor datasets of a rank file without keeping the data.
void verify_tensor_data(const std::string& path, int64_t shard_len) {
  const bool all[3] = {true, true, true};
  float* const none[3] = {nullptr, nullptr, nullptr};
  stream_rank_tensors(path, shard_len, all, 0, 0, none);
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string entry_text(const ParamEntry& e) {
  return "'" + e.name + "' shape " + shape_text(e.shape) + " at offset " + std::to_string(e.offset);
}

// Index of the first entry where a and b differ (name, shape, offset, numel), or -1.
long first_difference(const std::vector<ParamEntry>& a, const std::vector<ParamEntry>& b) {
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i)
    if (a[i].name != b[i].name || a[i].shape != b[i].shape || a[i].offset != b[i].offset || a[i].numel != b[i].numel)
      return long(i);
  return a.size() == b.size() ? -1 : long(n);
}

// The first trainer-state field where a and b differ.
const char* trainer_state_difference(const TrainerState& a, const TrainerState& b) {
  if (a.step != b.step) return "step";
  if (a.tokens_seen != b.tokens_seen) return "tokens_seen";
  if (a.epoch != b.epoch) return "epoch";
  if (a.cursor_order_index != b.cursor_order_index) return "cursor_order_index";
  if (a.cursor_offset_in_doc != b.cursor_offset_in_doc) return "cursor_offset_in_doc";
  if (a.data_seed != b.data_seed) return "data_seed";
  if (a.rng_state != b.rng_state) return "rng_state";
  if (std::memcmp(&a.loss_scale, &b.loss_scale, sizeof(double)) != 0) return "loss_scale";
  if (a.resolved_config != b.resolved_config) return "resolved_config";
  if (a.run_id != b.run_id) return "run_id";
  return nullptr;
}

// Validates the checkpoint in `dir` whose step (from its name) is `step`.
CheckpointRef inspect_dir(const std::string& dir, int64_t step, CheckpointCheck check) {
  if (!is_directory(dir)) throw InputError(dir, "directory", "a checkpoint directory", "no such directory");
  std::map<int, std::set<int>> ranks_by_world;
  for (const std::string& name : list_dir(dir))
    if (auto rn = parse_rank_file_name(name)) ranks_by_world[rn->world].insert(rn->rank);
  if (ranks_by_world.empty())
    throw InputError(dir, "rank files", "rank-00000-of-NNNNN.h5 ... (one HDF5 file per rank)", "none");
  const int world = ranks_by_world.begin()->first;
  if (ranks_by_world.size() > 1)
    throw InputError(join(dir, checkpoint_rank_file_name(*std::next(ranks_by_world.begin())->second.begin(),
                                                         std::next(ranks_by_world.begin())->first)),
                     "file name", "world size " + std::to_string(world) + " like the other rank files",
                     "world size " + std::to_string(std::next(ranks_by_world.begin())->first));
  for (int r = 0; r < world; ++r)
    if (!ranks_by_world[world].count(r))
      throw InputError(join(dir, checkpoint_rank_file_name(r, world)), "file",
                       "an existing rank file (" + std::to_string(world) + " ranks)", "missing");

  CheckpointRef ref;
  ref.dir = dir;
  ref.step = step;
  ref.world_size = world;
  RankFileMeta first;
  int64_t next_begin = 0;
  for (int r = 0; r < world; ++r) {
    const std::string path = join(dir, checkpoint_rank_file_name(r, world));
    RankFileMeta m = read_rank_meta(path);
    if (m.rank != r) throw InputError(path, "root attribute rank", std::to_string(r) + " (from the file name)", std::to_string(m.rank));
    if (m.world_size != world)
      throw InputError(path, "root attribute world_size", std::to_string(world) + " (from the file name)",
                       std::to_string(m.world_size));
    if (m.state.step != step)
      throw InputError(path, "/trainer_state attribute step", std::to_string(step) + " (from the directory name)",
                       std::to_string(m.state.step));
    if (r == 0) {
      ref.total_len = m.total_len;
    } else {
      const std::string r0 = checkpoint_rank_file_name(0, world);
      if (m.total_len != first.total_len)
        throw InputError(path, "root attribute total_len", std::to_string(first.total_len) + " as in " + r0,
                         std::to_string(m.total_len));
      const long d = first_difference(first.table, m.table);
      if (d >= 0)
        throw InputError(path, "/param_table", "the same table as " + r0,
                         "a difference at tensor #" + std::to_string(d));
      if (const char* field = trainer_state_difference(first.state, m.state))
        throw InputError(path, std::string("/trainer_state attribute ") + field, "the same value as in " + r0,
                         "a different value");
    }
    if (m.shard_begin != next_begin)
      throw InputError(path, "root attribute shard_begin",
                       std::to_string(next_begin) + " (shards of ranks 0.." + std::to_string(world - 1) +
                           " tile the flat space in rank order)",
                       std::to_string(m.shard_begin));
    next_begin += m.shard_len;
    ref.files.push_back({path, m.shard_begin, m.shard_len});
    if (r == 0) first = std::move(m);
  }
  if (next_begin != ref.total_len)
    throw InputError(ref.files.back().path, "root attribute shard_len",
                     "shards ending at total_len = " + std::to_string(ref.total_len),
                     "the last shard ending at " + std::to_string(next_begin));
  if (check == CheckpointCheck::kFull)
    for (const CheckpointRankFile& f : ref.files) verify_tensor_data(f.path, f.shard_len);
  return ref;
}

// The step directory that a `latest` file names, or an InputError.
std::string read_latest(const std::string& latest_path, int64_t* step) {
  std::string text = read_text_file(latest_path);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) text.pop_back();
  const auto s = parse_prefixed_step(text, kStepPrefix);
  if (!s || text.find('/') != std::string::npos)
    throw InputError(latest_path, "content", "a checkpoint directory name like step-00000100",
                     "'" + printable(text) + "'");
  *step = *s;
  return text;
}

}  // namespace

// ---- public API ----------------------------------------------------------------------------------

std::string checkpoint_dir_name(int64_t step) { return kStepPrefix + zero_padded(step, 8); }

std::string checkpoint_rank_file_name(int rank, int world_size) {
  return "rank-" + zero_padded(rank, 5) + "-of-" + zero_padded(world_size, 5) + ".h5";
}

CheckpointWriter::CheckpointWriter(std::string root, int keep_last) : root_(std::move(root)), keep_last_(keep_last) {}

std::string CheckpointWriter::tmp_dir(int64_t step) const { return join(root_, kTmpPrefix + zero_padded(step, 8)); }

std::string CheckpointWriter::begin(int64_t step) {
  LT_CHECK(step >= 0, "checkpoint step must be non-negative");
  std::error_code ec;
  fs::create_directories(root_, ec);
  if (ec) throw IoError("mkdir(" + root_ + "): " + ec.message());
  // Whatever a crashed writer left behind.
  for (const std::string& name : list_dir(root_)) {
    const std::string path = join(root_, name);
    // (".latest.tmp.*": write_file_atomic's temporary file of `latest`, killed before its rename.)
    if (name.starts_with(kTmpPrefix) || name.starts_with(kDeletingPrefix) || name.starts_with(".latest.tmp.")) {
      remove_tree(path);
    } else if (auto s = parse_prefixed_step(name, kReplacedPrefix)) {
      // A crash between the two renames of a replacement: the old checkpoint is complete.
      const std::string target = join(root_, checkpoint_dir_name(*s));
      if (exists(target))
        remove_tree(path);
      else
        rename_or_throw(path, target);
    }
  }
  const std::string tmp = tmp_dir(step);
  make_dir(tmp);
  fsync_path(root_, true);
  return tmp;
}

namespace {

// A rank file under its temporary name with every HDF5 object in place; the tensor data is written
// into the datasets' allocated space by pwrite.
struct PendingRankFile {
  std::string path, tmp;  // final name; temporary name
  const float* tensors[3] = {};
  size_t n = 0;
  uint64_t offsets[3] = {};
};

// Removes a temporary file unless disarmed.
struct UnlinkGuard {
  const std::string& p;
  bool armed = true;
  ~UnlinkGuard() {
    if (armed) ::unlink(p.c_str());
  }
};

void check_write_rank_args(const std::string& tmp_dir, const CheckpointShard& shard, const ParamTable& table,
                           const TrainerState& state) {
  const std::string dir_name = fs::path(tmp_dir).filename().string();
  const auto dir_step = parse_prefixed_step(dir_name, kTmpPrefix);
  LT_CHECK(dir_step.has_value(), "write_rank needs the directory CheckpointWriter::begin returned, got " + tmp_dir);
  LT_CHECK(*dir_step == state.step, "trainer state step " + std::to_string(state.step) + " written into " + tmp_dir);
  LT_CHECK(shard.world_size >= 1 && shard.rank >= 0 && shard.rank < shard.world_size, "bad rank / world size");
  LT_CHECK(shard.total_len == table.total_elements(), "shard.total_len differs from the parameter table's length");
  LT_CHECK(shard.shard_begin >= 0 && shard.shard_len >= 0 && shard.shard_begin <= shard.total_len - shard.shard_len,
           "shard outside [0, total_len)");
  LT_CHECK(shard.shard_len == 0 || (shard.master && shard.exp_avg && shard.exp_avg_sq), "null shard pointer");
  for (const std::string* s : {&state.rng_state, &state.resolved_config, &state.run_id})
    LT_CHECK(s->find('\0') == std::string::npos, "trainer state strings cannot hold NUL bytes");
}

// A 1-D float32 dataset of n elements, contiguous, its space allocated at creation and never
// filled (every byte is written by pwrite_tensor). Returns it open, with its data's file offset.
H5Id create_tensor_dataset(const H5& h5, hid_t file, const char* name, size_t n, uint64_t* offset) {
  H5Id dcpl = h5.id(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, "H5Pcreate", name);
  h5.check(H5Pset_layout(dcpl.get(), H5D_CONTIGUOUS), "H5Pset_layout", name);
  h5.check(H5Pset_alloc_time(dcpl.get(), H5D_ALLOC_TIME_EARLY), "H5Pset_alloc_time", name);
  h5.check(H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER), "H5Pset_fill_time", name);
  const hsize_t dim = n;
  H5Id space = h5.id(H5Screate_simple(1, &dim, nullptr), H5Sclose, "H5Screate_simple", name);
  H5Id ds = h5.id(H5Dcreate2(file, name, H5T_IEEE_F32LE, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT), H5Dclose,
                  "H5Dcreate2", name);
  *offset = 0;
  if (n > 0) {
    const haddr_t off = H5Dget_offset(ds.get());
    if (off == HADDR_UNDEF) throw h5.error("H5Dget_offset", name);
    *offset = uint64_t(off);
  }
  return ds;
}

// Creates the rank file under a temporary name in tmp_dir. With `checksums` null the tensor data
// is written too (pwrite, one thread per tensor, checksummed on the way); otherwise the datasets
// are only allocated, get checksums[i] as their checksum, and the data is left to
// finish_rank_file(.., true). Throws after removing the temporary file.
PendingRankFile create_rank_file(const std::string& tmp_dir, const CheckpointShard& shard, const ParamTable& table,
                                 const TrainerState& state, const uint64_t* checksums) {
  check_write_rank_args(tmp_dir, shard, table, state);
  PendingRankFile f;
  f.path = join(tmp_dir, checkpoint_rank_file_name(shard.rank, shard.world_size));
  f.tmp = temp_path_for(f.path);
  f.tensors[0] = shard.master;
  f.tensors[1] = shard.exp_avg;
  f.tensors[2] = shard.exp_avg_sq;
  f.n = size_t(shard.shard_len);
  const std::string& tmp = f.tmp;
  quiet_hdf5(tmp);
  const H5 h5{tmp};
  UnlinkGuard guard{tmp};
  {
    H5Id fapl = file_access_plist(h5, true);
    H5Id file = h5.id(H5Fcreate(tmp.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl.get()), H5Fclose, "H5Fcreate", "");
    {
      H5Id root = h5.id(H5Gopen2(file.get(), "/", H5P_DEFAULT), H5Gclose, "H5Gopen2", "/");
      write_i64_attr(h5, root.get(), "shard_begin", shard.shard_begin);
      write_i64_attr(h5, root.get(), "shard_len", shard.shard_len);
      write_i64_attr(h5, root.get(), "total_len", shard.total_len);
      write_i64_attr(h5, root.get(), "rank", shard.rank);
      write_i64_attr(h5, root.get(), "world_size", shard.world_size);
      h5.check(root.close(), "H5Gclose", "/");
    }
    {
      H5Id ds[3];
      for (int i = 0; i < 3; ++i) ds[i] = create_tensor_dataset(h5, file.get(), kTensorNames[i], f.n, &f.offsets[i]);
      uint64_t sums[3];
      if (checksums) {
        std::copy(checksums, checksums + 3, sums);
      } else {
        // The data goes into the allocated space through a second descriptor while HDF5 holds the
        // file open: HDF5 never touches a dataset's raw data space unless asked to.
        UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CLOEXEC));
        if (fd.get() < 0) throw IoError("open(" + tmp + "): " + errno_text(errno));
        run_per_tensor([&](int i) { sums[i] = pwrite_tensor(fd.get(), tmp, f.tensors[i], f.n, f.offsets[i], true); });
        fd.close(tmp);
      }
      for (int i = 0; i < 3; ++i) {
        write_u64_attr(h5, ds[i].get(), kChecksumAttr, sums[i]);
        h5.check(ds[i].close(), "H5Dclose", kTensorNames[i]);
      }
    }
    {
      const auto& entries = table.entries();
      std::vector<std::string> names;
      std::vector<const char*> name_ptrs;
      std::vector<int64_t> offsets, numel, ndims, shapes;
      for (const ParamEntry& e : entries) names.push_back(e.name);
      for (const std::string& s : names) name_ptrs.push_back(s.c_str());
      for (const ParamEntry& e : entries) {
        offsets.push_back(e.offset);
        numel.push_back(e.numel);
        ndims.push_back(int64_t(e.shape.size()));
        shapes.insert(shapes.end(), e.shape.begin(), e.shape.end());
      }
      H5Id grp = h5.id(H5Gcreate2(file.get(), "/param_table", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose,
                       "H5Gcreate2", "/param_table");
      H5Id str = vlen_string_type(h5, "/param_table/names");
      write_dataset(h5, grp.get(), "names", str.get(), str.get(), name_ptrs.size(), name_ptrs.data(), xxh3_strings(names));
      auto write_i64 = [&](const char* name, const std::vector<int64_t>& v) {
        write_dataset(h5, grp.get(), name, H5T_STD_I64LE, H5T_NATIVE_INT64, v.size(), v.data(),
                      xxh3(v.data(), v.size() * sizeof(int64_t)));
      };
      write_i64("offsets", offsets);
      write_i64("numel", numel);
      write_i64("ndims", ndims);
      write_i64("shapes", shapes);
      h5.check(grp.close(), "H5Gclose", "/param_table");
    }
    {
      TrainerState s = state;
      s.format_version = kCheckpointFormatVersion;
      H5Id grp = h5.id(H5Gcreate2(file.get(), "/trainer_state", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose,
                       "H5Gcreate2", "/trainer_state");
      const hid_t g = grp.get();
      write_i64_attr(h5, g, "step", s.step);
      write_i64_attr(h5, g, "tokens_seen", s.tokens_seen);
      write_i64_attr(h5, g, "epoch", s.epoch);
      write_i64_attr(h5, g, "cursor_order_index", s.cursor_order_index);
      write_i64_attr(h5, g, "cursor_offset_in_doc", s.cursor_offset_in_doc);
      write_u64_attr(h5, g, "data_seed", s.data_seed);
      write_str_attr(h5, g, "rng_state", s.rng_state);
      write_scalar_attr(h5, g, "loss_scale", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, s.loss_scale);
      write_str_attr(h5, g, "resolved_config", s.resolved_config);
      write_str_attr(h5, g, "run_id", s.run_id);
      write_i64_attr(h5, g, "format_version", s.format_version);
      write_u64_attr(h5, g, kChecksumAttr, trainer_state_checksum(s));
      h5.check(grp.close(), "H5Gclose", "/trainer_state");
    }
    h5.check(file.close(), "H5Fclose", "");
  }
  guard.armed = false;
  return f;
}

// Writes the tensor data when `write_data` (no HDF5 calls: may run in another thread), fsyncs the
// file and renames it into place. Removes the temporary file on failure.
void finish_rank_file(const PendingRankFile& f, bool write_data) {
  UnlinkGuard guard{f.tmp};
  if (write_data) {
    UniqueFd fd(::open(f.tmp.c_str(), O_WRONLY | O_CLOEXEC));
    if (fd.get() < 0) throw IoError("open(" + f.tmp + "): " + errno_text(errno));
    run_per_tensor([&](int i) { pwrite_tensor(fd.get(), f.tmp, f.tensors[i], f.n, f.offsets[i], false); });
    fd.close(f.tmp);
  }
  fsync_path(f.tmp);
  rename_durable(f.tmp, f.path);
  guard.armed = false;
}

}  // namespace

void CheckpointWriter::write_rank(const std::string& tmp_dir, const CheckpointShard& shard, const ParamTable& table,
                                  const TrainerState& state) {
  finish_rank_file(create_rank_file(tmp_dir, shard, table, state, nullptr), false);
}

void CheckpointWriter::commit(int64_t step, const std::string& tmp, int world_size) {
  LT_CHECK(world_size >= 1, "world_size must be positive");
  LT_CHECK(tmp == tmp_dir(step), "commit(" + std::to_string(step) + ") of " + tmp + ", expected " + tmp_dir(step));
  for (int r = 0; r < world_size; ++r) {
    const std::string name = checkpoint_rank_file_name(r, world_size);
    if (!exists(join(tmp, name)))
      throw IoError("commit(" + tmp + "): " + name + " is missing: rank " + std::to_string(r) +
                    " did not write its shard; the checkpoint is not committed");
  }
  const CheckpointRef ref = inspect_dir(tmp, step, CheckpointCheck::kStructure);
  if (ref.world_size != world_size)
    throw IoError("commit(" + tmp + "): rank files for " + std::to_string(ref.world_size) + " ranks, expected " +
                  std::to_string(world_size));
  fsync_path(tmp, true);

  const std::string name = checkpoint_dir_name(step);
  const std::string final_dir = join(root_, name);
  if (exists(final_dir)) {
    // Replace an existing checkpoint of this step without a moment where it is gone and the new
    // one is not in place.
    bool swapped = false;
#ifdef RENAME_EXCHANGE
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
      swapped = true;  // tmp now holds the old checkpoint
      fsync_path(root_, true);
      remove_tree(tmp);
    } else if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP && errno != EOPNOTSUPP) {
      throw IoError("renameat2(" + tmp + " <-> " + final_dir + ", RENAME_EXCHANGE): " + errno_text(errno));
    }
#endif
    if (!swapped) {
      // No atomic exchange on this file system: old -> .replaced-step-N, new -> step-N. A crash
      // in between leaves the complete old one as .replaced-step-N, which readers fall back to and
      // the next begin() renames back.
      const std::string replaced = join(root_, kReplacedPrefix + zero_padded(step, 8));
      if (exists(replaced)) remove_tree(replaced);
      rename_or_throw(final_dir, replaced);
      rename_or_throw(tmp, final_dir);
      fsync_path(root_, true);
      remove_tree(replaced);
    }
  } else {
    rename_or_throw(tmp, final_dir);
  }
  fsync_path(root_, true);
  write_file_atomic(join(root_, "latest"), name + "\n");
  prune(step);
}

void CheckpointWriter::prune(int64_t just_written) {
  if (keep_last_ <= 0) return;
  std::vector<int64_t> steps;
  for (const std::string& name : list_dir(root_))
    if (auto s = parse_prefixed_step(name, kStepPrefix); s && *s <= just_written && is_directory(join(root_, name)))
      steps.push_back(*s);
  std::sort(steps.rbegin(), steps.rend());  // newest first; steps[0] == just_written
  if (steps.size() <= size_t(keep_last_)) return;
  std::vector<std::string> doomed;
  for (size_t i = size_t(keep_last_); i < steps.size(); ++i) {
    if (steps[i] == just_written) continue;
    // Renamed first so that a crash during the removal never leaves a partial step-* directory.
    const std::string deleting = join(root_, kDeletingPrefix + zero_padded(steps[i], 8));
    if (exists(deleting)) remove_tree(deleting);
    rename_or_throw(join(root_, checkpoint_dir_name(steps[i])), deleting);
    doomed.push_back(deleting);
  }
  fsync_path(root_, true);
  for (const std::string& d : doomed) remove_tree(d);
}

CheckpointRef open_checkpoint(const std::string& path, CheckpointCheck check) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0)
    throw InputError(path, "checkpoint", "a step directory or a 'latest' file", "no such file or directory");
  if (!S_ISDIR(st.st_mode)) {
    int64_t step = 0;
    const std::string name = read_latest(path, &step);
    std::string parent = fs::path(path).parent_path().string();
    if (parent.empty()) parent = ".";
    return inspect_dir(join(parent, name), step, check);
  }
  fs::path p = fs::path(path).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();  // a trailing slash
  const std::string name = p.filename().string();
  if (auto s = parse_prefixed_step(name, kStepPrefix)) return inspect_dir(path, *s, check);
  if (auto s = parse_prefixed_step(name, kReplacedPrefix)) return inspect_dir(path, *s, check);
  if (exists(join(path, "latest"))) return open_checkpoint(join(path, "latest"), check);
  throw InputError(path, "checkpoint", "a step-NNNNNNNN directory, or a checkpoint root holding 'latest'",
                   "a directory of neither kind");
}

std::optional<CheckpointRef> find_latest_checkpoint(const std::string& root, std::vector<std::string>* warnings,
                                                    CheckpointCheck check) {
  auto warn = [&](const std::string& w) {
    if (warnings) warnings->push_back(one_line(w));
  };
  if (!exists(root)) return std::nullopt;
  if (!is_directory(root)) {
    warn(root + ": checkpoint root: expected a directory, got a file");
    return std::nullopt;
  }
  // Complete checkpoints: step-N, and .replaced-step-N whose step-N is gone (a crash in the middle
  // of a replacement). Newest first; step-N before .replaced-step-N.
  struct Candidate {
    int64_t step;
    bool replaced;
    std::string name;
  };
  std::vector<Candidate> candidates;
  const std::vector<std::string> names = list_dir(root);
  const std::set<std::string> name_set(names.begin(), names.end());
  for (const std::string& name : names) {
    if (auto s = parse_prefixed_step(name, kStepPrefix)) {
      if (is_directory(join(root, name))) candidates.push_back({*s, false, name});
    } else if (auto r = parse_prefixed_step(name, kReplacedPrefix)) {
      if (!name_set.count(checkpoint_dir_name(*r)) && is_directory(join(root, name)))
        candidates.push_back({*r, true, name});
    }
  }
  std::sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    return a.step != b.step ? a.step > b.step : (!a.replaced && b.replaced);
  });

  auto try_open = [&](const std::string& name, int64_t step) -> std::optional<CheckpointRef> {
    try {
      return inspect_dir(join(root, name), step, check);
    } catch (const InputError& e) {
      warn(std::string("skipping checkpoint: ") + e.what());
    } catch (const SystemError& e) {
      warn(std::string("skipping checkpoint ") + join(root, name) + ": " + e.what());
    }
    return std::nullopt;
  };

  const std::string latest = join(root, "latest");
  std::string tried;
  if (exists(latest)) {
    try {
      int64_t step = 0;
      const std::string name = read_latest(latest, &step);
      tried = name;
      if (!is_directory(join(root, name))) {
        warn(latest + ": names " + name + ", which does not exist; using the newest complete checkpoint");
      } else if (auto ref = try_open(name, step)) {
        return ref;
      }
    } catch (const InputError& e) {
      warn(std::string(e.what()) + "; using the newest complete checkpoint");
    } catch (const SystemError& e) {
      warn(latest + ": " + e.what() + "; using the newest complete checkpoint");
    }
  } else if (!candidates.empty()) {
    warn(latest + ": missing; using the newest complete checkpoint");
  }
  for (const Candidate& c : candidates) {
    if (c.name == tried) continue;
    if (auto ref = try_open(c.name, c.step)) return ref;
  }
  return std::nullopt;
}

TrainerState read_trainer_state(const CheckpointRef& ref) {
  LT_CHECK(!ref.files.empty(), "empty CheckpointRef");
  const std::string& path = ref.files[0].path;
  quiet_hdf5(path);
  const H5 h5{path};
  H5Id file = open_rank_file(h5);
  TrainerState s = read_trainer_state_group(h5, file.get());
  h5.check(file.close(), "H5Fclose", "");
  return s;
}

std::vector<ParamEntry> read_checkpoint_param_table(const CheckpointRef& ref) {
  LT_CHECK(!ref.files.empty(), "empty CheckpointRef");
  const std::string& path = ref.files[0].path;
  quiet_hdf5(path);
  const H5 h5{path};
  H5Id file = open_rank_file(h5);
  std::vector<ParamEntry> t = read_param_table_group(h5, file.get(), ref.total_len);
  h5.check(file.close(), "H5Fclose", "");
  return t;
}

void check_param_table(const CheckpointRef& ref, const ParamTable& model) {
  const std::vector<ParamEntry> saved = read_checkpoint_param_table(ref);
  const std::string& path = ref.files[0].path;
  const std::vector<ParamEntry>& cur = model.entries();
  const long d = first_difference(cur, saved);
  if (d >= 0) {
    const size_t i = size_t(d);
    const std::string expected =
        "tensor #" + std::to_string(d) + " " + (i < cur.size() ? entry_text(cur[i]) : "absent") + " as in the current model";
    const std::string got = i < saved.size() ? entry_text(saved[i]) : "no tensor #" + std::to_string(d);
    throw InputError(path, "/param_table", expected, got);
  }
  if (ref.total_len != model.total_elements())
    throw InputError(path, "root attribute total_len",
                     std::to_string(model.total_elements()) + " (the current model's flat length)",
                     std::to_string(ref.total_len));
}

void read_shard(const CheckpointRef& ref, int64_t begin, int64_t len, float* master, float* exp_avg,
                float* exp_avg_sq) {
  LT_CHECK(begin >= 0 && len >= 0 && begin <= ref.total_len - len,
           "read_shard range [" + std::to_string(begin) + ", +" + std::to_string(len) + ") outside the checkpoint's " +
               std::to_string(ref.total_len) + " elements");
  float* outs[3] = {master, exp_avg, exp_avg_sq};
  const bool want[3] = {master != nullptr, exp_avg != nullptr, exp_avg_sq != nullptr};
  if (!want[0] && !want[1] && !want[2]) return;
  for (const CheckpointRankFile& f : ref.files) {
    const int64_t a = std::max(begin, f.shard_begin), b = std::min(begin + len, f.shard_begin + f.shard_len);
    if (a >= b) continue;
    float* const dst[3] = {master ? outs[0] + (a - begin) : nullptr, exp_avg ? outs[1] + (a - begin) : nullptr,
                           exp_avg_sq ? outs[2] + (a - begin) : nullptr};
    stream_rank_tensors(f.path, f.shard_len, want, a - f.shard_begin, b - f.shard_begin, dst);
  }
}

// ---- AsyncCheckpointWriter ---------------------------------------------------------------------

namespace {

bool hdf5_threadsafe() {
  hbool_t t = 0;
  return H5is_library_threadsafe(&t) >= 0 && t;
}

// Copies n floats and returns their XXH3-64, hashing each piece of the copy while it is in cache.
uint64_t copy_and_hash(float* dst, const float* src, size_t n) {
  Xxh3 h;
  const size_t piece = kHashPiece / sizeof(float);
  for (size_t i = 0; i < n; i += piece) {
    const size_t k = std::min(piece, n - i);
    std::memcpy(dst + i, src + i, k * sizeof(float));
    h.update(dst + i, k * sizeof(float));
  }
  return h.digest();
}

}  // namespace

AsyncCheckpointWriter::AsyncCheckpointWriter(std::string root, int keep_last)
    : writer_(std::move(root), keep_last), commit_in_background_(hdf5_threadsafe()) {}

AsyncCheckpointWriter::~AsyncCheckpointWriter() {
  try {
    wait();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "longtune: background checkpoint write failed: %s\n", one_line(e.what()).c_str());
  }
}

void AsyncCheckpointWriter::wait() {
  if (worker_.joinable()) worker_.join();
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    deferred_commit_step_ = -1;
    std::rethrow_exception(e);
  }
  if (deferred_commit_step_ >= 0) {
    const int64_t step = deferred_commit_step_;
    deferred_commit_step_ = -1;
    writer_.commit(step, writer_.tmp_dir(step), deferred_commit_world_);
  }
}

CheckpointShard AsyncCheckpointWriter::stage(size_t slot, const CheckpointShard& shard, uint64_t checksums[3]) {
  if (staged_.size() <= slot) staged_.resize(slot + 1);
  Staged& st = staged_[slot];
  const size_t n = size_t(shard.shard_len);
  if (st.capacity < 3 * n) {
    st.data.reset();
    st.data.reset(new float[3 * n]);  // not value-initialized: the copy is the first touch
    st.capacity = 3 * n;
  }
  CheckpointShard s = shard;
  float* p = st.data.get();
  s.master = p;
  s.exp_avg = p + n;
  s.exp_avg_sq = p + 2 * n;
  const float* from[3] = {shard.master, shard.exp_avg, shard.exp_avg_sq};
  float* to[3] = {p, p + n, p + 2 * n};
  run_per_tensor([&](int i) { checksums[i] = copy_and_hash(to[i], from[i], n); });
  return s;
}

void AsyncCheckpointWriter::save(int64_t step, const std::vector<CheckpointShard>& shards, const ParamTable& table,
                                 const TrainerState& state) {
  wait();
  LT_CHECK(!shards.empty(), "AsyncCheckpointWriter::save needs at least one shard");
  for (size_t i = 0; i < shards.size(); ++i)
    LT_CHECK(shards[i].rank == int(i) && shards[i].world_size == int(shards.size()),
             "AsyncCheckpointWriter::save needs the shards of ranks 0 .. world_size-1 in order");
  const std::string tmp = writer_.begin(step);
  std::vector<PendingRankFile> files;
  for (size_t i = 0; i < shards.size(); ++i) {
    uint64_t sums[3];
    const CheckpointShard s = stage(i, shards[i], sums);
    files.push_back(create_rank_file(tmp, s, table, state, sums));
  }
  const int world = int(shards.size());
  const bool commit_here = commit_in_background_;
  if (!commit_here) {
    deferred_commit_step_ = step;
    deferred_commit_world_ = world;
  }
  worker_ = std::thread([this, files = std::move(files), step, tmp, world, commit_here] {
    try {
      for (const PendingRankFile& f : files) finish_rank_file(f, true);
      if (commit_here) writer_.commit(step, tmp, world);
    } catch (...) {
      error_ = std::current_exception();
      for (const PendingRankFile& f : files) ::unlink(f.tmp.c_str());
    }
  });
}

void AsyncCheckpointWriter::write_rank_async(const std::string& tmp_dir, const CheckpointShard& shard,
                                             const ParamTable& table, const TrainerState& state) {
  wait();
  check_write_rank_args(tmp_dir, shard, table, state);
  uint64_t sums[3];
  const CheckpointShard s = stage(0, shard, sums);
  PendingRankFile f = create_rank_file(tmp_dir, s, table, state, sums);
  worker_ = std::thread([this, f = std::move(f)] {
    try {
      finish_rank_file(f, true);
    } catch (...) {
      error_ = std::current_exception();
    }
  });
}

namespace checkpoint_testing {
void set_read_piece_elems(int64_t n) {
  LT_CHECK(n >= 1, "piece size must be positive");
  g_piece_elems = n;
}
void set_fail_data_writes(bool fail) { g_fail_data_writes.store(fail); }
}  // namespace checkpoint_testing

}  // namespace longtune
