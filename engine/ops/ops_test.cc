// Tests of the CPU ops against straightforward scalar references (double accumulation).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "engine/dtype.h"
#include "engine/ops/attention.h"
#include "engine/ops/kernels.h"
#include "engine/ops/linear.h"
#include "engine/ops/threading.h"
#include "gtest/gtest.h"

namespace moemesh {
namespace ops {
namespace {

std::vector<float> RandomVector(int64_t n, std::mt19937* rng, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(*rng);
  return v;
}

float RoundBF16(float x) { return BF16ToF32(F32ToBF16(x)); }

// F16 encoding of a float that is exactly representable in f16 (test data only).
uint16_t F32ToF16Exact(float f) {
  // Values used are multiples of 2^-10 in [-1, 1], normal or zero.
  if (f == 0.0f) return 0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  int exp = static_cast<int>((u >> 23) & 0xffu) - 127 + 15;
  uint16_t man = static_cast<uint16_t>((u >> 13) & 0x3ffu);
  return static_cast<uint16_t>(sign | (exp << 10) | man);
}

// ---------------------------------------------------------------------------------------
// Linear

struct LinearCase {
  DType wtype;
  ComputeType ct;
  int64_t out, in;
  bool bias;
};

// Weights in the given dtype plus their exact fp32 values.
struct TestWeight {
  std::vector<float> f32;      // What the dtype represents.
  std::vector<uint16_t> bits;  // For F16/BF16.
  const void* data(DType t) const {
    return t == DType::kF32 ? static_cast<const void*>(f32.data())
                            : static_cast<const void*>(bits.data());
  }
};

TestWeight MakeWeight(DType t, int64_t n, std::mt19937* rng) {
  TestWeight w;
  w.f32 = RandomVector(n, rng);
  if (t == DType::kBF16) {
    w.bits.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      w.bits[i] = F32ToBF16(w.f32[i]);
      w.f32[i] = BF16ToF32(w.bits[i]);
    }
  } else if (t == DType::kF16) {
    w.bits.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      float q = std::round(w.f32[i] * 1024.0f) / 1024.0f;  // Exact in f16.
      w.bits[i] = F32ToF16Exact(q);
      w.f32[i] = F16ToF32(w.bits[i]);
      EXPECT_EQ(w.f32[i], q);
    }
  }
  return w;
}

// y = x W^T + b in double; kBF16 rounds x and W to bf16 first.
std::vector<double> LinearReference(const std::vector<float>& x, int64_t m,
                                    const std::vector<float>& w, int64_t out, int64_t in,
                                    const float* bias, ComputeType ct) {
  std::vector<double> y(m * out);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t n = 0; n < out; ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < in; ++k) {
        float xv = x[r * in + k], wv = w[n * in + k];
        if (ct == ComputeType::kBF16) {
          xv = RoundBF16(xv);
          wv = RoundBF16(wv);
        }
        acc += static_cast<double>(xv) * wv;
      }
      if (bias != nullptr) acc += bias[n];
      y[r * out + n] = acc;
    }
  }
  return y;
}

class LinearTest : public ::testing::TestWithParam<std::tuple<DType, ComputeType, bool>> {};

TEST_P(LinearTest, MatchesReference) {
  const auto [wtype, ct, with_bias] = GetParam();
  const double tol = ct == ComputeType::kF32 ? 1e-4 : 1e-3;
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{256, 256}, {37, 45}, {130, 19},
                                                           {64, 16},   {1, 7},   {200, 129}};
  std::mt19937 rng(1234);
  for (const auto& [out, in] : shapes) {
    TestWeight w = MakeWeight(wtype, out * in, &rng);
    std::vector<float> bias = RandomVector(out, &rng);
    absl::StatusOr<Linear> lin =
        Linear::Create(w.data(wtype), wtype, out, in, ct, with_bias ? bias.data() : nullptr);
    ASSERT_TRUE(lin.ok()) << lin.status();
    EXPECT_EQ(lin->in(), in);
    EXPECT_EQ(lin->out(), out);
    EXPECT_EQ(lin->compute(), ct);
    const std::string impl = lin->onednn_impl_for_testing(64);
    EXPECT_FALSE(impl.empty()) << "oneDNN unavailable";
#if defined(__AVX512F__)
    // The packed layout must be one oneDNN's optimised kernels accept.
    EXPECT_NE(impl.substr(0, 3), "ref") << impl << " out=" << out << " in=" << in;
#endif
    for (int64_t m : {1, 3, 17, 64, 512}) {
      std::vector<float> x = RandomVector(m * in, &rng);
      std::vector<double> ref =
          LinearReference(x, m, w.f32, out, in, with_bias ? bias.data() : nullptr, ct);
      for (Linear::Path path : {Linear::Path::kAuto, Linear::Path::kSmall, Linear::Path::kOneDnn}) {
        lin->set_path_for_testing(path);
        std::vector<float> y(m * out, std::numeric_limits<float>::quiet_NaN());
        lin->Forward(x.data(), m, y.data());
        double worst = 0.0;
        for (int64_t i = 0; i < m * out; ++i) {
          double err = std::abs(y[i] - ref[i]) / std::max(1.0, std::abs(ref[i]));
          if (!(err <= worst)) worst = err;  // NaN-propagating max.
        }
        EXPECT_LE(worst, tol) << "out=" << out << " in=" << in << " m=" << m
                              << " path=" << static_cast<int>(path);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllTypes, LinearTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                       ::testing::Values(ComputeType::kF32, ComputeType::kBF16), ::testing::Bool()),
    [](const ::testing::TestParamInfo<LinearTest::ParamType>& info) {
      return std::string(DTypeName(std::get<0>(info.param))) +
             (std::get<1>(info.param) == ComputeType::kF32 ? "_computeF32" : "_computeBF16") +
             (std::get<2>(info.param) ? "_bias" : "_nobias");
    });

TEST(LinearTest, BF16ComputeRoundsLikeReference) {
  // Values whose bf16 rounding matters: the kBF16 result must follow the rounded operands,
  // not the fp32 ones.
  const int64_t out = 3, in = 5;
  std::vector<float> w(out * in), x(in);
  for (int64_t i = 0; i < out * in; ++i) w[i] = 1.0f + static_cast<float>(i) / 300.0f;
  for (int64_t i = 0; i < in; ++i) x[i] = 1.0f + static_cast<float>(i) / 700.0f;
  absl::StatusOr<Linear> lin = Linear::Create(w.data(), DType::kF32, out, in, ComputeType::kBF16);
  ASSERT_TRUE(lin.ok());
  std::vector<float> y(out);
  lin->Forward(x.data(), 1, y.data());
  std::vector<double> ref = LinearReference(x, 1, w, out, in, nullptr, ComputeType::kBF16);
  for (int64_t n = 0; n < out; ++n) EXPECT_NEAR(y[n], ref[n], 1e-5 * std::abs(ref[n]));
}

TEST(LinearTest, RejectsBadShapes) {
  float w[4] = {};
  EXPECT_FALSE(Linear::Create(w, DType::kF32, 0, 4, ComputeType::kF32).ok());
  EXPECT_FALSE(Linear::Create(w, DType::kF32, 4, -1, ComputeType::kF32).ok());
  EXPECT_FALSE(Linear::Create(nullptr, DType::kF32, 2, 2, ComputeType::kF32).ok());
}

TEST(LinearTest, MoveKeepsWorking) {
  std::mt19937 rng(7);
  std::vector<float> w = RandomVector(20 * 12, &rng), x = RandomVector(12, &rng);
  absl::StatusOr<Linear> created = Linear::Create(w.data(), DType::kF32, 20, 12, ComputeType::kF32);
  ASSERT_TRUE(created.ok());
  Linear a = std::move(created).value();
  Linear b;
  b = std::move(a);
  std::vector<float> y(20);
  b.Forward(x.data(), 1, y.data());
  std::vector<double> ref = LinearReference(x, 1, w, 20, 12, nullptr, ComputeType::kF32);
  for (int i = 0; i < 20; ++i) EXPECT_NEAR(y[i], ref[i], 1e-5);
}

TEST(LinearTest, ThreadCountDoesNotChangeF32Results) {
  std::mt19937 rng(99);
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {768, 256}, {256, 768}, {8192, 256}, {64, 1024}, {130, 999}};
  const int saved = NumThreads();
  for (const auto& [out, in] : shapes) {
    for (DType wtype : {DType::kF32, DType::kBF16}) {
      TestWeight w = MakeWeight(wtype, out * in, &rng);
      absl::StatusOr<Linear> lin = Linear::Create(w.data(wtype), wtype, out, in, ComputeType::kF32);
      ASSERT_TRUE(lin.ok());
      for (int64_t m : {1, 4, 17, 64, 512}) {
        std::vector<float> x = RandomVector(m * in, &rng);
        for (Linear::Path path :
             {Linear::Path::kAuto, Linear::Path::kSmall, Linear::Path::kOneDnn}) {
          lin->set_path_for_testing(path);
          std::vector<float> y1(m * out), y2(m * out);
          SetNumThreads(1);
          lin->Forward(x.data(), m, y1.data());
          SetNumThreads(2);
          lin->Forward(x.data(), m, y2.data());
          EXPECT_EQ(0, std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)))
              << "out=" << out << " in=" << in << " m=" << m << " path=" << static_cast<int>(path)
              << " w=" << DTypeName(wtype);
        }
      }
    }
  }
  SetNumThreads(saved);
}

