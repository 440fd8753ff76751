// Decode attention throughput: one new token per sequence over an fp32 KV
// cache, on the calling thread, for the embedded model's shape and
// Qwen3-30B-A3B's, with the cache interleaved
// ([position, kv head, dim]) and head-major (each kv head's rows contiguous, as
// KvCache keeps them). Prints multiply-adds per second and the KV bytes read
// per second. Then the head-major cache by element type (fp32, bf16, int8 with a
// scale per row), one thread, at longer contexts.
//   bazel run -c opt //engine/ops:attention_benchmark
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string_view>
#include <vector>

#include "engine/dtype.h"
#include "engine/ops/attention.h"
#include "engine/ops/threading.h"

namespace {

struct Shape {
  const char *name;
  int64_t heads, kv_heads, head_dim;
};

// n values uniform in [-1, 1].
std::vector<float> Uniform(int64_t n, std::mt19937 *rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(n);
  for (float &e : x)
    e = u(*rng);
  return x;
}

// Seconds per call of `pass` (after one warm-up call, repeated for 0.3 s).
template <typename F> double SecondsPerCall(const F &pass) {
  using Clock = std::chrono::steady_clock;
  pass();
  int reps = 0;
  const auto t0 = Clock::now();
  double sec = 0;
  while (sec < 0.3) {
    pass();
    ++reps;
    sec = std::chrono::duration<double>(Clock::now() - t0).count();
  }
  return sec / reps;
}

} // namespace

int main() {
  const Shape shapes[] = {
      {"pydoc-moe-17m (8 q / 4 kv heads x 32)", 8, 4, 32},
      {"qwen3-30b-a3b (32 q / 4 kv heads x 128)", 32, 4, 128}};
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const Shape &s : shapes) {
    for (bool head_major : {false, true}) {
      for (int64_t ctx : {128, 256, 1024}) {
        const int64_t seqs = 32, kvd = s.kv_heads * s.head_dim,
                      qd = s.heads * s.head_dim;
        std::vector<std::vector<float>> k(seqs), v(seqs);
        for (int64_t b = 0; b < seqs; ++b) {
          k[b] = Uniform(ctx * kvd, &rng);
          v[b] = Uniform(ctx * kvd, &rng);
        }
        std::vector<float> q(seqs * qd), out(seqs * qd);
        for (float &x : q)
          x = u(rng);
        auto pass = [&] {
          for (int64_t b = 0; b < seqs; ++b) {
            moemesh::ops::AttentionPart(
                &q[b * qd], k[b].data(), v[b].data(), ctx - 1, 1, s.heads,
                s.kv_heads, s.head_dim, &out[b * qd], 0, 1,
                head_major ? s.head_dim : 0, head_major ? ctx * s.head_dim : 0);
          }
        };
        const double per = SecondsPerCall(pass);
        const double macs = 2.0 * seqs * ctx * qd;       // q.k and p.v per head
        const double bytes = 2.0 * seqs * ctx * kvd * 4; // K and V
        std::printf("%-42s %-11s ctx %5lld: %8.1f us per 32 sequences, %6.1f "
                    "GMAC/s, %6.1f GB/s of KV\n",
                    s.name, head_major ? "head-major" : "interleaved",
                    static_cast<long long>(ctx), per * 1e6, macs / per / 1e9,
                    bytes / per / 1e9);
      }
    }
  }
  // Head-major caches by element type, one thread.
  moemesh::ops::SetNumThreads(1);
  for (const Shape &s : shapes) {
    for (int64_t ctx : {256, 1024, 4096}) {
      const int64_t seqs = 32, kvd = s.kv_heads * s.head_dim,
                    qd = s.heads * s.head_dim;
      std::vector<std::vector<float>> k(seqs), v(seqs), ks(seqs), vs(seqs);
      std::vector<std::vector<uint16_t>> k16(seqs), v16(seqs);
      std::vector<std::vector<int8_t>> k8(seqs), v8(seqs);
      std::uniform_int_distribution<int> i8(-127, 127);
      for (int64_t b = 0; b < seqs; ++b) {
        k[b] = Uniform(ctx * kvd, &rng);
        v[b] = Uniform(ctx * kvd, &rng);
        for (float x : k[b])
          k16[b].push_back(moemesh::F32ToBF16(x));
        for (float x : v[b])
          v16[b].push_back(moemesh::F32ToBF16(x));
        for (size_t i = 0; i < k[b].size(); ++i) {
          k8[b].push_back(static_cast<int8_t>(i8(rng)));
          v8[b].push_back(static_cast<int8_t>(i8(rng)));
        }
        ks[b].assign(ctx * s.kv_heads, 1.0f / 127);
        vs[b].assign(ctx * s.kv_heads, 1.0f / 127);
      }
      std::vector<float> q(seqs * qd), out(seqs * qd);
      for (float &x : q)
        x = u(rng);
      for (const char *dtype : {"fp32", "bf16", "int8"}) {
        const std::string_view d(dtype);
        auto pass = [&] {
          for (int64_t b = 0; b < seqs; ++b) {
            if (d == "fp32") {
              moemesh::ops::Attention(&q[b * qd], k[b].data(), v[b].data(),
                                      ctx - 1, 1, s.heads, s.kv_heads,
                                      s.head_dim, &out[b * qd], s.head_dim,
                                      ctx * s.head_dim);
            } else if (d == "bf16") {
              moemesh::ops::Attention(&q[b * qd], k16[b].data(), v16[b].data(),
                                      ctx - 1, 1, s.heads, s.kv_heads,
                                      s.head_dim, &out[b * qd], s.head_dim,
                                      ctx * s.head_dim);
            } else {
              moemesh::ops::Attention(
                  &q[b * qd], k8[b].data(), v8[b].data(), ks[b].data(),
                  vs[b].data(), ctx - 1, 1, s.heads, s.kv_heads, s.head_dim,
                  &out[b * qd], s.head_dim, ctx * s.head_dim, 1, ctx);
            }
          }
        };
        const double per = SecondsPerCall(pass);
        const double elem = d == "fp32" ? 4 : d == "bf16" ? 2 : 1;
        const double row_extra = d == "int8" ? 4.0 / s.head_dim : 0.0;
        const double bytes = 2.0 * seqs * ctx * kvd * (elem + row_extra);
        std::printf("%-42s %-4s head-major ctx %5lld: %9.1f us per 32 "
                    "sequences, %6.1f GB/s of KV\n",
                    s.name, dtype, static_cast<long long>(ctx), per * 1e6,
                    bytes / per / 1e9);
      }
    }
  }
  return 0;
}
