#include "attention_worker/attention_service.h"

#include "mesh/grpc_clients.h"

namespace moemesh {

grpc::ServerUnaryReactor* AttentionService::Step(grpc::CallbackServerContext* ctx,
                                                 const wire::StepRequest* req,
                                                 wire::StepResponse* resp) {
  absl::Status st = worker_->Step(*req, resp);
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpc(st));
  return reactor;
}

grpc::ServerUnaryReactor* AttentionService::Release(grpc::CallbackServerContext* ctx,
                                                    const wire::ReleaseRequest* req,
                                                    wire::ReleaseResponse* resp) {
  resp->set_free_tokens(
      worker_->Release(std::vector<uint64_t>(req->seq_ids().begin(), req->seq_ids().end())));
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* AttentionService::GetStats(grpc::CallbackServerContext* ctx,
                                                     const wire::StatsRequest*,
                                                     wire::Stats* resp) {
  *resp = worker_->GetStats();
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace moemesh
