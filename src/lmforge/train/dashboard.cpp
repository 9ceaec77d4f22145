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

std::string escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<')
      o += "&lt;";
    else if (c == '>')
      o += "&gt;";
    else if (c == '&')
      o += "&amp;";
    else if (c == '"')
      o += "&quot;";
    else
      o += c;
  }
  return o;
}

// (step, value) of `key` over the records, at most `most` points (every k-th, and the last).
Series series(const std::vector<nlohmann::json>& records, const std::string& key,
              const std::string& name, size_t most = 2000) {
  Series s{name, {}, {}};
  for (const nlohmann::json& r : records)
    if (r.contains(key) && r[key].is_number() && r.contains("step")) {
      s.x.push_back(r["step"].get<double>());
      s.y.push_back(r[key].get<double>());
    }
  if (s.x.size() > most) {
    const size_t k = (s.x.size() + most - 1) / most;
    Series t{name, {}, {}};
    for (size_t i = 0; i < s.x.size(); i += k) t.x.push_back(s.x[i]), t.y.push_back(s.y[i]);
    if (t.x.back() != s.x.back()) t.x.push_back(s.x.back()), t.y.push_back(s.y.back());
    return t;
  }
  return s;
}

}  // namespace

std::string dashboard_html(const std::vector<nlohmann::json>& records, const std::string& title,
                           int64_t total_steps, const std::string& ended) {
  const bool live = ended.empty();
  // The latest value of every numeric key, and the step it came with.
  std::map<std::string, std::pair<double, int64_t>> latest;
  int64_t step = 0;
  for (const nlohmann::json& r : records) {
    const int64_t s = r.contains("step") && r["step"].is_number() ? r["step"].get<int64_t>() : 0;
    if (r.contains("loss")) step = std::max(step, s);
    for (const auto& [k, v] : r.items())
      if (k != "step" && v.is_number()) latest[k] = {v.get<double>(), s};
  }
  std::string h = fmt::format(
      "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">{}<title>{} - lmforge</title>\n"
      "<style>body{{font-family:sans-serif;margin:16px}}table{{border-collapse:collapse}}"
      "td,th{{padding:2px 10px;text-align:right;border-bottom:1px solid #ddd}}"
      "th{{text-align:left}}.charts svg{{margin:4px}}</style></head><body>\n"
      "<h2>{}</h2>\n<p>step {} of {}{}</p>\n",
      live ? "<meta http-equiv=\"refresh\" content=\"5\">" : "", escape(title), escape(title), step,
      total_steps, live ? " &middot; live (reloads every 5 s)" : " &middot; " + escape(ended));
  h += "<table>\n<tr><th>metric</th><th>latest</th><th>at step</th></tr>\n";
  for (const auto& [k, v] : latest)
    h += fmt::format("<tr><th>{}</th><td>{:.6g}</td><td>{}</td></tr>\n", escape(k), v.first,
                     v.second);
  h += "</table>\n<div class=\"charts\">\n";
  // Charts: each of series that the run logs.
  struct Spec {
    const char* title;
    std::vector<std::pair<const char*, const char*>> keys;  // key, legend
    bool log_y;
  };
  const Spec specs[] = {
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
  for (const Spec& sp : specs) {
    Chart c;
    c.title = sp.title;
    c.xlabel = "step";
    c.log_y = sp.log_y;
    c.width = 560;
    c.height = 320;
    for (const auto& [key, legend] : sp.keys) {
      Series s = series(records, key, legend);
      if (!s.x.empty()) c.series.push_back(std::move(s));
    }
    if (!c.series.empty()) h += chart_svg(c);
  }
  h += "</div>\n</body></html>\n";
  return h;
}

Dashboard::Dashboard(std::string path, std::string title, int64_t total_steps)
    : path_(std::move(path)), title_(std::move(title)), total_steps_(total_steps) {}

void Dashboard::add(const nlohmann::json& record) {
  records_.push_back(record);
  const double now =
      std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  if (now - last_write_ < 2.0) return;
  last_write_ = now;
  write("");
}

void Dashboard::write(const std::string& ended) {
  write_file_atomic(path_, dashboard_html(records_, title_, total_steps_, ended));
}

}  // namespace lmforge
