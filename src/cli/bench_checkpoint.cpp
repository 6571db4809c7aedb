// longtune bench checkpoint: write and read speed of an HDF5 checkpoint (io/checkpoint.hpp) of a
// synthetic multi-GiB optimizer state, beside the raw sequential write/read speed of the same disk
// measured in the same run (docs/benchmarks.md, "Checkpoint I/O").
//
// Every read is preceded by posix_fadvise(POSIX_FADV_DONTNEED) on the files (clean after their
// fsync) and mincore() checks that the pages really left the page cache; otherwise the read would
// measure memory, not the disk, and the output says so.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "io/checkpoint.hpp"
#include "src/cli/bench.hpp"
#include "src/cli/options.hpp"
#include "src/common/error.hpp"
#include "src/model/param_table.hpp"
#include "src/memory/host_memory.hpp"

namespace po = boost::program_options;

namespace longtune::cli {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr size_t kBlock = size_t(64) << 20;  // raw I/O block: 64 MiB
constexpr size_t kDirectAlign = 4096;

struct Options {
  std::string dir = "runs/bench-ckpt";
  double gib = 4;
  int ranks = 1;
  int repeat = 2;
  bool direct = true;
  bool async = true;
};

template <class F>
double time_s(F&& f) {
  const auto t0 = Clock::now();
  f();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string errno_msg(const char* call, const std::string& path) {
  return std::string(call) + "(" + path + "): " + std::strerror(errno);
}

// ---- the synthetic state ----------------------------------------------------------------------

int64_t table_elems(int64_t V, int64_t C, int64_t L) {
  const int64_t F = (8 * C / 3 + 63) / 64 * 64;
  // C is a multiple of 64, so every tensor is already aligned; q_dim = kv_dim = C.
  return 2 * V * C + L * (2 * C + 4 * C * C + 3 * F * C) + C;
}

// A Llama-shaped config (head_dim 64, untied) whose flat length is closest to `target` elements.
LlamaConfig config_for(int64_t target) {
  int64_t best_err = INT64_MAX, bv = 0, bc = 0, bl = 0;
  for (int64_t V : {int64_t(32000), int64_t(4096), int64_t(256)})
    for (int64_t L = 1; L <= 80; ++L)
      for (int64_t C = 64; C <= 16384; C += 64) {
        const int64_t e = table_elems(V, C, L);
        const int64_t err = std::llabs(e - target);
        if (err < best_err) best_err = err, bv = V, bc = C, bl = L;
        if (e > target) break;
      }
  LlamaConfig c;
  c.vocab_size = bv;
  c.hidden_size = bc;
  c.intermediate_size = (8 * bc / 3 + 63) / 64 * 64;
  c.num_hidden_layers = bl;
  c.head_dim = 64;
  c.num_attention_heads = bc / 64;
  c.num_key_value_heads = bc / 64;
  c.max_position_embeddings = 4096;
  return c;
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using AlignedBuf = std::unique_ptr<float[], FreeDeleter>;

AlignedBuf alloc_floats(int64_t n) {
  const size_t bytes = (size_t(n) * sizeof(float) + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
  void* p = std::aligned_alloc(kDirectAlign, std::max(bytes, kDirectAlign));
  if (!p) throw SystemError("bench checkpoint: cannot allocate " + std::to_string(bytes) + " bytes");
  return AlignedBuf(static_cast<float*>(p));
}

// Runs f(begin, end) over [0, n) split between the hardware threads.
template <class F>
void parallel_for(int64_t n, F&& f) {
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(), 16));
  std::vector<std::thread> th;
  for (int64_t i = 0; i < t; ++i) th.emplace_back([&, i] { f(n * i / t, n * (i + 1) / t); });
  for (auto& x : th) x.join();
}

// Deterministic pseudo-random non-zero floats (splitmix64): weights in ±[0.001, 1), moments
// around ±1e-3, second moments positive.
void fill_random(float* p, int64_t n, uint64_t seed, float scale, bool positive) {
  parallel_for(n, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      uint64_t z = uint64_t(i) * 0x9e3779b97f4a7c15ull + seed;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      z ^= z >> 31;
      const float u = 0.001f + float(z >> 41) * (0.999f / float(1 << 23));  // [0.001, 1)
      p[i] = scale * ((positive || (z & 1)) ? u : -u);
    }
  });
}

