// The dispatcher over several in-process expert shards against the single-shard computation.
#include "mesh/expert_dispatch.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <random>

#include "engine/arch.h"
#include "engine/config.h"
#include "engine/model.h"
#include "gtest/gtest.h"
#include "mesh/placement.h"

namespace moemesh {
namespace {

constexpr char kDir[] = "testdata/oracle/qwen3_moe";

// A transport that fails every call (a dead worker).
class DeadTransport : public ExpertTransport {
 public:
  void RunExpertsAsync(const wire::RunExpertsRequest*, wire::RunExpertsResponse*,
                       std::function<void(absl::Status)> done) override {
    done(absl::UnavailableError("connection refused"));
  }
  std::string name() const override { return "dead"; }
};

// A worker that can be made to fail (down) or to answer again, counting the calls and probes it
// gets.
class SwitchedTransport : public ExpertTransport {
 public:
  SwitchedTransport(const ExpertShard* shard, int64_t hidden) : local_(shard, hidden, "switched") {}
  void RunExpertsAsync(const wire::RunExpertsRequest* req, wire::RunExpertsResponse* resp,
                       std::function<void(absl::Status)> done) override {
    ++calls;
    if (down) {
      done(absl::UnavailableError("connection refused"));
    } else {
      local_.RunExpertsAsync(req, resp, std::move(done));
    }
  }
  std::string name() const override { return "switched"; }
  void ProbeAsync(std::function<void(absl::Status)> done) override {
    ++probes;
    done(down ? absl::UnavailableError("connection refused") : absl::OkStatus());
  }

  std::atomic<bool> down{false};
  std::atomic<int> calls{0}, probes{0};

 private:
  LocalExpertTransport local_;
};

class DispatchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto cfg = ModelConfig::FromFile(std::string(kDir) + "/config.json");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    cfg_ = *cfg;
    auto arch = ArchFor(cfg_);
    ASSERT_TRUE(arch.ok());
    arch_ = *arch;
    auto ckpt = CheckpointReader::Open(kDir);
    ASSERT_TRUE(ckpt.ok());
    ckpt_ = std::move(*ckpt);
    auto all = ExpertShard::Load(*ckpt_, cfg_, arch_, {}, LoadOptions{});
    ASSERT_TRUE(all.ok()) << all.status();
    all_ = std::move(*all);
    for (int w = 0; w < 2; ++w) {
      auto s = ExpertShard::Load(*ckpt_, cfg_, arch_, EvenShare(cfg_, w, 2), LoadOptions{});
      ASSERT_TRUE(s.ok()) << s.status();
      halves_.push_back(std::move(*s));
    }
    // Random routed rows.
    std::mt19937 rng(5);
    std::normal_distribution<float> g;
    x_.resize(n_ * h());
    for (float& v : x_) v = g(rng);
    for (int64_t r = 0; r < n_; ++r) {
      std::vector<int32_t> perm(cfg_.num_experts);
      for (int i = 0; i < cfg_.num_experts; ++i) perm[i] = i;
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int j = 0; j < k_; ++j) {
        ids_.push_back(perm[j]);
        w_.push_back(0.1f + 0.2f * j);
      }
    }
    ids_[3] = -1;  // an empty slot
    want_.assign(n_ * h(), 0.0f);
    ASSERT_TRUE(all_->RunExperts(1, x_.data(), n_, ids_.data(), w_.data(), k_, want_.data()).ok());
  }
  int64_t h() const { return cfg_.hidden_size; }
  void ExpectClose(const std::vector<float>& got) {
    double err = 0, mag = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      err = std::max(err, static_cast<double>(std::abs(got[i] - want_[i])));
      mag = std::max(mag, static_cast<double>(std::abs(want_[i])));
    }
    EXPECT_GT(mag, 0.1);
    EXPECT_LT(err, 1e-5 * mag);
  }

  ModelConfig cfg_;
  ArchSpec arch_;
  std::unique_ptr<CheckpointReader> ckpt_;
  std::unique_ptr<ExpertShard> all_;
  std::vector<std::unique_ptr<ExpertShard>> halves_;
  const int64_t n_ = 9, k_ = 3;
  std::vector<float> x_, w_, want_;
  std::vector<int32_t> ids_;
};

