#include "lmforge/core/error.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>

namespace lmforge {

const char* io_fix(int err, const char* otherwise) {
  switch (err) {
    case ENOSPC:
    case EDQUOT:
      return "the disk is full: free space there";
    case EFBIG:
      return "the file grew past the file-size limit (ulimit -f)";
    case EROFS:
      return "the filesystem is read-only";
    case EMFILE:
    case ENFILE:
      return "too many files are open: raise the limit (ulimit -n)";
    case EACCES:
    case EPERM:
      return "check its permissions";
    case ENOMEM:
      return "out of memory or address space (ulimit -v): free memory or raise the limit";
    default:
      return otherwise;
  }
}

void check_failed(const char* file, int line, const char* cond, const std::string& msg) {
  std::fprintf(stderr, "lmforge: internal error at %s:%d: check failed: %s%s%s\n", file, line, cond,
               msg.empty() ? "" : ": ", msg.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace lmforge