// ---- page cache -----------------------------------------------------------------------------------

struct CacheDrop {
  int64_t files = 0;
  int64_t pages = 0, resident = 0;  // after the drop
  bool ok() const { return pages == 0 || resident * 100 <= pages; }  // at most 1% left
  std::string text() const {
    char b[160];
    std::snprintf(b, sizeof b, "%s: %.1f%% of %lld pages still cached after POSIX_FADV_DONTNEED",
                  ok() ? "page cache dropped" : "PAGE CACHE NOT DROPPED", pages ? 100.0 * double(resident) / double(pages) : 0.0,
                  static_cast<long long>(pages));
    return b;
  }
};

// Flushes `path`, asks the kernel to drop its pages and counts what is still resident.
void drop_file_cache(const std::string& path, CacheDrop& d) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(errno_msg("open", path));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw IoError(errno_msg("fstat", path));
  }
  ::fdatasync(fd);  // already clean when the writer fsynced; dirty pages cannot be dropped
  (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ++d.files;
  if (st.st_size > 0) {
    const long page = ::sysconf(_SC_PAGESIZE);
    const size_t len = size_t(st.st_size);
    void* m = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, 0);
    if (m != MAP_FAILED) {
      std::vector<unsigned char> vec((len + size_t(page) - 1) / size_t(page));
      if (::mincore(m, len, vec.data()) == 0) {
        d.pages += int64_t(vec.size());
        for (unsigned char c : vec) d.resident += c & 1;
      }
      ::munmap(m, len);
    }
  }
  ::close(fd);
}

CacheDrop drop_tree_cache(const std::string& dir) {
  CacheDrop d;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) drop_file_cache(e.path().string(), d);
  return d;
}

std::string filesystem_type(const std::string& dir) {
  // The longest mount point of /proc/self/mounts that is a prefix of dir.
  std::ifstream f("/proc/self/mounts");
  std::string line, best_type = "?", best_dev;
  size_t best_len = 0;
  const std::string abs = fs::canonical(dir).string();
  while (std::getline(f, line)) {
    std::istringstream ss(line);
    std::string dev, mnt, type;
    ss >> dev >> mnt >> type;
    const bool prefix = abs == mnt || (abs.starts_with(mnt) && (mnt == "/" || abs[mnt.size()] == '/'));
    if (prefix && mnt.size() >= best_len) best_len = mnt.size(), best_type = type, best_dev = dev;
  }
  return best_type + " on " + best_dev;
}

// ---- raw sequential I/O ---------------------------------------------------------------------------

void write_all(int fd, const void* p, size_t n, const std::string& path) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd, c, std::min(n, kBlock));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno_msg("write", path));
    }
    c += w;
    n -= size_t(w);
  }
}

size_t read_all(int fd, void* p, size_t n, const std::string& path) {
  char* c = static_cast<char*>(p);
  size_t done = 0;
  while (done < n) {
    const ssize_t r = ::read(fd, c + done, std::min(n - done, kBlock));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno_msg("read", path));
    }
    if (r == 0) break;
    done += size_t(r);
  }
  return done;
}

// Buffered: the three arrays with write() of 64 MiB blocks, then fsync.
double raw_write_buffered(const std::string& path, const float* const arrays[3], int64_t n) {
  return time_s([&] {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw IoError(errno_msg("open", path));
    for (int i = 0; i < 3; ++i) write_all(fd, arrays[i], size_t(n) * sizeof(float), path);
    if (::fsync(fd) != 0) throw IoError(errno_msg("fsync", path));
    ::close(fd);
  });
}

double raw_read_buffered(const std::string& path, float* const arrays[3], int64_t n) {
  return time_s([&] {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw IoError(errno_msg("open", path));
    for (int i = 0; i < 3; ++i)
      if (read_all(fd, arrays[i], size_t(n) * sizeof(float), path) != size_t(n) * sizeof(float))
        throw IoError("read(" + path + "): short file");
    ::close(fd);
  });
}

