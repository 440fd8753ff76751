#include "mesh/expert_dispatch.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <iostream>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace moemesh {

absl::Status RunExpertsOnShard(const ExpertShard& shard, int64_t hidden,
                               const wire::RunExpertsRequest& req, wire::RunExpertsResponse* resp) {
  int64_t n = -1, h = hidden;
  std::vector<float> x;
  absl::Status st = DecodeFloats(req.x(), "x", &n, &h, &x);
  if (!st.ok()) return st;
  if (req.ids().shape_size() != 2) return absl::InvalidArgumentError("tensor 'ids' must be [n, k]");
  const int64_t k = req.ids().shape(1);
  std::vector<int32_t> ids;
  st = DecodeInts(req.ids(), "ids", n, k, &ids);
  if (!st.ok()) return st;
  int64_t wn = n, wk = k;
  std::vector<float> w;
  st = DecodeFloats(req.weights(), "weights", &wn, &wk, &w);
  if (!st.ok()) return st;
  std::vector<float> out(n * hidden, 0.0f);
  st = shard.RunExperts(req.layer(), x.data(), n, ids.data(), w.data(), k, out.data());
  if (!st.ok()) return st;
  EncodeFloats(out.data(), n, hidden, req.x().dtype() == wire::DTYPE_BF16 ? wire::DTYPE_BF16
                                                                           : wire::DTYPE_F32,
               resp->mutable_out());
  return absl::OkStatus();
}

ExpertDispatcher::ExpertDispatcher(std::vector<ExpertWorkerHandle> workers, int64_t hidden,
                                   wire::DType wire_dtype, Clock now)
    : workers_(std::move(workers)),
      hidden_(hidden),
      wire_dtype_(wire_dtype),
      now_(now ? std::move(now) : Clock([] { return std::chrono::steady_clock::now(); })),
      health_(workers_.size()) {}

namespace {

std::chrono::steady_clock::duration Seconds(double s) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(s));
}

}  // namespace

ExpertDispatcher::~ExpertDispatcher() {
  std::unique_lock<std::mutex> l(health_mu_);
  probes_done_.wait(l, [this] { return probes_in_flight_ == 0; });
}

std::vector<char> ExpertDispatcher::Up(double wait_seconds) {
  std::vector<int> due;
  {
    const auto now = now_();
    std::lock_guard<std::mutex> l(health_mu_);
    for (size_t w = 0; w < health_.size(); ++w) {
      Health& h = health_[w];
      if (h.down && !h.probing && now >= h.retry_at) {
        h.probing = true;
        ++probes_in_flight_;
        due.push_back(static_cast<int>(w));
      }
    }
  }
  for (int w : due) {
    workers_[w].transport->ProbeAsync([this, w](absl::Status st) {
      Answered(w, st);
      std::lock_guard<std::mutex> l(health_mu_);
      health_[w].probing = false;
      --probes_in_flight_;
      probes_done_.notify_all();
    });
  }
  std::unique_lock<std::mutex> l(health_mu_);
  probes_done_.wait_for(l, std::chrono::duration<double>(wait_seconds), [&] {
    return std::none_of(due.begin(), due.end(), [&](int w) { return health_[w].probing; });
  });
  std::vector<char> up(health_.size());
  for (size_t w = 0; w < health_.size(); ++w) up[w] = !health_[w].down;
  return up;
}

void ExpertDispatcher::Answered(int w, const absl::Status& st) {
  std::lock_guard<std::mutex> l(health_mu_);
  Health& h = health_[w];
  if (st.ok()) {
    if (h.down) {
      std::cerr << "expert worker " << workers_[w].transport->name() << " answers again"
                << std::endl;
    }
    h.down = false;
    return;
  }
  if (!h.down) {
    h.retry_seconds = kFirstRetrySeconds;
    std::cerr << "expert worker " << workers_[w].transport->name() << " is down (" << st
              << "): its experts go to their replicas while it is probed" << std::endl;
  } else {
    h.retry_seconds = std::min(2 * h.retry_seconds, kMaxRetrySeconds);
  }
  h.down = true;
  h.retry_at = now_() + Seconds(h.retry_seconds);
}

std::vector<std::string> ExpertDispatcher::down_workers() const {
  std::lock_guard<std::mutex> l(health_mu_);
  std::vector<std::string> out;
  for (size_t w = 0; w < health_.size(); ++w) {
    if (health_[w].down) out.push_back(workers_[w].transport->name());
  }
  return out;
}

std::string ExpertDispatcher::Unavailable() {
  const std::vector<char> up = Up(kProbeWaitSeconds);
  std::set<ExpertId> served;
  for (size_t w = 0; w < workers_.size(); ++w) {
    if (up[w]) served.insert(workers_[w].shards.begin(), workers_[w].shards.end());
  }
  std::vector<std::string> needed;
  for (size_t w = 0; w < workers_.size(); ++w) {
    if (up[w]) continue;
    for (const ExpertId& e : workers_[w].shards) {
      if (served.count(e) == 0) {
        needed.push_back(workers_[w].transport->name());
        break;
      }
    }
  }
  if (needed.empty()) return "";
  return absl::StrCat("expert worker", needed.size() > 1 ? "s " : " ", absl::StrJoin(needed, ", "),
                      " down, holding experts no other worker in service holds");
}

