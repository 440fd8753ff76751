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
  // The one-row products' split of each sum over warps: doubled up to 4 while out * groups *
  // split < 2 * SMs * 32 (the same answers for the H100 SXM's and H200's 132 SMs, the PCIe
  // H100's 114, and the 132 assumed where there is no GPU).
  EXPECT_EQ(cuda::SmallMSplit(2048, 1), 4) << "Qwen3-30B-A3B's o projection";
  EXPECT_EQ(cuda::SmallMSplit(5120, 1), 2) << "its qkv";
  EXPECT_EQ(cuda::SmallMSplit(128, 1), 4) << "its router: at most 4";
  EXPECT_EQ(cuda::SmallMSplit(768, 8), 2) << "its experts' gate/up, 8 groups";
  EXPECT_EQ(cuda::SmallMSplit(2048, 8), 1) << "its experts' down: enough warps unsplit";
  EXPECT_EQ(cuda::SmallMSplit(151936, 1), 1) << "its LM head";
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
