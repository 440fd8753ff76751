#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
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

// A large vocabulary (the sampler selects and sorts only the candidates a filter needs, growing
// the selection): every sampled token lies in the set a full sort of the vocabulary keeps.
TEST(SamplerTest, LargeVocabularyFiltersMatchAFullSort) {
  const int64_t V = 50000;
  std::mt19937 g(7);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<float> base(V);
  for (float& x : base) x = u(g);
  struct Case {
    int32_t top_k;
    float top_p, min_p;
  };
  for (const Case& c : {Case{0, 0.9f, 0.0f}, Case{0, 1.0f, 0.3f}, Case{6000, 0.95f, 0.0f},
                        Case{0, 0.02f, 0.0f}}) {
    SamplingConfig cfg;
    cfg.temperature = 1.3f;
    cfg.top_k = c.top_k;
    cfg.top_p = c.top_p;
    cfg.min_p = c.min_p;
    cfg.seed = 11;
    // The kept set, by the definition: sort everything, keep top_k, normalise, min-p, top-p.
    std::vector<int32_t> order(V);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return base[a] > base[b] || (base[a] == base[b] && a < b);
    });
    const int64_t keep = c.top_k > 0 ? c.top_k : V;
    std::vector<double> p(keep);
    double sum = 0;
    for (int64_t i = 0; i < keep; ++i) sum += p[i] = std::exp((base[order[i]] - base[order[0]]) / 1.3);
    int64_t n = keep;
    while (n > 1 && p[n - 1] / sum < c.min_p * p[0] / sum) --n;
    double cum = 0;
    for (int64_t i = 0; i < n; ++i) {
      cum += p[i] / sum;
      if (cum >= c.top_p) {
        n = i + 1;
        break;
      }
    }
    std::set<int32_t> kept(order.begin(), order.begin() + n);
    ASSERT_LT(static_cast<int64_t>(kept.size()), V);  // the filter removes something
    Sampler s(cfg);
    std::set<int32_t> seen;
    for (int i = 0; i < 300; ++i) {
      std::vector<float> l = base;
      const int32_t id = s.Sample(l.data(), V, {}, {}).id;
      EXPECT_TRUE(kept.count(id)) << "top_k " << c.top_k << " top_p " << c.top_p << " min_p "
                                  << c.min_p << ": token " << id << " is filtered out";
      seen.insert(id);
    }
    // Not stuck on one candidate when many are kept.
    if (kept.size() > 1000) EXPECT_GT(seen.size(), 200u);
  }
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
