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

// log(sum(exp(x))) over n values (in double, from the maximum), as a float: log-softmax(x)[i] is
// x[i] minus it.
float LogSumExp(const float* x, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(x[i] - mx));
  return mx + static_cast<float>(std::log(sum));
}

// Puts the k best of *idx under `better` first, in order; the rest in any order.
template <typename Better>
void SortBest(std::vector<int32_t>* idx, int64_t k, const Better& better) {
  if (k <= 4096) {
    // A heap of k: one comparison for most entries, so cheaper than a selection for small k.
    std::partial_sort(idx->begin(), idx->begin() + k, idx->end(), better);
    return;
  }
  if (k < static_cast<int64_t>(idx->size())) {
    std::nth_element(idx->begin(), idx->begin() + k, idx->end(), better);
  }
  std::sort(idx->begin(), idx->begin() + k, better);
}

// Appends the n best (id, logits[id] - lse) of the row to choice->top, best first.
void AddTop(const float* logits, int64_t vocab, float lse, int64_t n, TokenChoice* choice) {
  thread_local std::vector<int32_t> idx;
  idx.resize(vocab);
  std::iota(idx.begin(), idx.end(), 0);
  n = std::min<int64_t>(n, vocab);
  SortBest(&idx, n, [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  for (int64_t i = 0; i < n; ++i) {
    if (std::isinf(logits[idx[i]])) break;  // masked off (JSON mode): not a candidate
    choice->top.emplace_back(idx[i], logits[idx[i]] - lse);
  }
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
  if (prompt_logprobs < -1 || prompt_logprobs > 20) {
    return OutOfRange("prompt_logprobs", prompt_logprobs, "[0, 20]");
  }
  if (thinking_budget < -1) return OutOfRange("thinking_budget", thinking_budget, ">= 0");
  if (min_tokens < 0) return OutOfRange("min_tokens", min_tokens, ">= 0");
  for (const auto& [id, bias] : logit_bias) {
    if (id < 0) return OutOfRange("logit_bias", id, "token ids >= 0");
    if (!(bias >= -100.0f && bias <= 100.0f)) return OutOfRange("logit_bias", bias, "[-100, 100]");
  }
  if (thinking_budget >= 0 && (think_start_id < 0 || think_end_id < 0)) {
    return absl::InvalidArgumentError(
        "sampling field 'thinking_budget' needs the ids of the think markers");
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingConfig& cfg) : cfg_(cfg), rng_(cfg.seed) {}

bool Sampler::BudgetSpent(const std::vector<int32_t>& prompt,
                          const std::vector<int32_t>& generated) {
  if (cfg_.thinking_budget < 0) return false;
  const int64_t np = static_cast<int64_t>(prompt.size());
  const int64_t n = np + static_cast<int64_t>(generated.size());
  for (; think_read_ < n; ++think_read_) {
    const int32_t id = think_read_ < np ? prompt[think_read_] : generated[think_read_ - np];
    if (id == cfg_.think_start_id) {
      thinking_ = true;
      think_tokens_ = 0;
    } else if (id == cfg_.think_end_id) {
      thinking_ = false;
    } else if (thinking_) {
      ++think_tokens_;
    }
  }
  return thinking_ && think_tokens_ >= cfg_.thinking_budget;
}

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

  for (const auto& [id, bias] : cfg_.logit_bias) {
    if (id < vocab) logits[id] += bias;
  }
  if (static_cast<int64_t>(generated.size()) < cfg_.min_tokens) {
    for (int32_t id : cfg_.end_ids) {
      if (id >= 0 && id < vocab) logits[id] = -std::numeric_limits<float>::infinity();
    }
  }
  if (constraint_ != nullptr) constraint_->Mask(logits, vocab);

  TokenChoice choice;
  const bool forced = BudgetSpent(prompt, generated) && cfg_.think_end_id < vocab;
  // Nothing here sorts the whole vocabulary (151,936 entries for Qwen3: a full sort took ~30 ms
  // a row): the candidates a filter needs in order are selected, then sorted.
  auto better = [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  const bool with_logprob = cfg_.logprobs > 0 || !cfg_.greedy();
  float lse = 0.0f;  // log-sum-exp of the logits: logprob(i) = logits[i] - lse
  if (with_logprob) lse = LogSumExp(logits, vocab);
  // Token ids to select from, kept by the thread (a fresh 600 KB a row would page-fault).
  thread_local std::vector<int32_t> idx;

  if (forced) {
    choice.id = cfg_.think_end_id;
  } else if (cfg_.greedy()) {
    choice.id = ArgMax(logits, vocab);
  } else {
    thread_local std::vector<double> w_of;  // weight by token id
    idx.resize(vocab);
    std::iota(idx.begin(), idx.end(), 0);
    // The first `sorted` entries of idx are the best candidates, in order (by logit, descending;
    // ties by id).
    int64_t keep = vocab, sorted = 0;
    if (cfg_.top_k > 0 && cfg_.top_k < vocab) {
      keep = cfg_.top_k;
      SortBest(&idx, keep, better);
      sorted = keep;
    }
    // Weights at this temperature (unnormalised probabilities) over the kept candidates.
    const float inv_t = 1.0f / cfg_.temperature;
    const float mx = logits[sorted > 0 ? idx[0] : ArgMax(logits, vocab)];
    if (static_cast<int64_t>(w_of.size()) < vocab) w_of.resize(vocab);
    double z = 0.0;
    for (int64_t i = 0; i < keep; ++i) {
      const int32_t id = idx[i];
      w_of[id] = std::exp(static_cast<double>((logits[id] - mx) * inv_t));
      z += w_of[id];
    }
    auto weight = [&](int32_t id) { return w_of[id]; };
    // min-p, then top-p, over the candidates in order: n of them stay.
    int64_t n = keep;
    if (cfg_.min_p > 0.0f || cfg_.top_p < 1.0f) {
      const double floor = cfg_.min_p;  // relative to the best candidate's weight, 1
      for (int64_t k = std::min<int64_t>(keep, 256);; k = std::min<int64_t>(keep, k * 8)) {
        if (k > sorted) {
          SortBest(&idx, k, better);
          sorted = k;
        }
        double cum = 0.0;
        int64_t cut = -1;
        for (int64_t i = 0; i < k && cut < 0; ++i) {
          const double w = weight(idx[i]);
          if (i > 0 && w < floor) {
            cut = i;
          } else {
            cum += w / z;
            if (cfg_.top_p < 1.0f && cum >= cfg_.top_p) cut = i + 1;
          }
        }
        if (cut >= 0) {
          n = cut;
          break;
        }
        if (k == keep) break;  // no cut: every candidate stays
      }
    }
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) total += weight(idx[i]);
    std::uniform_real_distribution<double> u(0.0, total);
    double r = u(rng_);
    int64_t pick = n - 1;
    for (int64_t i = 0; i < n; ++i) {
      r -= weight(idx[i]);
      if (r < 0) {
        pick = i;
        break;
      }
    }
    choice.id = idx[pick];
  }
  if (with_logprob) choice.logprob = logits[choice.id] - lse;
  if (cfg_.logprobs > 0) AddTop(logits, vocab, lse, cfg_.logprobs, &choice);
  if (constraint_ != nullptr) constraint_->Advance(choice.id);
  return choice;
}

bool Sampler::ArgMaxSuffices(int64_t generated) const {
  return cfg_.greedy() && cfg_.logprobs == 0 && cfg_.repetition_penalty == 1.0f &&
         cfg_.presence_penalty == 0.0f && cfg_.frequency_penalty == 0.0f &&
         cfg_.logit_bias.empty() && (generated >= cfg_.min_tokens || cfg_.end_ids.empty()) &&
         constraint_ == nullptr;
}

TokenChoice Sampler::TakeArgMax(int32_t argmax, int64_t vocab, const std::vector<int32_t>& prompt,
                                const std::vector<int32_t>& generated) {
  TokenChoice choice;
  // As Sample: the budget's bookkeeping reads the new tokens whether or not it forces.
  const bool forced = BudgetSpent(prompt, generated) && cfg_.think_end_id < vocab;
  choice.id = forced ? cfg_.think_end_id : argmax;
  return choice;
}

TokenChoice ScoreToken(const float* logits, int64_t vocab, int32_t id, int32_t top_n) {
  TokenChoice choice;
  choice.id = id;
  const float lse = LogSumExp(logits, vocab);
  choice.logprob = logits[id] - lse;
  if (top_n > 0) AddTop(logits, vocab, lse, top_n, &choice);
  return choice;
}

}  // namespace moemesh
