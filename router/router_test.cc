// The router's scheduling over several attention workers (data parallel), with fake workers: a
// unit test of the Router class alone (the real workers are tests/cluster_test.py's).
#include "router/router.h"

#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/config.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"

namespace moemesh {
namespace {

constexpr char kModel[] = "models/pydoc-moe-17m";
constexpr int32_t kToken = 100;  // what the fake workers sample

// Answers every step with kToken for each sequence that samples; from step `fail_from` on
// (counting from 0; -1: never), fails every step as a worker that went down does, and reports
// why in GetStats' not_ready, until Recover().
class FakeAttention : public AttentionClient {
 public:
  explicit FakeAttention(int64_t kv_capacity, int fail_from = -1)
      : kv_capacity_(kv_capacity), fail_from_(fail_from) {}
  absl::Status Step(const wire::StepRequest& req, wire::StepResponse* resp) override {
    std::unique_lock<std::mutex> l(mu_);
    gate_.wait(l, [&] { return open_; });
    if (step_delay_ms_ > 0) {
      l.unlock();
      std::this_thread::sleep_for(std::chrono::milliseconds(step_delay_ms_));
      l.lock();
    }
    const bool fail = !recovered_ && fail_from_ >= 0 && steps_ >= fail_from_;
    if (steps_ == forget_at_) {  // restarted between two steps: it knows no sequence
      kv_.clear();
      live_.clear();
    }
    ++steps_;
    for (const wire::SeqStep& s : req.seqs()) seqs_.insert(s.seq_id());
    if (fail) return absl::UnavailableError("worker down");
    std::set<uint64_t> refused, unknown;
    for (const wire::SeqStep& s : req.seqs()) {
      if (!s.new_sequence() && !kv_.count(s.seq_id())) {
        unknown.insert(s.seq_id());
        continue;
      }
      // With a KV cache limit: the rows it would take past the capacity are refused, as the
      // real worker's Reserve does (a new sequence is forgotten, an old one keeps its rows).
      if (enforce_) {
        const int64_t had = s.new_sequence() || !live_.count(s.seq_id())
                                ? 0
                                : static_cast<int64_t>(kv_[s.seq_id()].size());
        if (UsedRows() - had + s.start_pos() + s.tokens_size() > kv_capacity_) {
          refused.insert(s.seq_id());
          if (s.new_sequence()) live_.erase(s.seq_id());
          continue;
        }
        live_.insert(s.seq_id());
      }
      // Every token it was given, by position; a new sequence starts over.
      std::vector<int32_t>& kv = kv_[s.seq_id()];
      if (s.new_sequence()) {
        kv.clear();
        think_[s.seq_id()] = {s.think_start_id(), s.think_end_id()};
        seed_[s.seq_id()] = s.sampling().has_seed() ? std::optional<uint64_t>(s.sampling().seed())
                                                    : std::nullopt;
        first_[s.seq_id()] = s;
        owner_[s.seq_id()] = {req.router(), req.router_run()};
        order_.push_back(s.seq_id());
      }
      EXPECT_EQ(static_cast<int64_t>(kv.size()), s.start_pos()) << "sequence " << s.seq_id();
      kv.insert(kv.end(), s.tokens().begin(), s.tokens().end());
    }
    max_used_ = std::max(max_used_, UsedRows());
    for (const wire::SeqStep& s : req.seqs()) {
      wire::SeqResult* r = resp->add_results();
      if (unknown.count(s.seq_id())) {
        r->set_error_code(static_cast<int>(absl::StatusCode::kFailedPrecondition));
        r->set_error(absl::StrCat("unknown sequence ", s.seq_id()));
        continue;
      }
      if (refused.count(s.seq_id())) {
        r->set_error_code(static_cast<int>(absl::StatusCode::kResourceExhausted));
        r->set_error("KV cache full");
        ++refusals_;
        continue;
      }
      r->set_sampled(s.sample());
      if (s.sample()) r->set_token(kToken);
    }
    return absl::OkStatus();
  }
  absl::Status Release(const std::vector<uint64_t>& ids) override {
    std::lock_guard<std::mutex> l(mu_);
    released_ += static_cast<int64_t>(ids.size());
    for (uint64_t id : ids) live_.erase(id);
    return absl::OkStatus();
  }
  // As the real worker: frees the rows of `router`'s sequences from other runs.
  absl::Status ReleaseStale(const std::string& router, uint64_t keep_run) override {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& [id, owner] : owner_) {
      if (owner.first == router && owner.second != keep_run) live_.erase(id);
    }
    return absl::OkStatus();
  }
  absl::StatusOr<wire::Stats> GetStats() override {
    std::lock_guard<std::mutex> l(mu_);
    ++stats_calls_;
    wire::Stats s;
    s.set_kv_capacity_tokens(kv_capacity_);
    s.set_kv_used_tokens(UsedRows());
    if (!recovered_ && fail_from_ >= 0 && steps_ >= fail_from_) s.set_not_ready("expert down");
    return s;
  }
  void Recover() {
    std::lock_guard<std::mutex> l(mu_);
    recovered_ = true;
  }
  int64_t steps() const {
    std::lock_guard<std::mutex> l(mu_);
    return steps_;
  }
  int64_t stats_calls() const {
    std::lock_guard<std::mutex> l(mu_);
    return stats_calls_;
  }
  // Steps wait while held (so that a test's requests are all admitted before any ends).
  void Hold() {
    std::lock_guard<std::mutex> l(mu_);
    open_ = false;
  }
  void Open() {
    std::lock_guard<std::mutex> l(mu_);
    open_ = true;
    gate_.notify_all();
  }
  std::set<uint64_t> seqs() const {
    std::lock_guard<std::mutex> l(mu_);
    return seqs_;
  }
  // The think marker ids a sequence's first step carried.
  std::pair<int32_t, int32_t> think(uint64_t seq) const {
    std::lock_guard<std::mutex> l(mu_);
    auto it = think_.find(seq);
    return it == think_.end() ? std::make_pair(-7, -7) : it->second;
  }
  // The seed a sequence's first step carried (nullopt: none).
  std::optional<uint64_t> seed(uint64_t seq) const {
    std::lock_guard<std::mutex> l(mu_);
    auto it = seed_.find(seq);
    return it == seed_.end() ? std::nullopt : it->second;
  }
  // Sequences in the order of their first steps.
  std::vector<uint64_t> order() const {
    std::lock_guard<std::mutex> l(mu_);
    return order_;
  }
  // A sequence's first step (sampling, end ids), without its tokens' check.
  wire::SeqStep first(uint64_t seq) const {
    std::lock_guard<std::mutex> l(mu_);
    auto it = first_.find(seq);
    return it == first_.end() ? wire::SeqStep() : it->second;
  }
  // The router name and run a sequence's first step carried.
  std::pair<std::string, uint64_t> owner(uint64_t seq) const {
    std::lock_guard<std::mutex> l(mu_);
    auto it = owner_.find(seq);
    return it == owner_.end() ? std::make_pair(std::string("?"), uint64_t{0}) : it->second;
  }
  std::vector<int32_t> kv(uint64_t seq) const {
    std::lock_guard<std::mutex> l(mu_);
    auto it = kv_.find(seq);
    return it == kv_.end() ? std::vector<int32_t>() : it->second;
  }
  // From now on the KV cache holds at most kv_capacity rows: those of its sequences not yet
  // released, plus `foreign` ones (another router's sequences). Steps past it are refused.
  void LimitRows(int64_t foreign) {
    std::lock_guard<std::mutex> l(mu_);
    enforce_ = true;
    foreign_ = foreign;
  }
  // Forgets every sequence before step `step` (counting from 0), as a worker restarted then.
  void ForgetAtStep(int64_t step) {
    std::lock_guard<std::mutex> l(mu_);
    forget_at_ = step;
  }
  void SetStepDelay(int ms) {
    std::lock_guard<std::mutex> l(mu_);
    step_delay_ms_ = ms;
  }
  int64_t refusals() const {
    std::lock_guard<std::mutex> l(mu_);
    return refusals_;
  }
  int64_t max_used() const {
    std::lock_guard<std::mutex> l(mu_);
    return max_used_;
  }

