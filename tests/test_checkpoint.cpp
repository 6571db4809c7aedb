// io/checkpoint: round trips at several world sizes, the atomic write protocol, the fallback rule
// on corrupted checkpoints, keep_last pruning, and the parameter-table check.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>
#include <xxhash.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "io/checkpoint.hpp"
#include "src/common/error.hpp"
#include "src/model/param_table.hpp"

namespace longtune {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "lt-ckpt-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return (fs::path(path_) / name).string(); }

 private:
  std::string path_;
};

LlamaConfig tiny_config(int64_t intermediate = 12) {
  LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 8;
  c.intermediate_size = intermediate;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 4;
  c.max_position_embeddings = 64;
  return c;
}

// Three flat arrays (master, exp_avg, exp_avg_sq) whose bits are all distinct, special values included.
struct Flat {
  std::vector<float> a[3];
};

Flat make_flat(int64_t n, uint32_t seed) {
  Flat f;
  std::mt19937 rng(seed);
  for (auto& v : f.a) {
    v.resize(size_t(n));
    for (auto& x : v) {
      const uint32_t bits = rng();
      std::memcpy(&x, &bits, 4);  // any bit pattern: NaN payloads, denormals, -0
    }
  }
  return f;
}

bool bits_equal(const float* a, const float* b, int64_t n) {
  return n == 0 || std::memcmp(a, b, size_t(n) * sizeof(float)) == 0;
}

TrainerState state_for(int64_t step) {
  TrainerState s;
  s.step = step;
  s.tokens_seen = step * 1000 + 7;
  s.epoch = step / 300;
  s.cursor_order_index = step * 3;
  s.cursor_offset_in_doc = 64;
  s.data_seed = 0xdeadbeefcafef00dull;
  s.rng_state = "mt19937_64 " + std::to_string(step);
  s.loss_scale = 65536.0;
  s.resolved_config = "[train]\nlr = 1e-5\nsteps = 1000\n";
  s.run_id = "run-abc";
  return s;
}

// Writes a whole checkpoint through the three phases. bounds: world_size + 1 shard boundaries.
void write_checkpoint(CheckpointWriter& w, int64_t step, const std::vector<int64_t>& bounds, const Flat& f,
                      const ParamTable& table, const TrainerState& state) {
  const int world = int(bounds.size()) - 1;
  const std::string tmp = w.begin(step);
  EXPECT_EQ(tmp, w.tmp_dir(step));
  for (int r = 0; r < world; ++r) {
    CheckpointShard s;
    s.shard_begin = bounds[size_t(r)];
    s.shard_len = bounds[size_t(r) + 1] - bounds[size_t(r)];
    s.total_len = bounds.back();
    s.master = f.a[0].data() + s.shard_begin;
    s.exp_avg = f.a[1].data() + s.shard_begin;
    s.exp_avg_sq = f.a[2].data() + s.shard_begin;
    s.rank = r;
    s.world_size = world;
    w.write_rank(tmp, s, table, state);
  }
  w.commit(step, tmp, world);
}

void write_checkpoint(CheckpointWriter& w, int64_t step, const std::vector<int64_t>& bounds, const Flat& f,
                      const ParamTable& table) {
  write_checkpoint(w, step, bounds, f, table, state_for(step));
}

std::vector<int64_t> bounds3(int64_t total) { return {0, 700, 1501, total}; }  // uneven shards

std::string rank_path(const std::string& root, int64_t step, int r, int world) {
  return (fs::path(root) / checkpoint_dir_name(step) / checkpoint_rank_file_name(r, world)).string();
}

void expect_one_line(const std::vector<std::string>& warnings) {
  for (const auto& w : warnings) EXPECT_EQ(w.find('\n'), std::string::npos) << w;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += x + " | ";
  return s;
}

void expect_reads_back(const CheckpointRef& ref, const Flat& f, int64_t begin, int64_t len) {
  std::vector<float> out[3];
  for (auto& o : out) o.assign(size_t(len), 0.0f);
  read_shard(ref, begin, len, out[0].data(), out[1].data(), out[2].data());
  for (int i = 0; i < 3; ++i)
    EXPECT_TRUE(bits_equal(out[i].data(), f.a[i].data() + begin, len)) << "array " << i << " range [" << begin << ", +"
                                                                        << len << ")";
}

// Byte offset of a contiguous dataset's data in its file.
uint64_t dataset_offset(const std::string& path, const char* name) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  EXPECT_GE(file, 0);
  const hid_t ds = H5Dopen2(file, name, H5P_DEFAULT);
  EXPECT_GE(ds, 0);
  const haddr_t off = H5Dget_offset(ds);
  H5Dclose(ds);
  H5Fclose(file);
  EXPECT_NE(off, HADDR_UNDEF);
  return uint64_t(off);
}

void flip_byte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f.good());
  f.seekg(std::streamoff(offset));
  char c = 0;
  f.read(&c, 1);
  c = char(c ^ 0x5a);
  f.seekp(std::streamoff(offset));
  f.write(&c, 1);
}

