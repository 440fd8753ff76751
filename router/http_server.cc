#include "router/http_server.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "router/openai_api.h"

namespace moemesh {
namespace {

using json = nlohmann::json;

constexpr size_t kMaxHeaderBytes = 64 << 10;

const char* Reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Internal Server Error";
  }
}

// Sends all of `data`; false when the peer is gone.
bool SendAll(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

// A connection: its socket and whether it stays open after the response being written.
struct Conn {
  int fd;
  bool keep_alive;
  const char* ConnectionHeader() const {
    return keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n";
  }
};

bool SendResponse(const Conn& c, int status, const std::string& content_type,
                  const std::string& body, const std::string& extra_headers = "") {
  return SendAll(c.fd, absl::StrCat("HTTP/1.1 ", status, " ", Reason(status),
                                    "\r\nContent-Type: ", content_type,
                                    "\r\nContent-Length: ", body.size(), "\r\n", extra_headers,
                                    c.ConnectionHeader(), "\r\n", body));
}

// An OpenAI error object; `status` 0 = the one openai::HttpStatus gives `st`.
bool SendError(const Conn& c, const absl::Status& st, int status = 0,
               const std::string& extra_headers = "") {
  return SendResponse(c, status != 0 ? status : openai::HttpStatus(st), "application/json",
                      openai::ErrorBody(st).dump() + "\n", extra_headers);
}

// 405 for a path that takes only `allowed`.
bool SendMethodNotAllowed(const Conn& c, const std::string& allowed) {
  return SendError(c, absl::InvalidArgumentError("use " + allowed), 405,
                   "Allow: " + allowed + "\r\n");
}

// One chunk of a chunked body.
bool SendChunk(int fd, const std::string& data) {
  if (data.empty()) return true;
  char size[20];
  std::snprintf(size, sizeof(size), "%zx\r\n", data.size());
  return SendAll(fd, absl::StrCat(size, data, "\r\n"));
}

bool SendEvent(int fd, const json& j) { return SendChunk(fd, "data: " + j.dump() + "\n\n"); }

// True when the peer has closed its side (a client that gave up on a non-streamed answer).
bool PeerClosed(int fd) {
  pollfd p{fd, POLLIN | POLLRDHUP, 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  if (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) return true;
  char c;
  return ::recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

// Collects the responses of one HTTP request's choices (one router request each) for the
// connection's thread.
class ChoiceQueue {
 public:
  struct Event {
    int choice;
    std::optional<moemesh::v1::GenerateResponse> response;  // none: the choice finished
    absl::Status status;                                     // its final status
  };
  explicit ChoiceQueue(int choices) {
    for (int i = 0; i < choices; ++i) sinks_.emplace_back(new Sink(this, i));
  }
  GenerationSink* sink(int choice) { return sinks_[choice].get(); }
  // The next event; nothing after `wait` with none.
  std::optional<Event> Next(std::chrono::milliseconds wait) {
    std::unique_lock<std::mutex> l(mu_);
    if (!cv_.wait_for(l, wait, [&] { return !queue_.empty(); })) return std::nullopt;
    Event e = std::move(queue_.front());
    queue_.pop_front();
    return e;
  }

 private:
  class Sink : public GenerationSink {
   public:
    Sink(ChoiceQueue* q, int choice) : q_(q), choice_(choice) {}
    void OnResponse(const moemesh::v1::GenerateResponse& r) override {
      q_->Push({choice_, r, absl::OkStatus()});
    }
    void OnFinish(const absl::Status& st) override { q_->Push({choice_, std::nullopt, st}); }

   private:
    ChoiceQueue* const q_;
    const int choice_;
  };
  void Push(Event e) {
    std::lock_guard<std::mutex> l(mu_);
    queue_.push_back(std::move(e));
    cv_.notify_all();
  }

  std::vector<std::unique_ptr<Sink>> sinks_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> queue_;
};

struct HttpRequest {
  std::string method, path;
  bool http10 = false;  // an HTTP/1.0 request: its connection closes unless it asks otherwise
  std::map<std::string, std::string> headers;  // names lower-cased
  std::string body;
};

// Reads one request, starting with the bytes in *carry (read with the connection's previous
// request) and leaving there any that follow it. On a malformed or oversized request, answers it
// (closing the connection) and returns an error.
absl::StatusOr<HttpRequest> ReadRequest(int fd, int64_t max_body, std::string* carry) {
  const Conn conn{fd, /*keep_alive=*/false};
  std::string buf = std::move(*carry);
  carry->clear();
  size_t header_end = std::string::npos;
  char chunk[8192];
  while ((header_end = buf.find("\r\n\r\n")) == std::string::npos) {
    if (buf.size() > kMaxHeaderBytes) {
      SendResponse(conn, 431, "text/plain", "request headers too large\n");
      return absl::InvalidArgumentError("headers too large");
    }
    const ssize_t n = ::recv(fd, chunk, sizeof(chunk), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return absl::UnavailableError("connection closed");
    buf.append(chunk, static_cast<size_t>(n));
  }
  HttpRequest req;
  const std::string head = buf.substr(0, header_end);
  std::string rest = buf.substr(header_end + 4);
  size_t line_end = head.find("\r\n");
  const std::string request_line = head.substr(0, line_end);
  const size_t sp1 = request_line.find(' '), sp2 = request_line.rfind(' ');
  if (sp1 == std::string::npos || sp2 == sp1) {
    SendError(conn, absl::InvalidArgumentError("malformed request line"));
    return absl::InvalidArgumentError("bad request line");
  }
  req.method = request_line.substr(0, sp1);
  req.path = request_line.substr(sp1 + 1, sp2 - sp1 - 1);
  req.http10 = request_line.substr(sp2 + 1) == "HTTP/1.0";
  if (size_t q = req.path.find('?'); q != std::string::npos) req.path.resize(q);
  while (line_end != std::string::npos && line_end < head.size()) {
    const size_t next = head.find("\r\n", line_end + 2);
    const std::string line = head.substr(line_end + 2, next == std::string::npos
                                                           ? std::string::npos
                                                           : next - line_end - 2);
    line_end = next;
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon);
    std::transform(name.begin(), name.end(), name.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    std::string value = line.substr(colon + 1);
    value.erase(0, value.find_first_not_of(" \t"));
    value.erase(value.find_last_not_of(" \t") + 1);
    req.headers[name] = value;
  }
  if (req.headers.count("transfer-encoding")) {
    SendError(conn, absl::InvalidArgumentError("chunked request bodies are not supported: send "
                                               "Content-Length"));
    return absl::InvalidArgumentError("chunked body");
  }
  int64_t length = 0;
  if (auto it = req.headers.find("content-length"); it != req.headers.end()) {
    if (!absl::SimpleAtoi(it->second, &length) || length < 0) {
      SendError(conn, absl::InvalidArgumentError("bad Content-Length"));
      return absl::InvalidArgumentError("bad length");
    }
  }
  if (length > max_body) {
    SendError(conn,
              absl::InvalidArgumentError(
                  absl::StrCat("the body has ", length, " bytes; at most ", max_body)),
              413);
    return absl::InvalidArgumentError("body too large");
  }
  if (auto it = req.headers.find("expect"); it != req.headers.end() && rest.empty() &&
                                             length > 0) {
    SendAll(fd, "HTTP/1.1 100 Continue\r\n\r\n");
  }
  while (static_cast<int64_t>(rest.size()) < length) {
    const ssize_t n = ::recv(fd, chunk, sizeof(chunk), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return absl::UnavailableError("connection closed mid-body");
    rest.append(chunk, static_cast<size_t>(n));
  }
  carry->assign(rest, static_cast<size_t>(length), std::string::npos);  // a pipelined request
  rest.resize(static_cast<size_t>(length));
  req.body = std::move(rest);
  return req;
}

// Whether the connection may stay open after answering `req` (HTTP/1.1 unless it says close;
// HTTP/1.0 only when it asks for keep-alive).
bool WantsKeepAlive(const HttpRequest& req) {
  auto it = req.headers.find("connection");
  std::string v = it == req.headers.end() ? "" : it->second;
  std::transform(v.begin(), v.end(), v.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (v.find("close") != std::string::npos) return false;
  return !req.http10 || v.find("keep-alive") != std::string::npos;
}

// Answers one request on `c`. Returns whether the connection is still usable (the peer did not
// go away). `stop`: the server is shutting down (in-flight requests are cancelled).
bool Handle(const Conn& c, const HttpRequest& req, Router* router, const HttpServerOptions& opt,
            const std::atomic<bool>& stop) {
  const bool completions = req.path == "/v1/completions";
  const bool chat = req.path == "/v1/chat/completions";
  if (req.path == "/health") {
    if (req.method != "GET") return SendMethodNotAllowed(c, "GET");
    if (router->draining()) return SendResponse(c, 503, "text/plain", "draining\n");
    // Ready once some attention worker answers with nothing that stops a step.
    const absl::Status ready = router->SomeWorkerCanServe();
    if (!ready.ok()) {
      return SendResponse(c, 503, "text/plain",
                          absl::StrCat("no attention worker can serve: ", ready.message(), "\n"));
    }
    return SendResponse(c, 200, "text/plain", "ok\n");
  }
  if (req.path == "/tokenize") {
    if (req.method != "POST") return SendMethodNotAllowed(c, "POST");
    auto t = openai::ParseTokenize(req.body, opt.served_model);
    if (!t.ok()) return SendError(c, t.status());
    std::vector<int32_t> ids;
    if (t->prompt.has_value()) {
      ids = router->tokenizer()->Encode(*t->prompt, t->add_special_tokens);
    } else {
      auto p = router->PromptIds(t->chat);
      if (!p.ok()) return SendError(c, p.status());
      ids = std::move(*p);
    }
    const json body{{"tokens", ids},
                    {"count", ids.size()},
                    {"max_model_len", router->config().max_position_embeddings}};
    return SendResponse(c, 200, "application/json", body.dump() + "\n");
  }
  if (req.path == "/detokenize") {
    if (req.method != "POST") return SendMethodNotAllowed(c, "POST");
    auto ids = openai::ParseDetokenize(req.body, opt.served_model);
    if (!ids.ok()) return SendError(c, ids.status());
    if (absl::Status st = CheckTokenIds("tokens", *ids, router->tokenizer()->vocab_size());
        !st.ok()) {
      return SendError(c, st);
    }
    const json body{{"prompt", router->tokenizer()->Decode(*ids, /*skip_special_tokens=*/false)}};
    return SendResponse(c, 200, "application/json",
                        body.dump(-1, ' ', false, json::error_handler_t::replace) + "\n");
  }
  if (req.path == "/metrics") {
    if (req.method != "GET") return SendMethodNotAllowed(c, "GET");
    return SendResponse(c, 200, "text/plain; version=0.0.4; charset=utf-8",
                        PrometheusMetrics(router->counters(), router->WorkerStats()));
  }
  if (req.path == "/v1/models") {
    if (req.method != "GET") return SendMethodNotAllowed(c, "GET");
    json list{{"object", "list"},
              {"data", json::array({{{"id", opt.served_model},
                                     {"object", "model"},
                                     {"created", 0},
                                     {"owned_by", "moemesh"}}})}};
    return SendResponse(c, 200, "application/json", list.dump() + "\n");
  }
  if (!completions && !chat) {
    return SendError(c, absl::NotFoundError(absl::StrCat(
                            "no route ", req.path,
                            ": POST /v1/completions, POST /v1/chat/completions, GET /v1/models, "
                            "GET /health, GET /metrics, POST /tokenize, POST /detokenize")));
  }
  if (req.method != "POST") return SendMethodNotAllowed(c, "POST");
  const openai::Endpoint endpoint =
      chat ? openai::Endpoint::kChat : openai::Endpoint::kCompletions;
  auto parsed = openai::ParseRequest(endpoint, req.body, opt.served_model);
  if (!parsed.ok()) return SendError(c, parsed.status());
  const int choices = static_cast<int>(parsed->requests.size());
  ChoiceQueue queue(choices);
  // Router ids of the submitted choices; the queue must outlive every call the router makes to
  // their sinks, i.e. until each submitted choice's finish event.
  std::vector<uint64_t> ids;
  std::vector<bool> finished;
  int running = 0;
  absl::Status failed;  // the first choice that failed (the others are then cancelled)
  bool cancelled = false;
  auto cancel_all = [&] {
    if (cancelled) return;
    cancelled = true;
    for (size_t i = 0; i < ids.size(); ++i) {
      if (!finished[i]) router->Cancel(ids[i]);
    }
  };
  for (int i = 0; i < choices && failed.ok(); ++i) {
    auto id = router->Submit(parsed->requests[i], queue.sink(i));
    if (!id.ok()) {
      failed = id.status();
      break;
    }
    ids.push_back(*id);
    finished.push_back(false);
    ++running;
  }
  if (!failed.ok()) cancel_all();
  std::vector<openai::ResponseBuilder> builders;
  builders.reserve(static_cast<size_t>(choices));
  const std::string id_text =
      absl::StrCat(chat ? "chatcmpl-" : "cmpl-", ids.empty() ? 0 : ids[0]);
  const int64_t created = static_cast<int64_t>(std::time(nullptr));
  for (int i = 0; i < choices; ++i) {
    builders.emplace_back(endpoint, id_text, opt.served_model, created, parsed->top_logprobs, i);
    if (parsed->echo) {
      const moemesh::v1::GenerateRequest& g = parsed->requests[i];
      builders.back().Echo(
          g.has_token_ids()
              ? router->tokenizer()->Decode({g.token_ids().ids().begin(), g.token_ids().ids().end()},
                                            /*skip_special=*/false)
              : g.text(),
          parsed->prompt_only);
    }
  }
  const bool stream = parsed->stream && failed.ok();  // a refused request answers plainly
  bool alive = true;
  if (stream) {
    alive = SendAll(c.fd, absl::StrCat("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                       "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n",
                                       c.ConnectionHeader(), "\r\n"));
    for (int i = 0; alive && chat && i < choices; ++i) {
      alive = SendEvent(c.fd, builders[i].RoleChunk());
    }
  }
  while (running > 0) {
    auto e = queue.Next(std::chrono::milliseconds(200));
    if (!e.has_value()) {  // a quiet moment: is anyone still listening?
      if (alive && !stream && PeerClosed(c.fd)) alive = false;
      if (!alive || stop) cancel_all();
      continue;
    }
    if (!e->response.has_value()) {
      finished[e->choice] = true;
      --running;
      if (!e->status.ok() && failed.ok()) {
        failed = e->status;
        cancel_all();
      }
      continue;
    }
    const moemesh::v1::GenerateResponse& r = *e->response;
    if (!stream) {
      builders[e->choice].Add(r);
      continue;
    }
    const bool empty = r.text().empty() && r.logprobs_size() == 0 &&
                       r.finish_reason() == moemesh::v1::FINISH_REASON_UNSPECIFIED;
    json chunk = builders[e->choice].Chunk(r);
    if (alive && !empty && !SendEvent(c.fd, chunk)) {
      alive = false;
      cancel_all();
    }
  }
  if (!alive) return false;
  if (!stream) {
    if (!failed.ok()) return SendError(c, failed);
    return SendResponse(c, 200, "application/json",
                        openai::Final(builders, parsed->n).dump() + "\n");
  }
  if (!failed.ok()) {
    alive = SendEvent(c.fd, openai::ErrorBody(failed));
  } else if (parsed->include_usage) {
    alive = SendEvent(c.fd, openai::UsageChunk(builders, parsed->n));
  }
  return alive && SendChunk(c.fd, "data: [DONE]\n\n") && SendAll(c.fd, "0\r\n\r\n");
}

}  // namespace

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& address,
                                                              Router* router,
                                                              const HttpServerOptions& opt,
                                                              std::string* bound) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("HTTP address '", address, "' must be HOST:PORT"));
  }
  const std::string host = address.substr(0, colon), port = address.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  if (int e = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &res);
      e != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("HTTP address '", address, "': ", ::gai_strerror(e)));
  }
  int fd = -1;
  std::string why;
  for (addrinfo* a = res; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, 128) != 0) {
      why = std::strerror(errno);
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(res);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen for HTTP on ", address, ": ", why));
  }
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  char port_buf[16];
  ::getnameinfo(reinterpret_cast<sockaddr*>(&ss), len, nullptr, 0, port_buf, sizeof(port_buf),
                NI_NUMERICSERV);
  if (bound != nullptr) *bound = absl::StrCat(host, ":", port_buf);
  std::unique_ptr<HttpServer> s(new HttpServer(fd, router, opt));
  if (::pipe2(s->wake_, O_CLOEXEC) != 0) return absl::InternalError("pipe2 failed");
  s->accept_ = std::thread([p = s.get()] { p->AcceptLoop(); });
  return s;
}

