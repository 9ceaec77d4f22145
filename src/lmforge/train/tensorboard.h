// TensorBoard event files, written natively (no TensorFlow, no protobuf library).
//
// A file is a sequence of TFRecords, each framed as
//   u64 length | u32 masked_crc32c(length bytes) | data | u32 masked_crc32c(data)
// (little-endian; masked = ((crc >> 15) | (crc << 17)) + 0xa282ead8), where data is a serialized
// tensorflow.Event protobuf, encoded here by hand (tensorboard/compat/proto/event.proto):
//   Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//   Summary { repeated Value value = 1; }
//   Value   { string tag = 1; float simple_value = 2; }
// The first record is Event{wall_time, file_version: "brain.Event:2"}; each scalar is its own
// Event. TensorBoard finds files whose name contains "tfevents".
//
//   TensorBoardWriter tb(run_dir);   // <run_dir>/tb/events.out.tfevents.<time>.<host>.<pid>...
//   tb.scalar("loss", step, 3.21, now);
//   tb.flush();                      // after each step's scalars: a kill loses little
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace lmforge {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord uses it.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);
inline uint32_t crc32c(std::string_view s) { return crc32c(s.data(), s.size()); }
uint32_t masked_crc32c(const void* data, size_t n);

// One TFRecord: the framing around `data`.
std::string tfrecord(std::string_view data);

class TensorBoardWriter {
 public:
  // Creates <run_dir>/tb/ and a new events file in it (appends when the name already exists).
  explicit TensorBoardWriter(const std::string& run_dir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // value is stored as float32 (TensorBoard's simple_value): NaN and ±inf are kept, a finite
  // value beyond float's range becomes ±inf.
  void scalar(const std::string& tag, int64_t step, double value, double wall_time);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_event(const std::string& event);
  std::string path_;
  std::FILE* f_ = nullptr;
};

// The events directory of a run: <run_dir>/tb.
std::string tensorboard_dir(const std::string& run_dir);

// For resume: rewrites each events file in <run_dir>/tb atomically without the events whose step
// is > step (and without a torn last record), so the run reads as one clean history, as
// metrics.jsonl does after MetricsWriter::truncate_after.
void tensorboard_truncate_after(const std::string& run_dir, int64_t step);

// For a fresh run in a directory used before: removes the events files in <run_dir>/tb.
void tensorboard_remove(const std::string& run_dir);

}  // namespace lmforge
