// lmforge plot RUN_DIR... --out FILE.(svg|png) [--metric loss] [--val] [--log-y]
// lmforge schedule [CONFIG.yaml] [--set KEY=VALUE]... --out FILE.(svg|png)
#include "lmforge/io/plot.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands.h"
#include "lmforge/core/error.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/config.h"
#include "lmforge/train/trainer.h"

namespace lmforge::app {

namespace {

// The metrics file of a run: RUN_DIR/metrics.jsonl, or the .jsonl file itself.
std::string metrics_path(const std::string& run) {
  return run.ends_with(".jsonl") ? run : run + "/metrics.jsonl";
}

// (step, value) of every record with a numeric "step" and `key`; a torn line is skipped, as
// MetricsWriter::truncate_after does; a null value (NaN, written by nlohmann::json) is NaN.
Series read_series(const std::string& path, const std::string& key, const std::string& name) {
  Series s{name, {}, {}};
  std::istringstream in(read_file(path));
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains(key) || !j.contains("step") || !j["step"].is_number())
      continue;
    const auto& v = j[key];
    if (!v.is_number() && !v.is_null()) continue;
    s.x.push_back(j["step"].get<double>());
    s.y.push_back(v.is_null() ? NAN : v.get<double>());
  }
  return s;
}

std::string trim_slashes(std::string s) {
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

void add_plot_command(CLI::App& app) {
  struct Opts {
    std::vector<std::string> runs;
    std::string out, metric = "loss";
    bool val = false, log_y = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "plot", "Plot a metric against the step for one or several runs (from metrics.jsonl)");
  cmd->add_option("runs", o->runs, "Run directories (or metrics.jsonl files)")->required();
  cmd->add_option("--out", o->out, "Output image: .svg or .png")->required();
  cmd->add_option("--metric", o->metric, "Key of metrics.jsonl to plot")->capture_default_str();
  cmd->add_flag("--val", o->val, "Also plot val_<metric> (e.g. val_loss)");
  cmd->add_flag("--log-y", o->log_y, "Logarithmic y axis");
  cmd->callback([o] {
    check_chart_path(o->out, "--out");
    Chart c;
    c.title = o->metric;
    c.xlabel = "step";
    c.ylabel = o->metric;
    c.log_y = o->log_y;
    size_t points = 0;
    for (const std::string& r : o->runs) {
      std::string run = trim_slashes(r), path = metrics_path(run);
      std::vector<std::string> keys{o->metric};
      if (o->val) keys.push_back("val_" + o->metric);
      size_t found = 0;
      for (const std::string& key : keys) {
        Series s = read_series(path, key, key == o->metric ? run : run + " " + key);
        found += s.x.size();
        if (!s.x.empty()) c.series.push_back(std::move(s));
      }
      if (found == 0)
        fail("{}: no \"{}\" values{}; check --metric (e.g. loss, lr, grad_norm, tokens_per_s)",
             path, o->metric, o->val ? " nor \"val_" + o->metric + "\" values" : "");
      points += found;
    }
    if (std::none_of(c.series.begin(), c.series.end(), [](const Series& s) {
          return std::any_of(s.y.begin(), s.y.end(), [](double y) { return std::isfinite(y); });
        }))
      fail(
          "\"{}\": all {} values are null (non-finite: the run diverged where they were logged); "
          "nothing to plot",
          o->metric, points);
    if (o->log_y && std::none_of(c.series.begin(), c.series.end(), [](const Series& s) {
          return std::any_of(s.y.begin(), s.y.end(), [](double y) { return y > 0; });
        }))
      fail(
          "--log-y: none of the {} \"{}\" values is positive, which a logarithmic axis needs; "
          "plot them without --log-y",
          points, o->metric);
    write_chart(c, o->out);
    fmt::print("wrote {} ({} series, {} points)\n", o->out, c.series.size(), points);
  });
}

void add_schedule_command(CLI::App& app) {
  struct Opts {
    std::string config, out;
    std::vector<std::string> sets;
    bool log_y = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "schedule",
      "Plot the learning rate against the step for a training config, as `lmforge train` would "
      "run it");
  cmd->add_option("config", o->config, "YAML config (default: the embedded default)");
  cmd->add_option("--set", o->sets, "Override a config key, e.g. --set train.schedule=wsd")
      ->type_name("KEY=VALUE");
  cmd->add_option("--out", o->out, "Output image: .svg or .png")->required();
  cmd->add_flag("--log-y", o->log_y, "Logarithmic y axis");
  cmd->callback([o] {
    check_chart_path(o->out, "--out");
    Config cfg = load_run_config(o->config, o->sets);
    const TrainConfig& t = cfg.train;
    if (t.steps <= 0) fail("train.steps: must be positive, got {}", t.steps);
    Schedule sched = make_schedule(t);
    // Every step up to 20,000; beyond, an even sample of them (and the last): a kink is then
    // off by at most steps / 10,000, less than a pixel.
    const int64_t stride = t.steps <= 20000 ? 1 : t.steps / 10000 + 1;  // no overflow
    // Numbered as metrics.jsonl numbers them: step N (1..steps) trains with sched.at(N - 1).
    Series s{t.schedule, {}, {}};
    for (int64_t step = 0;; step += stride) {
      s.x.push_back(static_cast<double>(step + 1));
      s.y.push_back(sched.at(step));
      if (t.steps - 1 - step < stride) break;
    }
    if (s.x.back() != static_cast<double>(t.steps)) {
      s.x.push_back(static_cast<double>(t.steps));
      s.y.push_back(sched.at(t.steps - 1));
    }
    Chart c;
    c.title = fmt::format("{} schedule: lr {:g}, min_lr {:g}, warmup {}, {} steps", t.schedule,
                          t.lr, t.min_lr, t.warmup, t.steps);
    c.xlabel = "step";
    c.ylabel = "learning rate";
    c.log_y = o->log_y;
    c.series.push_back(std::move(s));
    write_chart(c, o->out);
    fmt::print("wrote {} ({} schedule, {} steps)\n", o->out, t.schedule, t.steps);
  });
}

}  // namespace

void add_plot(CLI::App& app) {
  add_plot_command(app);
  add_schedule_command(app);
}

}  // namespace lmforge::app
