// gRPC adapter of the attention worker.
#ifndef MOEMESH_ATTENTION_WORKER_ATTENTION_SERVICE_H_
#define MOEMESH_ATTENTION_WORKER_ATTENTION_SERVICE_H_

#include <string>
#include <utility>
#include <vector>

#include "attention_worker/attention_worker.h"
#include "mesh/expert_dispatch.h"
#include "protos/worker.grpc.pb.h"

namespace moemesh {

// A synchronous service on purpose: Step blocks until the expert workers answer, and their
// answers arrive as gRPC callbacks on the callback threads (two on a 2-core machine). Handlers
// that block on those threads (a Step waiting for experts, a GetStats or second Step waiting for
// the worker's lock) could take every callback thread and deadlock the worker; sync handlers run
// on their own thread pool.
class AttentionService final : public internal::v1::Attention::Service {
 public:
  // encoder_address, expert_addresses: the workers `worker` reaches ("" / none: in process),
  // reported by GetStats, as are `dispatcher`'s failovers and down workers (null: experts in
  // process).
  explicit AttentionService(AttentionWorker* worker, std::string encoder_address = "",
                            std::vector<std::string> expert_addresses = {},
                            const ExpertDispatcher* dispatcher = nullptr)
      : worker_(worker),
        encoder_address_(std::move(encoder_address)),
        expert_addresses_(std::move(expert_addresses)),
        dispatcher_(dispatcher) {}
  grpc::Status Step(grpc::ServerContext* ctx, const wire::StepRequest* req,
                    wire::StepResponse* resp) override;
  grpc::Status Release(grpc::ServerContext* ctx, const wire::ReleaseRequest* req,
                       wire::ReleaseResponse* resp) override;
  grpc::Status GetStats(grpc::ServerContext* ctx, const wire::StatsRequest* req,
                        wire::Stats* resp) override;

 private:
  AttentionWorker* worker_;
  const std::string encoder_address_;
  const std::vector<std::string> expert_addresses_;
  const ExpertDispatcher* const dispatcher_;
};

}  // namespace moemesh

#endif  // MOEMESH_ATTENTION_WORKER_ATTENTION_SERVICE_H_
