#include "lmforge/io/atomic_file.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "lmforge/core/error.h"

namespace lmforge {

namespace {
// "<path>.<pid>.<n>.tmp": two processes (or threads) writing the same file, e.g. two runs filling
// the same cache entry, each write their own temporary; the renames are atomic, the last wins.
std::string temp_name(const std::string& path) {
  static std::atomic<uint64_t> n{0};
  return fmt::format("{}.{}.{}.tmp", path, getpid(), n.fetch_add(1));
}
}  // namespace

AtomicFile::AtomicFile(const std::string& path) : path_(path), tmp_(temp_name(path)) {
  f_ = std::fopen(tmp_.c_str(), "wb");
  if (!f_)
    fail("{}: cannot write ({}); check the directory exists and is writable", tmp_,
         std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (f_) {
    std::fclose(f_);
    std::remove(tmp_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t n) {
  if (n && std::fwrite(data, 1, n, f_) != n)
    fail("{}: write failed ({}); is the disk full?", tmp_, std::strerror(errno));
}

void AtomicFile::overwrite(uint64_t offset, const void* data, size_t n) {
  if (std::fflush(f_) != 0 ||
      pwrite(fileno(f_), data, n, static_cast<off_t>(offset)) != static_cast<ssize_t>(n))
    fail("{}: write failed ({}); is the disk full?", tmp_, std::strerror(errno));
}

void AtomicFile::commit() {
  bool ok = std::fflush(f_) == 0 && fsync(fileno(f_)) == 0;
  int err = errno;
  ok = (std::fclose(f_) == 0) && ok;
  f_ = nullptr;
  if (!ok) {
    std::remove(tmp_.c_str());
    fail("{}: write failed ({}); is the disk full?", tmp_, std::strerror(err));
  }
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    err = errno;
    std::remove(tmp_.c_str());
    fail("{}: cannot rename into place ({})", path_, std::strerror(err));
  }
}

void write_file_atomic(const std::string& path, const std::string& content) {
  AtomicFile f(path);
  f.write(content);
  f.commit();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open ({}); check the path", path, std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace lmforge
