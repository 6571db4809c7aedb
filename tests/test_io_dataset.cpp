// io/token_dataset: HDF5 token datasets, valid round trips and every malformed case (invalid files
// are written directly with the HDF5 C API, since write_token_dataset refuses them).
#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "io/token_dataset.hpp"
#include "src/common/error.hpp"

namespace longtune {
namespace {

namespace fs = std::filesystem;

// One dataset of a hand-made file: values written through HDF5's conversion to `file_type`.
struct RawDataset {
  std::vector<int64_t> values;
  hid_t file_type = H5T_STD_I32LE;
  std::vector<hsize_t> dims;  // empty: 1-D of values.size()
};

// Writes an HDF5 file with the given datasets ("/tokens" ...) and int64 root attributes.
void write_raw_h5(const std::string& path, const std::map<std::string, RawDataset>& datasets,
                  const std::map<std::string, int64_t>& attrs, const std::map<std::string, double>& float_attrs = {}) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  for (const auto& [name, d] : datasets) {
    std::vector<hsize_t> dims = d.dims.empty() ? std::vector<hsize_t>{d.values.size()} : d.dims;
    const hid_t space = H5Screate_simple(int(dims.size()), dims.data(), nullptr);
    const hid_t ds = H5Dcreate2(file, name.c_str(), d.file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(ds, 0) << name;
    if (!d.values.empty()) {
      ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, d.values.data()), 0) << name;
    }
    H5Dclose(ds);
    H5Sclose(space);
  }
  const hid_t scalar = H5Screate(H5S_SCALAR);
  for (const auto& [name, v] : attrs) {
    const hid_t a = H5Acreate2(file, name.c_str(), H5T_STD_I64LE, scalar, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(a, 0);
    H5Awrite(a, H5T_NATIVE_INT64, &v);
    H5Aclose(a);
  }
  for (const auto& [name, v] : float_attrs) {
    const hid_t a = H5Acreate2(file, name.c_str(), H5T_IEEE_F64LE, scalar, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(a, 0);
    H5Awrite(a, H5T_NATIVE_DOUBLE, &v);
    H5Aclose(a);
  }
  H5Sclose(scalar);
  ASSERT_GE(H5Fclose(file), 0);
}

class IoDataset : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("lt_io_ds_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // A valid layout: 3 documents of 4, 0 and 3 tokens, vocab 10.
  std::map<std::string, RawDataset> good() const {
    return {{"/tokens", {{1, 2, 3, 4, 5, 6, 9}, H5T_STD_I32LE, {}}},
            {"/doc_offsets", {{0, 4, 4, 7}, H5T_STD_I64LE, {}}},
            {"/loss_mask", {{0, 1, 1, 1, 0, 1, 1}, H5T_STD_U8LE, {}}}};
  }
  std::map<std::string, int64_t> good_attrs() const { return {{"vocab_size", 10}, {"eos_id", 9}}; }

  // Loads `p`, expecting an InputError on `field`.
  void expect_bad(const std::string& p, const std::string& field, const std::string& extra, int64_t model_vocab = 0) {
    try {
      load_token_dataset(p, model_vocab);
      ADD_FAILURE() << "no error (expected field " << field << ")";
    } catch (const InputError& e) {
      const std::string msg = e.what();
      if (std::getenv("LONGTUNE_SHOW_ERRORS")) std::cerr << "[error] " << msg << "\n";
      EXPECT_EQ(e.file(), p);
      EXPECT_EQ(e.field(), field) << msg;
      EXPECT_NE(msg.find(p), std::string::npos) << msg;
      EXPECT_NE(msg.find(field), std::string::npos) << msg;
      EXPECT_NE(msg.find(extra), std::string::npos) << "'" << extra << "' not in: " << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }
  // Writes good() with one dataset replaced (or removed when `d` is nullopt) and expects an error.
  void expect_bad_dataset(const std::string& name, std::optional<RawDataset> d, const std::string& field,
                          const std::string& extra) {
    auto sets = good();
    if (d) sets[name] = *d;
    else sets.erase(name);
    const std::string p = path("bad.h5");
    write_raw_h5(p, sets, good_attrs());
    expect_bad(p, field, extra);
  }

  fs::path dir_;
};

TEST_F(IoDataset, RoundTripWithMask) {
  TokenDataset ds;
  ds.tokens = {5, 1, 2, 3, 31999, 0, 7};
  ds.doc_offsets = {0, 3, 3, 7};
  ds.loss_mask = {0, 1, 1, 0, 1, 1, 0};
  ds.vocab_size = 32000;
  ds.bos_id = 1;
  ds.eos_id = 2;
  const std::string p = path("with_mask.h5");
  write_token_dataset(p, ds);
  const TokenDataset r = load_token_dataset(p, 32000);
  EXPECT_EQ(r.path, p);
  EXPECT_EQ(r.tokens, ds.tokens);
  EXPECT_EQ(r.doc_offsets, ds.doc_offsets);
  EXPECT_EQ(r.loss_mask, ds.loss_mask);
  EXPECT_EQ(r.vocab_size, 32000);
  EXPECT_EQ(r.bos_id, 1);
  EXPECT_EQ(r.eos_id, 2);
  EXPECT_EQ(r.num_documents(), 3);
  EXPECT_EQ(r.doc_length(1), 0);
  EXPECT_EQ(r.doc_length(2), 4);
  // Only the final file is left in the directory (no temporary).
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir_)) files += e.is_regular_file();
  EXPECT_EQ(files, 1u);
}

TEST_F(IoDataset, RoundTripWithoutMaskAndIds) {
  TokenDataset ds;
  ds.tokens = {0, 1, 2, 3};
  ds.doc_offsets = {0, 4};
  ds.vocab_size = 4;
  const std::string p = path("plain.h5");
  write_token_dataset(p, ds);
  const TokenDataset r = load_token_dataset(p);
  EXPECT_EQ(r.tokens, ds.tokens);
  EXPECT_EQ(r.doc_offsets, ds.doc_offsets);
  EXPECT_TRUE(r.loss_mask.empty());
  EXPECT_EQ(r.bos_id, -1);
  EXPECT_EQ(r.eos_id, -1);
  // Rewriting replaces the file atomically.
  ds.tokens = {3, 3, 3, 3};
  write_token_dataset(p, ds);
  EXPECT_EQ(load_token_dataset(p).tokens, ds.tokens);
}

TEST_F(IoDataset, OtherIntegerStorageTypesAreAccepted) {
  // numpy's default int64 for tokens, int32 offsets, a mask stored as int8.
  auto sets = good();
  sets["/tokens"].file_type = H5T_STD_I64LE;
  sets["/doc_offsets"].file_type = H5T_STD_U32LE;
  sets["/loss_mask"].file_type = H5T_STD_I8LE;
  const std::string p = path("types.h5");
  write_raw_h5(p, sets, good_attrs());
  const TokenDataset r = load_token_dataset(p, 10);
  EXPECT_EQ(r.tokens, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 9}));
  EXPECT_EQ(r.doc_offsets, (std::vector<int64_t>{0, 4, 4, 7}));
  EXPECT_EQ(r.loss_mask, (std::vector<uint8_t>{0, 1, 1, 1, 0, 1, 1}));
  EXPECT_EQ(r.eos_id, 9);
}

