// The router's gRPC client of an attention worker, and the ModelInfo it reports.
#ifndef MOEMESH_ROUTER_ATTENTION_CLIENT_H_
#define MOEMESH_ROUTER_ATTENTION_CLIENT_H_

#include <memory>
#include <string>
#include <vector>

#include "engine/config.h"
#include "protos/generation.pb.h"
#include "protos/worker.grpc.pb.h"
#include "router/router.h"

namespace moemesh {

inline constexpr char kVersion[] = "moemesh 0.1.0";

class GrpcAttentionClient : public AttentionClient {
 public:
  GrpcAttentionClient(const std::string& address, double step_timeout_seconds);
  absl::Status Step(const wire::StepRequest& req, wire::StepResponse* resp) override;
  absl::Status Release(const std::vector<uint64_t>& seq_ids) override;
  // With a deadline of kStatsSeconds (the router asks it while it starts).
  absl::Status ReleaseStale(const std::string& router, uint64_t keep_run) override;
  // With a deadline of at most kStatsSeconds: the router asks a failed worker this way (and
  // /health, /metrics), and a hung one must not hold them for a step's timeout.
  absl::StatusOr<wire::Stats> GetStats() override;
  void GetStatsAsync(std::function<void(absl::StatusOr<wire::Stats>)> done) override;
  static constexpr double kStatsSeconds = 5;

 private:
  absl::Status CallRelease(const wire::ReleaseRequest& req, double seconds);

  const std::string address_;
  const double timeout_;
  std::unique_ptr<wire::Attention::Stub> stub_;
};

// Clients of the attention workers at `addresses` (each healthy within `wait_seconds` first, else
// its error), in order; `lanes` gets them as Router::Create takes them.
absl::StatusOr<std::vector<std::unique_ptr<GrpcAttentionClient>>> ConnectAttentionWorkers(
    const std::vector<std::string>& addresses, double step_timeout_seconds, double wait_seconds,
    std::vector<AttentionClient*>* lanes);

// Family, sizes and version; the caller appends the workers.
moemesh::v1::ModelInfo BasicModelInfo(const ModelConfig& cfg);
void AddWorker(moemesh::v1::ModelInfo* info, const std::string& role, const std::string& address,
               const std::string& device, const std::string& shards = "");

}  // namespace moemesh

#endif  // MOEMESH_ROUTER_ATTENTION_CLIENT_H_
