#include "lmforge/io/plot.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <set>

#include "lmforge/core/error.h"
#include "lmforge/core/utf8.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/io/bitmap_font.h"
#include "lmforge/io/png.h"

namespace lmforge {

namespace {

using Rgb = std::array<uint8_t, 3>;

constexpr Rgb kBlack{0, 0, 0}, kWhite{255, 255, 255}, kGrid{224, 224, 224}, kText{40, 40, 40};
constexpr int kCharW = kGlyphWidth + 1;  // raster glyph advance, pixels at scale 1
constexpr int kTickLen = 4;

// ---- layout, shared by SVG and PNG -----------------------------------------------------------

struct Axis {
  bool log = false;
  double lo = 0, hi = 1;  // log: log10 of the bounds
  std::vector<double> ticks;
  int digits = 4;  // of the tick labels (tick_label); -1: whole numbers in full

  double frac(double v) const { return ((log ? std::log10(v) : v) - lo) / (hi - lo); }
};

std::string tick_label(double v, int digits) {
  std::string s = digits < 0 ? fmt::format("{:.0f}", v) : fmt::format("{:.{}g}", v, digits);
  return s == "-0" ? "0" : s;
}

// The labels' precision: whole numbers (below 1e9) in full, else the fewest significant digits,
// at least 4, that tell every tick apart (120000 +- 60 needs 6: 1.2e+05 five times told nothing).
int tick_digits(const std::vector<double>& ticks) {
  if (std::all_of(ticks.begin(), ticks.end(),
                  [](double t) { return t == std::round(t) && std::abs(t) < 1e9; }))
    return -1;
  for (int digits = 4; digits < 17; ++digits) {
    std::set<std::string> seen;
    for (double t : ticks) seen.insert(tick_label(t, digits));
    if (seen.size() == ticks.size()) return digits;
  }
  return 17;
}

bool usable(double v, bool log) { return std::isfinite(v) && (!log || v > 0); }

// Linear ticks at multiples of a step of 1, 2 or 5 x 10^k, about six of them.
void linear_ticks(Axis& a) {
  double raw = (a.hi - a.lo) / 6, mag = std::pow(10, std::floor(std::log10(raw)));
  double n = raw / mag, step = (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
  for (double k = std::ceil(a.lo / step - 1e-9); k * step <= a.hi + step * 1e-9; ++k)
    a.ticks.push_back(std::abs(k * step) < step * 1e-9 ? 0 : k * step);
}

// Powers of ten (every n-th when there are many decades; with 2x and 5x when there are few).
void log_ticks(Axis& a) {
  int first = static_cast<int>(std::ceil(a.lo - 1e-9));
  int last = static_cast<int>(std::floor(a.hi + 1e-9));  // (below 1 too: floor, not truncation)
  int every = std::max(1, (last - first + 1 + 7) / 8);
  for (int e = first; e <= last; e += every)  // (10^-324 underflows to 0: no tick)
    if (const double t = std::pow(10.0, e); t > 0 && std::isfinite(t)) a.ticks.push_back(t);
  // Fewer decades: 1, 2 and 5 x 10^k; within about one (a loss from 9.5 to 5.5, a gradient
  // norm), every 1..9 x 10^k, as matplotlib labels them; narrower still (1.39 to 1.56), linear
  // ticks over the values, placed on the log scale.
  for (const std::vector<double>& mantissas :
       {std::vector<double>{1, 2, 5}, std::vector<double>{1, 2, 3, 4, 5, 6, 7, 8, 9}}) {
    if (a.ticks.size() >= 3) return;
    a.ticks.clear();
    for (int e = static_cast<int>(std::floor(a.lo)); e <= last; ++e)
      for (double m : mantissas) {
        double t = m * std::pow(10.0, e), l = std::log10(t);
        if (l >= a.lo - 1e-9 && l <= a.hi + 1e-9) a.ticks.push_back(t);
      }
  }
  if (a.ticks.size() >= 3) return;
  Axis lin;
  lin.lo = std::pow(10.0, a.lo);
  lin.hi = std::pow(10.0, a.hi);
  linear_ticks(lin);
  a.ticks.clear();
  for (double t : lin.ticks)
    if (t > 0 && std::isfinite(t)) a.ticks.push_back(t);
}

Axis make_axis(const std::vector<double>& values, bool log, double pad) {
  Axis a;
  a.log = log;
  bool any = false;
  for (double v : values) {
    if (!usable(v, log)) continue;
    double u = log ? std::log10(v) : v;
    a.lo = any ? std::min(a.lo, u) : u;
    a.hi = any ? std::max(a.hi, u) : u;
    any = true;
  }
  if (!any) a.lo = 0, a.hi = 1;
  if (a.hi - a.lo <= std::abs(a.hi) * 1e-12) {  // one value: a range around it
    double d = log ? 0.5 : (a.lo == 0 ? 1 : std::abs(a.lo) * 0.1);
    a.lo -= d, a.hi += d;
  }
  double p = (a.hi - a.lo) * pad;
  a.lo -= p, a.hi += p;
  if (log)
    log_ticks(a);
  else
    linear_ticks(a);
  a.digits = tick_digits(a.ticks);
  return a;
}

struct Layout {
  int width, height;
  int left, top, right, bottom;  // the plot area, pixels
  Axis x, y;
  double px(double v) const { return left + x.frac(v) * (right - left); }
  double py(double v) const { return bottom - y.frac(v) * (bottom - top); }
};

Layout make_layout(const Chart& c) {
  if (c.width < 200 || c.height < 150)
    fail("chart \"{}\": {}x{} pixels is too small (at least 200x150)", c.title, c.width, c.height);
  std::vector<double> xs, ys;
  for (const Series& s : c.series) {
    if (s.x.size() != s.y.size())
      fail("chart \"{}\": series \"{}\" has {} x values and {} y values", c.title, s.name,
           s.x.size(), s.y.size());
    for (size_t i = 0; i < s.x.size(); ++i)
      if (usable(s.x[i], c.log_x) && usable(s.y[i], c.log_y)) {
        xs.push_back(s.x[i]);
        ys.push_back(s.y[i]);
      }
  }
  Layout l;
  l.width = c.width, l.height = c.height;
  l.x = make_axis(xs, c.log_x, 0);
  l.y = make_axis(ys, c.log_y, 0.04);
  size_t label_chars = 0;
  for (double t : l.y.ticks) label_chars = std::max(label_chars, tick_label(t, l.y.digits).size());
  l.left = 10 + (c.ylabel.empty() ? 0 : 16) + static_cast<int>(label_chars) * kCharW + 8;
  l.top = c.title.empty() ? 16 : 40;
  l.right = c.width - 24;
  l.bottom = c.height - (c.xlabel.empty() ? 28 : 44);
  return l;
}

// The finite points of a series, in pixels.
std::vector<std::pair<double, double>> pixels_of(const Layout& l, const Chart& c, const Series& s) {
  std::vector<std::pair<double, double>> p;
  for (size_t i = 0; i < s.x.size(); ++i)
    if (usable(s.x[i], c.log_x) && usable(s.y[i], c.log_y))
      p.emplace_back(l.px(s.x[i]), l.py(s.y[i]));
  return p;
}

// The legend box, top-right inside the plot area: {x, y, width, height}; empty without names.
std::array<int, 4> legend_box(const Layout& l, const Chart& c) {
  size_t chars = 0;
  for (const Series& s : c.series) chars = std::max(chars, s.name.size());
  if (chars == 0) return {0, 0, 0, 0};
  int w = 34 + static_cast<int>(chars) * kCharW, h = 8 + 14 * static_cast<int>(c.series.size());
  w = std::min(w, l.right - l.left - 8);
  return {l.right - 6 - w, l.top + 6, w, h};
}

std::string hex(const Rgb& c) { return fmt::format("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]); }

// ---- SVG -------------------------------------------------------------------------------------

// ---- raster ----------------------------------------------------------------------------------

struct Image {
  int w, h;
  std::vector<uint8_t> rgb;  // (h, w, 3)
  Image(int w_, int h_) : w(w_), h(h_), rgb(static_cast<size_t>(w_) * h_ * 3, 255) {}
  void set(int x, int y, const Rgb& c) {
    if (x < 0 || y < 0 || x >= w || y >= h) return;
    std::copy(c.begin(), c.end(), rgb.begin() + (static_cast<size_t>(y) * w + x) * 3);
  }
  void fill(int x0, int y0, int x1, int y1, const Rgb& c) {  // inclusive
    for (int y = y0; y <= y1; ++y)
      for (int x = x0; x <= x1; ++x) set(x, y, c);
  }
};

// Text as the raster font can draw it: one '?' for each non-ASCII UTF-8 character.
std::string ascii(const std::string& s) {
  std::string o;
  for (unsigned char ch : s)
    if (ch < 0x80)
      o += static_cast<char>(ch);
    else if (ch >= 0xC0)
      o += '?';  // a lead byte; continuation bytes (0x80-0xBF) add nothing
  return o;
}

int text_width(const std::string& s, int scale) {
  return s.empty() ? 0 : (static_cast<int>(s.size()) * kCharW - 1) * scale;
}

// Text with its top-left corner at (x, y); vertical: rotated 90 degrees counter-clockwise, its
// bottom-left corner (where it starts) at (x, y).
void draw_text(Image& img, int x, int y, const std::string& s, const Rgb& c, int scale = 1,
               bool vertical = false) {
  for (size_t i = 0; i < s.size(); ++i) {
    const uint8_t* g = glyph_5x7(s[i]);
    for (int r = 0; r < kGlyphHeight; ++r)
      for (int col = 0; col < kGlyphWidth; ++col) {
        if (!(g[r] >> (kGlyphWidth - 1 - col) & 1)) continue;
        int gx = (static_cast<int>(i) * kCharW + col) * scale, gy = r * scale;
        for (int dy = 0; dy < scale; ++dy)
          for (int dx = 0; dx < scale; ++dx)
            if (vertical)
              img.set(x + gy + dy, y - gx - dx, c);
            else
              img.set(x + gx + dx, y + gy + dy, c);
      }
  }
}

// Bresenham's line, 2 pixels wide, clipped to the rectangle [x0c, x1c] x [y0c, y1c].
void draw_line(Image& img, double fx0, double fy0, double fx1, double fy1, const Rgb& c,
               const std::array<int, 4>& clip) {
  int x0 = static_cast<int>(std::lround(fx0)), y0 = static_cast<int>(std::lround(fy0));
  int x1 = static_cast<int>(std::lround(fx1)), y1 = static_cast<int>(std::lround(fy1));
  int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0);
  int sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1, err = dx + dy;
  auto plot = [&](int x, int y) {
    for (int yy = y; yy <= y + 1; ++yy)
      for (int xx = x; xx <= x + 1; ++xx)
        if (xx >= clip[0] && xx <= clip[2] && yy >= clip[1] && yy <= clip[3]) img.set(xx, yy, c);
  };
  for (;;) {
    plot(x0, y0);
    if (x0 == x1 && y0 == y1) break;
    int e2 = 2 * err;
    if (e2 >= dy) err += dy, x0 += sx;
    if (e2 <= dx) err += dx, y0 += sy;
  }
}

}  // namespace

std::array<uint8_t, 3> series_color(size_t i) {
  static constexpr Rgb kTab10[] = {
      {31, 119, 180}, {255, 127, 14},  {44, 160, 44},   {214, 39, 40},  {148, 103, 189},
      {140, 86, 75},  {227, 119, 194}, {127, 127, 127}, {188, 189, 34}, {23, 190, 207}};
  return kTab10[i % 10];
}

std::string chart_svg(const Chart& c) {
  Layout l = make_layout(c);
  std::string o = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} "
      "{1}\" font-family=\"sans-serif\" font-size=\"11\">\n"
      "<rect width=\"{0}\" height=\"{1}\" fill=\"white\"/>\n",
      c.width, c.height);
  if (!c.title.empty())
    o += fmt::format("<text x=\"{}\" y=\"26\" text-anchor=\"middle\" font-size=\"16\">{}</text>\n",
                     (l.left + l.right) / 2, xml_escape(c.title));
  o += fmt::format("<g stroke=\"{}\" stroke-width=\"1\">\n", hex(kGrid));
  for (double t : l.x.ticks)
    o += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\"/>\n", l.px(t),
                     l.top, l.bottom);
  for (double t : l.y.ticks)
    o += fmt::format("<line x1=\"{1}\" y1=\"{0:.1f}\" x2=\"{2}\" y2=\"{0:.1f}\"/>\n", l.py(t),
                     l.left, l.right);
  o += "</g>\n";
  o += fmt::format(
      "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\"/>\n",
      l.left, l.top, l.right - l.left, l.bottom - l.top);
  for (double t : l.x.ticks)
    o += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", l.px(t),
                     l.bottom + 16, tick_label(t, l.x.digits));
  for (double t : l.y.ticks)
    o += fmt::format("<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n", l.left - 6,
                     l.py(t) + 4, tick_label(t, l.y.digits));
  if (!c.xlabel.empty())
    o += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                     (l.left + l.right) / 2, c.height - 10, xml_escape(c.xlabel));
  if (!c.ylabel.empty())
    o += fmt::format(
        "<text x=\"14\" y=\"{0}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {0})\">{1}"
        "</text>\n",
        (l.top + l.bottom) / 2, xml_escape(c.ylabel));
  for (size_t i = 0; i < c.series.size(); ++i) {
    auto pts = pixels_of(l, c, c.series[i]);
    std::string points;
    for (auto [x, y] : pts)
      points += fmt::format("{}{:.2f},{:.2f}", points.empty() ? "" : " ", x, y);
    o += fmt::format(
        "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" stroke-linejoin=\"round\" "
        "points=\"{}\"/>\n",
        hex(series_color(i)), points);
    if (pts.size() == 1)  // a polyline of one point draws nothing
      o += fmt::format("<circle cx=\"{:.2f}\" cy=\"{:.2f}\" r=\"2.5\" fill=\"{}\"/>\n",
                       pts[0].first, pts[0].second, hex(series_color(i)));
  }
  auto [bx, by, bw, bh] = legend_box(l, c);
  if (bw > 0) {
    o += fmt::format(
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"white\" fill-opacity=\"0.85\" "
        "stroke=\"#999999\"/>\n",
        bx, by, bw, bh);
    for (size_t i = 0; i < c.series.size(); ++i) {
      int y = by + 11 + 14 * static_cast<int>(i);
      o += fmt::format(
          "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"2\"/>\n"
          "<text x=\"{}\" y=\"{}\">{}</text>\n",
          bx + 6, y - 4, bx + 24, y - 4, hex(series_color(i)), bx + 30, y,
          xml_escape(c.series[i].name));
    }
  }
  return o + "</svg>\n";
}

