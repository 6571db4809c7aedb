#include "io/safetensors.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>

#include "io/atomic_file.hpp"
#include "io/json_util.hpp"
#include "src/common/error.hpp"

namespace longtune {
namespace {

namespace fs = std::filesystem;
using jsonutil::describe;
using jsonutil::json;

// The reference implementation (safetensors crate) refuses headers above 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Elements converted per step when reading or writing non-fp32 tensors.
constexpr size_t kChunkElems = size_t(1) << 22;

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

bool is_floating(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64; }

UniqueFd open_for_reading(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    const int e = errno;
    if (e == ENOENT) throw InputError(path, "file", "an existing safetensors file", "no such file");
    if (e == EACCES) throw InputError(path, "file", "a readable file", errno_text(e));
    throw IoError("open(" + path + "): " + errno_text(e));
  }
  return fd;
}

// Reads exactly n bytes of tensor `t` at absolute file offset `off`; a short read means the file
// shrank after it was opened and validated.
void read_tensor_bytes(int fd, const std::string& path, const TensorInfo& t, uint64_t off, void* dst, size_t n) {
  const size_t got = pread_full(fd, dst, n, off, path);
  if (got != n)
    throw InputError(path, t.name, std::to_string(n) + " bytes at file offset " + std::to_string(off),
                     "only " + std::to_string(got) + " (file truncated after it was opened)");
}

uint64_t tensor_bytes(const TensorToWrite& t) {
  uint64_t n = 1;
  for (int64_t d : t.shape) n *= uint64_t(d);
  return n * dtype_size(t.dtype);
}

void remove_if_present(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) throw IoError("unlink(" + path + "): " + errno_text(errno));
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ---- SafetensorsFile --------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(std::string path) : path_(std::move(path)) {
  UniqueFd fd = open_for_reading(path_);
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) throw IoError("fstat(" + path_ + "): " + errno_text(errno));
  if (S_ISDIR(st.st_mode)) throw InputError(path_, "file", "a safetensors file", "a directory");
  const uint64_t size = uint64_t(st.st_size);
  if (size < 8)
    throw InputError(path_, "header length", "at least 8 bytes (u64 header length)",
                     "a file of " + std::to_string(size) + " bytes");
  unsigned char len_bytes[8];
  if (pread_full(fd.get(), len_bytes, 8, 0, path_) != 8)
    throw InputError(path_, "header length", "8 readable bytes", "a shorter file");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];  // little-endian
  if (n > size - 8)
    throw InputError(path_, "header length",
                     "a header within the file (at most " + std::to_string(size - 8) + " bytes)",
                     std::to_string(n) + " bytes, header pointing past the end of the file");
  if (n > kMaxHeaderBytes)
    throw InputError(path_, "header length", "at most " + std::to_string(kMaxHeaderBytes) + " bytes",
                     std::to_string(n));
  std::string text(size_t(n), '\0');
  if (pread_full(fd.get(), text.data(), text.size(), 8, path_) != text.size())
    throw InputError(path_, "header", std::to_string(n) + " bytes", "a shorter file");
  fd.close(path_);

  const json header = jsonutil::parse(text, path_, "header");
  if (!header.is_object()) throw InputError(path_, "header", "a JSON object", describe(header));
  data_start_ = 8 + n;
  const uint64_t data_size = size - data_start_;

  for (const auto& [key, v] : header.items()) {
    if (key == "__metadata__") {
      if (!v.is_object()) throw InputError(path_, key, "an object of string values", describe(v));
      for (const auto& [mk, mv] : v.items()) {
        if (!mv.is_string()) throw InputError(path_, key + "." + mk, "a string", describe(mv));
        metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    if (!v.is_object())
      throw InputError(path_, key, "an object with dtype, shape and data_offsets", describe(v));
    TensorInfo t;
    t.name = key;

    auto dt = v.find("dtype");
    if (dt == v.end()) throw InputError(path_, key + ".dtype", "a dtype name", "missing");
    if (!dt->is_string()) throw InputError(path_, key + ".dtype", "a dtype name", describe(*dt));
    if (!parse_dtype(dt->get<std::string>(), &t.dtype))
      throw InputError(path_, key + ".dtype", "one of F32, F16, BF16, F64, I32, I64, U8",
                       "\"" + dt->get<std::string>() + "\" (unsupported dtype)");

    auto sh = v.find("shape");
    if (sh == v.end()) throw InputError(path_, key + ".shape", "a list of non-negative integers", "missing");
    if (!sh->is_array()) throw InputError(path_, key + ".shape", "a list of non-negative integers", describe(*sh));
    uint64_t numel = 1;
    bool overflow = false;
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > uint64_t(INT64_MAX))
        throw InputError(path_, key + ".shape", "a list of non-negative integers", describe(*sh));
      t.shape.push_back(int64_t(d.get<uint64_t>()));
      overflow = overflow || __builtin_mul_overflow(numel, d.get<uint64_t>(), &numel);
    }
    uint64_t nbytes = 0;
    overflow = overflow || __builtin_mul_overflow(numel, uint64_t(dtype_size(t.dtype)), &nbytes);
    if (overflow || numel > uint64_t(INT64_MAX))
      throw InputError(path_, key + ".shape", "a shape whose byte size fits in 64 bits", describe(*sh));

    auto off = v.find("data_offsets");
    if (off == v.end()) throw InputError(path_, key + ".data_offsets", "[begin, end]", "missing");
    if (!off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned())
      throw InputError(path_, key + ".data_offsets", "[begin, end] (two non-negative integers)", describe(*off));
    t.begin = (*off)[0].get<uint64_t>();
    t.end = (*off)[1].get<uint64_t>();
    if (t.begin > t.end)
      throw InputError(path_, key + ".data_offsets", "begin <= end", describe(*off));
    if (t.end - t.begin != nbytes)
      throw InputError(path_, key + ".data_offsets",
                       "end - begin = " + std::to_string(nbytes) + " bytes (shape " + shape_text(t.shape) +
                           " of " + std::string(dtype_name(t.dtype)) + ")",
                       describe(*off) + " (" + std::to_string(t.end - t.begin) + " bytes)");
    if (t.end > data_size)
      throw InputError(path_, key + ".data_offsets",
                       "a range within the data section (" + std::to_string(data_size) + " bytes)",
                       describe(*off) + " (file truncated?)");
    tensors_.push_back(std::move(t));
  }

  // File order, and no two non-empty ranges may share a byte.
  std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const TensorInfo* last = nullptr;
  for (const TensorInfo& t : tensors_) {
    if (t.begin == t.end) continue;
    if (last && t.begin < last->end)
      throw InputError(path_, t.name + ".data_offsets",
                       "a byte range not overlapping " + last->name + " [" + std::to_string(last->begin) + ", " +
                           std::to_string(last->end) + ")",
                       "[" + std::to_string(t.begin) + ", " + std::to_string(t.end) + ")");
    if (!last || t.end > last->end) last = &t;
  }
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  for (const TensorInfo& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

void SafetensorsFile::read_raw(const TensorInfo& t, void* dst) const {
  UniqueFd fd = open_for_reading(path_);
  read_tensor_bytes(fd.get(), path_, t, data_start_ + t.begin, dst, size_t(t.end - t.begin));
  fd.close(path_);
}

void SafetensorsFile::read_f32(const TensorInfo& t, float* dst) const { read_f32(t, 0, t.numel(), dst); }

void SafetensorsFile::read_f32(const TensorInfo& t, int64_t first, int64_t count, float* dst) const {
  if (!is_floating(t.dtype))
    throw InputError(path_, t.name + ".dtype", "a floating dtype (F32, F16, BF16, F64)",
                     std::string(dtype_name(t.dtype)));
  LT_CHECK(first >= 0 && count >= 0 && first <= t.numel() - count,
           "SafetensorsFile::read_f32: range [" + std::to_string(first) + ", +" + std::to_string(count) +
               ") outside " + t.name + " (" + std::to_string(t.numel()) + " elements)");
  if (count == 0) return;
  UniqueFd fd = open_for_reading(path_);
  const size_t esize = dtype_size(t.dtype);
  const uint64_t start = data_start_ + t.begin + uint64_t(first) * esize;
  const size_t n = size_t(count);
  if (t.dtype == DType::F32) {
    read_tensor_bytes(fd.get(), path_, t, start, dst, n * esize);
  } else {
    std::vector<unsigned char> buf(std::min(n, kChunkElems) * esize);
    for (size_t i = 0; i < n; i += kChunkElems) {
      const size_t m = std::min(kChunkElems, n - i);
      read_tensor_bytes(fd.get(), path_, t, start + i * esize, buf.data(), m * esize);
      convert_to_f32(dst + i, buf.data(), t.dtype, m);
    }
  }
  fd.close(path_);
}

// ---- SafetensorsDir ---------------------------------------------------------------------------

SafetensorsDir::SafetensorsDir(std::string dir) : dir_(std::move(dir)) {
  std::error_code ec;
  if (!fs::is_directory(dir_, ec))
    throw InputError(dir_, "directory", "an existing model directory",
                     fs::exists(dir_, ec) ? "not a directory" : "no such directory");
  const std::string index = (fs::path(dir_) / "model.safetensors.index.json").string();
  const std::string single = (fs::path(dir_) / "model.safetensors").string();
  if (fs::exists(index, ec)) {
    const json j = jsonutil::parse(read_text_file(index), index);
    if (!j.is_object()) throw InputError(index, "json", "a JSON object", describe(j));
    auto wm = j.find("weight_map");
    if (wm == j.end() || !wm->is_object() || wm->empty())
      throw InputError(index, "weight_map", "a non-empty object mapping tensor names to shard files",
                       wm == j.end() ? std::string("missing") : describe(*wm));
    std::map<std::string, std::vector<std::string>> by_shard;  // shard file -> tensor names
    for (const auto& [name, file] : wm->items()) {
      const std::string field = "weight_map." + name;
      if (!file.is_string()) throw InputError(index, field, "a shard file name", describe(file));
      const std::string f = file.get<std::string>();
      if (f.empty() || f == "." || f == ".." || f.find('/') != std::string::npos)
        throw InputError(index, field, "a file name inside the model directory", describe(file));
      by_shard[f].push_back(name);
    }
    std::map<std::string, std::string> owner;  // tensor -> shard, over every tensor of every shard
    for (const auto& [shard, names] : by_shard) {
      const std::string shard_path = (fs::path(dir_) / shard).string();
      if (!fs::exists(shard_path, ec))
        throw InputError(index, "weight_map." + names.front(), "an existing shard file " + shard,
                         "missing file " + shard_path);
      auto file = std::make_unique<SafetensorsFile>(shard_path);
      for (const std::string& name : names)
        if (!file->find(name))
          throw InputError(index, "weight_map." + name, "tensor " + name + " in " + shard,
                           "no such tensor in that file");
      for (const TensorInfo& t : file->tensors()) {
        auto [it, inserted] = owner.emplace(t.name, shard);
        if (!inserted)
          throw InputError(shard_path, t.name, "each tensor in one shard only", "also in " + it->second);
      }
      files_.push_back(std::move(file));
    }
  } else if (fs::exists(single, ec)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single));
  } else {
    throw InputError(dir_, "model.safetensors", "a safetensors file or model.safetensors.index.json",
                     "neither found");
  }
}

