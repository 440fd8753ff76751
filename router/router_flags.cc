#include "router/router_flags.h"

#include <algorithm>
#include <chrono>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/str_cat.h"
#include "mesh/server.h"

ABSL_FLAG(int64_t, max_queue, 256,
          "Requests that may wait for KV cache room; more get RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, max_running, 64, "Sequences batched in one step (per attention worker).");
ABSL_FLAG(int64_t, prefill_chunk, 256,
          "Prompt tokens prefilled per step (long prompts go in chunks).");
ABSL_FLAG(int32_t, max_moves, 2,
          "Times a request may go back to the queue after its attention worker's step failed as "
          "a whole, or the worker no longer had its sequence (it continues from its last token "
          "on another worker, or on the same one once it serves again); the next failure fails "
          "it.");
ABSL_FLAG(double, worker_retry_seconds, 0.5,
          "An attention worker whose step failed takes no requests until its GetStats answers "
          "with nothing that stops a step (its encoder and every expert reachable), asked after "
          "this many seconds, then doubling (at most 2).");
ABSL_FLAG(double, outage_wait_seconds, 10,
          "With no attention worker in service (each failed a step and is not back), requests "
          "wait this long for one to serve again (a restarted worker, an expert worker back); "
          "then the waiting ones fail with UNAVAILABLE, and new ones are refused with UNAVAILABLE "
          "until a worker serves again. 0 = fail them at once.");

ABSL_FLAG(std::string, think_tokens, "",
          "The tokens between which a request's thinking_budget counts, as START,END; empty: "
          "<think>,</think> when the tokenizer has both (otherwise budgets are refused).");

ABSL_FLAG(std::string, http_address, "",
          "Also serve the OpenAI-compatible HTTP API (POST /v1/completions, /v1/chat/completions, "
          "GET /v1/models, /health) on HOST:PORT; empty = off.");
ABSL_FLAG(std::string, served_model_name, "",
          "The model id of the HTTP API (what /v1/models lists and requests name); empty = the "
          "model directory's basename.");

ABSL_FLAG(double, http_keep_alive_seconds, 5,
          "HTTP API: how long a connection may wait idle for its next request (HTTP/1.1 "
          "keep-alive); 0 = close each connection after one response.");

ABSL_FLAG(double, drain_seconds, 30,
          "On SIGTERM or SIGINT: how long the requests already accepted get to finish while new "
          "ones are refused (gRPC UNAVAILABLE, HTTP 503; gRPC health and GET /health report not "
          "serving, so load balancers move on); those still running after it are cancelled. "
          "0 = cancel at once.");

namespace moemesh {

void WaitForSignalThenDrain(Router* router, grpc::Server* server, const std::string& who) {
  WaitForSignal();
  router->Drain();
  if (server != nullptr) server->GetHealthCheckService()->SetServingStatus(false);
  const double seconds = std::max(0.0, absl::GetFlag(FLAGS_drain_seconds));
  const Router::Counters c = router->counters();
  std::cerr << who << ": shutting down: draining " << c.running + c.waiting
            << " requests (up to " << seconds << " s; new ones are refused)" << std::endl;
  const bool idle = router->WaitIdle(std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(seconds)));
  std::cerr << who << (idle ? ": drained" : ": drain time is up: cancelling the requests left")
            << std::endl;
}

RouterOptions RouterOptionsFromFlags() {
  RouterOptions ro;
  ro.max_queue = absl::GetFlag(FLAGS_max_queue);
  ro.max_running = absl::GetFlag(FLAGS_max_running);
  ro.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  ro.max_moves = absl::GetFlag(FLAGS_max_moves);
  ro.worker_retry_seconds = absl::GetFlag(FLAGS_worker_retry_seconds);
  ro.outage_wait_seconds = absl::GetFlag(FLAGS_outage_wait_seconds);
  ro.think_tokens = absl::GetFlag(FLAGS_think_tokens);
  return ro;
}

std::vector<std::string> RouterFlagsForChild() {
  std::vector<std::string> args;
  for (const char* name :
       {"max_queue", "max_running", "prefill_chunk", "max_moves", "worker_retry_seconds",
        "outage_wait_seconds", "think_tokens", "http_address", "served_model_name",
        "http_keep_alive_seconds", "drain_seconds"}) {
    const absl::CommandLineFlag* f = absl::FindCommandLineFlag(name);
    if (f != nullptr) args.push_back(absl::StrCat("--", name, "=", f->CurrentValue()));
  }
  return args;
}

absl::StatusOr<std::unique_ptr<HttpServer>> StartHttpFromFlags(Router* router,
                                                               const std::string& model_dir,
                                                               const std::string& who) {
  const std::string address = absl::GetFlag(FLAGS_http_address);
  if (address.empty()) return std::unique_ptr<HttpServer>();
  HttpServerOptions opt;
  opt.keep_alive_seconds = absl::GetFlag(FLAGS_http_keep_alive_seconds);
  if (!(opt.keep_alive_seconds >= 0 && opt.keep_alive_seconds <= 3600)) {
    return absl::InvalidArgumentError("--http_keep_alive_seconds must be in [0, 3600]");
  }
  opt.served_model = absl::GetFlag(FLAGS_served_model_name);
  if (opt.served_model.empty()) {
    std::string dir = model_dir;
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    opt.served_model = dir.substr(dir.rfind('/') + 1);
  }
  std::string bound;
  auto server = HttpServer::Start(address, router, opt, &bound);
  if (!server.ok()) return server.status();
  std::cerr << who << ": serving the OpenAI-compatible HTTP API on " << bound << " (model '"
            << opt.served_model << "')" << std::endl;
  return server;
}

}  // namespace moemesh
