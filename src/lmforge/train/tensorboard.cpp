#include "lmforge/train/tensorboard.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <istream>
#include <limits>
#include <optional>
#include <vector>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"

namespace lmforge {

namespace fs = std::filesystem;

namespace {

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kCrc32cTable = make_crc32c_table();

// Protobuf wire format (https://protobuf.dev/programming-guides/encoding/).
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7F) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}
void put_tag(std::string& out, int field, int wire_type) {
  put_varint(out, (static_cast<uint64_t>(field) << 3) | wire_type);
}
template <typename T>
void put_fixed(std::string& out, T v) {  // little-endian, as x86 and ARM store it
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.append(b, sizeof(T));
}
void put_bytes(std::string& out, int field, std::string_view s) {
  put_tag(out, field, 2);
  put_varint(out, s.size());
  out.append(s);
}

// Event{wall_time = 1, step = 2} before the payload field.
std::string event_header(double wall_time, int64_t step) {
  std::string e;
  put_tag(e, 1, 1);
  put_fixed(e, wall_time);
  if (step != 0) {  // proto3 default: omitted
    put_tag(e, 2, 0);
    put_varint(e, static_cast<uint64_t>(step));  // negative: 10 bytes, two's complement
  }
  return e;
}

double unix_now() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<double>(ts.tv_sec) + ts.tv_nsec * 1e-9;
}

bool get_varint(std::string_view s, size_t& i, uint64_t& v) {
  v = 0;
  for (int shift = 0; shift < 64 && i < s.size(); shift += 7) {
    auto b = static_cast<uint8_t>(s[i++]);
    v |= static_cast<uint64_t>(b & 0x7F) << shift;
    if (!(b & 0x80)) return true;
  }
  return false;
}

// The step field of a serialized Event (0 when absent), or nullopt when it does not parse.
std::optional<int64_t> event_step(std::string_view e) {
  int64_t step = 0;
  for (size_t i = 0; i < e.size();) {
    uint64_t key, v;
    if (!get_varint(e, i, key)) return std::nullopt;
    switch (key & 7) {
      case 0:
        if (!get_varint(e, i, v)) return std::nullopt;
        if ((key >> 3) == 2) step = static_cast<int64_t>(v);
        break;
      case 1:
        i += 8;
        break;
      case 2:
        if (!get_varint(e, i, v) || v > e.size() - i) return std::nullopt;
        i += v;
        break;
      case 5:
        i += 4;
        break;
      default:
        return std::nullopt;
    }
    if (i > e.size()) return std::nullopt;
  }
  return step;
}

