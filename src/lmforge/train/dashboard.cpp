#include "lmforge/train/dashboard.h"

#include <fmt/core.h>

#include <chrono>
#include <cmath>
#include <map>
#include <utility>

#include "lmforge/io/atomic_file.h"
#include "lmforge/io/plot.h"

namespace lmforge {

namespace {

// The charts: each of series that the run logs.
struct ChartSpec {
  const char* title;
  std::vector<std::pair<const char*, const char*>> keys;  // key, legend
  bool log_y;
};
const std::vector<ChartSpec>& chart_specs() {
  static const std::vector<ChartSpec> specs = {
      {"loss", {{"loss", "training"}, {"val_loss", "validation"}}, false},
      {"learning rate", {{"lr", "lr"}}, false},
      {"gradient norm", {{"grad_norm", "grad norm"}}, true},
      {"throughput (tokens/s)", {{"tokens_per_s", "tokens/s"}}, false},
      {"MFU", {{"mfu", "mfu"}}, false},
      {"HellaSwag", {{"hellaswag_acc", "acc"}, {"hellaswag_acc_norm", "acc_norm"}}, false},
      {"reward margin",
       {{"reward_margin", "training"}, {"val_reward_margin", "validation"}},
       false},
  };
  return specs;
}

}  // namespace

void ThinSeries::add(double x, double y) {
  if (seen_++ % stride_ == 0) {
    x_.push_back(x);
    y_.push_back(y);
  }
  last_x_ = x;
  last_y_ = y;
  if (x_.size() > 2 * most_) {  // every other one kept: the stride doubles
    size_t n = 0;
    for (size_t i = 0; i < x_.size(); i += 2, ++n) {
      x_[n] = x_[i];
      y_[n] = y_[i];
    }
    x_.resize(n);
    y_.resize(n);
    stride_ *= 2;
  }
}

std::pair<std::vector<double>, std::vector<double>> ThinSeries::points() const {
  auto out = std::make_pair(x_, y_);
  if (seen_ > 0 && (out.first.empty() || (seen_ - 1) % stride_ != 0)) {
    out.first.push_back(last_x_);
    out.second.push_back(last_y_);
  }
  return out;
}

Dashboard::Dashboard(std::string path, std::string title, int64_t total_steps)
    : path_(std::move(path)), title_(std::move(title)), total_steps_(total_steps) {
  for (const ChartSpec& sp : chart_specs())
    for (const auto& [key, legend] : sp.keys) series_.emplace(key, ThinSeries());
}

void Dashboard::add(const nlohmann::json& r) {
  const auto at = r.find("step");
  const bool stepped = at != r.end() && at->is_number();
  const int64_t s = stepped ? at->get<int64_t>() : 0;
  if (r.contains("loss")) step_ = std::max(step_, s);
  for (const auto& [k, v] : r.items()) {
    if (k == "step" || !v.is_number()) continue;
    latest_[k] = {v.get<double>(), s};
    if (auto it = series_.find(k); it != series_.end() && stepped)
      it->second.add(at->get<double>(), v.get<double>());
  }
  const auto now = [] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  };
  if (now() - last_write_ < 2.0) return;
  write("");
  last_write_ = now();  // (after the write: a slow one never makes every record write again)
}

void Dashboard::write(const std::string& ended) { write_file_atomic(path_, html(ended)); }

std::string Dashboard::html(const std::string& ended) const {
  const bool live = ended.empty();
  std::string h = fmt::format(
      "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">{}<title>{} - lmforge</title>\n"
      "<style>body{{font-family:sans-serif;margin:16px}}table{{border-collapse:collapse}}"
      "td,th{{padding:2px 10px;text-align:right;border-bottom:1px solid #ddd}}"
      "th{{text-align:left}}.charts svg{{margin:4px}}</style></head><body>\n"
      "<h2>{}</h2>\n<p>step {} of {}{}</p>\n",
      live ? "<meta http-equiv=\"refresh\" content=\"5\">" : "", xml_escape(title_),
      xml_escape(title_), step_, total_steps_,
      live ? " &middot; live (reloads every 5 s)" : " &middot; " + xml_escape(ended));
  h += "<table>\n<tr><th>metric</th><th>latest</th><th>at step</th></tr>\n";
  for (const auto& [k, v] : latest_)
    h += fmt::format("<tr><th>{}</th><td>{:.6g}</td><td>{}</td></tr>\n", xml_escape(k), v.first,
                     v.second);
  h += "</table>\n<div class=\"charts\">\n";
  for (const ChartSpec& sp : chart_specs()) {
    Chart c;
    c.title = sp.title;
    c.xlabel = "step";
    c.log_y = sp.log_y;
    c.width = 560;
    c.height = 320;
    for (const auto& [key, legend] : sp.keys) {
      const ThinSeries& t = series_.at(key);
      if (t.empty()) continue;
      auto [x, y] = t.points();
      c.series.push_back(Series{legend, std::move(x), std::move(y)});
    }
    if (!c.series.empty()) h += chart_svg(c);
  }
  h += "</div>\n</body></html>\n";
  return h;
}

}  // namespace lmforge
