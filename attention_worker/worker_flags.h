// Attention-worker flags shared by every binary that runs one (attention_worker, `moemesh serve`,
// moemesh_node): --prefix_cache_tokens, --speculative_tokens, --speculative_max_batch,
// --idle_sequence_seconds.
#ifndef MOEMESH_ATTENTION_WORKER_WORKER_FLAGS_H_
#define MOEMESH_ATTENTION_WORKER_WORKER_FLAGS_H_

#include <string>
#include <vector>

#include "attention_worker/setup.h"

namespace moemesh {

// Copies the flags' values into `o` (BuildAttentionWorker checks them).
void AttentionFlagsInto(AttentionSetupOptions* o);
// The same flags as arguments for an attention_worker process (`moemesh cluster`).
std::vector<std::string> AttentionFlagsForChild();

}  // namespace moemesh

#endif  // MOEMESH_ATTENTION_WORKER_WORKER_FLAGS_H_