 private:
  int64_t UsedRows() const {
    int64_t used = foreign_;
    for (uint64_t id : live_) used += static_cast<int64_t>(kv_.at(id).size());
    return used;
  }

  const int64_t kv_capacity_;
  const int fail_from_;
  mutable std::mutex mu_;
  std::condition_variable gate_;
  bool open_ = true, recovered_ = false, enforce_ = false;
  int64_t steps_ = 0, released_ = 0, stats_calls_ = 0;
  int64_t foreign_ = 0, refusals_ = 0, max_used_ = 0, forget_at_ = -1;
  int step_delay_ms_ = 0;
  std::set<uint64_t> live_;  // sequences holding rows (LimitRows), not yet released
  std::set<uint64_t> seqs_;
  std::map<uint64_t, std::vector<int32_t>> kv_;
  std::map<uint64_t, std::pair<std::string, uint64_t>> owner_;
  std::map<uint64_t, std::pair<int32_t, int32_t>> think_;
  std::map<uint64_t, std::optional<uint64_t>> seed_;
  std::map<uint64_t, wire::SeqStep> first_;
  std::vector<uint64_t> order_;
};

// A FakeAttention whose GetStats, after Silence(), answers only when the test says (a worker that
// does not answer yet), by GetStatsAsync or by GetStats alike. (Router::Create asks it first.)
class SilentAttention : public FakeAttention {
 public:
  using FakeAttention::FakeAttention;
  void Silence() {
    std::lock_guard<std::mutex> l(pending_mu_);
    silent_ = true;
  }
  absl::StatusOr<wire::Stats> GetStats() override {
    std::promise<absl::StatusOr<wire::Stats>> answer;
    GetStatsAsync([&answer](absl::StatusOr<wire::Stats> s) { answer.set_value(std::move(s)); });
    return answer.get_future().get();
  }
  void GetStatsAsync(std::function<void(absl::StatusOr<wire::Stats>)> done) override {
    {
      std::lock_guard<std::mutex> l(pending_mu_);
      if (silent_) {
        pending_.push_back(std::move(done));
        return;
      }
    }
    done(FakeAttention::GetStats());
  }
  // Answers the calls so far with `answer`; how many there were.
  size_t Answer(const absl::StatusOr<wire::Stats>& answer) {
    std::vector<std::function<void(absl::StatusOr<wire::Stats>)>> calls;
    {
      std::lock_guard<std::mutex> l(pending_mu_);
      calls.swap(pending_);
    }
    for (auto& done : calls) done(answer);
    return calls.size();
  }

 private:
  std::mutex pending_mu_;
  bool silent_ = false;
  std::vector<std::function<void(absl::StatusOr<wire::Stats>)>> pending_;
};

class Sink : public GenerationSink {
 public:
  void OnResponse(const moemesh::v1::GenerateResponse& r) override {
    std::lock_guard<std::mutex> l(mu_);
    for (int32_t id : r.ids()) ids_.push_back(id);
    if (r.finish_reason() != moemesh::v1::FINISH_REASON_UNSPECIFIED) reason_ = r.finish_reason();
  }
  void OnFinish(const absl::Status& st) override {
    std::lock_guard<std::mutex> l(mu_);
    status_ = st;
    done_ = true;
    cv_.notify_all();
  }
  // Waits for the end (at most 30 s); its status.
  absl::Status Wait() {
    std::unique_lock<std::mutex> l(mu_);
    if (!cv_.wait_for(l, std::chrono::seconds(30), [&] { return done_; })) {
      return absl::DeadlineExceededError("no end after 30 s");
    }
    return status_;
  }
  std::vector<int32_t> ids() {
    std::lock_guard<std::mutex> l(mu_);
    return ids_;
  }
  bool done() {
    std::lock_guard<std::mutex> l(mu_);
    return done_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  absl::Status status_;
  std::vector<int32_t> ids_;
  moemesh::v1::FinishReason reason_ = moemesh::v1::FINISH_REASON_UNSPECIFIED;
};

class RouterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto cfg = ModelConfig::FromFile(std::string(kModel) + "/config.json");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    cfg_ = *cfg;
    auto gen = GenerationDefaults::FromFile(std::string(kModel) + "/generation_config.json");
    ASSERT_TRUE(gen.ok()) << gen.status();
    gen_ = *gen;
    auto tok = Tokenizer::FromFile(std::string(kModel) + "/tokenizer.json");
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = std::move(*tok);
  }
  static moemesh::v1::GenerateRequest Request(int prompt_tokens, int max_tokens) {
    moemesh::v1::GenerateRequest r;
    for (int i = 0; i < prompt_tokens; ++i) r.mutable_token_ids()->add_ids(10 + i);
    r.mutable_sampling()->set_max_tokens(max_tokens);
    r.mutable_sampling()->set_ignore_eos(true);
    return r;
  }
  // Submits `req` once per sink; the ids in `ids`.
  static void SubmitAll(Router& router, const moemesh::v1::GenerateRequest& req,
                        std::vector<Sink>* sinks, std::vector<uint64_t>* ids) {
    for (Sink& s : *sinks) {
      auto id = router.Submit(req, &s);
      ASSERT_TRUE(id.ok()) << id.status();
      ids->push_back(*id);
    }
  }
  // What a finished greedy sequence of Request(prompt_tokens, max_tokens) leaves in a fake
  // worker's cache: its prompt, then the generated tokens but the last (never fed back).
  static std::vector<int32_t> FinishedCache(int prompt_tokens, int max_tokens) {
    const moemesh::v1::GenerateRequest req = Request(prompt_tokens, max_tokens);
    std::vector<int32_t> want(req.token_ids().ids().begin(), req.token_ids().ids().end());
    want.insert(want.end(), max_tokens - 1, kToken);
    return want;
  }
  std::unique_ptr<Router> Make(std::vector<AttentionClient*> workers) {
    auto r = Router::Create(tok_.get(), cfg_, gen_, std::move(workers), RouterOptions());
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? std::move(*r) : nullptr;
  }

