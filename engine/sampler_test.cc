#include "engine/sampler.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace moemesh {
namespace {

TEST(SamplerTest, GreedyTakesFirstMaximum) {
  std::vector<float> l = {0.5f, 2.0f, -1.0f, 2.0f};
  Sampler s(SamplingConfig{});
  EXPECT_EQ(s.Sample(l.data(), 4, {}, {}).id, 1);
}

TEST(SamplerTest, SampledFrequenciesFollowSoftmax) {
  SamplingConfig c;
  c.temperature = 1.0f;
  c.seed = 7;
  Sampler s(c);
  int ones = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    std::vector<float> l = {std::log(0.25f), std::log(0.75f)};
    ones += s.Sample(l.data(), 2, {}, {}).id == 1;
  }
  EXPECT_NEAR(static_cast<double>(ones) / n, 0.75, 0.015);
}

TEST(SamplerTest, SameSeedSameTokensDifferentSeedDiffers) {
  auto run = [](uint64_t seed) {
    SamplingConfig c;
    c.temperature = 1.0f;
    c.seed = seed;
    Sampler s(c);
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) {
      std::vector<float> l(50);
      for (int v = 0; v < 50; ++v) l[v] = std::sin(0.37f * v);
      out.push_back(s.Sample(l.data(), 50, {}, out).id);
    }
    return out;
  };
  EXPECT_EQ(run(3), run(3));
  EXPECT_NE(run(3), run(4));
}

TEST(SamplerTest, TopKOneAndTinyTopPAreGreedy) {
  for (int mode = 0; mode < 2; ++mode) {
    SamplingConfig c;
    c.temperature = 5.0f;
    c.seed = 1;
    if (mode == 0) c.top_k = 1; else c.top_p = 1e-6f;
    Sampler s(c);
    for (int i = 0; i < 100; ++i) {
      std::vector<float> l = {0.1f, 0.3f, 0.2f, 0.29f};
      EXPECT_EQ(s.Sample(l.data(), 4, {}, {}).id, 1);
    }
  }
}

TEST(SamplerTest, MinPDropsUnlikelyTokens) {
  SamplingConfig c;
  c.temperature = 1.0f;
  c.min_p = 0.5f;  // keep tokens with p >= 0.5 * p_max
  c.seed = 11;
  Sampler s(c);
  for (int i = 0; i < 500; ++i) {
    std::vector<float> l = {std::log(0.6f), std::log(0.35f), std::log(0.05f)};
    EXPECT_NE(s.Sample(l.data(), 3, {}, {}).id, 2);
  }
}

TEST(SamplerTest, PenaltiesFollowTheirDefinitions) {
  SamplingConfig c;
  c.repetition_penalty = 2.0f;
  Sampler s(c);
  std::vector<float> l = {4.0f, -1.0f, 3.0f};
  s.Sample(l.data(), 3, {0}, {1});
  EXPECT_FLOAT_EQ(l[0], 2.0f);   // positive: divided
  EXPECT_FLOAT_EQ(l[1], -2.0f);  // negative: multiplied
  EXPECT_FLOAT_EQ(l[2], 3.0f);

  SamplingConfig f;
  f.presence_penalty = 0.5f;
  f.frequency_penalty = 0.25f;
  Sampler t(f);
  std::vector<float> m = {1.0f, 1.0f, 1.0f};
  t.Sample(m.data(), 3, {2}, {0, 0, 1});
  EXPECT_FLOAT_EQ(m[0], 1.0f - 0.5f - 0.5f);
  EXPECT_FLOAT_EQ(m[1], 1.0f - 0.5f - 0.25f);
  EXPECT_FLOAT_EQ(m[2], 1.0f);  // prompt tokens do not count for presence/frequency
}

TEST(SamplerTest, LogprobsAreNormalisedAndSorted) {
  SamplingConfig c;
  c.logprobs = 2;
  Sampler s(c);
  std::vector<float> l = {0.0f, 1.0f, 2.0f};
  TokenChoice t = s.Sample(l.data(), 3, {}, {});
  ASSERT_EQ(t.top.size(), 2u);
  EXPECT_EQ(t.top[0].first, 2);
  EXPECT_EQ(t.top[1].first, 1);
  const double z = std::log(std::exp(0.0) + std::exp(1.0) + std::exp(2.0));
  EXPECT_NEAR(t.logprob, 2.0 - z, 1e-6);
  EXPECT_NEAR(t.top[1].second, 1.0 - z, 1e-6);
}

TEST(SamplerTest, ValidateNamesTheField) {
  SamplingConfig c;
  c.top_p = 0.0f;
  EXPECT_NE(c.Validate().message().find("top_p"), std::string::npos);
  c = SamplingConfig{};
  c.temperature = -1.0f;
  EXPECT_NE(c.Validate().message().find("temperature"), std::string::npos);
  c = SamplingConfig{};
  c.logprobs = 21;
  EXPECT_EQ(c.Validate().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(SamplingConfig{}.Validate().ok());
}

}  // namespace
}  // namespace moemesh
