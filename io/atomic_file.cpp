#include "io/atomic_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <type_traits>

#include "src/common/error.hpp"

namespace longtune {

std::string errno_text(int e) {
  char buf[256];
  // GNU strerror_r returns the message (maybe not in buf); XSI returns an int. Handle both.
  auto r = strerror_r(e, buf, sizeof buf);
  if constexpr (std::is_same_v<decltype(r), char*>) {
    return std::string(r);
  } else {
    return r == 0 ? std::string(buf) : "errno " + std::to_string(e);
  }
}

static IoError io_error(const std::string& call, const std::string& path, int e) {
  return IoError(call + "(" + path + "): " + errno_text(e));
}

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) ::close(fd_);
}

void UniqueFd::close(const std::string& path) {
  if (fd_ < 0) return;
  const int fd = fd_;
  fd_ = -1;
  // POSIX leaves the descriptor state unspecified after EINTR; Linux always frees it, so no retry.
  if (::close(fd) != 0) throw io_error("close", path, errno);
}

size_t pread_full(int fd, void* buf, size_t n, uint64_t offset, const std::string& path) {
  auto* p = static_cast<char*>(buf);
  size_t done = 0;
  while (done < n) {
    const size_t chunk = std::min<size_t>(n - done, size_t(1) << 30);
    const ssize_t r = ::pread(fd, p + done, chunk, off_t(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw io_error("pread", path, errno);
    }
    if (r == 0) break;  // end of file
    done += size_t(r);
  }
  return done;
}

void pwrite_full(int fd, const void* buf, size_t n, uint64_t offset, const std::string& path) {
  const auto* p = static_cast<const char*>(buf);
  size_t done = 0;
  while (done < n) {
    const size_t chunk = std::min<size_t>(n - done, size_t(1) << 30);
    const ssize_t r = ::pwrite(fd, p + done, chunk, off_t(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw io_error("pwrite", path, errno);
    }
    if (r == 0) throw IoError("pwrite(" + path + "): wrote 0 bytes");
    done += size_t(r);
  }
}

std::string temp_path_for(const std::string& path) {
  static std::atomic<unsigned long> counter{0};
  const std::filesystem::path p(path);
  const std::string name = "." + p.filename().string() + ".tmp." + std::to_string(::getpid()) + "." +
                           std::to_string(counter.fetch_add(1));
  return (p.parent_path() / name).string();
}

void fsync_path(const std::string& path, bool directory) {
  const int flags = directory ? (O_RDONLY | O_DIRECTORY | O_CLOEXEC) : (O_RDONLY | O_CLOEXEC);
  UniqueFd fd(::open(path.c_str(), flags));
  if (fd.get() < 0) throw io_error("open", path, errno);
  if (::fsync(fd.get()) != 0) throw io_error("fsync", path, errno);
  fd.close(path);
}

static std::string parent_dir(const std::string& path) {
  std::string dir = std::filesystem::path(path).parent_path().string();
  return dir.empty() ? "." : dir;
}

void rename_durable(const std::string& tmp, const std::string& path) {
  if (::rename(tmp.c_str(), path.c_str()) != 0)
    throw IoError("rename(" + tmp + " -> " + path + "): " + errno_text(errno));
  fsync_path(parent_dir(path), true);
}

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)), tmp_(temp_path_for(path_)) {
  fd_ = UniqueFd(::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (fd_.get() < 0) throw io_error("open", tmp_, errno);
}

AtomicFile::~AtomicFile() {
  if (!committed_) {
    fd_ = UniqueFd();
    ::unlink(tmp_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t n) {
  pwrite_full(fd_.get(), data, n, pos_, tmp_);
  pos_ += n;
}

void AtomicFile::commit() {
  if (::fsync(fd_.get()) != 0) throw io_error("fsync", tmp_, errno);
  fd_.close(tmp_);
  rename_durable(tmp_, path_);
  committed_ = true;
}

void write_file_atomic(const std::string& path, std::string_view data) {
  AtomicFile f(path);
  f.write(data.data(), data.size());
  f.commit();
}

std::string read_text_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    const int e = errno;
    if (e == ENOENT) throw InputError(path, "file", "an existing file", "no such file");
    throw io_error("open", path, e);
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) throw io_error("fstat", path, errno);
  if (S_ISDIR(st.st_mode)) throw InputError(path, "file", "a regular file", "a directory");
  std::string data;
  uint64_t off = 0;
  char buf[1 << 16];
  for (;;) {
    const size_t n = pread_full(fd.get(), buf, sizeof buf, off, path);
    data.append(buf, n);
    off += n;
    if (n < sizeof buf) break;
  }
  fd.close(path);
  return data;
}

}  // namespace longtune
