// Grouped expert GEMM throughput on the GPU against one dense cuBLAS GEMM of the same FLOPs.
//
//   expert_gemm_bench [--tokens=4096] [--experts=128] [--top_k=8] [--hidden=2048] [--width=768]
//                     [--streams=64] [--iters=20]
//
// Routes `tokens` rows uniformly at random to `top_k` of `experts` experts (Qwen3-30B-A3B's
// expert shape by default, bf16 weights) and times the expert computation as the expert worker
// runs it (per expert: gate/up GEMM, SwiGLU, down GEMM; cuda::Project), against dense bf16
// GEMMs [A, hidden] x [hidden, 2 width] and [A, width] x [width, hidden] with A = tokens * top_k.
// Also times single-token decode (top_k experts, one row each: the small-batch kernel) and the
// decode step of --streams sequences (their rows grouped by expert on the device, all experts
// in two launches) as achieved GB/s of the expert weights they read.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "engine/cuda/cuda_engine.h"
#include "engine/expert_groups.h"

ABSL_FLAG(int64_t, tokens, 4096, "Rows routed (prefill-sized batch).");
ABSL_FLAG(int64_t, experts, 128, "Experts.");
ABSL_FLAG(int64_t, top_k, 8, "Experts per row.");
ABSL_FLAG(int64_t, hidden, 2048, "Hidden size.");
ABSL_FLAG(int64_t, width, 768, "Expert width (moe_intermediate_size).");
ABSL_FLAG(int32_t, iters, 20, "Timed iterations.");
ABSL_FLAG(int64_t, streams, 64, "Sequences of the batched-decode figure (one row each).");

namespace moemesh {
namespace cuda {
namespace {

#define CHECK_OK(expr)                                                   \
  do {                                                                   \
    auto _s = (expr);                                                    \
    if (!_s.ok()) {                                                      \
      std::fprintf(stderr, "%s: %s\n", #expr, _s.ToString().c_str());  \
      return 1;                                                          \
    }                                                                    \
  } while (0)

template <typename F>
double TimeMs(Exec& ex, int iters, F&& f) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  f();  // warm-up
  cudaEventRecord(a, ex.stream());
  for (int i = 0; i < iters; ++i) f();
  cudaEventRecord(b, ex.stream());
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / iters;
}

int Main() {
  const int64_t T = absl::GetFlag(FLAGS_tokens), E = absl::GetFlag(FLAGS_experts),
                K = absl::GetFlag(FLAGS_top_k), H = absl::GetFlag(FLAGS_hidden),
                W = absl::GetFlag(FLAGS_width);
  const int iters = absl::GetFlag(FLAGS_iters);
  if (DeviceCount() == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  auto exs = Exec::Create(0);
  CHECK_OK(exs.status());
  Exec& ex = **exs;
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);

  DeviceMatrix gu, down;
  for (DeviceMatrix* m : {&gu, &down}) {
    m->wt = WType::kBF16;
    m->count = E;
  }
  gu.rows = 2 * W;
  gu.in = H;
  down.rows = H;
  down.in = W;
  CHECK_OK(gu.w.Reserve(E * 2 * W * H * 2));
  CHECK_OK(down.w.Reserve(E * H * W * 2));
  FillRandom(gu.w.get(), WType::kBF16, E * 2 * W * H, 1, 0.02f, false, ex.stream());
  FillRandom(down.w.get(), WType::kBF16, E * H * W, 2, 0.03f, false, ex.stream());

  // Uniform routing of `tokens` rows to K of E experts each: the experts with rows (their
  // slots) and the groups' row offsets.
  std::mt19937 g(7);
  auto route = [&](int64_t tokens, std::vector<int32_t>* slot, std::vector<int32_t>* begin) {
    std::vector<int64_t> rows(E, 0);
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<int64_t> pick(E);
      for (int64_t e = 0; e < E; ++e) pick[e] = e;
      std::shuffle(pick.begin(), pick.end(), g);
      for (int64_t j = 0; j < K; ++j) ++rows[pick[j]];
    }
    *begin = {0};
    for (int64_t e = 0; e < E; ++e) {
      if (rows[e] == 0) continue;
      slot->push_back(static_cast<int32_t>(e));
      begin->push_back(begin->back() + static_cast<int32_t>(rows[e]));
    }
  };
  const int64_t A = T * K;
  DeviceBuffer x, act, y, xb, ab, dense_gu;
  CHECK_OK(x.Reserve(A * H * 4));
  CHECK_OK(act.Reserve(A * W * 4));
  CHECK_OK(y.Reserve(A * H * 4));
  FillRandom(x.get(), WType::kF32, A * H, 3, 1.0f, false, ex.stream());
  const double flops = 2.0 * A * H * (2 * W) + 2.0 * A * W * H;

