// Timing printout for the CPU ops (not a test). Usage:
//   linear_benchmark [--quick | --decode | --qwen3]
// Prints ns per call of Linear::Forward for the hand-written kernels ("small") and oneDNN, per
// shape, weight/compute type, batch size m and thread count, with the weights hot in cache;
// m=1 timings while cycling through enough distinct weights (96 MiB) that each call streams
// from memory; the Linear part of a decode step of the 17M test model; attention and the small
// kernels. --decode skips the per-shape tables. --qwen3 prints only the m=1 streaming rate of
// each product of a Qwen3-30B-A3B decode step (the memory-bound benchmark of docs/BENCHMARKS.md).

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "engine/dtype.h"
#include "engine/ops/attention.h"
#include "engine/ops/kernels.h"
#include "engine/ops/linear.h"
#include "engine/ops/threading.h"

namespace moemesh {
namespace ops {
namespace {

using Clock = std::chrono::steady_clock;

// Mean ns per call of fn() over `calls_per_batch` calls: the best of `reps` batches (the dev
// machine is shared, and the best batch is the one least disturbed).
template <typename F>
double TimeNs(F fn, int64_t calls_per_batch, int reps = 7) {
  for (int64_t i = 0; i < calls_per_batch / 4 + 1; ++i) fn();  // Warm up.
  double best = 1e300;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    for (int64_t i = 0; i < calls_per_batch; ++i) fn();
    auto t1 = Clock::now();
    best = std::min(best,
                    std::chrono::duration<double, std::nano>(t1 - t0).count() / calls_per_batch);
  }
  return best;
}

std::vector<uint16_t> RandomBF16(int64_t n, std::mt19937* rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = F32ToBF16(dist(*rng));
  return v;
}

const char* Name(ComputeType ct) { return ComputeTypeName(ct); }

struct Config {
  const char* name;
  DType wtype;
  ComputeType ct;
};
// fp32 storage; bf16 storage widened to fp32 (exact); bf16 math; int8 (quantised experts: no
// oneDNN path, so its "onednn" columns time the same kernels).
const Config kConfigs[] = {{"F32w/f32 ", DType::kF32, ComputeType::kF32},
                           {"BF16w/f32", DType::kBF16, ComputeType::kF32},
                           {"BF16w/bf16", DType::kBF16, ComputeType::kBF16},
                           {"BF16w/int8", DType::kBF16, ComputeType::kInt8},
                           {"BF16w/int4", DType::kBF16, ComputeType::kInt4}};

// Weights of the given type with random values in [-1, 1].
std::vector<uint16_t> RandomWeights(DType t, int64_t n, std::mt19937* rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<uint16_t> v(t == DType::kF32 ? 2 * n : n);
  for (int64_t i = 0; i < n; ++i) {
    const float f = dist(*rng);
    if (t == DType::kF32) {
      std::memcpy(&v[2 * i], &f, 4);
    } else {
      v[i] = F32ToBF16(f);
    }
  }
  return v;
}

void Run(bool quick) {
  std::mt19937 rng(1);
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{256, 256}, {768, 256}, {256, 768},
                                                           {384, 256}, {256, 192}, {8192, 256}};
  const std::vector<int64_t> ms = quick ? std::vector<int64_t>{1, 4, 16, 64, 512}
                                        : std::vector<int64_t>{1, 2, 4, 8, 16, 32, 64, 128, 512};
  std::printf(
      "Weights hot in cache. F32w/f32: fp32 storage; BF16w/f32: bf16 storage widened "
      "to fp32 (exact fp32 math); BF16w/bf16: bf16 math.\n");
  std::printf("%-10s %-11s %4s | %10s %10s | %10s %10s   (ns/call; t=threads)\n", "config",
              "[out,in]", "m", "small t=1", "small t=2", "onednn t=1", "onednn t=2");
  for (const Config& cfg : kConfigs) {
    for (const auto& [out, in] : shapes) {
      std::vector<uint16_t> w = RandomWeights(cfg.wtype, out * in, &rng);
      absl::StatusOr<Linear> lin = Linear::Create(w.data(), cfg.wtype, out, in, cfg.ct);
      if (!lin.ok()) {
        std::printf("create failed: %s\n", std::string(lin.status().message()).c_str());
        return;
      }
      for (int64_t m : ms) {
        std::vector<float> x(m * in, 0.5f), y(m * out);
        const double macs = static_cast<double>(m) * in * out;
        const int64_t calls = std::max<int64_t>(3, static_cast<int64_t>(2e8 / (macs + 2e4)) / 7);
        double t[4];
        int i = 0;
        for (Linear::Path path : {Linear::Path::kSmall, Linear::Path::kOneDnn}) {
          lin->set_path_for_testing(path);
          for (int threads : {1, 2}) {
            SetNumThreads(threads);
            t[i++] = TimeNs([&] { lin->Forward(x.data(), m, y.data()); }, calls);
          }
        }
        std::printf(
            "%-10s [%4lld,%4lld] %4lld | %10.0f %10.0f | %10.0f %10.0f   %s %6.1f GFLOP/s\n",
            cfg.name, static_cast<long long>(out), static_cast<long long>(in),
            static_cast<long long>(m), t[0], t[1], t[2], t[3],
            m <= lin->small_m_limit() ? "auto=small " : "auto=onednn",
            2 * macs / *std::min_element(t, t + 4));
      }
    }
  }