// Overwrites an int64 root attribute or a string attribute of /trainer_state in place.
void set_root_int_attr(const std::string& path, const char* name, int64_t v) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  const hid_t a = H5Aopen_by_name(file, "/", name, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(a, 0);
  ASSERT_GE(H5Awrite(a, H5T_NATIVE_INT64, &v), 0);
  H5Aclose(a);
  H5Fclose(file);
}

void set_state_str_attr(const std::string& path, const char* name, const std::string& v) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  const hid_t g = H5Gopen2(file, "/trainer_state", H5P_DEFAULT);
  ASSERT_GE(g, 0);
  const hid_t a = H5Aopen(g, name, H5P_DEFAULT);
  ASSERT_GE(a, 0);
  const hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, H5T_VARIABLE);
  H5Tset_cset(t, H5T_CSET_UTF8);
  const char* p = v.c_str();
  ASSERT_GE(H5Awrite(a, t, &p), 0);
  H5Tclose(t);
  H5Aclose(a);
  H5Gclose(g);
  H5Fclose(file);
}

class CheckpointTest : public ::testing::Test {
 protected:
  TempDir scratch;
  std::string root = scratch / "ckpt";
  ParamTable table{tiny_config()};
  int64_t total = table.total_elements();
};

// ---- round trips ----------------------------------------------------------------------------------

using CheckpointRoundTrip = CheckpointTest;

TEST_F(CheckpointRoundTrip, WorldSize1BitExact) {
  const Flat f = make_flat(total, 1);
  CheckpointWriter w(root, 0);
  write_checkpoint(w, 100, {0, total}, f, table);
  EXPECT_TRUE(fs::exists(rank_path(root, 100, 0, 1)));
  std::vector<std::string> warnings;
  const auto ref = find_latest_checkpoint(root, &warnings);
  ASSERT_TRUE(ref.has_value());
  EXPECT_TRUE(warnings.empty()) << joined(warnings);
  EXPECT_EQ(ref->step, 100);
  EXPECT_EQ(ref->world_size, 1);
  EXPECT_EQ(ref->total_len, total);
  expect_reads_back(*ref, f, 0, total);
  expect_reads_back(*ref, f, 13, 101);
  // Nothing of the protocol is left behind.
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    EXPECT_TRUE(n == "latest" || n == "step-00000100") << n;
  }
  for (const auto& e : fs::directory_iterator(fs::path(root) / "step-00000100"))
    EXPECT_EQ(e.path().filename().string(), "rank-00000-of-00001.h5");
}

TEST_F(CheckpointRoundTrip, WorldSize3UnevenShardsStitchedAcrossFiles) {
  const Flat f = make_flat(total, 2);
  CheckpointWriter w(root, 0);
  write_checkpoint(w, 100, bounds3(total), f, table);
  const auto ref = find_latest_checkpoint(root, nullptr);
  ASSERT_TRUE(ref.has_value());
  ASSERT_EQ(ref->world_size, 3);
  EXPECT_EQ(ref->files[1].shard_begin, 700);
  EXPECT_EQ(ref->files[1].shard_len, 801);
  // Small read pieces so that piece boundaries fall inside and across the requested ranges.
  checkpoint_testing::set_read_piece_elems(64);
  expect_reads_back(*ref, f, 0, total);      // all three files
  expect_reads_back(*ref, f, 650, 950);      // spans all three, partial first and last
  expect_reads_back(*ref, f, 699, 3);        // across the 0|1 boundary
  expect_reads_back(*ref, f, 1501, 1);       // first element of rank 2
  expect_reads_back(*ref, f, total - 5, 5);  // tail
  expect_reads_back(*ref, f, 800, 0);        // empty
  // Resharding to 2 ranks: each half read independently.
  expect_reads_back(*ref, f, 0, total / 2);
  expect_reads_back(*ref, f, total / 2, total - total / 2);
  checkpoint_testing::set_read_piece_elems(int64_t(1) << 22);
  expect_reads_back(*ref, f, 650, 950);
  // Null outputs skip arrays.
  std::vector<float> m(100);
  read_shard(*ref, 690, 100, m.data(), nullptr, nullptr);
  EXPECT_TRUE(bits_equal(m.data(), f.a[0].data() + 690, 100));
}

TEST_F(CheckpointRoundTrip, EmptyShard) {
  const Flat f = make_flat(total, 6);
  CheckpointWriter w(root, 0);
  write_checkpoint(w, 7, {0, 1000, 1000, total}, f, table);  // rank 1 holds nothing
  const auto ref = find_latest_checkpoint(root, nullptr);
  ASSERT_TRUE(ref.has_value());
  EXPECT_EQ(ref->files[1].shard_len, 0);
  expect_reads_back(*ref, f, 0, total);
  expect_reads_back(*ref, f, 990, 20);
}

