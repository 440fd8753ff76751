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
#include <utility>

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

bool SendResponse(int fd, int status, const std::string& content_type, const std::string& body,
                  const std::string& extra_headers = "") {
  return SendAll(fd, absl::StrCat("HTTP/1.1 ", status, " ", Reason(status),
                                  "\r\nContent-Type: ", content_type,
                                  "\r\nContent-Length: ", body.size(), "\r\n", extra_headers,
                                  "Connection: close\r\n\r\n", body));
}

// An OpenAI error object; `status` 0 = the one openai::HttpStatus gives `st`.
bool SendError(int fd, const absl::Status& st, int status = 0,
               const std::string& extra_headers = "") {
  return SendResponse(fd, status != 0 ? status : openai::HttpStatus(st), "application/json",
                      openai::ErrorBody(st).dump() + "\n", extra_headers);
}

// 405 for a path that takes only `allowed`.
bool SendMethodNotAllowed(int fd, const std::string& allowed) {
  return SendError(fd, absl::InvalidArgumentError("use " + allowed), 405,
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

// Collects one request's responses for the connection's thread.
class QueueSink : public GenerationSink {
 public:
  void OnResponse(const moemesh::v1::GenerateResponse& r) override {
    std::lock_guard<std::mutex> l(mu_);
    queue_.push_back(r);
    cv_.notify_all();
  }
  void OnFinish(const absl::Status& st) override {
    std::lock_guard<std::mutex> l(mu_);
    status_ = st;
    done_ = true;
    cv_.notify_all();
  }
  // The next response, or nothing once finished (then status() is final). Waits at most
  // `wait`; *timed_out tells a timeout from the end.
  std::optional<moemesh::v1::GenerateResponse> Next(std::chrono::milliseconds wait,
                                                    bool* timed_out) {
    std::unique_lock<std::mutex> l(mu_);
    *timed_out = !cv_.wait_for(l, wait, [&] { return !queue_.empty() || done_; });
    if (*timed_out || queue_.empty()) return std::nullopt;
    moemesh::v1::GenerateResponse r = std::move(queue_.front());
    queue_.pop_front();
    return r;
  }
  absl::Status status() {
    std::lock_guard<std::mutex> l(mu_);
    return status_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<moemesh::v1::GenerateResponse> queue_;
  bool done_ = false;
  absl::Status status_;
};

struct HttpRequest {
  std::string method, path;
  std::map<std::string, std::string> headers;  // names lower-cased
  std::string body;
};

// Reads one request; on a malformed or oversized one, answers it and returns an error.
absl::StatusOr<HttpRequest> ReadRequest(int fd, int64_t max_body) {
  std::string buf;
  size_t header_end = std::string::npos;
  char chunk[8192];
  while ((header_end = buf.find("\r\n\r\n")) == std::string::npos) {
    if (buf.size() > kMaxHeaderBytes) {
      SendResponse(fd, 431, "text/plain", "request headers too large\n");
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
    SendError(fd, absl::InvalidArgumentError("malformed request line"));
    return absl::InvalidArgumentError("bad request line");
  }
  req.method = request_line.substr(0, sp1);
  req.path = request_line.substr(sp1 + 1, sp2 - sp1 - 1);
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
    SendError(fd, absl::InvalidArgumentError("chunked request bodies are not supported: send "
                                             "Content-Length"));
    return absl::InvalidArgumentError("chunked body");
  }
  int64_t length = 0;
  if (auto it = req.headers.find("content-length"); it != req.headers.end()) {
    if (!absl::SimpleAtoi(it->second, &length) || length < 0) {
      SendError(fd, absl::InvalidArgumentError("bad Content-Length"));
      return absl::InvalidArgumentError("bad length");
    }
  }
  if (length > max_body) {
    SendError(fd,
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
  rest.resize(static_cast<size_t>(length));
  req.body = std::move(rest);
  return req;
}

// Answers one request. `stop`: the server is shutting down (in-flight requests are cancelled).
void Handle(int fd, const HttpRequest& req, Router* router, const HttpServerOptions& opt,
            const std::atomic<bool>& stop) {
  const bool completions = req.path == "/v1/completions";
  const bool chat = req.path == "/v1/chat/completions";
  if (req.path == "/health") {
    if (req.method != "GET") {
      SendMethodNotAllowed(fd, "GET");
      return;
    }
    SendResponse(fd, 200, "text/plain", "ok\n");
    return;
  }
  if (req.path == "/v1/models") {
    if (req.method != "GET") {
      SendMethodNotAllowed(fd, "GET");
      return;
    }
    json list{{"object", "list"},
              {"data", json::array({{{"id", opt.served_model},
                                     {"object", "model"},
                                     {"created", 0},
                                     {"owned_by", "moemesh"}}})}};
    SendResponse(fd, 200, "application/json", list.dump() + "\n");
    return;
  }
  if (!completions && !chat) {
    SendError(fd, absl::NotFoundError(absl::StrCat(
                      "no route ", req.path, ": POST /v1/completions, POST /v1/chat/completions, "
                      "GET /v1/models, GET /health")));
    return;
  }
  if (req.method != "POST") {
    SendMethodNotAllowed(fd, "POST");
    return;
  }
  const openai::Endpoint endpoint =
      chat ? openai::Endpoint::kChat : openai::Endpoint::kCompletions;
  auto parsed = openai::ParseRequest(endpoint, req.body, opt.served_model);
  if (!parsed.ok()) {
    SendError(fd, parsed.status());
    return;
  }
  QueueSink sink;
  auto id = router->Submit(parsed->request, &sink);
  if (!id.ok()) {
    SendError(fd, id.status());
    return;
  }
  openai::ResponseBuilder builder(endpoint, absl::StrCat(chat ? "chatcmpl-" : "cmpl-", *id),
                                  opt.served_model, static_cast<int64_t>(std::time(nullptr)),
                                  parsed->top_logprobs);
  bool alive = true;
  if (parsed->stream) {
    alive = SendAll(fd, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
                        "Connection: close\r\n\r\n");
    if (alive && chat) alive = SendEvent(fd, builder.RoleChunk());
  }
  // Until the router's OnFinish: the sink must outlive every call the router makes to it.
  bool cancelled = false;
  auto cancel = [&] {
    if (!cancelled) router->Cancel(*id);
    cancelled = true;
  };
  for (;;) {
    bool timed_out = false;
    auto r = sink.Next(std::chrono::milliseconds(200), &timed_out);
    if (timed_out) {
      if (alive && !parsed->stream && PeerClosed(fd)) alive = false;
      if (!alive || stop) cancel();
      continue;
    }
    if (!r.has_value()) break;  // finished
    if (!parsed->stream) {
      builder.Add(*r);
      continue;
    }
    const bool empty = r->text().empty() && r->logprobs_size() == 0 &&
                       r->finish_reason() == moemesh::v1::FINISH_REASON_UNSPECIFIED;
    json chunk = builder.Chunk(*r);
    if (alive && !empty && !SendEvent(fd, chunk)) {
      alive = false;
      cancel();
    }
  }
  const absl::Status st = sink.status();
  if (!alive) return;
  if (!parsed->stream) {
    if (st.ok()) {
      SendResponse(fd, 200, "application/json", builder.Final().dump() + "\n");
    } else {
      SendError(fd, st);
    }
    return;
  }
  if (!st.ok()) {
    SendEvent(fd, openai::ErrorBody(st));
  } else if (parsed->include_usage) {
    SendEvent(fd, builder.UsageChunk());
  }
  SendChunk(fd, "data: [DONE]\n\n");
  SendAll(fd, "0\r\n\r\n");
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
      SendError(fd, absl::UnavailableError(absl::StrCat(
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
  auto req = ReadRequest(fd, opt_.max_body_bytes);
  if (req.ok()) Handle(fd, *req, router_, opt_, stop_);
  std::lock_guard<std::mutex> l(mu_);
  open_.erase(fd);
  ::close(fd);
  --active_;
  done_.notify_all();  // last: the destructor may return once active_ is 0
}

}  // namespace moemesh
