#include "expert_worker/expert_service.h"

#include <chrono>

#include "mesh/expert_dispatch.h"
#include "mesh/grpc_clients.h"
#include "mesh/placement.h"

namespace moemesh {

ExpertService::ExpertService(const ExpertShard* shard, int64_t hidden, std::string device)
    : shard_(shard), hidden_(hidden), device_(std::move(device)) {}

absl::Status ExpertService::Run(const internal::v1::RunExpertsRequest& req,
                                internal::v1::RunExpertsResponse* resp) {
  auto t0 = std::chrono::steady_clock::now();
  absl::Status st = RunExpertsOnShard(*shard_, hidden_, req, resp);
  compute_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(
                     std::chrono::steady_clock::now() - t0)
                     .count();
  ++calls_;
  if (req.x().shape_size() > 0) rows_ += req.x().shape(0);
  return st;
}

grpc::ServerUnaryReactor* ExpertService::RunExperts(grpc::CallbackServerContext* ctx,
                                                    const internal::v1::RunExpertsRequest* req,
                                                    internal::v1::RunExpertsResponse* resp) {
  absl::Status st = Run(*req, resp);
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpc(st));
  return reactor;
}

grpc::ServerUnaryReactor* ExpertService::GetStats(grpc::CallbackServerContext* ctx,
                                                  const internal::v1::StatsRequest*,
                                                  internal::v1::ExpertStats* resp) {
  resp->set_calls(calls_.load());
  resp->set_rows(rows_.load());
  resp->set_compute_seconds(compute_ns_.load() * 1e-9);
  for (const auto& [l, e] : shard_->shards()) {
    resp->add_shards(std::to_string(l) + ":" + std::to_string(e));
  }
  resp->set_device(device_);
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace moemesh
