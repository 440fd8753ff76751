#include "tools/bench_stats.h"

#include <vector>

#include "engine/config.h"
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

ModelConfig Config(const std::string& dir) {
  auto c = ModelConfig::FromFile(dir + "/config.json");
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : ModelConfig();
}

TEST(DecodeBytesTest, PackedBytesPerWeight) {
  EXPECT_EQ(PackedBytesPerWeight(true, DType::kF32), 2);
  EXPECT_EQ(PackedBytesPerWeight(true, DType::kBF16), 2);
  EXPECT_EQ(PackedBytesPerWeight(false, DType::kBF16), 2);  // widened inside the kernels
  EXPECT_EQ(PackedBytesPerWeight(false, DType::kF32), 4);
  EXPECT_EQ(PackedBytesPerWeight(false, DType::kF16), 4);
}

// The embedded model by hand: hidden 256, 8 heads and 4 KV heads of 32, 6 layers, 16 experts of
// width 192 (4 active), vocabulary 8192, tied embeddings, bf16 (2 bytes everywhere).
TEST(DecodeBytesTest, EmbeddedModelByHand) {
  const ModelConfig cfg = Config("models/pydoc-moe-17m");
  const DecodeBytes d = DecodeWeightBytes(cfg, cfg.num_experts_per_tok, WeightElementBytes{});
  EXPECT_EQ(d.attention, 6 * (256 * 256 + 128 * 256 + 128 * 256 + 256 * 256) * 2);  // 2,359,296
  EXPECT_EQ(d.router, 6 * 16 * 256 * 2);                                         // 49,152
  EXPECT_EQ(d.experts, 6 * 4 * 3 * 192 * 256 * 2);                               // 7,077,888
  EXPECT_EQ(d.dense_mlp, 0);
  EXPECT_EQ(d.lm_head, 8192 * 256 * 2);                                          // 4,194,304
  EXPECT_EQ(d.embedding, 256 * 2);
  EXPECT_EQ(d.total(), 13681152);
  // int8 experts: one byte a weight there, the rest unchanged.
  WeightElementBytes int8_experts;
  int8_experts.expert = 1;
  EXPECT_EQ(DecodeWeightBytes(cfg, cfg.num_experts_per_tok, int8_experts).total(),
            13681152 - 7077888 / 2);
  // One active expert instead of four: 3/4 of the expert bytes fewer.
  EXPECT_EQ(DecodeWeightBytes(cfg, 1, WeightElementBytes{}).total(), 13681152 - 7077888 / 4 * 3);
  // Layer 0 dense (mlp_only_layers): no router, no experts, a 768-wide MLP instead.
  ModelConfig dense0 = cfg;
  dense0.mlp_only_layers = {0};
  const DecodeBytes e = DecodeWeightBytes(dense0, 4, WeightElementBytes{});
  EXPECT_EQ(e.router, 5 * 16 * 256 * 2);
  EXPECT_EQ(e.experts, 5 * 4 * 3 * 192 * 256 * 2);
  EXPECT_EQ(e.dense_mlp, 3 * 768 * 256 * 2);
  EXPECT_EQ(e.total(), 13681152 - 8192 - 1179648 + 1179648);
}

// qwen2_moe (oracle, fp32 checkpoint, bf16 compute): shared expert and its gate; the router and
// the embedding table stay fp32.
TEST(DecodeBytesTest, SharedExpertAndElementSizes) {
  const ModelConfig cfg = Config("testdata/oracle/qwen2_moe");
  WeightElementBytes b;
  b.matrix = PackedBytesPerWeight(true, cfg.dtype);
  b.router = PackedBytesPerWeight(false, cfg.dtype);
  b.embedding = 4;
  EXPECT_EQ(b.matrix, 2);
  EXPECT_EQ(b.router, 4);
  const DecodeBytes d = DecodeWeightBytes(cfg, 4, b);
  EXPECT_EQ(d.attention, 2 * 4 * 64 * 64 * 2);
  EXPECT_EQ(d.router, 2 * 8 * 64 * 4);
  EXPECT_EQ(d.experts, 2 * 4 * 3 * 32 * 64 * 2);
  EXPECT_EQ(d.dense_mlp, 2 * (3 * 96 * 64 * 2 + 64 * 4));
  EXPECT_EQ(d.lm_head, 1000 * 64 * 2);
  EXPECT_EQ(d.embedding, 64 * 4);
  EXPECT_EQ(d.total(), 370432);
}

// Qwen3-30B-A3B cut to 4 layers (the CPU benchmark in docs/BENCHMARKS.md): 1.08 GB per token,
// 58% of it the LM head.
TEST(DecodeBytesTest, Qwen3_30B_A3B_FourLayers) {
  ModelConfig cfg = Config("models/configs/qwen3-30b-a3b");
  cfg.num_hidden_layers = 4;
  const DecodeBytes d = DecodeWeightBytes(cfg, 8, WeightElementBytes{});
  EXPECT_EQ(d.attention, 4 * (4096 + 512 + 512 + 4096) * 2048 * 2);  // 150,994,944
  EXPECT_EQ(d.router, 4 * 128 * 2048 * 2);
  EXPECT_EQ(d.experts, 4 * 8 * 3 * 768 * 2048 * 2);                 // 301,989,888
  EXPECT_EQ(d.lm_head, 151936LL * 2048 * 2);                        // 622,329,856
  EXPECT_EQ(d.total(), 1077415936);
}

TEST(DecodeBytesTest, BandwidthBound) {
  EXPECT_DOUBLE_EQ(BandwidthBoundTokensPerSecond(50.0, 1000000000), 50.0);
  EXPECT_DOUBLE_EQ(BandwidthBoundTokensPerSecond(40.0, 1077415936), 40e9 / 1077415936.0);
  EXPECT_EQ(BandwidthBoundTokensPerSecond(0.0, 100), 0.0);
  EXPECT_EQ(BandwidthBoundTokensPerSecond(10.0, 0), 0.0);
}

}  // namespace
}  // namespace moemesh
