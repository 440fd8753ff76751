#include "engine/kv_cache.h"

#include "gtest/gtest.h"

namespace moemesh {
namespace {

TEST(KvCacheTest, ReservesWithinCapacityAndFreesAtOnce) {
  KvCache c(/*num_layers=*/2, /*kv_dim=*/8, /*capacity_tokens=*/200);
  ASSERT_TRUE(c.Reserve(1, 10).ok());
  EXPECT_EQ(c.used_tokens(), 64);  // one block
  c.K(1, 1)[9 * 8 + 7] = 3.5f;
  ASSERT_TRUE(c.Reserve(1, 70).ok());  // grows, keeps contents
  EXPECT_EQ(c.K(1, 1)[9 * 8 + 7], 3.5f);
  EXPECT_EQ(c.used_tokens(), 128);
  ASSERT_TRUE(c.Reserve(2, 60).ok());
  EXPECT_EQ(c.used_tokens(), 192);
  absl::Status full = c.Reserve(3, 20);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(c.Has(3));
  ASSERT_TRUE(c.Reserve(3, 8).ok());  // an exact reservation still fits
  EXPECT_EQ(c.used_tokens(), 200);
  c.Free(1);
  EXPECT_EQ(c.used_tokens(), 72);
  EXPECT_FALSE(c.Has(1));
  EXPECT_EQ(c.num_sequences(), 2);
}

}  // namespace
}  // namespace moemesh
