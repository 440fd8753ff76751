#include "router/router_flags.h"

#include "absl/flags/flag.h"

ABSL_FLAG(int64_t, max_queue, 256,
          "Requests that may wait for KV cache room; more get RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, max_running, 64, "Sequences batched in one step (per attention worker).");
ABSL_FLAG(int64_t, prefill_chunk, 256,
          "Prompt tokens prefilled per step (long prompts go in chunks).");
ABSL_FLAG(int32_t, max_moves, 2,
          "With several attention workers: times a request may move to another worker after its "
          "worker failed (it continues from its last token); beyond, it fails.");
ABSL_FLAG(double, worker_retry_seconds, 2,
          "With several attention workers: a failed worker takes no requests until its GetStats "
          "answers, asked after this many seconds, then doubling (at most 60).");

ABSL_FLAG(std::string, think_tokens, "",
          "The tokens between which a request's thinking_budget counts, as START,END; empty: "
          "<think>,</think> when the tokenizer has both (otherwise budgets are refused).");

namespace moemesh {

RouterOptions RouterOptionsFromFlags() {
  RouterOptions ro;
  ro.max_queue = absl::GetFlag(FLAGS_max_queue);
  ro.max_running = absl::GetFlag(FLAGS_max_running);
  ro.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  ro.max_moves = absl::GetFlag(FLAGS_max_moves);
  ro.worker_retry_seconds = absl::GetFlag(FLAGS_worker_retry_seconds);
  ro.think_tokens = absl::GetFlag(FLAGS_think_tokens);
  return ro;
}

}  // namespace moemesh
