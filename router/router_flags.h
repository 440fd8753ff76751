// Command-line flags of the router's scheduler, shared by every binary that runs a router
// (router, moemesh serve, moemesh_node): --max_queue, --max_running, --prefill_chunk, --max_moves,
// --worker_retry_seconds, --think_tokens.
#ifndef MOEMESH_ROUTER_ROUTER_FLAGS_H_
#define MOEMESH_ROUTER_ROUTER_FLAGS_H_

#include <string>

#include "absl/flags/declare.h"
#include "router/router.h"

// --think_tokens: also read by `moemesh generate --thinking_budget`.
ABSL_DECLARE_FLAG(std::string, think_tokens);

namespace moemesh {

RouterOptions RouterOptionsFromFlags();

}  // namespace moemesh

#endif  // MOEMESH_ROUTER_ROUTER_FLAGS_H_
