// Time to sample one row of logits, per sampling configuration, for a vocabulary of
// --vocab entries (default: Qwen3's 151,936) with a peaked random distribution.
//   bazel-bin/engine/sampler_benchmark [--vocab=151936] [--rows=40]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/sampler.h"

int main(int argc, char** argv) {
  int64_t vocab = 151936;
  int rows = 40;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--vocab=", 8) == 0) vocab = std::atoll(argv[i] + 8);
    if (std::strncmp(argv[i], "--rows=", 7) == 0) rows = std::atoi(argv[i] + 7);
  }
  std::mt19937 g(1);
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<float> base(vocab);
  for (float& x : base) x = d(g);
  for (int i = 0; i < 50; ++i) base[g() % vocab] += 12.0f;  // a few likely tokens
  struct Case {
    const char* name;
    float temperature, top_p;
    int32_t top_k, logprobs;
  };
  for (const Case& c : {Case{"greedy", 0.0f, 1.0f, 0, 0}, Case{"temperature 0.8", 0.8f, 1.0f, 0, 0},
                        Case{"+ top_p 0.95", 0.8f, 0.95f, 0, 0},
                        Case{"+ top_k 50", 0.8f, 1.0f, 50, 0},
                        Case{"+ top_p 0.95, logprobs 5", 0.8f, 0.95f, 0, 5}}) {
    moemesh::SamplingConfig cfg;
    cfg.temperature = c.temperature;
    cfg.top_p = c.top_p;
    cfg.top_k = c.top_k;
    cfg.logprobs = c.logprobs;
    moemesh::Sampler s(cfg);
    std::vector<float> l;
    double seconds = 0;
    for (int r = 0; r < rows; ++r) {
      l = base;  // Sample modifies its row
      const auto t0 = std::chrono::steady_clock::now();
      s.Sample(l.data(), vocab, {}, {});
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    std::printf("%-28s %8.3f ms per row (vocabulary %lld)\n", c.name, seconds * 1e3 / rows,
                static_cast<long long>(vocab));
  }
  return 0;
}