  ModelConfig cfg_;
  GenerationDefaults gen_;
  std::unique_ptr<Tokenizer> tok_;
};

// Requests in flight together are admitted to the worker with the most free KV cache each time:
// equal workers get equal shares; every request ends with all its tokens.
TEST_F(RouterTest, EqualWorkersShareTheRequests) {
  FakeAttention a(1000), b(1000);
  a.Hold();
  b.Hold();
  auto router = Make({&a, &b});
  ASSERT_NE(router, nullptr);
  std::vector<Sink> sinks(6);
  for (Sink& s : sinks) ASSERT_TRUE(router->Submit(Request(10, 40), &s).ok());
  a.Open();
  b.Open();
  for (Sink& s : sinks) {
    ASSERT_TRUE(s.Wait().ok());
    EXPECT_EQ(s.ids(), std::vector<int32_t>(40, kToken));
  }
  EXPECT_EQ(a.seqs().size(), 3u);
  EXPECT_EQ(b.seqs().size(), 3u);
  const Router::Counters c = router->counters();
  EXPECT_EQ(c.finished, 6);
  ASSERT_EQ(c.steps_per_worker.size(), 2u);
  EXPECT_GT(c.steps_per_worker[0], 0);
  EXPECT_GT(c.steps_per_worker[1], 0);
}

// The worker with more free KV cache gets the request: with a small and a large worker, requests
// go to the large one while it has more room; one too big for the small worker is still served.
TEST_F(RouterTest, AdmitsToTheWorkerWithTheMostFreeKvCache) {
  FakeAttention small(100), large(1000);
  auto router = Make({&small, &large});
  ASSERT_NE(router, nullptr);
  std::vector<Sink> sinks(3);
  ASSERT_TRUE(router->Submit(Request(20, 40), &sinks[0]).ok());
  ASSERT_TRUE(router->Submit(Request(20, 40), &sinks[1]).ok());
  ASSERT_TRUE(router->Submit(Request(100, 400), &sinks[2]).ok());  // 500 slots: large only
  for (Sink& s : sinks) ASSERT_TRUE(s.Wait().ok());
  EXPECT_TRUE(small.seqs().empty());
  EXPECT_EQ(large.seqs().size(), 3u);
  // More than the largest worker holds: refused at once.
  Sink refused;
  auto st = router->Submit(Request(100, 950), &refused);
  EXPECT_EQ(st.status().code(), absl::StatusCode::kResourceExhausted) << st.status();
}

// A worker that goes down mid-stream: its requests move to the other worker and complete, each
// continuing from its last token over a KV cache rebuilt from its prompt and generated tokens;
// the failed worker takes no new requests.
TEST_F(RouterTest, RequestsOfAFailedWorkerMoveToAnother) {
  FakeAttention good(1000), bad(1000, /*fail_from=*/6);
  good.Hold();
  bad.Hold();
  auto r = Router::Create(tok_.get(), cfg_, gen_, {&good, &bad}, RouterOptions());
  ASSERT_TRUE(r.ok()) << r.status();
  Router& router = **r;
  std::vector<Sink> sinks(4);
  std::vector<uint64_t> ids;
  ASSERT_NO_FATAL_FAILURE(SubmitAll(router, Request(5, 30), &sinks, &ids));
  good.Open();
  bad.Open();
  for (Sink& s : sinks) {
    ASSERT_TRUE(s.Wait().ok());
    EXPECT_EQ(s.ids(), std::vector<int32_t>(30, kToken));
  }
  EXPECT_EQ(router.counters().moved, 2);
  EXPECT_EQ(bad.seqs().size(), 2u);
  EXPECT_EQ(good.seqs().size(), 4u);
  // Every sequence's cache on the good worker, at consecutive positions (checked as they came).
  for (uint64_t id : ids) EXPECT_EQ(good.kv(id), FinishedCache(5, 30)) << "sequence " << id;
  // The failed worker is out of service (its GetStats reports not_ready): a new request goes to
  // the good one.
  Sink late;
  auto id = router.Submit(Request(5, 3), &late);
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(late.Wait().ok());
  EXPECT_TRUE(good.seqs().count(*id));
  EXPECT_FALSE(bad.seqs().count(*id));
}

// With no other worker up, a failed step's requests wait for their worker: it gets no step while
// its GetStats reports something in not_ready (an expert worker down), and once that clears the
// requests continue from their last token over a rebuilt KV cache.
TEST_F(RouterTest, RequestsOfALoneFailedWorkerWaitForItToServeAgain) {
  FakeAttention w(1000, /*fail_from=*/6);
  w.Hold();
  RouterOptions opt;
  opt.worker_retry_seconds = 0.02;
  opt.outage_wait_seconds = 60;
  auto r = Router::Create(tok_.get(), cfg_, gen_, {&w}, opt);
  ASSERT_TRUE(r.ok()) << r.status();
  Router& router = **r;
  std::vector<Sink> sinks(2);
  std::vector<uint64_t> ids;
  ASSERT_NO_FATAL_FAILURE(SubmitAll(router, Request(5, 30), &sinks, &ids));
  w.Open();
  // Step 6 fails; the worker is then asked (GetStats) at doubling intervals and gets no step.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (w.stats_calls() < 5 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_GE(w.stats_calls(), 5);
  EXPECT_EQ(w.steps(), 7);
  EXPECT_EQ(router.counters().moved, 2);
  EXPECT_EQ(router.counters().worker_up, std::vector<bool>{false});
  EXPECT_EQ(sinks[0].ids().size(), 6u);  // a token from each of steps 0-5
  w.Recover();
  for (Sink& s : sinks) {
    ASSERT_TRUE(s.Wait().ok());
    EXPECT_EQ(s.ids(), std::vector<int32_t>(30, kToken));
  }
  for (uint64_t id : ids) EXPECT_EQ(w.kv(id), FinishedCache(5, 30)) << "sequence " << id;
  EXPECT_EQ(router.counters().failed, 0);
}

