#include "attention_worker/attention_service.h"

#include "mesh/grpc_clients.h"

namespace moemesh {

grpc::Status AttentionService::Step(grpc::ServerContext*, const wire::StepRequest* req,
                                    wire::StepResponse* resp) {
  return ToGrpc(worker_->Step(*req, resp));
}

grpc::Status AttentionService::Release(grpc::ServerContext*, const wire::ReleaseRequest* req,
                                       wire::ReleaseResponse* resp) {
  if (!req->router().empty()) worker_->ReleaseStale(req->router(), req->router_run());
  resp->set_free_tokens(
      worker_->Release(std::vector<uint64_t>(req->seq_ids().begin(), req->seq_ids().end())));
  return grpc::Status::OK;
}

grpc::Status AttentionService::GetStats(grpc::ServerContext*, const wire::StatsRequest*,
                                        wire::Stats* resp) {
  *resp = worker_->GetStats();
  resp->set_encoder_address(encoder_address_);
  for (const std::string& a : expert_addresses_) resp->add_expert_addresses(a);
  if (dispatcher_ != nullptr) {
    resp->set_expert_failovers(dispatcher_->failovers());
    for (const std::string& w : dispatcher_->down_workers()) resp->add_expert_workers_down(w);
  }
  return grpc::Status::OK;
}

}  // namespace moemesh
