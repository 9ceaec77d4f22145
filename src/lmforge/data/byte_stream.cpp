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
    if (!f_) fail("{}: cannot open ({}); check the path", path, std::strerror(errno));
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

class GzipStream : public ByteStream {
 public:
  explicit GzipStream(const std::string& path) : path_(path) {
    gz_ = gzopen(path.c_str(), "rb");
    if (!gz_) fail("{}: cannot open ({}); check the path", path, std::strerror(errno));
    gzbuffer(gz_, 1 << 20);
  }
  ~GzipStream() override {
    if (gz_) gzclose(gz_);
  }
  size_t read(char* buf, size_t n) override {
    int got = gzread(gz_, buf, static_cast<unsigned>(n));
    if (!checked_ && got > 0) {  // zlib passes non-gzip bytes through ("transparent" reading)
      checked_ = true;
      if (gzdirect(gz_))
        fail("{}: not gzip data (no gzip header); re-compress it or drop the .gz suffix", path_);
    }
    if (got < 0) {
      int err = 0;
      const char* msg = gzerror(gz_, &err);
      fail("{}: corrupt gzip data ({}); the file is truncated or damaged", path_, msg);
    }
    if (static_cast<size_t>(got) < n) {  // end of input: complete, or cut inside a gzip member
      int err = Z_OK;
      gzerror(gz_, &err);
      if (err == Z_BUF_ERROR)
        fail("{}: gzip stream ends early; the file is truncated (re-create or re-download it)",
             path_);
    }
    return static_cast<size_t>(got);
  }
  uint64_t consumed() const override { return static_cast<uint64_t>(gzoffset(gz_)); }

 private:
  std::string path_;
  gzFile gz_ = nullptr;
  bool checked_ = false;
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