TEST(LinearTest, BF16WeightsWithF32ComputeEqualF32Weights) {
  // BF16 checkpoints with kF32 compute keep bf16 storage and widen in the kernels: results
  // must be exactly those of the same values stored as fp32.
  std::mt19937 rng(21);
  for (const auto& [out, in] :
       std::vector<std::pair<int64_t, int64_t>>{{256, 256}, {37, 45}, {130, 19}, {8, 1}}) {
    TestWeight w = MakeWeight(DType::kBF16, out * in, &rng);
    std::vector<float> bias = RandomVector(out, &rng);
    absl::StatusOr<Linear> from_bf16 =
        Linear::Create(w.bits.data(), DType::kBF16, out, in, ComputeType::kF32, bias.data());
    absl::StatusOr<Linear> from_f32 =
        Linear::Create(w.f32.data(), DType::kF32, out, in, ComputeType::kF32, bias.data());
    ASSERT_TRUE(from_bf16.ok() && from_f32.ok());
    EXPECT_EQ(from_bf16->weight_bytes(), (out + 63) / 64 * 64 * ((in + 31) / 32 * 32) * 2)
        << "bf16 storage expected";
    for (int64_t m : {1, 2, 3, 4, 5, 9, 17}) {
      std::vector<float> x = RandomVector(m * in, &rng);
      std::vector<float> y1(m * out), y2(m * out);
      from_bf16->set_path_for_testing(Linear::Path::kSmall);
      from_f32->set_path_for_testing(Linear::Path::kSmall);
      from_bf16->Forward(x.data(), m, y1.data());
      from_f32->Forward(x.data(), m, y2.data());
      EXPECT_EQ(0, std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)))
          << "out=" << out << " in=" << in << " m=" << m;
      from_bf16->set_path_for_testing(Linear::Path::kOneDnn);
      from_f32->set_path_for_testing(Linear::Path::kOneDnn);
      from_bf16->Forward(x.data(), m, y1.data());
      from_f32->Forward(x.data(), m, y2.data());
      EXPECT_EQ(0, std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)))
          << "oneDNN out=" << out << " in=" << in << " m=" << m;
    }
  }
}

TEST(LinearTest, ForwardPartMatchesForward) {
  std::mt19937 rng(22);
  for (ComputeType ct : {ComputeType::kF32, ComputeType::kBF16}) {
    for (DType wtype : {DType::kF32, DType::kBF16}) {
      for (const auto& [out, in] :
           std::vector<std::pair<int64_t, int64_t>>{{256, 256}, {200, 33}, {16, 256}, {8192, 64}}) {
        TestWeight w = MakeWeight(wtype, out * in, &rng);
        absl::StatusOr<Linear> lin = Linear::Create(w.data(wtype), wtype, out, in, ct);
        ASSERT_TRUE(lin.ok());
        lin->set_path_for_testing(Linear::Path::kSmall);
        for (int64_t m : {1, 3}) {
          std::vector<float> x = RandomVector(m * in, &rng);
          std::vector<float> want(m * out);
          lin->Forward(x.data(), m, want.data());
          for (int parts : {1, 2, 3, 5}) {
            std::vector<float> got(m * out, std::numeric_limits<float>::quiet_NaN());
            for (int p = 0; p < parts; ++p) lin->ForwardPart(x.data(), m, got.data(), p, parts);
            EXPECT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(float)))
                << "out=" << out << " in=" << in << " m=" << m << " parts=" << parts;
          }
        }
      }
    }
  }
}

