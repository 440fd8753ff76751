// Latency and size histograms, and Prometheus' text exposition format (version 0.0.4), for the
// router's GET /metrics.
#ifndef MOEMESH_ROUTER_METRICS_H_
#define MOEMESH_ROUTER_METRICS_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moemesh {

// A histogram with fixed upper bounds (ascending; a +Inf bucket follows the last). As
// Prometheus' `le`, a bucket counts values <= its bound. Thread-compatible.
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void Observe(double value);
  const std::vector<double>& bounds() const { return bounds_; }
  // Per bucket (not cumulative): bounds().size() + 1 entries, the last for +Inf.
  const std::vector<int64_t>& counts() const { return counts_; }
  int64_t count() const { return count_; }
  double sum() const { return sum_; }

  // Bounds in use by the router.
  static std::vector<double> LatencySeconds();      // time to first token, end to end, queue
  static std::vector<double> TokenGapSeconds();     // between two tokens of one request
  static std::vector<double> TokenCounts();         // 1, 2, 5, 10, 20, 50, ... 100000

 private:
  std::vector<double> bounds_;
  std::vector<int64_t> counts_;
  int64_t count_ = 0;
  double sum_ = 0;
};

// Builds an exposition: each family's # HELP and # TYPE lines, then its samples.
class PrometheusText {
 public:
  // A family of one sample per label set; `labels` as `name="value",...` (values escaped by
  // the caller with Label()), or empty.
  void Family(std::string_view name, std::string_view type, std::string_view help);
  void Sample(std::string_view name, double value, std::string_view labels = {});
  // A whole histogram family: name_bucket{le=...} (cumulative), name_sum, name_count.
  void AddHistogram(std::string_view name, std::string_view help, const Histogram& h);
  // `key="value"` with the value escaped (backslash, quote, newline).
  static std::string Label(std::string_view key, std::string_view value);
  const std::string& text() const { return text_; }

 private:
  std::string text_;
};

// A number as the format writes it: integers without a decimal point, +Inf/-Inf/NaN by name,
// others with up to 17 significant digits (so that the value reads back exactly).
std::string PrometheusNumber(double v);

}  // namespace moemesh

#endif  // MOEMESH_ROUTER_METRICS_H_
