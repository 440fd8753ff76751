#include "mesh/placement.h"

#include <cstdio>
#include <fstream>

#include "gtest/gtest.h"

namespace moemesh {
namespace {

ModelConfig Pydoc() {
  auto c = ModelConfig::FromFile("models/pydoc-moe-17m/config.json");
  EXPECT_TRUE(c.ok());
  return *c;
}

TEST(PlacementTest, EvenShareCoversEveryExpertOnce) {
  ModelConfig cfg = Pydoc();  // 6 layers x 16 experts
  for (int n : {1, 2, 3, 5}) {
    std::vector<std::set<ExpertId>> ws;
    size_t total = 0;
    for (int i = 0; i < n; ++i) {
      ws.push_back(EvenShare(cfg, i, n));
      total += ws.back().size();
    }
    EXPECT_EQ(total, 6u * 16u) << n;
    EXPECT_TRUE(CheckCoverage(ws, cfg).ok()) << n;
  }
  EXPECT_EQ(ShardSummary(EvenShare(cfg, 1, 2)), "0-5:8-15");
}

TEST(PlacementTest, ParsesSpecsAndRejectsBadOnes) {
  ModelConfig cfg = Pydoc();
  auto s = ParseShardSpec("0-1:0-3,7;5:15", cfg);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->size(), 2u * 5u + 1u);
  EXPECT_TRUE(s->count({1, 7}));
  EXPECT_TRUE(s->count({5, 15}));
  EXPECT_FALSE(s->count({2, 0}));
  EXPECT_EQ(ShardSummary(*s), "0-1:0-3,7;5:15");
  EXPECT_FALSE(ParseShardSpec("0:16", cfg).ok());
  EXPECT_FALSE(ParseShardSpec("6:0", cfg).ok());
  EXPECT_FALSE(ParseShardSpec("0-1", cfg).ok());
  EXPECT_FALSE(ParseShardSpec("3-1:0", cfg).ok());
  EXPECT_FALSE(CheckCoverage({*s}, cfg).ok());
}

TEST(PlacementTest, ReadsClusterConfigTextFormat) {
  const std::string path = ::testing::TempDir() + "/cluster.textproto";
  std::ofstream(path) << R"(
    model: "models/pydoc-moe-17m"
    router { address: "127.0.0.1:6000" }
    attention { address: "127.0.0.1:6001" }
    experts { address: "127.0.0.1:6002" shards { layers: "0-5" experts: "0-9" } }
    experts { address: "127.0.0.1:6003" shards { layers: "*" experts: "8-15" } }
    experts { address: "127.0.0.1:6004" }
  )";
  auto c = LoadClusterConfig(path);
  ASSERT_TRUE(c.ok()) << c.status();
  ModelConfig cfg = Pydoc();
  auto a = ShardsOf(*c, cfg, 0), b = ShardsOf(*c, cfg, 1), e = ShardsOf(*c, cfg, 2);
  ASSERT_TRUE(a.ok() && b.ok() && e.ok());
  EXPECT_EQ(a->size(), 60u);
  EXPECT_EQ(b->size(), 48u);
  EXPECT_EQ(*e, EvenShare(cfg, 2, 3));  // no shards: an even share
  EXPECT_TRUE(CheckCoverage({*a, *b}, cfg).ok());
  std::ofstream(path) << "router { adress: 1 }";
  auto bad = LoadClusterConfig(path);
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find(path), std::string::npos);
}

}  // namespace
}  // namespace moemesh