TEST_F(CheckpointRoundTrip, FormatReadableWithPlainHdf5AndChecksumsAreXxh3OfRawBytes) {
  const Flat f = make_flat(total, 3);
  CheckpointWriter w(root, 0);
  write_checkpoint(w, 100, bounds3(total), f, table);
  const std::string path = rank_path(root, 100, 1, 3);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  auto root_attr = [&](const char* name) {
    int64_t v = -1;
    const hid_t a = H5Aopen_by_name(file, "/", name, H5P_DEFAULT, H5P_DEFAULT);
    EXPECT_GE(a, 0) << name;
    H5Aread(a, H5T_NATIVE_INT64, &v);
    H5Aclose(a);
    return v;
  };
  EXPECT_EQ(root_attr("shard_begin"), 700);
  EXPECT_EQ(root_attr("shard_len"), 801);
  EXPECT_EQ(root_attr("total_len"), total);
  EXPECT_EQ(root_attr("rank"), 1);
  EXPECT_EQ(root_attr("world_size"), 3);
  auto checksum_of = [&](const char* ds_name) {
    uint64_t v = 0;
    const hid_t a = H5Aopen_by_name(file, ds_name, "xxh3_64", H5P_DEFAULT, H5P_DEFAULT);
    EXPECT_GE(a, 0) << ds_name;
    H5Aread(a, H5T_NATIVE_UINT64, &v);
    H5Aclose(a);
    return v;
  };
  const char* tensors[3] = {"/master", "/exp_avg", "/exp_avg_sq"};
  for (int i = 0; i < 3; ++i) {
    std::vector<float> v(801);
    const hid_t ds = H5Dopen2(file, tensors[i], H5P_DEFAULT);
    ASSERT_GE(ds, 0);
    ASSERT_GE(H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), 0);
    H5Dclose(ds);
    EXPECT_TRUE(bits_equal(v.data(), f.a[i].data() + 700, 801));
    EXPECT_EQ(checksum_of(tensors[i]), XXH3_64bits(v.data(), v.size() * 4)) << tensors[i];
  }
  // The ragged shapes rebuild every tensor's shape.
  auto read_i64 = [&](const char* name) {
    const hid_t ds = H5Dopen2(file, name, H5P_DEFAULT);
    EXPECT_GE(ds, 0) << name;
    const hid_t sp = H5Dget_space(ds);
    std::vector<int64_t> v(size_t(H5Sget_simple_extent_npoints(sp)));
    H5Dread(ds, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
    H5Sclose(sp);
    H5Dclose(ds);
    EXPECT_EQ(checksum_of(name), XXH3_64bits(v.data(), v.size() * 8)) << name;
    return v;
  };
  const auto offsets = read_i64("/param_table/offsets");
  const auto ndims = read_i64("/param_table/ndims");
  const auto shapes = read_i64("/param_table/shapes");
  ASSERT_EQ(offsets.size(), table.entries().size());
  size_t k = 0;
  for (size_t i = 0; i < offsets.size(); ++i) {
    EXPECT_EQ(offsets[i], table.at(i).offset);
    std::vector<int64_t> shape(shapes.begin() + long(k), shapes.begin() + long(k + size_t(ndims[i])));
    k += size_t(ndims[i]);
    EXPECT_EQ(shape, table.at(i).shape) << table.at(i).name;
  }
  H5Fclose(file);
  // The reader's view of the same table.
  const auto ref = open_checkpoint((fs::path(root) / "step-00000100").string());
  const auto saved = read_checkpoint_param_table(ref);
  ASSERT_EQ(saved.size(), table.entries().size());
  for (size_t i = 0; i < saved.size(); ++i) {
    EXPECT_EQ(saved[i].name, table.at(i).name);
    EXPECT_EQ(saved[i].numel, table.at(i).numel);
  }
}

TEST_F(CheckpointRoundTrip, TrainerStateRoundTrip) {
  const Flat f = make_flat(total, 4);
  TrainerState s = state_for(100);
  s.data_seed = std::numeric_limits<uint64_t>::max();
  s.loss_scale = 0.125;
  s.tokens_seen = int64_t(1) << 50;
  s.rng_state = std::string(6000, '7') + " \t end";
  s.resolved_config = "# résumé ✓\n";
  for (int i = 0; i < 5000; ++i) s.resolved_config += "key" + std::to_string(i) + " = value\n";  // > 64 KiB
  s.run_id = "";
  CheckpointWriter w(root, 0);
  write_checkpoint(w, 100, bounds3(total), f, table, s);
  const auto ref = find_latest_checkpoint(root, nullptr);
  ASSERT_TRUE(ref.has_value());
  const TrainerState got = read_trainer_state(*ref);
  EXPECT_EQ(got, s);
  EXPECT_EQ(got.format_version, kCheckpointFormatVersion);
}

// ---- latest, pruning --------------------------------------------------------------------------

using CheckpointLatest = CheckpointTest;

TEST_F(CheckpointLatest, PointsToNewest) {
  CheckpointWriter w(root, 0);
  for (int64_t step : {100, 200, 300}) write_checkpoint(w, step, bounds3(total), make_flat(total, uint32_t(step)), table);
  std::ifstream in(root + "/latest");
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "step-00000300");
  std::vector<std::string> warnings;
  const auto ref = find_latest_checkpoint(root, &warnings);
  ASSERT_TRUE(ref.has_value());
  EXPECT_EQ(ref->step, 300);
  EXPECT_TRUE(warnings.empty()) << joined(warnings);
  expect_reads_back(*ref, make_flat(total, 300), 0, total);
  // open_checkpoint takes the step directory, the latest file or the root.
  EXPECT_EQ(open_checkpoint(root + "/latest").step, 300);
  EXPECT_EQ(open_checkpoint(root).step, 300);
  EXPECT_EQ(open_checkpoint(root + "/step-00000200/").step, 200);
}

