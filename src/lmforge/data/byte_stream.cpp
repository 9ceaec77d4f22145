#include "lmforge/data/byte_stream.h"

#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "lmforge/core/error.h"

namespace lmforge {

namespace {

class FileStream : public ByteStream {
 public:
  explicit FileStream(const std::string& path) : path_(path) {
    f_ = std::fopen(path.c_str(), "rb");
    if (!f_)
      fail("{}: cannot open ({}); {}", path, std::strerror(errno), io_fix(errno, "check the path"));
  }
  ~FileStream() override {
    if (f_) std::fclose(f_);
  }
  size_t read(char* buf, size_t n) override {
    size_t got = std::fread(buf, 1, n, f_);
    if (got < n && std::ferror(f_)) fail("{}: read error ({})", path_, std::strerror(errno));
    consumed_ += got;
    return got;
  }
  uint64_t consumed() const override { return consumed_; }

 protected:
  std::string path_;
  std::FILE* f_ = nullptr;
  uint64_t consumed_ = 0;
};

// gzip through inflate (not gzread): members follow each other, zero padding after the last is
// allowed (as Python's gzip module reads it), and any other byte after a member is an error --
// gzread ignores "trailing garbage", which silently dropped a member whose header was damaged.
class GzipStream : public FileStream {
 public:
  explicit GzipStream(const std::string& path) : FileStream(path), in_(1 << 20) {
    if (inflateInit2(&zs_, 15 + 16) != Z_OK) fail("{}: cannot start zlib's inflate", path);
  }
  ~GzipStream() override { inflateEnd(&zs_); }
  size_t read(char* buf, size_t n) override {
    if (n == 0) return 0;
    zs_.next_out = reinterpret_cast<Bytef*>(buf);
    zs_.avail_out = static_cast<uInt>(std::min<size_t>(n, 1u << 30));
    while (zs_.next_out == reinterpret_cast<Bytef*>(buf)) {
      if (zs_.avail_in == 0 && !refill()) {
        if (in_member_)
          fail("{}: gzip stream ends early; the file is truncated (re-create or re-download it)",
               path_);
        return 0;
      }
      if (!in_member_) {  // at a member's start: the first, or after zero padding the next
        while (members_ > 0 && zs_.avail_in > 0 && *zs_.next_in == 0) {
          ++zs_.next_in;
          --zs_.avail_in;
        }
        if (zs_.avail_in == 0) continue;
        if (*zs_.next_in != 0x1f) {
          if (members_ == 0)
            fail("{}: not gzip data (no gzip header); re-compress it or drop the .gz suffix",
                 path_);
          fail(
              "{}: the bytes from byte {} on are not gzip data (appended to it, or a damaged "
              "member); re-create the file",
              path_, consumed());
        }
        in_member_ = true;
      }
      int r = inflate(&zs_, Z_NO_FLUSH);
      if (r == Z_STREAM_END) {
        in_member_ = false;
        ++members_;
        inflateReset(&zs_);
      } else if (r != Z_OK && r != Z_BUF_ERROR) {
        fail("{}: corrupt gzip data ({}); the file is truncated or damaged", path_,
             zs_.msg ? zs_.msg : zError(r));
      }
    }
    return static_cast<size_t>(reinterpret_cast<char*>(zs_.next_out) - buf);
  }
  uint64_t consumed() const override { return FileStream::consumed_ - zs_.avail_in; }

 private:
  bool refill() {
    size_t got = FileStream::read(in_.data(), in_.size());
    zs_.next_in = reinterpret_cast<Bytef*>(in_.data());
    zs_.avail_in = static_cast<uInt>(got);
    return got > 0;
  }
  z_stream zs_{};
  std::vector<char> in_;
  bool in_member_ = false;
  uint64_t members_ = 0;
};

class ZstdStream : public FileStream {
 public:
  explicit ZstdStream(const std::string& path) : FileStream(path), in_(ZSTD_DStreamInSize()) {
    ds_ = ZSTD_createDStream();
    ZSTD_initDStream(ds_);
  }
  ~ZstdStream() override { ZSTD_freeDStream(ds_); }
  size_t read(char* buf, size_t n) override {
    ZSTD_outBuffer out{buf, n, 0};
    while (out.pos == 0) {
      if (in_pos_ == in_len_) {
        in_len_ = FileStream::read(in_.data(), in_.size());
        in_pos_ = 0;
        if (in_len_ == 0) {
          if (!frame_done_) fail("{}: zstd stream ends mid-frame; the file is truncated", path_);
          return 0;
        }
      }
      ZSTD_inBuffer in{in_.data(), in_len_, in_pos_};
      size_t r = ZSTD_decompressStream(ds_, &out, &in);
      if (ZSTD_isError(r))
        fail("{}: corrupt zstd data ({}); the file is damaged", path_, ZSTD_getErrorName(r));
      frame_done_ = r == 0;
      in_pos_ = in.pos;
    }
    return out.pos;
  }

 private:
  ZSTD_DStream* ds_ = nullptr;
  std::vector<char> in_;
  size_t in_pos_ = 0, in_len_ = 0;
  bool frame_done_ = true;
};

bool ends_with(const std::string& s, const char* suffix) {  // in any case (.GZ too)
  size_t n = std::strlen(suffix);
  if (s.size() < n) return false;
  for (size_t i = 0; i < n; ++i)
    if (std::tolower(static_cast<unsigned char>(s[s.size() - n + i])) != suffix[i]) return false;
  return true;
}

}  // namespace

std::unique_ptr<ByteStream> ByteStream::open(const std::string& path) {
  if (ends_with(path, ".zst")) return std::make_unique<ZstdStream>(path);
  if (ends_with(path, ".gz")) return std::make_unique<GzipStream>(path);
  return std::make_unique<FileStream>(path);
}

bool LineReader::fill() {
  if (eof_) return false;
  if (pos_ > 0) {
    buf_.erase(0, pos_);
    pos_ = 0;
  }
  // Reads of 64 KiB growing to 1 MiB: a resize zero-fills what it adds, and a directory of many
  // small files paid 1 MiB of it each (a third of prepare's time over 20,000 one-line files).
  size_t old = buf_.size();
  buf_.resize(old + chunk_);
  size_t got = in_.read(buf_.data() + old, chunk_);
  buf_.resize(old + got);
  chunk_ = std::min<size_t>(chunk_ * 2, 1 << 20);
  if (got == 0) eof_ = true;
  return got > 0;
}

bool LineReader::next(std::string* line, Status* status) {
  bool too_long = false;
  for (;;) {
    size_t nl = buf_.find('\n', pos_);
    if (nl != std::string::npos) {
      if (too_long) {
        line->clear();
        *status = Status::kTooLong;
      } else {
        line->assign(buf_, pos_, nl - pos_);
        *status = Status::kOk;
      }
      pos_ = nl + 1;
      return true;
    }
    if (buf_.size() - pos_ > max_) {  // discard what we have of an enormous line
      too_long = true;
      buf_.clear();
      pos_ = 0;
    }
    if (!fill()) {
      if (buf_.size() == pos_ && !too_long) return false;
      if (too_long) {
        line->clear();
        *status = Status::kTooLong;
      } else {
        line->assign(buf_, pos_, std::string::npos);
        *status = Status::kNoNewline;
      }
      buf_.clear();
      pos_ = 0;
      return true;
    }
  }
}

}  // namespace lmforge