// An outage longer than outage_wait_seconds fails the requests waiting, with UNAVAILABLE naming
// the last failure, and refuses new ones until the worker serves again; a wait of 0 fails a
// failed step's requests at once.
TEST_F(RouterTest, AnOutagePastItsWaitFailsTheWaitingAndRefusesNewRequests) {
  for (double wait : {0.0, 0.3}) {
    SCOPED_TRACE(wait);
    FakeAttention w(1000, /*fail_from=*/0);
    RouterOptions opt;
    opt.worker_retry_seconds = 0.02;
    opt.outage_wait_seconds = wait;
    auto r = Router::Create(tok_.get(), cfg_, gen_, {&w}, opt);
    ASSERT_TRUE(r.ok()) << r.status();
    Router& router = **r;
    Sink s;
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_TRUE(router.Submit(Request(5, 30), &s).ok());
    const absl::Status st = s.Wait();
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
    EXPECT_NE(st.message().find("worker down"), std::string::npos) << st;
    EXPECT_GE(waited, wait);
    EXPECT_LT(waited, wait + 10);
    if (wait > 0) {
      EXPECT_NE(st.message().find("--outage_wait_seconds"), std::string::npos) << st;
      EXPECT_EQ(w.steps(), 1);  // not tried again while it reported not_ready
    }
    Sink refused;
    const auto id = router.Submit(Request(5, 3), &refused);
    EXPECT_EQ(id.status().code(), absl::StatusCode::kUnavailable) << id.status();
    EXPECT_EQ(router.counters().refused_unavailable, 1);
    EXPECT_EQ(router.counters().failed, 1);
    // Back in service once GetStats has nothing in not_ready.
    w.Recover();
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!router.counters().worker_up[0] && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    Sink late;
    ASSERT_TRUE(router.Submit(Request(5, 3), &late).ok());
    ASSERT_TRUE(late.Wait().ok());
    EXPECT_EQ(late.ids(), std::vector<int32_t>(3, kToken));
  }
}

// Cancelling: a waiting request ends at once, a running one at its worker's next step boundary;
// the room it frees goes to the next waiting request, whichever worker it was on.
TEST_F(RouterTest, CancelWaitingAndRunningRequestsAcrossWorkers) {
  FakeAttention a(1000), b(1000);
  a.Hold();
  b.Hold();
  RouterOptions opt;
  opt.max_running = 1;  // one sequence per worker: the third and fourth wait
  auto r = Router::Create(tok_.get(), cfg_, gen_, {&a, &b}, opt);
  ASSERT_TRUE(r.ok()) << r.status();
  Router& router = **r;
  std::vector<Sink> sinks(4);
  std::vector<uint64_t> ids;
  for (Sink& s : sinks) ids.push_back(*router.Submit(Request(5, 20), &s));
  EXPECT_EQ(router.counters().waiting, 2);
  router.Cancel(ids[3]);  // waiting: ends now
  ASSERT_TRUE(sinks[3].Wait().ok());
  EXPECT_TRUE(sinks[3].ids().empty());
  router.Cancel(ids[1]);  // running on the second worker
  a.Open();
  b.Open();
  for (int i : {0, 1, 2}) ASSERT_TRUE(sinks[i].Wait().ok()) << i;
  EXPECT_EQ(sinks[0].ids().size(), 20u);
  EXPECT_LT(sinks[1].ids().size(), 20u);
  EXPECT_EQ(sinks[2].ids().size(), 20u);  // admitted when a worker had room again
  const Router::Counters c = router.counters();
  EXPECT_EQ(c.cancelled, 2);
  EXPECT_EQ(c.finished, 2);
  EXPECT_EQ(c.waiting, 0);
  EXPECT_EQ(c.running, 0);
  EXPECT_EQ(c.kv_reserved, 0);
}