TEST(LinearTest, ForwardFromInsideParallelRegion) {
  // Callers may run several projections (e.g. experts) in parallel; nested calls must be
  // correct (oneDNN and our kernels then run single-threaded).
  std::mt19937 rng(5);
  const int64_t out = 96, in = 80, m = 40;
  std::vector<float> w = RandomVector(out * in, &rng), x = RandomVector(m * in, &rng);
  absl::StatusOr<Linear> lin = Linear::Create(w.data(), DType::kF32, out, in, ComputeType::kF32);
  ASSERT_TRUE(lin.ok());
  std::vector<double> ref = LinearReference(x, m, w, out, in, nullptr, ComputeType::kF32);
  std::vector<std::vector<float>> ys(4, std::vector<float>(m * out));
#pragma omp parallel for num_threads(2)
  for (int i = 0; i < 4; ++i) lin->Forward(x.data(), m, ys[i].data());
  for (const auto& y : ys) {
    for (int64_t i = 0; i < m * out; ++i) ASSERT_NEAR(y[i], ref[i], 1e-4);
  }
}

// Quantised products (ComputeType::kInt8 / kInt4), computed from the spec in linear.h in double:
// x per row and group of 64 quantised to int8; W per output row to int8 (kInt8) or per output
// row and group of 64 to [-7, 7] (kInt4); y = sum_g s_W * s_g * dot_g + b.
std::vector<double> QuantisedReference(const std::vector<float>& x, int64_t m,
                                       const std::vector<float>& w, int64_t out, int64_t in,
                                       const float* bias, ComputeType ct) {
  const int64_t groups = (in + 63) / 64;
  std::vector<int> qw(out * in);
  std::vector<float> sw(out * groups);  // kInt8: the same for every group of a row
  for (int64_t n = 0; n < out; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = ct == ComputeType::kInt8 ? 0 : g * 64;
      const int64_t k1 = ct == ComputeType::kInt8 ? in : std::min(in, g * 64 + 64);
      const float qmax = ct == ComputeType::kInt8 ? 127.0f : 7.0f;
      float mx = 0.0f;
      for (int64_t k = k0; k < k1; ++k) mx = std::max(mx, std::fabs(w[n * in + k]));
      const float scale = mx / qmax;
      sw[n * groups + g] = scale;
      for (int64_t k = g * 64; k < std::min(in, g * 64 + 64); ++k) {
        qw[n * in + k] =
            scale > 0 ? static_cast<int>(std::clamp(std::nearbyint(w[n * in + k] / scale), -qmax, qmax))
                      : 0;
      }
    }
  }
  std::vector<double> y(m * out);
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x.data() + r * in;
    std::vector<double> acc(out, 0.0);
    for (int64_t k0 = 0; k0 < in; k0 += 64) {
      const int64_t k1 = std::min(in, k0 + 64);
      float mx = 0.0f;
      for (int64_t k = k0; k < k1; ++k) mx = std::max(mx, std::fabs(xr[k]));
      const float inv = mx > 0 ? 127.0f / mx : 0.0f;
      std::vector<int> qx(k1 - k0);
      for (int64_t k = k0; k < k1; ++k) qx[k - k0] = static_cast<int>(std::nearbyint(xr[k] * inv));
      for (int64_t n = 0; n < out; ++n) {
        int64_t dot = 0;
        for (int64_t k = k0; k < k1; ++k) dot += int64_t{qx[k - k0]} * qw[n * in + k];
        acc[n] += static_cast<double>(mx / 127.0f) * sw[n * groups + k0 / 64] * dot;
      }
    }
    for (int64_t n = 0; n < out; ++n) {
      y[r * out + n] = acc[n] + (bias != nullptr ? bias[n] : 0.0f);
    }
  }
  return y;
}

class LinearQuantisedTest : public ::testing::TestWithParam<ComputeType> {};

TEST_P(LinearQuantisedTest, MatchesQuantisedReferenceAndStaysCloseToFp32) {
  const ComputeType ct = GetParam();
  std::mt19937 rng(8);
  for (const auto& [out, in] : std::vector<std::pair<int64_t, int64_t>>{
           {384, 256}, {256, 192}, {130, 100}, {64, 64}, {20, 7}, {70, 2048}}) {
    for (bool with_bias : {false, true}) {
      std::vector<float> w = RandomVector(out * in, &rng);
      std::vector<float> bias = RandomVector(out, &rng);
      const float* b = with_bias ? bias.data() : nullptr;
      absl::StatusOr<Linear> q = Linear::Create(w.data(), DType::kF32, out, in, ct, b);
      ASSERT_TRUE(q.ok()) << q.status();
      EXPECT_EQ(q->compute(), ct);
      // int8: a quarter of fp32's bytes, plus per-row scales and per-group sums; int4: an eighth,
      // plus a scale per row and group.
      const int64_t np = (out + 63) / 64 * 64, kp = (in + 63) / 64 * 64;
      EXPECT_EQ(q->weight_bytes(), ct == ComputeType::kInt8
                                       ? np * kp + np * (kp / 64) * 4 + np * 4
                                       : np * kp / 2 + np * (kp / 64) * 4);
      for (int64_t m : {1, 2, 3, 4, 5, 7, 33}) {
        // Rows of different magnitudes: the per-group scales must follow them.
        std::vector<float> x = RandomVector(m * in, &rng);
        for (int64_t r = 0; r < m; ++r) {
          for (int64_t k = 0; k < in; ++k) x[r * in + k] *= std::pow(10.0f, static_cast<float>(r % 3) - 1);
        }
        std::vector<float> y(m * out);
        q->Forward(x.data(), m, y.data());
        std::vector<double> ref = QuantisedReference(x, m, w, out, in, b, ct);
        std::vector<double> exact = LinearReference(x, m, w, out, in, b, ComputeType::kF32);
        for (int64_t r = 0; r < m; ++r) {
          double err2 = 0, ref2 = 0, max_abs_x = 0;
          for (int64_t k = 0; k < in; ++k) max_abs_x = std::max<double>(max_abs_x, std::fabs(x[r * in + k]));
          for (int64_t n = 0; n < out; ++n) {
            const int64_t i = r * out + n;
            // Only the fp32 summation of the groups differs from the reference.
            ASSERT_NEAR(y[i], ref[i], 1e-5 * (1.0 + max_abs_x * in / 64.0))
                << "out=" << out << " in=" << in << " m=" << m << " row " << r << " col " << n;
            err2 += (y[i] - exact[i]) * (y[i] - exact[i]);
            ref2 += (exact[i] - (b != nullptr ? b[n] : 0.0)) * (exact[i] - (b != nullptr ? b[n] : 0.0));
          }
          // Quantisation error of uniform data: about 1% (int8) or 7% (int4: steps of 1/7 of a
          // group's largest weight) of the product's magnitude.
          EXPECT_LT(std::sqrt(err2 / ref2), ct == ComputeType::kInt8 ? 0.02 : 0.12)
              << "out=" << out << " in=" << in << " row " << r;
        }
      }
    }
  }
}

