// Line charts as SVG or PNG, for loss curves and learning-rate schedules; no plotting library.
// Both formats share one layout: a title, a framed plot area with grid lines at "nice" ticks
// (1, 2, 5 x 10^k; powers of ten on a log axis), tick numbers, axis labels and a legend of the
// series names in the top-right corner. The PNG is rasterized without antialiasing (2-pixel
// lines, a built-in 5x7 bitmap font: io/bitmap_font.h). Points with a non-finite coordinate,
// or a non-positive one on a log axis, are left out.
//
//   Chart c;
//   c.title = "loss", c.xlabel = "step", c.ylabel = "loss";
//   c.series.push_back({"runs/a", steps, losses});
//   write_chart(c, "loss.png");   // or .svg; written atomically
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace lmforge {

struct Series {
  std::string name;
  std::vector<double> x, y;  // same length
};

struct Chart {
  std::string title, xlabel, ylabel;
  bool log_x = false, log_y = false;
  int width = 800, height = 480;  // pixels
  std::vector<Series> series;
};

// By the extension of path (.svg or .png, any case); another extension is an Error naming path.
void write_chart(const Chart& chart, const std::string& path);
// Before the work: path ends in .svg or .png (any case), its directory exists and it is not a
// directory (an Error naming `option`).
void check_chart_path(const std::string& path, const char* option);

std::string chart_svg(const Chart& chart);
std::string chart_png(const Chart& chart);  // the PNG file's bytes

// Text for an SVG or HTML document: & < > " ' escaped, bytes that are not UTF-8 as U+FFFD (a
// directory's name in another encoding), other control characters than tab and line ends
// dropped (not XML).
std::string xml_escape(const std::string& s);

// The colour of series i (the tab10 palette, repeating).
std::array<uint8_t, 3> series_color(size_t i);

}  // namespace lmforge