TEST_F(CheckpointLatest, EmptyOrMissingRootHasNoCheckpointAndNoWarning) {
  std::vector<std::string> warnings;
  EXPECT_FALSE(find_latest_checkpoint(root, &warnings).has_value());
  fs::create_directories(root);
  EXPECT_FALSE(find_latest_checkpoint(root, &warnings).has_value());
  EXPECT_TRUE(warnings.empty()) << joined(warnings);
}

using CheckpointPrune = CheckpointTest;

TEST_F(CheckpointPrune, KeepLast) {
  CheckpointWriter w(root, 2);
  const Flat f = make_flat(total, 5);
  for (int64_t step : {100, 200, 300, 400}) {
    write_checkpoint(w, step, {0, total}, f, table);
    EXPECT_TRUE(fs::exists(root + "/" + checkpoint_dir_name(step)));
  }
  EXPECT_FALSE(fs::exists(root + "/step-00000100"));
  EXPECT_FALSE(fs::exists(root + "/step-00000200"));
  EXPECT_TRUE(fs::exists(root + "/step-00000300"));
  EXPECT_TRUE(fs::exists(root + "/step-00000400"));
  for (const auto& e : fs::directory_iterator(root)) EXPECT_NE(e.path().filename().string()[0], '.');

  // keep_last <= 0 keeps everything.
  CheckpointWriter all(root, 0);
  write_checkpoint(all, 500, {0, total}, f, table);
  write_checkpoint(all, 600, {0, total}, f, table);
  int n = 0;
  for (const auto& e : fs::directory_iterator(root)) n += e.path().filename().string().starts_with("step-");
  EXPECT_EQ(n, 4);

  // Re-writing an older step never prunes checkpoints newer than it (left by a run that went further).
  CheckpointWriter one(root, 1);
  write_checkpoint(one, 450, {0, total}, f, table);
  EXPECT_FALSE(fs::exists(root + "/step-00000300"));
  EXPECT_FALSE(fs::exists(root + "/step-00000400"));
  EXPECT_TRUE(fs::exists(root + "/step-00000450"));
  EXPECT_TRUE(fs::exists(root + "/step-00000500"));
  EXPECT_TRUE(fs::exists(root + "/step-00000600"));
  EXPECT_EQ(find_latest_checkpoint(root, nullptr)->step, 450);  // latest is authoritative
}

// ---- corrupted checkpoints: warning + fallback to the previous one -------------------------------

using CheckpointCorrupt = CheckpointTest;

// Writes steps 100 and 200 (world 3), lets `corrupt` damage step 200, and expects step 100 back
// with exactly one one-line warning containing every string of `mentions`.
void expect_fallback(const std::string& root, const Flat& f100, const std::vector<std::string>& mentions) {
  std::vector<std::string> warnings;
  const auto ref = find_latest_checkpoint(root, &warnings);
  ASSERT_TRUE(ref.has_value());
  EXPECT_EQ(ref->step, 100);
  ASSERT_EQ(warnings.size(), 1u) << joined(warnings);
  expect_one_line(warnings);
  for (const auto& m : mentions) EXPECT_NE(warnings[0].find(m), std::string::npos) << "'" << m << "' not in: " << warnings[0];
  expect_reads_back(*ref, f100, 0, f100.a[0].size());
}

class CheckpointCorruptTwo : public CheckpointTest {
 protected:
  void SetUp() override {
    CheckpointWriter w(root, 0);
    write_checkpoint(w, 100, bounds3(total), f100, table);
    write_checkpoint(w, 200, bounds3(total), f200, table);
  }
  Flat f100 = make_flat(total, 100), f200 = make_flat(total, 200);
};

TEST_F(CheckpointCorruptTwo, TruncatedRankFile) {
  const std::string victim = rank_path(root, 200, 1, 3);
  fs::resize_file(victim, fs::file_size(victim) / 2);
  expect_fallback(root, f100, {victim});
}

TEST_F(CheckpointCorruptTwo, FlippedByteInDataset) {
  const std::string victim = rank_path(root, 200, 2, 3);
  flip_byte(victim, dataset_offset(victim, "/exp_avg") + 123);
  expect_fallback(root, f100, {victim, "/exp_avg", "checksum"});
  // With a structure-only check the checkpoint opens, and read_shard catches the corruption.
  const CheckpointRef ref = open_checkpoint(root + "/step-00000200", CheckpointCheck::kStructure);
  std::vector<float> out(static_cast<size_t>(total));
  try {
    read_shard(ref, 1400, 200, nullptr, out.data(), nullptr);
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_EQ(e.file(), victim);
    EXPECT_EQ(e.field(), "/exp_avg");
  }
  // Ranges not touching the damaged file still read.
  expect_reads_back(ref, f200, 0, 1501);
}

