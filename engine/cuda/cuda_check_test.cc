#include "engine/cuda/cuda_check.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace moemesh {
namespace cuda {
namespace {

TEST(CudaCheckTest, SaxpyMatchesHost) {
  if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  const int n = 100003;  // not a multiple of the block size
  std::vector<float> x(n), y(n), want(n);
  for (int i = 0; i < n; ++i) {
    x[i] = 0.5f * static_cast<float>(i % 97);
    y[i] = static_cast<float>(i % 13) - 6.0f;
    want[i] = 3.0f * x[i] + y[i];
  }
  std::string error;
  ASSERT_TRUE(Saxpy(n, 3.0f, x.data(), y.data(), &error)) << error;
  for (int i = 0; i < n; ++i) ASSERT_FLOAT_EQ(y[i], want[i]) << "at " << i;
  EXPECT_FALSE(DeviceName(0).empty());
}

}  // namespace
}  // namespace cuda
}  // namespace moemesh
