// HDF5 checkpoints (docs/checkpoints.md): one directory per step holding one HDF5 file per rank
// with that rank's shard of the flat fp32 master weights and AdamW moments, the parameter table
// and the trainer state; every dataset carries an XXH3-64 checksum.
//
//   <root>/step-00000100/rank-00000-of-00004.h5 ... rank-00003-of-00004.h5
//   <root>/latest                      "step-00000100": written last, atomically
//
// Writing is split into phases that the caller sequences with barriers across ranks:
//   rank 0:     tmp = writer.begin(step)                 (other ranks: writer.tmp_dir(step))
//   barrier
//   every rank: writer.write_rank(tmp, shard, table, state)
//   barrier
//   rank 0:     writer.commit(step, tmp, world_size)
// Readers (find_latest_checkpoint) only ever see complete checkpoints.
#pragma once
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "src/model/param_table.hpp"

namespace longtune {

// Version of the on-disk layout written by this code (attribute /trainer_state/format_version).
inline constexpr int64_t kCheckpointFormatVersion = 1;

// Everything besides the tensors that a resumed run needs. The data cursor is stored as its two
// integers (PackerCursor lives in src/data).
struct TrainerState {
  int64_t step = 0;         // optimizer steps done
  int64_t tokens_seen = 0;  // counted target tokens trained on so far
  int64_t epoch = 0;
  int64_t cursor_order_index = 0;    // PackerCursor::order_index
  int64_t cursor_offset_in_doc = 0;  // PackerCursor::offset_in_doc
  uint64_t data_seed = 0;
  std::string rng_state;        // serialized RNG state (opaque text)
  double loss_scale = 1.0;      // dynamic fp16 loss scale (1 when unused)
  std::string resolved_config;  // the resolved configuration, INI text
  std::string run_id;
  int64_t format_version = kCheckpointFormatVersion;  // set by the writer, checked by the reader

  bool operator==(const TrainerState&) const = default;
};

// One rank's part of the flat parameter space [shard_begin, shard_begin + shard_len), padding
// included. The pointers are the rank's shard (shard_len floats each).
struct CheckpointShard {
  const float* master = nullptr;
  const float* exp_avg = nullptr;
  const float* exp_avg_sq = nullptr;
  int64_t shard_begin = 0, shard_len = 0, total_len = 0;
  int rank = 0, world_size = 1;
};

// "step-00000100" (at least 8 digits) and "rank-00001-of-00004.h5" (at least 5 digits each).
std::string checkpoint_dir_name(int64_t step);
std::string checkpoint_rank_file_name(int rank, int world_size);

class CheckpointWriter {
 public:
  // keep_last <= 0 keeps every checkpoint.
  CheckpointWriter(std::string root, int keep_last);

  const std::string& root() const { return root_; }
  // "<root>/.tmp-step-XXXXXXXX": what begin(step) returns, for the ranks that did not call it.
  std::string tmp_dir(int64_t step) const;

  // Rank 0. Creates <root> if needed, clears what a crashed writer left (stale .tmp-step-* and
  // .deleting-step-* directories are removed; a .replaced-step-N whose step-N is missing is
  // renamed back to step-N) and creates an empty tmp_dir(step). Returns tmp_dir(step).
  std::string begin(int64_t step);

  // Every rank. Writes <tmp_dir>/rank-RRRRR-of-WWWWW.h5 under a temporary name, fsyncs it and
  // renames it into place. `table` must describe the flat space (total_elements() == total_len)
  // and state.step must be the step of tmp_dir.
  void write_rank(const std::string& tmp_dir, const CheckpointShard& shard, const ParamTable& table,
                  const TrainerState& state);

  // Rank 0, after every rank's write_rank returned. Checks that all world_size rank files are
  // there and coherent (structure only, no data checksums), fsyncs tmp_dir, renames it to
  // step-XXXXXXXX (an existing one is replaced without a moment where neither the old nor the new
  // is complete: see docs/checkpoints.md), fsyncs <root>, rewrites <root>/latest atomically, then
  // prunes to keep_last. Throws IoError naming the missing rank file when a rank did not write.
  void commit(int64_t step, const std::string& tmp_dir, int world_size);

 private:
  void prune(int64_t just_written);
  std::string root_;
  int keep_last_;
};

// Checkpoints written by a background thread while training goes on (docs/checkpoints.md,
// "Asynchronous writing"). A save first waits for the previous one (rethrowing its error), then,
// on the caller's thread: copies the shards' three arrays into staging buffers owned by this
// object (as much host memory as the shards; allocated at the first save and reused), taking the
// checksums on the way, and creates the HDF5 rank files with everything but the tensor bytes. It
// returns then; the caller may change its arrays at once. A thread writes the tensor bytes
// (pwrite, no HDF5 call), fsyncs and renames the files into place, and commits. wait() blocks until
// that is done and rethrows its error (once): call it before exiting. The destructor waits too,
// but can only print an error that nobody collected. The files are the same as
// CheckpointWriter's, and so is the crash safety: a checkpoint is visible only once committed.
//
// One process holding every shard (world size 1, benchmarks): save() runs begin, the rank files
// and commit. Several ranks: rank 0 calls writer().begin(step); after a barrier every rank calls
// write_rank_async(); later (before the next checkpoint, and at exit) every rank calls wait(), a
// barrier follows, and rank 0 calls writer().commit(step, tmp, world_size). Do not use writer()
// while a write is pending.
//
// The commit reads the rank files' metadata through HDF5: it runs in the thread when the HDF5
// library is thread-safe (H5is_library_threadsafe; Debian's and conda's serial builds are), else
// in wait(), on the caller's thread.
class AsyncCheckpointWriter {
 public:
  AsyncCheckpointWriter(std::string root, int keep_last);
  ~AsyncCheckpointWriter();
  AsyncCheckpointWriter(const AsyncCheckpointWriter&) = delete;
  AsyncCheckpointWriter& operator=(const AsyncCheckpointWriter&) = delete;