  // Streaming: cycle through distinct weights totalling > 64 MiB so none stays in cache.
  std::printf("\nm=1, weights cycled (96 MiB of distinct weights, not cache resident):\n");
  for (const Config& cfg : kConfigs) {
    for (const auto& [out, in] :
         std::vector<std::pair<int64_t, int64_t>>{{256, 256}, {768, 256}, {256, 768}}) {
      std::vector<uint16_t> w = RandomWeights(cfg.wtype, out * in, &rng);
      Linear first = *Linear::Create(w.data(), cfg.wtype, out, in, cfg.ct);
      const int64_t bytes_each = first.weight_bytes();
      const int64_t count = std::max<int64_t>(8, (96ll << 20) / bytes_each);
      std::vector<Linear> lins;
      lins.push_back(std::move(first));
      for (int64_t i = 1; i < count; ++i) {
        lins.push_back(*Linear::Create(w.data(), cfg.wtype, out, in, cfg.ct));
      }
      std::vector<float> x(in, 0.5f), y(out);
      for (int threads : {1, 2}) {
        SetNumThreads(threads);
        int64_t next = 0;
        double ns = TimeNs(
            [&] {
              lins[next].Forward(x.data(), 1, y.data());
              next = next + 1 == count ? 0 : next + 1;
            },
            count);
        std::printf("%-10s [%4lld,%4lld] t=%d: %8.0f ns/call  %.1f GB/s\n", cfg.name,
                    static_cast<long long>(out), static_cast<long long>(in), threads, ns,
                    bytes_each / ns);
      }
    }
  }
}

// The Linear calls of one decode step (m=1) of the 17M-param qwen3_moe test model (hidden 256,
// 8 heads / 4 kv heads x 32, 16 experts x FFN 192, top-4, 6 layers, tied 8192-vocab head),
// every projection a distinct object with its own weights, experts picked at random.
// "per-op" calls Forward() (threads only for big products); "team" runs one OpenMP region
// per step and splits every product over the team with ForwardPart() + SpinBarrier.
void DecodeSim() {
  std::mt19937 rng(2);
  const int64_t hidden = 256, layers = 6, experts = 16, top_k = 4, ffn = 192, vocab = 8192;
  struct Layer {
    Linear q, k, v, o, router;
    std::vector<Linear> gate_up, down;
  };
  std::printf("\nDecode step of the 17M test model, Linear calls only (m=1):\n");
  for (ComputeType ct : {ComputeType::kF32, ComputeType::kBF16}) {
    auto make = [&](int64_t out, int64_t in) {
      std::vector<uint16_t> w = RandomBF16(out * in, &rng);
      return *Linear::Create(w.data(), DType::kBF16, out, in, ct);
    };
    std::vector<Layer> model(layers);
    int64_t bytes = 0, active_bytes = 0;
    for (Layer& l : model) {
      l.q = make(256, hidden);
      l.k = make(128, hidden);
      l.v = make(128, hidden);
      l.o = make(hidden, 256);
      l.router = make(experts, hidden);
      for (int64_t e = 0; e < experts; ++e) {
        l.gate_up.push_back(make(2 * ffn, hidden));
        l.down.push_back(make(hidden, ffn));
        bytes += l.gate_up.back().weight_bytes() + l.down.back().weight_bytes();
      }
      const int64_t attn = l.q.weight_bytes() + l.k.weight_bytes() + l.v.weight_bytes() +
                           l.o.weight_bytes() + l.router.weight_bytes();
      bytes += attn;
      active_bytes += attn + top_k * (l.gate_up[0].weight_bytes() + l.down[0].weight_bytes());
    }
    Linear head = make(vocab, hidden);
    bytes += head.weight_bytes();
    active_bytes += head.weight_bytes();
    std::vector<float> x(hidden, 0.1f), y(vocab), h(2 * ffn);
    std::uniform_int_distribution<int> pick(0, experts - 1);
    const int64_t steps = 300;
    std::vector<int> picks(layers * top_k * (steps * 8));
    for (int& p : picks) p = pick(rng);
    size_t next_pick = 0;
    std::printf("%s: %.1f MB packed weights, %.1f MB read per token\n", Name(ct), bytes / 1e6,
                active_bytes / 1e6);
    for (int threads : {1, 2}) {
      SetNumThreads(threads);
      auto per_op = [&] {
        for (Layer& l : model) {
          l.q.Forward(x.data(), 1, y.data());
          l.k.Forward(x.data(), 1, y.data());
          l.v.Forward(x.data(), 1, y.data());
          l.o.Forward(x.data(), 1, y.data());
          l.router.Forward(x.data(), 1, y.data());
          for (int64_t j = 0; j < top_k; ++j) {
            const int e = picks[next_pick++ % picks.size()];
            l.gate_up[e].Forward(x.data(), 1, h.data());
            l.down[e].Forward(h.data(), 1, y.data());
          }
        }
        head.Forward(x.data(), 1, y.data());
      };
      double ns = TimeNs(per_op, steps, 5);
      std::printf("  per-op t=%d: %7.1f us/token (%.1f GB/s)\n", threads, ns / 1e3,
                  active_bytes / ns);
    }
#ifdef _OPENMP
    SpinBarrier barrier(2);
    auto team = [&] {
      const size_t base = next_pick;
#pragma omp parallel num_threads(2)
      {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        size_t pk = base;
        for (Layer& l : model) {
          l.q.ForwardPart(x.data(), 1, y.data(), t, nt);
          l.k.ForwardPart(x.data(), 1, y.data() + 256, t, nt);
          l.v.ForwardPart(x.data(), 1, y.data() + 384, t, nt);
          barrier.Wait();
          l.o.ForwardPart(x.data(), 1, y.data(), t, nt);
          barrier.Wait();
          l.router.ForwardPart(x.data(), 1, y.data(), t, nt);
          barrier.Wait();
          for (int64_t j = 0; j < top_k; ++j) {
            const int e = picks[pk++ % picks.size()];
            l.gate_up[e].ForwardPart(x.data(), 1, h.data(), t, nt);
            barrier.Wait();
            l.down[e].ForwardPart(h.data(), 1, y.data(), t, nt);
            barrier.Wait();
          }
        }
        head.ForwardPart(x.data(), 1, y.data(), t, nt);
      }
      next_pick = base + layers * top_k;
    };
    double ns = TimeNs(team, steps, 5);
    std::printf("  team   t=2: %7.1f us/token (%.1f GB/s)\n", ns / 1e3, active_bytes / ns);
#endif
  }
}

// m=1 streaming rate of the products of a Qwen3-30B-A3B decode step (hidden 2048, q 32 x 128,
// kv 4 x 128, 128 experts of width 768, vocabulary 151936), bf16 weights, at 1 and 2 threads
// (Forward() picks its own thread count up to that) and, for 2 threads, as two single-threaded
// halves run by an OpenMP team as RunExperts does for experts. Distinct weights are cycled
// (>= 512 MiB of them) so that every call streams from memory.
void Qwen3Streaming() {
  std::mt19937 rng(4);
  struct Shape {
    const char* name;
    int64_t out, in;
    ComputeType ct;
  };
  const Shape shapes[] = {{"q+k+v", 5120, 2048, ComputeType::kBF16},
                          {"o", 2048, 4096, ComputeType::kBF16},
                          {"router", 128, 2048, ComputeType::kF32},
                          {"expert gate+up", 1536, 2048, ComputeType::kBF16},
                          {"expert down", 2048, 768, ComputeType::kBF16},
                          {"gate+up int8", 1536, 2048, ComputeType::kInt8},
                          {"down int8", 2048, 768, ComputeType::kInt8},
                          {"gate+up int4", 1536, 2048, ComputeType::kInt4},
                          {"down int4", 2048, 768, ComputeType::kInt4},
                          {"lm_head", 151936, 2048, ComputeType::kBF16}};
  std::printf(
      "Qwen3-30B-A3B decode products, m=1, bf16 weights streamed from memory (int8, int4: the experts "
      "quantised, --quantize_experts; MB each includes their scales and group sums):\n");
  std::printf("%-15s %-14s %9s | %8s %8s | %8s %8s | %8s\n", "product", "[out,in]", "MB each",
              "t=1 us", "GB/s", "t=2 us", "GB/s", "2x1 GB/s");
  for (const Shape& s : shapes) {
    std::vector<uint16_t> w = RandomBF16(s.out * s.in, &rng);
    std::vector<Linear> lins;
    lins.push_back(*Linear::Create(w.data(), DType::kBF16, s.out, s.in, s.ct));
    const int64_t bytes_each = lins[0].weight_bytes();
    const int64_t count = std::max<int64_t>(2, (512ll << 20) / bytes_each + 1);
    for (int64_t i = 1; i < count; ++i) {
      lins.push_back(*Linear::Create(w.data(), DType::kBF16, s.out, s.in, s.ct));
    }
    std::vector<float> x(s.in, 0.01f), y(2 * s.out);
    double ns[2];
    for (int threads : {1, 2}) {
      SetNumThreads(threads);
      int64_t next = 0;
      ns[threads - 1] = TimeNs(
          [&] {
            lins[next].Forward(x.data(), 1, y.data());
            next = next + 1 == count ? 0 : next + 1;
          },
          count, 5);
    }
    double team_ns = 0;
#ifdef _OPENMP
    {  // Two threads, each running whole products on its own (as RunExperts does).
      int64_t next = 0;
      team_ns = TimeNs(
          [&] {
            const int64_t a = next, b = next + 1 == count ? 0 : next + 1;
            next = b + 1 == count ? 0 : b + 1;
#pragma omp parallel num_threads(2)
            {
              const int t = omp_get_thread_num();
              lins[t == 0 ? a : b].Forward(x.data(), 1, y.data() + t * s.out);
            }
          },
          count / 2 + 1, 5) / 2;
    }
#endif
    std::printf("%-15s [%6lld,%4lld] %9.1f | %8.1f %8.1f | %8.1f %8.1f | %8.1f\n", s.name,
                static_cast<long long>(s.out), static_cast<long long>(s.in), bytes_each / 1e6,
                ns[0] / 1e3, bytes_each / ns[0], ns[1] / 1e3, bytes_each / ns[1],
                team_ns > 0 ? bytes_each / team_ns : 0.0);
  }
}

// Attention and the small kernels at the test model's sizes.
void OtherOps() {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  const int64_t heads = 8, kv_heads = 4, dim = 32, max_ctx = 1024;
  std::vector<float> k(max_ctx * kv_heads * dim), v(max_ctx * kv_heads * dim);
  for (float& f : k) f = dist(rng);
  for (float& f : v) f = dist(rng);
  std::vector<float> q(512 * heads * dim), out(512 * heads * dim);
  for (float& f : q) f = dist(rng);
  std::printf("\nAttention (8 heads / 4 kv heads x 32), ns/call:\n");
  for (auto [start, n_new] : std::vector<std::pair<int64_t, int64_t>>{
           {0, 1}, {99, 1}, {511, 1}, {1023, 1}, {0, 128}, {0, 512}}) {
    double t[2];
    for (int threads : {1, 2}) {
      SetNumThreads(threads);
      t[threads - 1] = TimeNs(
          [&] {
            Attention(q.data(), k.data(), v.data(), start, n_new, heads, kv_heads, dim, out.data());
          },
          std::max<int64_t>(3, 200000 / ((start + n_new) * n_new + 100)));
    }
    std::printf("  start_pos=%4lld n_new=%3lld: t=1 %10.0f  t=2 %10.0f\n",
                static_cast<long long>(start), static_cast<long long>(n_new), t[0], t[1]);
  }
  SetNumThreads(1);
  std::vector<float> x(512 * 768), w(768, 1.0f), y(512 * 768);
  for (float& f : x) f = dist(rng);
  std::vector<int32_t> pos(512);
  for (int i = 0; i < 512; ++i) pos[i] = i;
  std::vector<int32_t> ids(512 * 4);
  std::vector<float> weights(512 * 4);
  std::printf("Small kernels, ns/call (1 thread):\n");
  for (int64_t rows : {1, 512}) {
    std::printf(
        "  rows=%3lld: RmsNorm(256) %7.0f  Rope(8x32) %7.0f  SiluMul(192) %7.0f  "
        "TopKRouting(16, k=4) %7.0f\n",
        static_cast<long long>(rows),
        TimeNs([&] { RmsNorm(x.data(), w.data(), rows, 256, 1e-6f, y.data()); }, 2000),
        TimeNs([&] { Rope(y.data(), pos.data(), rows, heads, dim, 1e6f); }, 2000),
        TimeNs([&] { SiluMulRows(x.data(), rows, 192, y.data()); }, 2000),
        TimeNs([&] { TopKRouting(x.data(), rows, 16, 4, true, ids.data(), weights.data()); },
               2000));
  }
}

}  // namespace
}  // namespace ops
}  // namespace moemesh

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--qwen3") {
    moemesh::ops::Qwen3Streaming();
    return 0;
  }
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  if (!(argc > 1 && std::string(argv[1]) == "--decode")) moemesh::ops::Run(quick);
  moemesh::ops::DecodeSim();
  moemesh::ops::OtherOps();
  return 0;
}
