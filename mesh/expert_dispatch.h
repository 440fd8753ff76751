// Attention-to-expert data plane: dispatch (split routed rows by expert worker), transport (one
// call per worker per layer, all in flight at once) and combine (add the partial sums).
#ifndef MOEMESH_MESH_EXPERT_DISPATCH_H_
#define MOEMESH_MESH_EXPERT_DISPATCH_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
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
  // Asks whether the worker answers, cheaply and with a short deadline (no rows); calls `done`
  // exactly once, on any thread. The default has no such call and reports OK: the dispatcher
  // then learns from the worker's next rows.
  virtual void ProbeAsync(std::function<void(absl::Status)> done) { done(absl::OkStatus()); }
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
//
// A worker whose call failed is down: later calls pass it over for any live holder of the same
// expert, and probe it on the side (ExpertTransport::ProbeAsync, started by a call once
// `kFirstRetrySeconds` have passed, then at intervals doubling up to `kMaxRetrySeconds` while it
// keeps failing); a probe or a call it answers brings it back. So neither a dead worker nor a
// hung one (whose calls would wait for their deadline) slows the steps down after its first
// failure, and a restarted one is used again within seconds. Where it holds the only copy of an
// expert its rows still go to it, and its error is the call's. Transitions are logged to stderr.
class ExpertDispatcher : public ExpertBackend {
 public:
  static constexpr double kFirstRetrySeconds = 0.25;
  static constexpr double kMaxRetrySeconds = 2.0;

  using Clock = std::function<std::chrono::steady_clock::time_point()>;

  // `now`: the clock of the probe intervals (tests give their own; null = steady_clock).
  ExpertDispatcher(std::vector<ExpertWorkerHandle> workers, int64_t hidden, wire::DType wire_dtype,
                   Clock now = nullptr);
  ~ExpertDispatcher() override;  // waits for the probes in flight
  absl::Status RunExperts(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                          const float* weights, int64_t k, float* out) override;

  int num_workers() const { return static_cast<int>(workers_.size()); }
  int64_t calls() const { return calls_.load(); }
  // Calls to workers that failed and whose rows went to replicas, in total.
  int64_t failovers() const { return failovers_.load(); }
  // The workers (by transport name) down now, in worker order.
  std::vector<std::string> down_workers() const;
  // "" while every expert has a holder that is up; otherwise names the down workers that hold
  // an expert no worker up holds. First starts the probes that are due and waits for them (up
  // to kProbeWaitSeconds), so asking while no calls are made (the router waits for this to be
  // empty) brings workers back, and the answer is that of the probe.
  std::string Unavailable() override;
  static constexpr double kProbeWaitSeconds = 1.5;

 private:
  // Runs one round: `assign[r * k + j]` = worker index for slot j of row r (-1 = none).
  absl::Status Round(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                     const float* weights, int64_t k, const std::vector<int>& assign, float* out,
                     std::vector<int>* failed);

  // Starts the probes that are due, waits up to `wait_seconds` for them to answer, and returns
  // which workers are up.
  std::vector<char> Up(double wait_seconds = 0);
  // Records the outcome of a call or probe to worker w.
  void Answered(int w, const absl::Status& st);

  struct Health {
    bool down = false;
    bool probing = false;  // a probe is in flight
    double retry_seconds = 0;
    std::chrono::steady_clock::time_point retry_at;  // of the next probe, while down
  };

  std::vector<ExpertWorkerHandle> workers_;
  const int64_t hidden_;
  const wire::DType wire_dtype_;
  const Clock now_;
  std::atomic<int64_t> calls_{0}, failovers_{0};
  mutable std::mutex health_mu_;
  std::condition_variable probes_done_;
  std::vector<Health> health_;  // per worker, under health_mu_
  int probes_in_flight_ = 0;    // under health_mu_
};

}  // namespace moemesh

#endif  // MOEMESH_MESH_EXPERT_DISPATCH_H_
