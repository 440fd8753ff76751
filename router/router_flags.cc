#include "router/router_flags.h"

#include "absl/flags/flag.h"

ABSL_FLAG(int64_t, max_queue, 256,
          "Requests that may wait for KV cache room; more get RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, max_running, 64, "Sequences batched in one step.");
ABSL_FLAG(int64_t, prefill_chunk, 256,
          "Prompt tokens prefilled per step (long prompts go in chunks).");

namespace moemesh {

RouterOptions RouterOptionsFromFlags() {
  RouterOptions ro;
  ro.max_queue = absl::GetFlag(FLAGS_max_queue);
  ro.max_running = absl::GetFlag(FLAGS_max_running);
  ro.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  return ro;
}

}  // namespace moemesh
