// One writer per run directory (train's rank 0, convert) or prepare output: a second one, a
// --resume started while the first still runs, would move the first's checkpoints aside and write
// over its metrics (two prepares: one's summary lost). An advisory lock on DIR/.lock, which the
// kernel drops when the process ends (kill -9 too).
#pragma once

#include <string>

namespace lmforge {

class DirLock {
 public:
  DirLock() = default;
  DirLock(const DirLock&) = delete;
  DirLock& operator=(const DirLock&) = delete;
  ~DirLock();
  // Takes it (once); an Error naming the directory (after `key`, the option or config key that
  // gave it) when another process holds it. A filesystem without locks (NFS without lockd,
  // Lustre without -o flock) is said and not fatal.
  // A lock file this call created is noted as a leftover (core/leftovers.h: removed if the
  // command fails) until keep().
  void take(const std::string& run_dir, const char* key = "run.dir");
  // What it locks is whole: its lock file stays.
  void keep();

 private:
  int fd_ = -1;
  std::string created_;  // the lock file, when take() created it
};

}  // namespace lmforge
