// Single-sequence generation and perplexity over the in-process Model (CLI, tests, offline bench).
#ifndef MOEMESH_ENGINE_GENERATE_H_
#define MOEMESH_ENGINE_GENERATE_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model.h"
#include "engine/sampler.h"

namespace moemesh {

struct GenerateOptions {
  int64_t max_new_tokens = 16;
  int32_t experts_per_token = 0;        // 0 = the model's default
  SamplingConfig sampling;              // default: greedy
  std::vector<int32_t> stop_token_ids;  // generation ends after emitting one of these
  bool prompt_logits = false;           // fill GenerateResult::prompt_logits
};

struct GenerateResult {
  std::vector<int32_t> ids;             // new tokens (including a final stop token, as HF does)
  std::vector<float> prompt_logits;     // [prompt length, vocab] when requested
  double prefill_seconds = 0, decode_seconds = 0;
};

// Prefills `prompt` in one step, then decodes one token per step through the KV cache.
absl::StatusOr<GenerateResult> Generate(const Model& model, const std::vector<int32_t>& prompt,
                                        const GenerateOptions& opt);

struct PerplexityResult {
  int64_t tokens = 0;   // predictions scored
  double nll = 0;       // mean negative log-likelihood per prediction (nats)
  double ppl = 0;       // exp(nll)
};

// Mean NLL of `ids` cut into consecutive windows of `window` input tokens (the last shorter),
// each window scored on its own with no context carried over; every position predicts the next.
absl::StatusOr<PerplexityResult> Perplexity(const Model& model, const std::vector<int32_t>& ids,
                                            int64_t window, int32_t experts_per_token);

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_GENERATE_H_
