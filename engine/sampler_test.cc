#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <memory>
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

// ScoreToken: any token's log-softmax (not the best one's), the top entries best first with ties
// by lowest id, no top entries when none are asked.
TEST(SamplerTest, ScoreTokenIsTheLogSoftmaxOfTheRawRow) {
  std::vector<float> l = {1.0f, 3.0f, 0.5f, 3.0f};
  const double z = std::log(std::exp(1.0) + 2 * std::exp(3.0) + std::exp(0.5));
  TokenChoice t = ScoreToken(l.data(), 4, 2, 3);
  EXPECT_EQ(t.id, 2);
  EXPECT_NEAR(t.logprob, 0.5 - z, 1e-6);
  ASSERT_EQ(t.top.size(), 3u);
  EXPECT_EQ(t.top[0].first, 1);
  EXPECT_EQ(t.top[1].first, 3);
  EXPECT_EQ(t.top[2].first, 0);
  EXPECT_NEAR(t.top[2].second, 1.0 - z, 1e-6);
  EXPECT_TRUE(ScoreToken(l.data(), 4, 0, 0).top.empty());
  SamplingConfig c;
  c.prompt_logprobs = 21;
  EXPECT_NE(c.Validate().message().find("prompt_logprobs"), std::string::npos);
  c.prompt_logprobs = 0;
  EXPECT_TRUE(c.Validate().ok());
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
  c = SamplingConfig{};
  c.thinking_budget = 4;  // no marker ids
  EXPECT_NE(c.Validate().message().find("thinking_budget"), std::string::npos);
  c.think_start_id = 6;
  c.think_end_id = 7;
  EXPECT_TRUE(c.Validate().ok());
  c.thinking_budget = -2;
  EXPECT_NE(c.Validate().message().find("thinking_budget"), std::string::npos);
}

TEST(SamplerTest, LogitBiasIsAddedBeforeTheDraw) {
  // Greedy: +1.6 lifts token 0 (0.5) over token 1 (2.0); -100 removes the best.
  SamplingConfig c;
  c.logit_bias = {{0, 1.6f}};
  std::vector<float> l = {0.5f, 2.0f, -1.0f};
  EXPECT_EQ(Sampler(c).Sample(l.data(), 3, {}, {}).id, 0);
  c.logit_bias = {{1, -100.0f}};
  l = {0.5f, 2.0f, -1.0f};
  EXPECT_EQ(Sampler(c).Sample(l.data(), 3, {}, {}).id, 0);
  // Sampled: frequencies follow the biased softmax, and logprobs include the bias:
  // logits log(0.25), log(0.75) + log(1/3) give 1/2 each.
  c = SamplingConfig{};
  c.temperature = 1.0f;
  c.seed = 3;
  c.logprobs = 1;
  c.logit_bias = {{1, std::log(1.0f / 3)}, {7, 5.0f}};  // an id past the vocabulary: ignored
  Sampler s(c);
  int ones = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    std::vector<float> row = {std::log(0.25f), std::log(0.75f)};
    const TokenChoice t = s.Sample(row.data(), 2, {}, {});
    ones += t.id == 1;
    ASSERT_NEAR(t.logprob, std::log(0.5f), 1e-5);
  }
  EXPECT_NEAR(static_cast<double>(ones) / n, 0.5, 0.015);
  // Range.
  c = SamplingConfig{};
  c.logit_bias = {{2, 100.5f}};
  EXPECT_NE(c.Validate().message().find("logit_bias"), std::string::npos);
  c.logit_bias = {{-1, 1.0f}};
  EXPECT_NE(c.Validate().message().find("logit_bias"), std::string::npos);
  c.logit_bias = {{2, -100.0f}};
  EXPECT_TRUE(c.Validate().ok());
}