  std::vector<int32_t> slot, row_begin;
  route(T, &slot, &row_begin);
  // The engine's choice as the expert shards run it (GroupedSwiGlu leaving its output in place
  // for the combine: padded bf16 rows on the batched way), then with y unpadded to fp32 in
  // grouped order, then each path by name.
  GroupedOut in_place;
  const double grouped_ms = TimeMs(ex, iters, [&] {
    (void)GroupedSwiGlu(ex, gu, down, slot, row_begin, x.as<float>(), nullptr, nullptr,
                        &in_place);
  });
  const std::string path = LastGroupedSwiGluPath();
  const double unpadded_ms = TimeMs(ex, iters, [&] {
    (void)GroupedSwiGlu(ex, gu, down, slot, row_begin, x.as<float>(), y.as<float>());
  });
  const PaddedBuckets pb = PadGroups(row_begin);
  auto time_path = [&](const char* name, auto&& run) {
    absl::Status st = run();
    if (!st.ok()) {
      std::printf("  %-30s refused: %s\n", name, st.ToString().c_str());
      return 0.0;
    }
    return TimeMs(ex, iters, [&] { (void)run(); });
  };
  const double batched_ms = time_path("batched (padded buckets)", [&] {
    return BatchedSwiGlu(ex, gu, down, slot, row_begin, x.as<float>(), y.as<float>());
  });
  const double cublas_grouped_ms = time_path("cuBLAS grouped", [&] {
    return CublasGroupedSwiGlu(ex, gu, down, slot, row_begin, x.as<float>(), y.as<float>());
  });
  const double per_group_ms = time_path("one GEMM per expert", [&] {
    return PerGroupSwiGlu(ex, gu, down, slot, row_begin, x.as<float>(), y.as<float>());
  });

