#include "router/attention_client.h"

#include <algorithm>
#include <chrono>
#include <functional>
#include <future>
#include <memory>

#include "absl/strings/str_cat.h"
#include "mesh/grpc_clients.h"

namespace moemesh {
namespace {

void SetDeadline(grpc::ClientContext* ctx, double seconds) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6)));
}

absl::Status Annotate(const std::string& address, const grpc::Status& s) {
  const absl::Status st = FromGrpc(s);
  if (st.ok()) return st;
  return absl::Status(st.code(), absl::StrCat("attention worker ", address, ": ", st.message()));
}

}  // namespace

absl::StatusOr<std::vector<std::unique_ptr<GrpcAttentionClient>>> ConnectAttentionWorkers(
    const std::vector<std::string>& addresses, double step_timeout_seconds, double wait_seconds,
    std::vector<AttentionClient*>* lanes) {
  if (addresses.empty()) return absl::InvalidArgumentError("no attention worker given");
  std::vector<std::unique_ptr<GrpcAttentionClient>> clients;
  lanes->clear();
  for (const std::string& a : addresses) {
    absl::Status st = WaitHealthy(a, wait_seconds);
    if (!st.ok()) return st;
    clients.push_back(std::make_unique<GrpcAttentionClient>(a, step_timeout_seconds));
    lanes->push_back(clients.back().get());
  }
  return clients;
}

GrpcAttentionClient::GrpcAttentionClient(const std::string& address, double step_timeout_seconds)
    : address_(address),
      timeout_(step_timeout_seconds),
      stub_(wire::Attention::NewStub(InternalChannel(address))) {}

absl::Status GrpcAttentionClient::Step(const wire::StepRequest& req, wire::StepResponse* resp) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout_);
  return Annotate(address_, stub_->Step(&ctx, req, resp));
}

absl::Status GrpcAttentionClient::Release(const std::vector<uint64_t>& seq_ids) {
  wire::ReleaseRequest req;
  for (uint64_t id : seq_ids) req.add_seq_ids(id);
  return CallRelease(req, timeout_);
}

absl::Status GrpcAttentionClient::ReleaseStale(const std::string& router, uint64_t keep_run) {
  wire::ReleaseRequest req;
  req.set_router(router);
  req.set_router_run(keep_run);
  return CallRelease(req, kStatsSeconds);
}

absl::Status GrpcAttentionClient::CallRelease(const wire::ReleaseRequest& req, double seconds) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, seconds);
  wire::ReleaseResponse resp;
  return Annotate(address_, stub_->Release(&ctx, req, &resp));
}

absl::StatusOr<wire::Stats> GrpcAttentionClient::GetStats() {
  std::promise<absl::StatusOr<wire::Stats>> answer;
  GetStatsAsync([&answer](absl::StatusOr<wire::Stats> s) { answer.set_value(std::move(s)); });
  return answer.get_future().get();
}

void GrpcAttentionClient::GetStatsAsync(std::function<void(absl::StatusOr<wire::Stats>)> done) {
  struct Call {
    grpc::ClientContext ctx;
    wire::StatsRequest req;
    wire::Stats resp;
    std::string address;
    std::function<void(absl::StatusOr<wire::Stats>)> done;
  };
  auto* c = new Call;
  SetDeadline(&c->ctx, std::min(timeout_, kStatsSeconds));
  c->address = address_;  // (the callback may run after this client is gone)
  c->done = std::move(done);
  stub_->async()->GetStats(&c->ctx, &c->req, &c->resp, [c](grpc::Status s) {
    std::unique_ptr<Call> call(c);
    const absl::Status st = Annotate(call->address, s);
    if (st.ok()) {
      call->done(std::move(call->resp));
    } else {
      call->done(st);
    }
  });
}

moemesh::v1::ModelInfo BasicModelInfo(const ModelConfig& cfg) {
  moemesh::v1::ModelInfo info;
  info.set_family(cfg.model_type);
  info.set_num_layers(static_cast<int32_t>(cfg.num_hidden_layers));
  info.set_hidden_size(static_cast<int32_t>(cfg.hidden_size));
  info.set_vocab_size(static_cast<int32_t>(cfg.vocab_size));
  info.set_num_experts(static_cast<int32_t>(cfg.num_experts));
  info.set_experts_per_token(static_cast<int32_t>(cfg.num_experts_per_tok));
  info.set_max_context(static_cast<int32_t>(cfg.max_position_embeddings));
  info.set_version(kVersion);
  return info;
}

void AddWorker(moemesh::v1::ModelInfo* info, const std::string& role, const std::string& address,
               const std::string& device, const std::string& shards) {
  auto* w = info->add_workers();
  w->set_role(role);
  w->set_address(address);
  w->set_device(device);
  if (!shards.empty()) w->add_shards(shards);
}

}  // namespace moemesh