absl::Status ExpertDispatcher::RunExperts(int32_t layer, const float* x, int64_t n,
                                          const int32_t* ids, const float* weights, int64_t k,
                                          float* out) {
  const int nw = static_cast<int>(workers_.size());
  std::vector<int> assign(n * k, -1);
  std::vector<int64_t> load(nw, 0);
  std::vector<char> dead(nw, 0);  // failed in this call
  const std::vector<char> up = Up();
  // The least-loaded holder, preferring those up: a worker that is down takes rows only where it
  // is an expert's last holder.
  auto pick = [&](int32_t e) {
    int best = -1;
    for (int w = 0; w < nw; ++w) {
      if (dead[w] || workers_[w].shards.count(ExpertId(layer, e)) == 0) continue;
      if (best < 0 || up[w] > up[best] || (up[w] == up[best] && load[w] < load[best])) {
        best = w;
      }
    }
    return best;
  };
  for (int64_t i = 0; i < n * k; ++i) {
    if (ids[i] < 0) continue;
    int w = pick(ids[i]);
    if (w < 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("no expert worker holds expert ", ids[i], " of layer ", layer));
    }
    assign[i] = w;
    ++load[w];
  }
  std::vector<int> failed;
  absl::Status st = Round(layer, x, n, ids, weights, k, assign, out, &failed);
  if (failed.empty()) return st;
  // Fail over: the failed workers' slots go to replicas, if every one has a live replica.
  for (int w : failed) dead[w] = 1;
  std::vector<int> retry(n * k, -1);
  for (int64_t i = 0; i < n * k; ++i) {
    if (assign[i] < 0 || !dead[assign[i]]) continue;
    int w = pick(ids[i]);
    if (w < 0) return st;  // no replica: report the original failure
    retry[i] = w;
    ++load[w];
  }
  failovers_ += static_cast<int64_t>(failed.size());
  failed.clear();
  absl::Status st2 = Round(layer, x, n, ids, weights, k, retry, out, &failed);
  return failed.empty() ? absl::OkStatus() : st2;
}

absl::Status ExpertDispatcher::Round(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                                     const float* weights, int64_t k,
                                     const std::vector<int>& assign, float* out,
                                     std::vector<int>* failed) {
  const int nw = static_cast<int>(workers_.size());
  struct Call {
    std::vector<int64_t> rows;  // rows of x sent to this worker
    wire::RunExpertsRequest req;
    wire::RunExpertsResponse resp;
    absl::Status status;
  };
  std::vector<Call> calls(nw);
  for (int64_t r = 0; r < n; ++r) {
    for (int w = 0; w < nw; ++w) {
      bool any = false;
      for (int64_t j = 0; j < k; ++j) any |= assign[r * k + j] == w;
      if (any) calls[w].rows.push_back(r);
    }
  }
  std::mutex mu;
  std::condition_variable cv;
  int pending = 0;
  std::vector<float> xs;
  std::vector<int32_t> cid;
  std::vector<float> cw;
  for (int w = 0; w < nw; ++w) {
    Call& c = calls[w];
    if (c.rows.empty()) continue;
    const int64_t m = static_cast<int64_t>(c.rows.size());
    xs.resize(m * hidden_);
    cid.assign(m * k, -1);
    cw.assign(m * k, 0.0f);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = c.rows[i];
      std::memcpy(&xs[i * hidden_], x + r * hidden_, hidden_ * sizeof(float));
      for (int64_t j = 0; j < k; ++j) {
        if (assign[r * k + j] != w) continue;
        cid[i * k + j] = ids[r * k + j];
        cw[i * k + j] = weights[r * k + j];
      }
    }
    c.req.set_layer(layer);
    EncodeFloats(xs.data(), m, hidden_, wire_dtype_, c.req.mutable_x());
    EncodeInts(cid.data(), m, k, c.req.mutable_ids());
    EncodeFloats(cw.data(), m, k, wire::DTYPE_F32, c.req.mutable_weights());
    ++pending;
  }
  for (int w = 0; w < nw; ++w) {
    Call& c = calls[w];
    if (c.rows.empty()) continue;
    ++calls_;
    workers_[w].transport->RunExpertsAsync(&c.req, &c.resp, [&, w](absl::Status s) {
      std::lock_guard<std::mutex> l(mu);
      calls[w].status = std::move(s);
      if (--pending == 0) cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return pending == 0; });
  }
  absl::Status first;
  std::vector<float> part;
  for (int w = 0; w < nw; ++w) {
    Call& c = calls[w];
    if (c.rows.empty()) continue;
    if (c.status.ok()) {
      int64_t m = static_cast<int64_t>(c.rows.size()), h = hidden_;
      c.status = DecodeFloats(c.resp.out(), "out", &m, &h, &part);
    }
    Answered(w, c.status);
    if (!c.status.ok()) {
      failed->push_back(w);
      if (first.ok()) {
        first = absl::Status(c.status.code(), absl::StrCat("expert worker ", workers_[w].transport->name(),
                                                           ": ", c.status.message()));
      }
      continue;
    }
    for (size_t i = 0; i < c.rows.size(); ++i) {
      float* o = out + c.rows[i] * hidden_;
      const float* p = &part[i * hidden_];
      for (int64_t col = 0; col < hidden_; ++col) o[col] += p[col];
    }
  }
  return first;
}

}  // namespace moemesh