  // Dense: the same FLOPs as two bf16 GEMMs (inputs already bf16, fp32 out).
  CHECK_OK(xb.Reserve(A * H * 2));
  CHECK_OK(ab.Reserve(A * W * 2));
  CHECK_OK(dense_gu.Reserve(A * 2 * W * 4));
  ToBf16(x.as<float>(), A * H, xb.get(), ex.stream());
  ToBf16(act.as<float>(), A * W, ab.get(), ex.stream());
  const float one = 1.0f, zero = 0.0f;
  auto dense = [&] {
    cublasGemmEx(ex.blas(), CUBLAS_OP_T, CUBLAS_OP_N, 2 * W, A, H, &one, gu.w.get(), CUDA_R_16BF,
                 H, xb.get(), CUDA_R_16BF, H, &zero, dense_gu.get(), CUDA_R_32F, 2 * W,
                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    cublasGemmEx(ex.blas(), CUBLAS_OP_T, CUBLAS_OP_N, H, A, W, &one, down.w.get(), CUDA_R_16BF, W,
                 ab.get(), CUDA_R_16BF, W, &zero, y.get(), CUDA_R_32F, H, CUBLAS_COMPUTE_32F,
                 CUBLAS_GEMM_DEFAULT);
  };
  const double dense_ms = TimeMs(ex, iters, dense);

  // Decode: one row to each of K experts (small-batch kernel), weights read once.
  std::vector<int64_t> one_row(K);
  for (int64_t j = 0; j < K; ++j) one_row[j] = j * (E / K);
  auto decode = [&] {
    for (int64_t j = 0; j < K; ++j) {
      (void)Project(ex, gu, one_row[j], x.as<float>(), 1, act.as<float>() + j * W, W, false, true);
      (void)Project(ex, down, one_row[j], act.as<float>() + j * W, 1, y.as<float>() + j * H, H,
                    false, false);
    }
  };
  const double decode_ms = TimeMs(ex, iters * 10, decode);
  const double decode_bytes = K * 3.0 * H * W * 2;

  // Batched decode: `streams` rows routed to top_k experts each, all experts' products in two
  // launches of the small-batch kernel over device group arrays (as the attention worker's
  // in-process experts run a decode step of that many sequences).
  const int64_t S = absl::GetFlag(FLAGS_streams);
  std::vector<int32_t> sslot, sbegin;
  route(S, &sslot, &sbegin);
  const int32_t sgroups = static_cast<int32_t>(sslot.size());
  DeviceBuffer d_sgroups;
  CHECK_OK(d_sgroups.Reserve((1 + sslot.size() + sbegin.size()) * 4));
  std::vector<int32_t> packed = {sgroups};
  packed.insert(packed.end(), sslot.begin(), sslot.end());
  packed.insert(packed.end(), sbegin.begin(), sbegin.end());
  cudaMemcpy(d_sgroups.get(), packed.data(), packed.size() * 4, cudaMemcpyHostToDevice);
  const int32_t* pk = d_sgroups.as<int32_t>();
  const Groups sg{pk, pk + 1, pk + 1 + sgroups, static_cast<int32_t>(std::min(S * K, E))};
  const int64_t SA = S * K;
  auto streams_with = [&](SmallMChoice choice) {
    return TimeMs(ex, iters * 5, [&] {
      SmallMLinear(gu.w.get(), gu.wt, nullptr, W, H, x.as<float>(), SA, act.as<float>(), W,
                   false, true, sg, ex.stream(), choice);
      SmallMLinear(down.w.get(), down.wt, nullptr, H, W, act.as<float>(), SA, y.as<float>(), H,
                   false, false, sg, ex.stream(), choice);
    });
  };
  const double streams_ms = streams_with(SmallMChoice::kAuto);
  const double streams_one_ms = streams_with(SmallMChoice::kOne);
  const double streams_multi_ms = streams_with(SmallMChoice::kMulti);
  const double streams_bytes = sgroups * 3.0 * H * W * 2;
  CHECK_OK(ex.Sync());

  std::printf("expert_gemm_bench on %s: tokens=%lld experts=%lld top_k=%lld hidden=%lld width=%lld bf16\n",
              prop.name, static_cast<long long>(T), static_cast<long long>(E),
              static_cast<long long>(K), static_cast<long long>(H), static_cast<long long>(W));
  std::printf("  grouped experts (GroupedSwiGlu, as the workers run them): %8.3f ms  %7.1f TFLOP/s\n",
              grouped_ms, flops / grouped_ms / 1e9);
  std::printf("  dense cuBLAS GEMMs of the same FLOPs:             %8.3f ms  %7.1f TFLOP/s\n",
              dense_ms, flops / dense_ms / 1e9);
  std::printf("  grouped / dense throughput: %.2f (target >= 0.70); path %s; with y unpadded to fp32: %.3f ms (%.2f)\n",
              dense_ms / grouped_ms, path.c_str(), unpadded_ms, dense_ms / unpadded_ms);
  std::printf("  by path: batched %.3f ms (%d buckets, padded rows %.3f x), cuBLAS grouped %.3f ms, one GEMM per expert %.3f ms\n",
              batched_ms, pb.buckets(), static_cast<double>(pb.padded_rows()) / A,
              cublas_grouped_ms, per_group_ms);
  std::printf("  decode, 1 row x %lld experts: %.1f us, %.0f GB/s of expert weights\n",
              static_cast<long long>(K), decode_ms * 1e3, decode_bytes / decode_ms / 1e6);
  std::printf("  decode of %lld streams (%lld rows over %d experts, 2 launches): %.1f us, %.0f GB/s of expert weights\n",
              static_cast<long long>(S), static_cast<long long>(SA), sgroups, streams_ms * 1e3,
              streams_bytes / streams_ms / 1e6);
  std::printf("    one-output kernel %.1f us (%.0f GB/s), multi-output kernel %.1f us (%.0f GB/s)\n",
              streams_one_ms * 1e3, streams_bytes / streams_one_ms / 1e6, streams_multi_ms * 1e3,
              streams_bytes / streams_multi_ms / 1e6);
  return 0;
}

}  // namespace
}  // namespace cuda
}  // namespace moemesh

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return moemesh::cuda::Main();
}