TEST_F(IoDataset, NonMonotoneOffsets) {
  expect_bad_dataset("/doc_offsets", RawDataset{{0, 4, 3, 7}, H5T_STD_I64LE, {}}, "/doc_offsets",
                     "doc_offsets[2] = 3 < doc_offsets[1] = 4");
}

TEST_F(IoDataset, OffsetsOutOfRange) {
  expect_bad_dataset("/doc_offsets", RawDataset{{0, 4, 9}, H5T_STD_I64LE, {}}, "/doc_offsets",
                     "doc_offsets[2] = 9");
  expect_bad_dataset("/doc_offsets", RawDataset{{0, 4, 6}, H5T_STD_I64LE, {}}, "/doc_offsets",
                     "number of tokens (7)");
  expect_bad_dataset("/doc_offsets", RawDataset{{1, 4, 7}, H5T_STD_I64LE, {}}, "/doc_offsets", "doc_offsets[0] = 1");
  expect_bad_dataset("/doc_offsets", RawDataset{{-2, 4, 7}, H5T_STD_I64LE, {}}, "/doc_offsets", "doc_offsets[0] = -2");
  expect_bad_dataset("/doc_offsets", RawDataset{{7}, H5T_STD_I64LE, {}}, "/doc_offsets", "at least 2 entries");
}

TEST_F(IoDataset, TokenOutOfVocab) {
  expect_bad_dataset("/tokens", RawDataset{{1, 2, 3, 4, 10, 6, 9}, H5T_STD_I32LE, {}}, "/tokens",
                     "tokens[4] = 10");
  // Values beyond int32 stored as int64 are reported exactly, not wrapped.
  expect_bad_dataset("/tokens", RawDataset{{1, 2, 3, 4, 5, 6, int64_t(1) << 33}, H5T_STD_I64LE, {}}, "/tokens",
                     "tokens[6] = 8589934592");
}

TEST_F(IoDataset, NegativeToken) {
  expect_bad_dataset("/tokens", RawDataset{{1, -1, 3, 4, 5, 6, 9}, H5T_STD_I32LE, {}}, "/tokens", "tokens[1] = -1");
}

TEST_F(IoDataset, TokensNotIntegers) {
  expect_bad_dataset("/tokens", RawDataset{{1, 2, 3, 4, 5, 6, 9}, H5T_IEEE_F32LE, {}}, "/tokens",
                     "floating-point");
  expect_bad_dataset("/tokens", RawDataset{{1, 2, 3, 4, 5, 6, 9, 0}, H5T_STD_I32LE, {2, 4}}, "/tokens", "2-D");
  expect_bad_dataset("/tokens", RawDataset{{}, H5T_STD_I32LE, {0}}, "/tokens", "at least one token");
  expect_bad_dataset("/doc_offsets", RawDataset{{0, 4, 4, 7}, H5T_IEEE_F64LE, {}}, "/doc_offsets", "integer");
}

