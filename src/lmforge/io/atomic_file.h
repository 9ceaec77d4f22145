// AtomicFile: write to "<path>.<pid>.<n>.tmp", fsync, rename onto <path> on commit() (and first
// remove such temporaries of <path> whose writer process is gone). If the writer is
// destroyed without commit() (an error, an exception), the temporary is removed: readers see
// either the old file or the complete new one, never half of it.
//
//   AtomicFile f(path); f.write(buf, n); f.commit();
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <istream>
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

// Rewrites `path` without the records `next` drops, holding one record in memory (a history of
// a million lines is not read whole). next(in, left, rec, consumed) reads the record at `in`
// (`left` bytes remain in the file), setting `consumed` to the bytes it took and `rec` to the
// bytes to keep in their place, and returns kKeep, kDrop, or kEnd (no more records: a torn or
// corrupt tail it leaves is dropped). A kept record whose bytes differ in size from what it
// took counts as a change. The file is rewritten (atomically) only when something changes.
enum class RecordAction { kKeep, kDrop, kEnd };
using RecordReader = std::function<RecordAction(std::istream& in, uint64_t left, std::string& rec,
                                                uint64_t& consumed)>;
void rewrite_records(const std::string& path, const RecordReader& next);

// A new directory "<path>.<pid>.<n>.tmp", a name no other writer (process or call) uses, to fill
// and rename onto path (noted: core/leftovers.h); first removes path's temporaries whose writer
// process is gone (directories only where path names lmforge's own, "<...>.lmforge-<what>": an
// export's).
std::string fresh_temp_dir(const std::string& path);

// Whole-file helpers.
void write_file_atomic(const std::string& path, const std::string& content);
std::string read_file(const std::string& path);  // throws Error naming the file
// from's bytes written to `to` as write_file_atomic writes (a full disk: one Error naming `to`).
void copy_file_atomic(const std::string& from, const std::string& to);
// Throws Error "PATH: is a directory; pass a file" (an ifstream opens one and reads nothing).
void check_not_directory(const std::string& path);
// A file to write, checked before the work that makes it: its directory exists and it is not a
// directory itself; the Error names `option` (e.g. "--out") and suggests `name` inside a directory.
void check_output_file(const std::string& path, const char* option, const char* name);
// Standard output failed (a full disk, a closed pipe): throws Error, since output cut short must
// not end with exit 0. Per record in a loop that prints (the buffer's last automatic flush
// failed), and with flush = true after the last (main() does at every command's end).
void check_stdout(bool flush = false);

}  // namespace lmforge