TEST_P(LinearQuantisedTest, RowsDoNotDependOnBatchThreadsOrParts) {
  const ComputeType ct = GetParam();
  std::mt19937 rng(9);
  const int saved = NumThreads();
  for (const auto& [out, in] :
       std::vector<std::pair<int64_t, int64_t>>{{1536, 2048}, {2048, 768}, {200, 33}}) {
    TestWeight w = MakeWeight(DType::kBF16, out * in, &rng);
    absl::StatusOr<Linear> q = Linear::Create(w.bits.data(), DType::kBF16, out, in, ct);
    ASSERT_TRUE(q.ok()) << q.status();
    const int64_t m = 37;
    std::vector<float> x = RandomVector(m * in, &rng);
    std::vector<float> whole(m * out);
    SetNumThreads(2);
    q->Forward(x.data(), m, whole.data());
    SetNumThreads(1);
    for (int64_t r = 0; r < m; ++r) {  // each row alone
      std::vector<float> one(out);
      q->Forward(x.data() + r * in, 1, one.data());
      ASSERT_EQ(0, std::memcmp(one.data(), whole.data() + r * out, out * sizeof(float)))
          << "out=" << out << " in=" << in << " row " << r;
    }
    for (int parts : {2, 3}) {
      std::vector<float> got(m * out, std::numeric_limits<float>::quiet_NaN());
      for (int p = 0; p < parts; ++p) q->ForwardPart(x.data(), m, got.data(), p, parts);
      EXPECT_EQ(0, std::memcmp(got.data(), whole.data(), got.size() * sizeof(float)))
          << "out=" << out << " in=" << in << " parts=" << parts;
    }
  }
  SetNumThreads(saved);
}

TEST_P(LinearQuantisedTest, ZeroRowsAndZeroWeightsGiveBias) {
  const int64_t out = 70, in = 130;
  std::vector<float> w(out * in, 0.0f), bias(out), x(2 * in, 0.0f);
  for (int64_t n = 0; n < out; ++n) bias[n] = 0.25f * static_cast<float>(n);
  for (int64_t k = 0; k < in; ++k) x[in + k] = 1.0f;  // row 1 nonzero, weights all zero
  for (int64_t k = 0; k < in; ++k) w[3 * in + k] = 0.5f;  // except row 3
  absl::StatusOr<Linear> q = Linear::Create(w.data(), DType::kF32, out, in, GetParam(), bias.data());
  ASSERT_TRUE(q.ok());
  std::vector<float> y(2 * out);
  q->Forward(x.data(), 2, y.data());
  for (int64_t n = 0; n < out; ++n) {
    EXPECT_EQ(y[n], bias[n]) << n;  // x = 0
    EXPECT_NEAR(y[out + n], bias[n] + (n == 3 ? 0.5f * in : 0.0f), 1e-3) << n;
  }
}

INSTANTIATE_TEST_SUITE_P(Types, LinearQuantisedTest,
                         ::testing::Values(ComputeType::kInt8, ComputeType::kInt4),
                         [](const auto& info) { return std::string(ComputeTypeName(info.param)); });

TEST(SpinBarrierTest, OrdersPhases) {
  constexpr int kThreads = 3, kPhases = 2000;
  SpinBarrier barrier(kThreads);
  std::atomic<int> slots[kThreads];
  for (auto& s : slots) s.store(-1);
  std::atomic<int> errors{0};
  auto body = [&](int t) {
    for (int phase = 0; phase < kPhases; ++phase) {
      slots[t].store(phase, std::memory_order_relaxed);
      barrier.Wait();
      for (int o = 0; o < kThreads; ++o) {
        if (slots[o].load(std::memory_order_relaxed) != phase) ++errors;
      }
      barrier.Wait();
    }
  };
  std::vector<std::thread> threads;
  for (int t = 1; t < kThreads; ++t) threads.emplace_back(body, t);
  body(0);
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
}

TEST(ParallelRunTest, EveryThreadOnceNestedRegionsSerial) {
  SetNumThreads(3);
  for (int round = 0; round < 500; ++round) {  // workers sleep and wake between rounds
    std::atomic<int> calls[3] = {0, 0, 0};
    std::atomic<int> wrong_nt{0}, nested_wrong{0};
    ParallelRun(3, [&](int t, int nt) {
      if (nt != 3) ++wrong_nt;
      ++calls[t];
      if (SyncThreads() != 1 || !InParallelRegion()) ++nested_wrong;
      ParallelRun(3, [&](int t2, int nt2) { nested_wrong += t2 != 0 || nt2 != 1; });
    });
    ASSERT_EQ(wrong_nt.load(), 0);
    ASSERT_EQ(nested_wrong.load(), 0);
    for (auto& c : calls) ASSERT_EQ(c.load(), 1) << "round " << round;
    if (round % 100 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_FALSE(InParallelRegion());
  EXPECT_EQ(SyncThreads(), 3);
  // Never more threads than asked or set.
  std::atomic<int> max_nt{0};
  ParallelRun(8, [&](int, int nt) { max_nt = std::max(max_nt.load(), nt); });
  EXPECT_EQ(max_nt.load(), 3);
  SetNumThreads(2);
}

TEST(ParallelRunTest, DynamicForCoversEachIndexOnceUnderConcurrentCallers) {
  SetNumThreads(2);
  constexpr int kCallers = 4;
  constexpr int64_t kN = 1000;
  std::vector<std::vector<int>> hits(kCallers, std::vector<int>(kN, 0));
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      for (int rep = 0; rep < 50; ++rep) {
        std::vector<std::atomic<int>> h(kN);
        for (auto& x : h) x.store(0);
        ParallelForDynamic(2, kN, [&](int64_t i) { ++h[i]; });
        for (int64_t i = 0; i < kN; ++i) hits[c][i] += h[i].load() == 1 ? 1 : 1000;
      }
    });
  }
  for (auto& t : callers) t.join();
  for (int c = 0; c < kCallers; ++c) {
    for (int64_t i = 0; i < kN; ++i) ASSERT_EQ(hits[c][i], 50) << c << " " << i;
  }
}

