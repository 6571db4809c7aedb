#include "io/token_dataset.hpp"

#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <optional>

#include "io/atomic_file.hpp"
#include "io/hdf5_util.hpp"
#include "src/common/error.hpp"

namespace longtune {
namespace {

// Elements per H5Dread when reading (and range-checking) the integer datasets.
constexpr hsize_t kReadChunk = hsize_t(1) << 20;

// An existing dataset `name` (e.g. "/tokens") of the file, or an empty id when absent.
H5Id open_dataset(const H5& h5, hid_t file, const std::string& name, bool required, const char* expected) {
  const htri_t exists = h5.check(H5Lexists(file, name.c_str(), H5P_DEFAULT), "H5Lexists", name);
  if (!exists) {
    if (required) throw InputError(h5.file, name, expected, "no such dataset");
    return H5Id();
  }
  H5Id obj = h5.id(H5Oopen(file, name.c_str(), H5P_DEFAULT), H5Oclose, "H5Oopen", name);
  const H5I_type_t kind = H5Iget_type(obj.get());
  if (kind == H5I_BADID) throw h5.error("H5Iget_type", name);
  if (kind != H5I_DATASET)
    throw InputError(h5.file, name, expected, kind == H5I_GROUP ? "a group" : "an object that is not a dataset");
  return obj;
}

// Checks that `ds` is a 1-D dataset of integers and returns its length.
hsize_t integer_1d_length(const H5& h5, hid_t ds, const std::string& name, const char* expected) {
  H5Id type = h5.id(H5Dget_type(ds), H5Tclose, "H5Dget_type", name);
  const H5T_class_t c = H5Tget_class(type.get());
  if (c < 0) throw h5.error("H5Tget_class", name);
  if (c != H5T_INTEGER) throw InputError(h5.file, name, expected, hdf5_type_text(h5, type.get(), name));
  H5Id space = h5.id(H5Dget_space(ds), H5Sclose, "H5Dget_space", name);
  const int ndims = h5.check(H5Sget_simple_extent_ndims(space.get()), "H5Sget_simple_extent_ndims", name);
  if (ndims != 1) throw InputError(h5.file, name, expected, "a " + std::to_string(ndims) + "-D dataset");
  hsize_t dim = 0;
  h5.check(H5Sget_simple_extent_dims(space.get(), &dim, nullptr), "H5Sget_simple_extent_dims", name);
  return dim;
}

// Reads the n elements of a 1-D integer dataset as int64 (HDF5 converts from the stored type),
// kReadChunk at a time; sink(first_index, values, count) sees each piece.
template <class Sink>
void read_int64_pieces(const H5& h5, hid_t ds, const std::string& name, hsize_t n, Sink&& sink) {
  H5Id fspace = h5.id(H5Dget_space(ds), H5Sclose, "H5Dget_space", name);
  std::vector<int64_t> buf(size_t(std::min(n, kReadChunk)));
  for (hsize_t start = 0; start < n; start += kReadChunk) {
    const hsize_t count = std::min(kReadChunk, n - start);
    h5.check(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &start, nullptr, &count, nullptr),
             "H5Sselect_hyperslab", name);
    H5Id mspace = h5.id(H5Screate_simple(1, &count, nullptr), H5Sclose, "H5Screate_simple", name);
    h5.check(H5Dread(ds, H5T_NATIVE_INT64, mspace.get(), fspace.get(), H5P_DEFAULT, buf.data()), "H5Dread", name);
    sink(int64_t(start), buf.data(), int64_t(count));
  }
}

// An integer attribute of the root group; nullopt when absent and not required.
std::optional<int64_t> read_int_attr(const H5& h5, hid_t root, const char* name, bool required) {
  const htri_t exists = h5.check(H5Aexists(root, name), "H5Aexists", name);
  if (!exists) {
    if (required) throw InputError(h5.file, name, "an integer attribute of the root group", "missing");
    return std::nullopt;
  }
  H5Id attr = h5.id(H5Aopen(root, name, H5P_DEFAULT), H5Aclose, "H5Aopen", name);
  H5Id type = h5.id(H5Aget_type(attr.get()), H5Tclose, "H5Aget_type", name);
  const H5T_class_t c = H5Tget_class(type.get());
  if (c < 0) throw h5.error("H5Tget_class", name);
  if (c != H5T_INTEGER) throw InputError(h5.file, name, "an integer attribute", hdf5_type_text(h5, type.get(), name));
  H5Id space = h5.id(H5Aget_space(attr.get()), H5Sclose, "H5Aget_space", name);
  const hssize_t points = h5.check(H5Sget_simple_extent_npoints(space.get()), "H5Sget_simple_extent_npoints", name);
  if (points != 1) throw InputError(h5.file, name, "a single integer", std::to_string(points) + " values");
  int64_t v = 0;
  h5.check(H5Aread(attr.get(), H5T_NATIVE_INT64, &v), "H5Aread", name);
  return v;
}

// ---- checks shared by the reader and the writer -------------------------------------------------

void check_attrs(const std::string& path, int64_t vocab, int64_t bos, int64_t eos, int64_t model_vocab) {
  if (vocab <= 0 || vocab > INT32_MAX)
    throw InputError(path, "vocab_size", "a positive integer (int32 range)", std::to_string(vocab));
  const std::string range = "-1 (none) or a token id in [0, vocab_size=" + std::to_string(vocab) + ")";
  if (bos < -1 || bos >= vocab) throw InputError(path, "bos_id", range, std::to_string(bos));
  if (eos < -1 || eos >= vocab) throw InputError(path, "eos_id", range, std::to_string(eos));
  if (model_vocab > 0 && vocab > model_vocab)
    throw InputError(path, "vocab_size", "at most the model's vocab_size (" + std::to_string(model_vocab) + ")",
                     std::to_string(vocab));
}

void check_token(const std::string& path, int64_t i, int64_t v, int64_t vocab) {
  if (v < 0 || v >= vocab)
    throw InputError(path, "/tokens", "token ids in [0, vocab_size=" + std::to_string(vocab) + ")",
                     "tokens[" + std::to_string(i) + "] = " + std::to_string(v));
}

void check_offsets(const std::string& path, const std::vector<int64_t>& off, int64_t n_tokens) {
  if (off.size() < 2)
    throw InputError(path, "/doc_offsets", "at least 2 entries (D+1 offsets, D >= 1 documents)",
                     std::to_string(off.size()) + (off.size() == 1 ? " entry" : " entries"));
  if (off[0] != 0) throw InputError(path, "/doc_offsets", "doc_offsets[0] = 0", "doc_offsets[0] = " + std::to_string(off[0]));
  for (size_t d = 1; d < off.size(); ++d)
    if (off[d] < off[d - 1])
      throw InputError(path, "/doc_offsets", "non-decreasing offsets",
                       "doc_offsets[" + std::to_string(d) + "] = " + std::to_string(off[d]) + " < doc_offsets[" +
                           std::to_string(d - 1) + "] = " + std::to_string(off[d - 1]));
  const size_t last = off.size() - 1;
  if (off[last] != n_tokens)
    throw InputError(path, "/doc_offsets",
                     "last offset = number of tokens (" + std::to_string(n_tokens) + ")",
                     "doc_offsets[" + std::to_string(last) + "] = " + std::to_string(off[last]));
}

void check_mask_value(const std::string& path, int64_t i, int64_t v) {
  if (v != 0 && v != 1)
    throw InputError(path, "/loss_mask", "values 0 or 1", "loss_mask[" + std::to_string(i) + "] = " + std::to_string(v));
}

void check_mask_length(const std::string& path, int64_t len, int64_t n_tokens) {
  if (len != n_tokens)
    throw InputError(path, "/loss_mask", "length " + std::to_string(n_tokens) + " (one entry per token)",
                     "length " + std::to_string(len));
}

void check_tokens_nonempty(const std::string& path, int64_t n) {
  if (n < 1) throw InputError(path, "/tokens", "at least one token", "an empty dataset");
}

void validate(const TokenDataset& ds, const std::string& path) {
  check_attrs(path, ds.vocab_size, ds.bos_id, ds.eos_id, 0);
  check_tokens_nonempty(path, ds.num_tokens());
  for (size_t i = 0; i < ds.tokens.size(); ++i) check_token(path, int64_t(i), ds.tokens[i], ds.vocab_size);
  check_offsets(path, ds.doc_offsets, ds.num_tokens());
  if (!ds.loss_mask.empty()) {
    check_mask_length(path, int64_t(ds.loss_mask.size()), ds.num_tokens());
    for (size_t i = 0; i < ds.loss_mask.size(); ++i) check_mask_value(path, int64_t(i), ds.loss_mask[i]);
  }
}

void write_1d(const H5& h5, hid_t file, const char* name, hid_t file_type, hid_t mem_type, hsize_t n,
              const void* data) {
  H5Id space = h5.id(H5Screate_simple(1, &n, nullptr), H5Sclose, "H5Screate_simple", name);
  H5Id ds = h5.id(H5Dcreate2(file, name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose,
                  "H5Dcreate2", name);
  h5.check(H5Dwrite(ds.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), "H5Dwrite", name);
  h5.check(ds.close(), "H5Dclose", name);
}

void write_attr(const H5& h5, hid_t loc, const char* name, int64_t value) {
  H5Id space = h5.id(H5Screate(H5S_SCALAR), H5Sclose, "H5Screate", name);
  H5Id attr = h5.id(H5Acreate2(loc, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose,
                    "H5Acreate2", name);
  h5.check(H5Awrite(attr.get(), H5T_NATIVE_INT64, &value), "H5Awrite", name);
  h5.check(attr.close(), "H5Aclose", name);
}

}  // namespace

TokenDataset load_token_dataset(const std::string& path, int64_t model_vocab_size) {
  quiet_hdf5(path);
  const H5 h5{path};
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw InputError(path, "file", "an existing HDF5 file", "no such file");
  if (std::filesystem::is_directory(path, ec)) throw InputError(path, "file", "an HDF5 file", "a directory");
#if H5_VERSION_GE(1, 12, 0)
  const htri_t is_h5 = H5Fis_accessible(path.c_str(), H5P_DEFAULT);
  const char* is_h5_call = "H5Fis_accessible";
#else
  const htri_t is_h5 = H5Fis_hdf5(path.c_str());
  const char* is_h5_call = "H5Fis_hdf5";
#endif
  h5.check(is_h5, is_h5_call, "");
  if (!is_h5) throw InputError(path, "file", "an HDF5 file", "no HDF5 signature");

  TokenDataset ds;
  ds.path = path;
  H5Id file = h5.id(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose, "H5Fopen", "");
  {
    H5Id root = h5.id(H5Gopen2(file.get(), "/", H5P_DEFAULT), H5Gclose, "H5Gopen2", "/");
    ds.vocab_size = *read_int_attr(h5, root.get(), "vocab_size", true);
    ds.bos_id = read_int_attr(h5, root.get(), "bos_id", false).value_or(-1);
    ds.eos_id = read_int_attr(h5, root.get(), "eos_id", false).value_or(-1);
    h5.check(root.close(), "H5Gclose", "/");
  }
  check_attrs(path, ds.vocab_size, ds.bos_id, ds.eos_id, model_vocab_size);

  {
    const char* expected = "a 1-D integer dataset (int32 token ids)";
    H5Id d = open_dataset(h5, file.get(), "/tokens", true, expected);
    const hsize_t n = integer_1d_length(h5, d.get(), "/tokens", expected);
    check_tokens_nonempty(path, int64_t(n));
    ds.tokens.resize(size_t(n));
    read_int64_pieces(h5, d.get(), "/tokens", n, [&](int64_t first, const int64_t* v, int64_t count) {
      for (int64_t i = 0; i < count; ++i) {
        check_token(path, first + i, v[i], ds.vocab_size);
        ds.tokens[size_t(first + i)] = int32_t(v[i]);
      }
    });
    h5.check(d.close(), "H5Oclose", "/tokens");
  }
  {
    const char* expected = "a 1-D integer dataset (int64 document offsets)";
    H5Id d = open_dataset(h5, file.get(), "/doc_offsets", true, expected);
    const hsize_t n = integer_1d_length(h5, d.get(), "/doc_offsets", expected);
    ds.doc_offsets.resize(size_t(n));
    read_int64_pieces(h5, d.get(), "/doc_offsets", n, [&](int64_t first, const int64_t* v, int64_t count) {
      std::copy(v, v + count, ds.doc_offsets.begin() + first);
    });
    h5.check(d.close(), "H5Oclose", "/doc_offsets");
    check_offsets(path, ds.doc_offsets, ds.num_tokens());
  }
  {
    const char* expected = "a 1-D integer dataset (uint8 0/1 loss mask)";
    H5Id d = open_dataset(h5, file.get(), "/loss_mask", false, expected);
    if (d.get() >= 0) {
      const hsize_t n = integer_1d_length(h5, d.get(), "/loss_mask", expected);
      check_mask_length(path, int64_t(n), ds.num_tokens());
      ds.loss_mask.resize(size_t(n));
      read_int64_pieces(h5, d.get(), "/loss_mask", n, [&](int64_t first, const int64_t* v, int64_t count) {
        for (int64_t i = 0; i < count; ++i) {
          check_mask_value(path, first + i, v[i]);
          ds.loss_mask[size_t(first + i)] = uint8_t(v[i]);
        }
      });
      h5.check(d.close(), "H5Oclose", "/loss_mask");
    }
  }
  h5.check(file.close(), "H5Fclose", "");
  return ds;
}

void write_token_dataset(const std::string& path, const TokenDataset& ds) {
  validate(ds, path);
  quiet_hdf5(path);
  const std::string tmp = temp_path_for(path);
  const H5 h5{tmp};
  struct Unlink {
    const std::string& p;
    bool armed = true;
    ~Unlink() {
      if (armed) ::unlink(p.c_str());
    }
  } guard{tmp};
  {
    H5Id file = h5.id(H5Fcreate(tmp.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, H5P_DEFAULT), H5Fclose, "H5Fcreate", "");
    write_1d(h5, file.get(), "/tokens", H5T_STD_I32LE, H5T_NATIVE_INT32, ds.tokens.size(), ds.tokens.data());
    write_1d(h5, file.get(), "/doc_offsets", H5T_STD_I64LE, H5T_NATIVE_INT64, ds.doc_offsets.size(),
             ds.doc_offsets.data());
    if (!ds.loss_mask.empty())
      write_1d(h5, file.get(), "/loss_mask", H5T_STD_U8LE, H5T_NATIVE_UINT8, ds.loss_mask.size(), ds.loss_mask.data());
    H5Id root = h5.id(H5Gopen2(file.get(), "/", H5P_DEFAULT), H5Gclose, "H5Gopen2", "/");
    write_attr(h5, root.get(), "vocab_size", ds.vocab_size);
    if (ds.bos_id >= 0) write_attr(h5, root.get(), "bos_id", ds.bos_id);
    if (ds.eos_id >= 0) write_attr(h5, root.get(), "eos_id", ds.eos_id);
    h5.check(root.close(), "H5Gclose", "/");
    h5.check(file.close(), "H5Fclose", "");
  }
  fsync_path(tmp);
  rename_durable(tmp, path);
  guard.armed = false;
}

// ---- TokenDatasetWriter ------------------------------------------------------------------------

namespace {
// Elements per HDF5 chunk and per buffered write.
constexpr hsize_t kWriteChunk = hsize_t(1) << 18;
constexpr size_t kFlushElements = size_t(1) << 18;

// An extendible 1-D chunked dataset and the number of elements written to it.
struct Extendible {
  H5Id ds;
  hsize_t size = 0;
  hid_t mem_type = -1;
  const char* name = "";

  void create(const H5& h5, hid_t file, const char* n, hid_t file_type, hid_t mtype) {
    name = n;
    mem_type = mtype;
    const hsize_t zero = 0, unlimited = H5S_UNLIMITED;
    H5Id space = h5.id(H5Screate_simple(1, &zero, &unlimited), H5Sclose, "H5Screate_simple", name);
    H5Id dcpl = h5.id(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, "H5Pcreate", name);
    h5.check(H5Pset_chunk(dcpl.get(), 1, &kWriteChunk), "H5Pset_chunk", name);
    ds = h5.id(H5Dcreate2(file, name, file_type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT), H5Dclose,
               "H5Dcreate2", name);
  }
  void write(const H5& h5, const void* data, size_t n) {
    if (n == 0) return;
    const hsize_t start = size, count = n, new_size = size + n;
    h5.check(H5Dset_extent(ds.get(), &new_size), "H5Dset_extent", name);
    H5Id fspace = h5.id(H5Dget_space(ds.get()), H5Sclose, "H5Dget_space", name);
    h5.check(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &start, nullptr, &count, nullptr),
             "H5Sselect_hyperslab", name);
    H5Id mspace = h5.id(H5Screate_simple(1, &count, nullptr), H5Sclose, "H5Screate_simple", name);
    h5.check(H5Dwrite(ds.get(), mem_type, mspace.get(), fspace.get(), H5P_DEFAULT, data), "H5Dwrite", name);
    size = new_size;
  }
};
}  // namespace

struct TokenDatasetWriter::Impl {
  std::string path, tmp;
  H5 h5;
  int64_t vocab = 0, bos = -1, eos = -1;
  bool with_mask = false, committed = false;
  H5Id file;
  Extendible tokens, mask, offsets;
  std::vector<int32_t> tok_buf;
  std::vector<uint8_t> mask_buf;
  std::vector<int64_t> off_buf;
  int64_t n_tokens = 0, n_docs = 0;

