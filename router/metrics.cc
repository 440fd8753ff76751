#include "router/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>

namespace moemesh {

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double value) {
  const size_t i = static_cast<size_t>(
      std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  ++counts_[i];
  ++count_;
  sum_ += value;
}

std::vector<double> Histogram::LatencySeconds() {
  return {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
          1,     2.5,   5,    7.5,  10,   20,   40,   80,  160, 320, 640};
}

std::vector<double> Histogram::TokenGapSeconds() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03,
          0.04,   0.05,    0.075,  0.1,   0.15,   0.2,   0.3,  0.4,   0.5,  0.75,  1,
          2.5,    5,       10};
}

std::vector<double> Histogram::TokenCounts() {
  std::vector<double> b;
  for (double decade = 1; decade <= 100000; decade *= 10) {
    for (double m : {1.0, 2.0, 5.0}) {
      if (m * decade <= 100000) b.push_back(m * decade);
    }
  }
  return b;
}

std::string PrometheusNumber(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[40];
  if (v == std::floor(v) && std::fabs(v) < 1e15) {
    std::snprintf(buf, sizeof(buf), "%.0f", v);
  } else {
    std::snprintf(buf, sizeof(buf), "%.17g", v);
    // The shortest of %.15g..%.17g that reads back as v (0.1 rather than 0.10000000000000001).
    for (int digits = 15; digits < 17; ++digits) {
      char shorter[40];
      std::snprintf(shorter, sizeof(shorter), "%.*g", digits, v);
      if (std::strtod(shorter, nullptr) == v) {
        std::snprintf(buf, sizeof(buf), "%s", shorter);
        break;
      }
    }
  }
  return buf;
}

void PrometheusText::Family(std::string_view name, std::string_view type,
                            std::string_view help) {
  text_.append("# HELP ").append(name).append(" ").append(help).append("\n");
  text_.append("# TYPE ").append(name).append(" ").append(type).append("\n");
}

void PrometheusText::Sample(std::string_view name, double value, std::string_view labels) {
  text_.append(name);
  if (!labels.empty()) text_.append("{").append(labels).append("}");
  text_.append(" ").append(PrometheusNumber(value)).append("\n");
}

void PrometheusText::AddHistogram(std::string_view name, std::string_view help,
                                  const Histogram& h) {
  Family(name, "histogram", help);
  const std::string bucket = std::string(name) + "_bucket";
  int64_t cumulative = 0;
  for (size_t i = 0; i < h.counts().size(); ++i) {
    cumulative += h.counts()[i];
    const double le = i < h.bounds().size() ? h.bounds()[i] : INFINITY;
    Sample(bucket, static_cast<double>(cumulative), Label("le", PrometheusNumber(le)));
  }
  Sample(std::string(name) + "_sum", h.sum());
  Sample(std::string(name) + "_count", static_cast<double>(h.count()));
}

std::string PrometheusText::Label(std::string_view key, std::string_view value) {
  std::string out(key);
  out += "=\"";
  for (char c : value) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  out += '"';
  return out;
}

}  // namespace moemesh
