// Token selection from one row of logits: greedy, or seeded sampling with the usual filters.
#ifndef MOEMESH_ENGINE_SAMPLER_H_
#define MOEMESH_ENGINE_SAMPLER_H_

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/argmax.h"
#include "engine/json_constraint.h"

namespace moemesh {

struct SamplingConfig {
  float temperature = 0.0f;        // 0 = greedy (argmax; ties -> lowest id)
  int32_t top_k = 0;               // 0 = off
  float top_p = 1.0f;              // (0, 1]
  float min_p = 0.0f;              // [0, 1]
  float repetition_penalty = 1.0f; // > 0; as transformers: logit / p if > 0 else logit * p
  float presence_penalty = 0.0f;   // [-2, 2], subtracted once per distinct generated token
  float frequency_penalty = 0.0f;  // [-2, 2], subtracted per occurrence in the generated tokens
  uint64_t seed = 0;
  int32_t logprobs = 0;            // top-n log-probabilities to report, 0..20
  // Prompt log-probabilities (ScoreToken of each prompt token given the ones before it) with
  // this many top entries, 0..20; -1 = none.
  int32_t prompt_logprobs = -1;
  // Thinking budget: with thinking_budget >= 0, once that many tokens follow the last
  // think_start_id of the sequence (prompt and generated, with no think_end_id after it), the
  // next token is think_end_id, whatever the logits say. -1 = no budget.
  int32_t thinking_budget = -1;
  int32_t think_start_id = -1;
  int32_t think_end_id = -1;
  // Added to the logits (after the penalties) before the draw, as OpenAI's logit_bias: per
  // token id, in [-100, 100]; -100 in effect bans a token, 100 all but forces it.
  std::vector<std::pair<int32_t, float>> logit_bias;
  // While fewer than min_tokens tokens are generated, the end_ids (EOS and stop token ids) are
  // never drawn.
  int32_t min_tokens = 0;
  std::vector<int32_t> end_ids;

  // InvalidArgument naming the field when a value is out of range.
  absl::Status Validate() const;
  bool greedy() const { return temperature <= 0.0f; }
};

struct TokenChoice {
  int32_t id = 0;
  float logprob = 0.0f;                          // of the chosen token, before filtering
  std::vector<std::pair<int32_t, float>> top;    // top-n (id, logprob) when requested
};

// One per sequence: owns the random stream, so a seeded sequence gives the same tokens whatever
// else is in the batch, and the thinking budget's count. Not thread-safe.
class Sampler {
 public:
  explicit Sampler(const SamplingConfig& cfg);
  // `logits`: [vocab], modified in place. `prompt` and `generated` feed the penalties
  // (repetition: both; presence / frequency: generated only, as OpenAI defines them). Each call
  // must see the previous call's tokens followed by its choice (the thinking budget reads only
  // the tokens it has not seen yet). A forced think_end_id reports its logprob and top-n as a
  // sampled token would and draws no random number.
  TokenChoice Sample(float* logits, int64_t vocab, const std::vector<int32_t>& prompt,
                     const std::vector<int32_t>& generated);
  // JSON mode: from now on every draw keeps to the constraint (after the penalties, before
  // the log-probabilities and filters, so reported logprobs are those of the allowed tokens),
  // and the chosen token advances it.
  void Constrain(std::unique_ptr<JsonConstraint> c) { constraint_ = std::move(c); }
  // Whether the next draw, after `generated` tokens, is the raw row's argmax (ties to the lowest
  // id): greedy with no log-probabilities, penalties, logit_bias, min_tokens still holding back
  // end ids, or JSON constraint. Then TakeArgMax(argmax of the row) is what Sample would return,
  // and the row itself need not leave the device (the attention stacks' ForwardArgMax).
  bool ArgMaxSuffices(int64_t generated) const;
  // Sample for such a draw, given the row's argmax: the thinking budget may still force
  // think_end_id. Same bookkeeping as Sample.
  TokenChoice TakeArgMax(int32_t argmax, int64_t vocab, const std::vector<int32_t>& prompt,
                         const std::vector<int32_t>& generated);
  // A token generated elsewhere (a moved sequence's replay): advances the constraint.
  void Observe(int32_t id) {
    if (constraint_ != nullptr) constraint_->Advance(id);
  }

 private:
  // True when the thinking budget forces think_end_id next (after reading the new tokens).
  bool BudgetSpent(const std::vector<int32_t>& prompt, const std::vector<int32_t>& generated);

  SamplingConfig cfg_;
  std::mt19937_64 rng_;
  std::unique_ptr<JsonConstraint> constraint_;
  // Thinking budget: tokens of prompt + generated read so far; whether the last marker among
  // them opened a thinking section, and how many tokens followed it.
  int64_t think_read_ = 0;
  bool thinking_ = false;
  int64_t think_tokens_ = 0;
};

// The log-probability of `id` under a raw row of logits (log-softmax: no penalties, no
// temperature), and the `top_n` best (id, logprob), best first (ties: lowest id).
TokenChoice ScoreToken(const float* logits, int64_t vocab, int32_t id, int32_t top_n);

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_SAMPLER_H_