TEST_F(DispatchTest, TwoWorkersMatchOneShard) {
  std::vector<ExpertWorkerHandle> ws;
  for (int w = 0; w < 2; ++w) {
    ws.push_back({std::make_unique<LocalExpertTransport>(halves_[w].get(), h(), "w"),
                  halves_[w]->shards()});
  }
  ExpertDispatcher d(std::move(ws), h(), wire::DTYPE_F32);
  std::vector<float> out(n_ * h(), 0.0f);
  ASSERT_TRUE(d.RunExperts(1, x_.data(), n_, ids_.data(), w_.data(), k_, out.data()).ok());
  ExpectClose(out);
  EXPECT_EQ(d.calls(), 2);  // one call per worker for the layer
}

TEST_F(DispatchTest, Bf16WireIsCloseToExact) {
  std::vector<ExpertWorkerHandle> ws;
  ws.push_back({std::make_unique<LocalExpertTransport>(all_.get(), h(), "w"), all_->shards()});
  ExpertDispatcher d(std::move(ws), h(), wire::DTYPE_BF16);
  std::vector<float> out(n_ * h(), 0.0f);
  ASSERT_TRUE(d.RunExperts(1, x_.data(), n_, ids_.data(), w_.data(), k_, out.data()).ok());
  double err = 0, mag = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    err = std::max(err, static_cast<double>(std::abs(out[i] - want_[i])));
    mag = std::max(mag, static_cast<double>(std::abs(want_[i])));
  }
  EXPECT_LT(err, 2e-2 * mag);
  EXPECT_GT(err, 0.0);  // really went through bf16
}