TEST_F(CheckpointCorruptTwo, FlippedByteInParameterNames) {
  const std::string victim = rank_path(root, 200, 0, 3);
  // The names live in HDF5's global heap; find "embed_tokens" in the file and damage it.
  std::ifstream in(victim, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t pos = bytes.find("model.embed_tokens.weight");
  ASSERT_NE(pos, std::string::npos);
  flip_byte(victim, pos + 7);
  expect_fallback(root, f100, {victim, "/param_table/names", "checksum"});
}

TEST_F(CheckpointCorruptTwo, MissingRankFile) {
  const std::string victim = rank_path(root, 200, 2, 3);
  fs::remove(victim);
  expect_fallback(root, f100, {victim, "missing"});
}

TEST_F(CheckpointCorruptTwo, GarbageLatest) {
  // Damage step 200 too, so the fallback has to skip it as well: two warnings then.
  {
    std::ofstream out(root + "/latest", std::ios::trunc);
    out << "\x01garbage\xff\n";
  }
  std::vector<std::string> warnings;
  auto ref = find_latest_checkpoint(root, &warnings);
  ASSERT_TRUE(ref.has_value());
  EXPECT_EQ(ref->step, 200);  // the newest complete one
  ASSERT_EQ(warnings.size(), 1u) << joined(warnings);
  EXPECT_NE(warnings[0].find(root + "/latest"), std::string::npos) << warnings[0];
  expect_one_line(warnings);

  // latest naming a directory that does not exist, and step 200 damaged.
  {
    std::ofstream out(root + "/latest", std::ios::trunc);
    out << "step-00000700\n";
  }
  fs::remove(rank_path(root, 200, 0, 3));
  warnings.clear();
  ref = find_latest_checkpoint(root, &warnings);
  ASSERT_TRUE(ref.has_value());
  EXPECT_EQ(ref->step, 100);
  ASSERT_EQ(warnings.size(), 2u) << joined(warnings);
  EXPECT_NE(warnings[0].find("step-00000700"), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[1].find(rank_path(root, 200, 0, 3)), std::string::npos) << warnings[1];
  expect_one_line(warnings);
}

TEST_F(CheckpointCorruptTwo, BadRootAttribute) {
  const std::string victim = rank_path(root, 200, 1, 3);
  set_root_int_attr(victim, "shard_len", 802);
  expect_fallback(root, f100, {victim, "/master", "shard_len"});
}

TEST_F(CheckpointCorruptTwo, TamperedTrainerState) {
  const std::string victim = rank_path(root, 200, 0, 3);
  set_state_str_attr(victim, "resolved_config", "[train]\nlr = 1\n");
  expect_fallback(root, f100, {victim, "/trainer_state", "checksum"});
}

TEST_F(CheckpointCorruptTwo, NothingValidGivesNullopt) {
  fs::remove(rank_path(root, 100, 0, 3));
  fs::remove(rank_path(root, 200, 0, 3));
  std::vector<std::string> warnings;
  EXPECT_FALSE(find_latest_checkpoint(root, &warnings).has_value());
  EXPECT_EQ(warnings.size(), 2u) << joined(warnings);
  expect_one_line(warnings);
}

// ---- crashes between phases, rewriting a step ------------------------------------------------

using CheckpointCrash = CheckpointTest;

TEST_F(CheckpointCrash, TmpLeftBehindIsIgnoredThenRemovedByNextBegin) {
  CheckpointWriter w(root, 0);
  const Flat f100 = make_flat(total, 100), f200 = make_flat(total, 200);
  write_checkpoint(w, 100, bounds3(total), f100, table);
  // Crash after some ranks wrote step 200, before commit.
  const std::string tmp200 = w.begin(200);
  CheckpointShard s{f200.a[0].data(), f200.a[1].data(), f200.a[2].data(), 0, 700, total, 0, 3};
  w.write_rank(tmp200, s, table, state_for(200));
  ASSERT_TRUE(fs::exists(tmp200));

  std::vector<std::string> warnings;
  auto ref = find_latest_checkpoint(root, &warnings);
  ASSERT_TRUE(ref.has_value());
  EXPECT_EQ(ref->step, 100);
  EXPECT_TRUE(warnings.empty()) << joined(warnings);
  std::ifstream in(root + "/latest");
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "step-00000100");

  // The resumed run checkpoints again: begin() clears the stale directory.
  CheckpointWriter w2(root, 0);
  const std::string tmp300 = w2.begin(300);
  EXPECT_FALSE(fs::exists(tmp200));
  EXPECT_TRUE(fs::exists(tmp300));
  // ...and a commit with a rank missing is refused and changes nothing.
  CheckpointShard s300 = s;
  TrainerState st = state_for(300);
  w2.write_rank(tmp300, s300, table, st);
  EXPECT_THROW(w2.commit(300, tmp300, 3), IoError);
  EXPECT_FALSE(fs::exists(root + "/step-00000300"));
  EXPECT_EQ(find_latest_checkpoint(root, nullptr)->step, 100);
}

