// Line charts (io/plot.h): the PNG decodes (signature, chunk CRCs, IHDR, zlib IDAT) to an image
// of the chart's size with the series' pixels where the data puts them; the SVG is well-formed
// XML with one polyline per series holding its finite points.
#include <gtest/gtest.h>
#include <zlib.h>

#include <cmath>
#include <map>
#include <regex>
#include <set>

#include "lmforge/core/error.h"
#include "lmforge/core/utf8.h"
#include "lmforge/io/plot.h"
#include "testing/process.h"

namespace lmforge {
namespace {

uint32_t be32(const std::string& s, size_t at) {
  auto b = [&](size_t i) { return static_cast<uint32_t>(static_cast<uint8_t>(s[at + i])); };
  return b(0) << 24 | b(1) << 16 | b(2) << 8 | b(3);
}

struct Decoded {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // (H, W, 3)
  int count(const std::array<uint8_t, 3>& c, int row = -1) const {
    int n = 0;
    for (int y = 0; y < height; ++y)
      for (int x = 0; x < width; ++x) {
        const uint8_t* p = &rgb[(static_cast<size_t>(y) * width + x) * 3];
        if ((row < 0 || y == row) && p[0] == c[0] && p[1] == c[1] && p[2] == c[2]) ++n;
      }
    return n;
  }
};

// A strict reader for what encode_png_rgb writes: 8-bit RGB, filter 0 rows.
Decoded decode_png(const std::string& png) {
  Decoded d;
  EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  std::string idat;
  std::vector<std::string> types;
  for (size_t i = 8; i + 12 <= png.size();) {
    uint32_t len = be32(png, i);
    std::string type = png.substr(i + 4, 4), data = png.substr(i + 8, len);
    uLong crc = crc32(0L, reinterpret_cast<const Bytef*>(png.data() + i + 4), len + 4);
    EXPECT_EQ(be32(png, i + 8 + len), static_cast<uint32_t>(crc)) << type;
    types.push_back(type);
    if (type == "IHDR") {
      d.width = static_cast<int>(be32(data, 0));
      d.height = static_cast<int>(be32(data, 4));
      EXPECT_EQ(data.substr(8), std::string("\x08\x02\x00\x00\x00", 5));
    }
    if (type == "IDAT") idat += data;
    i += 12 + len;
  }
  EXPECT_EQ(types.front(), "IHDR");
  EXPECT_EQ(types.back(), "IEND");
  size_t row = static_cast<size_t>(d.width) * 3 + 1;
  std::vector<uint8_t> raw(row * d.height);
  uLongf n = raw.size();
  EXPECT_EQ(uncompress(raw.data(), &n, reinterpret_cast<const Bytef*>(idat.data()), idat.size()),
            Z_OK);
  EXPECT_EQ(n, raw.size());
  for (int y = 0; y < d.height; ++y) {
    EXPECT_EQ(raw[y * row], 0) << "filter of row " << y;
    d.rgb.insert(d.rgb.end(), raw.begin() + y * row + 1, raw.begin() + (y + 1) * row);
  }
  return d;
}

// Every tag closed in order, attributes quoted, no stray '<' or '&' in text.
void expect_well_formed_xml(const std::string& xml) {
  std::vector<std::string> open;
  std::regex tag(R"(<(/?)([a-zA-Z]+)((\s+[a-zA-Z][a-zA-Z0-9:-]*="[^"<]*")*)\s*(/?)>)");
  size_t pos = 0;
  for (std::sregex_iterator it(xml.begin(), xml.end(), tag), end; it != end; ++it) {
    std::string between = xml.substr(pos, it->position() - pos);
    EXPECT_EQ(between.find('<'), std::string::npos) << "at " << pos;
    for (size_t a = between.find('&'); a != std::string::npos; a = between.find('&', a + 1))
      EXPECT_TRUE(std::regex_search(between.substr(a), std::regex("^&(amp|lt|gt|quot|apos);")));
    pos = it->position() + it->length();
    if ((*it)[5] == "/") continue;  // <x/>
    if ((*it)[1] == "/") {
      ASSERT_FALSE(open.empty()) << "</" << (*it)[2] << "> closes nothing";
      EXPECT_EQ(open.back(), (*it)[2]);
      open.pop_back();
    } else {
      open.push_back((*it)[2]);
    }
  }
  EXPECT_TRUE(open.empty());
  EXPECT_EQ(xml.substr(pos), "\n");
}

std::vector<size_t> polyline_points(const std::string& svg) {
  std::vector<size_t> counts;
  std::regex poly(R"(<polyline [^>]*points="([^"]*)\")");
  for (std::sregex_iterator it(svg.begin(), svg.end(), poly), end; it != end; ++it) {
    std::string pts = (*it)[1];
    std::regex pt(R"(-?[0-9.]+,-?[0-9.]+)");
    counts.push_back(
        std::distance(std::sregex_iterator(pts.begin(), pts.end(), pt), std::sregex_iterator()));
  }
  return counts;
}

Chart chart(const std::string& title, const std::string& xlabel, const std::string& ylabel) {
  Chart c;
  c.title = title, c.xlabel = xlabel, c.ylabel = ylabel;
  return c;
}

Chart two_series() {
  Chart c = chart("loss <&> \"runs\"", "step", "loss");
  Series flat{"flat", {}, {}}, diag{"runs/b & c", {}, {}};
  for (int i = 0; i <= 100; ++i) {
    flat.x.push_back(i), flat.y.push_back(1.0);
    diag.x.push_back(i), diag.y.push_back(i % 10 == 3 ? NAN : i / 50.0);
  }
  diag.x[50] = INFINITY;
  c.series = {flat, diag};
  return c;
}

TEST(Plot, PngDecodesToTheChartWithItsLines) {
  Chart c = two_series();
  Decoded d = decode_png(chart_png(c));
  ASSERT_EQ(d.width, 800);
  ASSERT_EQ(d.height, 480);
  // The flat series is a horizontal line across the plot area: some row is mostly its colour.
  int best = 0, best_row = -1;
  for (int y = 0; y < d.height; ++y)
    if (int n = d.count(series_color(0), y); n > best) best = n, best_row = y;
  EXPECT_GT(best, 600) << "row " << best_row;
  EXPECT_GT(best_row, 100);  // y = 1 of 0..2: the middle of the plot
  EXPECT_LT(best_row, 380);
  // The diagonal goes from bottom-left to top-right: its pixels near the left are low.
  int low_left = 0, high_left = 0;
  for (int y = 0; y < d.height; ++y)
    for (int x = 0; x < 300; ++x) {
      const uint8_t* p = &d.rgb[(static_cast<size_t>(y) * d.width + x) * 3];
      auto col = series_color(1);
      if (p[0] == col[0] && p[1] == col[1] && p[2] == col[2]) (y > 240 ? low_left : high_left)++;
    }
  EXPECT_GT(low_left, 100);
  EXPECT_LT(high_left, 40);  // the legend's sample line is up there
  // Text and frame are drawn; most of the image is background.
  EXPECT_GT(d.count({0, 0, 0}), 1000);
  EXPECT_GT(d.count({255, 255, 255}), 800 * 480 / 2);
}

TEST(Plot, SvgIsWellFormedWithOnePolylinePerSeries) {
  Chart c = two_series();
  std::string svg = chart_svg(c);
  ASSERT_TRUE(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\"")) << svg.substr(0, 80);
  expect_well_formed_xml(svg);
  // flat: 101 points; diag: 101 less 10 NaN less the infinite x.
  EXPECT_EQ(polyline_points(svg), (std::vector<size_t>{101, 90}));
  EXPECT_NE(svg.find("loss &lt;&amp;&gt; &quot;runs&quot;"), std::string::npos);
  EXPECT_NE(svg.find(">runs/b &amp; c</text>"), std::string::npos);
}

TEST(Plot, LogAxisTicksArePowersOfTenAndSkipNonPositive) {
  Chart c = chart("lr finder", "lr", "loss");
  c.log_x = true;
  Series s{"", {}, {}};
  for (double lr = 1e-6; lr <= 1.01; lr *= 1.5) s.x.push_back(lr), s.y.push_back(std::log(lr));
  s.x.push_back(1), s.y.push_back(0);  // (the axis ends at 1: a tick there, none beyond)
  s.x.push_back(0), s.y.push_back(1);  // not on a log axis
  s.x.push_back(-1), s.y.push_back(1);
  c.series = {s};
  std::string svg = chart_svg(c);
  expect_well_formed_xml(svg);
  EXPECT_EQ(polyline_points(svg), (std::vector<size_t>{s.x.size() - 2}));
  for (const char* t : {">1e-06<", ">1e-05<", ">0.0001<", ">0.001<", ">0.01<", ">0.1<", ">1<"})
    EXPECT_NE(svg.find(t), std::string::npos) << t;
  EXPECT_EQ(svg.find("fill-opacity"), std::string::npos);  // no legend without names
  Decoded d = decode_png(chart_png(c));
  EXPECT_GT(d.count(series_color(0)), 300);
}

// A log axis over less than a decade (a loss from 9.5 to 5.5, gradient norms) still gets labels:
// 1..9 x 10^k, or linear ticks when even those are too sparse (it had one label or none).
TEST(Plot, LogAxisWithinADecadeHasLabels) {
  // (and below 1, where the top power of ten was truncated upward: a tick above the axis, off
  // the canvas, that left the range with two labels inside)
  for (const auto& [lo, hi] : {std::pair{5.5, 9.5},
                               {1.39, 1.56},
                               {0.26, 0.45},
                               {0.65, 1.24},
                               {3e-5, 3e-4},
                               {1e-5, 0.03},
                               {1e-300, 1e300}}) {
    SCOPED_TRACE(::testing::PrintToString(std::pair{lo, hi}));
    Chart c = chart("", "", "");
    c.log_y = true;
    Series s{"", {}, {}};
    for (int i = 0; i <= 50; ++i) s.x.push_back(i), s.y.push_back(lo + (hi - lo) * i / 50.0);
    c.series = {s};
    const std::string svg = chart_svg(c);
    std::vector<double> ticks;
    const std::regex text(R"re(text-anchor="end">([^<]*)</text>)re");
    for (std::sregex_iterator it(svg.begin(), svg.end(), text), end; it != end; ++it)
      ticks.push_back(std::stod((*it)[1]));
    EXPECT_GE(ticks.size(), 3u) << ::testing::PrintToString(ticks);
    EXPECT_LE(ticks.size(), 12u) << ::testing::PrintToString(ticks);
    EXPECT_EQ(svg.find("inf"), std::string::npos);
    for (double t : ticks) {  // on the axis (its range: the values, padded 4% of the log span)
      EXPECT_GE(t, lo * std::pow(hi / lo, -0.05));
      EXPECT_LE(t, hi * std::pow(hi / lo, 0.05));
    }
  }
}

// Names from the file system are not always UTF-8 (a run directory named in Latin-1) and may hold
// control characters: the SVG stays valid XML text (U+FFFD, control characters dropped).
TEST(Plot, SvgTextIsValidUtf8WithoutControlCharacters) {
  Chart c = two_series();
  c.series[0].name = "lat\xe9n \x01run\x1b";
  const std::string svg = chart_svg(c);
  expect_well_formed_xml(svg);
  EXPECT_EQ(find_invalid_utf8(svg), svg.size());
  for (char ch : svg)
    EXPECT_TRUE(static_cast<unsigned char>(ch) >= 0x20 || ch == '\n' || ch == '\t') << int(ch);
  EXPECT_NE(svg.find(">lat\xEF\xBF\xBDn run</text>"), std::string::npos);
}

// Tick labels tell their ticks apart: throughput of 120000 +- 60 (at 4 digits: 1.2e+05 five
// times) and steps 100000..100100 (1e+05 three times); whole numbers print in full.
TEST(Plot, TickLabelsAreDistinct) {
  Chart c = chart("", "", "");
  Series s{"", {}, {}};
  for (int i = 0; i <= 100; ++i)
    s.x.push_back(100000 + i), s.y.push_back(120000 + 0.6 * (i - 50) + 0.5);
  c.series = {s};
  const std::string svg = chart_svg(c);
  std::map<std::string, std::vector<std::string>> labels;  // by text-anchor
  const std::regex text(
      R"re(<text x="[^"]*" y="[^"]*" text-anchor="(end|middle)">([^<]*)</text>)re");
  for (std::sregex_iterator it(svg.begin(), svg.end(), text), end; it != end; ++it)
    labels[(*it)[1]].push_back((*it)[2]);
  for (const auto& [anchor, l] : labels) {
    SCOPED_TRACE(anchor);
    EXPECT_GE(l.size(), 3u);
    EXPECT_EQ(std::set<std::string>(l.begin(), l.end()).size(), l.size())
        << ::testing::PrintToString(l);
  }
  EXPECT_NE(svg.find(">100000<"), std::string::npos) << ::testing::PrintToString(labels["middle"]);
}

TEST(Plot, DegenerateDataStillDraws) {
  Chart one = chart("one point", "", "");
  one.series = {{"a", {5}, {2}}};
  std::string svg = chart_svg(one);
  expect_well_formed_xml(svg);
  EXPECT_NE(svg.find("<circle"), std::string::npos);
  const Decoded png = decode_png(chart_png(one));
  EXPECT_EQ(png.width, 800);
  EXPECT_GE(png.count(series_color(0)), 25) << "a dot, not 2x2 pixels";
  Chart none = chart("nothing", "", "");
  none.series = {{"nan", {1, 2}, {NAN, NAN}}};
  expect_well_formed_xml(chart_svg(none));
  EXPECT_EQ(decode_png(chart_png(none)).height, 480);
}

TEST(Plot, WriteChartByExtensionAtomically) {
  std::string dir = testing::temp_dir("plot");
  Chart c = two_series();
  write_chart(c, dir + "/a.svg");
  write_chart(c, dir + "/b.PNG");
  EXPECT_TRUE(testing::slurp(dir + "/a.svg").starts_with("<svg"));
  EXPECT_TRUE(testing::slurp(dir + "/b.PNG").starts_with("\x89PNG"));
  try {
    write_chart(c, dir + "/c.jpg");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("c.jpg"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(".svg or .png"), std::string::npos) << e.what();
  }
  Chart bad = c;
  bad.series[0].y.pop_back();
  EXPECT_THROW(write_chart(bad, dir + "/d.svg"), Error);
  EXPECT_FALSE(std::filesystem::exists(dir + "/c.jpg"));
  for (const auto& e : std::filesystem::directory_iterator(dir))  // no temporary left behind
    EXPECT_FALSE(e.path().string().ends_with(".tmp")) << e.path();
}

}  // namespace
}  // namespace lmforge