TEST_F(IoDataset, MaskWrongLength) {
  expect_bad_dataset("/loss_mask", RawDataset{{1, 1, 1}, H5T_STD_U8LE, {}}, "/loss_mask", "length 7");
}

TEST_F(IoDataset, MaskValueTwo) {
  expect_bad_dataset("/loss_mask", RawDataset{{1, 1, 1, 2, 0, 0, 1}, H5T_STD_U8LE, {}}, "/loss_mask",
                     "loss_mask[3] = 2");
  // A -1 in a signed mask is not silently clamped to 0.
  expect_bad_dataset("/loss_mask", RawDataset{{1, -1, 1, 1, 0, 0, 1}, H5T_STD_I8LE, {}}, "/loss_mask",
                     "loss_mask[1] = -1");
  expect_bad_dataset("/loss_mask", RawDataset{{1, 1, 1, 1, 0, 0, 1}, H5T_IEEE_F32LE, {}}, "/loss_mask", "integer");
}

TEST_F(IoDataset, MissingVocabSizeAttribute) {
  const std::string p = path("novocab.h5");
  write_raw_h5(p, good(), {{"eos_id", 9}});
  expect_bad(p, "vocab_size", "missing");
  write_raw_h5(p, good(), {}, {{"vocab_size", 10.0}});
  expect_bad(p, "vocab_size", "an integer attribute");
  write_raw_h5(p, good(), {{"vocab_size", 0}});
  expect_bad(p, "vocab_size", "positive");
  write_raw_h5(p, good(), {{"vocab_size", 10}, {"bos_id", 10}});
  expect_bad(p, "bos_id", "vocab_size=10");
}

TEST_F(IoDataset, MissingDataset) {
  expect_bad_dataset("/tokens", std::nullopt, "/tokens", "no such dataset");
  expect_bad_dataset("/doc_offsets", std::nullopt, "/doc_offsets", "no such dataset");
  // A group where a dataset should be.
  const std::string p = path("group.h5");
  auto sets = good();
  sets.erase("/tokens");
  write_raw_h5(p, sets, good_attrs());
  const hid_t f = H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  H5Gclose(H5Gcreate2(f, "/tokens", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  H5Fclose(f);
  expect_bad(p, "/tokens", "a group");
}

TEST_F(IoDataset, NotAnHdf5File) {
  const std::string p = path("tokens.txt");
  std::ofstream(p) << "1 2 3 4\n";
  expect_bad(p, "file", "an HDF5 file");
  const std::string missing = path("missing.h5");
  expect_bad(missing, "file", "no such file");
}

TEST_F(IoDataset, VocabLargerThanModel) {
  const std::string p = path("big_vocab.h5");
  write_raw_h5(p, good(), good_attrs());
  EXPECT_NO_THROW(load_token_dataset(p, 10));
  expect_bad(p, "vocab_size", "at most the model's vocab_size (8)", 8);
}

TEST_F(IoDataset, WriterValidatesAndKeepsExistingFile) {
  TokenDataset ds;
  ds.tokens = {0, 1, 2};
  ds.doc_offsets = {0, 3};
  ds.vocab_size = 3;
  const std::string p = path("keep.h5");
  write_token_dataset(p, ds);
  TokenDataset bad = ds;
  bad.tokens[1] = 3;
  try {
    write_token_dataset(p, bad);
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "/tokens");
    EXPECT_NE(std::string(e.what()).find("tokens[1] = 3"), std::string::npos) << e.what();
  }
  bad = ds;
  bad.doc_offsets = {0, 2};
  EXPECT_THROW(write_token_dataset(p, bad), InputError);
  bad = ds;
  bad.loss_mask = {1, 0};
  EXPECT_THROW(write_token_dataset(p, bad), InputError);
  // The earlier file is intact and nothing else was created.
  EXPECT_EQ(load_token_dataset(p).tokens, ds.tokens);
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir_)) files += e.is_regular_file();
  EXPECT_EQ(files, 1u);
}

TEST_F(IoDataset, Hdf5ErrorsNameTheCall) {
  TokenDataset ds;
  ds.tokens = {0};
  ds.doc_offsets = {0, 1};
  ds.vocab_size = 1;
  const std::string p = path("no/such/dir/x.h5");
  try {
    write_token_dataset(p, ds);
    ADD_FAILURE() << "no error";
  } catch (const Hdf5Error& e) {
    const std::string msg = e.what();
    if (std::getenv("LONGTUNE_SHOW_ERRORS")) std::cerr << "[error] " << msg << "\n";
    EXPECT_NE(msg.find("H5Fcreate"), std::string::npos) << msg;
    EXPECT_NE(msg.find("no/such/dir"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace longtune