// ---------------------------------------------------------------------------------------
// RmsNorm

TEST(RmsNormTest, MatchesReference) {
  std::mt19937 rng(1);
  for (int64_t dim : {1, 7, 37, 256, 1000}) {
    for (int64_t rows : {1, 3}) {
      std::vector<float> x = RandomVector(rows * dim, &rng, -3.0f, 3.0f);
      std::vector<float> w = RandomVector(dim, &rng, 0.5f, 1.5f);
      const float eps = 1e-6f;
      std::vector<float> y(rows * dim), inplace = x;
      RmsNorm(x.data(), w.data(), rows, dim, eps, y.data());
      RmsNorm(inplace.data(), w.data(), rows, dim, eps, inplace.data());
      for (int64_t r = 0; r < rows; ++r) {
        double ss = 0.0;
        for (int64_t i = 0; i < dim; ++i)
          ss += static_cast<double>(x[r * dim + i]) * x[r * dim + i];
        const double inv = 1.0 / std::sqrt(ss / dim + eps);
        for (int64_t i = 0; i < dim; ++i) {
          const double ref = w[i] * (x[r * dim + i] * inv);
          EXPECT_NEAR(y[r * dim + i], ref, 1e-5 * std::max(1.0, std::abs(ref)));
          EXPECT_EQ(y[r * dim + i], inplace[r * dim + i]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Rope

// transformers: inv_freq = 1.0 / (base ** (arange(0, dim, 2).float() / dim)) in fp32;
// freqs = inv_freq * position (fp32); emb = cat(freqs, freqs); q * cos + rotate_half(q) * sin.
void RopeReference(std::vector<float>* x, const std::vector<int32_t>& pos, int64_t heads,
                   int64_t dim, float theta) {
  const int64_t half = dim / 2;
  for (size_t t = 0; t < pos.size(); ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x->data() + (t * heads + h) * dim;
      std::vector<float> rotated(dim);
      for (int64_t i = 0; i < dim; ++i) {
        const int64_t fi = i % half;
        const float e = static_cast<float>(2 * fi) / static_cast<float>(dim);
        const float inv_freq = 1.0f / std::pow(theta, e);
        const float angle = inv_freq * static_cast<float>(pos[t]);
        const float c = static_cast<float>(std::cos(static_cast<double>(angle)));
        const float s = static_cast<float>(std::sin(static_cast<double>(angle)));
        const float rh = i < half ? -v[i + half] : v[i - half];
        rotated[i] = v[i] * c + rh * s;
      }
      std::copy(rotated.begin(), rotated.end(), v);
    }
  }
}

TEST(RopeTest, MatchesTransformersFormula) {
  std::mt19937 rng(3);
  for (int64_t dim : {2, 6, 32, 64, 128}) {
    for (float theta : {10000.0f, 1000000.0f}) {
      const int64_t heads = 3;
      std::vector<int32_t> pos = {0, 1, 2, 17, 511, 1023, 4095, 32767};
      const int64_t tokens = static_cast<int64_t>(pos.size());
      std::vector<float> x = RandomVector(tokens * heads * dim, &rng, -2.0f, 2.0f);
      std::vector<float> ref = x;
      RopeReference(&ref, pos, heads, dim, theta);
      Rope(x.data(), pos.data(), tokens, heads, dim, theta);
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_NEAR(x[i], ref[i], 2e-6 * std::max(1.0f, std::abs(ref[i])))
            << "dim=" << dim << " theta=" << theta << " i=" << i;
      }
    }
  }
}

TEST(RopeTest, PositionZeroIsIdentity) {
  std::mt19937 rng(4);
  std::vector<float> x = RandomVector(2 * 32, &rng), orig = x;
  int32_t pos = 0;
  Rope(x.data(), &pos, 1, 2, 32, 1e6f);
  EXPECT_EQ(x, orig);
}

// ---------------------------------------------------------------------------------------
// SiluMul

double SiluRef(double g) { return g / (1.0 + std::exp(-g)); }

TEST(SiluMulTest, MatchesReference) {
  std::mt19937 rng(5);
  for (int64_t n : {1, 15, 16, 17, 192, 1001}) {
    std::vector<float> g = RandomVector(n, &rng, -20.0f, 20.0f);
    std::vector<float> u = RandomVector(n, &rng, -2.0f, 2.0f);
    g[0] = -100.0f;  // exp(-g) overflows: silu -> -0.
    if (n > 1) g[1] = 100.0f;
    std::vector<float> out(n);
    SiluMul(g.data(), u.data(), n, out.data());
    for (int64_t i = 0; i < n; ++i) {
      const double ref = SiluRef(g[i]) * u[i];
      EXPECT_NEAR(out[i], ref, 1e-6 * std::max(1.0, std::abs(ref))) << "g=" << g[i];
    }
    // Aliasing the output with gate.
    std::vector<float> alias = g;
    SiluMul(alias.data(), u.data(), n, alias.data());
    EXPECT_EQ(alias, out);
  }
}

TEST(SiluMulTest, RowsVariantAndInPlace) {
  std::mt19937 rng(6);
  for (int64_t width : {1, 16, 37, 192}) {
    const int64_t rows = 5;
    std::vector<float> gu = RandomVector(rows * 2 * width, &rng, -6.0f, 6.0f);
    std::vector<float> out(rows * width);
    SiluMulRows(gu.data(), rows, width, out.data());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < width; ++i) {
        const double ref = SiluRef(gu[r * 2 * width + i]) * gu[r * 2 * width + width + i];
        EXPECT_NEAR(out[r * width + i], ref, 1e-6 * std::max(1.0, std::abs(ref)));
      }
    }
    std::vector<float> inplace = gu;
    SiluMulRows(inplace.data(), rows, width, inplace.data());
    for (int64_t i = 0; i < rows * width; ++i) EXPECT_EQ(inplace[i], out[i]);
  }
}

TEST(SigmoidTest, MatchesReference) {
  std::mt19937 rng(15);
  for (int64_t n : {1, 16, 33}) {
    std::vector<float> x = RandomVector(n, &rng, -30.0f, 30.0f);
    x[0] = -200.0f;
    std::vector<float> y(n);
    Sigmoid(x.data(), n, y.data());
    for (int64_t i = 0; i < n; ++i) {
      const double ref = 1.0 / (1.0 + std::exp(-static_cast<double>(x[i])));
      EXPECT_NEAR(y[i], ref, 1e-6 * std::max(1e-30, ref)) << x[i];
    }
    Sigmoid(x.data(), n, x.data());
    EXPECT_EQ(x, y);
  }
}

// ---------------------------------------------------------------------------------------
// Softmax and routing

std::vector<double> SoftmaxRef(const float* x, int64_t n) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, static_cast<double>(x[i]));
  std::vector<double> p(n);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += p[i] = std::exp(x[i] - mx);
  for (double& v : p) v /= sum;
  return p;
}