  void flush() {
    tokens.write(h5, tok_buf.data(), tok_buf.size());
    if (with_mask) mask.write(h5, mask_buf.data(), mask_buf.size());
    offsets.write(h5, off_buf.data(), off_buf.size());
    tok_buf.clear();
    mask_buf.clear();
    off_buf.clear();
  }
};

TokenDatasetWriter::TokenDatasetWriter(const std::string& path, int64_t vocab_size, int64_t bos_id, int64_t eos_id,
                                       bool with_mask)
    : impl_(std::make_unique<Impl>()) {
  check_attrs(path, vocab_size, bos_id, eos_id, 0);
  quiet_hdf5(path);
  Impl& w = *impl_;
  w.path = path;
  w.tmp = temp_path_for(path);
  w.h5 = H5{w.tmp};
  w.vocab = vocab_size;
  w.bos = bos_id;
  w.eos = eos_id;
  w.with_mask = with_mask;
  w.file = w.h5.id(H5Fcreate(w.tmp.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, H5P_DEFAULT), H5Fclose, "H5Fcreate", "");
  w.tokens.create(w.h5, w.file.get(), "/tokens", H5T_STD_I32LE, H5T_NATIVE_INT32);
  w.offsets.create(w.h5, w.file.get(), "/doc_offsets", H5T_STD_I64LE, H5T_NATIVE_INT64);
  if (with_mask) w.mask.create(w.h5, w.file.get(), "/loss_mask", H5T_STD_U8LE, H5T_NATIVE_UINT8);
  w.off_buf.push_back(0);
}

TokenDatasetWriter::~TokenDatasetWriter() {
  if (impl_ && !impl_->committed) {
    impl_->tokens.ds = H5Id();
    impl_->mask.ds = H5Id();
    impl_->offsets.ds = H5Id();
    impl_->file = H5Id();
    ::unlink(impl_->tmp.c_str());
  }
}

void TokenDatasetWriter::append(std::span<const int32_t> tokens, std::span<const uint8_t> mask) {
  Impl& w = *impl_;
  LT_CHECK(!w.committed, "append after commit");
  LT_CHECK(!w.with_mask || mask.size() == tokens.size(), "loss mask length differs from the tokens'");
  for (const int32_t t : tokens) LT_CHECK(t >= 0 && t < w.vocab, "token id " + std::to_string(t) + " out of range");
  for (const uint8_t m : mask) LT_CHECK(m <= 1, "loss mask value " + std::to_string(m));
  w.tok_buf.insert(w.tok_buf.end(), tokens.begin(), tokens.end());
  if (w.with_mask) w.mask_buf.insert(w.mask_buf.end(), mask.begin(), mask.end());
  w.n_tokens += int64_t(tokens.size());
  if (w.tok_buf.size() >= kFlushElements) w.flush();
}

void TokenDatasetWriter::end_document() {
  Impl& w = *impl_;
  LT_CHECK(!w.committed, "end_document after commit");
  w.off_buf.push_back(w.n_tokens);
  ++w.n_docs;
  if (w.off_buf.size() >= kFlushElements) w.flush();
}

int64_t TokenDatasetWriter::num_documents() const { return impl_->n_docs; }
int64_t TokenDatasetWriter::num_tokens() const { return impl_->n_tokens; }

void TokenDatasetWriter::commit() {
  Impl& w = *impl_;
  LT_CHECK(!w.committed, "commit twice");
  check_tokens_nonempty(w.path, w.n_tokens);
  LT_CHECK(w.off_buf.empty() || w.off_buf.back() == w.n_tokens, "commit inside a document: call end_document()");
  w.flush();
  {
    H5Id root = w.h5.id(H5Gopen2(w.file.get(), "/", H5P_DEFAULT), H5Gclose, "H5Gopen2", "/");
    write_attr(w.h5, root.get(), "vocab_size", w.vocab);
    if (w.bos >= 0) write_attr(w.h5, root.get(), "bos_id", w.bos);
    if (w.eos >= 0) write_attr(w.h5, root.get(), "eos_id", w.eos);
    w.h5.check(root.close(), "H5Gclose", "/");
  }
  w.h5.check(w.tokens.ds.close(), "H5Dclose", "/tokens");
  w.h5.check(w.offsets.ds.close(), "H5Dclose", "/doc_offsets");
  if (w.with_mask) w.h5.check(w.mask.ds.close(), "H5Dclose", "/loss_mask");
  w.h5.check(w.file.close(), "H5Fclose", "");
  fsync_path(w.tmp);
  rename_durable(w.tmp, w.path);
  w.committed = true;
}

}  // namespace longtune
