// One trainer per run directory (rank 0 holds it): a second one, a --resume started while the
// first still runs, would move the first's checkpoints aside and write over its metrics. An
// advisory lock on run_dir/.lock, which the kernel drops when the process ends (kill -9 too).
#pragma once

#include <string>

namespace lmforge {

class RunDirLock {
 public:
  RunDirLock() = default;
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;
  ~RunDirLock();
  // Takes it (once); an Error naming the directory when another train holds it. A filesystem
  // without locks (NFS without lockd, Lustre without -o flock) is said and not fatal.
  void take(const std::string& run_dir);

 private:
  int fd_ = -1;
};

}  // namespace lmforge
