// metrics.jsonl: one JSON object per line, flushed as written, so a crash loses at most the
// line in flight. On resume the file is cut back to the checkpoint's step (truncate_after), so
// it reads as one clean history.
//
// With TensorBoard enabled, every numeric field of a record other than "step" is also logged as
// a scalar (tag = the key) at the record's step, in <run_dir>/tb (train/tensorboard.h).
//
//   MetricsWriter m(run_dir + "/metrics.jsonl", /*tensorboard_run_dir=*/run_dir);
//   m.write({{"step", 10}, {"loss", 3.2}, {"lr", 1e-3}});
#pragma once

#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace lmforge {

class TensorBoardWriter;

// The record with its non-finite numbers as null (JSON has no NaN/Inf).
nlohmann::json with_nulls(nlohmann::json record);

class MetricsWriter {
 public:
  explicit MetricsWriter(const std::string& path);
  // Also writes TensorBoard events under <tensorboard_run_dir>/tb ("" = none).
  MetricsWriter(const std::string& path, const std::string& tensorboard_run_dir);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  // Starts TensorBoard logging for the records written from now on.
  void enable_tensorboard(const std::string& run_dir);
  // One line of JSON (which has no NaN/Inf: a non-finite number is written as null); TensorBoard
  // gets the numbers as they are, NaN and infinities included.
  void write(const nlohmann::json& record);

  // Drops records with "step" > step (rewrites the file atomically), and likewise the events
  // in the TensorBoard directory beside it (<dir of path>/tb), when there is one.
  static void truncate_after(const std::string& path, int64_t step);
  // For a fresh run: removes the file and the TensorBoard events beside it.
  static void remove(const std::string& path);

 private:
  std::FILE* f_ = nullptr;
  std::string path_;
  std::unique_ptr<TensorBoardWriter> tb_;
};

}  // namespace lmforge
