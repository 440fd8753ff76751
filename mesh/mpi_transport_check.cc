// The MPI expert transport between real processes, run by tests/mpi_test.sh:
//   mpirun -np 3 mpi_transport_check
// Rank 0 plays the attention worker (MpiExpertClient), ranks 1 and 2 expert workers holding half
// of the experts each (ServeExpertsOverMpi over a real checkpoint). Rank 0 checks, against the
// same shards called in-process (LocalExpertTransport):
//   - ExpertDispatcher over MPI gives bit-identical sums (f32 and bf16 wire, 1..80 rows, so
//     messages below and above the eager limit),
//   - many calls in flight at once to each rank all come back right,
//   - expert-side errors (bad layer, expert not held, bad shapes) come back with the same code
//     and message,
//   - a rank that stops serving answers later calls with UNAVAILABLE, and the dispatcher fails
//     over to a replica.
// Exit status 0 and "mpi transport check: N checks passed" when all pass.
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <iostream>
#include <mutex>
#include <random>
#include <thread>

#include "engine/arch.h"
#include "engine/config.h"
#include "engine/model.h"
#include "mesh/expert_dispatch.h"
#include "mesh/mpi_transport.h"
#include "mesh/placement.h"

namespace moemesh {
namespace {

constexpr char kDir[] = "testdata/oracle/qwen3_moe";

int failures = 0, checks = 0;
#define CHECK_THAT(cond, what)                                                  \
  do {                                                                          \
    ++checks;                                                                   \
    if (!(cond)) {                                                              \
      ++failures;                                                               \
      std::cerr << "FAILED: " << what << " (" #cond ")" << std::endl;          \
    }                                                                           \
  } while (0)

struct TestModel {
  ModelConfig cfg;
  ArchSpec arch;
  std::unique_ptr<CheckpointReader> ckpt;
  std::unique_ptr<ExpertShard> halves[2];
};

absl::Status LoadModel(TestModel* m) {
  auto cfg = ModelConfig::FromFile(std::string(kDir) + "/config.json");
  if (!cfg.ok()) return cfg.status();
  m->cfg = *cfg;
  auto arch = ArchFor(m->cfg);
  if (!arch.ok()) return arch.status();
  m->arch = *arch;
  auto ckpt = CheckpointReader::Open(kDir);
  if (!ckpt.ok()) return ckpt.status();
  m->ckpt = std::move(*ckpt);
  for (int w = 0; w < 2; ++w) {
    auto s = ExpertShard::Load(*m->ckpt, m->cfg, m->arch, EvenShare(m->cfg, w, 2), LoadOptions{});
    if (!s.ok()) return s.status();
    m->halves[w] = std::move(*s);
  }
  return absl::OkStatus();
}

// Routed rows: x [n, hidden], k distinct experts per row (one empty slot in row 0).
struct Rows {
  int64_t n, k;
  std::vector<float> x, w;
  std::vector<int32_t> ids;
};
Rows MakeRows(const ModelConfig& cfg, int64_t n, int64_t k, std::mt19937* rng) {
  Rows r{n, k, {}, {}, {}};
  std::normal_distribution<float> g;
  r.x.resize(n * cfg.hidden_size);
  for (float& v : r.x) v = g(*rng);
  for (int64_t i = 0; i < n; ++i) {
    std::vector<int32_t> perm(cfg.num_experts);
    for (int e = 0; e < cfg.num_experts; ++e) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), *rng);
    for (int j = 0; j < k; ++j) {
      r.ids.push_back(perm[j]);
      r.w.push_back(0.1f + 0.2f * j);
    }
  }
  r.ids[0] = -1;
  return r;
}

wire::RunExpertsRequest MakeRequest(const Rows& r, int32_t layer, int64_t hidden, wire::DType dt) {
  wire::RunExpertsRequest req;
  req.set_layer(layer);
  EncodeFloats(r.x.data(), r.n, hidden, dt, req.mutable_x());
  EncodeInts(r.ids.data(), r.n, r.k, req.mutable_ids());
  EncodeFloats(r.w.data(), r.n, r.k, wire::DTYPE_F32, req.mutable_weights());
  return req;
}

