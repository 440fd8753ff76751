// Command-line flags of the router's scheduler, shared by every binary that runs a router
// (router, moemesh serve, moemesh_node): --max_queue, --max_running, --prefill_chunk.
#ifndef MOEMESH_ROUTER_ROUTER_FLAGS_H_
#define MOEMESH_ROUTER_ROUTER_FLAGS_H_

#include "router/router.h"

namespace moemesh {

RouterOptions RouterOptionsFromFlags();

}  // namespace moemesh

#endif  // MOEMESH_ROUTER_ROUTER_FLAGS_H_
