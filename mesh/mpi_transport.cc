#include "mesh/mpi_transport.h"

#include <sys/prctl.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <set>

#include "absl/strings/str_cat.h"
#include "mesh/mpi_codec.h"

namespace moemesh {
namespace {

constexpr int kTagRequest = 7101;   // attention -> expert: requests and stop
constexpr int kTagResponse = 7102;  // expert -> attention: responses and goodbye
constexpr auto kDrainTimeout = std::chrono::seconds(2);

using Clock = std::chrono::steady_clock;

// Naps of a few microseconds need the thread's timer slack (50 us by default) cut to 1 us.
void SetFineTimerSlack() { prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); }

void NapMicros(int us) {
  timespec ts{0, static_cast<long>(us) * 1000L};
  nanosleep(&ts, nullptr);
}

// The wait policy of MpiPollOptions for one polling thread.
class Poller {
 public:
  explicit Poller(const MpiPollOptions& o) : o_(o), nap_(o.min_nap_us) {}
  void Activity() {
    last_ = Clock::now();
    nap_ = o_.min_nap_us;
  }
  // Called after a poll found nothing.
  void Wait() {
    const auto idle = Clock::now() - last_;
    if (idle < std::chrono::microseconds(o_.spin_us)) return;
    if (idle > std::chrono::milliseconds(o_.idle_after_ms)) {
      NapMicros(o_.idle_nap_us);
      return;
    }
    NapMicros(nap_);
    nap_ = std::min(nap_ * 2, o_.max_nap_us);
  }

 private:
  const MpiPollOptions o_;
  Clock::time_point last_ = Clock::now();
  int nap_;
};

}  // namespace

absl::Status CheckMpiThreadLevel(int provided) {
  if (provided >= MPI_THREAD_SERIALIZED) return absl::OkStatus();
  const char* names[] = {"MPI_THREAD_SINGLE", "MPI_THREAD_FUNNELED"};
  return absl::FailedPreconditionError(absl::StrCat(
      "the MPI expert transport needs MPI_THREAD_SERIALIZED; this MPI library provides ",
      provided >= 0 && provided < 2 ? names[provided] : "an unknown level",
      " (use --expert_transport=grpc)"));
}

// ---------------------------------------------------------------- attention side

struct MpiExpertClient::Call {
  int rank = 0;
  std::string name;
  uint64_t id = 0;
  const wire::RunExpertsRequest* req = nullptr;
  wire::RunExpertsResponse* resp = nullptr;
  std::function<void(absl::Status)> done;
  std::string out;  // encoded request
  // Response buffer of MaxResponseBytes, not zero-filled (a fresh one per call, up to
  // ~100 KB: a std::string's resize wrote it all once more).
  std::unique_ptr<char[]> in;
  size_t in_size = 0;
  MPI_Request send = MPI_REQUEST_NULL, recv = MPI_REQUEST_NULL;
};

MpiExpertClient::MpiExpertClient(MPI_Comm comm, MpiPollOptions poll) : comm_(comm), poll_(poll) {}

MpiExpertClient::~MpiExpertClient() { Stop(); }

std::unique_ptr<ExpertTransport> MpiExpertClient::TransportTo(int rank, std::string name) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (std::find(ranks_.begin(), ranks_.end(), rank) == ranks_.end()) ranks_.push_back(rank);
  }
  return std::make_unique<MpiExpertTransport>(this, rank, std::move(name));
}

void MpiExpertClient::Start() {
  std::lock_guard<std::mutex> l(mu_);
  if (started_ || stopping_) return;
  started_ = true;
  thread_ = std::thread([this] { Loop(); });
}

void MpiExpertClient::Stop() {
  std::deque<std::unique_ptr<Call>> orphans;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stopping_) return;
    stopping_ = true;
    if (!started_) orphans.swap(queue_);  // no thread to fail them
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  for (auto& c : orphans) c->done(absl::UnavailableError("MPI expert transport stopped"));
}

