// Prompt-lookup (n-gram) speculative decoding: draft tokens come from the sequence itself. When
// the last n tokens occurred earlier (in the prompt or the generated text), the tokens that
// followed them then are proposed as the next ones; one forward step over the input token and
// the drafts gives logits for every draft position, and the sequence's sampler draws from them in
// order, keeping drafts while each draw equals the draft it checks. Each draw uses the row the
// token would have had one step at a time and one random number per token, so the tokens
// (greedy or seeded) are those of plain decoding, up to the rounding of a row computed in a
// multi-token step (~1e-6 in the logits: attention sums its keys in another order), which can
// only flip a near-tie; a step yields 1 + accepted tokens.
#ifndef MOEMESH_ENGINE_SPECULATION_H_
#define MOEMESH_ENGINE_SPECULATION_H_

#include <cstdint>
#include <vector>

namespace moemesh {

// Up to `max_draft` tokens that followed an earlier occurrence of the last n tokens of
// `history`, for the largest n in [min_ngram, max_ngram] that has one (an occurrence ending
// before the last token, so at least one token follows it): the latest occurrence followed by
// max_draft tokens, else the earliest (the one followed by the most). Empty when none matches.
std::vector<int32_t> LookupDraft(const std::vector<int32_t>& history, int max_ngram,
                                 int min_ngram, int max_draft);

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_SPECULATION_H_
