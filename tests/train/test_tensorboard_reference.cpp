// TensorBoard event files from lmforge, read back by the `tensorboard` package
// (tests/reference/tensorboard_ref.py: EventAccumulator, what TensorBoard serves): every tag,
// step, float32 value (NaN, ±inf, denormals, -0 included) and wall time arrives intact, and a
// resumed run (MetricsWriter::truncate_after, then a new writer) reads as one clean history.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>

#include "lmforge/train/metrics.h"
#include "lmforge/train/tensorboard.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {
namespace {

using json = nlohmann::json;

json read_back(const std::string& run_dir) {
  std::string out = run_dir + "/read.json";
  std::string cmd = "'" + testing::python() + "' '" + testing::source_dir() +
                    "/tests/reference/tensorboard_ref.py' '" + run_dir + "/tb' >'" + out + "' 2>'" +
                    run_dir + "/read.err'";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd << "\n" << testing::slurp(run_dir + "/read.err");
  return json::parse(testing::slurp(out));
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

struct Point {
  int64_t step;
  double value, wall_time;
};

TEST(TensorBoardReference, EveryTagStepAndValueReadsBack) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  const double inf = std::numeric_limits<double>::infinity();
  std::map<std::string, std::vector<Point>> want;
  want["loss"] = {};
  for (int s = 1; s <= 50; ++s) want["loss"].push_back({s, 10.0 / s + 0.001 * s, 1.7e9 + s});
  want["lr"] = {{1, 1e-7, 1.7e9}, {2, 3e-4, 1.7e9 + 0.5}, {3, 0.1, 1.7e9 + 0.75}};
  want["group/odd tag:name"] = {{7, 1.0, 1.0}};
  want["extremes"] = {
      {-3, -2.5, 1.0}, {0, 0.0, 2.0}, {1, -0.0, 3.0}, {2, std::numeric_limits<float>::max(), 4.0},
      {3, -1e39, 5.0},  // beyond float: -inf
      {4, 1e-45, 6.0},  // the smallest denormal
      {5, NAN, 7.0},   {6, inf, 8.0}, {7, -inf, 9.0}, {int64_t{1} << 40, 123456789.0, 10.0}};
  std::string dir = testing::temp_dir("tb-ref");
  {
    TensorBoardWriter tb(dir);
    for (const auto& [tag, points] : want)
      for (const Point& p : points) tb.scalar(tag, p.step, p.value, p.wall_time);
  }
  json got = read_back(dir);
  EXPECT_EQ(got["file_version"], json::array({"brain.Event:2"}));
  ASSERT_EQ(got["scalars"].size(), want.size()) << got["scalars"].dump();
  for (const auto& [tag, points] : want) {
    SCOPED_TRACE(tag);
    const json& g = got["scalars"][tag];
    const json& w = got["wall_times"][tag];
    ASSERT_EQ(g.size(), points.size()) << g.dump();
    for (size_t i = 0; i < points.size(); ++i) {
      float expect = std::abs(points[i].value) > std::numeric_limits<float>::max() &&
                             std::isfinite(points[i].value)
                         ? static_cast<float>(std::copysign(inf, points[i].value))
                         : static_cast<float>(points[i].value);
      float value = static_cast<float>(std::strtod(g[i][1].get<std::string>().c_str(), nullptr));
      EXPECT_EQ(g[i][0].get<int64_t>(), points[i].step);
      if (std::isnan(expect))
        EXPECT_TRUE(std::isnan(value)) << g[i].dump();
      else
        EXPECT_EQ(bits(value), bits(expect)) << g[i].dump() << " want " << expect;
      EXPECT_EQ(w[i].get<double>(), points[i].wall_time);
    }
  }
}

TEST(TensorBoardReference, ResumedRunReadsAsOneHistory) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  std::string dir = testing::temp_dir("tb-resume");
  std::string metrics = dir + "/metrics.jsonl";
  {
    MetricsWriter m(metrics, dir);
    for (int s = 1; s <= 10; ++s) {
      m.write({{"step", s}, {"loss", s}, {"lr", 0.1}});
      if (s % 5 == 0) m.write({{"step", s}, {"val_loss", s + 0.5}});
    }
  }
  // Resume from the checkpoint at step 5: steps 6.. are logged again, with other values.
  MetricsWriter::truncate_after(metrics, 5);
  {
    MetricsWriter m(metrics, dir);
    for (int s = 6; s <= 8; ++s) m.write({{"step", s}, {"loss", 100 + s}, {"lr", 0.1}});
  }
  json got = read_back(dir)["scalars"];
  json loss = json::array();
  for (int s = 1; s <= 8; ++s)
    loss.push_back(json::array({s, fmt::format("{:.1f}", s <= 5 ? s : 100.0 + s)}));
  EXPECT_EQ(got["loss"], loss);
  EXPECT_EQ(got["val_loss"], json::parse(R"([[5, "5.5"]])"));
  EXPECT_EQ(got["lr"].size(), 8u);
}

// A record's non-finite numbers: null in metrics.jsonl (JSON has none), the values themselves in
// TensorBoard (a diverged step shows as NaN there, not as a missing point).
TEST(TensorBoardReference, NonFiniteMetricsReachTensorBoardAndAreNullInJson) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  std::string dir = testing::temp_dir("tb-nan");
  {
    MetricsWriter m(dir + "/metrics.jsonl", dir);
    m.write({{"step", 1}, {"loss", 2.5}, {"grad_norm", 1.0}});
    m.write({{"step", 2}, {"loss", NAN}, {"grad_norm", INFINITY}});
  }
  const json got = read_back(dir)["scalars"];
  ASSERT_EQ(got["loss"].size(), 2u) << got.dump();
  EXPECT_TRUE(std::isnan(std::strtod(got["loss"][1][1].get<std::string>().c_str(), nullptr)));
  EXPECT_TRUE(std::isinf(std::strtod(got["grad_norm"][1][1].get<std::string>().c_str(), nullptr)));
  const std::string lines = testing::slurp(dir + "/metrics.jsonl");
  EXPECT_NE(lines.find(R"({"grad_norm":null,"loss":null,"step":2})"), std::string::npos) << lines;
}

}  // namespace
}  // namespace lmforge
