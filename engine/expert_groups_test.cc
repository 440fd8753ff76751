#include "engine/expert_groups.h"

#include <algorithm>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace moemesh {
namespace {

// 3 rows, k = 2, 4 experts; expert 1 unused, row 2's second slot empty (-1).
TEST(ExpertGroupsTest, GroupsAscendByExpertAndKeepRowOrder) {
  const int32_t ids[] = {2, 0,   //
                         0, 3,   //
                         2, -1};
  ExpertGroups g;
  GroupByExpert(ids, 3, 2, 4, &g);
  EXPECT_EQ(g.experts, (std::vector<int32_t>{0, 2, 3}));
  EXPECT_EQ(g.begin, (std::vector<int32_t>{0, 2, 4, 5}));
  EXPECT_EQ(g.assignment, (std::vector<int32_t>{1, 2, 0, 4, 3}));
  EXPECT_EQ(g.groups(), 3);
  EXPECT_EQ(g.rows(), 5);
  std::vector<int32_t> rows;
  for (int32_t i = 0; i < g.rows(); ++i) rows.push_back(g.row(i, 2));
  EXPECT_EQ(rows, (std::vector<int32_t>{0, 1, 0, 2, 1}));
  EXPECT_EQ(g.where, (std::vector<int32_t>{2, 0, 1, 4, 3, -1}));
  // Every grouped row points back at its assignment.
  for (int32_t a = 0; a < 6; ++a) {
    if (g.where[a] >= 0) {
      EXPECT_EQ(g.assignment[g.where[a]], a);
    }
  }
}

TEST(ExpertGroupsTest, ReusedStorageAndEmptyRouting) {
  ExpertGroups g;
  const int32_t many[] = {1, 1, 1, 1};
  GroupByExpert(many, 4, 1, 2, &g);
  EXPECT_EQ(g.rows(), 4);
  const int32_t none[] = {-1, -1};
  GroupByExpert(none, 2, 1, 2, &g);
  EXPECT_EQ(g.groups(), 0);
  EXPECT_EQ(g.rows(), 0);
  EXPECT_TRUE(g.assignment.empty());
  EXPECT_EQ(g.where, (std::vector<int32_t>{-1, -1}));
}

TEST(PadGroupsTest, BucketsBySizeAndPadsToTheBucket) {
  // Rows per group: 300, 260, 10, 260, 0.
  const PaddedBuckets p = PadGroups({0, 300, 560, 570, 830, 830}, 8, 0.8);
  EXPECT_EQ(p.order, (std::vector<int32_t>{0, 1, 3, 2, 4}));
  EXPECT_EQ(p.bucket_rows, (std::vector<int32_t>{304, 16, 8}));
  EXPECT_EQ(p.bucket_begin, (std::vector<int32_t>{0, 3, 4, 5}));
  EXPECT_EQ(p.dst_begin, (std::vector<int32_t>{0, 304, 608, 624, 928, 936}));
  EXPECT_EQ(p.padded_rows(), 936);
  EXPECT_EQ(PadGroups({0}).padded_rows(), 0);
  EXPECT_EQ(PadGroups({}).buckets(), 0);
}

TEST(PadGroupsTest, EveryGroupFitsItsBucketWithBoundedPadding) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    const int32_t G = 1 + rng() % 130;
    const bool skewed = trial % 2 == 1;
    std::vector<int32_t> begin = {0};
    for (int32_t g = 0; g < G; ++g) {
      const int32_t r = skewed ? (rng() % 4 == 0 ? 1000 + rng() % 3000 : 1 + rng() % 40)
                               : 200 + rng() % 120;
      begin.push_back(begin.back() + r);
    }
    const PaddedBuckets p = PadGroups(begin, 8, 0.8);
    ASSERT_EQ(p.bucket_begin.front(), 0);
    ASSERT_EQ(p.bucket_begin.back(), G);
    ASSERT_EQ(static_cast<int32_t>(p.bucket_begin.size()), p.buckets() + 1);
    std::vector<int32_t> seen(G, 0);
    for (int32_t b = 0; b < p.buckets(); ++b) {
      EXPECT_EQ(p.bucket_rows[b] % 8, 0);
      if (b > 0) EXPECT_LT(p.bucket_rows[b], p.bucket_rows[b - 1]);
      for (int32_t j = p.bucket_begin[b]; j < p.bucket_begin[b + 1]; ++j) {
        const int32_t g = p.order[j], rows = begin[g + 1] - begin[g];
        ++seen[g];
        EXPECT_EQ(p.dst_begin[g + 1] - p.dst_begin[g], p.bucket_rows[b]);
        EXPECT_LE(rows, p.bucket_rows[b]);
        // Padding: under the alignment, or the rows fill at least 80% of the padded rows; the
        // bucket's first (largest) group always pads by less than the alignment.
        EXPECT_TRUE(p.bucket_rows[b] - rows < 8 || rows >= 0.8 * p.bucket_rows[b])
            << rows << " rows padded to " << p.bucket_rows[b];
        if (j == p.bucket_begin[b]) EXPECT_LT(p.bucket_rows[b] - std::max(rows, 1), 8);
      }
    }
    EXPECT_EQ(seen, std::vector<int32_t>(G, 1));
    if (!skewed) EXPECT_LE(p.buckets(), 3) << "uniform sizes in [200, 320) need few buckets";
  }
}