MpiExpertClient::Stats MpiExpertClient::stats() const {
  Stats s;
  s.calls = calls_.load();
  s.bytes_sent = bytes_sent_.load();
  s.bytes_received = bytes_received_.load();
  return s;
}

void MpiExpertClient::Submit(int rank, const std::string& name, const wire::RunExpertsRequest* req,
                             wire::RunExpertsResponse* resp, std::function<void(absl::Status)> done) {
  auto c = std::make_unique<Call>();
  c->rank = rank;
  c->name = name;
  c->req = req;
  c->resp = resp;
  c->done = std::move(done);
  c->id = static_cast<uint64_t>(++calls_);
  absl::Status st = mpi_wire::EncodeRequest(c->id, *req, &c->out);
  if (!st.ok()) {
    c->done(st);
    return;
  }
  c->in_size = mpi_wire::MaxResponseBytes(*req);
  c->in.reset(new char[c->in_size]);
  {
    std::lock_guard<std::mutex> l(mu_);
    if (!stopping_) {
      queue_.push_back(std::move(c));
      cv_.notify_all();
      return;
    }
  }
  c->done(absl::UnavailableError("MPI expert transport stopped"));
}

void MpiExpertClient::Loop() {
  SetFineTimerSlack();
  Poller poller(poll_);
  std::vector<std::unique_ptr<Call>> active;
  std::vector<std::unique_ptr<Call>> zombies;  // answered, send still pending: keep the buffer
  std::set<int> dead;                           // ranks that said goodbye
  std::deque<std::unique_ptr<Call>> fresh;

  auto fail = [&](std::unique_ptr<Call> c, absl::Status st) {
    c->done(std::move(st));
    if (c->send != MPI_REQUEST_NULL) zombies.push_back(std::move(c));
  };
  // Completes `c`, whose receive finished with `st`; returns true if its rank said goodbye.
  auto complete = [&](std::unique_ptr<Call> c, const MPI_Status& mst) {
    int count = 0;
    MPI_Get_count(&mst, MPI_BYTE, &count);
    bytes_received_ += count;
    mpi_wire::Kind kind;
    uint64_t id = 0;
    absl::Status status;
    absl::Status d = mpi_wire::PeekKind(c->in.get(), count, &kind, &id);
    bool goodbye = false;
    if (d.ok() && kind == mpi_wire::Kind::kStop) {
      goodbye = true;
      status = absl::UnavailableError("stopped serving over MPI");
    } else if (d.ok()) {
      d = mpi_wire::DecodeResponse(c->in.get(), count, &id, &status, c->resp);
      if (d.ok() && id != c->id) {
        d = absl::InternalError(absl::StrCat("MPI response for request ", id, ", expected ", c->id));
      }
    }
    if (!d.ok()) status = d;
    if (!goodbye && c->send != MPI_REQUEST_NULL) {
      // The expert has the whole request (it answered), so the send is done or about to be.
      MPI_Wait(&c->send, MPI_STATUS_IGNORE);
    }
    fail(std::move(c), std::move(status));
    return goodbye;
  };
  // A rank said goodbye: no answer will come for its other calls.
  auto bury = [&](int rank) {
    dead.insert(rank);
    for (size_t i = 0; i < active.size();) {
      if (active[i]->rank != rank) {
        ++i;
        continue;
      }
      std::unique_ptr<Call> c = std::move(active[i]);
      active.erase(active.begin() + i);
      MPI_Cancel(&c->recv);
      MPI_Wait(&c->recv, MPI_STATUS_IGNORE);
      fail(std::move(c), absl::UnavailableError("stopped serving over MPI"));
    }
  };
  // One pass over the calls in flight; true if any finished.
  auto poll_active = [&] {
    bool progressed = false;
    for (size_t i = 0; i < active.size();) {
      int flag = 0;
      MPI_Status mst;
      MPI_Test(&active[i]->recv, &flag, &mst);
      if (!flag) {
        ++i;
        continue;
      }
      progressed = true;
      std::unique_ptr<Call> c = std::move(active[i]);
      active.erase(active.begin() + i);
      const int rank = c->rank;
      if (complete(std::move(c), mst)) {
        bury(rank);
        i = 0;
      }
    }
    for (size_t i = 0; i < zombies.size();) {
      int flag = 0;
      MPI_Test(&zombies[i]->send, &flag, MPI_STATUS_IGNORE);
      if (flag) {
        zombies.erase(zombies.begin() + i);
      } else {
        ++i;
      }
    }
    return progressed;
  };

  bool stopping = false;
  while (!stopping) {
    {
      std::unique_lock<std::mutex> l(mu_);
      if (active.empty() && queue_.empty() && !stopping_) {
        cv_.wait(l, [&] { return stopping_ || !queue_.empty(); });
        poller.Activity();
      }
      fresh.swap(queue_);
      stopping = stopping_;
    }
    bool progressed = false;
    while (!fresh.empty()) {
      std::unique_ptr<Call> c = std::move(fresh.front());
      fresh.pop_front();
      if (stopping) {
        c->done(absl::UnavailableError("MPI expert transport stopped"));
        continue;
      }
      if (dead.count(c->rank)) {
        fail(std::move(c), absl::UnavailableError("stopped serving over MPI"));
        continue;
      }
      MPI_Irecv(c->in.get(), static_cast<int>(c->in_size), MPI_BYTE, c->rank, kTagResponse, comm_,
                &c->recv);
      MPI_Isend(c->out.data(), static_cast<int>(c->out.size()), MPI_BYTE, c->rank, kTagRequest,
                comm_, &c->send);
      bytes_sent_ += static_cast<int64_t>(c->out.size());
      active.push_back(std::move(c));
      progressed = true;
    }
    progressed |= poll_active();
    if (progressed) {
      poller.Activity();
    } else if (!stopping) {
      poller.Wait();
    }
  }

  // Stopping: tell every live expert rank (after its pending requests: MPI keeps the order), let
  // the calls in flight finish for a while, then fail the rest.
  std::vector<int> ranks;
  {
    std::lock_guard<std::mutex> l(mu_);
    ranks = ranks_;
  }
  static std::string* stop_msg = new std::string();  // outlives sends that may be freed below
  mpi_wire::EncodeStop(stop_msg);
  std::vector<MPI_Request> stops;
  for (int r : ranks) {
    if (dead.count(r)) continue;
    stops.emplace_back();
    MPI_Isend(stop_msg->data(), static_cast<int>(stop_msg->size()), MPI_BYTE, r, kTagRequest, comm_,
              &stops.back());
  }
  const auto deadline = Clock::now() + kDrainTimeout;
  Poller drain(poll_);
  while (!active.empty() && Clock::now() < deadline) {
    if (poll_active()) {
      drain.Activity();
    } else {
      drain.Wait();
    }
  }
  for (auto& c : active) {
    MPI_Cancel(&c->recv);
    MPI_Wait(&c->recv, MPI_STATUS_IGNORE);
    c->done(absl::UnavailableError("MPI expert transport stopped before the answer came"));
  }
  active.clear();
  for (MPI_Request& r : stops) {
    int flag = 0;
    while (Clock::now() < deadline) {
      MPI_Test(&r, &flag, MPI_STATUS_IGNORE);
      if (flag) break;
      NapMicros(100);
    }
    if (!flag) MPI_Request_free(&r);
  }
  for (auto& z : zombies) {
    if (z->send != MPI_REQUEST_NULL) MPI_Request_free(&z->send);
  }
  // A freed send may still read its buffer: keep the calls' buffers alive until exit.
  static auto* leaked = new std::vector<std::unique_ptr<Call>>();
  for (auto& z : zombies) leaked->push_back(std::move(z));
}

