// Grouped expert GEMM throughput on the GPU against one dense cuBLAS GEMM of the same FLOPs.
//
//   expert_gemm_bench [--tokens=4096] [--experts=128] [--top_k=8] [--hidden=2048] [--width=768]
//                     [--streams=64] [--iters=20] [--decode_products] [--heads=32] [--kv_heads=4]
//                     [--head_dim=128] [--vocab=151936] [--decode_attention]
//                     [--attention_contexts=128,512,2048,8192] [--bucket_fills=0.8,0.9,0.95,1]
//
// Routes `tokens` rows uniformly at random to `top_k` of `experts` experts (Qwen3-30B-A3B's
// expert shape by default, bf16 weights) and times the expert computation as a prefill MoE layer
// on the GPU runs it (GroupedSwiGlu: the tokens' rows read in place as they are padded (one
// strided bucket by slot, or buckets of similar size), batched gate/up GEMMs, SwiGLU, batched
// down GEMMs, output left for the combine), and each of its paths and layouts by name (buckets,
// strided, blocks of 64 and 128 rows, cuBLAS grouped, one GEMM per expert), against dense bf16
// GEMMs [A, hidden] x [hidden, 2 width] and [A, width] x [width, hidden] with A = tokens * top_k.
// Also times single-token decode (top_k experts, one row each: the small-batch kernel) and the
// decode step of --streams sequences (their rows grouped by expert on the device, all experts
// in two launches) as achieved GB/s of the expert weights they read. And (--decode_products) each
// one-row product of a decode step of that shape with each split of its sums, and
// (--decode_attention) decode attention with each split count.
#include <algorithm>
#include <chrono>
#include <numeric>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "engine/cuda/cuda_engine.h"
#include "engine/expert_groups.h"

ABSL_FLAG(int64_t, tokens, 4096, "Rows routed (prefill-sized batch).");
ABSL_FLAG(int64_t, experts, 128, "Experts.");
ABSL_FLAG(int64_t, top_k, 8, "Experts per row.");
ABSL_FLAG(int64_t, hidden, 2048, "Hidden size.");
ABSL_FLAG(int64_t, width, 768, "Expert width (moe_intermediate_size).");
ABSL_FLAG(int32_t, iters, 20, "Timed iterations.");
ABSL_FLAG(int64_t, streams, 64, "Sequences of the batched-decode figure (one row each).");
ABSL_FLAG(bool, decode_products, true,
          "Also time each one-row product of a decode step of this shape (qkv, o, router, the "
          "experts' gate/up and down, LM head) with each split of the one-row kernel's sums and "
          "with its weight loads issued 4 steps at a time (auto, deep: SmallMChoice::kOneDeep; "
          "products with the norm taken in run as auto there), in CUDA graphs, against a "
          "device-to-device copy's bandwidth.");
ABSL_FLAG(int64_t, heads, 32, "Query heads (decode products and attention).");
ABSL_FLAG(int64_t, kv_heads, 4, "KV heads (decode products and attention).");
ABSL_FLAG(int64_t, head_dim, 128, "Head dimension (decode products and attention).");
ABSL_FLAG(int64_t, vocab, 151936, "Vocabulary (decode products' LM head).");
ABSL_FLAG(bool, decode_attention, true,
          "Also time decode attention over a paged KV cache (1 and --streams sequences, each "
          "context of --attention_contexts, fp32 and bf16 caches) with the engine's splits and "
          "each split forced, in CUDA graphs.");
ABSL_FLAG(std::vector<std::string>, attention_contexts,
          std::vector<std::string>({"128", "512", "2048", "8192"}),
          "Decode attention: cached positions per sequence.");
ABSL_FLAG(std::vector<std::string>, bucket_fills,
          std::vector<std::string>({"0.8", "0.9", "0.95", "1"}),
          "The batched path with each of these bucket fills (PadGroups: a group joins a bucket "
          "while its rows fill at least that share of the bucket's; fewer buckets pad more). "
          "The engine's is cuda::kBucketFill.");
