#include "lmforge/io/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "lmforge/core/error.h"

namespace lmforge {

std::shared_ptr<MappedFile> MappedFile::open(const std::string& path, const std::string& hint) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0)
    fail("{}: cannot open ({}); {}", path, std::strerror(errno), io_fix(errno, hint.c_str()));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: not a regular file; {}", path, hint);
  }
  std::shared_ptr<MappedFile> f(new MappedFile());
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ > 0) {
    void* p = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      fail("{}: cannot map ({}); {}", path, std::strerror(err), io_fix(err, "check the file"));
    }
    f->addr_ = p;
  }
  ::close(fd);
  return f;
}

void MappedFile::release(const void* p, size_t n) const {
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto lo = reinterpret_cast<uintptr_t>(p), hi = lo + n;
  const uintptr_t first = (lo + page - 1) / page * page, last = hi / page * page;
  const auto begin = reinterpret_cast<uintptr_t>(addr_);
  LMF_CHECK(lo >= begin && hi <= begin + size_, "MappedFile::release outside the mapping");
  // Read-only private file pages: dropping them loses nothing (advice only; failure is harmless).
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

MappedFile::~MappedFile() {
  if (addr_) munmap(addr_, size_);
}

}  // namespace lmforge