TEST(PadGroupsTest, BySlotPadsEveryGroupToTheLargestAtItsSlot) {
  // Rows per group: 30, 17, 0, 25 at slots 2, 3, 5, 6 (slot 4 has no group).
  const std::optional<PaddedBuckets> p = PadGroupsBySlot({0, 30, 47, 47, 72}, {2, 3, 5, 6}, 8);
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->bucket_rows, (std::vector<int32_t>{32}));
  EXPECT_EQ(p->bucket_begin, (std::vector<int32_t>{0, 4}));
  EXPECT_EQ(p->order, (std::vector<int32_t>{0, 1, 2, 3}));
  // Slot s's block starts at (s - 2) * 32; slot 4's block is padding.
  EXPECT_EQ(p->dst_begin, (std::vector<int32_t>{0, 32, 96, 128, 160}));
  EXPECT_EQ(p->padded_rows(), 5 * 32);
  // Every group fits its block.
  const std::vector<int32_t> begin = {0, 30, 47, 47, 72};
  for (int g = 0; g < 4; ++g) {
    EXPECT_LE(begin[g + 1] - begin[g], p->dst_begin[g + 1] - p->dst_begin[g]);
  }
  // Slots that do not strictly ascend, or a slot list of another length: no such layout.
  EXPECT_FALSE(PadGroupsBySlot({0, 4, 8}, {3, 3}).has_value());
  EXPECT_FALSE(PadGroupsBySlot({0, 4, 8}, {3, 1}).has_value());
  EXPECT_FALSE(PadGroupsBySlot({0, 4, 8}, {3}).has_value());
  EXPECT_EQ(PadGroupsBySlot({0, 3}, {7})->padded_rows(), 8);
  EXPECT_EQ(PadGroupsBySlot({0}, {})->padded_rows(), 0);
}

TEST(PadGroupsTest, ToBlocksPadsEachGroupToWholeBlocks) {
  // Rows per group: 130, 0, 64, 1.
  const PaddedBuckets p = PadGroupsToBlocks({0, 130, 130, 194, 195}, 64);
  EXPECT_EQ(p.dst_begin, (std::vector<int32_t>{0, 192, 192, 256, 320}));
  EXPECT_EQ(p.bucket_rows, (std::vector<int32_t>{64}));
  EXPECT_EQ(p.bucket_begin, (std::vector<int32_t>{0, 4}));
  EXPECT_EQ(p.order, (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(PadGroupsToBlocks({0}, 64).padded_rows(), 0);
}

}  // namespace
}  // namespace moemesh
