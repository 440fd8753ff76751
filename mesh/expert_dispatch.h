// Attention-to-expert data plane: dispatch (split routed rows by expert worker), transport (one
// call per worker per layer, all in flight at once) and combine (add the partial sums).
#ifndef MOEMESH_MESH_EXPERT_DISPATCH_H_
#define MOEMESH_MESH_EXPERT_DISPATCH_H_

#include <atomic>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/model.h"
#include "mesh/tensor_codec.h"

namespace moemesh {

// One expert worker as seen from the attention worker. Implementations: gRPC (GrpcExpertTransport)
// and MPI. Thread-safe.
class ExpertTransport {
 public:
  virtual ~ExpertTransport() = default;
  // Starts RunExperts; calls `done` exactly once, on any thread. `req` and `resp` stay owned by
  // the caller and must live until `done`.
  virtual void RunExpertsAsync(const wire::RunExpertsRequest* req, wire::RunExpertsResponse* resp,
                               std::function<void(absl::Status)> done) = 0;
  virtual std::string name() const = 0;  // for errors: the address or rank
};

// The expert worker's side of RunExperts: validates the request against the shard (shapes, layer,
// held experts) and computes the partial sums in the request's dtype. Thread-safe.
absl::Status RunExpertsOnShard(const ExpertShard& shard, int64_t hidden,
                               const wire::RunExpertsRequest& req, wire::RunExpertsResponse* resp);

// A worker in this process (tests, and `serve` with several shards): the same request and
// response messages as over the network, run synchronously on the caller's thread.
class LocalExpertTransport : public ExpertTransport {
 public:
  LocalExpertTransport(const ExpertShard* shard, int64_t hidden, std::string name)
      : shard_(shard), hidden_(hidden), name_(std::move(name)) {}
  void RunExpertsAsync(const wire::RunExpertsRequest* req, wire::RunExpertsResponse* resp,
                       std::function<void(absl::Status)> done) override {
    done(RunExpertsOnShard(*shard_, hidden_, *req, resp));
  }
  std::string name() const override { return name_; }

 private:
  const ExpertShard* shard_;
  const int64_t hidden_;
  const std::string name_;
};

struct ExpertWorkerHandle {
  std::unique_ptr<ExpertTransport> transport;
  std::set<ExpertId> shards;  // what it holds
};

// ExpertBackend over remote expert workers. For one layer it sends each worker holding any routed
// expert one request with just its rows, waits for all, and adds the partial sums in worker order
// (so the result does not depend on which call finished first). An expert held by several workers
// (a replica) goes to the one with the fewest rows so far in this call; if a worker fails, its
// rows are retried once on replicas when every expert it had is held elsewhere.
class ExpertDispatcher : public ExpertBackend {
 public:
  ExpertDispatcher(std::vector<ExpertWorkerHandle> workers, int64_t hidden, wire::DType wire_dtype);
  absl::Status RunExperts(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                          const float* weights, int64_t k, float* out) override;

  int num_workers() const { return static_cast<int>(workers_.size()); }
  int64_t calls() const { return calls_.load(); }
  int64_t failovers() const { return failovers_.load(); }

 private:
  // Runs one round: `assign[r * k + j]` = worker index for slot j of row r (-1 = none).
  absl::Status Round(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                     const float* weights, int64_t k, const std::vector<int>& assign, float* out,
                     std::vector<int>* failed);

  std::vector<ExpertWorkerHandle> workers_;
  const int64_t hidden_;
  const wire::DType wire_dtype_;
  std::atomic<int64_t> calls_{0}, failovers_{0};
};

}  // namespace moemesh

#endif  // MOEMESH_MESH_EXPERT_DISPATCH_H_
