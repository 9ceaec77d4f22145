// `lmforge plot` and `lmforge schedule` through the real binary: charts of runs' metrics.jsonl
// and of a config's learning-rate schedule; bad input is one line naming the file or key.
#include <gtest/gtest.h>

#include <fstream>
#include <regex>

#include "testing/errors.h"
#include "testing/process.h"

namespace lmforge {
namespace {

using testing::run_lmforge;

std::vector<size_t> polyline_points(const std::string& svg) {
  std::vector<size_t> counts;
  std::regex poly(R"(<polyline [^>]*points="([^"]*)\")"), pt(R"(-?[0-9.]+,-?[0-9.]+)");
  for (std::sregex_iterator it(svg.begin(), svg.end(), poly), end; it != end; ++it) {
    std::string pts = (*it)[1];
    counts.push_back(
        std::distance(std::sregex_iterator(pts.begin(), pts.end(), pt), std::sregex_iterator()));
  }
  return counts;
}

void write_run(const std::string& dir, int steps) {
  std::filesystem::create_directories(dir);
  std::ofstream f(dir + "/metrics.jsonl");
  for (int s = 1; s <= steps; ++s) {
    f << "{\"step\":" << s << ",\"loss\":" << 5.0 / s << ",\"lr\":0.001}\n";
    if (s % 10 == 0) f << "{\"step\":" << s << ",\"val_loss\":" << 6.0 / s << "}\n";
  }
  f << "{\"step\":" << steps + 1 << ",\"loss\":null}\n";  // NaN, as nlohmann::json writes it
  f << "{\"step\":" << steps + 2 << ",\"lo";              // torn by a crash
}

using testing::expect_one_line_error;

TEST(PlotCli, PlotsLossOfSeveralRuns) {
  std::string dir = testing::temp_dir("plot-cli");
  write_run(dir + "/runs/a", 30);
  write_run(dir + "/runs/b", 50);
  auto r = run_lmforge("plot runs/a runs/b/ --out loss.svg --val", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string svg = testing::slurp(dir + "/loss.svg");
  // a: 30 losses (the NaN is left out), 3 val; b: 50 and 5.
  EXPECT_EQ(polyline_points(svg), (std::vector<size_t>{30, 3, 50, 5}));
  EXPECT_NE(svg.find(">runs/a</text>"), std::string::npos);
  EXPECT_NE(svg.find(">runs/b val_loss</text>"), std::string::npos);
  r = run_lmforge("plot runs/a --metric lr --out lr.png", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(testing::slurp(dir + "/lr.png").starts_with("\x89PNG"));
}

TEST(PlotCli, PlotErrorsNameTheFile) {
  std::string dir = testing::temp_dir("plot-cli-err");
  write_run(dir + "/runs/a", 5);
  expect_one_line_error(run_lmforge("plot runs/missing --out x.svg", dir),
                        {"runs/missing/metrics.jsonl", "cannot open"});
  expect_one_line_error(run_lmforge("plot runs/a --metric mfu --out x.svg", dir),
                        {"runs/a/metrics.jsonl", "\"mfu\""});
  expect_one_line_error(run_lmforge("plot runs/a --out x.gif", dir), {"x.gif", ".svg or .png"});
  expect_one_line_error(run_lmforge("plot runs/a --out nodir/x.svg", dir),
                        {"--out", "nodir/x.svg", "no directory nodir"});
  // A directory where the image goes: said as such (was "cannot rename into place"), and checked
  // before the work, as for lr-find's sweep and schedule; the extension in any case.
  std::filesystem::create_directories(dir + "/d.svg");
  expect_one_line_error(run_lmforge("plot runs/a --out d.svg", dir),
                        {"--out", "d.svg is a directory", "d.svg/chart.svg"});
  expect_one_line_error(run_lmforge("schedule --out d.svg", dir), {"d.svg is a directory"});
  expect_one_line_error(run_lmforge("lr-find --out nodir/lr.svg", dir), {"no directory nodir"});
  ASSERT_EQ(run_lmforge("plot runs/a --out UP.SVG", dir).exit_code, 0);
  EXPECT_TRUE(testing::slurp(dir + "/UP.SVG").starts_with("<svg"));
  // A metric logged only as null (a diverged run's non-finite values): nothing to draw.
  std::ofstream(dir + "/runs/a/metrics.jsonl", std::ios::app)
      << "\n{\"step\": 6, \"z\": null}\n{\"step\": 7, \"z\": null}\n";
  expect_one_line_error(run_lmforge("plot runs/a --metric z --out x.svg", dir),
                        {"\"z\"", "all 2 values are null"});
  EXPECT_FALSE(std::filesystem::exists(dir + "/x.svg"));
}

TEST(PlotCli, ScheduleDrawsEveryStepOfTheConfig) {
  std::string dir = testing::temp_dir("schedule-cli");
  auto r = run_lmforge(
      "schedule --set train.steps=300 --set train.warmup=30 --set train.schedule=linear "
      "--out s.svg",
      dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string svg = testing::slurp(dir + "/s.svg");
  EXPECT_EQ(polyline_points(svg), (std::vector<size_t>{300}));
  EXPECT_NE(svg.find("linear schedule"), std::string::npos);
  // Steps numbered 1..300, as metrics.jsonl numbers them (its lr at step 30 is the peak).
  EXPECT_NE(svg.find("text-anchor=\"middle\">300</text>"), std::string::npos);
  EXPECT_EQ(svg.find("text-anchor=\"middle\">0</text>"), std::string::npos);
  std::ofstream(dir + "/c.yaml") << "train:\n  steps: 100000\n  schedule: cosine\n";
  r = run_lmforge("schedule c.yaml --out s.png", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(testing::slurp(dir + "/s.png").starts_with("\x89PNG"));
  expect_one_line_error(run_lmforge("schedule --set train.schedule=steep --out s.svg", dir),
                        {"train.schedule", "steep"});
  expect_one_line_error(run_lmforge("schedule c.yaml --set train.lr=fast --out s.svg", dir),
                        {"train.lr", "fast"});
  expect_one_line_error(run_lmforge("schedule missing.yaml --out s.svg", dir), {"missing.yaml"});
}

}  // namespace
}  // namespace lmforge
