#include "mesh/sampling_params.h"

#include <algorithm>

namespace moemesh {

SamplingConfig ToSamplingConfig(const moemesh::v1::SamplingParams& p) {
  SamplingConfig c;
  if (p.has_temperature()) c.temperature = p.temperature();
  if (p.has_top_p()) c.top_p = p.top_p();
  if (p.has_top_k()) c.top_k = p.top_k();
  if (p.has_min_p()) c.min_p = p.min_p();
  if (p.has_repetition_penalty()) c.repetition_penalty = p.repetition_penalty();
  if (p.has_presence_penalty()) c.presence_penalty = p.presence_penalty();
  if (p.has_frequency_penalty()) c.frequency_penalty = p.frequency_penalty();
  if (p.has_seed()) c.seed = p.seed();
  if (p.has_logprobs()) c.logprobs = p.logprobs();
  if (p.has_prompt_logprobs()) c.prompt_logprobs = p.prompt_logprobs();
  if (p.has_thinking_budget()) c.thinking_budget = p.thinking_budget();
  if (p.has_min_tokens()) c.min_tokens = p.min_tokens();
  c.logit_bias.assign(p.logit_bias().begin(), p.logit_bias().end());
  std::sort(c.logit_bias.begin(), c.logit_bias.end());  // (a map's order is unspecified)
  return c;
}

moemesh::v1::SamplingParams ResolveDefaults(const moemesh::v1::SamplingParams& p,
                                            const GenerationDefaults& d) {
  moemesh::v1::SamplingParams r = p;
  const bool sample = d.do_sample.value_or(false);
  if (!r.has_temperature()) r.set_temperature(sample ? d.temperature.value_or(1.0f) : 0.0f);
  if (sample) {
    if (!r.has_top_p() && d.top_p) r.set_top_p(*d.top_p);
    if (!r.has_top_k() && d.top_k) r.set_top_k(*d.top_k);
    if (!r.has_min_p() && d.min_p) r.set_min_p(*d.min_p);
  }
  if (!r.has_repetition_penalty() && d.repetition_penalty) {
    r.set_repetition_penalty(*d.repetition_penalty);
  }
  return r;
}

}  // namespace moemesh
