// gRPC adapter of an expert worker: validates, converts status, delegates to ExpertShard.
#ifndef MOEMESH_EXPERT_WORKER_EXPERT_SERVICE_H_
#define MOEMESH_EXPERT_WORKER_EXPERT_SERVICE_H_

#include <atomic>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "engine/model.h"
#include "protos/worker.grpc.pb.h"

namespace moemesh {

class ExpertService final : public internal::v1::Expert::CallbackService {
 public:
  // `shard` must outlive the service.
  ExpertService(const ExpertShard* shard, int64_t hidden, std::string device);

  // RunExperts on the shard, counted in GetStats; what the gRPC handler and other transports
  // (the MPI serving loop of moemesh_node) call. Thread-safe.
  absl::Status Run(const internal::v1::RunExpertsRequest& req,
                   internal::v1::RunExpertsResponse* resp);

  grpc::ServerUnaryReactor* RunExperts(grpc::CallbackServerContext* ctx,
                                       const internal::v1::RunExpertsRequest* req,
                                       internal::v1::RunExpertsResponse* resp) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* ctx,
                                     const internal::v1::StatsRequest* req,
                                     internal::v1::ExpertStats* resp) override;

 private:
  const ExpertShard* shard_;
  const int64_t hidden_;
  const std::string device_;
  std::atomic<int64_t> calls_{0}, rows_{0}, compute_ns_{0};
};

}  // namespace moemesh

#endif  // MOEMESH_EXPERT_WORKER_EXPERT_SERVICE_H_
