// MappedFile: a whole file mapped read-only; shards and safetensors keep one alive (through a
// shared_ptr) as long as their views into it.
//
//   auto f = MappedFile::open(path, "check data.train");   // Error: "<path>: cannot open (...);
//   <hint>" const char* p = f->data(); size_t n = f->size();
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace lmforge {

class MappedFile {
 public:
  // `hint` ends the error line for a missing or unreadable file (the fix to suggest).
  static std::shared_ptr<MappedFile> open(const std::string& path, const std::string& hint);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const char* data() const { return static_cast<const char*>(addr_); }
  size_t size() const { return size_; }
  void* raw() const { return addr_; }
  // Drops the whole pages inside [p, p + n) from this process's resident memory (the kernel's
  // page cache keeps them; a later read maps them again): after a loader has copied them out,
  // so that a checkpoint's bytes do not count twice in the peak RSS.
  void release(const void* p, size_t n) const;

 private:
  MappedFile() = default;
  void* addr_ = nullptr;
  size_t size_ = 0;
};

}  // namespace lmforge