TEST_F(DispatchTest, FailsOverToReplicaAndReportsWhenNoneLeft) {
  std::vector<ExpertWorkerHandle> ws;
  ws.push_back({std::make_unique<DeadTransport>(), all_->shards()});
  ws.push_back({std::make_unique<LocalExpertTransport>(all_.get(), h(), "replica"), all_->shards()});
  ExpertDispatcher d(std::move(ws), h(), wire::DTYPE_F32);
  std::vector<float> out(n_ * h(), 0.0f);
  ASSERT_TRUE(d.RunExperts(1, x_.data(), n_, ids_.data(), w_.data(), k_, out.data()).ok());
  ExpectClose(out);
  EXPECT_EQ(d.failovers(), 1);

  std::vector<ExpertWorkerHandle> lone;
  lone.push_back({std::make_unique<DeadTransport>(), halves_[0]->shards()});
  lone.push_back({std::make_unique<LocalExpertTransport>(halves_[1].get(), h(), "w1"),
                  halves_[1]->shards()});
  ExpertDispatcher d2(std::move(lone), h(), wire::DTYPE_F32);
  std::fill(out.begin(), out.end(), 0.0f);
  absl::Status st = d2.RunExperts(1, x_.data(), n_, ids_.data(), w_.data(), k_, out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(st.message().find("dead"), std::string::npos);
}

TEST_F(DispatchTest, ADownWorkerGetsNoRowsUntilAProbeFindsItAnswering) {
  std::vector<ExpertWorkerHandle> ws;
  auto sw = std::make_unique<SwitchedTransport>(all_.get(), h());
  SwitchedTransport* s = sw.get();
  ws.push_back({std::move(sw), all_->shards()});
  ws.push_back({std::make_unique<LocalExpertTransport>(all_.get(), h(), "replica"), all_->shards()});
  auto now = std::chrono::steady_clock::now();  // the dispatcher's clock, moved by hand
  ExpertDispatcher d(std::move(ws), h(), wire::DTYPE_F32, [&now] { return now; });
  auto run = [&]() {
    std::vector<float> out(n_ * h(), 0.0f);
    ASSERT_TRUE(d.RunExperts(1, x_.data(), n_, ids_.data(), w_.data(), k_, out.data()).ok());
    ExpectClose(out);
  };
  auto after = [&now](std::chrono::steady_clock::time_point t, double seconds) {
    now = t + std::chrono::milliseconds(static_cast<int>(seconds * 1000));
  };
  run();  // both up: the rows are shared
  EXPECT_EQ(s->calls, 1);
  EXPECT_TRUE(d.down_workers().empty());

  s->down = true;
  auto failed_at = now;
  run();  // fails; its rows go to the replica
  EXPECT_EQ(s->calls, 2);
  EXPECT_EQ(d.failovers(), 1);
  EXPECT_EQ(d.down_workers(), std::vector<std::string>{"switched"});
  after(failed_at, ExpertDispatcher::kFirstRetrySeconds - 0.001);
  run();  // passed over, not probed yet
  EXPECT_EQ(s->calls, 2);
  EXPECT_EQ(s->probes, 0);
  after(failed_at, ExpertDispatcher::kFirstRetrySeconds);
  failed_at = now;
  run();  // probed (it fails: still down), no rows
  EXPECT_EQ(s->probes, 1);
  EXPECT_EQ(s->calls, 2);
  EXPECT_EQ(d.down_workers(), std::vector<std::string>{"switched"});

  s->down = false;  // back, but not probed again before twice the first interval
  after(failed_at, 2 * ExpertDispatcher::kFirstRetrySeconds - 0.001);
  run();
  EXPECT_EQ(s->probes, 1);
  EXPECT_EQ(s->calls, 2);
  after(failed_at, 2 * ExpertDispatcher::kFirstRetrySeconds);
  run();  // the probe answers: it is up again
  EXPECT_EQ(s->probes, 2);
  EXPECT_TRUE(d.down_workers().empty());
  const int calls = s->calls;
  run();
  EXPECT_EQ(s->calls, calls + 1);
  EXPECT_EQ(d.failovers(), 1);
}

// Unavailable (what the attention worker's GetStats reports as not_ready) names a down worker only
// while it holds experts no worker up holds, and asking it starts the probes that are due.
TEST_F(DispatchTest, UnavailableNamesDownWorkersWhoseExpertsNoOneElseServes) {
  for (bool replicated : {false, true}) {
    SCOPED_TRACE(replicated);
    std::vector<ExpertWorkerHandle> ws;
    auto sw = std::make_unique<SwitchedTransport>(halves_[0].get(), h());
    SwitchedTransport* s = sw.get();
    ws.push_back({std::move(sw), halves_[0]->shards()});
    ExpertShard* other = replicated ? all_.get() : halves_[1].get();
    ws.push_back({std::make_unique<LocalExpertTransport>(other, h(), "other"), other->shards()});
    auto now = std::chrono::steady_clock::now();
    ExpertDispatcher d(std::move(ws), h(), wire::DTYPE_F32, [&now] { return now; });
    EXPECT_EQ(d.Unavailable(), "");
    s->down = true;
    std::vector<float> out(n_ * h(), 0.0f);
    EXPECT_EQ(d.RunExperts(1, x_.data(), n_, ids_.data(), w_.data(), k_, out.data()).ok(),
              replicated);
    EXPECT_EQ(d.down_workers(), std::vector<std::string>{"switched"});
    if (replicated) {
      EXPECT_EQ(d.Unavailable(), "");
      continue;
    }
    EXPECT_NE(d.Unavailable().find("expert worker switched down"), std::string::npos)
        << d.Unavailable();
    EXPECT_EQ(s->probes, 0);  // not due yet
    s->down = false;
    now += std::chrono::milliseconds(static_cast<int>(ExpertDispatcher::kFirstRetrySeconds * 1000));
    EXPECT_EQ(d.Unavailable(), "");  // the probe it started found the worker answering
    EXPECT_EQ(s->probes, 1);
    EXPECT_TRUE(d.down_workers().empty());
  }
}

TEST_F(DispatchTest, ShardRejectsExpertsItDoesNotHold) {
  wire::RunExpertsRequest req;
  wire::RunExpertsResponse resp;
  req.set_layer(1);
  EncodeFloats(x_.data(), n_, h(), wire::DTYPE_F32, req.mutable_x());
  EncodeInts(ids_.data(), n_, k_, req.mutable_ids());
  EncodeFloats(w_.data(), n_, k_, wire::DTYPE_F32, req.mutable_weights());
  EXPECT_EQ(RunExpertsOnShard(*halves_[0], h(), req, &resp).code(),
            absl::StatusCode::kFailedPrecondition);
  req.set_layer(7);
  EXPECT_EQ(RunExpertsOnShard(*all_, h(), req, &resp).code(), absl::StatusCode::kInvalidArgument);
  req.set_layer(1);
  req.mutable_x()->mutable_data()->resize(10);
  EXPECT_EQ(RunExpertsOnShard(*all_, h(), req, &resp).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moemesh