// O_DIRECT: `bytes` (rounded up to 4 KiB) from one aligned 64 MiB buffer of random data. Returns
// a negative time when the file system refuses O_DIRECT.
double raw_write_direct(const std::string& path, const float* block, size_t bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0644);
  if (fd < 0) {
    if (errno == EINVAL || errno == EOPNOTSUPP) return -1;
    throw IoError(errno_msg("open(O_DIRECT)", path));
  }
  const auto t0 = Clock::now();
  size_t left = (bytes + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
  while (left > 0) {
    const size_t n = std::min(left, kBlock);
    const ssize_t w = ::write(fd, block, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      ::close(fd);
      if (e == EINVAL) return -1;
      errno = e;
      throw IoError(errno_msg("write(O_DIRECT)", path));
    }
    left -= size_t(w);
  }
  if (::fsync(fd) != 0) throw IoError(errno_msg("fsync", path));
  ::close(fd);
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double raw_read_direct(const std::string& path, float* block) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  if (fd < 0) return -1;
  const auto t0 = Clock::now();
  for (;;) {
    const ssize_t r = ::read(fd, block, kBlock);
    if (r < 0) {
      if (errno == EINTR) continue;
      ::close(fd);
      return -1;
    }
    if (r == 0) break;
  }
  ::close(fd);
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// ---- the benchmark ----------------------------------------------------------------------------------

struct Round {
  double ckpt_write = 0, read_structure = 0, read_full = 0, full_verify = 0;
  double async_block = -1, async_total = -1;
  double raw_write = 0, raw_read = 0, direct_write = -1, direct_read = -1;
  bool cached = false;  // some read was served from the page cache
};

double gbs(double bytes, double s) { return s > 0 ? bytes / s / 1e9 : 0; }

// A directory removed (with everything in it) when the benchmark ends, however it ends.
struct WorkDir {
  std::string path;
  ~WorkDir() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

void check_equal(const float* a, const float* b, int64_t n, const char* what) {
  if (std::memcmp(a, b, size_t(n) * sizeof(float)) != 0)
    throw InternalError(std::string("bench checkpoint: ") + what + " read back differs from what was written");
}

}  // namespace

int run_bench_checkpoint(int argc, char** argv) {
  po::options_description desc(
      "longtune bench checkpoint: write and read speed of an HDF5 checkpoint (fp32 master, exp_avg,\n"
      "exp_avg_sq: 12 bytes per parameter) of a synthetic state of --gib GiB, split into --ranks rank\n"
      "files written one after another by this process, beside the raw sequential write()/read() speed\n"
      "of the same disk in the same run (buffered + fsync, and O_DIRECT where supported). The page\n"
      "cache is dropped (POSIX_FADV_DONTNEED, checked with mincore) before every read. Everything\n"
      "written is removed at the end.\n\nOptions");
  Options o;
  desc.add_options()
      ("help,h", "show this help")
      ("dir", po::value(&o.dir)->default_value(o.dir),
       "scratch directory on the file system to measure (created if needed; a bench-<pid> subdirectory "
       "in it is used and removed)")
      ("gib", po::value(&o.gib)->default_value(o.gib), "state size in GiB (master + exp_avg + exp_avg_sq)")
      ("ranks", po::value(&o.ranks)->default_value(o.ranks), "rank files (shards) per checkpoint")
      ("repeat", po::value(&o.repeat)->default_value(o.repeat), "rounds (each: checkpoint, then raw)")
      ("direct", po::value(&o.direct)->default_value(o.direct), "also measure raw O_DIRECT write/read")
      ("async", po::value(&o.async)->default_value(o.async),
       "also time AsyncCheckpointWriter (time the caller is blocked vs until the files are durable)");
  po::variables_map vm;
  if (!parse_command_line(argc, argv, desc, vm)) return 0;  // --help
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each line as it comes (the runs are long)
  if (!(o.gib > 0 && o.gib <= 4096)) throw ConfigError("--gib: expected a size in (0, 4096], got " + std::to_string(o.gib));
  if (o.ranks < 1 || o.ranks > 4096) throw ConfigError("--ranks: expected 1..4096, got " + std::to_string(o.ranks));
  if (o.repeat < 1) throw ConfigError("--repeat: expected an integer >= 1, got " + std::to_string(o.repeat));

  // Scratch space, and a check that the state fits with room to spare.
  std::error_code ec;
  fs::create_directories(o.dir, ec);
  if (ec) throw IoError("mkdir(" + o.dir + "): " + ec.message());
  WorkDir work{(fs::path(o.dir) / ("bench-" + std::to_string(::getpid()))).string()};
  fs::create_directories(work.path, ec);
  if (ec) throw IoError("mkdir(" + work.path + "): " + ec.message());

  const LlamaConfig cfg = config_for(int64_t(o.gib * double(int64_t(1) << 30) / 12.0));
  const ParamTable table(cfg);
  const int64_t total = table.total_elements();
  const double bytes = 12.0 * double(total);
  struct statvfs vfs;
  if (::statvfs(work.path.c_str(), &vfs) != 0) throw IoError(errno_msg("statvfs", work.path));
  const double free_bytes = double(vfs.f_bavail) * double(vfs.f_frsize);
  if (bytes > 0.5 * free_bytes)
    throw ConfigError("--gib: a " + std::to_string(bytes / 1e9) + " GB state needs more than half of the " +
                      std::to_string(free_bytes / 1e9) + " GB free in " + o.dir);
  const int64_t avail = host_memory_available();

  std::printf("longtune bench checkpoint: %.3f GiB state (%lld fp32 elements x 3; Llama-shaped table: %lld layers, "
              "hidden %lld, vocab %lld, %zu tensors), %d rank file(s), %d round(s)\n",
              bytes / double(int64_t(1) << 30), static_cast<long long>(total),
              static_cast<long long>(cfg.num_hidden_layers), static_cast<long long>(cfg.hidden_size),
              static_cast<long long>(cfg.vocab_size), table.entries().size(), o.ranks, o.repeat);
  std::printf("directory %s (%s), %.1f GB free; MemAvailable %.1f GB\n", work.path.c_str(),
              filesystem_type(work.path).c_str(), free_bytes / 1e9, double(avail) / 1e9);
  std::fflush(stdout);

  // The state and the buffers it is read back into.
  AlignedBuf src[3] = {alloc_floats(total), alloc_floats(total), alloc_floats(total)};
  AlignedBuf dst[3] = {alloc_floats(total), alloc_floats(total), alloc_floats(total)};
  fill_random(src[0].get(), total, 1, 1.0f, false);
  fill_random(src[1].get(), total, 2, 1e-3f, false);
  fill_random(src[2].get(), total, 3, 1e-6f, true);
  for (auto& d : dst) parallel_for(total, [&](int64_t a, int64_t b) { std::memset(d.get() + a, 0, size_t(b - a) * 4); });
  const float* const in[3] = {src[0].get(), src[1].get(), src[2].get()};
  float* const out[3] = {dst[0].get(), dst[1].get(), dst[2].get()};
  AlignedBuf direct_block = alloc_floats(int64_t(kBlock / sizeof(float)));
  fill_random(direct_block.get(), int64_t(kBlock / sizeof(float)), 4, 1.0f, false);

  std::vector<CheckpointShard> shards;
  for (int r = 0; r < o.ranks; ++r) {
    CheckpointShard s;
    s.shard_begin = total * r / o.ranks;
    s.shard_len = total * (r + 1) / o.ranks - s.shard_begin;
    s.total_len = total;
    s.master = in[0] + s.shard_begin;
    s.exp_avg = in[1] + s.shard_begin;
    s.exp_avg_sq = in[2] + s.shard_begin;
    s.rank = r;
    s.world_size = o.ranks;
    shards.push_back(s);
  }
  TrainerState state;
  state.run_id = "bench-checkpoint";
  state.resolved_config = "[bench]\n";

  const std::string root = (fs::path(work.path) / "ckpt").string();
  const std::string raw_path = (fs::path(work.path) / "raw.bin").string();
  std::vector<Round> rounds;
  bool all_dropped = true;
  auto note_drop = [&](const CacheDrop& d, const char* before, Round& r) {
    std::printf("  %s (before %s)\n", d.text().c_str(), before);
    if (!d.ok()) {
      all_dropped = false;
      r.cached = true;
    }
  };

  // One async writer for all rounds: its staging buffers are allocated (and first touched) in the
  // first round and reused, as in a training run.
  std::unique_ptr<AsyncCheckpointWriter> async;
  if (o.async) async = std::make_unique<AsyncCheckpointWriter>(root, 1);
  auto checkpoint_part = [&](Round& r, int rep) {
    const int64_t step = rep;
    CheckpointWriter writer(root, 1);
    r.ckpt_write = time_s([&] {
      const std::string tmp = writer.begin(step);
      for (const CheckpointShard& s : shards) {
        TrainerState st = state;
        st.step = step;
        writer.write_rank(tmp, s, table, st);
      }
      writer.commit(step, tmp, o.ranks);
    });
    std::printf("  checkpoint write (begin, %d x write_rank, commit; fsync + checksums): %.3f s, %.2f GB/s\n", o.ranks,
                r.ckpt_write, gbs(bytes, r.ckpt_write));
    const std::string step_dir = (fs::path(root) / checkpoint_dir_name(step)).string();

    note_drop(drop_tree_cache(step_dir), "read, structure check", r);
    r.read_structure = time_s([&] {
      const CheckpointRef ref = open_checkpoint(step_dir, CheckpointCheck::kStructure);
      read_shard(ref, 0, total, out[0], out[1], out[2]);
    });
    for (int i = 0; i < 3; ++i) check_equal(in[i], out[i], total, "checkpoint");
    std::printf("  checkpoint read (open_checkpoint(kStructure) + read_shard, checksums verified once): %.3f s, %.2f GB/s\n",
                r.read_structure, gbs(bytes, r.read_structure));

    note_drop(drop_tree_cache(step_dir), "read, full check", r);
    for (auto& d : dst) std::memset(d.get(), 0, size_t(total) * 4);
    r.read_full = time_s([&] {
      CheckpointRef ref;
      r.full_verify = time_s([&] { ref = open_checkpoint(step_dir, CheckpointCheck::kFull); });
      read_shard(ref, 0, total, out[0], out[1], out[2]);
    });
    for (int i = 0; i < 3; ++i) check_equal(in[i], out[i], total, "checkpoint");
    std::printf("  checkpoint read (open_checkpoint(kFull) + read_shard): %.3f s (kFull validation %.3f s), %.2f GB/s\n",
                r.read_full, r.full_verify, gbs(bytes, r.read_full));

    fs::remove_all(root, ec);  // never more than one state's worth of files on the disk
    if (o.async) {
      const int64_t astep = 1000 + rep;
      r.async_total = time_s([&] {
        r.async_block = time_s([&] {
          TrainerState st = state;
          st.step = astep;
          async->save(astep, shards, table, st);
        });
        async->wait();
      });
      std::printf("  async checkpoint write: caller blocked %.3f s (snapshot), durable after %.3f s, %.2f GB/s\n",
                  r.async_block, r.async_total, gbs(bytes, r.async_total));
    }
    fs::remove_all(root, ec);
  };
  auto raw_part = [&](Round& r) {
    r.raw_write = raw_write_buffered(raw_path, in, total);
    std::printf("  raw write (write() 64 MiB blocks + fsync): %.3f s, %.2f GB/s\n", r.raw_write, gbs(bytes, r.raw_write));
    note_drop(drop_tree_cache(work.path), "raw read", r);
    r.raw_read = raw_read_buffered(raw_path, out, total);
    std::printf("  raw read (read() 64 MiB blocks): %.3f s, %.2f GB/s\n", r.raw_read, gbs(bytes, r.raw_read));
    ::unlink(raw_path.c_str());
    if (o.direct) {
      r.direct_write = raw_write_direct(raw_path, direct_block.get(), size_t(bytes));
      if (r.direct_write < 0) {
        std::printf("  raw O_DIRECT: not supported by this file system\n");
      } else {
        r.direct_read = raw_read_direct(raw_path, direct_block.get());
        std::printf("  raw O_DIRECT write + fsync: %.3f s, %.2f GB/s; read: %.3f s, %.2f GB/s\n", r.direct_write,
                    gbs(bytes, r.direct_write), r.direct_read, gbs(bytes, r.direct_read));
      }
      ::unlink(raw_path.c_str());
    }
  };
  for (int rep = 1; rep <= o.repeat; ++rep) {
    // Odd rounds measure the checkpoint first, even rounds the raw I/O first.
    Round r;
    std::printf("round %d/%d\n", rep, o.repeat);
    if (rep % 2 == 1) {
      checkpoint_part(r, rep);
      raw_part(r);
    } else {
      raw_part(r);
      checkpoint_part(r, rep);
    }
    std::fflush(stdout);
    rounds.push_back(r);
  }

  // Best of the rounds for each figure.
  auto best = [&](double Round::*m) {
    double b = -1;
    for (const Round& r : rounds)
      if (r.*m > 0 && (b < 0 || r.*m < b)) b = r.*m;
    return b;
  };
  const double w = gbs(bytes, best(&Round::ckpt_write)), rs = gbs(bytes, best(&Round::read_structure)),
               rf = gbs(bytes, best(&Round::read_full)), raw_w = gbs(bytes, best(&Round::raw_write)),
               raw_r = gbs(bytes, best(&Round::raw_read));
  const double dw = best(&Round::direct_write) > 0 ? gbs(bytes, best(&Round::direct_write)) : 0;
  const double dr = best(&Round::direct_read) > 0 ? gbs(bytes, best(&Round::direct_read)) : 0;
  const double raw_wmax = std::max(raw_w, dw), raw_rmax = std::max(raw_r, dr);
  const char* cache = all_dropped ? "page cache dropped before every read" : "CACHED: some reads came from the page cache";
  std::printf("\n[RESULT] checkpoint gib=%.3f ranks=%d fs=%s rounds=%d (best of): %s\n", bytes / double(int64_t(1) << 30),
              o.ranks, filesystem_type(work.path).c_str(), o.repeat, cache);
  std::printf("[RESULT] checkpoint write_GB_per_s=%.2f raw_write_GB_per_s=%.2f raw_direct_write_GB_per_s=%.2f "
              "ratio_vs_raw=%.2f ratio_vs_best_raw=%.2f\n",
              w, raw_w, dw, raw_w > 0 ? w / raw_w : 0, raw_wmax > 0 ? w / raw_wmax : 0);
  std::printf("[RESULT] checkpoint read_GB_per_s(kStructure+read_shard)=%.2f read_GB_per_s(kFull+read_shard)=%.2f "
              "raw_read_GB_per_s=%.2f raw_direct_read_GB_per_s=%.2f ratio_vs_raw=%.2f ratio_full_vs_raw=%.2f "
              "ratio_vs_best_raw=%.2f\n",
              rs, rf, raw_r, dr, raw_r > 0 ? rs / raw_r : 0, raw_r > 0 ? rf / raw_r : 0, raw_rmax > 0 ? rs / raw_rmax : 0);
  if (o.async) {
    const double blk = best(&Round::async_block), tot = best(&Round::async_total);
    std::printf("[RESULT] checkpoint async_blocked_s=%.3f async_durable_s=%.3f async_write_GB_per_s=%.2f "
                "sync_write_s=%.3f\n",
                blk, tot, gbs(bytes, tot), best(&Round::ckpt_write));
  }
  if (avail > 0 && !all_dropped && bytes < double(avail))
    std::printf("note: the page cache could not be dropped and the state is smaller than MemAvailable: reads were "
                "(partly) served from memory; rerun with --gib above %.0f\n",
                double(avail) / double(int64_t(1) << 30) + 1);
  return 0;
}

}  // namespace longtune::cli