TEST(SoftmaxTest, MatchesReference) {
  std::mt19937 rng(8);
  for (int64_t n : {1, 5, 16, 17, 100, 1000}) {
    const int64_t rows = 3;
    std::vector<float> x = RandomVector(rows * n, &rng, -30.0f, 30.0f);
    x[0] = 1000.0f;  // Large values must not overflow.
    std::vector<float> y = x;
    Softmax(y.data(), rows, n);
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> ref = SoftmaxRef(x.data() + r * n, n);
      double sum = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        EXPECT_NEAR(y[r * n + i], ref[i], 1e-6 * std::max(1e-3, ref[i]));
        sum += y[r * n + i];
      }
      EXPECT_NEAR(sum, 1.0, 1e-5);
    }
  }
}

TEST(SoftmaxTest, NegativeInfinityGivesZero) {
  float x[4] = {0.0f, -std::numeric_limits<float>::infinity(), 0.0f, 1.0f};
  Softmax(x, 1, 4);
  EXPECT_EQ(x[1], 0.0f);
  EXPECT_NEAR(x[3], std::exp(1.0) / (2.0 + std::exp(1.0)), 1e-6);
}

TEST(TopKRoutingTest, MatchesReference) {
  std::mt19937 rng(9);
  for (int64_t experts : {4, 16, 60, 128}) {
    for (int64_t k : {1, 2, 4, 8}) {
      if (k > experts) continue;
      for (bool normalize : {false, true}) {
        const int64_t rows = 7;
        // Distinct, well separated logits so the ranking is unambiguous.
        std::vector<float> logits(rows * experts);
        for (int64_t r = 0; r < rows; ++r) {
          std::vector<int> perm(experts);
          for (int64_t e = 0; e < experts; ++e) perm[e] = static_cast<int>(e);
          std::shuffle(perm.begin(), perm.end(), rng);
          for (int64_t e = 0; e < experts; ++e) logits[r * experts + e] = perm[e] * 0.05f - 2.0f;
        }
        std::vector<int32_t> ids(rows * k);
        std::vector<float> weights(rows * k);
        TopKRouting(logits.data(), rows, experts, k, normalize, ids.data(), weights.data());
        for (int64_t r = 0; r < rows; ++r) {
          std::vector<double> p = SoftmaxRef(logits.data() + r * experts, experts);
          std::vector<int> order(experts);
          for (int64_t e = 0; e < experts; ++e) order[e] = static_cast<int>(e);
          std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
          double sum = 0.0;
          for (int64_t j = 0; j < k; ++j) sum += p[order[j]];
          for (int64_t j = 0; j < k; ++j) {
            EXPECT_EQ(ids[r * k + j], order[j]);
            const double want = normalize ? p[order[j]] / sum : p[order[j]];
            EXPECT_NEAR(weights[r * k + j], want, 1e-6 * std::max(1e-2, want));
          }
        }
      }
    }
  }
}

TEST(TopKRoutingTest, TiesPreferLowerIndex) {
  // Experts 1, 3, 5 tie for the top; 0 and 6 tie below them.
  const float logits[8] = {0.5f, 2.0f, -1.0f, 2.0f, 0.0f, 2.0f, 0.5f, -3.0f};
  int32_t ids[4];
  float w[4];
  TopKRouting(logits, 1, 8, 4, /*normalize=*/false, ids, w);
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(ids[1], 3);
  EXPECT_EQ(ids[2], 5);
  EXPECT_EQ(ids[3], 0);
  EXPECT_EQ(w[0], w[1]);
  EXPECT_EQ(w[1], w[2]);
  TopKRouting(logits, 1, 8, 4, /*normalize=*/true, ids, w);
  EXPECT_EQ(ids[3], 0);
  EXPECT_NEAR(w[0] + w[1] + w[2] + w[3], 1.0f, 1e-6);
  EXPECT_NEAR(w[0] / w[3], std::exp(1.5), 1e-5);

  // All equal: the first k experts, equal weights.
  const float flat[5] = {0.25f, 0.25f, 0.25f, 0.25f, 0.25f};
  int32_t ids2[3];
  float w2[3];
  TopKRouting(flat, 1, 5, 3, /*normalize=*/true, ids2, w2);
  EXPECT_EQ(ids2[0], 0);
  EXPECT_EQ(ids2[1], 1);
  EXPECT_EQ(ids2[2], 2);
  for (float v : w2) EXPECT_NEAR(v, 1.0f / 3.0f, 1e-7);
}

// ---------------------------------------------------------------------------------------
// Attention

// Naive softmax(Q K^T * scale + causal mask) V in double.
std::vector<double> AttentionRef(const std::vector<float>& q, const std::vector<float>& k,
                                 const std::vector<float>& v, int64_t start_pos, int64_t n_new,
                                 int64_t heads, int64_t kv_heads, int64_t dim) {
  const int64_t group = heads / kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  std::vector<double> out(n_new * heads * dim, 0.0);
  for (int64_t i = 0; i < n_new; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t g = h / group;
      const int64_t ctx = start_pos + i + 1;
      const float* qi = q.data() + (i * heads + h) * dim;
      std::vector<double> s(ctx);
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < ctx; ++j) {
        const float* kj = k.data() + (j * kv_heads + g) * dim;
        double dot = 0.0;
        for (int64_t d = 0; d < dim; ++d) dot += static_cast<double>(qi[d]) * kj[d];
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
      }
      double sum = 0.0;
      for (double& x : s) sum += x = std::exp(x - mx);
      double* o = out.data() + (i * heads + h) * dim;
      for (int64_t j = 0; j < ctx; ++j) {
        const float* vj = v.data() + (j * kv_heads + g) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] += s[j] / sum * vj[d];
      }
    }
  }
  return out;
}

struct AttentionCase {
  int64_t start_pos, n_new, heads, kv_heads, dim;
};