// Runs one call on `t` and waits for it.
absl::Status CallSync(ExpertTransport* t, const wire::RunExpertsRequest& req,
                      wire::RunExpertsResponse* resp) {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  absl::Status result;
  t->RunExpertsAsync(&req, resp, [&](absl::Status s) {
    std::lock_guard<std::mutex> l(mu);
    result = std::move(s);
    done = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> l(mu);
  cv.wait(l, [&] { return done; });
  return result;
}

int Client(TestModel& m) {
  const int64_t h = m.cfg.hidden_size;
  const int64_t k = m.cfg.num_experts_per_tok;
  MpiExpertClient client(MPI_COMM_WORLD);
  std::unique_ptr<ExpertTransport> mpi[2] = {client.TransportTo(1, "rank 1"),
                                             client.TransportTo(2, "rank 2")};
  LocalExpertTransport local[2] = {{m.halves[0].get(), h, "rank 1"},
                                   {m.halves[1].get(), h, "rank 2"}};
  client.Start();
  std::mt19937 rng(11);

  // 1. The dispatcher over MPI equals the dispatcher over in-process transports, bit for bit.
  for (wire::DType dt : {wire::DTYPE_F32, wire::DTYPE_BF16}) {
    std::vector<ExpertWorkerHandle> over_mpi, in_process;
    for (int w = 0; w < 2; ++w) {
      over_mpi.push_back({client.TransportTo(w + 1, w ? "rank 2" : "rank 1"), m.halves[w]->shards()});
      in_process.push_back({std::make_unique<LocalExpertTransport>(m.halves[w].get(), h, "local"),
                            m.halves[w]->shards()});
    }
    ExpertDispatcher dm(std::move(over_mpi), h, dt), dl(std::move(in_process), h, dt);
    for (int64_t n : {1, 2, 7, 33, 80}) {
      for (int32_t layer = 0; layer < m.cfg.num_hidden_layers; ++layer) {
        Rows r = MakeRows(m.cfg, n, k, &rng);
        std::vector<float> a(n * h, 0.0f), b(n * h, 0.0f);
        absl::Status sa = dm.RunExperts(layer, r.x.data(), n, r.ids.data(), r.w.data(), k, a.data());
        absl::Status sb = dl.RunExperts(layer, r.x.data(), n, r.ids.data(), r.w.data(), k, b.data());
        CHECK_THAT(sa.ok() && sb.ok(), "dispatcher n=" << n << " layer=" << layer << ": " << sa);
        CHECK_THAT(a == b, "MPI sums differ from in-process ones, n=" << n << " dtype=" << dt);
      }
    }
    CHECK_THAT(dm.calls() == dl.calls() && dm.calls() >= 5 * m.cfg.num_hidden_layers,
               "dispatcher calls " << dm.calls() << " over MPI, " << dl.calls() << " in-process");
  }

  // 2. Many calls in flight at once, to both ranks, answered in any order.
  {
    constexpr int kInFlight = 16;
    std::vector<wire::RunExpertsRequest> reqs(kInFlight);
    std::vector<wire::RunExpertsResponse> got(kInFlight), want(kInFlight);
    std::vector<absl::Status> st(kInFlight);
    std::atomic<int> pending{kInFlight};
    for (int i = 0; i < kInFlight; ++i) {
      const int w = i % 2;
      Rows r = MakeRows(m.cfg, 1 + 5 * i, k, &rng);
      for (int32_t& id : r.ids) {  // only experts of worker w
        if (id >= 0 && m.halves[w]->shards().count(ExpertId(i % m.cfg.num_hidden_layers, id)) == 0) id = -1;
      }
      reqs[i] = MakeRequest(r, i % m.cfg.num_hidden_layers, h, i % 3 ? wire::DTYPE_F32 : wire::DTYPE_BF16);
      CHECK_THAT(RunExpertsOnShard(*m.halves[w], h, reqs[i], &want[i]).ok(), "local call " << i);
    }
    for (int i = 0; i < kInFlight; ++i) {
      mpi[i % 2]->RunExpertsAsync(&reqs[i], &got[i], [&, i](absl::Status s) {
        st[i] = std::move(s);
        --pending;
      });
    }
    while (pending.load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    for (int i = 0; i < kInFlight; ++i) {
      CHECK_THAT(st[i].ok(), "in-flight call " << i << ": " << st[i]);
      CHECK_THAT(got[i].SerializeAsString() == want[i].SerializeAsString(),
                 "in-flight call " << i << " answer differs");
    }
  }

  // 3. Expert-side errors: the same code and message as the in-process (and gRPC) path.
  {
    Rows r = MakeRows(m.cfg, 3, k, &rng);
    std::vector<wire::RunExpertsRequest> bad;
    bad.push_back(MakeRequest(r, 99, h, wire::DTYPE_F32));            // no such layer
    bad.push_back(MakeRequest(r, 1, h, wire::DTYPE_F32));             // experts of both halves
    bad.push_back(MakeRequest(r, 1, h, wire::DTYPE_BF16));
    bad.back().mutable_x()->mutable_data()->resize(10);              // bytes do not fit the shape
    bad.push_back(MakeRequest(r, 1, h, wire::DTYPE_F32));
    bad.back().clear_weights();                                       // missing tensor
    bad.push_back(MakeRequest(r, 1, h + 1, wire::DTYPE_F32));         // wrong hidden size
    for (size_t i = 0; i < bad.size(); ++i) {
      wire::RunExpertsResponse a, b;
      absl::Status sa = CallSync(mpi[0].get(), bad[i], &a);
      absl::Status sb = CallSync(&local[0], bad[i], &b);
      CHECK_THAT(!sb.ok(), "bad request " << i << " accepted in-process");
      CHECK_THAT(sa == sb, "bad request " << i << ": MPI says " << sa << ", in-process " << sb);
    }
    std::cout << "example error over MPI: "
              << [&] { wire::RunExpertsResponse a; return CallSync(mpi[0].get(), bad[0], &a); }()
              << std::endl;
  }

  // 4. Rank 2 stops serving after its next call (it counts them; see Expert()); later calls to
  //    it fail with UNAVAILABLE, and a dispatcher with a replica fails over.
  {
    Rows r = MakeRows(m.cfg, 4, k, &rng);
    for (int32_t& id : r.ids) {
      if (id >= 0 && m.halves[1]->shards().count(ExpertId(0, id)) == 0) id = -1;
    }
    wire::RunExpertsRequest req = MakeRequest(r, 0, h, wire::DTYPE_F32);
    wire::RunExpertsResponse resp;
    req.set_layer(-1000);  // the agreed "last call" marker: rank 2 answers it, then stops
    absl::Status last = CallSync(mpi[1].get(), req, &resp);
    CHECK_THAT(!last.ok(), "marker call should fail validation: " << last);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // rank 2 says goodbye
    req.set_layer(0);
    absl::Status after = CallSync(mpi[1].get(), req, &resp);
    CHECK_THAT(after.code() == absl::StatusCode::kUnavailable, "after stop: " << after);
    // With an in-process replica of rank 2's half, the dispatcher fails over to it.
    std::vector<ExpertWorkerHandle> ws;
    ws.push_back({client.TransportTo(2, "rank 2"), m.halves[1]->shards()});
    ws.push_back({std::make_unique<LocalExpertTransport>(m.halves[1].get(), h, "replica"),
                  m.halves[1]->shards()});
    ExpertDispatcher d(std::move(ws), h, wire::DTYPE_F32);
    std::vector<float> out(r.n * h, 0.0f);
    absl::Status sd = d.RunExperts(0, r.x.data(), r.n, r.ids.data(), r.w.data(), k, out.data());
    CHECK_THAT(sd.ok(), "failover to the replica: " << sd);
    CHECK_THAT(d.failovers() == 1, "failovers " << d.failovers());
  }

  client.Stop();
  wire::RunExpertsResponse resp;
  absl::Status late = CallSync(mpi[0].get(), wire::RunExpertsRequest(), &resp);
  CHECK_THAT(late.code() == absl::StatusCode::kUnavailable, "call after Stop: " << late);
  MpiExpertClient::Stats s = client.stats();
  std::cout << "client: " << s.calls << " calls, " << s.bytes_sent << " bytes sent, "
            << s.bytes_received << " received" << std::endl;
  if (failures > 0) {
    std::cout << "mpi transport check: " << failures << " of " << checks << " checks FAILED"
              << std::endl;
    return 1;
  }
  std::cout << "mpi transport check: " << checks << " checks passed" << std::endl;
  return 0;
}

int Expert(TestModel& m, int rank) {
  const ExpertShard* shard = m.halves[rank - 1].get();
  const int64_t h = m.cfg.hidden_size;
  std::atomic<bool> stop{false};
  MpiServeStats s = ServeExpertsOverMpi(
      MPI_COMM_WORLD, {0},
      [&](const wire::RunExpertsRequest& req, wire::RunExpertsResponse* resp) {
        if (rank == 2 && req.layer() == -1000) stop = true;  // the client's "last call"
        return RunExpertsOnShard(*shard, h, req, resp);
      },
      stop);
  std::cout << "rank " << rank << ": served " << s.calls << " calls" << std::endl;
  return 0;
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int rc = 0;
  absl::Status st = moemesh::CheckMpiThreadLevel(provided);
  moemesh::TestModel m;
  if (st.ok()) st = moemesh::LoadModel(&m);
  if (!st.ok() || size != 3) {
    std::cerr << "mpi_transport_check: " << (st.ok() ? "needs mpirun -np 3" : st.ToString())
              << std::endl;
    rc = 2;
  } else {
    rc = rank == 0 ? moemesh::Client(m) : moemesh::Expert(m, rank);
  }
  MPI_Finalize();
  return rc;
}