// Counters and histograms for GET /metrics: tokens, finish reasons, refusals, and latencies that
// include the time a request waited for its worker (held here for 50 ms before the first step).
TEST_F(RouterTest, MetricsCountTokensRequestsAndLatencies) {
  FakeAttention a(1000), b(1000);
  a.Hold();
  b.Hold();
  auto router = Make({&a, &b});
  ASSERT_NE(router, nullptr);
  const std::vector<std::pair<int, int>> shapes = {{5, 4}, {7, 6}, {9, 8}};  // prompt, max
  std::vector<Sink> sinks(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    ASSERT_TRUE(router->Submit(Request(shapes[i].first, shapes[i].second), &sinks[i]).ok());
  }
  Sink invalid, too_big;
  EXPECT_EQ(router->Submit(Request(5, 0), &invalid).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(router->Submit(Request(100, 950), &too_big).status().code(),
            absl::StatusCode::kResourceExhausted);
  const auto held_from = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const double held = std::chrono::duration<double>(std::chrono::steady_clock::now() - held_from)
                          .count();
  a.Open();
  b.Open();
  for (Sink& s : sinks) ASSERT_TRUE(s.Wait().ok());
  const Router::Counters c = router->counters();
  EXPECT_EQ(c.submitted, 3);
  EXPECT_EQ(c.finished, 3);
  EXPECT_EQ(c.finished_length, 3);
  EXPECT_EQ(c.invalid, 1);
  EXPECT_EQ(c.rejected, 1);
  EXPECT_EQ(c.prompt_tokens, 5 + 7 + 9);
  EXPECT_EQ(c.generation_tokens, 4 + 6 + 8);
  EXPECT_EQ(c.time_to_first_token.count(), 3);
  EXPECT_GE(c.time_to_first_token.sum(), 3 * held);
  EXPECT_EQ(c.time_to_first_token.counts()[0], 0);  // none under 1 ms: all waited 50 ms
  EXPECT_EQ(c.inter_token.count(), 3 + 5 + 7);       // every token but each request's first
  EXPECT_EQ(c.request_latency.count(), 3);
  EXPECT_GE(c.request_latency.sum(), c.time_to_first_token.sum());
  EXPECT_EQ(c.queue_time.count(), 3);  // admitted at once: both workers had room
  EXPECT_LT(c.queue_time.sum(), c.time_to_first_token.sum());
  EXPECT_EQ(c.request_prompt_tokens.sum(), 5 + 7 + 9);
  EXPECT_EQ(c.request_generation_tokens.sum(), 4 + 6 + 8);
  EXPECT_EQ(c.request_generation_tokens.counts()[2], 1);  // (2, 5]: the 4-token request
  ASSERT_EQ(c.worker_up, std::vector<bool>({true, true}));
  EXPECT_EQ(c.kv_capacity_per_worker, std::vector<int64_t>({1000, 1000}));
  EXPECT_EQ(c.kv_reserved_per_worker, std::vector<int64_t>({0, 0}));

  const std::string text = PrometheusMetrics(c);
  for (const char* line :
       {"moemesh_generation_tokens_total 18\n", "moemesh_prompt_tokens_total 21\n",
        "moemesh_requests_finished_total{reason=\"length\"} 3\n",
        "moemesh_requests_finished_total{reason=\"stop\"} 0\n",
        "moemesh_requests_rejected_total{reason=\"invalid\"} 1\n",
        "moemesh_requests_rejected_total{reason=\"resource_exhausted\"} 1\n",
        "moemesh_kv_cache_capacity_tokens{worker=\"1\"} 1000\n",
        "moemesh_worker_up{worker=\"0\"} 1\n",
        "moemesh_inter_token_latency_seconds_count 15\n",
        "moemesh_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n",
        "# TYPE moemesh_e2e_request_latency_seconds histogram\n"}) {
    EXPECT_NE(text.find(line), std::string::npos) << line << " not in\n" << text;
  }
  // The workers' own stats: one GetStats each, in order; one that does not answer is left out.
  const auto stats = router->WorkerStats();
  ASSERT_EQ(stats.size(), 2u);
  ASSERT_TRUE(stats[0].ok());
  EXPECT_EQ(stats[0]->kv_capacity_tokens(), 1000);
  wire::Stats w0;
  w0.set_kv_used_tokens(5);
  w0.set_draft_tokens(3);
  w0.set_accepted_draft_tokens(2);
  w0.set_attention_seconds(0.25);
  w0.set_idle_released_sequences(4);
  w0.set_stale_released_sequences(7);
  const std::string with = PrometheusMetrics(c, {w0, absl::UnavailableError("down")});
  for (const char* line : {"moemesh_kv_cache_used_tokens{worker=\"0\"} 5\n",
                           "moemesh_spec_draft_tokens_total{worker=\"0\"} 3\n",
                           "moemesh_spec_accepted_draft_tokens_total{worker=\"0\"} 2\n",
                           "moemesh_worker_attention_seconds_total{worker=\"0\"} 0.25\n",
                           "moemesh_worker_idle_released_sequences_total{worker=\"0\"} 4\n",
                           "moemesh_worker_stale_released_sequences_total{worker=\"0\"} 7\n"}) {
    EXPECT_NE(with.find(line), std::string::npos) << line << " not in\n" << with;
  }
  EXPECT_EQ(with.find("moemesh_kv_cache_used_tokens{worker=\"1\"}"), std::string::npos);
  EXPECT_EQ(text.find("moemesh_kv_cache_used_tokens"), std::string::npos);  // none given
}

// response_format JSON_SCHEMA: the schema is compiled at Submit (what the subset lacks is
// INVALID_ARGUMENT naming it) and travels to the worker with the end tokens.
// GET /health (SomeWorkerCanServe) asks every worker at once and is ready at the first that can
// serve, without waiting for one that does not answer (a stopped process: its GetStats would
// take its 5 s deadline, past a readiness probe's 1 s); /metrics' WorkerStats asks every worker
// at once too and waits for every answer. With none that can serve, the first worker's reason.
TEST_F(RouterTest, WorkerStatsAskEveryWorkerAtOnce) {
  using std::chrono::milliseconds;
  FakeAttention ready(1000), not_ready(1000, /*fail_from=*/0);
  {
    SilentAttention silent(1000);
    auto router = Make({&silent, &ready});
    ASSERT_NE(router, nullptr);
    silent.Silence();
    auto health = std::async(std::launch::async, [&] { return router->SomeWorkerCanServe(); });
    const bool answered = health.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
    if (!answered) silent.Answer(absl::UnavailableError("late"));
    ASSERT_TRUE(answered) << "GET /health waited for the worker that does not answer";
    EXPECT_TRUE(health.get().ok());
    auto all = std::async(std::launch::async, [&] { return router->WorkerStats(); });
    EXPECT_EQ(all.wait_for(milliseconds(200)), std::future_status::timeout);
    // Both rounds asked it; the first round's answer comes after its caller stopped waiting.
    EXPECT_EQ(silent.Answer(absl::DeadlineExceededError("Deadline Exceeded")), 2u);
    const auto stats = all.get();
    ASSERT_EQ(stats.size(), 2u);
    EXPECT_EQ(stats[0].status().code(), absl::StatusCode::kDeadlineExceeded);
    ASSERT_TRUE(stats[1].ok()) << stats[1].status();
    EXPECT_EQ(stats[1]->kv_capacity_tokens(), 1000);
  }
  {
    SilentAttention silent(1000);
    auto router = Make({&silent, &not_ready});
    ASSERT_NE(router, nullptr);
    silent.Silence();
    auto health = std::async(std::launch::async, [&] { return router->SomeWorkerCanServe(); });
    EXPECT_EQ(health.wait_for(milliseconds(200)), std::future_status::timeout);  // no one can yet
    EXPECT_EQ(silent.Answer(absl::UnavailableError("attention worker A: stopped")), 1u);
    const absl::Status st = health.get();
    EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
    EXPECT_EQ(st.message(), "UNAVAILABLE: attention worker A: stopped");
    // A worker that answers but cannot serve: its not_ready.
    auto router2 = Make({&not_ready});
    ASSERT_NE(router2, nullptr);
    EXPECT_EQ(router2->SomeWorkerCanServe().message(), "expert down");
  }
}

// Two routers over the same worker (a rolling update: the new one starts while the old one
// drains; or one restarted after the other was killed) give their sequences distinct ids, so
// neither takes over the other's KV cache. Ids stay below 2^63 (the worker's own above).
TEST_F(RouterTest, RoutersOverTheSameWorkerUseDistinctSequenceIds) {
  FakeAttention a(1000);
  auto first = Make({&a});
  auto second = Make({&a});
  ASSERT_NE(first, nullptr);
  ASSERT_NE(second, nullptr);
  std::vector<Sink> sinks(2);
  auto id1 = first->Submit(Request(5, 4), &sinks[0]);
  auto id2 = second->Submit(Request(7, 4), &sinks[1]);
  ASSERT_TRUE(id1.ok() && id2.ok());
  for (Sink& s : sinks) ASSERT_TRUE(s.Wait().ok());
  EXPECT_NE(*id1, *id2);
  EXPECT_EQ(a.seqs(), std::set<uint64_t>({*id1, *id2}));
  EXPECT_EQ(a.kv(*id1), FinishedCache(5, 4));
  EXPECT_EQ(a.kv(*id2), FinishedCache(7, 4));
  EXPECT_LT(std::max(*id1, *id2), uint64_t{1} << 63);
}

// A worker that holds another router's sequences (two routers over the same workers in a rolling
// update) refuses steps it has no KV room for: their requests go back to the queue and start
// again once there is room, rather than fail; meanwhile the router admits around the other
// router's rows, as the worker reports them, and stops counting them once they are released.
TEST_F(RouterTest, RequestsAWorkerHasNoKvRoomForWaitForRoom) {
  FakeAttention a(100);
  auto router = Make({&a});  // nothing foreign when it starts
  ASSERT_NE(router, nullptr);
  a.LimitRows(/*foreign=*/60);  // then another router's sequences take 60 rows
  a.Hold();
  std::vector<Sink> sinks(4);
  std::vector<uint64_t> ids;
  ASSERT_NO_FATAL_FAILURE(SubmitAll(*router, Request(5, 20), &sinks, &ids));
  EXPECT_EQ(router->counters().running, 4);  // 4 x 25 reserved of 100: all admitted at first
  a.Open();
  for (Sink& s : sinks) {
    ASSERT_TRUE(s.Wait().ok());
    EXPECT_EQ(s.ids(), std::vector<int32_t>(20, kToken));
  }
  const Router::Counters c = router->counters();
  EXPECT_GT(a.refusals(), 0);
  EXPECT_GT(c.requeued_no_room, 0);
  EXPECT_EQ(c.failed, 0);
  EXPECT_EQ(c.queue_time.count(), 4);  // each request's first admission only
  EXPECT_LE(a.max_used(), 100);
  // Each started over with its prompt and its tokens so far, at consecutive positions.
  for (uint64_t id : ids) EXPECT_EQ(a.kv(id), FinishedCache(5, 20)) << "sequence " << id;
  EXPECT_EQ(c.kv_foreign_per_worker, std::vector<int64_t>({60}));  // asked since
  const std::string text = PrometheusMetrics(c);
  for (const std::string& line :
       {absl::StrCat("moemesh_requests_requeued_no_room_total ", c.requeued_no_room, "\n"),
        std::string("moemesh_kv_cache_foreign_tokens{worker=\"0\"} 60\n")}) {
    EXPECT_NE(text.find(line), std::string::npos) << line << " not in\n" << text;
  }
  // The other router's sequences end: within a few polls the router no longer counts them.
  a.LimitRows(0);
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (router->counters().kv_foreign_per_worker[0] != 0 &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(router->counters().kv_foreign_per_worker[0], 0);
}

// A router started while a worker holds other sequences' rows (a killed router's, until the
// worker releases them; another router's) admits only what fits beside them, so that the worker
// refuses nothing, and takes the rest once those rows are gone.
TEST_F(RouterTest, AdmitsAroundRowsAWorkerHoldsForOthers) {
  FakeAttention a(2000);
  a.LimitRows(/*foreign=*/1090);
  a.SetStepDelay(5);  // the first request lasts 4.5 s
  auto router = Make({&a});
  ASSERT_NE(router, nullptr);
  EXPECT_EQ(router->counters().kv_foreign_per_worker, std::vector<int64_t>({1090}));
  Sink first, second;
  auto long_id = router->Submit(Request(5, 900), &first);  // 905 of the 910 left
  ASSERT_TRUE(long_id.ok());
  ASSERT_TRUE(router->Submit(Request(5, 900), &second).ok());
  Router::Counters c = router->counters();
  EXPECT_EQ(c.running, 1);
  EXPECT_EQ(c.waiting, 1);
  a.LimitRows(0);  // released: the second is admitted beside the first, which still runs
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  while (router->counters().running < 2 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(router->counters().running, 2);
  EXPECT_FALSE(first.done());
  a.SetStepDelay(0);
  router->Cancel(*long_id);
  ASSERT_TRUE(first.Wait().ok());
  ASSERT_TRUE(second.Wait().ok());
  EXPECT_EQ(second.ids().size(), 900u);
  EXPECT_EQ(a.refusals(), 0);
  EXPECT_EQ(router->counters().requeued_no_room, 0);
}

// A router started again under its name (killed, then restarted) has each worker free at once
// the sequences its earlier run left, and admits against the whole cache; another router's
// sequences stay, and are admitted around. Its own steps carry its name and run.
TEST_F(RouterTest, ARouterStartedAgainFreesWhatItsEarlierRunLeft) {
  FakeAttention a(1000);
  a.LimitRows(0);
  RouterOptions opt;
  opt.name = "host/127.0.0.1:1";
  // The earlier run (an id no run takes: runs are below 2^31) and another router each left a
  // 400-row sequence, as their steps would have.
  for (const auto& [id, router] : {std::make_pair(uint64_t{1}, opt.name),
                                   std::make_pair(uint64_t{2}, std::string("host/127.0.0.1:2"))}) {
    wire::StepRequest req;
    req.set_router(router);
    req.set_router_run(uint64_t{1} << 31);
    wire::SeqStep* s = req.add_seqs();
    s->set_seq_id(id);
    s->set_new_sequence(true);
    for (int i = 0; i < 400; ++i) s->add_tokens(10);
    wire::StepResponse resp;
    ASSERT_TRUE(a.Step(req, &resp).ok());
  }
  ASSERT_EQ(a.GetStats()->kv_used_tokens(), 800);
  auto router = Router::Create(tok_.get(), cfg_, gen_, {&a}, opt);
  ASSERT_TRUE(router.ok()) << router.status();
  EXPECT_EQ(a.GetStats()->kv_used_tokens(), 400);
  EXPECT_EQ((*router)->counters().kv_foreign_per_worker, std::vector<int64_t>({400}));
  // 550 rows fit beside the other router's 400 (not beside the earlier run's 400 as well).
  Sink sink;
  auto id = (*router)->Submit(Request(50, 500), &sink);
  ASSERT_TRUE(id.ok());
  EXPECT_EQ((*router)->counters().running, 1);
  ASSERT_TRUE(sink.Wait().ok());
  EXPECT_EQ(sink.ids().size(), 500u);
  EXPECT_EQ(a.refusals(), 0);
  EXPECT_EQ(a.owner(*id), std::make_pair(opt.name, *id >> 32));
}

// A worker that no longer has a running sequence (restarted between two steps, or it released
// the sequence as idle while the router was stopped) answers "unknown sequence": the request
// starts again from the queue, replaying its tokens, as a moved one does, and ends with all of
// them; past --max_moves it fails with that error.
TEST_F(RouterTest, RequestsWhoseSequenceTheWorkerLostStartAgain) {
  FakeAttention a(1000);
  a.ForgetAtStep(6);
  auto router = Make({&a});
  ASSERT_NE(router, nullptr);
  a.Hold();
  std::vector<Sink> sinks(2);
  std::vector<uint64_t> ids;
  ASSERT_NO_FATAL_FAILURE(SubmitAll(*router, Request(5, 30), &sinks, &ids));
  a.Open();
  for (Sink& s : sinks) {
    ASSERT_TRUE(s.Wait().ok());
    EXPECT_EQ(s.ids(), std::vector<int32_t>(30, kToken));
  }
  EXPECT_EQ(router->counters().moved, 2);
  EXPECT_EQ(router->counters().failed, 0);
  for (uint64_t id : ids) EXPECT_EQ(a.kv(id), FinishedCache(5, 30)) << "sequence " << id;

  RouterOptions no_moves;
  no_moves.max_moves = 0;
  FakeAttention b(1000);
  b.ForgetAtStep(3);
  auto strict = Router::Create(tok_.get(), cfg_, gen_, {&b}, no_moves);
  ASSERT_TRUE(strict.ok()) << strict.status();
  Sink sink;
  ASSERT_TRUE((*strict)->Submit(Request(5, 30), &sink).ok());
  const absl::Status st = sink.Wait();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("unknown sequence"), absl::string_view::npos) << st;
}

TEST_F(RouterTest, JsonSchemaIsCheckedAtSubmitAndSentToTheWorker) {
  FakeAttention a(1000);
  auto router = Make({&a});
  ASSERT_NE(router, nullptr);
  auto request = [](const std::string& schema, moemesh::v1::ResponseFormat format) {
    moemesh::v1::GenerateRequest r = Request(5, 3);
    r.mutable_sampling()->clear_ignore_eos();
    r.mutable_sampling()->set_response_format(format);
    r.mutable_sampling()->set_json_schema(schema);
    return r;
  };
  const std::string good = R"({"type": "object", "properties": {"a": {"type": "integer"}}})";
  struct Bad {
    std::string schema;
    moemesh::v1::ResponseFormat format;
    const char* word;
  };
  for (const Bad& b : std::vector<Bad>{
           {R"({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}})",
            moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA, "format \"email\" is not supported"},
           {"", moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA, "not JSON"},
           {good, moemesh::v1::RESPONSE_FORMAT_TEXT, "json_schema"},
           {good, moemesh::v1::RESPONSE_FORMAT_JSON_OBJECT, "json_schema"}}) {
    Sink sink;
    auto id = router->Submit(request(b.schema, b.format), &sink);
    ASSERT_FALSE(id.ok()) << b.schema;
    EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(id.status().message().find(b.word), std::string::npos) << id.status();
  }
  moemesh::v1::GenerateRequest with_eos = request(good, moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA);
  with_eos.mutable_sampling()->set_ignore_eos(true);
  Sink refused;
  EXPECT_EQ(router->Submit(with_eos, &refused).status().code(), absl::StatusCode::kInvalidArgument);
  Sink sink;
  auto id = router->Submit(request(good, moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA), &sink);
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(sink.Wait().ok());
  const wire::SeqStep first = a.first(*id);
  EXPECT_EQ(first.sampling().response_format(), moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA);
  EXPECT_EQ(first.sampling().json_schema(), good);
  EXPECT_GT(first.end_ids_size(), 0);
}

// min_tokens and logit_bias: checked at Submit (by field name), sent to the worker with the end
// tokens min_tokens holds back.
TEST_F(RouterTest, MinTokensAndLogitBiasAreCheckedAndSent) {
  FakeAttention a(1000);
  auto router = Make({&a});
  ASSERT_NE(router, nullptr);
  auto refused = [&](moemesh::v1::GenerateRequest r, const char* field) {
    Sink sink;
    auto id = router->Submit(r, &sink);
    ASSERT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(id.status().message().find(field), std::string::npos) << id.status();
  };
  moemesh::v1::GenerateRequest r = Request(5, 4);
  r.mutable_sampling()->set_min_tokens(5);  // more than max_tokens
  refused(r, "min_tokens");
  r = Request(5, 4);
  r.mutable_sampling()->set_min_tokens(-1);
  refused(r, "min_tokens");
  r = Request(5, 4);
  r.mutable_sampling()->clear_ignore_eos();
  r.mutable_sampling()->set_min_tokens(2);
  r.mutable_sampling()->set_response_format(moemesh::v1::RESPONSE_FORMAT_JSON_OBJECT);
  refused(r, "min_tokens");
  r = Request(5, 4);
  (*r.mutable_sampling()->mutable_logit_bias())[static_cast<int32_t>(cfg_.vocab_size)] = 1;
  refused(r, "logit_bias");
  r = Request(5, 4);
  (*r.mutable_sampling()->mutable_logit_bias())[3] = 101;
  refused(r, "logit_bias");

  r = Request(5, 4);
  r.mutable_sampling()->clear_ignore_eos();
  r.mutable_sampling()->set_min_tokens(4);
  r.mutable_sampling()->add_stop_token_ids(kToken);
  (*r.mutable_sampling()->mutable_logit_bias())[kToken] = -100;
  Sink sink;
  auto id = router->Submit(r, &sink);
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(sink.Wait().ok());
  const wire::SeqStep first = a.first(*id);
  EXPECT_EQ(first.sampling().min_tokens(), 4);
  EXPECT_EQ(first.sampling().logit_bias().at(kToken), -100);
  // The end tokens: the stop token id and the model's EOS.
  std::set<int32_t> ends(first.end_ids().begin(), first.end_ids().end());
  EXPECT_TRUE(ends.count(kToken));
  for (int32_t eos : cfg_.eos_token_ids) EXPECT_TRUE(ends.count(eos)) << eos;
}

// Drain (graceful shutdown): new requests are refused with UNAVAILABLE, accepted ones (running
// or still waiting) run to their end; WaitIdle says when they have.
TEST_F(RouterTest, DrainRefusesNewRequestsAndFinishesAcceptedOnes) {
  FakeAttention a(1000);
  a.Hold();
  RouterOptions opt;
  opt.max_running = 1;  // the second request waits
  auto r = Router::Create(tok_.get(), cfg_, gen_, {&a}, opt);
  ASSERT_TRUE(r.ok()) << r.status();
  Router& router = **r;
  std::vector<Sink> sinks(2);
  for (Sink& s : sinks) ASSERT_TRUE(router.Submit(Request(5, 10), &s).ok());
  EXPECT_FALSE(router.draining());
  router.Drain();
  EXPECT_TRUE(router.draining());
  Sink late;
  auto refused = router.Submit(Request(5, 10), &late);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
  EXPECT_FALSE(router.WaitIdle(std::chrono::milliseconds(50)));  // held: still running
  EXPECT_EQ(router.counters().refused_draining, 1);
  EXPECT_TRUE(router.counters().draining);
  const std::string text = PrometheusMetrics(router.counters());
  EXPECT_NE(text.find("moemesh_draining 1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("moemesh_requests_rejected_total{reason=\"draining\"} 1\n"),
            std::string::npos);
  a.Open();
  EXPECT_TRUE(router.WaitIdle(std::chrono::seconds(30)));
  for (Sink& s : sinks) {
    ASSERT_TRUE(s.Wait().ok());
    EXPECT_EQ(s.ids(), std::vector<int32_t>(10, kToken));
  }
  EXPECT_EQ(router.counters().submitted, 2);
}

// Priority: waiting requests are admitted lowest priority value first, equal ones in arrival
// order; the running one is not preempted.
TEST_F(RouterTest, WaitingRequestsAreAdmittedByPriorityThenArrival) {
  FakeAttention a(1000);
  a.Hold();
  RouterOptions opt;
  opt.max_running = 1;
  auto r = Router::Create(tok_.get(), cfg_, gen_, {&a}, opt);
  ASSERT_TRUE(r.ok()) << r.status();
  Router& router = **r;
  const std::vector<int32_t> priorities = {3, 5, 0, 5, -2, 0};  // the first runs at once
  std::vector<Sink> sinks(priorities.size());
  std::vector<uint64_t> ids;
  for (size_t i = 0; i < priorities.size(); ++i) {
    moemesh::v1::GenerateRequest req = Request(4, 3);
    req.set_priority(priorities[i]);
    auto id = router.Submit(req, &sinks[i]);
    ASSERT_TRUE(id.ok()) << id.status();
    ids.push_back(*id);
  }
  a.Open();
  for (Sink& s : sinks) ASSERT_TRUE(s.Wait().ok());
  EXPECT_EQ(a.order(), std::vector<uint64_t>({ids[0], ids[4], ids[2], ids[5], ids[1], ids[3]}));
}

// --think_tokens: markers resolve through the tokenizer; the default (<think>, </think>) is
// optional, named markers are not.
TEST_F(RouterTest, ThinkTokensResolveOrAreRefused) {
  const int32_t open = *tok_->TokenToId("("), close = *tok_->TokenToId(")");
  auto ids = ThinkTokenIds(*tok_, cfg_, "(,)");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, std::make_pair(open, close));
  ids = ThinkTokenIds(*tok_, cfg_, "");  // this tokenizer has no <think>
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, std::make_pair(-1, -1));
  for (const char* bad : {"(,zzzq", "(", "(,(", ",)", "(,),x"}) {
    ids = ThinkTokenIds(*tok_, cfg_, bad);
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(ids.status().message().find("--think_tokens"), std::string::npos) << bad;
  }
  EXPECT_NE(ThinkTokenIds(*tok_, cfg_, "(,zzzq").status().message().find("'zzzq'"),
            std::string::npos);
  FakeAttention a(1000);
  RouterOptions opt;
  opt.think_tokens = "(,zzzq";
  EXPECT_EQ(Router::Create(tok_.get(), cfg_, gen_, {&a}, opt).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A request's thinking budget: refused without markers or below 0; otherwise the first step of
// its sequence carries the markers' ids (the worker's sampler forces the end), others none.
TEST_F(RouterTest, ThinkingBudgetSendsTheMarkersWithTheFirstStep) {
  FakeAttention a(1000);
  auto plain = Make({&a});
  ASSERT_NE(plain, nullptr);
  moemesh::v1::GenerateRequest budget = Request(5, 3);
  budget.mutable_sampling()->set_thinking_budget(4);
  Sink refused;
  absl::StatusOr<uint64_t> st = plain->Submit(budget, &refused);
  EXPECT_EQ(st.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.status().message().find("thinking_budget"), std::string::npos);

  FakeAttention b(1000);
  RouterOptions opt;
  opt.think_tokens = "(,)";
  auto r = Router::Create(tok_.get(), cfg_, gen_, {&b}, opt);
  ASSERT_TRUE(r.ok()) << r.status();
  moemesh::v1::GenerateRequest negative = budget;
  negative.mutable_sampling()->set_thinking_budget(-1);
  EXPECT_EQ((*r)->Submit(negative, &refused).status().code(), absl::StatusCode::kInvalidArgument);
  Sink with, without;
  auto id_with = (*r)->Submit(budget, &with);
  ASSERT_TRUE(id_with.ok()) << id_with.status();
  auto id_without = (*r)->Submit(Request(5, 3), &without);
  ASSERT_TRUE(id_without.ok()) << id_without.status();
  ASSERT_TRUE(with.Wait().ok());
  ASSERT_TRUE(without.Wait().ok());
  EXPECT_EQ(b.think(*id_with), std::make_pair(*tok_->TokenToId("("), *tok_->TokenToId(")")));
  EXPECT_EQ(b.think(*id_without), std::make_pair(0, 0));
}

TEST_F(RouterTest, UnseededRequestsGetDistinctSeedsAndSeededKeepTheirs) {
  FakeAttention a(1000);
  auto r = Make({&a});
  ASSERT_NE(r, nullptr);
  moemesh::v1::GenerateRequest seeded = Request(5, 2);
  seeded.mutable_sampling()->set_seed(1234);
  Sink s1, s2, s3;
  auto unseeded1 = r->Submit(Request(5, 2), &s1);
  auto unseeded2 = r->Submit(Request(5, 2), &s2);
  auto with_seed = r->Submit(seeded, &s3);
  ASSERT_TRUE(unseeded1.ok() && unseeded2.ok() && with_seed.ok());
  ASSERT_TRUE(s1.Wait().ok());
  ASSERT_TRUE(s2.Wait().ok());
  ASSERT_TRUE(s3.Wait().ok());
  ASSERT_TRUE(a.seed(*unseeded1).has_value());
  ASSERT_TRUE(a.seed(*unseeded2).has_value());
  EXPECT_NE(*a.seed(*unseeded1), *a.seed(*unseeded2));
  EXPECT_EQ(a.seed(*with_seed), std::optional<uint64_t>(1234));
  // Another router (another process) draws other seeds.
  FakeAttention b(1000);
  auto other = Make({&b});
  ASSERT_NE(other, nullptr);
  Sink s4;
  auto id = other->Submit(Request(5, 2), &s4);
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(s4.Wait().ok());
  ASSERT_TRUE(b.seed(*id).has_value());
  EXPECT_NE(*b.seed(*id), *a.seed(*unseeded1));
}

TEST_F(RouterTest, NoWorkerIsAnError) {
  auto r = Router::Create(tok_.get(), cfg_, gen_, std::vector<AttentionClient*>{}, RouterOptions());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moemesh
