// gRPC clients of the internal services, as the attention worker and the router use them.
#ifndef MOEMESH_MESH_GRPC_CLIENTS_H_
#define MOEMESH_MESH_GRPC_CLIENTS_H_

#include <atomic>
#include <memory>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "mesh/encoder_backend.h"
#include "mesh/expert_dispatch.h"
#include "protos/worker.grpc.pb.h"

namespace moemesh {

// grpc::Status <-> absl::Status (same numeric codes).
absl::Status FromGrpc(const grpc::Status& s);
grpc::Status ToGrpc(const absl::Status& s);

// A channel for internal traffic: insecure loopback/cluster network, large messages allowed, and
// keepalive pings while calls are in flight (--peer_timeout), so that a call to a peer that
// stopped answering fails UNAVAILABLE within --peer_timeout s.
std::shared_ptr<grpc::Channel> InternalChannel(const std::string& address);

// --peer_timeout (defined with InternalChannel): InvalidArgument unless 0 or at least
// kMinPeerTimeoutSeconds (the servers accept a ping every 0.1 s; pings go every half of it).
inline constexpr double kMinPeerTimeoutSeconds = 0.5;
absl::Status CheckPeerTimeoutFlag();
// "--peer_timeout=S" with this process's value, for a child that makes internal channels.
std::string PeerTimeoutFlagForChild();

// Waits until `address` answers grpc.health.v1 with SERVING (or the deadline passes).
absl::Status WaitHealthy(const std::string& address, double timeout_seconds);

// The (layer, expert) shards an expert worker reports in ExpertStats ("L:E" strings).
absl::StatusOr<std::set<ExpertId>> ShardsFromStats(const wire::ExpertStats& stats);

class GrpcExpertTransport : public ExpertTransport {
 public:
  GrpcExpertTransport(const std::string& address, double call_timeout_seconds);
  void RunExpertsAsync(const wire::RunExpertsRequest* req, wire::RunExpertsResponse* resp,
                       std::function<void(absl::Status)> done) override;
  std::string name() const override { return address_; }
  // An Expert.GetStats call with a deadline of at most kProbeSeconds.
  void ProbeAsync(std::function<void(absl::Status)> done) override;
  absl::StatusOr<wire::ExpertStats> GetStats();

  static constexpr double kProbeSeconds = 1.0;

 private:
  const std::string address_;
  const double timeout_;
  std::unique_ptr<wire::Expert::Stub> stub_;
};

class GrpcEncoder : public EncoderBackend {
 public:
  explicit GrpcEncoder(const std::string& address);
  absl::Status Encode(const int32_t* ids, int64_t n, float* out) override;
  // After a failed Encode, until one succeeds: WaitHealthy for up to kHealthSeconds, and the
  // encoder named unless it answers SERVING.
  std::string Unavailable() override;
  static constexpr double kHealthSeconds = 1.0;

 private:
  const std::string address_;
  std::unique_ptr<wire::Encoder::Stub> stub_;
  std::atomic<bool> failing_{false};
};

}  // namespace moemesh

#endif  // MOEMESH_MESH_GRPC_CLIENTS_H_
