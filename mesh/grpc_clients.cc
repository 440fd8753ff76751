#include "mesh/grpc_clients.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "grpcpp/health_check_service_interface.h"
#include "protos/grpc/health/v1/health.grpc.pb.h"

ABSL_FLAG(double, peer_timeout, 4,
          "Seconds a worker may leave a call in flight without a sign of life before the call "
          "fails: while calls are in flight, each internal channel sends an HTTP/2 keepalive ping "
          "every peer_timeout/2 s and closes when one goes peer_timeout/2 s unanswered. It catches "
          "a stopped process or a lost machine or network long before the call's own deadline "
          "(--step_timeout, --expert_timeout); a busy worker still answers pings. 0 = off; "
          "otherwise at least 0.5.");

namespace moemesh {
namespace {

std::chrono::system_clock::time_point After(double seconds) {
  return std::chrono::system_clock::now() +
         std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6));
}

}  // namespace

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  const auto code = static_cast<absl::StatusCode>(s.error_code());
  if (s.error_message() == "keepalive watchdog timeout") {  // InternalChannel's pings
    const double peer = absl::GetFlag(FLAGS_peer_timeout);
    return absl::Status(code, absl::StrCat("no answer to a keepalive ping within ", peer / 2,
                                           " s (--peer_timeout=", peer,
                                           "): the process is stopped or hung, or its machine "
                                           "or network is down"));
  }
  return absl::Status(code, s.error_message());
}

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status CheckPeerTimeoutFlag() {
  const double s = absl::GetFlag(FLAGS_peer_timeout);
  if (s == 0 || s >= kMinPeerTimeoutSeconds) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("--peer_timeout must be 0 (off) or at least ",
                                                 kMinPeerTimeoutSeconds, " s, not ", s));
}

std::string PeerTimeoutFlagForChild() {
  return absl::StrCat("--peer_timeout=", absl::GetFlag(FLAGS_peer_timeout));
}

std::shared_ptr<grpc::Channel> InternalChannel(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  // A channel of its own per peer (not shared through the global subchannel pool).
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  const double peer = absl::GetFlag(FLAGS_peer_timeout);
  if (peer >= kMinPeerTimeoutSeconds) {
    // Pings only while calls are in flight, as many as a long call needs (gRPC's default stops
    // after 2 without data); the servers accept them this often (StartServer).
    const int half_ms = static_cast<int>(peer * 500);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, half_ms);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, half_ms);
    args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 0);
    args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  }
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

absl::Status WaitHealthy(const std::string& address, double timeout_seconds) {
  auto channel = InternalChannel(address);
  auto stub = grpc::health::v1::Health::NewStub(channel);
  const auto deadline = After(timeout_seconds);
  grpc::Status last;
  while (std::chrono::system_clock::now() < deadline) {
    grpc::ClientContext ctx;
    ctx.set_deadline(After(1.0));
    grpc::health::v1::HealthCheckRequest req;
    grpc::health::v1::HealthCheckResponse resp;
    last = stub->Check(&ctx, req, &resp);
    if (last.ok() && resp.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
      return absl::OkStatus();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return absl::DeadlineExceededError(absl::StrCat(address, " did not become healthy within ",
                                                  timeout_seconds, " s: ", last.error_message()));
}

absl::StatusOr<std::set<ExpertId>> ShardsFromStats(const wire::ExpertStats& stats) {
  std::set<ExpertId> out;
  for (const std::string& e : stats.shards()) {
    std::vector<std::string> p = absl::StrSplit(e, ':');
    int32_t l, x;
    if (p.size() != 2 || !absl::SimpleAtoi(p[0], &l) || !absl::SimpleAtoi(p[1], &x)) {
      return absl::InvalidArgumentError(absl::StrCat("bad shard '", e, "' in expert stats"));
    }
    out.emplace(l, x);
  }
  return out;
}

GrpcExpertTransport::GrpcExpertTransport(const std::string& address, double call_timeout_seconds)
    : address_(address),
      timeout_(call_timeout_seconds),
      stub_(wire::Expert::NewStub(InternalChannel(address))) {}

void GrpcExpertTransport::RunExpertsAsync(const wire::RunExpertsRequest* req,
                                          wire::RunExpertsResponse* resp,
                                          std::function<void(absl::Status)> done) {
  auto* ctx = new grpc::ClientContext;
  ctx->set_deadline(After(timeout_));
  stub_->async()->RunExperts(ctx, req, resp, [ctx, done = std::move(done)](grpc::Status s) {
    delete ctx;
    done(FromGrpc(s));
  });
}

void GrpcExpertTransport::ProbeAsync(std::function<void(absl::Status)> done) {
  struct Probe {
    grpc::ClientContext ctx;
    wire::StatsRequest req;
    wire::ExpertStats resp;
  };
  auto* p = new Probe;
  p->ctx.set_deadline(After(std::min(timeout_, kProbeSeconds)));
  stub_->async()->GetStats(&p->ctx, &p->req, &p->resp, [p, done = std::move(done)](grpc::Status s) {
    delete p;
    done(FromGrpc(s));
  });
}

absl::StatusOr<wire::ExpertStats> GrpcExpertTransport::GetStats() {
  grpc::ClientContext ctx;
  ctx.set_deadline(After(timeout_));
  wire::StatsRequest req;
  wire::ExpertStats resp;
  grpc::Status s = stub_->GetStats(&ctx, req, &resp);
  if (!s.ok()) return FromGrpc(s);
  return resp;
}

GrpcEncoder::GrpcEncoder(const std::string& address)
    : address_(address), stub_(wire::Encoder::NewStub(InternalChannel(address))) {}

absl::Status GrpcEncoder::Encode(const int32_t* ids, int64_t n, float* out) {
  grpc::ClientContext ctx;
  ctx.set_deadline(After(30.0));
  wire::EncodeRequest req;
  req.mutable_ids()->Add(ids, ids + n);
  wire::EncodeResponse resp;
  const absl::Status called = FromGrpc(stub_->Encode(&ctx, req, &resp));
  failing_ = !called.ok();
  if (!called.ok()) {
    return absl::Status(called.code(), absl::StrCat("encoder ", address_, ": ", called.message()));
  }
  int64_t rows = n, cols = -1;
  std::vector<float> h;
  absl::Status st = DecodeFloats(resp.hidden(), "hidden", &rows, &cols, &h);
  if (!st.ok()) return st;
  std::copy(h.begin(), h.end(), out);
  return absl::OkStatus();
}

std::string GrpcEncoder::Unavailable() {
  if (!failing_) return "";
  const absl::Status st = WaitHealthy(address_, kHealthSeconds);
  if (st.ok()) {
    failing_ = false;
    return "";
  }
  return absl::StrCat("encoder: ", st.message());
}

}  // namespace moemesh
