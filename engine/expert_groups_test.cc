#include "engine/expert_groups.h"

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

}  // namespace
}  // namespace moemesh
