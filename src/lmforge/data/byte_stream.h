// ByteStream: reads a file as bytes, decompressing .gz (zlib) and .zst (zstd) transparently,
// with a line reader on top that never buffers more than a cap (a single enormous line is
// skipped, not held in memory).
//
//   auto in = ByteStream::open("data.jsonl.zst");
//   LineReader lines(*in, /*max_line=*/16 << 20);
//   while (lines.next(&line, &status)) ...
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace lmforge {

class ByteStream {
 public:
  virtual ~ByteStream() = default;
  // Up to n bytes into buf; 0 at the end. Throws Error naming the file on a read error or
  // corrupt compressed data.
  virtual size_t read(char* buf, size_t n) = 0;
  // Bytes consumed from the underlying file so far (compressed bytes for .gz/.zst).
  virtual uint64_t consumed() const = 0;
  static std::unique_ptr<ByteStream> open(const std::string& path);
};

class LineReader {
 public:
  enum class Status { kOk, kTooLong, kNoNewline };  // kNoNewline: last line lacks '\n'
  LineReader(ByteStream& in, size_t max_line) : in_(in), max_(max_line) {}
  // The next line without its '\n'. Returns false at the end of the stream. A line longer than
  // max_line comes back empty with kTooLong (its bytes were discarded while reading).
  bool next(std::string* line, Status* status);

 private:
  bool fill();
  ByteStream& in_;
  size_t max_;
  std::string buf_;
  size_t pos_ = 0, chunk_ = 64 << 10;
  bool eof_ = false;
};

}  // namespace lmforge
