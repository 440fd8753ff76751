#include "router/metrics.h"

#include <cmath>
#include <cstdlib>
#include <string>

#include <gtest/gtest.h>

namespace moemesh {
namespace {

TEST(HistogramTest, BucketsCountValuesUpToAndIncludingTheirBound) {
  Histogram h({1, 2, 5});
  for (double v : {0.5, 1.0, 1.5, 2.0, 2.0001, 5.0, 7.0, 100.0}) h.Observe(v);
  ASSERT_EQ(h.counts().size(), 4u);
  EXPECT_EQ(h.counts()[0], 2);  // 0.5, 1
  EXPECT_EQ(h.counts()[1], 2);  // 1.5, 2
  EXPECT_EQ(h.counts()[2], 2);  // 2.0001, 5
  EXPECT_EQ(h.counts()[3], 2);  // 7, 100 (+Inf)
  EXPECT_EQ(h.count(), 8);
  EXPECT_DOUBLE_EQ(h.sum(), 0.5 + 1 + 1.5 + 2 + 2.0001 + 5 + 7 + 100);
}

TEST(HistogramTest, RouterBoundsAscend) {
  for (const auto& b : {Histogram::LatencySeconds(), Histogram::TokenGapSeconds(),
                        Histogram::TokenCounts()}) {
    ASSERT_FALSE(b.empty());
    for (size_t i = 1; i < b.size(); ++i) EXPECT_LT(b[i - 1], b[i]);
  }
  const auto counts = Histogram::TokenCounts();
  EXPECT_EQ(counts.front(), 1);
  EXPECT_EQ(counts.back(), 100000);
  EXPECT_EQ(counts.size(), 16u);  // 1 2 5 per decade, 1e0..1e4, then 1e5
}

TEST(PrometheusNumberTest, IntegersSpecialValuesAndRoundTrip) {
  EXPECT_EQ(PrometheusNumber(0), "0");
  EXPECT_EQ(PrometheusNumber(42), "42");
  EXPECT_EQ(PrometheusNumber(-7), "-7");
  EXPECT_EQ(PrometheusNumber(123456789012), "123456789012");
  EXPECT_EQ(PrometheusNumber(INFINITY), "+Inf");
  EXPECT_EQ(PrometheusNumber(-INFINITY), "-Inf");
  EXPECT_EQ(PrometheusNumber(NAN), "NaN");
  EXPECT_EQ(PrometheusNumber(0.1), "0.1");
  EXPECT_EQ(PrometheusNumber(0.00025), "0.00025");
  EXPECT_EQ(PrometheusNumber(2.5), "2.5");
  for (double v : {0.1 + 0.2, 1.0 / 3, 6.02214076e23, 1e-300, 123.456}) {
    const std::string s = PrometheusNumber(v);
    EXPECT_EQ(std::strtod(s.c_str(), nullptr), v) << s;
  }
}

TEST(PrometheusTextTest, LabelEscapesBackslashQuoteAndNewline) {
  EXPECT_EQ(PrometheusText::Label("worker", "0"), "worker=\"0\"");
  EXPECT_EQ(PrometheusText::Label("path", "a\\b\"c\nd"), "path=\"a\\\\b\\\"c\\nd\"");
}

TEST(PrometheusTextTest, FamiliesAndSamples) {
  PrometheusText p;
  p.Family("x_total", "counter", "Things.");
  p.Sample("x_total", 3);
  p.Sample("x_total", 4, PrometheusText::Label("kind", "a"));
  EXPECT_EQ(p.text(),
            "# HELP x_total Things.\n"
            "# TYPE x_total counter\n"
            "x_total 3\n"
            "x_total{kind=\"a\"} 4\n");
}

TEST(PrometheusTextTest, HistogramBucketsAreCumulativeAndEndWithInf) {
  Histogram h({0.1, 1});
  for (double v : {0.05, 0.1, 0.5, 3.0, 4.0}) h.Observe(v);
  PrometheusText p;
  p.AddHistogram("lat_seconds", "Latency.", h);
  EXPECT_EQ(p.text(),
            "# HELP lat_seconds Latency.\n"
            "# TYPE lat_seconds histogram\n"
            "lat_seconds_bucket{le=\"0.1\"} 2\n"
            "lat_seconds_bucket{le=\"1\"} 3\n"
            "lat_seconds_bucket{le=\"+Inf\"} 5\n"
            "lat_seconds_sum 7.65\n"
            "lat_seconds_count 5\n");
}

}  // namespace
}  // namespace moemesh
