// examples/common/plot.hpp - small SVG charts for training reports: line charts and heatmaps. No dependencies.
#pragma once

#include "moa/error.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

namespace moa_examples {

using namespace moa;  // the examples are moa programs

struct PlotSeries {
  std::string label;
  std::vector<double> x, y;
  std::string color;     // any SVG colour
  bool dashed = false;
};

namespace detail {

inline std::string svg_number(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.4g", value);
  return text;
}

inline std::string svg_escape(const std::string& text) {
  std::string escaped;
  for (char c : text) escaped += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : std::string(1, c);
  return escaped;
}

// Round tick positions covering [low, high]: steps of 1, 2 or 5 times a power of ten.
inline std::vector<double> nice_ticks(double low, double high, int target = 6) {
  const double raw = (high - low) / target;
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  const double step = raw / magnitude < 1.5 ? magnitude : raw / magnitude < 3.5 ? 2 * magnitude
                      : raw / magnitude < 7.5 ? 5 * magnitude : 10 * magnitude;
  std::vector<double> ticks;
  for (double tick = std::ceil(low / step) * step; tick <= high + 1e-9 * step; tick += step) ticks.push_back(tick);
  return ticks;
}

}  // namespace detail

// Trailing moving average over `window` points, for noisy per-step curves.
inline std::vector<double> moving_average(const std::vector<double>& values, std::size_t window) {
  MOA_CHECK(window > 0, "moving_average", "window must be positive, got ", window);
  std::vector<double> averaged;
  double sum = 0;
  for (std::size_t i = 0; i < values.size(); ++i) {
    sum += values[i];
    if (i >= window) sum -= values[i - window];
    averaged.push_back(sum / static_cast<double>(std::min(i + 1, window)));
  }
  return averaged;
}

// Writes a line chart of the series to `path` (800x480 SVG) with axes, ticks and a legend.
inline void write_line_chart(const std::string& path, const std::string& title, const std::string& x_label,
                             const std::string& y_label, const std::vector<PlotSeries>& series) {
  double x_min = std::numeric_limits<double>::infinity(), x_max = -x_min, y_min = x_min, y_max = -x_min;
  for (const PlotSeries& s : series) {
    MOA_CHECK(s.x.size() == s.y.size(), "write_line_chart", "series '", s.label, "' has ", s.x.size(), " x and ",
              s.y.size(), " y values");
    for (std::size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      x_min = std::min(x_min, s.x[i]);
      x_max = std::max(x_max, s.x[i]);
      y_min = std::min(y_min, s.y[i]);
      y_max = std::max(y_max, s.y[i]);
    }
  }
  if (!(x_max > x_min)) x_max = x_min + 1, x_min = std::isfinite(x_min) ? x_min : 0, x_max = x_min + 1;
  if (!(y_max > y_min)) y_max = y_min + 1, y_min = std::isfinite(y_min) ? y_min : 0, y_max = y_min + 1;
  const double left = 70, right = 780, top = 40, bottom = 420;
  auto px = [&](double x) { return left + (x - x_min) / (x_max - x_min) * (right - left); };
  auto py = [&](double y) { return bottom - (y - y_min) / (y_max - y_min) * (bottom - top); };
  std::ofstream svg(path);
  MOA_CHECK(svg.good(), "write_line_chart", "cannot write '", path, "'");
  svg << "<svg xmlns='http://www.w3.org/2000/svg' width='800' height='480' font-family='sans-serif' font-size='12'>\n"
      << "<rect width='800' height='480' fill='white'/>\n"
      << "<text x='400' y='24' text-anchor='middle' font-size='16'>" << detail::svg_escape(title) << "</text>\n"
      << "<text x='425' y='465' text-anchor='middle'>" << detail::svg_escape(x_label) << "</text>\n"
      << "<text x='18' y='230' text-anchor='middle' transform='rotate(-90 18 230)'>" << detail::svg_escape(y_label)
      << "</text>\n";
  for (double x : detail::nice_ticks(x_min, x_max))
    svg << "<line x1='" << px(x) << "' y1='" << top << "' x2='" << px(x) << "' y2='" << bottom
        << "' stroke='#e4e4e4'/><text x='" << px(x) << "' y='" << bottom + 16 << "' text-anchor='middle'>"
        << detail::svg_number(x) << "</text>\n";
  for (double y : detail::nice_ticks(y_min, y_max))
    svg << "<line x1='" << left << "' y1='" << py(y) << "' x2='" << right << "' y2='" << py(y)
        << "' stroke='#e4e4e4'/><text x='" << left - 6 << "' y='" << py(y) + 4 << "' text-anchor='end'>"
        << detail::svg_number(y) << "</text>\n";
  svg << "<rect x='" << left << "' y='" << top << "' width='" << right - left << "' height='" << bottom - top
      << "' fill='none' stroke='black'/>\n";
  std::size_t drawn = 0;  // series in the legend: those with a point to draw
  for (const PlotSeries& s : series) {
    const auto points = std::count_if(s.y.begin(), s.y.end(), [](double y) { return std::isfinite(y); });
    if (points == 0) continue;  // e.g. validation losses of a run shorter than the first validation
    svg << "<polyline fill='none' stroke='" << s.color << "' stroke-width='2'" << (s.dashed ? " stroke-dasharray='6 4'" : "")
        << " points='";
    for (std::size_t i = 0; i < s.x.size(); ++i)
      if (std::isfinite(s.y[i])) svg << px(s.x[i]) << ',' << py(s.y[i]) << ' ';
    svg << "'/>\n";
    for (std::size_t i = 0; points == 1 && i < s.x.size(); ++i)  // a line of one point shows nothing: a dot
      if (std::isfinite(s.y[i]))
        svg << "<circle cx='" << px(s.x[i]) << "' cy='" << py(s.y[i]) << "' r='3' fill='" << s.color << "'/>\n";
    const double legend_y = top + 18 + 18 * static_cast<double>(drawn++);
    svg << "<line x1='" << right - 250 << "' y1='" << legend_y << "' x2='" << right - 220 << "' y2='" << legend_y
        << "' stroke='" << s.color << "' stroke-width='2'" << (s.dashed ? " stroke-dasharray='6 4'" : "") << "/>"
        << "<text x='" << right - 214 << "' y='" << legend_y + 4 << "'>" << detail::svg_escape(s.label) << "</text>\n";
  }
  svg << "</svg>\n";
}

// Writes a heatmap of values[row][column], white at the smallest value to dark blue at the largest,
// with the values written in the cells.
inline void write_heatmap(const std::string& path, const std::string& title, const std::vector<std::string>& row_labels,
                          const std::vector<std::string>& column_labels, const std::vector<std::vector<double>>& values) {
  MOA_CHECK(values.size() == row_labels.size(), "write_heatmap", "got ", values.size(), " rows and ", row_labels.size(),
            " row labels");
  double max_value = -std::numeric_limits<double>::infinity(), min_value = -max_value;
  for (const auto& row : values) {
    MOA_CHECK(row.size() == column_labels.size(), "write_heatmap", "a row has ", row.size(), " values for ",
              column_labels.size(), " columns");
    for (double v : row) max_value = std::max(max_value, v), min_value = std::min(min_value, v);
  }
  // The left margin fits the longest row label (about 6.5 px a character at font-size 11).
  std::size_t longest = 0;
  for (const auto& label : row_labels) longest = std::max(longest, label.size());
  const double cell = 36, left = std::max(150.0, 6.5 * static_cast<double>(longest) + 16), top = 60;
  // Wide enough for the cells and for the title (about 8.5 px a character at font-size 15).
  const double width = std::max(left + cell * static_cast<double>(column_labels.size()) + 30,
                                8.5 * static_cast<double>(title.size()) + 20);
  const double height = top + cell * static_cast<double>(row_labels.size()) + 30;
  std::ofstream svg(path);
  MOA_CHECK(svg.good(), "write_heatmap", "cannot write '", path, "'");
  svg << "<svg xmlns='http://www.w3.org/2000/svg' width='" << width << "' height='" << height
      << "' font-family='sans-serif' font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n"
      << "<text x='" << width / 2 << "' y='22' text-anchor='middle' font-size='15'>" << detail::svg_escape(title)
      << "</text>\n";
  for (std::size_t c = 0; c < column_labels.size(); ++c)
    svg << "<text x='" << left + cell * (static_cast<double>(c) + 0.5) << "' y='" << top - 8 << "' text-anchor='middle'>"
        << detail::svg_escape(column_labels[c]) << "</text>\n";
  for (std::size_t r = 0; r < row_labels.size(); ++r) {
    const double y = top + cell * static_cast<double>(r);
    svg << "<text x='" << left - 8 << "' y='" << y + cell / 2 + 4 << "' text-anchor='end'>"
        << detail::svg_escape(row_labels[r]) << "</text>\n";
    for (std::size_t c = 0; c < column_labels.size(); ++c) {
      const double share = max_value > min_value ? (values[r][c] - min_value) / (max_value - min_value) : 0;
      const int shade = static_cast<int>(255 - 200 * share);
      svg << "<rect x='" << left + cell * static_cast<double>(c) << "' y='" << y << "' width='" << cell << "' height='"
          << cell << "' fill='rgb(" << shade << "," << shade << ",255)' stroke='white'/>"
          << "<text x='" << left + cell * (static_cast<double>(c) + 0.5) << "' y='" << y + cell / 2 + 4
          << "' text-anchor='middle' fill='" << (share > 0.6 ? "white" : "black") << "'>"
          << detail::svg_number(values[r][c]) << "</text>\n";
    }
  }
  svg << "</svg>\n";
}

}  // namespace moa_examples
