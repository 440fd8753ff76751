#include "attention_worker/worker_flags.h"

#include <cstdint>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"

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

ABSL_FLAG(double, idle_sequence_seconds, 600,
          "Attention worker: release a sequence no step has touched for this many seconds (its "
          "router was killed or restarted without releasing it; a router steps each of its "
          "sequences every step), so its KV cache rows are free again. 0 = never.");

namespace moemesh {

void AttentionFlagsInto(AttentionSetupOptions* o) {
  o->prefix_cache_tokens = absl::GetFlag(FLAGS_prefix_cache_tokens);
  o->speculative_tokens = absl::GetFlag(FLAGS_speculative_tokens);
  o->speculative_max_batch = absl::GetFlag(FLAGS_speculative_max_batch);
  o->idle_sequence_seconds = absl::GetFlag(FLAGS_idle_sequence_seconds);
}

std::vector<std::string> AttentionFlagsForChild() {
  return {absl::StrCat("--prefix_cache_tokens=", absl::GetFlag(FLAGS_prefix_cache_tokens)),
          absl::StrCat("--speculative_tokens=", absl::GetFlag(FLAGS_speculative_tokens)),
          absl::StrCat("--speculative_max_batch=", absl::GetFlag(FLAGS_speculative_max_batch)),
          absl::StrCat("--idle_sequence_seconds=", absl::GetFlag(FLAGS_idle_sequence_seconds))};
}

}  // namespace moemesh
