#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <unordered_map>
#include <unordered_set>

#include "absl/strings/str_cat.h"

namespace moemesh {
namespace {

absl::Status OutOfRange(const char* field, double value, const char* range) {
  return absl::InvalidArgumentError(
      absl::StrCat("sampling field '", field, "' = ", value, " is out of range ", range));
}

// log-softmax of x into out.
void LogSoftmax(const float* x, int64_t n, std::vector<float>* out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(x[i] - mx));
  const float lse = mx + static_cast<float>(std::log(sum));
  out->resize(n);
  for (int64_t i = 0; i < n; ++i) (*out)[i] = x[i] - lse;
}

}  // namespace

absl::Status SamplingConfig::Validate() const {
  if (!(temperature >= 0.0f) || temperature > 100.0f) return OutOfRange("temperature", temperature, "[0, 100]");
  if (!(top_p > 0.0f && top_p <= 1.0f)) return OutOfRange("top_p", top_p, "(0, 1]");
  if (top_k < 0) return OutOfRange("top_k", top_k, ">= 0");
  if (!(min_p >= 0.0f && min_p <= 1.0f)) return OutOfRange("min_p", min_p, "[0, 1]");
  if (!(repetition_penalty > 0.0f) || repetition_penalty > 10.0f) {
    return OutOfRange("repetition_penalty", repetition_penalty, "(0, 10]");
  }
  if (!(presence_penalty >= -2.0f && presence_penalty <= 2.0f)) {
    return OutOfRange("presence_penalty", presence_penalty, "[-2, 2]");
  }
  if (!(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f)) {
    return OutOfRange("frequency_penalty", frequency_penalty, "[-2, 2]");
  }
  if (logprobs < 0 || logprobs > 20) return OutOfRange("logprobs", logprobs, "[0, 20]");
  return absl::OkStatus();
}

int32_t ArgMax(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (x[i] > x[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

Sampler::Sampler(const SamplingConfig& cfg) : cfg_(cfg), rng_(cfg.seed) {}

TokenChoice Sampler::Sample(float* logits, int64_t vocab, const std::vector<int32_t>& prompt,
                            const std::vector<int32_t>& generated) {
  // Penalties.
  if (cfg_.repetition_penalty != 1.0f) {
    std::unordered_set<int32_t> seen(prompt.begin(), prompt.end());
    seen.insert(generated.begin(), generated.end());
    for (int32_t id : seen) {
      if (id < 0 || id >= vocab) continue;
      float& l = logits[id];
      l = l > 0 ? l / cfg_.repetition_penalty : l * cfg_.repetition_penalty;
    }
  }
  if (cfg_.presence_penalty != 0.0f || cfg_.frequency_penalty != 0.0f) {
    std::unordered_map<int32_t, int> count;
    for (int32_t id : generated) ++count[id];
    for (const auto& [id, c] : count) {
      if (id < 0 || id >= vocab) continue;
      logits[id] -= cfg_.presence_penalty + cfg_.frequency_penalty * static_cast<float>(c);
    }
  }

  TokenChoice choice;
  std::vector<float> logp;
  if (cfg_.logprobs > 0 || !cfg_.greedy()) LogSoftmax(logits, vocab, &logp);

  if (cfg_.greedy()) {
    choice.id = ArgMax(logits, vocab);
  } else {
    // Candidates sorted by logit (descending; ties by id), then top-k, min-p, top-p.
    std::vector<int32_t> idx(vocab);
    std::iota(idx.begin(), idx.end(), 0);
    int64_t keep = vocab;
    if (cfg_.top_k > 0 && cfg_.top_k < vocab) keep = cfg_.top_k;
    auto by_logit = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(), by_logit);
    idx.resize(keep);
    // Probabilities at this temperature over the kept candidates.
    const float inv_t = 1.0f / cfg_.temperature;
    const float mx = logits[idx[0]];
    std::vector<double> p(keep);
    double sum = 0.0;
    for (int64_t i = 0; i < keep; ++i) {
      p[i] = std::exp(static_cast<double>((logits[idx[i]] - mx) * inv_t));
      sum += p[i];
    }
    for (double& x : p) x /= sum;
    int64_t n = keep;
    if (cfg_.min_p > 0.0f) {
      const double floor = cfg_.min_p * p[0];
      while (n > 1 && p[n - 1] < floor) --n;
    }
    if (cfg_.top_p < 1.0f) {
      double cum = 0.0;
      int64_t i = 0;
      for (; i < n; ++i) {
        cum += p[i];
        if (cum >= cfg_.top_p) break;
      }
      n = std::min(n, i + 1);
    }
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) total += p[i];
    std::uniform_real_distribution<double> u(0.0, total);
    double r = u(rng_);
    int64_t pick = n - 1;
    for (int64_t i = 0; i < n; ++i) {
      r -= p[i];
      if (r < 0) {
        pick = i;
        break;
      }
    }
    choice.id = idx[pick];
  }
  if (!logp.empty()) choice.logprob = logp[choice.id];
  if (cfg_.logprobs > 0) {
    std::vector<int32_t> idx(vocab);
    std::iota(idx.begin(), idx.end(), 0);
    const int64_t n = std::min<int64_t>(cfg_.logprobs, vocab);
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int32_t a, int32_t b) {
      return logp[a] > logp[b] || (logp[a] == logp[b] && a < b);
    });
    for (int64_t i = 0; i < n; ++i) choice.top.emplace_back(idx[i], logp[idx[i]]);
  }
  return choice;
}

}  // namespace moemesh
