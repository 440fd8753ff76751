#include "attention_worker/worker_flags.h"

#include <cstdint>

#include "absl/flags/flag.h"

ABSL_FLAG(int64_t, prefix_cache_tokens, 0,
          "Attention worker: KV rows of finished requests kept for reuse, in tokens, beyond "
          "--kv_capacity_tokens (least recently used dropped first): a prompt "
          "that starts with the tokens of an earlier request (a shared system prompt, the next "
          "turn of a chat) copies their rows instead of computing them. 0 = off.");
ABSL_FLAG(int32_t, speculative_tokens, 0,
          "Attention worker: speculative decoding by prompt lookup: up to "
          "this many draft tokens per decoding sequence and step, taken from what followed the "
          "sequence's last 2-4 tokens earlier in it, checked in the same forward pass; the "
          "tokens are those of plain decoding (greedy or seeded; up to ~1e-6 rounding of the "
          "logits). 0 = off; at most 16.");
ABSL_FLAG(int32_t, speculative_max_batch, 8,
          "Attention worker: speculate only in steps with at most this many decoding sequences "
          "(larger steps gain less from the extra rows than they cost).");

namespace moemesh {

void AttentionFlagsInto(AttentionSetupOptions* o) {
  o->prefix_cache_tokens = absl::GetFlag(FLAGS_prefix_cache_tokens);
  o->speculative_tokens = absl::GetFlag(FLAGS_speculative_tokens);
  o->speculative_max_batch = absl::GetFlag(FLAGS_speculative_max_batch);
}

}  // namespace moemesh
