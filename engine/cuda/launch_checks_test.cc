// Host-side choices and argument checks of the CUDA launch functions: nothing is launched, so
// these run wherever the CUDA build does, GPU or not (apart from //engine/cuda:cuda_engine_test,
// whose cases all need a GPU and report themselves skipped without one).
#include "engine/cuda/kernels.h"
#include "gtest/gtest.h"

namespace moemesh {
namespace {

TEST(CudaLaunchChecksTest, SplitsAndRefusals) {
  EXPECT_EQ(cuda::AttentionSplits(1, 32, 63), 1) << "a few positions stay unsplit";
  EXPECT_EQ(cuda::AttentionSplits(1, 32, 64), 2) << "at least 32 positions per split";
  EXPECT_EQ(cuda::AttentionSplits(1, 32, 200), 4);
  EXPECT_GE(cuda::AttentionSplits(1, 32, 4096), 4) << "one long sequence's decode is split";
  EXPECT_EQ(cuda::AttentionSplits(1, 1, 1 << 20), 16) << "at most 16";
  EXPECT_EQ(cuda::AttentionSplits(4096, 32, 4096), 1) << "a prefill fills the GPU unsplit";
  EXPECT_EQ(cuda::AttentionSplits(8, 32, 4096), 1) << "8 sequences' 256 blocks fill the GPU";
  EXPECT_EQ(cuda::RouteAndGroup(nullptr, cuda::kRouteMaxRows + 1, 128, nullptr, 8, true, nullptr,
                                nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::PagedAttention(nullptr, 1, 8, 2, 64, 0, cuda::PagedKv(), nullptr, nullptr, 4,
                                 nullptr),
            cudaErrorInvalidValue)
      << "splits need a partials buffer";
  cuda::PadMap too_many;
  too_many.groups = cuda::kMaxPadGroups + 1;
  EXPECT_EQ(cuda::PadRowsToBf16(nullptr, 8, too_many, nullptr, nullptr), cudaErrorInvalidValue);
  cuda::BatchList list;
  list.n = cuda::kMaxPadGroups + 1;
  EXPECT_EQ(cuda::FillBatchPointers(list, nullptr, 0, nullptr, 0, nullptr, 0, nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::ArgMaxRows(nullptr, 1, 0, nullptr, nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace moemesh
