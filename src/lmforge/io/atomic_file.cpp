#include "lmforge/io/atomic_file.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <vector>

#include "lmforge/core/error.h"
#include "lmforge/core/leftovers.h"

namespace lmforge {

namespace {
// "<path>.<pid>.<n>.tmp": two processes (or threads) writing the same file, e.g. two runs filling
// the same cache entry, each write their own temporary; the renames are atomic, the last wins.
std::string temp_name(const std::string& path) {
  static std::atomic<uint64_t> n{0};
  return fmt::format("{}.{}.{}.tmp", path, getpid(), n.fetch_add(1));
}

// Temporaries of path left by writers that were killed (their process is gone): removed, so
// kills do not pile them up (one fixed name used to be overwritten instead). The first 4096
// entries of the directory only: a shard directory of thousands of files is not rescanned per
// file (prepare removes its own temporaries when it resumes).
void remove_stale_temps(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path p(path);
  const std::string prefix = p.filename().string() + ".";
  std::error_code ec;
  int seen = 0;
  for (fs::directory_iterator it(p.parent_path().empty() ? fs::path(".") : p.parent_path(), ec),
       end;
       !ec && it != end && ++seen <= 4096; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (!name.starts_with(prefix) || !name.ends_with(".tmp")) continue;
    const std::string rest = name.substr(prefix.size());  // "<pid>.<n>.tmp"
    const long pid = std::strtol(rest.c_str(), nullptr, 10);
    if (pid <= 0 || rest.find_first_not_of("0123456789.") != rest.size() - 3) continue;
    if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) {
      // (a directory only where its name is lmforge's beyond doubt: an export's, see
      // fresh_temp_dir; a user's "x.2024.12.tmp" beside x is left alone)
      if (!it->is_directory(ec))
        fs::remove(it->path(), ec);
      else if (prefix.find(".lmforge-") != std::string::npos)
        fs::remove_all(it->path(), ec);
    }
  }
}
}  // namespace

std::string fresh_temp_dir(const std::string& path) {
  remove_stale_temps(path);
  std::string tmp = temp_name(path);
  note_temp(tmp, [&] { std::filesystem::create_directory(tmp); });  // (its writer renames it)
  return tmp;
}

AtomicFile::AtomicFile(const std::string& path) : path_(path), tmp_(temp_name(path)) {
  remove_stale_temps(path);
  note_temp(tmp_, [&] { f_ = std::fopen(tmp_.c_str(), "wb"); });
  if (!f_)
    fail("{}: cannot write ({}); {}", tmp_, std::strerror(errno),
         io_fix(errno, "check the directory exists and is writable"));
}

AtomicFile::~AtomicFile() {
  if (f_) {
    std::fclose(f_);
    std::remove(tmp_.c_str());
  }
  forget_temp(tmp_);
}

void AtomicFile::write(const void* data, size_t n) {
  if (n && std::fwrite(data, 1, n, f_) != n) {
    const int err = errno;
    fail("{}: write failed ({}); {}", tmp_, std::strerror(err), io_fix(err, "is the disk full?"));
  }
}

void AtomicFile::overwrite(uint64_t offset, const void* data, size_t n) {
  if (std::fflush(f_) != 0 ||
      pwrite(fileno(f_), data, n, static_cast<off_t>(offset)) != static_cast<ssize_t>(n)) {
    const int err = errno;
    fail("{}: write failed ({}); {}", tmp_, std::strerror(err), io_fix(err, "is the disk full?"));
  }
}

void AtomicFile::commit() {
  bool ok = std::fflush(f_) == 0 && fsync(fileno(f_)) == 0;
  int err = errno;
  ok = (std::fclose(f_) == 0) && ok;
  f_ = nullptr;
  if (!ok) {
    std::remove(tmp_.c_str());
    fail("{}: write failed ({}); {}", tmp_, std::strerror(err), io_fix(err, "is the disk full?"));
  }
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    err = errno;
    std::remove(tmp_.c_str());
    fail(
        "{}: cannot rename into place ({}); check that it and its directory are writable (not "
        "read-only or immutable)",
        path_, std::strerror(err));
  }
}

