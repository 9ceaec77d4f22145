// metrics.jsonl: one JSON object per line, flushed as written, so a crash loses at most the
// line in flight. On resume the file is cut back to the checkpoint's step (truncate_after), so
// it reads as one clean history.
#pragma once

#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

namespace lmforge {

class MetricsWriter {
 public:
  explicit MetricsWriter(const std::string& path);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;
  void write(const nlohmann::json& record);
  // Drops records with "step" > step (rewrites the file atomically).
  static void truncate_after(const std::string& path, int64_t step);

 private:
  std::FILE* f_ = nullptr;
};

}  // namespace lmforge
