// The CUDA emulation itself: thread coordinates, barriers, shuffles, shared memory, launch
// checks, graph capture rules and the emulated cuBLAS GEMMs. (The engine's kernels are tested on
// it by :cuda_engine_emu_test and :model_emu_test.)
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <cstdlib>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "engine/cuda/emu/cuda_emu.h"
#include "gtest/gtest.h"

namespace {

// Each warp sums its lanes' values with a butterfly of shuffles; lane 0 writes the sum.
__global__ void WarpSumKernel(const float* x, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = x[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) out[i / 32] = v;
}

// Reverses each block's values through shared memory: right only with the barrier.
__global__ void ReverseKernel(const int* x, int* y, bool barrier) {
  __shared__ int buf[256];
  const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  buf[t] = x[base + t];
  if (barrier) __syncthreads();
  y[base + t] = buf[blockDim.x - 1 - t];
}

__global__ void DynamicSharedKernel(int n, float* out) {
  float* s = static_cast<float*>(::emu::DynamicShared());
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = static_cast<float>(i);
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0;
    for (int i = 0; i < n; ++i) sum += s[i];
    out[blockIdx.x] = sum;
  }
}

__global__ void CoordsKernel(int* out) {
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int t = threadIdx.x + blockDim.x * threadIdx.y;
  out[b * blockDim.x * blockDim.y + t] = 1000 * b + t;
}

__global__ void AddOneKernel(float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] += 1.0f;
}

