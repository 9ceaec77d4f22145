// PNG charts from io/plot.h open in Pillow (the reference venv) with the chart's size, RGB mode
// and the first series' colour where the data puts its line.
#include <gtest/gtest.h>

#include "lmforge/io/plot.h"
#include "testing/paths.h"
#include "testing/process.h"

namespace lmforge {
namespace {

TEST(PlotReference, PillowOpensThePng) {
  if (testing::python().empty()) GTEST_SKIP() << "configured without LMFORGE_PYTHON";
  std::string dir = testing::temp_dir("plot-ref");
  Chart c;
  c.title = "flat", c.xlabel = "step", c.ylabel = "loss", c.width = 640, c.height = 400;
  c.series = {{"a", {0, 1, 2, 3}, {1, 1, 1, 1}}, {"b", {0, 3}, {0, 2}}};
  write_chart(c, dir + "/c.png");
  std::string script =
      "import sys\n"
      "from PIL import Image\n"
      "im = Image.open(sys.argv[1]); im.load()\n"
      "w, h = im.size\n"
      "rows = [sum(1 for x in range(w) if im.getpixel((x, y)) == (31, 119, 180)) for y in "
      "range(h)]\n"
      "print(w, h, im.mode, im.format, max(rows))\n";
  std::string py = dir + "/check.py";
  {
    std::FILE* f = std::fopen(py.c_str(), "w");
    std::fputs(script.c_str(), f);
    std::fclose(f);
  }
  std::string cmd =
      "'" + testing::python() + "' '" + py + "' '" + dir + "/c.png' >'" + dir + "/out.txt' 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << testing::slurp(dir + "/out.txt");
  std::istringstream out(testing::slurp(dir + "/out.txt"));
  int w, h, longest;
  std::string mode, format;
  out >> w >> h >> mode >> format >> longest;
  EXPECT_EQ(w, 640);
  EXPECT_EQ(h, 400);
  EXPECT_EQ(mode, "RGB");
  EXPECT_EQ(format, "PNG");
  EXPECT_GT(longest, 400);  // the flat line spans the plot area
}

}  // namespace
}  // namespace lmforge
