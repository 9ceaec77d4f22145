// lmforge lr-find [CONFIG] [--set K=V]... [--start 1e-7 --end 10 --steps 100] [--out FILE]
#include "lmforge/train/lr_find.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/plot.h"
#include "lmforge/train/trainer.h"

namespace lmforge::app {

void add_lr_find(CLI::App& app) {
  struct Opts {
    std::string config, out = "lr_find.svg";
    std::vector<std::string> sets;
    LrFindOptions lf;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "lr-find",
      "Learning-rate range test: sweep the LR exponentially from the initial weights, plot loss "
      "vs LR and suggest one");
  cmd->add_option("config", o->config, "YAML config (default: the embedded default)");
  cmd->add_option("--set", o->sets, "Override a config key")->type_name("KEY=VALUE");
  cmd->add_option("--start", o->lf.start, "First LR")->capture_default_str();
  cmd->add_option("--end", o->lf.end, "Last LR")->capture_default_str();
  cmd->add_option("--steps", o->lf.steps, "Steps in the sweep")->capture_default_str();
  cmd->add_option("--out", o->out, "Plot (.svg or .png); the points go beside it as .json")
      ->capture_default_str();
  cmd->callback([o] {
    set_oom_hint(kTrainingOomHint);
    Config cfg = load_run_config(o->config, o->sets);
    check_chart_path(o->out, "--out");  // before the sweep
    LrFindResult r = lr_find(cfg, o->lf);
    Chart c;
    c.title = "lr-find: suggested " + fmt::format("{:.2e}", r.suggested);
    c.xlabel = "learning rate";
    c.ylabel = "loss";
    c.log_x = true;
    // The losses past divergence (up to 4x the smoothed minimum, where the sweep stops) would
    // squash the useful range: the plot leaves out points above 1.25x the first ones' highest
    // (the .json keeps them all), and marks the suggestion with a vertical line.
    double first = 0, low = INFINITY;
    for (size_t i = 0; i < r.smoothed.size(); ++i) {
      if (i < 5 && std::isfinite(r.smoothed[i])) first = std::max(first, r.smoothed[i]);
      if (std::isfinite(r.losses[i])) low = std::min(low, r.losses[i]);
    }
    const double cap = first > 0 ? 1.25 * first : INFINITY;
    auto capped = [&](std::vector<double> v) {
      for (double& y : v)
        if (!(y <= cap)) y = NAN;
      return v;
    };
    c.series = {{"loss", r.lrs, capped(r.losses)}, {"smoothed", r.lrs, capped(r.smoothed)}};
    if (std::isfinite(low) && std::isfinite(cap))
      c.series.push_back({"suggested", {r.suggested, r.suggested}, {low, cap}});
    write_chart(c, o->out);
    nlohmann::json j = {{"lr", r.lrs},
                        {"loss", r.losses},
                        {"smoothed", r.smoothed},
                        {"suggested", r.suggested},
                        {"min_over_10", r.min_over_10}};
    for (auto& v : j["loss"])
      if (!std::isfinite(v.get<double>())) v = nullptr;
    for (auto& v : j["smoothed"])
      if (!std::isfinite(v.get<double>())) v = nullptr;
    std::string json_path = o->out.substr(0, o->out.size() - 4) + ".json";
    write_file_atomic(json_path, j.dump() + "\n");
    fmt::print(
        "suggested lr {:.2e}: where the smoothed loss falls fastest per log-LR before its minimum "
        "(the minimum's LR / 10 = {:.2e}); plot {}, points {}\n",
        r.suggested, r.min_over_10, o->out, json_path);
    // The minimum at the sweep's end: the loss never turned up, so the range was too narrow (or
    // too short) for the rule to find where it diverges.
    size_t at_min = 0;
    for (size_t i = 0; i < r.smoothed.size(); ++i)
      if (std::isfinite(r.smoothed[i]) && r.smoothed[i] < r.smoothed[at_min]) at_min = i;
    if (r.smoothed.size() > 1 && at_min + 1 == r.smoothed.size())
      fmt::print(stderr,
                 "lr-find: warning: the loss still fell at the sweep's last LR ({:.2e}); the "
                 "suggestion is uncertain: raise --end or --steps\n",
                 r.lrs.back());
    // The minimum at the first LR: the loss only rose, so the sweep started past where it falls.
    if (r.smoothed.size() > 1 && at_min == 0)
      fmt::print(stderr,
                 "lr-find: warning: the loss never fell below its first LR's ({:.2e}); the "
                 "suggestion is uncertain: lower --start\n",
                 r.lrs.front());
  });
}

}  // namespace lmforge::app
