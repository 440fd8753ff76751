// An OpenAI-compatible HTTP/1.1 front end over a Router, beside the gRPC API:
//   POST /v1/completions, POST /v1/chat/completions  (JSON, or server-sent events with "stream")
//   GET  /v1/models, GET /health (503 while draining or while no attention worker answers),
//   GET /metrics (Prometheus text format)
//   POST /tokenize, POST /detokenize (vLLM's: a prompt or chat messages to ids, ids to text)
// One thread per connection; HTTP/1.1 connections stay open between requests (keep-alive, up to
// keep_alive_seconds idle; pipelined requests are answered in order) unless the client sends
// `Connection: close`. Streams use chunked transfer encoding; a client that goes away mid-stream
// (or before a non-streamed answer) cancels its request.
#ifndef MOEMESH_ROUTER_HTTP_SERVER_H_
#define MOEMESH_ROUTER_HTTP_SERVER_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "engine/tokenizer.h"
#include "router/router.h"

namespace moemesh {

struct HttpServerOptions {
  std::string served_model;        // the id /v1/models lists and requests may name
  int max_connections = 256;       // beyond: 503 at once
  int64_t max_body_bytes = 16 << 20;
  // How long an open connection may wait idle for its next request; 0 closes each connection
  // after one response.
  double keep_alive_seconds = 5;
};

class HttpServer {
 public:
  // Listens on `address` ("host:port"; port 0 picks one, reported in *bound). `router` must
  // outlive the server.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& address,
                                                           Router* router,
                                                           const HttpServerOptions& opt,
                                                           std::string* bound = nullptr);
  // Stops accepting, ends open connections (their requests are cancelled) and joins.
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

 private:
  HttpServer(int listen_fd, Router* router, HttpServerOptions opt);
  void AcceptLoop();
  void Serve(int fd);

  const int listen_fd_;
  int wake_[2] = {-1, -1};  // a pipe that ends AcceptLoop's poll
  Router* const router_;
  const HttpServerOptions opt_;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable done_;  // a connection ended
  std::set<int> open_;            // connection fds being served
  int active_ = 0;                // connection threads running (detached)
  std::thread accept_;
};

}  // namespace moemesh

#endif  // MOEMESH_ROUTER_HTTP_SERVER_H_