std::vector<fs::path> events_files(const std::string& run_dir) {
  std::vector<fs::path> files;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(tensorboard_dir(run_dir), ec))
    if (entry.is_regular_file() &&
        entry.path().filename().string().find("tfevents") != std::string::npos)
      files.push_back(entry.path());
  return files;
}

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = kCrc32cTable[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

uint32_t masked_crc32c(const void* data, size_t n) {
  uint32_t crc = crc32c(data, n);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

std::string tfrecord(std::string_view data) {
  std::string r;
  r.reserve(data.size() + 16);
  uint64_t len = data.size();
  put_fixed(r, len);
  put_fixed(r, masked_crc32c(r.data(), 8));
  r.append(data);
  put_fixed(r, masked_crc32c(data.data(), data.size()));
  return r;
}

std::string tensorboard_dir(const std::string& run_dir) { return run_dir + "/tb"; }

TensorBoardWriter::TensorBoardWriter(const std::string& run_dir) {
  std::string dir = tensorboard_dir(run_dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("{}: cannot create the TensorBoard directory ({})", dir, ec.message());
  char host[256] = "localhost";
  gethostname(host, sizeof(host) - 1);
  host[sizeof(host) - 1] = 0;
  double now = unix_now();
  // The name TensorBoard's own writer uses (summary/writer/event_file_writer.py); the 10-digit
  // time keeps a run's files in creation order when sorted by name, which is how readers load
  // them.
  // A resume within the second of the run's start (the same time in the name) would sort by its
  // pid as text, maybe before the first file (pids wrap): the name takes a second past the
  // newest file's there.
  int64_t stamp = static_cast<int64_t>(now);
  constexpr std::string_view kPrefix = "events.out.tfevents.";
  for (const fs::path& f : events_files(run_dir)) {
    const std::string name = f.filename().string();  // events.out.tfevents.<10 digits>.<...>
    if (!name.starts_with(kPrefix) || name.size() < kPrefix.size() + 11 ||
        name[kPrefix.size() + 10] != '.')
      continue;
    const std::string digits = name.substr(kPrefix.size(), 10);
    if (std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
        digits < "9999999999")  // (10 digits stay 10)
      stamp = std::max<int64_t>(stamp, std::stoll(digits) + 1);
  }
  path_ = fmt::format("{}/events.out.tfevents.{:010d}.{}.{}.lmforge", dir, stamp, host,
                      static_cast<int64_t>(getpid()));
  f_ = std::fopen(path_.c_str(), "ab");
  if (!f_) fail("{}: cannot write TensorBoard events ({})", path_, std::strerror(errno));
  std::string e = event_header(now, 0);
  put_bytes(e, 3, "brain.Event:2");
  write_event(e);
  flush();
}

TensorBoardWriter::~TensorBoardWriter() {
  if (f_) std::fclose(f_);
}

void TensorBoardWriter::scalar(const std::string& tag, int64_t step, double value,
                               double wall_time) {
  std::string v;
  put_bytes(v, 1, tag);
  put_tag(v, 2, 5);
  // Beyond float's range (a finite double there has no float value to convert to): ±inf.
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float f = std::isfinite(value) && std::abs(value) > std::numeric_limits<float>::max()
                ? (value > 0 ? kInf : -kInf)
                : static_cast<float>(value);
  put_fixed(v, f);
  std::string summary;
  put_bytes(summary, 1, v);
  std::string e = event_header(wall_time, step);
  put_bytes(e, 5, summary);
  write_event(e);
}

void TensorBoardWriter::write_event(const std::string& event) {
  std::string r = tfrecord(event);
  if (std::fwrite(r.data(), 1, r.size(), f_) != r.size())
    fail("{}: cannot write TensorBoard events ({})", path_, std::strerror(errno));
}

void TensorBoardWriter::flush() {
  if (std::fflush(f_) != 0)
    fail(
        "{}: cannot write TensorBoard events ({}); free space there, then continue with --resume "
        "(run it again without, if the run had saved no checkpoint yet)",
        path_, std::strerror(errno));
}

void tensorboard_truncate_after(const std::string& run_dir, int64_t step) {
  for (const fs::path& file : events_files(run_dir))
    rewrite_records(file.string(),
                    [&](std::istream& in, uint64_t left, std::string& rec, uint64_t& consumed) {
                      // A torn or corrupt record ends the file (dropped with what follows).
                      char head[12];
                      if (left < 16 || !in.read(head, 12)) return RecordAction::kEnd;
                      uint64_t len = 0;
                      uint32_t len_crc, data_crc;
                      std::memcpy(&len, head, 8);
                      std::memcpy(&len_crc, head + 8, 4);
                      if (len_crc != masked_crc32c(head, 8) || len > left - 16)
                        return RecordAction::kEnd;
                      rec.assign(head, 12);
                      rec.resize(len + 16);
                      if (!in.read(rec.data() + 12, static_cast<std::streamsize>(len + 4)))
                        return RecordAction::kEnd;
                      const std::string_view event(rec.data() + 12, len);
                      std::memcpy(&data_crc, rec.data() + 12 + len, 4);
                      if (data_crc != masked_crc32c(event.data(), event.size()))
                        return RecordAction::kEnd;
                      consumed = len + 16;
                      std::optional<int64_t> st = event_step(event);
                      return st && *st > step ? RecordAction::kDrop : RecordAction::kKeep;
                    });
}

void tensorboard_remove(const std::string& run_dir) {
  for (const fs::path& file : events_files(run_dir)) {
    std::error_code ec;
    fs::remove(file, ec);
    if (ec) fail("{}: cannot remove ({})", file.string(), ec.message());
  }
}

}  // namespace lmforge
