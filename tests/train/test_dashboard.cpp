// The dashboard (train/dashboard.h): its charts thin a metric's points as they come (at most
// 2 x 2000 of them, evenly strided, the last one always), so a run of a million logged steps,
// or a resume loading their history, costs each record its keys alone (the page was rebuilt
// from every record: a resume over 300k records took 106 s to its first new steps); the page
// still shows the latest value of every metric and the last step.
#include <gtest/gtest.h>

#include <regex>

#include "lmforge/train/dashboard.h"
#include "testing/process.h"

namespace lmforge {
namespace {

TEST(Dashboard, ThinSeriesKeepsEvenlyStridedPointsAndTheLast) {
  ThinSeries s(100);
  EXPECT_TRUE(s.empty());
  for (int i = 1; i <= 150; ++i) s.add(i, 2.0 * i);
  auto [x, y] = s.points();  // under 2 x 100: every point
  ASSERT_EQ(x.size(), 150u);
  EXPECT_EQ(x.front(), 1);
  EXPECT_EQ(y.back(), 300);
  for (int i = 151; i <= 1000003; ++i) s.add(i, 2.0 * i);
  std::tie(x, y) = s.points();
  EXPECT_LE(x.size(), 201u);
  EXPECT_GT(x.size(), 100u);
  EXPECT_EQ(x.front(), 1);
  EXPECT_EQ(x.back(), 1000003);  // the last, off the stride
  EXPECT_EQ(y.back(), 2000006);
  const double stride = x[1] - x[0];
  for (size_t i = 1; i + 1 < x.size(); ++i) {
    EXPECT_EQ(x[i] - x[i - 1], stride) << i;
    EXPECT_EQ(y[i], 2 * x[i]) << i;
  }
  EXPECT_EQ(std::fmod(stride, 2.0), 0.0);  // doubled as it grew
}

TEST(Dashboard, APageOfAMillionStepsHoldsTheLatestValuesAndBoundedCharts) {
  const std::string dir = testing::temp_dir("dashboard");
  Dashboard d(dir + "/dashboard.html", "runs/x", 1000000);
  for (int64_t step = 1; step <= 1000000; ++step) {
    nlohmann::json r = {{"step", step}, {"loss", 5.0 - step * 1e-6}, {"lr", 1e-3}};
    if (step % 1000 == 0) r["val_loss"] = 6.0 - step * 1e-6;
    d.add(r);
  }
  const std::string page = d.html("finished");
  EXPECT_NE(page.find("step 1000000 of 1000000 &middot; finished"), std::string::npos);
  EXPECT_NE(page.find("<tr><th>loss</th><td>4</td><td>1000000</td></tr>"), std::string::npos);
  EXPECT_NE(page.find("<tr><th>val_loss</th><td>5</td><td>1000000</td></tr>"), std::string::npos);
  EXPECT_EQ(page.find("http-equiv=\"refresh\""), std::string::npos);  // ended: no reload
  EXPECT_LT(page.size(), 1u << 20);  // bounded charts (all points: tens of MB)
  EXPECT_NE(d.html("").find("http-equiv=\"refresh\""), std::string::npos);
}

}  // namespace
}  // namespace lmforge
