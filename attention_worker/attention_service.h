// gRPC adapter of the attention worker.
#ifndef MOEMESH_ATTENTION_WORKER_ATTENTION_SERVICE_H_
#define MOEMESH_ATTENTION_WORKER_ATTENTION_SERVICE_H_

#include "attention_worker/attention_worker.h"
#include "protos/worker.grpc.pb.h"

namespace moemesh {

class AttentionService final : public internal::v1::Attention::CallbackService {
 public:
  explicit AttentionService(AttentionWorker* worker) : worker_(worker) {}
  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* ctx, const wire::StepRequest* req,
                                 wire::StepResponse* resp) override;
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx,
                                    const wire::ReleaseRequest* req,
                                    wire::ReleaseResponse* resp) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* ctx,
                                     const wire::StatsRequest* req, wire::Stats* resp) override;

 private:
  AttentionWorker* worker_;
};

}  // namespace moemesh

#endif  // MOEMESH_ATTENTION_WORKER_ATTENTION_SERVICE_H_