TEST(SamplerTest, MinTokensHoldsBackTheEndTokens) {
  // Token 3 (an end token) is the best at every step; 2 is the best after it.
  SamplingConfig c;
  c.min_tokens = 3;
  c.end_ids = {3, 9};
  Sampler s(c);
  std::vector<int32_t> out;
  for (int i = 0; i < 5; ++i) {
    std::vector<float> l = {0.0f, 0.5f, 1.0f, 4.0f};
    out.push_back(s.Sample(l.data(), 4, {5, 5}, out).id);
  }
  EXPECT_EQ(out, std::vector<int32_t>({2, 2, 2, 3, 3}));  // the prompt does not count
  c.min_tokens = -1;
  EXPECT_NE(c.Validate().message().find("min_tokens"), std::string::npos);
}

// Greedy decoding over 8 tokens whose logits favour `want[i]` at step i (the last entry after);
// markers 6 (start) and 7 (end). Returns the generated ids.
std::vector<int32_t> DecodeWithBudget(const std::vector<int32_t>& prompt,
                                      const std::vector<int32_t>& want, int32_t budget, int n) {
  SamplingConfig c;
  c.thinking_budget = budget;
  c.think_start_id = 6;
  c.think_end_id = 7;
  Sampler s(c);
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) {
    std::vector<float> l(8, 0.0f);
    l[want[std::min<size_t>(i, want.size() - 1)]] = 5.0f;
    out.push_back(s.Sample(l.data(), 8, prompt, out).id);
  }
  return out;
}

TEST(SamplerTest, ThinkingBudgetClosesAfterBudgetTokens) {
  // The prompt opens the section: three tokens, then the forced end, then the model's own.
  EXPECT_EQ(DecodeWithBudget({1, 6}, {3}, 3, 6), (std::vector<int32_t>{3, 3, 3, 7, 3, 3}));
  // Budget 0: the end at once.
  EXPECT_EQ(DecodeWithBudget({1, 6}, {3}, 0, 2), (std::vector<int32_t>{7, 3}));
  // Tokens of the prompt after the start count against the budget.
  EXPECT_EQ(DecodeWithBudget({6, 2, 2}, {3}, 3, 3), (std::vector<int32_t>{3, 7, 3}));
  // No open section: nothing is forced.
  EXPECT_EQ(DecodeWithBudget({6, 2, 7, 1}, {3}, 0, 3), (std::vector<int32_t>{3, 3, 3}));
  // Without a budget the model thinks on.
  EXPECT_EQ(DecodeWithBudget({1, 6}, {3}, -1, 5), (std::vector<int32_t>{3, 3, 3, 3, 3}));
}

TEST(SamplerTest, ThinkingBudgetCountsFromEachOpeningTheModelGenerates) {
  // The model opens (6), thinks 2, is closed; closes itself (7) before a second budget runs out;
  // opens again and is closed after 2 more.
  const std::vector<int32_t> want = {6, 3, 3, 3, 6, 4, 7, 2, 6, 5, 5, 5, 5};
  EXPECT_EQ(DecodeWithBudget({1}, want, 2, 13),
            (std::vector<int32_t>{6, 3, 3, 7, 6, 4, 7, 2, 6, 5, 5, 7, 5}));
}

TEST(SamplerTest, ForcedEndReportsItsLogprobAndDrawsNoRandomNumber) {
  SamplingConfig c;
  c.temperature = 1.0f;
  c.seed = 11;
  c.logprobs = 2;
  c.thinking_budget = 0;
  c.think_start_id = 6;
  c.think_end_id = 7;
  Sampler forced(c);
  // Token 6 (the start marker) is never drawn, so the section stays closed after the end.
  std::vector<float> l = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, -40.0f, -2.0f};
  std::vector<float> copy = l;
  const TokenChoice first = forced.Sample(copy.data(), 8, {6}, {});
  EXPECT_EQ(first.id, 7);
  double z = 0;
  for (float x : l) z += std::exp(static_cast<double>(x));
  EXPECT_NEAR(first.logprob, -2.0 - std::log(z), 1e-5);
  ASSERT_EQ(first.top.size(), 2u);
  EXPECT_EQ(first.top[0].first, 5);  // the model's own ranking, not the forced token
  // Afterwards the same random stream as a sampler that never had the forced step.
  SamplingConfig plain = c;
  plain.thinking_budget = -1;
  Sampler reference(plain);
  std::vector<int32_t> gen_a = {7}, gen_b = {7};
  for (int i = 0; i < 50; ++i) {
    std::vector<float> la = l, lb = l;
    gen_a.push_back(forced.Sample(la.data(), 8, {6}, gen_a).id);
    gen_b.push_back(reference.Sample(lb.data(), 8, {6}, gen_b).id);
  }
  EXPECT_EQ(gen_a, gen_b);
}

