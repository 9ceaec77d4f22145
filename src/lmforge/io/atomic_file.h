// AtomicFile: write to "<path>.<pid>.<n>.tmp", fsync, rename onto <path> on commit() (and first
// remove such temporaries of <path> whose writer process is gone). If the writer is
// destroyed without commit() (an error, an exception), the temporary is removed: readers see
// either the old file or the complete new one, never half of it.
//
//   AtomicFile f(path); f.write(buf, n); f.commit();
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace lmforge {

class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);
  void write(const std::string& s) { write(s.data(), s.size()); }
  // Rewrites bytes already written (e.g. a header whose counts are known only at the end).
  void overwrite(uint64_t offset, const void* data, size_t n);
  void commit();

 private:
  std::string path_, tmp_;
  std::FILE* f_ = nullptr;
};

// Whole-file helpers.
void write_file_atomic(const std::string& path, const std::string& content);
std::string read_file(const std::string& path);  // throws Error naming the file
// Throws Error "PATH: is a directory; pass a file" (an ifstream opens one and reads nothing).
void check_not_directory(const std::string& path);

}  // namespace lmforge