TEST_F(CheckpointCrash, RenamedButLatestNotUpdatedKeepsLatestAuthoritative) {
  CheckpointWriter w(root, 0);
  write_checkpoint(w, 100, {0, total}, make_flat(total, 100), table);
  const std::string latest = root + "/latest";
  const std::string saved = root + "/latest.saved";
  fs::copy_file(latest, saved);
  write_checkpoint(w, 200, {0, total}, make_flat(total, 200), table);
  fs::rename(saved, latest);  // as if the crash came before `latest` was rewritten
  std::vector<std::string> warnings;
  EXPECT_EQ(find_latest_checkpoint(root, &warnings)->step, 100);
  EXPECT_TRUE(warnings.empty()) << joined(warnings);
  // Without a `latest` at all, the newest complete directory is used (with a warning).
  fs::remove(latest);
  EXPECT_EQ(find_latest_checkpoint(root, &warnings)->step, 200);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find(latest), std::string::npos) << warnings[0];
}

using CheckpointRewrite = CheckpointTest;

TEST_F(CheckpointRewrite, ExistingStepKeptUntilTheNewOneIsComplete) {
  CheckpointWriter w(root, 0);
  const Flat old_f = make_flat(total, 1), new_f = make_flat(total, 2);
  write_checkpoint(w, 100, bounds3(total), old_f, table);
  // A resumed run re-reaches step 100, at another world size.
  const std::string tmp = w.begin(100);
  for (int r = 0; r < 2; ++r) {
    const int64_t b = r == 0 ? 0 : 1000, e = r == 0 ? 1000 : total;
    CheckpointShard s{new_f.a[0].data() + b, new_f.a[1].data() + b, new_f.a[2].data() + b, b, e - b, total, r, 2};
    w.write_rank(tmp, s, table, state_for(100));
    // Until commit, readers see the old checkpoint, complete.
    const auto ref = find_latest_checkpoint(root, nullptr);
    ASSERT_TRUE(ref.has_value());
    EXPECT_EQ(ref->world_size, 3);
    expect_reads_back(*ref, old_f, 0, total);
  }
  w.commit(100, tmp, 2);
  std::vector<std::string> warnings;
  const auto ref = find_latest_checkpoint(root, &warnings);
  ASSERT_TRUE(ref.has_value());
  EXPECT_TRUE(warnings.empty()) << joined(warnings);
  EXPECT_EQ(ref->world_size, 2);
  expect_reads_back(*ref, new_f, 0, total);
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    EXPECT_TRUE(n == "latest" || n == "step-00000100") << n;
  }
}

TEST_F(CheckpointRewrite, CrashBetweenTheTwoRenamesKeepsTheOldOne) {
  // Without an atomic exchange, commit renames step-N to .replaced-step-N, then the new one into
  // place. Simulate a crash in between: the old checkpoint is still found, and begin() restores it.
  CheckpointWriter w(root, 0);
  const Flat old_f = make_flat(total, 1), new_f = make_flat(total, 2);
  write_checkpoint(w, 100, bounds3(total), old_f, table);
  const std::string tmp = w.begin(100);
  CheckpointShard s{new_f.a[0].data(), new_f.a[1].data(), new_f.a[2].data(), 0, total, total, 0, 1};
  w.write_rank(tmp, s, table, state_for(100));
  fs::rename(root + "/step-00000100", root + "/.replaced-step-00000100");

  std::vector<std::string> warnings;
  const auto ref = find_latest_checkpoint(root, &warnings);
  ASSERT_TRUE(ref.has_value());
  EXPECT_EQ(ref->step, 100);
  EXPECT_EQ(ref->world_size, 3);
  expect_reads_back(*ref, old_f, 0, total);
  ASSERT_EQ(warnings.size(), 1u) << joined(warnings);  // latest names a missing directory
  EXPECT_NE(warnings[0].find("step-00000100"), std::string::npos);

  w.begin(200);
  EXPECT_TRUE(fs::exists(root + "/step-00000100"));
  EXPECT_FALSE(fs::exists(root + "/.replaced-step-00000100"));
  EXPECT_FALSE(fs::exists(tmp));
  warnings.clear();
  EXPECT_EQ(find_latest_checkpoint(root, &warnings)->world_size, 3);
  EXPECT_TRUE(warnings.empty()) << joined(warnings);
}

// ---- parameter table vs the current model ---------------------------------------------------

using CheckpointParamTable = CheckpointTest;

TEST_F(CheckpointParamTable, MismatchNamesFileAndFirstDifferingTensor) {
  CheckpointWriter w(root, 0);
  write_checkpoint(w, 100, bounds3(total), make_flat(total, 1), table);
  const auto ref = find_latest_checkpoint(root, nullptr);
  ASSERT_TRUE(ref.has_value());
  EXPECT_NO_THROW(check_param_table(*ref, table));

  const ParamTable wider(tiny_config(24));  // different intermediate size: gate_proj of layer 0 first
  try {
    check_param_table(*ref, wider);
    FAIL() << "no error";
  } catch (const InputError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(e.file(), rank_path(root, 100, 0, 3));
    EXPECT_NE(msg.find("model.layers.0.mlp.gate_proj.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[24, 8]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[12, 8]"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos);
  }
  LlamaConfig tied = tiny_config();
  tied.tie_word_embeddings = true;  // one tensor fewer at the end
  try {
    check_param_table(*ref, ParamTable(tied));
    FAIL() << "no error";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("lm_head.weight"), std::string::npos) << e.what();
  }
}

