// The router's scheduling over several attention workers (data parallel), with fake workers: a
// unit test of the Router class alone (the real workers are tests/cluster_test.py's).
#include "router/router.h"

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "engine/config.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"

namespace moemesh {
namespace {

constexpr char kModel[] = "models/pydoc-moe-17m";
constexpr int32_t kToken = 100;  // what the fake workers sample

// Answers every step with kToken for each sequence that samples; or fails every step.
class FakeAttention : public AttentionClient {
 public:
  explicit FakeAttention(int64_t kv_capacity, bool fail = false) : kv_capacity_(kv_capacity), fail_(fail) {}
  absl::Status Step(const wire::StepRequest& req, wire::StepResponse* resp) override {
    std::unique_lock<std::mutex> l(mu_);
    gate_.wait(l, [&] { return open_; });
    ++steps_;
    for (const wire::SeqStep& s : req.seqs()) seqs_.insert(s.seq_id());
    if (fail_) return absl::UnavailableError("worker down");
    for (const wire::SeqStep& s : req.seqs()) {
      wire::SeqResult* r = resp->add_results();
      r->set_sampled(s.sample());
      if (s.sample()) r->set_token(kToken);
    }
    return absl::OkStatus();
  }
  absl::Status Release(const std::vector<uint64_t>& ids) override {
    std::lock_guard<std::mutex> l(mu_);
    released_ += static_cast<int64_t>(ids.size());
    return absl::OkStatus();
  }
  absl::StatusOr<wire::Stats> GetStats() override {
    wire::Stats s;
    s.set_kv_capacity_tokens(kv_capacity_);
    return s;
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

 private:
  const int64_t kv_capacity_;
  const bool fail_;
  mutable std::mutex mu_;
  std::condition_variable gate_;
  bool open_ = true;
  int64_t steps_ = 0, released_ = 0;
  std::set<uint64_t> seqs_;
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

// A worker whose steps fail fails its own requests only; the other worker's complete.
TEST_F(RouterTest, AFailingWorkerFailsOnlyItsRequests) {
  FakeAttention good(1000), bad(1000, /*fail=*/true);
  good.Hold();
  bad.Hold();
  auto router = Make({&good, &bad});
  ASSERT_NE(router, nullptr);
  std::vector<Sink> sinks(4);
  for (Sink& s : sinks) ASSERT_TRUE(router->Submit(Request(5, 30), &s).ok());
  good.Open();
  bad.Open();
  int ok = 0, unavailable = 0;
  for (Sink& s : sinks) {
    absl::Status st = s.Wait();
    if (st.ok()) {
      ++ok;
      EXPECT_EQ(s.ids().size(), 30u);
    } else {
      EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
      ++unavailable;
    }
  }
  EXPECT_EQ(ok, static_cast<int>(good.seqs().size()));
  EXPECT_EQ(unavailable, static_cast<int>(bad.seqs().size()));
  EXPECT_EQ(ok, 2);  // admitted alternately (equal free KV cache: the first worker first)
  EXPECT_EQ(unavailable, 2);
}

TEST_F(RouterTest, NoWorkerIsAnError) {
  auto r = Router::Create(tok_.get(), cfg_, gen_, std::vector<AttentionClient*>{}, RouterOptions());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moemesh