ABSL_FLAG(int64_t, weight_pool_mb, 256,
          "Decode products: each product's weights are copied until the copies fill this many MiB "
          "and the timed launches go round them, so they read HBM rather than the L2 cache "
          "(50 MB on an H100); also the size of the reference copy. 0: one copy.");

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

bool ParseNumber(const std::string& s, double* v) { return absl::SimpleAtod(s, v); }
bool ParseNumber(const std::string& s, int64_t* v) { return absl::SimpleAtoi(s, v); }

// The values of a list flag, each parsed and accepted by `ok`; false (after saying which value
// is not `what`) if one is not.
template <typename T, typename Ok>
bool ParseList(const char* flag, const char* what, const std::vector<std::string>& values, Ok ok,
               std::vector<T>* out) {
  for (const std::string& s : values) {
    T v{};
    if (!ParseNumber(s, &v) || !ok(v)) {
      std::fprintf(stderr, "--%s: not %s: %s\n", flag, what, s.c_str());
      return false;
    }
    out->push_back(v);
  }
  return true;
}

// Device group arrays (Groups) for groups of rows [begin[g], begin[g + 1]) on matrices slot[g],
// in `buf`: the count, the slots, then the row offsets.
absl::StatusOr<Groups> UploadGroups(const std::vector<int32_t>& slot,
                                    const std::vector<int32_t>& begin, int32_t max_groups,
                                    DeviceBuffer* buf) {
  const int32_t n = static_cast<int32_t>(slot.size());
  std::vector<int32_t> packed = {n};
  packed.insert(packed.end(), slot.begin(), slot.end());
  packed.insert(packed.end(), begin.begin(), begin.end());
  absl::Status st = buf->Reserve(packed.size() * 4);
  if (!st.ok()) return st;
  cudaMemcpy(buf->get(), packed.data(), packed.size() * 4, cudaMemcpyHostToDevice);
  const int32_t* pk = buf->as<int32_t>();
  return Groups{pk, pk + 1, pk + 1 + n, max_groups};
}

// Milliseconds per launch of `launch(rep)` for reps 0..reps-1 captured into one CUDA graph
// (the decode step's way with --cuda_graphs: no host launch cost), replayed `iters` times.
template <typename F>
double GraphMs(Exec& ex, int reps, int iters, F&& launch) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  if (cudaStreamBeginCapture(ex.stream(), cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
    return -1;
  }
  for (int r = 0; r < reps; ++r) launch(r);
  if (cudaStreamEndCapture(ex.stream(), &graph) != cudaSuccess ||
      cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    return -1;
  }
  const double ms = TimeMs(ex, iters, [&] { cudaGraphLaunch(exec, ex.stream()); }) / reps;
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return ms;
}

