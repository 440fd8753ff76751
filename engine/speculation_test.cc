#include "engine/speculation.h"

#include <vector>

#include "gtest/gtest.h"

namespace moemesh {
namespace {

using V = std::vector<int32_t>;

TEST(LookupDraftTest, ProposesWhatFollowedTheLatestLongestMatch) {
  // "1 2 3" occurred at 0 (followed by 4 5 6) and at 6 (followed by 9): the latest wins.
  EXPECT_EQ(LookupDraft({1, 2, 3, 4, 5, 6, 1, 2, 3, 9, 7, 1, 2, 3}, 3, 1, 4), V({9, 7, 1, 2}));
  // A longer match beats a later shorter one: "8 1 2" only at 0.
  EXPECT_EQ(LookupDraft({8, 1, 2, 5, 1, 2, 6, 8, 1, 2}, 3, 1, 2), V({5, 1}));
  EXPECT_EQ(LookupDraft({8, 1, 2, 5, 1, 2, 6, 8, 1, 2}, 2, 1, 2), V({6, 8}));
  // Drafts stop at the end of the history.
  EXPECT_EQ(LookupDraft({4, 5, 4}, 3, 1, 5), V({5, 4}));
  // Repeating one token proposes more of it: the latest occurrence followed by a whole draft,
  // else the one followed by the most.
  EXPECT_EQ(LookupDraft({7, 7, 7, 7}, 3, 1, 3), V({7}));
  EXPECT_EQ(LookupDraft({1, 7, 7, 7, 7, 7, 7}, 2, 1, 3), V({7, 7, 7}));
  EXPECT_EQ(LookupDraft({1, 7, 7, 7, 7, 7, 7}, 2, 1, 8), V({7, 7, 7, 7}));
}

TEST(LookupDraftTest, NothingWithoutAMatch) {
  EXPECT_TRUE(LookupDraft({1, 2, 3, 4}, 3, 1, 4).empty());
  EXPECT_TRUE(LookupDraft({}, 3, 1, 4).empty());
  EXPECT_TRUE(LookupDraft({5}, 3, 1, 4).empty());
  EXPECT_TRUE(LookupDraft({1, 2, 1, 2}, 3, 1, 0).empty());  // no drafts asked
  // min_ngram 2: a single repeated token is not enough.
  EXPECT_TRUE(LookupDraft({3, 9, 4, 9}, 3, 2, 4).empty());
  EXPECT_EQ(LookupDraft({3, 9, 4, 9}, 3, 1, 4), V({4, 9}));
}

}  // namespace
}  // namespace moemesh
