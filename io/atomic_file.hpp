// POSIX file helpers shared by the io layer: checked reads and writes, and atomic replacement
// (write a temporary file in the target's directory, fsync it, rename it over the target, fsync
// the directory), so readers only ever see a complete old or a complete new file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace longtune {

// strerror(e) as a std::string (thread-safe).
std::string errno_text(int e);

// An owned file descriptor, closed on destruction (close errors there are ignored: call close()
// to check them).
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  UniqueFd& operator=(UniqueFd&& o) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd();
  int get() const { return fd_; }
  // Closes now; throws IoError naming `path` when close(2) fails.
  void close(const std::string& path);

 private:
  int fd_ = -1;
};

// Reads up to n bytes at `offset` (pread loop, EINTR retried); returns the bytes read, which is
// less than n only at end of file. Throws IoError naming `path` on a failing call.
size_t pread_full(int fd, void* buf, size_t n, uint64_t offset, const std::string& path);
// Writes exactly n bytes at `offset` (pwrite loop). Throws IoError naming `path` on failure.
void pwrite_full(int fd, const void* buf, size_t n, uint64_t offset, const std::string& path);

// A unique temporary name next to `path`: <dir>/.<name>.tmp.<pid>.<counter>.
std::string temp_path_for(const std::string& path);
// fsync(2) of an existing file or directory by name.
void fsync_path(const std::string& path, bool directory = false);
// rename(tmp, path) followed by an fsync of path's directory.
void rename_durable(const std::string& tmp, const std::string& path);

// A file written under a temporary name and renamed over `path` by commit(). Destroying it
// uncommitted removes the temporary file, leaving `path` as it was.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();
  const std::string& path() const { return path_; }
  const std::string& tmp_path() const { return tmp_; }
  // Appends n bytes.
  void write(const void* data, size_t n);
  uint64_t size() const { return pos_; }
  // fsync, close, rename over path(), fsync the directory.
  void commit();

 private:
  std::string path_, tmp_;
  UniqueFd fd_;
  uint64_t pos_ = 0;
  bool committed_ = false;
};

// Replaces `path` atomically with `data`.
void write_file_atomic(const std::string& path, std::string_view data);
// The whole content of a file. A missing file is an InputError (field "file"); other failures
// are IoError.
std::string read_text_file(const std::string& path);

}  // namespace longtune