// ---- tensor data layout, datasets stored by other writers, the async writer -----------------------

// The shards of `bounds` (world_size + 1 boundaries) over f's arrays.
std::vector<CheckpointShard> shards_of(const Flat& f, const std::vector<int64_t>& bounds) {
  std::vector<CheckpointShard> v;
  const int world = int(bounds.size()) - 1;
  for (int r = 0; r < world; ++r) {
    CheckpointShard s;
    s.shard_begin = bounds[size_t(r)];
    s.shard_len = bounds[size_t(r) + 1] - s.shard_begin;
    s.total_len = bounds.back();
    s.master = f.a[0].data() + s.shard_begin;
    s.exp_avg = f.a[1].data() + s.shard_begin;
    s.exp_avg_sq = f.a[2].data() + s.shard_begin;
    s.rank = r;
    s.world_size = world;
    v.push_back(s);
  }
  return v;
}

// Replaces the float dataset `name` of a rank file by a chunked, deflate-compressed copy with the
// same data and checksum attribute, as another HDF5 writer (h5py with compression) could store it.
void rewrite_chunked(const std::string& path, const char* name) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  hid_t ds = H5Dopen2(file, name, H5P_DEFAULT);
  ASSERT_GE(ds, 0);
  const hid_t space = H5Dget_space(ds);
  hsize_t n = 0;
  H5Sget_simple_extent_dims(space, &n, nullptr);
  std::vector<float> data(static_cast<size_t>(n));
  ASSERT_GE(H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()), 0);
  uint64_t sum = 0;
  const hid_t a = H5Aopen(ds, "xxh3_64", H5P_DEFAULT);
  H5Aread(a, H5T_NATIVE_UINT64, &sum);
  H5Aclose(a);
  H5Dclose(ds);
  ASSERT_GE(H5Ldelete(file, name, H5P_DEFAULT), 0);
  const hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  const hsize_t chunk = 100;
  H5Pset_chunk(dcpl, 1, &chunk);
  if (H5Zfilter_avail(H5Z_FILTER_DEFLATE) > 0) H5Pset_deflate(dcpl, 1);
  ds = H5Dcreate2(file, name, H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  ASSERT_GE(ds, 0);
  ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()), 0);
  const hid_t aspace = H5Screate(H5S_SCALAR);
  const hid_t attr = H5Acreate2(ds, "xxh3_64", H5T_STD_U64LE, aspace, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(attr, H5T_NATIVE_UINT64, &sum);
  H5Aclose(attr);
  H5Sclose(aspace);
  H5Dclose(ds);
  H5Pclose(dcpl);
  H5Sclose(space);
  H5Fclose(file);
}

TEST_F(CheckpointRoundTrip, LargeTensorDatasetsAreContiguousAndMiBAligned) {
  const ParamTable big(tiny_config(12288));
  const int64_t n = big.total_elements();
  ASSERT_GT(n, 2 * 262144);  // both shards' arrays above 1 MiB
  const Flat f = make_flat(n, 11);
  CheckpointWriter w(root, 0);
  write_checkpoint(w, 5, {0, n / 2, n}, f, big);
  for (int r = 0; r < 2; ++r)
    for (const char* name : {"/master", "/exp_avg", "/exp_avg_sq"})
      EXPECT_EQ(dataset_offset(rank_path(root, 5, r, 2), name) % (uint64_t(1) << 20), 0u) << name;
  const auto ref = find_latest_checkpoint(root, nullptr);  // full validation
  ASSERT_TRUE(ref.has_value());
  expect_reads_back(*ref, f, 0, n);
  expect_reads_back(*ref, f, n / 2 - 1000, 280000);  // across the two files, several 1 MiB pieces
}