void write_file_atomic(const std::string& path, const std::string& content) {
  AtomicFile f(path);
  f.write(content);
  f.commit();
}

void rewrite_records(const std::string& path, const RecordReader& next) {
  const uint64_t size = std::filesystem::file_size(path);
  std::string rec;
  // The offset of the first change (a dropped or altered record, a dropped tail), if any.
  auto first_change = [&]() -> std::optional<uint64_t> {
    std::ifstream in(path, std::ios::binary);
    if (!in)
      fail("{}: cannot open ({}); {}", path, std::strerror(errno), io_fix(errno, "check the path"));
    for (uint64_t at = 0;;) {
      uint64_t consumed = 0;
      RecordAction a = next(in, size - at, rec, consumed);
      if (a == RecordAction::kEnd) return at < size ? std::optional<uint64_t>(at) : std::nullopt;
      if (a == RecordAction::kDrop || rec.size() != consumed) return at;
      at += consumed;
    }
  };
  const std::optional<uint64_t> cut = first_change();
  if (!cut) return;
  std::ifstream in(path, std::ios::binary);
  if (!in)
    fail("{}: cannot open ({}); {}", path, std::strerror(errno), io_fix(errno, "check the path"));
  AtomicFile out(path);
  std::vector<char> buf(1 << 20);
  for (uint64_t left = *cut; left > 0;) {  // the unchanged records before the first change
    const size_t n = static_cast<size_t>(std::min<uint64_t>(left, buf.size()));
    if (!in.read(buf.data(), static_cast<std::streamsize>(n)))
      fail("{}: cannot read ({})", path, std::strerror(errno));
    out.write(buf.data(), n);
    left -= n;
  }
  for (uint64_t at = *cut;;) {
    uint64_t consumed = 0;
    RecordAction a = next(in, size - at, rec, consumed);
    if (a == RecordAction::kEnd) break;
    if (a == RecordAction::kKeep) out.write(rec);
    at += consumed;
  }
  out.commit();
}

void check_not_directory(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail("{}: is a directory; pass a file", path);
}

void copy_file_atomic(const std::string& from, const std::string& to) {
  write_file_atomic(to, read_file(from));
}

std::string read_file(const std::string& path) {
  check_not_directory(path);  // an ifstream opens a directory and reads nothing
  std::ifstream in(path, std::ios::binary);
  if (!in)
    fail("{}: cannot open ({}); {}", path, std::strerror(errno), io_fix(errno, "check the path"));
  std::ostringstream ss;
  ss << in.rdbuf();
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (in.bad() || (!ec && ss.tellp() >= 0 && static_cast<uintmax_t>(ss.tellp()) < size))
    fail("{}: read failed partway ({}); check the file and its disk", path, std::strerror(errno));
  return ss.str();
}

void check_output_file(const std::string& path, const char* option, const char* name) {
  namespace fs = std::filesystem;
  const fs::path parent = fs::path(path).parent_path();
  std::error_code ec;
  if (!parent.empty() && !fs::is_directory(parent, ec))
    fail("{}: {}: no directory {}; create it or choose another path", option, path,
         parent.string());
  if (fs::is_directory(path, ec))
    fail("{}: {} is a directory; name the file to write (e.g. {}/{})", option, path, path, name);
}

void check_stdout(bool flush) {
  const int before = errno;  // the failed write's, when the last one failed
  bool bad = std::ferror(stdout);
  errno = 0;
  if ((flush || bad) && std::fflush(stdout) != 0) bad = true;  // (a retry may say why)
  const int err = errno ? errno : before;
  if (bad)
    fail("standard output: write failed ({}); the output is incomplete: {}",
         err ? std::strerror(err) : "an earlier write",
         err == EPIPE   ? "the program reading it ended first"
         : err == EBADF ? "standard output is closed; redirect it to a file"
                        : "free space, or write it elsewhere");
}

}  // namespace lmforge
