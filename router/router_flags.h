// Command-line flags of the router's scheduler, shared by every binary that runs a router
// (router, moemesh serve, moemesh_node): --max_queue, --max_running, --prefill_chunk, --max_moves,
// --worker_retry_seconds, --outage_wait_seconds, --think_tokens, and the HTTP API's --http_address, --served_model_name,
// --http_keep_alive_seconds, and shutdown's --drain_seconds.
#ifndef MOEMESH_ROUTER_ROUTER_FLAGS_H_
#define MOEMESH_ROUTER_ROUTER_FLAGS_H_

#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "grpcpp/grpcpp.h"
#include "router/http_server.h"
#include "router/router.h"

// --think_tokens: also read by `moemesh generate --thinking_budget`; --http_address by
// `moemesh cluster` (which passes it to its router).
ABSL_DECLARE_FLAG(std::string, think_tokens);
ABSL_DECLARE_FLAG(std::string, http_address);
// --drain_seconds: also read by `moemesh cluster` (passed to its router; it waits that long for
// the router before stopping the workers).
ABSL_DECLARE_FLAG(double, drain_seconds);

namespace moemesh {

RouterOptions RouterOptionsFromFlags();

// The router's flags above (scheduling, HTTP API, shutdown) as given to this process, as
// "--NAME=VALUE" arguments for a router it starts (`moemesh cluster`).
std::vector<std::string> RouterFlagsForChild();

// Blocks until SIGINT or SIGTERM, then drains: `router` refuses new requests, `server`'s gRPC
// health turns NOT_SERVING, and the accepted requests get --drain_seconds to finish. Logs as
// `who`. The caller then shuts its servers down (cancelling what is left).
void WaitForSignalThenDrain(Router* router, grpc::Server* server, const std::string& who);

// With --http_address: starts the OpenAI-compatible HTTP API over `router` (the model id it
// serves: --served_model_name, or the basename of `model_dir`) and logs "`who`: serving the
// OpenAI-compatible HTTP API on HOST:PORT". Null without --http_address.
absl::StatusOr<std::unique_ptr<HttpServer>> StartHttpFromFlags(Router* router,
                                                               const std::string& model_dir,
                                                               const std::string& who);

}  // namespace moemesh

#endif  // MOEMESH_ROUTER_ROUTER_FLAGS_H_
