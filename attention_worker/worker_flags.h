// Attention-worker flags shared by every binary that runs one (attention_worker, `moemesh serve`,
// moemesh_node): --prefix_cache_tokens, --speculative_tokens, --speculative_max_batch.
#ifndef MOEMESH_ATTENTION_WORKER_WORKER_FLAGS_H_
#define MOEMESH_ATTENTION_WORKER_WORKER_FLAGS_H_

#include "attention_worker/setup.h"

namespace moemesh {

// Copies the flags' values into `o` (BuildAttentionWorker checks them).
void AttentionFlagsInto(AttentionSetupOptions* o);

}  // namespace moemesh

#endif  // MOEMESH_ATTENTION_WORKER_WORKER_FLAGS_H_