TEST(EmuTest, ShufflesSumEachWarp) {
  std::vector<float> x(4 * 64);
  std::iota(x.begin(), x.end(), 0.0f);
  std::vector<float> out(8, -1.0f);
  emu::Launch(4, 64).With(WarpSumKernel)(x.data(), out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (int w = 0; w < 8; ++w) {
    float want = 0;
    for (int l = 0; l < 32; ++l) want += x[32 * w + l];
    EXPECT_EQ(out[w], want) << "warp " << w;
  }
}

TEST(EmuTest, SharedMemoryNeedsTheBarrier) {
  std::vector<int> x(2 * 256), y(x.size(), 0);
  std::iota(x.begin(), x.end(), 0);
  emu::Launch(2, 256).With(ReverseKernel)(x.data(), y.data(), true);
  for (int b = 0; b < 2; ++b) {
    for (int t = 0; t < 256; ++t) ASSERT_EQ(y[256 * b + t], x[256 * b + 255 - t]);
  }
  // Without it, threads run up to their end one after another: the first half reads slots
  // nobody wrote yet in this block (left from the previous block or launch), so the reversal
  // comes out wrong, as it may on a GPU.
  std::fill(y.begin(), y.end(), 0);
  std::vector<int> z(x.size());
  for (size_t i = 0; i < z.size(); ++i) z[i] = 100000 + static_cast<int>(i);
  emu::Launch(2, 256).With(ReverseKernel)(z.data(), y.data(), false);
  int wrong = 0;
  for (int b = 0; b < 2; ++b) {
    for (int t = 0; t < 256; ++t) wrong += y[256 * b + t] != z[256 * b + 255 - t];
  }
  EXPECT_GT(wrong, 0);
}

TEST(EmuTest, DynamicSharedMemoryAndCoordinates) {
  std::vector<float> sums(3, 0);
  emu::Launch(3, 128, 500 * sizeof(float)).With(DynamicSharedKernel)(500, sums.data());
  for (float s : sums) EXPECT_EQ(s, 499.0f * 500.0f / 2);

  std::vector<int> out(2 * 3 * 4 * 8 * 2, -1);
  emu::Launch(dim3(2, 3, 4), dim3(8, 2)).With(CoordsKernel)(out.data());
  for (int b = 0; b < 24; ++b) {
    for (int t = 0; t < 16; ++t) ASSERT_EQ(out[16 * b + t], 1000 * b + t);
  }
}

// As in CUDA: each host thread has its own last error, and the latest one is kept.
TEST(EmuTest, LastErrorIsPerThread) {
  std::vector<float> x(2048, 0.0f);
  std::thread other([&] {
    emu::Launch(1, 2048).With(AddOneKernel)(x.data(), 2048);
    EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  });
  other.join();
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  emu::Launch(1, 2048).With(AddOneKernel)(x.data(), 2048);      // too many threads
  emu::Launch(1, 32, 64 << 10).With(AddOneKernel)(x.data(), 32);  // then too much shared memory
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST(EmuTest, LaunchLimitsAreLaunchErrors) {
  std::vector<float> x(2048, 0.0f);
  emu::Launch(1, 2048).With(AddOneKernel)(x.data(), 2048);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // read and cleared
  EXPECT_EQ(x[0], 0.0f);
  emu::Launch(1, 32, 64 << 10).With(AddOneKernel)(x.data(), 32);  // > 48 KiB, not opted in
  EXPECT_NE(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(x[0], 0.0f);
}

TEST(EmuTest, CaptureRecordsAndReplays) {
  cudaStream_t st;
  ASSERT_EQ(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
  float* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, 64 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMemsetAsync(d, 0, 64 * sizeof(float), st), cudaSuccess);
  // Unsafe during a thread-local capture (a synchronous copy, an allocation; work on the legacy
  // stream while a blocking stream is captured): each fails and invalidates the capture.
  float host[64];
  cudaGraph_t graph = nullptr;
  cudaStream_t blocking;
  ASSERT_EQ(cudaStreamCreate(&blocking), cudaSuccess);
  for (int unsafe = 0; unsafe < 4; ++unsafe) {
    cudaStream_t cs = unsafe >= 2 ? blocking : st;
    ASSERT_EQ(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    emu::Launch(2, 32, 0, cs).With(AddOneKernel)(d, 64);
    void* p = nullptr;
    if (unsafe == 0) {
      EXPECT_EQ(cudaMemcpy(host, d, sizeof(host), cudaMemcpyDeviceToHost),
                cudaErrorStreamCaptureUnsupported);
    } else if (unsafe == 1) {
      EXPECT_EQ(cudaMalloc(&p, 16), cudaErrorStreamCaptureUnsupported);
    } else if (unsafe == 2) {
      emu::Launch(2, 32).With(AddOneKernel)(d, 64);
      EXPECT_EQ(cudaGetLastError(), cudaErrorStreamCaptureImplicit);
    } else {
      EXPECT_EQ(cudaMemsetAsync(d, 0, 4, nullptr), cudaErrorStreamCaptureImplicit);
    }
    EXPECT_EQ(cudaStreamEndCapture(cs, &graph), cudaErrorStreamCaptureInvalidated) << unsafe;
  }
  cudaStreamDestroy(blocking);
  EXPECT_EQ(d[0], 0.0f);  // nothing ran
  // A non-blocking stream's capture leaves the legacy stream free.
  ASSERT_EQ(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  float one = 1.0f, back = 0.0f;
  EXPECT_EQ(cudaMemcpyAsync(&back, &one, 4, cudaMemcpyHostToHost, nullptr), cudaSuccess);
  EXPECT_EQ(back, 1.0f);
  ASSERT_EQ(cudaStreamEndCapture(st, &graph), cudaSuccess);
  cudaGraphDestroy(graph);
  ASSERT_EQ(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  emu::Launch(2, 32, 0, st).With(AddOneKernel)(d, 64);
  ASSERT_EQ(cudaStreamEndCapture(st, &graph), cudaSuccess);
  EXPECT_EQ(d[0], 0.0f);  // recorded, not run
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(cudaGraphLaunch(exec, st), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(st), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(host, d, sizeof(host), cudaMemcpyDeviceToHost), cudaSuccess);
  for (float v : host) EXPECT_EQ(v, 3.0f);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaFree(d);
  cudaStreamDestroy(st);
}

TEST(EmuTest, StatisticsCountLaunchesAndReplays) {
  emu::EnableStatistics();
  const auto before = emu::Statistics();
  cudaStream_t st;
  ASSERT_EQ(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
  std::vector<float> x(32, 0.0f);
  for (int i = 0; i < 2; ++i) emu::Launch(1, 32, 0, st).With(AddOneKernel, "AddOne")(x.data(), 32);
  ASSERT_EQ(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  emu::Launch(1, 32, 0, st).With(AddOneKernel, "AddOne")(x.data(), 32);
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamEndCapture(st, &graph), cudaSuccess);
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(cudaGraphLaunch(exec, st), cudaSuccess);
  float y[32];
  ASSERT_EQ(cudaMemcpy(y, x.data(), sizeof(y), cudaMemcpyDeviceToHost), cudaSuccess);
  auto after = emu::Statistics();
  auto delta = [&](const std::string& k) {
    auto b = before.find(k);
    return after[k] - (b == before.end() ? 0 : b->second);
  };
  EXPECT_EQ(delta("launch AddOne"), 3);  // two, and one captured
  EXPECT_EQ(delta("run AddOne"), 5);     // two, and three replays
  EXPECT_EQ(delta("cudaGraphLaunch"), 3);
  EXPECT_EQ(delta("cudaMemcpy (synchronous) device->host"), 1);
  EXPECT_EQ(delta("cudaMemcpy (synchronous) device->host bytes"), 128);
  EXPECT_EQ(y[0], 5.0f);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(st);
}

// Column-major reference.
float Ref(const std::vector<float>& a, bool ta, int lda, const std::vector<float>& b, bool tb,
          int ldb, int i, int j, int k) {
  double s = 0;
  for (int l = 0; l < k; ++l) {
    s += double(ta ? a[l + i * lda] : a[i + l * lda]) * double(tb ? b[j + l * ldb] : b[l + j * ldb]);
  }
  return static_cast<float>(s);
}

TEST(EmuTest, CublasGemmsFollowTheColumnMajorConventions) {
  cublasHandle_t h;
  ASSERT_EQ(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1, 1);
  const int m = 5, n = 7, k = 19;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      const int lda = (ta ? k : m) + 2, ldb = (tb ? n : k) + 1, ldc = m + 3;
      std::vector<float> a(lda * (ta ? m : k)), b(ldb * (tb ? k : n)), c(ldc * n, 5.0f);
      for (float& v : a) v = u(rng);
      for (float& v : b) v = u(rng);
      const float alpha = 2.0f, beta = 0.5f;
      ASSERT_EQ(cublasGemmEx(h, ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N, m,
                             n, k, &alpha, a.data(), CUDA_R_32F, lda, b.data(), CUDA_R_32F, ldb,
                             &beta, c.data(), CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT),
                CUBLAS_STATUS_SUCCESS);
      for (int j = 0; j < n; ++j) {
        for (int i = 0; i < m; ++i) {
          EXPECT_NEAR(c[i + j * ldc], alpha * Ref(a, ta, lda, b, tb, ldb, i, j, k) + beta * 5.0f,
                      1e-4)
              << ta << tb << " " << i << "," << j;
        }
      }
    }
  }
  // Batched: each problem's pointers from the arrays; bf16 in, bf16 out.
  std::vector<__nv_bfloat16> a(2 * m * k), b(2 * k * n), c(2 * m * n);
  std::vector<float> af(a.size()), bf(b.size());
  for (size_t i = 0; i < a.size(); ++i) af[i] = __bfloat162float(a[i] = __float2bfloat16(u(rng)));
  for (size_t i = 0; i < b.size(); ++i) bf[i] = __bfloat162float(b[i] = __float2bfloat16(u(rng)));
  const void* ap[2] = {a.data(), a.data() + m * k};
  const void* bp[2] = {b.data(), b.data() + k * n};
  void* cp[2] = {c.data(), c.data() + m * n};
  const float one = 1.0f, zero = 0.0f;
  ASSERT_EQ(cublasGemmBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, ap, CUDA_R_16BF, m,
                                bp, CUDA_R_16BF, k, &zero, cp, CUDA_R_16BF, m, 2,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_SUCCESS);
  for (int p = 0; p < 2; ++p) {
    std::vector<float> ap_f(af.begin() + p * m * k, af.begin() + (p + 1) * m * k);
    std::vector<float> bp_f(bf.begin() + p * k * n, bf.begin() + (p + 1) * k * n);
    for (int j = 0; j < n; ++j) {
      for (int i = 0; i < m; ++i) {
        EXPECT_NEAR(__bfloat162float(c[p * m * n + i + j * m]),
                    Ref(ap_f, false, m, bp_f, false, k, i, j, k), 0.05);
      }
    }
  }
  // Combinations cuBLAS refuses are refused here too.
  float cf[64];
  EXPECT_EQ(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, a.data(), CUDA_R_16BF, m,
                         bf.data(), CUDA_R_32F, k, &zero, cf, CUDA_R_32F, m, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_NOT_SUPPORTED);
  EXPECT_EQ(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, af.data(), CUDA_R_32F, m - 1,
                         bf.data(), CUDA_R_32F, k, &zero, cf, CUDA_R_32F, m, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_INVALID_VALUE);
  cublasDestroy(h);
}

}  // namespace
