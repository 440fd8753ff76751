#include "tools/bench_stats.h"

#include <vector>

#include "gtest/gtest.h"

namespace moemesh {
namespace {

std::vector<double> OneToTen() { return {10, 3, 1, 7, 2, 9, 4, 8, 6, 5}; }  // unsorted on purpose

TEST(PercentileTest, OneToTenMatchesNumpyLinear) {
  // numpy.percentile(range(1, 11), p): rank = p/100 * 9.
  EXPECT_DOUBLE_EQ(*Percentile(OneToTen(), 50), 5.5);   // rank 4.5
  EXPECT_DOUBLE_EQ(*Percentile(OneToTen(), 90), 9.1);   // rank 8.1: 9 + 0.1
  EXPECT_DOUBLE_EQ(*Percentile(OneToTen(), 99), 9.91);  // rank 8.91
  EXPECT_DOUBLE_EQ(*Percentile(OneToTen(), 25), 3.25);  // rank 2.25
  EXPECT_DOUBLE_EQ(*Percentile(OneToTen(), 0), 1.0);
  EXPECT_DOUBLE_EQ(*Percentile(OneToTen(), 100), 10.0);
}

TEST(PercentileTest, SingleElementAndPairs) {
  EXPECT_DOUBLE_EQ(*Percentile({4.0}, 0), 4.0);
  EXPECT_DOUBLE_EQ(*Percentile({4.0}, 37), 4.0);
  EXPECT_DOUBLE_EQ(*Percentile({4.0}, 100), 4.0);
  EXPECT_DOUBLE_EQ(*Percentile({2.0, 0.0}, 75), 1.5);  // sorted {0, 2}, rank 0.75
}

TEST(PercentileTest, Errors) {
  EXPECT_FALSE(Percentile({}, 50).ok());
  EXPECT_FALSE(Percentile({1.0}, -1).ok());
  EXPECT_FALSE(Percentile({1.0}, 100.5).ok());
}

TEST(SummarizeTest, OneToTen) {
  LatencySummary s = Summarize(OneToTen());
  EXPECT_EQ(s.count, 10);
  EXPECT_DOUBLE_EQ(s.p50, 5.5);
  EXPECT_DOUBLE_EQ(s.p90, 9.1);
  EXPECT_DOUBLE_EQ(s.p99, 9.91);
  EXPECT_DOUBLE_EQ(s.mean, 5.5);
  LatencySummary e = Summarize({});
  EXPECT_EQ(e.count, 0);
  EXPECT_EQ(e.mean, 0);
}

TEST(RequestTest, TtftAndTpot) {
  RequestRecord r{/*prompt_tokens=*/10, /*output_tokens=*/5, /*start=*/1.0, /*first_token=*/1.5,
                  /*end=*/3.5};
  EXPECT_DOUBLE_EQ(Ttft(r), 0.5);
  double tpot = -1;
  ASSERT_TRUE(Tpot(r, &tpot));
  EXPECT_DOUBLE_EQ(tpot, 0.5);  // (3.5 - 1.5) / 4
}

TEST(RequestTest, TpotExcludedBelowTwoTokens) {
  double tpot = -1;
  RequestRecord one{10, 1, 0.0, 0.25, 0.25};
  EXPECT_FALSE(Tpot(one, &tpot));
  RequestRecord zero{10, 0, 0.0, 0.0, 0.1};
  EXPECT_FALSE(Tpot(zero, &tpot));
  EXPECT_EQ(tpot, -1);
}

TEST(ServingTest, SumsAndRates) {
  std::vector<RequestRecord> rs = {
      {100, 11, 0.0, 0.2, 1.2},   // ttft 0.2, tpot 1.0 / 10 = 0.1
      {50, 5, 0.5, 1.0, 2.0},     // ttft 0.5, tpot 1.0 / 4 = 0.25
      {20, 1, 1.0, 1.1, 1.1},     // ttft 0.1, no tpot
  };
  RequestRecord failed{30, 0, 0.0, 0.0, 0.3};
  failed.ok = false;
  rs.push_back(failed);
  ServingSummary s = SummarizeServing(rs, 4.0);
  EXPECT_EQ(s.requests, 3);
  EXPECT_EQ(s.errors, 1);
  EXPECT_EQ(s.prompt_tokens, 170);
  EXPECT_EQ(s.output_tokens, 17);
  EXPECT_DOUBLE_EQ(s.output_tokens_per_s, 4.25);   // 17 / 4
  EXPECT_DOUBLE_EQ(s.total_tokens_per_s, 46.75);   // 187 / 4
  EXPECT_DOUBLE_EQ(s.requests_per_s, 0.75);        // 3 / 4
  EXPECT_EQ(s.ttft.count, 3);
  EXPECT_DOUBLE_EQ(s.ttft.p50, 0.2);               // sorted {0.1, 0.2, 0.5}
  EXPECT_NEAR(s.ttft.mean, 0.8 / 3, 1e-12);
  EXPECT_NEAR(s.ttft.p90, 0.44, 1e-12);            // rank 1.8: 0.2 + 0.8 * 0.3
  EXPECT_EQ(s.tpot.count, 2);
  EXPECT_DOUBLE_EQ(s.tpot.p50, 0.175);             // mean of 0.1 and 0.25
  EXPECT_NEAR(s.tpot.p99, 0.2485, 1e-12);          // 0.1 + 0.99 * 0.15
}

TEST(ServingTest, ZeroWallTimeGivesZeroRates) {
  ServingSummary s = SummarizeServing({{1, 2, 0, 0, 0}}, 0.0);
  EXPECT_EQ(s.output_tokens_per_s, 0);
  EXPECT_EQ(s.requests_per_s, 0);
}

}  // namespace
}  // namespace moemesh