// The one-row products of one sequence's decode step (m = 1) for the model's shape, each timed
// with the engine's choice and with every split of the one-row kernel's sums forced, from enough
// copies of the weights that they are read from HBM, not L2. Prints a table; 0 on success.
int DecodeProducts(Exec& ex, int iters, int64_t E, int64_t K, int64_t H, int64_t W) {
  const int64_t nh = absl::GetFlag(FLAGS_heads), nkv = absl::GetFlag(FLAGS_kv_heads),
                hd = absl::GetFlag(FLAGS_head_dim), V = absl::GetFlag(FLAGS_vocab);
  struct Product {
    const char* name;
    int64_t out, in, groups;  // groups > 0: one row to each of `groups` matrices
    bool swiglu, norm;
  };
  const std::vector<Product> products = {
      {"qkv", (nh + 2 * nkv) * hd, H, 0, false, false},
      {"qkv + RMSNorm", (nh + 2 * nkv) * hd, H, 0, false, true},
      {"o", H, nh * hd, 0, false, false},
      {"router + RMSNorm", E, H, 0, false, true},
      {"experts gate/up (SwiGLU)", W, H, K, true, false},
      {"experts down", H, W, K, false, false},
      {"LM head + RMSNorm", V, H, 0, false, true},
  };
  const int64_t pool_bytes = absl::GetFlag(FLAGS_weight_pool_mb) << 20;
  // The reference: a device-to-device copy of the pool's size (bytes read + written per second).
  const int64_t copy_bytes = std::max<int64_t>(pool_bytes, 1 << 20);
  DeviceBuffer ca, cb;
  if (!ca.Reserve(copy_bytes).ok() || !cb.Reserve(copy_bytes).ok()) return 1;
  const double copy_ms = TimeMs(ex, iters, [&] {
    cudaMemcpyAsync(cb.get(), ca.get(), copy_bytes, cudaMemcpyDeviceToDevice, ex.stream());
  });
  std::printf("decode products (m = 1, bf16 weights, weights read from HBM), us per product and GB/s "
              "of weights; device-to-device copy %.0f GB/s (read + write)\n",
              2.0 * copy_bytes / copy_ms / 1e6);
  const std::vector<std::pair<const char*, SmallMChoice>> choices = {
      {"auto", SmallMChoice::kAuto},     {"split 1", SmallMChoice::kSplit1},
      {"split 2", SmallMChoice::kSplit2}, {"split 4", SmallMChoice::kSplit4},
      {"split 8", SmallMChoice::kSplit8}, {"auto, deep", SmallMChoice::kOneDeep}};
  std::printf("  %-26s %8s %6s", "product", "MB", "auto");
  for (const auto& c : choices) std::printf(" %17s", c.first);
  std::printf(" %17s\n", "auto, no graph");
  for (const Product& p : products) {
    const int64_t mats = std::max<int64_t>(p.groups, 1);
    const int64_t mat_rows = p.swiglu ? 2 * p.out : p.out;
    const int64_t bytes = mats * mat_rows * p.in * 2;
    const int64_t copies = std::max<int64_t>(1, (pool_bytes + bytes - 1) / bytes);
    DeviceBuffer w, x, y, norm_w, xn, d_groups;
    if (!w.Reserve(copies * bytes).ok() || !x.Reserve(mats * p.in * 4).ok() ||
        !y.Reserve(mats * p.out * 4).ok() || !norm_w.Reserve(p.in * 4).ok() ||
        !xn.Reserve(p.in * 4).ok()) {
      std::printf("  %-26s out of device memory\n", p.name);
      continue;
    }
    FillRandom(w.get(), WType::kBF16, copies * bytes / 2, 11, 0.02f, false, ex.stream());
    FillRandom(x.get(), WType::kF32, mats * p.in, 12, 1.0f, false, ex.stream());
    FillRandom(norm_w.get(), WType::kF32, p.in, 13, 1.0f, false, ex.stream());
    Groups groups;
    if (p.groups > 0) {
      // Group g: row g with matrix g (the step's K experts, one row each).
      std::vector<int32_t> slot(p.groups), begin(p.groups + 1);
      std::iota(slot.begin(), slot.end(), 0);
      std::iota(begin.begin(), begin.end(), 0);
      auto up = UploadGroups(slot, begin, static_cast<int32_t>(p.groups), &d_groups);
      if (!up.ok()) return 1;
      groups = *up;
    }
    SmallMFusion fz;
    if (p.norm) {
      fz.norm_w = norm_w.as<float>();
      fz.eps = 1e-6f;
      fz.xn = xn.as<float>();
    }
    const int64_t m = p.groups > 0 ? p.groups : 1;
    auto launch = [&](SmallMChoice choice, int rep) {
      const char* wc = static_cast<const char*>(w.get()) + (rep % copies) * bytes;
      SmallMLinear(wc, WType::kBF16, nullptr, p.out, p.in, x.as<float>(), m, y.as<float>(),
                   p.out, false, p.swiglu, groups, ex.stream(), choice, fz);
    };
    const int reps = static_cast<int>(std::max<int64_t>(copies, 16) / copies * copies);
    std::printf("  %-26s %8.1f %6d", p.name, bytes / 1e6,
                SmallMSplit(p.out, std::max<int64_t>(p.groups, 1)));
    for (const auto& c : choices) {
      const double ms = GraphMs(ex, reps, iters, [&](int r) { launch(c.second, r); });
      if (ms <= 0) {
        std::printf(" %17s", "capture failed");
      } else {
        std::printf(" %7.1f us %5.0f", ms * 1e3, bytes / ms / 1e6);
      }
    }
    int rep = 0;
    const double plain_ms = TimeMs(ex, reps * iters, [&] { launch(SmallMChoice::kAuto, rep++); });
    std::printf(" %7.1f us %5.0f\n", plain_ms * 1e3, bytes / plain_ms / 1e6);
    if (!ex.Sync().ok()) return 1;
  }
  return 0;
}