TEST_F(CheckpointRoundTrip, ChunkedCompressedDatasetsOfAnotherWriterAreReadThroughHdf5) {
  const Flat f = make_flat(total, 12);
  CheckpointWriter w(root, 0);
  write_checkpoint(w, 9, bounds3(total), f, table);
  const std::string victim = rank_path(root, 9, 1, 3);
  rewrite_chunked(victim, "/exp_avg");
  {
    const hid_t file = H5Fopen(victim.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    const hid_t ds = H5Dopen2(file, "/exp_avg", H5P_DEFAULT);
    const hid_t dcpl = H5Dget_create_plist(ds);
    EXPECT_EQ(H5Pget_layout(dcpl), H5D_CHUNKED);
    H5Pclose(dcpl);
    H5Dclose(ds);
    H5Fclose(file);
  }
  std::vector<std::string> warnings;
  const auto ref = find_latest_checkpoint(root, &warnings);  // full validation reads it too
  ASSERT_TRUE(ref.has_value()) << joined(warnings);
  EXPECT_EQ(ref->step, 9);
  checkpoint_testing::set_read_piece_elems(64);
  expect_reads_back(*ref, f, 0, total);
  expect_reads_back(*ref, f, 650, 950);
  checkpoint_testing::set_read_piece_elems(int64_t(1) << 22);
  expect_reads_back(*ref, f, 650, 950);
}

using CheckpointAsync = CheckpointTest;

TEST_F(CheckpointAsync, SaveSnapshotsTheArraysAndWritesInTheBackground) {
  Flat f = make_flat(total, 21);
  const Flat expected = f;
  AsyncCheckpointWriter w(root, 0);
  w.save(100, shards_of(f, bounds3(total)), table, state_for(100));
  // The caller may change its arrays as soon as save() returns.
  for (auto& v : f.a) std::fill(v.begin(), v.end(), 0.0f);
  w.wait();
  EXPECT_FALSE(w.pending());
  std::vector<std::string> warnings;
  auto ref = find_latest_checkpoint(root, &warnings);
  ASSERT_TRUE(ref.has_value()) << joined(warnings);
  EXPECT_TRUE(warnings.empty()) << joined(warnings);
  EXPECT_EQ(ref->step, 100);
  EXPECT_EQ(ref->world_size, 3);
  expect_reads_back(*ref, expected, 0, total);
  EXPECT_EQ(read_trainer_state(*ref), state_for(100));
  // A second save reuses the staging buffers; the destructor waits for it.
  const Flat g = make_flat(total, 22);
  w.save(200, shards_of(g, {0, total}), table, state_for(200));
  w.wait();
  ref = find_latest_checkpoint(root, nullptr);
  ASSERT_TRUE(ref.has_value());
  EXPECT_EQ(ref->step, 200);
  EXPECT_EQ(ref->world_size, 1);
  expect_reads_back(*ref, g, 0, total);
  // Nothing of the protocol is left behind.
  for (const auto& e : fs::directory_iterator(fs::path(root) / "step-00000200"))
    EXPECT_EQ(e.path().filename().string(), "rank-00000-of-00001.h5");
}

TEST_F(CheckpointAsync, EveryRankWritesAsyncThenRankZeroCommits) {
  const Flat f = make_flat(total, 23);
  const std::vector<CheckpointShard> shards = shards_of(f, bounds3(total));
  std::vector<std::unique_ptr<AsyncCheckpointWriter>> ranks;  // one writer per simulated rank
  for (size_t r = 0; r < shards.size(); ++r) ranks.push_back(std::make_unique<AsyncCheckpointWriter>(root, 0));
  const std::string tmp = ranks[0]->writer().begin(300);
  for (size_t r = 0; r < shards.size(); ++r) ranks[r]->write_rank_async(tmp, shards[r], table, state_for(300));
  for (auto& w : ranks) w->wait();
  ranks[0]->writer().commit(300, tmp, 3);
  const auto ref = find_latest_checkpoint(root, nullptr);
  ASSERT_TRUE(ref.has_value());
  EXPECT_EQ(ref->step, 300);
  expect_reads_back(*ref, f, 0, total);
}

TEST_F(CheckpointAsync, BackgroundErrorIsRethrownByWaitAndNothingIsCommitted) {
  const Flat f100 = make_flat(total, 24), f200 = make_flat(total, 25);
  CheckpointWriter sync(root, 0);
  write_checkpoint(sync, 100, bounds3(total), f100, table);
  AsyncCheckpointWriter w(root, 0);
  checkpoint_testing::set_fail_data_writes(true);
  w.save(200, shards_of(f200, bounds3(total)), table, state_for(200));
  try {
    w.wait();
    checkpoint_testing::set_fail_data_writes(false);
    FAIL() << "no error";
  } catch (const IoError& e) {
    checkpoint_testing::set_fail_data_writes(false);
    EXPECT_NE(std::string(e.what()).find("injected"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(w.wait());  // reported once
  EXPECT_FALSE(fs::exists(fs::path(root) / "step-00000200"));
  std::vector<std::string> warnings;
  auto ref = find_latest_checkpoint(root, &warnings);
  ASSERT_TRUE(ref.has_value());
  EXPECT_TRUE(warnings.empty()) << joined(warnings);
  EXPECT_EQ(ref->step, 100);
  // No temporary rank file is left in the abandoned directory.
  for (const auto& e : fs::directory_iterator(w.writer().tmp_dir(200))) ADD_FAILURE() << e.path();
  // The writer works again afterwards.
  w.save(200, shards_of(f200, bounds3(total)), table, state_for(200));
  w.wait();
  ref = find_latest_checkpoint(root, nullptr);
  ASSERT_TRUE(ref.has_value());
  EXPECT_EQ(ref->step, 200);
  expect_reads_back(*ref, f200, 0, total);
  // A failure nobody waits for is reported by the destructor, which does not throw.
  {
    AsyncCheckpointWriter lost(root, 0);
    checkpoint_testing::set_fail_data_writes(true);
    lost.save(400, shards_of(f200, bounds3(total)), table, state_for(400));
    EXPECT_TRUE(lost.pending());
  }  // the destructor joins the failing thread and prints its error
  checkpoint_testing::set_fail_data_writes(false);
  EXPECT_FALSE(fs::exists(fs::path(root) / "step-00000400"));
}

}  // namespace
}  // namespace longtune