TEST(AttentionTest, MatchesNaiveCausalSoftmax) {
  std::mt19937 rng(11);
  const std::vector<AttentionCase> cases = {
      {0, 1, 4, 2, 32},    {0, 7, 4, 2, 32},    {5, 1, 4, 2, 32},    {37, 20, 4, 2, 32},
      {15, 2, 4, 2, 32},   {16, 1, 4, 2, 32},   {300, 1, 4, 2, 32},  {100, 64, 4, 2, 32},
      {0, 33, 8, 8, 16},   {9, 5, 8, 1, 24},    {3, 4, 2, 2, 64},    {50, 3, 6, 3, 128},
      {1000, 1, 8, 4, 32}, {0, 129, 4, 2, 32},  {7, 3, 4, 4, 5},     {20, 40, 4, 2, 48},
      {33, 17, 16, 2, 64}, {5, 70, 32, 4, 128}, {300, 2, 4, 2, 256}, {0, 1, 1, 1, 16},
  };
  const int saved = NumThreads();
  for (int threads : {1, 2}) {
    SetNumThreads(threads);
    for (const AttentionCase& c : cases) {
      const int64_t rows = c.start_pos + c.n_new + 3;  // Cache may be longer than needed.
      // Scores spread enough to exercise the online-softmax rescaling.
      std::vector<float> q = RandomVector(c.n_new * c.heads * c.dim, &rng, -2.0f, 2.0f);
      std::vector<float> k = RandomVector(rows * c.kv_heads * c.dim, &rng, -2.0f, 2.0f);
      std::vector<float> v = RandomVector(rows * c.kv_heads * c.dim, &rng);
      std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
      Attention(q.data(), k.data(), v.data(), c.start_pos, c.n_new, c.heads, c.kv_heads, c.dim,
                out.data());
      std::vector<double> ref =
          AttentionRef(q, k, v, c.start_pos, c.n_new, c.heads, c.kv_heads, c.dim);
      double worst = 0.0;
      for (size_t i = 0; i < out.size(); ++i) {
        double err = std::abs(out[i] - ref[i]) / std::max(1.0, std::abs(ref[i]));
        if (!(err <= worst)) worst = err;
      }
      EXPECT_LE(worst, 1e-5) << "start=" << c.start_pos << " n_new=" << c.n_new
                             << " heads=" << c.heads << "/" << c.kv_heads << " dim=" << c.dim
                             << " threads=" << threads;
    }
  }
  SetNumThreads(saved);
}

TEST(AttentionTest, PartsMatchWhole) {
  std::mt19937 rng(13);
  const std::vector<AttentionCase> cases = {
      {0, 1, 4, 2, 32}, {100, 1, 8, 4, 32}, {10, 50, 4, 2, 32}, {3, 9, 6, 3, 24}};
  for (const AttentionCase& c : cases) {
    const int64_t rows = c.start_pos + c.n_new;
    std::vector<float> q = RandomVector(c.n_new * c.heads * c.dim, &rng);
    std::vector<float> k = RandomVector(rows * c.kv_heads * c.dim, &rng);
    std::vector<float> v = RandomVector(rows * c.kv_heads * c.dim, &rng);
    std::vector<float> whole(q.size());
    Attention(q.data(), k.data(), v.data(), c.start_pos, c.n_new, c.heads, c.kv_heads, c.dim,
              whole.data());
    for (int parts : {1, 2, 3, 7}) {
      std::vector<float> split(q.size(), std::numeric_limits<float>::quiet_NaN());
      for (int p = 0; p < parts; ++p) {
        AttentionPart(q.data(), k.data(), v.data(), c.start_pos, c.n_new, c.heads, c.kv_heads,
                      c.dim, split.data(), p, parts);
      }
      EXPECT_EQ(0, std::memcmp(split.data(), whole.data(), whole.size() * sizeof(float)))
          << "parts=" << parts;
    }
  }
}

// A head-major cache (each kv head's rows contiguous, heads `head_stride` floats apart, as
// KvCache keeps them) gives exactly the interleaved cache's results.
TEST(AttentionTest, HeadMajorLayoutMatchesInterleaved) {
  std::mt19937 rng(17);
  const std::vector<AttentionCase> cases = {
      {0, 1, 4, 2, 32}, {100, 1, 8, 4, 32}, {10, 50, 4, 2, 32}, {40, 3, 32, 4, 128}, {7, 3, 4, 4, 5}};
  for (const AttentionCase& c : cases) {
    const int64_t rows = c.start_pos + c.n_new, slots = rows + 9;
    std::vector<float> q = RandomVector(c.n_new * c.heads * c.dim, &rng);
    std::vector<float> k = RandomVector(rows * c.kv_heads * c.dim, &rng);
    std::vector<float> v = RandomVector(rows * c.kv_heads * c.dim, &rng);
    std::vector<float> kh(slots * c.kv_heads * c.dim), vh(kh.size());
    for (int64_t g = 0; g < c.kv_heads; ++g) {
      for (int64_t p = 0; p < rows; ++p) {
        for (int64_t d = 0; d < c.dim; ++d) {
          kh[(g * slots + p) * c.dim + d] = k[(p * c.kv_heads + g) * c.dim + d];
          vh[(g * slots + p) * c.dim + d] = v[(p * c.kv_heads + g) * c.dim + d];
        }
      }
    }
    for (int threads : {1, 2}) {
      SetNumThreads(threads);
      std::vector<float> a(q.size()), b(q.size(), std::numeric_limits<float>::quiet_NaN());
      Attention(q.data(), k.data(), v.data(), c.start_pos, c.n_new, c.heads, c.kv_heads, c.dim,
                a.data());
      Attention(q.data(), kh.data(), vh.data(), c.start_pos, c.n_new, c.heads, c.kv_heads, c.dim,
                b.data(), /*row_stride=*/c.dim, /*head_stride=*/slots * c.dim);
      EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)))
          << "start=" << c.start_pos << " n_new=" << c.n_new << " threads=" << threads;
    }
  }
  SetNumThreads(2);
}