// Decode attention: 1 and `streams` sequences of each of `contexts` cached positions (one query
// row each, page size 16, one layer), timed with the engine's split count (AttentionSplits, the
// combine by each (token, head)'s last block) and with 1..16 splits forced. Prints a table; 0 on
// success.
int DecodeAttention(Exec& ex, int iters, int64_t streams, const std::vector<int64_t>& contexts) {
  const int64_t nh = absl::GetFlag(FLAGS_heads), nkv = absl::GetFlag(FLAGS_kv_heads),
                hd = absl::GetFlag(FLAGS_head_dim), kvd = nkv * hd, page = 16;
  const std::vector<int> splits = {1, 2, 4, 8, 16};
  std::printf("decode attention (%lld heads, %lld KV heads, head_dim %lld; page 16), us per layer "
              "and GB/s of the KV read\n",
              static_cast<long long>(nh), static_cast<long long>(nkv), static_cast<long long>(hd));
  std::printf("  %-30s %6s", "sequences x context, cache", "auto");
  for (int sp : splits) std::printf(" %11s%-2d", "splits ", sp);
  std::printf("\n");
  for (const int64_t context : contexts) {
    for (int64_t T : {int64_t{1}, streams}) {
      for (bool bf16 : {false, true}) {
        const int64_t P = (context + 1 + page - 1) / page;  // pages per sequence
        const int64_t elem = bf16 ? 2 : 4;
        DeviceBuffer pool, q, out, partial, counters, pages, page_off, pos;
        std::vector<int32_t> h_pages(T * P), h_off(T), h_pos(T, static_cast<int32_t>(context));
        for (int64_t i = 0; i < T * P; ++i) h_pages[i] = static_cast<int32_t>(i);
        for (int64_t t = 0; t < T; ++t) h_off[t] = static_cast<int32_t>(t * P);
        if (!pool.Reserve(T * P * 2 * page * kvd * elem).ok() || !q.Reserve(T * nh * hd * 4).ok() ||
            !out.Reserve(T * nh * hd * 4).ok() ||
            !partial.Reserve(T * nh * 16 * (hd + 2) * 4).ok() ||
            !counters.Reserve(T * nh * 4).ok() || !pages.Reserve(T * P * 4).ok() ||
            !page_off.Reserve(T * 4).ok() || !pos.Reserve(T * 4).ok()) {
          std::printf("  %lld x %lld: out of device memory\n", static_cast<long long>(T),
                      static_cast<long long>(context));
          continue;
        }
        FillRandom(pool.get(), bf16 ? WType::kBF16 : WType::kF32, T * P * 2 * page * kvd, 21,
                   1.0f, false, ex.stream());
        FillRandom(q.get(), WType::kF32, T * nh * hd, 22, 1.0f, false, ex.stream());
        cudaMemsetAsync(counters.get(), 0, T * nh * 4, ex.stream());
        cudaMemcpy(pages.get(), h_pages.data(), h_pages.size() * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(page_off.get(), h_off.data(), T * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(pos.get(), h_pos.data(), T * 4, cudaMemcpyHostToDevice);
        PagedKv kv;
        kv.pool = pool.get();
        kv.bf16 = bf16;
        kv.page_size = page;
        kv.num_layers = 1;
        kv.kv_dim = kvd;
        kv.pages = pages.as<int32_t>();
        kv.page_off = page_off.as<int32_t>();
        kv.pos = pos.as<int32_t>();
        const double bytes = static_cast<double>(T) * (context + 1) * 2 * kvd * elem;
        const int automatic = AttentionSplits(T, nh, context + 1);
        char label[64];
        std::snprintf(label, sizeof(label), "%lld x %lld, %s", static_cast<long long>(T),
                      static_cast<long long>(context), bf16 ? "bf16" : "fp32");
        std::printf("  %-30s %6d", label, automatic);
        for (int sp : splits) {
          const double ms = GraphMs(ex, 16, iters, [&](int) {
            PagedAttention(q.as<float>(), T, nh, nkv, hd, 0, kv, out.as<float>(), ex.stream(), sp,
                           partial.as<float>(), counters.as<uint32_t>());
          });
          if (ms <= 0) {
            std::printf(" %13s", "failed");
          } else {
            std::printf(" %6.1f %6.0f", ms * 1e3, bytes / ms / 1e6);
          }
        }
        std::printf("\n");
        if (!ex.Sync().ok()) return 1;
      }
    }
  }
  return 0;
}

int Main() {
  const int64_t T = absl::GetFlag(FLAGS_tokens), E = absl::GetFlag(FLAGS_experts),
                K = absl::GetFlag(FLAGS_top_k), H = absl::GetFlag(FLAGS_hidden),
                W = absl::GetFlag(FLAGS_width);
  const int iters = absl::GetFlag(FLAGS_iters);
  std::vector<double> fills;
  std::vector<int64_t> contexts;
  if (!ParseList("bucket_fills", "a share in (0, 1]", absl::GetFlag(FLAGS_bucket_fills),
                 [](double f) { return f > 0 && f <= 1; }, &fills) ||
      !ParseList("attention_contexts", "a positive count",
                 absl::GetFlag(FLAGS_attention_contexts), [](int64_t c) { return c > 0; },
                 &contexts)) {
    return 1;
  }
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
  // slots), the groups' row offsets and, if `token` is given, each grouped row's token.
  std::mt19937 g(7);
  auto route = [&](int64_t tokens, std::vector<int32_t>* slot, std::vector<int32_t>* begin,
                   std::vector<int32_t>* token = nullptr) {
    std::vector<std::vector<int32_t>> rows(E);
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<int64_t> pick(E);
      for (int64_t e = 0; e < E; ++e) pick[e] = e;
      std::shuffle(pick.begin(), pick.end(), g);
      for (int64_t j = 0; j < K; ++j) rows[pick[j]].push_back(static_cast<int32_t>(t));
    }
    *begin = {0};
    for (int64_t e = 0; e < E; ++e) {
      if (rows[e].empty()) continue;
      slot->push_back(static_cast<int32_t>(e));
      begin->push_back(begin->back() + static_cast<int32_t>(rows[e].size()));
      if (token != nullptr) token->insert(token->end(), rows[e].begin(), rows[e].end());
    }
  };
  const int64_t A = T * K;
  // x: A rows already in grouped order (the paths by name below, the decode figures); x_tok:
  // the T tokens' rows, which the engine's prefill reads in place (x_rows) as it pads them.
  DeviceBuffer x, x_tok, d_x_rows, act, y, xb, ab, dense_gu;
  CHECK_OK(x.Reserve(A * H * 4));
  CHECK_OK(x_tok.Reserve(T * H * 4));
  CHECK_OK(act.Reserve(A * W * 4));
  CHECK_OK(y.Reserve(A * H * 4));
  FillRandom(x.get(), WType::kF32, A * H, 3, 1.0f, false, ex.stream());
  FillRandom(x_tok.get(), WType::kF32, T * H, 4, 1.0f, false, ex.stream());
  const double flops = 2.0 * A * H * (2 * W) + 2.0 * A * W * H;

  std::vector<int32_t> slot, row_begin, x_rows;
  route(T, &slot, &row_begin, &x_rows);
  CHECK_OK(d_x_rows.Reserve(A * 4));
  cudaMemcpy(d_x_rows.get(), x_rows.data(), A * 4, cudaMemcpyHostToDevice);
  const int32_t* rows_in_place = d_x_rows.as<int32_t>();
  // The engine's choice as a prefill MoE layer runs it (GroupedSwiGlu reading the tokens' rows
  // in place and leaving its output for the combine: padded bf16 rows on the batched way), then
  // with y unpadded to fp32 in grouped order, then each path by name.
  GroupedOut in_place;
  const double grouped_ms = TimeMs(ex, iters, [&] {
    (void)GroupedSwiGlu(ex, gu, down, slot, row_begin, x_tok.as<float>(), nullptr, rows_in_place,
                        &in_place);
  });
  const std::string path = LastGroupedSwiGluPath();
  const double unpadded_ms = TimeMs(ex, iters, [&] {
    (void)GroupedSwiGlu(ex, gu, down, slot, row_begin, x_tok.as<float>(), y.as<float>(),
                        rows_in_place);
  });
  // Each layout's padded rows as the engine plans them (PlanBatched; none where it refuses the
  // layout, as strided for slots that do not ascend).
  auto planned = [](const std::vector<int32_t>& s, const std::vector<int32_t>& b, double fill,
                    BatchedLayout layout) {
    absl::StatusOr<BatchedPlan> p = PlanBatched(s, b, fill, layout);
    return p.ok() ? *p : BatchedPlan();
  };
  auto share = [&](BatchedLayout layout, double fill = kBucketFill) {
    return static_cast<double>(planned(slot, row_begin, fill, layout).buckets.padded_rows()) / A;
  };
  const PaddedBuckets pb = planned(slot, row_begin, kBucketFill, BatchedLayout::kBuckets).buckets;
  auto time_path = [&](const char* name, auto&& run) {
    absl::Status st = run();
    if (!st.ok()) {
      std::printf("  %-30s refused: %s\n", name, st.ToString().c_str());
      return 0.0;
    }
    return TimeMs(ex, iters, [&] { (void)run(); });
  };
  auto batched_with = [&](const char* name, double fill, BatchedLayout layout) {
    return time_path(name, [&] {
      return BatchedSwiGlu(ex, gu, down, slot, row_begin, x_tok.as<float>(), y.as<float>(),
                           rows_in_place, nullptr, fill, layout);
    });
  };
  const double batched_ms = batched_with("batched (padded buckets)", kBucketFill,
                                         BatchedLayout::kBuckets);
  const double strided_ms = batched_with("strided (one bucket by slot)", kBucketFill,
                                         BatchedLayout::kStrided);
  const double blocks64_ms = batched_with("blocks of 64 rows", kBucketFill,
                                          BatchedLayout::kBlocks64);
  const double blocks128_ms = batched_with("blocks of 128 rows", kBucketFill,
                                           BatchedLayout::kBlocks128);
  const double cublas_grouped_ms = time_path("cuBLAS grouped", [&] {
    return CublasGroupedSwiGlu(ex, gu, down, slot, row_begin, x.as<float>(), y.as<float>());
  });
  // The batched path with other bucket fills: fewer, more padded buckets or more, tighter ones.
  std::string by_fill;
  for (const double fill : fills) {
    const double ms = batched_with("batched, other fill", fill, BatchedLayout::kBuckets);
    by_fill += absl::StrFormat(
        "%s%.2f: %.3f ms (%d buckets, %.3f x)", by_fill.empty() ? "" : ", ", fill, ms,
        planned(slot, row_begin, fill, BatchedLayout::kBuckets).buckets.buckets(),
        share(BatchedLayout::kBuckets, fill));
  }
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
  auto sg_or = UploadGroups(sslot, sbegin, static_cast<int32_t>(std::min(S * K, E)), &d_sgroups);
  CHECK_OK(sg_or.status());
  const Groups sg = *sg_or;
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
  const double streams_deep_ms = streams_with(SmallMChoice::kMultiDeep);
  const double streams_multi8_ms = streams_with(SmallMChoice::kMulti8);
  // The same products as cuBLAS's strided batched GEMMs (BatchedSwiGlu, every group padded to the
  // largest one's rows, with its bf16 padding, SwiGLU and widening passes): tensor cores instead
  // of the small-batch kernels' FMAs.
  const PaddedBuckets s_by_slot =
      planned(sslot, sbegin, kBucketFill, BatchedLayout::kStrided).buckets;
  const double streams_strided_ms = time_path("decode streams, strided", [&] {
    return BatchedSwiGlu(ex, gu, down, sslot, sbegin, x.as<float>(), y.as<float>(), nullptr,
                         nullptr, kBucketFill, BatchedLayout::kStrided);
  });
  const double streams_bytes = sgroups * 3.0 * H * W * 2;
  CHECK_OK(ex.Sync());

  std::printf("expert_gemm_bench on %s: tokens=%lld experts=%lld top_k=%lld hidden=%lld width=%lld bf16\n",
              prop.name, static_cast<long long>(T), static_cast<long long>(E),
              static_cast<long long>(K), static_cast<long long>(H), static_cast<long long>(W));
  std::printf("  grouped experts (GroupedSwiGlu as a prefill MoE layer runs it, from %lld token rows): %8.3f ms  %7.1f TFLOP/s\n",
              static_cast<long long>(T),
              grouped_ms, flops / grouped_ms / 1e9);
  std::printf("  dense cuBLAS GEMMs of the same FLOPs:             %8.3f ms  %7.1f TFLOP/s\n",
              dense_ms, flops / dense_ms / 1e9);
  std::printf("  grouped / dense throughput: %.2f (target >= 0.70); path %s (padded rows %.3f x); with y unpadded to fp32: %.3f ms (%.2f)\n",
              dense_ms / grouped_ms, path.c_str(), share(BatchedLayout::kAuto), unpadded_ms,
              dense_ms / unpadded_ms);
  std::printf("  by path, y unpadded: batched %.3f ms (%d buckets, padded rows %.3f x), strided %.3f ms (one bucket by slot, padded rows %.3f x), blocks of 64 rows %.3f ms (%.3f x), of 128 rows %.3f ms (%.3f x), cuBLAS grouped %.3f ms, one GEMM per expert %.3f ms (these two: rows gathered beforehand)\n",
              batched_ms, pb.buckets(), share(BatchedLayout::kBuckets), strided_ms,
              share(BatchedLayout::kStrided), blocks64_ms, share(BatchedLayout::kBlocks64),
              blocks128_ms, share(BatchedLayout::kBlocks128), cublas_grouped_ms, per_group_ms);
  std::printf("  batched by bucket fill (engine: %.2f; strided where it pads at most %.0f%% more), y unpadded: %s\n",
              kBucketFill, kStridedSlack * 100, by_fill.c_str());
  std::printf("  decode, 1 row x %lld experts: %.1f us, %.0f GB/s of expert weights\n",
              static_cast<long long>(K), decode_ms * 1e3, decode_bytes / decode_ms / 1e6);
  std::printf("  decode of %lld streams (%lld rows over %d experts, 2 launches): %.1f us, %.0f GB/s of expert weights\n",
              static_cast<long long>(S), static_cast<long long>(SA), sgroups, streams_ms * 1e3,
              streams_bytes / streams_ms / 1e6);
  std::printf("    one-output kernel %.1f us (%.0f GB/s), multi-output kernel %.1f us (%.0f GB/s), "
              "the same with 2 steps of loads in flight %.1f us (%.0f GB/s), "
              "with 8 rows per pass %.1f us (%.0f GB/s); cuBLAS strided batched, %d rows per expert %.1f us (%.0f GB/s)\n",
              streams_one_ms * 1e3, streams_bytes / streams_one_ms / 1e6, streams_multi_ms * 1e3,
              streams_bytes / streams_multi_ms / 1e6, streams_deep_ms * 1e3,
              streams_bytes / streams_deep_ms / 1e6, streams_multi8_ms * 1e3,
              streams_bytes / streams_multi8_ms / 1e6,
              s_by_slot.buckets() > 0 ? s_by_slot.bucket_rows[0] : 0,
              streams_strided_ms * 1e3,
              streams_bytes / streams_strided_ms / 1e6);
  if (absl::GetFlag(FLAGS_decode_products) && DecodeProducts(ex, iters, E, K, H, W) != 0) return 1;
  if (absl::GetFlag(FLAGS_decode_attention) && DecodeAttention(ex, iters, S, contexts) != 0) {
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace cuda
}  // namespace moemesh

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return moemesh::cuda::Main();
}
