#include "engine/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace moemesh {
namespace {

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

absl::StatusOr<GenerateResult> Generate(const Model& model, const std::vector<int32_t>& prompt,
                                        const GenerateOptions& opt) {
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  absl::Status st = opt.sampling.Validate();
  if (!st.ok()) return st;
  const int64_t vocab = model.config().vocab_size;
  const int64_t total = static_cast<int64_t>(prompt.size()) + opt.max_new_tokens;
  auto cache = model.NewCache(total);
  Sampler sampler(opt.sampling);
  GenerateResult result;
  std::vector<float> logits;

  SeqStep step;
  step.seq_id = 1;
  step.tokens = prompt;
  step.start_pos = 0;
  step.experts_per_token = opt.experts_per_token;
  step.all_logits = opt.prompt_logits;
  // A step whose draw needs only the row's argmax (Sampler::ArgMaxSuffices) asks the model for
  // that alone (on a GPU the row stays there); argmax < 0 when the step returned its rows.
  int32_t argmax = -1;
  std::vector<int32_t> ids;
  auto run = [&](bool rows) -> absl::Status {
    argmax = -1;
    if (rows) return model.Step({step}, cache.get(), &logits);
    absl::Status s = model.StepArgMax({step}, cache.get(), &ids);
    if (s.ok()) argmax = ids.back();
    return s;
  };
  auto t0 = std::chrono::steady_clock::now();
  st = run(opt.prompt_logits || !sampler.ArgMaxSuffices(0));
  if (!st.ok()) return st;
  auto t1 = std::chrono::steady_clock::now();
  result.prefill_seconds = Seconds(t0, t1);
  if (opt.prompt_logits) result.prompt_logits = logits;
  int64_t pos = static_cast<int64_t>(prompt.size());
  for (int64_t i = 0; i < opt.max_new_tokens; ++i) {
    const int32_t id =
        argmax >= 0
            ? sampler.TakeArgMax(argmax, vocab, prompt, result.ids).id
            : sampler.Sample(logits.data() + logits.size() - vocab, vocab, prompt, result.ids).id;
    result.ids.push_back(id);
    if (std::find(opt.stop_token_ids.begin(), opt.stop_token_ids.end(), id) !=
            opt.stop_token_ids.end() ||
        i + 1 == opt.max_new_tokens) {
      break;
    }
    step.tokens = {id};
    step.start_pos = pos++;
    step.all_logits = false;
    st = run(!sampler.ArgMaxSuffices(static_cast<int64_t>(result.ids.size())));
    if (!st.ok()) return st;
  }
  result.decode_seconds = Seconds(t1, std::chrono::steady_clock::now());
  return result;
}

absl::StatusOr<PerplexityResult> Perplexity(const Model& model, const std::vector<int32_t>& ids,
                                            int64_t window, int32_t experts_per_token) {
  if (window < 1) return absl::InvalidArgumentError("window must be >= 1");
  if (ids.size() < 2) return absl::InvalidArgumentError("need at least 2 tokens");
  const int64_t vocab = model.config().vocab_size;
  const int64_t n = static_cast<int64_t>(ids.size());
  auto cache = model.NewCache(window);
  PerplexityResult r;
  double sum = 0.0;
  std::vector<float> logits;
  uint64_t seq = 0;
  for (int64_t s = 0; s < n - 1; s += window) {
    const int64_t len = std::min(window, n - 1 - s);
    SeqStep step;
    step.seq_id = ++seq;
    step.tokens.assign(ids.begin() + s, ids.begin() + s + len);
    step.experts_per_token = experts_per_token;
    step.all_logits = true;
    absl::Status st = model.Step({step}, cache.get(), &logits);
    if (!st.ok()) return st;
    cache->Free(step.seq_id);
    for (int64_t i = 0; i < len; ++i) {
      const float* row = logits.data() + i * vocab;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t v = 0; v < vocab; ++v) mx = std::max(mx, row[v]);
      double z = 0.0;
      for (int64_t v = 0; v < vocab; ++v) z += std::exp(static_cast<double>(row[v] - mx));
      sum += (mx + std::log(z)) - row[ids[s + i + 1]];
    }
    r.tokens += len;
  }
  r.nll = sum / static_cast<double>(r.tokens);
  r.ppl = std::exp(r.nll);
  return r;
}

}  // namespace moemesh