// ---------------------------------------------------------------- expert side

MpiServeStats ServeExpertsOverMpi(MPI_Comm comm, std::vector<int> client_ranks,
                                  const RunExpertsHandler& handler,
                                  const std::atomic<bool>& stop, MpiPollOptions poll) {
  SetFineTimerSlack();
  Poller poller(poll);
  MpiServeStats stats;
  struct Pending {
    MPI_Request req = MPI_REQUEST_NULL;
    std::string buf;
  };
  std::deque<Pending> sends;  // responses in flight (the client may be napping)
  std::vector<std::string> spare;
  std::string in;
  wire::RunExpertsRequest req;
  wire::RunExpertsResponse resp;
  auto reap = [&] {
    while (!sends.empty()) {
      int flag = 0;
      MPI_Test(&sends.front().req, &flag, MPI_STATUS_IGNORE);
      if (!flag) return;
      spare.push_back(std::move(sends.front().buf));
      sends.pop_front();
    }
  };
  auto send = [&](std::string* buf, int to) {
    sends.emplace_back();
    sends.back().buf.swap(*buf);
    stats.bytes_sent += static_cast<int64_t>(sends.back().buf.size());
    MPI_Isend(sends.back().buf.data(), static_cast<int>(sends.back().buf.size()), MPI_BYTE, to,
              kTagResponse, comm, &sends.back().req);
  };
  auto is_client = [&](int r) {
    return std::find(client_ranks.begin(), client_ranks.end(), r) != client_ranks.end();
  };
  while (!client_ranks.empty()) {
    reap();
    int flag = 0;
    MPI_Status mst;
    MPI_Iprobe(MPI_ANY_SOURCE, kTagRequest, comm, &flag, &mst);
    if (flag && !is_client(mst.MPI_SOURCE)) {
      // Not one of ours (or one that said stop): take the message and drop it.
      int count = 0;
      MPI_Get_count(&mst, MPI_BYTE, &count);
      in.resize(std::max(count, 1));
      MPI_Recv(&in[0], count, MPI_BYTE, mst.MPI_SOURCE, kTagRequest, comm, MPI_STATUS_IGNORE);
      continue;
    }
    if (!flag) {
      if (stop.load()) {
        for (int c : client_ranks) {
          std::string bye;
          mpi_wire::EncodeStop(&bye);
          send(&bye, c);
        }
        break;
      }
      poller.Wait();
      continue;
    }
    const int client_rank = mst.MPI_SOURCE;
    int count = 0;
    MPI_Get_count(&mst, MPI_BYTE, &count);
    in.resize(std::max(count, 1));
    MPI_Recv(&in[0], count, MPI_BYTE, client_rank, kTagRequest, comm, MPI_STATUS_IGNORE);
    stats.bytes_received += count;
    mpi_wire::Kind kind;
    uint64_t id = 0;
    absl::Status st = mpi_wire::PeekKind(in.data(), count, &kind, &id);
    if (st.ok() && kind == mpi_wire::Kind::kStop) {  // this client is done with us
      client_ranks.erase(std::find(client_ranks.begin(), client_ranks.end(), client_rank));
      continue;
    }
    if (st.ok() && kind != mpi_wire::Kind::kRequest) st = absl::DataLossError("MPI message is not a request");
    if (st.ok()) st = mpi_wire::DecodeRequest(in.data(), count, &id, &req);
    resp.Clear();
    if (st.ok()) st = handler(req, &resp);
    ++stats.calls;
    std::string out;
    if (!spare.empty()) {
      out.swap(spare.back());
      spare.pop_back();
    }
    mpi_wire::EncodeResponse(id, st, resp, &out);
    if (out.size() > mpi_wire::MaxResponseBytes(req)) {  // never for a well-formed request
      mpi_wire::EncodeResponse(
          id, absl::InternalError("RunExperts response larger than the request allows"), resp, &out);
    }
    send(&out, client_rank);
    poller.Activity();
  }
  // Let the last responses (and the goodbye) reach the client.
  const auto deadline = Clock::now() + kDrainTimeout;
  while (!sends.empty() && Clock::now() < deadline) {
    reap();
    if (!sends.empty()) NapMicros(50);
  }
  for (Pending& p : sends) {
    MPI_Request_free(&p.req);
    static auto* leaked = new std::vector<std::string>();  // a freed send may still read it
    leaked->push_back(std::move(p.buf));
  }
  return stats;
}

}  // namespace moemesh