// A bf16 cache gives exactly the results of an fp32 cache holding the same (bf16-rounded)
// values: the AVX-512 and the generic paths, one and two threads.
TEST(AttentionTest, Bf16CacheMatchesFp32CacheOfTheSameValues) {
  std::mt19937 rng(19);
  const std::vector<AttentionCase> cases = {
      {0, 1, 4, 2, 32},   {37, 20, 4, 2, 32}, {300, 1, 4, 2, 32}, {9, 5, 8, 1, 24},
      {50, 3, 6, 3, 128}, {7, 3, 4, 4, 5},    {5, 70, 32, 4, 128}, {300, 2, 4, 2, 256}};
  for (const AttentionCase& c : cases) {
    const int64_t rows = c.start_pos + c.n_new;
    std::vector<float> q = RandomVector(c.n_new * c.heads * c.dim, &rng, -2.0f, 2.0f);
    std::vector<float> k = RandomVector(rows * c.kv_heads * c.dim, &rng, -2.0f, 2.0f);
    std::vector<float> v = RandomVector(rows * c.kv_heads * c.dim, &rng);
    std::vector<uint16_t> k16(k.size()), v16(v.size());
    for (size_t i = 0; i < k.size(); ++i) {
      k16[i] = F32ToBF16(k[i]);
      v16[i] = F32ToBF16(v[i]);
      k[i] = BF16ToF32(k16[i]);
      v[i] = BF16ToF32(v16[i]);
    }
    for (int threads : {1, 2}) {
      SetNumThreads(threads);
      std::vector<float> a(q.size()), b(q.size(), std::numeric_limits<float>::quiet_NaN());
      Attention(q.data(), k.data(), v.data(), c.start_pos, c.n_new, c.heads, c.kv_heads, c.dim,
                a.data());
      Attention(q.data(), k16.data(), v16.data(), c.start_pos, c.n_new, c.heads, c.kv_heads,
                c.dim, b.data());
      EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)))
          << "start=" << c.start_pos << " n_new=" << c.n_new << " dim=" << c.dim
          << " threads=" << threads;
    }
  }
  SetNumThreads(2);
}

// An int8 cache (a scale per position and kv head) against the double-precision reference over
// the values it holds (scale * int8), interleaved and head-major layouts, AVX-512 and generic
// head dims, one and two threads; zero rows (scale 0) included.
TEST(AttentionTest, Int8CacheMatchesReferenceOfItsValues) {
  std::mt19937 rng(23);
  const std::vector<AttentionCase> cases = {
      {0, 1, 4, 2, 32},   {37, 20, 4, 2, 32}, {300, 1, 4, 2, 32}, {9, 5, 8, 1, 24},
      {50, 3, 6, 3, 128}, {7, 3, 4, 4, 5},    {5, 70, 32, 4, 128}, {300, 2, 4, 2, 256},
      {1000, 1, 8, 4, 64}};
  for (const AttentionCase& c : cases) {
    const int64_t rows = c.start_pos + c.n_new, slots = rows + 5;
    std::vector<float> q = RandomVector(c.n_new * c.heads * c.dim, &rng, -2.0f, 2.0f);
    // Interleaved [rows, kv_heads, dim] int8 values with per-(row, head) scales.
    std::vector<int8_t> k8(rows * c.kv_heads * c.dim), v8(k8.size());
    std::vector<float> ks(rows * c.kv_heads), vs(ks.size());
    std::uniform_int_distribution<int> val(-127, 127);
    std::uniform_real_distribution<float> sc(0.001f, 0.03f);
    for (size_t i = 0; i < k8.size(); ++i) {
      k8[i] = static_cast<int8_t>(val(rng));
      v8[i] = static_cast<int8_t>(val(rng));
    }
    for (size_t i = 0; i < ks.size(); ++i) {
      ks[i] = i % 11 == 3 ? 0.0f : sc(rng);
      vs[i] = i % 7 == 2 ? 0.0f : sc(rng);
    }
    std::vector<float> k(k8.size()), v(v8.size());
    for (size_t i = 0; i < k.size(); ++i) {
      k[i] = ks[i / c.dim] * k8[i];
      v[i] = vs[i / c.dim] * v8[i];
    }
    // The same in a head-major layout: rows of head g at g * slots, scales likewise.
    std::vector<int8_t> kh(slots * c.kv_heads * c.dim), vh(kh.size());
    std::vector<float> ksh(slots * c.kv_heads), vsh(ksh.size());
    for (int64_t g = 0; g < c.kv_heads; ++g) {
      for (int64_t p = 0; p < rows; ++p) {
        ksh[g * slots + p] = ks[p * c.kv_heads + g];
        vsh[g * slots + p] = vs[p * c.kv_heads + g];
        for (int64_t d = 0; d < c.dim; ++d) {
          kh[(g * slots + p) * c.dim + d] = k8[(p * c.kv_heads + g) * c.dim + d];
          vh[(g * slots + p) * c.dim + d] = v8[(p * c.kv_heads + g) * c.dim + d];
        }
      }
    }
    const std::vector<double> ref =
        AttentionRef(q, k, v, c.start_pos, c.n_new, c.heads, c.kv_heads, c.dim);
    for (int threads : {1, 2}) {
      SetNumThreads(threads);
      std::vector<float> a(q.size(), std::numeric_limits<float>::quiet_NaN()), b = a;
      Attention(q.data(), k8.data(), v8.data(), ks.data(), vs.data(), c.start_pos, c.n_new,
                c.heads, c.kv_heads, c.dim, a.data());
      Attention(q.data(), kh.data(), vh.data(), ksh.data(), vsh.data(), c.start_pos, c.n_new,
                c.heads, c.kv_heads, c.dim, b.data(), /*row_stride=*/c.dim,
                /*head_stride=*/slots * c.dim, /*scale_row_stride=*/1,
                /*scale_head_stride=*/slots);
      EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)))
          << "layouts differ: start=" << c.start_pos << " n_new=" << c.n_new;
      double worst = 0.0;
      for (size_t i = 0; i < a.size(); ++i) {
        const double err = std::abs(a[i] - ref[i]) / std::max(1.0, std::abs(ref[i]));
        if (!(err <= worst)) worst = err;
      }
      EXPECT_LE(worst, 1e-5) << "start=" << c.start_pos << " n_new=" << c.n_new
                             << " heads=" << c.heads << "/" << c.kv_heads << " dim=" << c.dim
                             << " threads=" << threads;
    }
  }
  SetNumThreads(2);
}

TEST(AttentionTest, SingleKeyReturnsValue) {
  std::mt19937 rng(12);
  std::vector<float> q = RandomVector(4 * 32, &rng), k = RandomVector(2 * 32, &rng),
                     v = RandomVector(2 * 32, &rng);
  std::vector<float> out(4 * 32);
  Attention(q.data(), k.data(), v.data(), 0, 1, 4, 2, 32, out.data());
  for (int h = 0; h < 4; ++h) {
    for (int d = 0; d < 32; ++d) EXPECT_EQ(out[h * 32 + d], v[(h / 2) * 32 + d]);
  }
}

}  // namespace
}  // namespace ops
}  // namespace moemesh
