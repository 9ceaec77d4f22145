#include "lmforge/train/metrics.h"

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <istream>

#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/train/tensorboard.h"

namespace lmforge {

namespace {

// The run directory a metrics file lives in ("." for a bare file name).
std::string dir_of(const std::string& path) {
  std::string d = std::filesystem::path(path).parent_path().string();
  return d.empty() ? "." : d;
}

}  // namespace

MetricsWriter::MetricsWriter(const std::string& path) : path_(path) {
  f_ = std::fopen(path.c_str(), "a");
  if (!f_) fail("{}: cannot write metrics ({})", path, std::strerror(errno));
}

MetricsWriter::MetricsWriter(const std::string& path, const std::string& tensorboard_run_dir)
    : MetricsWriter(path) {
  if (!tensorboard_run_dir.empty()) enable_tensorboard(tensorboard_run_dir);
}

MetricsWriter::~MetricsWriter() {
  if (f_) std::fclose(f_);
}

void MetricsWriter::enable_tensorboard(const std::string& run_dir) {
  tb_ = std::make_unique<TensorBoardWriter>(run_dir);
}

nlohmann::json with_nulls(nlohmann::json record) {
  for (auto& [k, v] : record.items())
    if (v.is_number_float() && !std::isfinite(v.get<double>())) v = nullptr;
  return record;
}

void MetricsWriter::write(const nlohmann::json& record) {
  std::string line = with_nulls(record).dump() + "\n";
  // A full disk is said at the step it happens, not at the next checkpoint's save after a run of
  // lost records (the line a failed write tears is dropped by --resume: truncate_after).
  if (std::fwrite(line.data(), 1, line.size(), f_) != line.size() || std::fflush(f_) != 0)
    fail(
        "{}: cannot write metrics ({}); free space there, then continue with --resume (run it "
        "again without, if the run had saved no checkpoint yet)",
        path_, std::strerror(errno));
  if (!tb_ || !record.contains("step") || !record["step"].is_number_integer()) return;
  int64_t step = record["step"].get<int64_t>();
  double now =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  for (const auto& [key, value] : record.items())
    if (key != "step" && value.is_number()) tb_->scalar(key, step, value.get<double>(), now);
  tb_->flush();
}

void MetricsWriter::truncate_after(const std::string& path, int64_t step) {
  tensorboard_truncate_after(dir_of(path), step);
  if (!std::filesystem::exists(path)) return;
  // Rewritten (a new file) only when something is cut: `tail -f` of it follows a resume.
  rewrite_records(path, [&](std::istream& in, uint64_t, std::string& rec, uint64_t& consumed) {
    if (!std::getline(in, rec)) return RecordAction::kEnd;
    consumed = rec.size() + (in.eof() ? 0 : 1);
    rec += '\n';  // (a last line without one gains it)
    auto j = nlohmann::json::parse(rec, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return RecordAction::kDrop;  // a torn last line from a crash
    if (j.contains("step") && j["step"].is_number() && j["step"].get<int64_t>() > step)
      return RecordAction::kDrop;
    return RecordAction::kKeep;
  });
}

void MetricsWriter::remove(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove(path, ec);
  if (ec) fail("{}: cannot remove ({})", path, ec.message());
  tensorboard_remove(dir_of(path));
}

}  // namespace lmforge