std::string chart_png(const Chart& c) {
  Layout l = make_layout(c);
  Image img(c.width, c.height);
  if (!c.title.empty()) {
    // Twice the font size when it fits; else the font size, cut to the width.
    std::string t = ascii(c.title);
    int scale = text_width(t, 2) <= c.width - 20 ? 2 : 1;
    if (scale == 1 && text_width(t, 1) > c.width - 20) t = t.substr(0, (c.width - 20) / kCharW);
    int tw = text_width(t, scale);
    int x = std::clamp((l.left + l.right - tw) / 2, 10, std::max(10, c.width - 10 - tw));
    draw_text(img, x, scale == 2 ? 12 : 16, t, kText, scale);
  }
  for (double t : l.x.ticks) {
    int x = static_cast<int>(std::lround(l.px(t)));
    img.fill(x, l.top, x, l.bottom, kGrid);
    img.fill(x, l.bottom, x, l.bottom + kTickLen, kBlack);
    std::string s = tick_label(t, l.x.digits);
    draw_text(img, x - text_width(s, 1) / 2, l.bottom + kTickLen + 4, s, kText);
  }
  for (double t : l.y.ticks) {
    int y = static_cast<int>(std::lround(l.py(t)));
    img.fill(l.left, y, l.right, y, kGrid);
    img.fill(l.left - kTickLen, y, l.left, y, kBlack);
    std::string s = tick_label(t, l.y.digits);
    draw_text(img, l.left - kTickLen - 4 - text_width(s, 1), y - kGlyphHeight / 2, s, kText);
  }
  img.fill(l.left, l.top, l.right, l.top, kBlack);
  img.fill(l.left, l.bottom, l.right, l.bottom, kBlack);
  img.fill(l.left, l.top, l.left, l.bottom, kBlack);
  img.fill(l.right, l.top, l.right, l.bottom, kBlack);
  if (!c.xlabel.empty()) {
    std::string s = ascii(c.xlabel);
    draw_text(img, (l.left + l.right - text_width(s, 1)) / 2, c.height - 16, s, kText);
  }
  if (!c.ylabel.empty()) {
    std::string s = ascii(c.ylabel);
    draw_text(img, 8, (l.top + l.bottom + text_width(s, 1)) / 2, s, kText, 1, /*vertical=*/true);
  }
  const std::array<int, 4> inside{l.left + 1, l.top + 1, l.right - 1, l.bottom - 1};
  for (size_t i = 0; i < c.series.size(); ++i) {
    auto pts = pixels_of(l, c, c.series[i]);
    for (size_t k = 0; k < pts.size(); ++k) {
      auto [x1, y1] = pts[k];
      auto [x0, y0] = pts[k == 0 ? 0 : k - 1];
      draw_line(img, x0, y0, x1, y1, series_color(i), inside);
    }
    if (pts.size() == 1) {  // a dot, as the SVG's circle (a line to itself is 2x2 pixels)
      const int cx = static_cast<int>(std::lround(pts[0].first)),
                cy = static_cast<int>(std::lround(pts[0].second));
      for (int dy = -3; dy <= 3; ++dy)
        for (int dx = -3; dx <= 3; ++dx)
          if (dx * dx + dy * dy <= 9 && cx + dx >= inside[0] && cx + dx <= inside[2] &&
              cy + dy >= inside[1] && cy + dy <= inside[3])
            img.fill(cx + dx, cy + dy, cx + dx, cy + dy, series_color(i));
    }
  }
  auto [bx, by, bw, bh] = legend_box(l, c);
  if (bw > 0) {
    img.fill(bx, by, bx + bw, by + bh, kWhite);
    img.fill(bx, by, bx + bw, by, kGrid);
    img.fill(bx, by + bh, bx + bw, by + bh, kGrid);
    img.fill(bx, by, bx, by + bh, kGrid);
    img.fill(bx + bw, by, bx + bw, by + bh, kGrid);
    for (size_t i = 0; i < c.series.size(); ++i) {
      int y = by + 11 + 14 * static_cast<int>(i);
      img.fill(bx + 6, y - 5, bx + 24, y - 4, series_color(i));
      std::string s = ascii(c.series[i].name);
      int room = (bw - 34) / kCharW;  // a long name is cut to the box
      if (static_cast<int>(s.size()) > room) s = s.substr(0, std::max(room - 2, 0)) + "..";
      draw_text(img, bx + 30, y - 8, s, kText);
    }
  }
  return encode_png_rgb(img.rgb.data(), img.w, img.h);
}

