#include "engine/kv_cache.h"

#include <cmath>
#include <vector>

#include "engine/dtype.h"
#include "gtest/gtest.h"

namespace moemesh {
namespace {

TEST(KvCacheTest, ReservesWithinCapacityAndFreesAtOnce) {
  KvCache c(/*num_layers=*/2, /*kv_dim=*/8, /*capacity_tokens=*/200);
  ASSERT_TRUE(c.Reserve(1, 10).ok());
  EXPECT_EQ(c.used_tokens(), 10);  // positions, not the 64 rows allocated
  EXPECT_EQ(c.Slots(1), 64);
  c.K(1, 1)[9 * 8 + 7] = 3.5f;
  ASSERT_TRUE(c.Reserve(1, 70).ok());  // grows (at least doubling), keeps contents
  EXPECT_EQ(c.K(1, 1)[9 * 8 + 7], 3.5f);
  EXPECT_EQ(c.Slots(1), 128);
  EXPECT_EQ(c.used_tokens(), 70);
  ASSERT_TRUE(c.Reserve(1, 129).ok());
  EXPECT_EQ(c.Slots(1), 256);  // doubled, not 192
  EXPECT_EQ(c.K(1, 1)[9 * 8 + 7], 3.5f);
  ASSERT_TRUE(c.Reserve(2, 60).ok());
  EXPECT_EQ(c.used_tokens(), 189);
  absl::Status full = c.Reserve(3, 12);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(c.Has(3));
  ASSERT_TRUE(c.Reserve(3, 11).ok());  // exactly what is left, whatever the rows allocated
  EXPECT_EQ(c.used_tokens(), 200);
  EXPECT_EQ(c.Reserve(2, 61).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(c.Reserve(2, 60).ok());  // already held
  c.Free(1);
  EXPECT_EQ(c.used_tokens(), 71);
  EXPECT_FALSE(c.Has(1));
  EXPECT_EQ(c.num_sequences(), 2);
}

TEST(KvCacheTest, HeadMajorRowsKeepTheirPlacesAcrossGrowth) {
  // 2 kv heads of 4 floats: head h, position p at K + h * HeadStride + p * 4.
  KvCache c(/*num_layers=*/1, /*kv_dim=*/8, /*capacity_tokens=*/1000, true, /*kv_heads=*/2);
  EXPECT_EQ(c.head_dim(), 4);
  ASSERT_TRUE(c.Reserve(7, 10).ok());
  EXPECT_EQ(c.HeadStride(7), 64 * 4);
  for (int64_t h = 0; h < 2; ++h) {
    for (int64_t p = 0; p < 10; ++p) {
      for (int64_t d = 0; d < 4; ++d) {
        c.K(7, 0)[h * c.HeadStride(7) + p * 4 + d] = static_cast<float>(100 * h + 10 * p + d);
        c.V(7, 0)[h * c.HeadStride(7) + p * 4 + d] = -static_cast<float>(100 * h + 10 * p + d);
      }
    }
  }
  ASSERT_TRUE(c.Reserve(7, 130).ok());  // grows to 192 slots: each head's block moves
  EXPECT_EQ(c.HeadStride(7), 192 * 4);
  for (int64_t h = 0; h < 2; ++h) {
    for (int64_t p = 0; p < 10; ++p) {
      for (int64_t d = 0; d < 4; ++d) {
        ASSERT_EQ(c.K(7, 0)[h * c.HeadStride(7) + p * 4 + d], 100 * h + 10 * p + d);
        ASSERT_EQ(c.V(7, 0)[h * c.HeadStride(7) + p * 4 + d], -(100 * h + 10 * p + d));
      }
    }
  }
}

TEST(KvCacheTest, StorePutsEachHeadsRowInItsBlock) {
  KvCache c(/*num_layers=*/2, /*kv_dim=*/6, /*capacity_tokens=*/100, true, /*kv_heads=*/3);
  ASSERT_TRUE(c.Reserve(4, 5).ok());
  EXPECT_EQ(c.Reserved(4), 5);
  // Positions 3 and 4 of layer 1: rows [2, kv_dim], head after head.
  const float k[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  float v[12];
  for (int i = 0; i < 12; ++i) v[i] = -k[i];
  c.Store(4, 1, 3, 2, k, v);
  const int64_t hs = c.HeadStride(4);
  for (int64_t p = 0; p < 2; ++p) {
    for (int64_t h = 0; h < 3; ++h) {
      for (int64_t d = 0; d < 2; ++d) {
        EXPECT_EQ(c.K(4, 1)[h * hs + (3 + p) * 2 + d], k[p * 6 + h * 2 + d]);
        EXPECT_EQ(c.V(4, 1)[h * hs + (3 + p) * 2 + d], v[p * 6 + h * 2 + d]);
      }
    }
  }
}

// A bf16 cache stores each element rounded to bf16, in the same head-major places, and keeps
// the written rows when a sequence grows.
TEST(KvCacheTest, Bf16StoreRoundsAndGrowthKeepsRows) {
  KvCache c(/*num_layers=*/1, /*kv_dim=*/4, /*capacity_tokens=*/1000, true, /*kv_heads=*/2,
            KvDType::kBF16);
  EXPECT_EQ(c.dtype(), KvDType::kBF16);
  ASSERT_TRUE(c.Reserve(1, 3).ok());
  const float k[4] = {1.0f, 1.00390625f /* 1 + 2^-8: rounds to 1 */, -2.5f, 3.14159f};
  const float v[4] = {0.1f, -0.2f, 1e-3f, 65504.0f};
  c.Store(1, 0, 2, 1, k, v);
  auto check = [&] {
    const int64_t hs = c.HeadStride(1);
    for (int64_t h = 0; h < 2; ++h) {
      for (int64_t d = 0; d < 2; ++d) {
        EXPECT_EQ(c.KBf16(1, 0)[h * hs + 2 * 2 + d], F32ToBF16(k[h * 2 + d]));
        EXPECT_EQ(c.VBf16(1, 0)[h * hs + 2 * 2 + d], F32ToBF16(v[h * 2 + d]));
      }
    }
  };
  check();
  EXPECT_EQ(BF16ToF32(c.KBf16(1, 0)[2 * 2 + 1]), 1.0f);
  ASSERT_TRUE(c.Reserve(1, 500).ok());  // grows: the rows move to new blocks
  check();
  EXPECT_EQ(ParseKvDType("bf16").value(), KvDType::kBF16);
  EXPECT_EQ(ParseKvDType("fp16").status().code(), absl::StatusCode::kInvalidArgument);
}

// An int8 cache stores each (position, kv head) row as round(x * 127 / max|x|) with the scale
// max|x| / 127 (a zero row: zeros and scale 0), head-major, and keeps rows and scales when a
// sequence grows.
TEST(KvCacheTest, Int8StoreQuantisesRowsAndGrowthKeepsThem) {
  KvCache c(/*num_layers=*/2, /*kv_dim=*/8, /*capacity_tokens=*/1000, true, /*kv_heads=*/2,
            KvDType::kInt8);
  EXPECT_EQ(c.dtype(), KvDType::kInt8);
  ASSERT_TRUE(c.Reserve(7, 4).ok());
  // Head 0 of k: largest magnitude 2.54 (scale 0.02); head 1 of k: a zero row.
  const float k[8] = {1.0f, -2.54f, 0.01f, 0.03f, 0.0f, 0.0f, 0.0f, 0.0f};
  const float v[8] = {0.5f, 0.25f, -0.125f, 0.0625f, -3.0f, 1.5f, 1.4f, 2.999f};
  c.Store(7, 1, 3, 1, k, v);
  auto check = [&] {
    const int64_t hs = c.HeadStride(7), slots = c.Slots(7);
    const int8_t want_k0[4] = {50, -127, 0 /* 0.5 rounds to even */, 2 /* 1.5 -> 2 */};
    for (int64_t d = 0; d < 4; ++d) {
      EXPECT_EQ(c.KInt8(7, 1)[3 * 4 + d], want_k0[d]) << d;
      EXPECT_EQ(c.KInt8(7, 1)[hs + 3 * 4 + d], 0);
    }
    EXPECT_FLOAT_EQ(c.KScale(7, 1)[3], 2.54f / 127.0f);
    EXPECT_EQ(c.KScale(7, 1)[slots + 3], 0.0f);
    for (int64_t h = 0; h < 2; ++h) {
      const float scale = c.VScale(7, 1)[h * slots + 3];
      EXPECT_FLOAT_EQ(scale, (h == 0 ? 0.5f : 3.0f) / 127.0f);
      for (int64_t d = 0; d < 4; ++d) {
        const float held = scale * c.VInt8(7, 1)[h * hs + 3 * 4 + d];
        EXPECT_LE(std::abs(held - v[h * 4 + d]), scale / 2 * 1.0001f) << h << " " << d;
      }
    }
  };
  check();
  ASSERT_TRUE(c.Reserve(7, 300).ok());  // grows: rows and scales move to new blocks
  EXPECT_GT(c.Slots(7), 64);
  check();
  EXPECT_EQ(ParseKvDType("int8").value(), KvDType::kInt8);
  EXPECT_NE(ParseKvDType("int4").status().message().find("fp32, bf16 or int8"), std::string::npos);
}

// The prefix cache's operations: Rename moves a sequence's rows to another id, Truncate gives
// back positions, CopyRows copies positions of every layer (int8 scales too) between sequences.
TEST(KvCacheTest, RenameTruncateAndCopyRows) {
  for (KvDType dtype : {KvDType::kF32, KvDType::kInt8}) {
    KvCache c(/*num_layers=*/2, /*kv_dim=*/8, /*capacity_tokens=*/100, true, /*kv_heads=*/2,
              dtype);
    ASSERT_TRUE(c.Reserve(1, 10).ok());
    std::vector<float> k(10 * 8), v(10 * 8);
    for (size_t i = 0; i < k.size(); ++i) {
      k[i] = 0.25f * static_cast<float>(i % 13) - 1.0f;
      v[i] = 0.5f * static_cast<float>(i % 7);
    }
    for (int64_t l = 0; l < 2; ++l) c.Store(1, l, 0, 10, k.data(), v.data());
    c.Truncate(1, 6);
    EXPECT_EQ(c.Reserved(1), 6);
    EXPECT_EQ(c.used_tokens(), 6);
    ASSERT_TRUE(c.Rename(1, 99));
    EXPECT_FALSE(c.Has(1));
    EXPECT_FALSE(c.Rename(1, 5));  // unknown
    ASSERT_TRUE(c.Reserve(2, 90).ok());
    ASSERT_TRUE(c.CopyRows(99, 2, 2, 6).ok());
    EXPECT_EQ(c.CopyRows(99, 2, 2, 7).code(), absl::StatusCode::kOutOfRange);  // 99 holds 6
    // Sequence 2 (other slots per head than 99) holds 99's rows 2..5 and nothing else moved.
    const int64_t s99 = c.Slots(99), s2 = c.Slots(2);
    ASSERT_NE(s99, s2);
    for (int64_t l = 0; l < 2; ++l) {
      for (int64_t h = 0; h < 2; ++h) {
        for (int64_t p = 2; p < 6; ++p) {
          if (dtype == KvDType::kInt8) {
            EXPECT_EQ(c.KScale(2, l)[h * s2 + p], c.KScale(99, l)[h * s99 + p]);
            EXPECT_EQ(c.VScale(2, l)[h * s2 + p], c.VScale(99, l)[h * s99 + p]);
            for (int64_t d = 0; d < 4; ++d) {
              EXPECT_EQ(c.KInt8(2, l)[(h * s2 + p) * 4 + d], c.KInt8(99, l)[(h * s99 + p) * 4 + d]);
              EXPECT_EQ(c.VInt8(2, l)[(h * s2 + p) * 4 + d], c.VInt8(99, l)[(h * s99 + p) * 4 + d]);
            }
          } else {
            for (int64_t d = 0; d < 4; ++d) {
              EXPECT_EQ(c.K(2, l)[(h * s2 + p) * 4 + d], k[p * 8 + h * 4 + d]);
              EXPECT_EQ(c.V(2, l)[(h * s2 + p) * 4 + d], v[p * 8 + h * 4 + d]);
            }
          }
        }
      }
    }
  }
  KvCache device(/*num_layers=*/1, /*kv_dim=*/8, /*capacity_tokens=*/100, /*host_storage=*/false);
  ASSERT_TRUE(device.Reserve(1, 4).ok());
  ASSERT_TRUE(device.Reserve(2, 4).ok());
  EXPECT_EQ(device.CopyRows(1, 2, 0, 4).code(), absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace moemesh
