#include "lmforge/io/dir_lock.h"

#include <fcntl.h>
#include <fmt/core.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "lmforge/core/error.h"
#include "lmforge/core/leftovers.h"

namespace lmforge {

void DirLock::take(const std::string& run_dir, const char* key) {
  if (fd_ >= 0) return;
  const std::string path = run_dir + "/.lock";
  // Created here, or another process's (which the loser of a race to create it must not remove).
  // A lock on a file its holder has since removed (a failed command removes a lock file it made)
  // locks nothing: taken again on the file now there.
  bool created = false;
  for (int attempt = 0; attempt < 100; ++attempt) {
    created = true;
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd_ < 0 && errno == EEXIST) {
      created = false;
      fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
      if (fd_ < 0 && errno == ENOENT) continue;  // (removed meanwhile)
    }
    if (fd_ < 0) fail("{}: cannot open {} ({})", key, path, std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      if (errno == EWOULDBLOCK)
        fail(
            "{}: {} is in use by another lmforge train, convert or prepare (it holds {}); wait "
            "for it to end or stop it, or choose another directory",
            key, run_dir, path);
      fmt::print(stderr,
                 "lmforge: warning: {}: no lock on this filesystem ({}); make sure no other "
                 "lmforge writes into {} meanwhile\n",
                 path, std::strerror(errno), run_dir);
      break;
    }
    struct stat held {
    }, now{};
    if (::fstat(fd_, &held) == 0 && ::stat(path.c_str(), &now) == 0 && held.st_dev == now.st_dev &&
        held.st_ino == now.st_ino)
      break;
    ::close(fd_);
    fd_ = -1;
  }
  if (fd_ < 0)
    fail("{}: {} keeps being removed and made again; is another program at work there?", key, path);
  if (created) {
    created_ = path;
    note_temp(path);
  }
}

void DirLock::keep() {
  if (!created_.empty()) forget_temp(created_);
  created_.clear();
}

DirLock::~DirLock() {
  if (fd_ >= 0) ::close(fd_);
}

}  // namespace lmforge