// Where ArgMaxSuffices says so, TakeArgMax(argmax of the raw row) is exactly Sample's choice,
// step after step (thinking budget included); wherever the row's other values matter it says no.
TEST(SamplerTest, ArgMaxSufficesExactlyWhenTheRawArgMaxIsTheDraw) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  SamplingConfig budget;
  budget.thinking_budget = 2;
  budget.think_start_id = 6;
  budget.think_end_id = 7;
  SamplingConfig min_tokens_no_end;  // min_tokens without end ids holds nothing back
  min_tokens_no_end.min_tokens = 5;
  for (const SamplingConfig& c : {SamplingConfig{}, budget, min_tokens_no_end}) {
    Sampler by_row(c), by_argmax(c);
    std::vector<int32_t> prompt = {1, 6}, gen_a, gen_b;
    for (int step = 0; step < 12; ++step) {
      ASSERT_TRUE(by_argmax.ArgMaxSuffices(static_cast<int64_t>(gen_b.size())));
      std::vector<float> row(9);
      for (float& x : row) x = u(rng);
      row[step % 9] = row[(step + 4) % 9] = 5.0f;  // a tie: the lower id wins
      const int32_t argmax = ArgMax(row.data(), 9);
      const TokenChoice a = by_row.Sample(row.data(), 9, prompt, gen_a);
      const TokenChoice b = by_argmax.TakeArgMax(argmax, 9, prompt, gen_b);
      EXPECT_EQ(a.id, b.id) << "step " << step;
      EXPECT_EQ(a.logprob, b.logprob);
      EXPECT_TRUE(b.top.empty());
      gen_a.push_back(a.id);
      gen_b.push_back(b.id);
    }
    if (c.thinking_budget == 2) {
      EXPECT_EQ(gen_b[2], 7) << "the budget forces the end after 2 tokens";
    }
  }
  // Each of these changes the draw (or what is reported) beyond the raw argmax.
  auto refuses = [](auto edit, int64_t generated) {
    SamplingConfig c;
    edit(c);
    return !Sampler(c).ArgMaxSuffices(generated);
  };
  EXPECT_TRUE(refuses([](SamplingConfig& c) { c.temperature = 0.7f; }, 0));
  EXPECT_TRUE(refuses([](SamplingConfig& c) { c.logprobs = 1; }, 0));
  EXPECT_TRUE(refuses([](SamplingConfig& c) { c.repetition_penalty = 1.1f; }, 0));
  EXPECT_TRUE(refuses([](SamplingConfig& c) { c.presence_penalty = 0.5f; }, 0));
  EXPECT_TRUE(refuses([](SamplingConfig& c) { c.frequency_penalty = -0.5f; }, 0));
  EXPECT_TRUE(refuses([](SamplingConfig& c) { c.logit_bias = {{3, 1.0f}}; }, 0));
  auto min_tokens = [](SamplingConfig& c) {
    c.min_tokens = 3;
    c.end_ids = {2};
  };
  EXPECT_TRUE(refuses(min_tokens, 2));
  EXPECT_FALSE(refuses(min_tokens, 3)) << "min_tokens reached: the end ids are free again";
  Sampler constrained{SamplingConfig{}};
  constrained.Constrain(std::make_unique<JsonConstraint>(nullptr, std::vector<int32_t>{2}));
  EXPECT_FALSE(constrained.ArgMaxSuffices(10));
}

}  // namespace
}  // namespace moemesh
