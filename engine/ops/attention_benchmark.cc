// Decode attention throughput: one new token per sequence over an fp32 KV
// cache, on the calling thread, for the embedded model's shape and
// Qwen3-30B-A3B's, with the cache interleaved
// ([position, kv head, dim]) and head-major (each kv head's rows contiguous, as
// KvCache keeps them). Prints multiply-adds per second and the KV bytes read
// per second.
//   bazel run -c opt //engine/ops:attention_benchmark
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "engine/ops/attention.h"

namespace {

struct Shape {
  const char *name;
  int64_t heads, kv_heads, head_dim;
};

} // namespace

int main() {
  using Clock = std::chrono::steady_clock;
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
          k[b].resize(ctx * kvd);
          v[b].resize(ctx * kvd);
          for (float &x : k[b])
            x = u(rng);
          for (float &x : v[b])
            x = u(rng);
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
        pass();
        int reps = 0;
        const auto t0 = Clock::now();
        double sec = 0;
        while (sec < 0.3) {
          pass();
          ++reps;
          sec = std::chrono::duration<double>(Clock::now() - t0).count();
        }
        const double per = sec / reps;
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
  return 0;
}
