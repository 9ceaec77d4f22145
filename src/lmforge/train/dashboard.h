// run.dir/dashboard.html: a live view of a run in one self-contained page (inline SVG charts, no
// scripts, no server): the latest values, and charts of the loss (training and validation), the
// learning rate, the gradient norm, the throughput and whatever evaluation metrics the run logs
// (MFU, HellaSwag, preference rewards). While the run goes on the page reloads itself every few
// seconds, so a browser on the file (or on any static server of the run directory) follows it;
// the last write, at the end of the run (finished, stopped early, interrupted or failed), drops
// the reload and says how it ended.
//
//   Dashboard d(run_dir + "/dashboard.html", "runs/demo", 1000);
//   d.add(record);          // each metrics record, in order (throttled rewrites)
//   d.write("finished");  // at the end ("" = live)
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace lmforge {

// A chart's points of one metric, thinned as they come: at most 2 × `most` points, every
// stride-th of those logged (the stride doubling as the run grows), and the last.
class ThinSeries {
 public:
  explicit ThinSeries(size_t most = 2000) : most_(most) {}
  void add(double x, double y);
  // The points, the last one logged included.
  std::pair<std::vector<double>, std::vector<double>> points() const;
  bool empty() const { return seen_ == 0; }

 private:
  size_t most_, stride_ = 1, seen_ = 0;
  std::vector<double> x_, y_;
  double last_x_ = 0, last_y_ = 0;
};

class Dashboard {
 public:
  Dashboard(std::string path, std::string title, int64_t total_steps);
  // A record (metrics.jsonl's objects in order); the page is rewritten (atomically) at most every
  // 2 seconds. Each record costs its keys alone, and a page its charts' bounded points: a run of
  // a million logged steps, or a resume loading their history, is no slower to follow.
  void add(const nlohmann::json& record);
  void write(const std::string& ended);
  // The page as write() writes it; `ended`: how the run ended, "" while it goes on (the page then
  // reloads itself).
  std::string html(const std::string& ended) const;

 private:
  std::string path_, title_;
  int64_t total_steps_;
  int64_t step_ = 0;                                          // the last training step
  std::map<std::string, std::pair<double, int64_t>> latest_;  // value, its step
  std::map<std::string, ThinSeries> series_;                  // the charted keys'
  double last_write_ = -1e9;
};

}  // namespace lmforge