  CheckpointWriter& writer() { return writer_; }

  // All shards of one checkpoint (ranks 0 .. shards.size()-1, every world_size == shards.size()).
  void save(int64_t step, const std::vector<CheckpointShard>& shards, const ParamTable& table,
            const TrainerState& state);
  // This rank's shard into tmp_dir (see CheckpointWriter::write_rank); no commit.
  void write_rank_async(const std::string& tmp_dir, const CheckpointShard& shard, const ParamTable& table,
                        const TrainerState& state);
  // Blocks until the pending write finished; rethrows the exception it ended with.
  void wait();
  // A write was started and not yet waited for.
  bool pending() const { return worker_.joinable(); }

 private:
  struct Staged {
    std::unique_ptr<float[]> data;  // master, exp_avg, exp_avg_sq back to back
    size_t capacity = 0;            // floats
  };
  // Copies `shard` into staging slot `slot` and returns it pointing there, with the checksums of
  // its three arrays.
  CheckpointShard stage(size_t slot, const CheckpointShard& shard, uint64_t checksums[3]);
  CheckpointWriter writer_;
  std::vector<Staged> staged_;
  std::thread worker_;
  std::exception_ptr error_;
  // commit() reads the rank files through HDF5: in the worker when the HDF5 library is
  // thread-safe, else in wait() on the caller's thread.
  bool commit_in_background_ = false;
  int64_t deferred_commit_step_ = -1;
  int deferred_commit_world_ = 0;
};

// One rank file of a checkpoint, in rank order.
struct CheckpointRankFile {
  std::string path;
  int64_t shard_begin = 0, shard_len = 0;
};

// A complete checkpoint directory that passed validation.
struct CheckpointRef {
  std::string dir;  // the step directory
  int64_t step = 0;
  int world_size = 0;
  int64_t total_len = 0;                  // flat length, padding included
  std::vector<CheckpointRankFile> files;  // world_size entries; shards tile [0, total_len)
};

enum class CheckpointCheck {
  // Files open, attributes and dataset shapes are coherent, parameter table and trainer state
  // checksums match. Reads only metadata.
  kStructure,
  // kStructure plus the checksum of every /master, /exp_avg, /exp_avg_sq: reads the whole
  // checkpoint once (3 x 4 bytes x total_len).
  kFull,
};

// Validates one step directory, or the `latest` file of a checkpoint root (resolved to the
// directory it names). Throws InputError naming the file and the problem.
CheckpointRef open_checkpoint(const std::string& path, CheckpointCheck check = CheckpointCheck::kFull);

// The checkpoint to resume from: the one <root>/latest names when it validates; otherwise (with a
// one-line warning per problem appended to *warnings, naming the file) the newest complete
// step-* directory that validates. nullopt when there is none (no warning when <root> holds no
// checkpoint at all). `warnings` may be null.
std::optional<CheckpointRef> find_latest_checkpoint(const std::string& root, std::vector<std::string>* warnings,
                                                    CheckpointCheck check = CheckpointCheck::kFull);

// The trainer state (from rank file 0; every rank file holds the same, checked on open).
TrainerState read_trainer_state(const CheckpointRef& ref);

// The checkpoint's parameter table (ParamEntry::layer is not stored and reads as -1).
std::vector<ParamEntry> read_checkpoint_param_table(const CheckpointRef& ref);

// Throws InputError naming the checkpoint file and the first tensor whose name, shape, offset or
// size differs from `model` (or the flat length when only that differs).
void check_param_table(const CheckpointRef& ref, const ParamTable& model);

// Reads the flat range [begin, begin + len) of master weights and both moments, stitched from
// whichever rank files hold it, so a run may resume at another world size. A null output pointer
// skips that array. Every dataset read from is checksummed whole: a rank file that holds only part
// of the range is still read in full (in 1 MiB pieces, copying out the overlap; the three arrays
// concurrently), so the cost is the size of the touched rank files' datasets, not of the range.
// Throws InputError on a checksum mismatch.
void read_shard(const CheckpointRef& ref, int64_t begin, int64_t len, float* master, float* exp_avg,
                float* exp_avg_sq);

namespace checkpoint_testing {
// Elements per read piece in read_shard and checksum verification: per HDF5 hyperslab read
// (default 4 Mi = 16 MiB), and per pread up to 256 Ki (1 MiB); tests lower it to exercise piece
// boundaries on small checkpoints.
void set_read_piece_elems(int64_t n);
// While set, every write of tensor data throws an IoError (to test error paths of the writers).
void set_fail_data_writes(bool fail);
}  // namespace checkpoint_testing

}  // namespace longtune
