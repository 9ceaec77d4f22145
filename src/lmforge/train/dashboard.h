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
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace lmforge {

// The page for `records` (metrics.jsonl's objects in order); total_steps for the progress line;
// `ended`: how the run ended, "" while it goes on (the page then reloads itself).
std::string dashboard_html(const std::vector<nlohmann::json>& records, const std::string& title,
                           int64_t total_steps, const std::string& ended);

class Dashboard {
 public:
  Dashboard(std::string path, std::string title, int64_t total_steps);
  // A record; the page is rewritten (atomically) at most every 2 seconds.
  void add(const nlohmann::json& record);
  void write(const std::string& ended);

 private:
  std::string path_, title_;
  int64_t total_steps_;
  std::vector<nlohmann::json> records_;
  double last_write_ = -1e9;
};

}  // namespace lmforge
