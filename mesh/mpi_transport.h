// The attention-to-expert data plane over MPI, for clusters launched with mpirun (moemesh_node):
// RunExperts requests and responses travel as MPI point-to-point messages (shared memory on one
// host, the fabric between hosts) in the lean layout of mesh/mpi_codec.h; gRPC keeps the public
// API, health and control (GetStats).
//
// Progress model: after start-up, exactly one thread per process makes MPI calls -- on the
// attention rank the progress thread of MpiExpertClient, on an expert rank the thread running
// ServeExpertsOverMpi. MPI must be initialised with at least MPI_THREAD_SERIALIZED
// (CheckMpiThreadLevel), and the main thread may call MPI again (MPI_Finalize) only once those
// threads have stopped. Waiting threads poll with MPI_Test/MPI_Iprobe and nap between polls
// (MpiPollOptions) instead of spinning in a blocking MPI call, so idle ranks leave the CPU to
// the ranks that compute (mpirun oversubscribes a small machine).
//
// Failures: errors of the expert side (bad layer, shard not held, bad shapes) come back as the
// same absl::Status code and message as over gRPC. A rank that stops serving (SIGINT/SIGTERM)
// says so, and calls to it then fail with UNAVAILABLE (so the dispatcher fails over to
// replicas). A rank that dies without a word is MPI's business: mpirun aborts the whole job
// (MPI_ERRORS_ARE_FATAL); there are no per-call timeouts.
#ifndef MOEMESH_MESH_MPI_TRANSPORT_H_
#define MOEMESH_MESH_MPI_TRANSPORT_H_

#include <mpi.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "mesh/expert_dispatch.h"

namespace moemesh {

// OK when MPI is initialised with a thread level this module can use (>= SERIALIZED);
// FailedPrecondition naming the level provided otherwise.
absl::Status CheckMpiThreadLevel(int provided);

// How a waiting thread polls: it polls continuously for `spin_us` after the last message, then
// naps, each nap twice the last from `min_nap_us` up to `max_nap_us` (`idle_nap_us` once idle
// for `idle_after_ms`: between bursts of requests).
struct MpiPollOptions {
  int spin_us = 0;
  int min_nap_us = 5;
  int max_nap_us = 40;
  int idle_after_ms = 50;
  int idle_nap_us = 500;
};

// The attention rank's side: one progress thread serving every transport made by TransportTo.
// Thread-safe.
class MpiExpertClient {
 public:
  struct Stats {
    int64_t calls = 0;
    int64_t bytes_sent = 0;
    int64_t bytes_received = 0;
  };

  explicit MpiExpertClient(MPI_Comm comm, MpiPollOptions poll = {});
  ~MpiExpertClient();  // Stop()
  MpiExpertClient(const MpiExpertClient&) = delete;
  MpiExpertClient& operator=(const MpiExpertClient&) = delete;

  // A transport to the expert worker at `rank` (an MpiExpertTransport); it must not outlive
  // this client. Calls made before Start() wait for it.
  std::unique_ptr<ExpertTransport> TransportTo(int rank, std::string name);

  // Starts the progress thread: from then on this process's other threads must not call MPI
  // until Stop() returns.
  void Start();
  // Fails the calls not yet answered with UNAVAILABLE, tells every expert rank it reached to
  // stop serving, joins the progress thread. Later calls fail with UNAVAILABLE. Idempotent.
  void Stop();

  Stats stats() const;

 private:
  friend class MpiExpertTransport;
  struct Call;
  void Submit(int rank, const std::string& name, const wire::RunExpertsRequest* req,
              wire::RunExpertsResponse* resp, std::function<void(absl::Status)> done);
  void Loop();

  const MPI_Comm comm_;
  const MpiPollOptions poll_;
  std::thread thread_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Call>> queue_;  // submitted, not yet sent; GUARDED_BY(mu_)
  std::vector<int> ranks_;                   // every rank a transport was made for; GUARDED_BY(mu_)
  bool started_ = false, stopping_ = false;  // GUARDED_BY(mu_)
  std::atomic<int64_t> calls_{0}, bytes_sent_{0}, bytes_received_{0};
};

// One expert rank as seen from the attention rank: RunExpertsAsync hands the call to the
// client's progress thread, which calls `done` when the response (or the rank's goodbye) arrives.
class MpiExpertTransport : public ExpertTransport {
 public:
  MpiExpertTransport(MpiExpertClient* client, int rank, std::string name)
      : client_(client), rank_(rank), name_(std::move(name)) {}
  void RunExpertsAsync(const wire::RunExpertsRequest* req, wire::RunExpertsResponse* resp,
                       std::function<void(absl::Status)> done) override {
    client_->Submit(rank_, name_, req, resp, std::move(done));
  }
  std::string name() const override { return name_; }

 private:
  MpiExpertClient* const client_;
  const int rank_;
  const std::string name_;
};

// The expert rank's side of RunExperts (ExpertService::Run in moemesh_node).
using RunExpertsHandler =
    std::function<absl::Status(const wire::RunExpertsRequest&, wire::RunExpertsResponse*)>;

// Serves RunExperts requests from the `client_ranks` (the attention ranks) on the calling thread
// (which is then this process's only MPI caller), each answered to its sender, until every
// client has sent a stop message or `stop` becomes true; in the latter case it tells the clients
// still served that it stopped. A malformed message is answered with a DataLoss error, and
// serving goes on.
struct MpiServeStats {
  int64_t calls = 0;
  int64_t bytes_received = 0;
  int64_t bytes_sent = 0;
};
MpiServeStats ServeExpertsOverMpi(MPI_Comm comm, std::vector<int> client_ranks,
                                  const RunExpertsHandler& handler,
                                  const std::atomic<bool>& stop, MpiPollOptions poll = {});

}  // namespace moemesh

#endif  // MOEMESH_MESH_MPI_TRANSPORT_H_