const TensorInfo* SafetensorsDir::find(const std::string& name, const SafetensorsFile** file) const {
  for (const auto& f : files_)
    if (const TensorInfo* t = f->find(name)) {
      if (file) *file = f.get();
      return t;
    }
  if (file) *file = nullptr;
  return nullptr;
}

std::vector<std::string> SafetensorsDir::names() const {
  std::vector<std::string> out;
  for (const auto& f : files_)
    for (const TensorInfo& t : f->tensors()) out.push_back(t.name);
  std::sort(out.begin(), out.end());
  return out;
}

void SafetensorsDir::read_f32(const std::string& name, const std::vector<int64_t>& shape, float* dst) const {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  read_f32(name, shape, 0, numel, dst);
}

void SafetensorsDir::read_f32(const std::string& name, const std::vector<int64_t>& shape, int64_t first,
                              int64_t count, float* dst) const {
  const SafetensorsFile* file = nullptr;
  const TensorInfo* t = find(name, &file);
  if (!t) throw InputError(dir_, name, "a tensor of shape " + shape_text(shape), "missing");
  if (t->shape != shape)
    throw InputError(file->path(), name, "shape " + shape_text(shape), "shape " + shape_text(t->shape));
  file->read_f32(*t, first, count, dst);
}

// ---- writing ----------------------------------------------------------------------------------

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::set<std::string> seen;
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    header["__metadata__"] = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) header["__metadata__"][k] = v;
  }
  uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    LT_CHECK(!t.name.empty() && t.name != "__metadata__", "write_safetensors: bad tensor name '" + t.name + "'");
    LT_CHECK(seen.insert(t.name).second, "write_safetensors: duplicate tensor " + t.name);
    LT_CHECK(is_floating(t.dtype), "write_safetensors: " + t.name + ": dtype must be F32, F16, BF16 or F64");
    for (int64_t d : t.shape) LT_CHECK(d >= 0, "write_safetensors: " + t.name + ": negative dimension");
    const uint64_t bytes = tensor_bytes(t);
    LT_CHECK(t.data != nullptr || bytes == 0, "write_safetensors: " + t.name + ": no data");
    header[t.name] = {{"dtype", std::string(dtype_name(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned

  AtomicFile out(path);
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(uint64_t(text.size()) >> (8 * i));
  out.write(len, 8);
  out.write(text.data(), text.size());
  std::vector<unsigned char> buf;
  for (const TensorToWrite& t : tensors) {
    const size_t n = size_t(tensor_bytes(t) / dtype_size(t.dtype));
    if (t.dtype == DType::F32) {
      out.write(t.data, n * 4);
      continue;
    }
    const size_t esize = dtype_size(t.dtype);
    buf.resize(std::min(n, kChunkElems) * esize);
    for (size_t i = 0; i < n; i += kChunkElems) {
      const size_t m = std::min(kChunkElems, n - i);
      convert_from_f32(buf.data(), t.data + i, t.dtype, m);
      out.write(buf.data(), m * esize);
    }
  }
  out.commit();
}

void write_safetensors_dir(const std::string& dir, const std::vector<TensorToWrite>& tensors,
                           uint64_t max_shard_bytes) {
  LT_CHECK(max_shard_bytes > 0, "write_safetensors_dir: max_shard_bytes must be positive");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw IoError("create_directories(" + dir + "): " + ec.message());
  const std::map<std::string, std::string> metadata{{"format", "pt"}};  // transformers checks it
  const std::string index = (fs::path(dir) / "model.safetensors.index.json").string();
  const std::string single = (fs::path(dir) / "model.safetensors").string();

  uint64_t total = 0;
  for (const TensorToWrite& t : tensors) total += tensor_bytes(t);
  if (total <= max_shard_bytes) {
    write_safetensors(single, tensors, metadata);
    remove_if_present(index);  // a stale index would take precedence over the new file
    return;
  }

  // Greedy, in tensor order; a tensor larger than the limit gets a shard of its own.
  std::vector<std::vector<TensorToWrite>> shards;
  uint64_t current = 0;
  for (const TensorToWrite& t : tensors) {
    const uint64_t b = tensor_bytes(t);
    if (shards.empty() || (current + b > max_shard_bytes && !shards.back().empty())) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(t);
    current += b;
  }
  json weight_map = json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    write_safetensors((fs::path(dir) / name).string(), shards[s], metadata);
    for (const TensorToWrite& t : shards[s]) weight_map[t.name] = name;
  }
  json j = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  write_file_atomic(index, j.dump(2) + "\n");
  remove_if_present(single);  // transformers would prefer a stale model.safetensors over the shards
}

}  // namespace longtune