std::string xml_escape(const std::string& s) {
  std::string o;
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_char_len(s, i);
    if (n == 0) {  // not UTF-8 (a run directory's name in Latin-1): U+FFFD
      o += "\xEF\xBF\xBD";
      ++i;
      continue;
    }
    const char ch = s[i];
    if (n > 1)
      o.append(s, i, n);
    else if (ch == '&')
      o += "&amp;";
    else if (ch == '<')
      o += "&lt;";
    else if (ch == '>')
      o += "&gt;";
    else if (ch == '"')
      o += "&quot;";
    else if (ch == '\'')
      o += "&apos;";
    else if (static_cast<unsigned char>(ch) >= 0x20 || ch == '\t' || ch == '\n' || ch == '\r')
      o += ch;  // (the other control characters are not XML; dropped)
    i += n;
  }
  return o;
}

namespace {
std::string chart_ext(const std::string& path) {  // ".svg", ".png" (lower case), or ""
  std::string ext = path.size() >= 4 ? path.substr(path.size() - 4) : "";
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  return ext == ".svg" || ext == ".png" ? ext : "";
}
}  // namespace

void write_chart(const Chart& chart, const std::string& path) {
  const std::string ext = chart_ext(path);
  if (ext.empty()) fail("{}: unknown chart format; the file name must end in .svg or .png", path);
  write_file_atomic(path, ext == ".svg" ? chart_svg(chart) : chart_png(chart));
}

void check_chart_path(const std::string& path, const char* option) {
  if (chart_ext(path).empty()) fail("{}: {}: expected a .svg or .png file", option, path);
  check_output_file(path, option, "chart.svg");
}

}  // namespace lmforge