HttpServer::HttpServer(int listen_fd, Router* router, HttpServerOptions opt)
    : listen_fd_(listen_fd), router_(router), opt_(std::move(opt)) {}

HttpServer::~HttpServer() {
  stop_ = true;
  if (wake_[1] >= 0) {
    char c = 0;
    (void)!::write(wake_[1], &c, 1);
  }
  if (accept_.joinable()) accept_.join();
  {
    std::unique_lock<std::mutex> l(mu_);
    for (int fd : open_) ::shutdown(fd, SHUT_RDWR);
    done_.wait(l, [&] { return active_ == 0; });
  }
  ::close(listen_fd_);
  for (int fd : wake_) {
    if (fd >= 0) ::close(fd);
  }
}

void HttpServer::AcceptLoop() {
  while (!stop_) {
    pollfd p[2] = {{listen_fd_, POLLIN, 0}, {wake_[0], POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (stop_ || (p[1].revents & POLLIN)) return;
    if (!(p[0].revents & POLLIN)) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    std::lock_guard<std::mutex> l(mu_);
    if (active_ >= opt_.max_connections) {
      SendError(Conn{fd, false}, absl::UnavailableError(absl::StrCat(
                        "too many connections (", active_, "): retry later")));
      ::close(fd);
      continue;
    }
    ++active_;
    open_.insert(fd);
    std::thread([this, fd] { Serve(fd); }).detach();
  }
}

void HttpServer::Serve(int fd) {
  timeval tv{30, 0};  // a client that stops sending mid-request is dropped
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  std::string carry;  // bytes of the next request read with the last one
  for (bool first = true; !stop_; first = false) {
    if (!first && carry.empty()) {
      // Keep-alive: wait for the next request at most keep_alive_seconds (the destructor's
      // shutdown of the socket ends the wait at once).
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(opt_.keep_alive_seconds * 1000)) <= 0 || stop_) break;
    }
    auto req = ReadRequest(fd, opt_.max_body_bytes, &carry);
    if (!req.ok()) break;
    const bool keep = opt_.keep_alive_seconds > 0 && WantsKeepAlive(*req) && !stop_;
    if (!Handle(Conn{fd, keep}, *req, router_, opt_, stop_) || !keep) break;
  }
  std::lock_guard<std::mutex> l(mu_);
  open_.erase(fd);
  ::close(fd);
  --active_;
  done_.notify_all();  // last: the destructor may return once active_ is 0
}

}  // namespace moemesh
