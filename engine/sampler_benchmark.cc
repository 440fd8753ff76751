// Time to sample one row of logits, per sampling configuration, for a vocabulary of
// --vocab entries (default: Qwen3's 151,936) with a peaked random distribution; then JSON mode's
// extra cost (the mask of a JsonConstraint) over a synthetic vocabulary of as many random tokens
// (1-12 bytes of letters, digits, spaces and JSON punctuation), at three points of a document,
// and a JsonConstraint with a schema (keys, integers, a string, an enum) at four.
//   bazel-bin/engine/sampler_benchmark [--vocab=151936] [--rows=40]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/json_schema.h"
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

  const std::string alphabet =
      "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789      \n{}[]\":,._-";
  std::vector<std::string> bytes(vocab);
  for (std::string& t : bytes) {
    const int len = 1 + static_cast<int>(g() % 12);
    for (int k = 0; k < len; ++k) t += alphabet[g() % alphabet.size()];
  }
  const moemesh::TokenTable table(bytes);
  auto schema = moemesh::JsonSchema::Compile(
      R"({"type": "object", "properties": {"key": {"type": "array", "items": {"type": "integer"}},
          "name": {"type": "string"}, "kind": {"enum": ["alpha", "beta"]}},
          "required": ["key", "name", "kind"]})");
  if (!schema.ok()) return 1;
  struct Where {
    const char* where;
    std::shared_ptr<const moemesh::JsonSchema> schema;  // null: JSON mode
  };
  for (const Where& cs : std::vector<Where>{{"{", nullptr},
                                          {"{\"key\": \"abc", nullptr},
                                          {"{\"key\": [1, 2", nullptr},
                                          {"{", *schema},
                                          {"{\"key\": [1, 2", *schema},
                                          {"{\"key\": [], \"name\": \"abc", *schema},
                                          {"{\"key\": [], \"name\": \"\", ", *schema}}) {
    const char* where = cs.where;
    // The document so far, spelt with single-byte tokens (the synthetic vocabulary has them).
    std::vector<int32_t> prefix;
    for (const char* p = where; *p != '\0'; ++p) {
      for (int32_t id = 0; id < vocab; ++id) {
        if (bytes[id] == std::string(1, *p)) {
          prefix.push_back(id);
          break;
        }
      }
    }
    moemesh::SamplingConfig cfg;
    cfg.temperature = 0.8f;
    double seconds = 0;
    std::vector<float> l;
    for (int r = 0; r < rows; ++r) {
      moemesh::Sampler s(cfg);
      auto c = std::make_unique<moemesh::JsonConstraint>(&table, std::vector<int32_t>{0},
                                                         cs.schema);
      for (int32_t id : prefix) c->Advance(id);
      s.Constrain(std::move(c));
      l = base;
      const auto t0 = std::chrono::steady_clock::now();
      s.Sample(l.data(), vocab, {}, {});
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    std::printf("JSON %s after %-28s %8.3f ms per row (temperature 0.8)\n",
                cs.schema ? "schema" : "mode  ", (std::string("'") + where + "'").c_str(),
                seconds * 1e3 / rows);
  }
  return 0;
}
