// The router as a plain object: tokenizes, queues and schedules requests with continuous batching
// over one or more attention workers (data parallel: each holds its own sequences' KV cache),
// applies stop conditions and streams text. The gRPC service (generation_service.h) and the
// in-process mode both drive this class.
#ifndef MOEMESH_ROUTER_ROUTER_H_
#define MOEMESH_ROUTER_ROUTER_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/config.h"
#include "engine/tokenizer.h"
#include "protos/generation.pb.h"
#include "protos/worker.pb.h"
#include "router/metrics.h"
#include "router/text_stream.h"

namespace moemesh {

namespace wire = ::moemesh::internal::v1;

// How the router reaches an attention worker (in-process or gRPC). The router calls Step and
// Release from that worker's scheduler thread only; GetStats and GetStatsAsync also from the
// HTTP server's threads (/health, /metrics), at the same time.
class AttentionClient {
 public:
  virtual ~AttentionClient() = default;
  virtual absl::Status Step(const wire::StepRequest& req, wire::StepResponse* resp) = 0;
  virtual absl::Status Release(const std::vector<uint64_t>& seq_ids) = 0;
  // Frees the sequences router `router` started in runs other than `keep_run`
  // (ReleaseRequest.router).
  virtual absl::Status ReleaseStale(const std::string& router, uint64_t keep_run) = 0;
  virtual absl::StatusOr<wire::Stats> GetStats() = 0;
  // GetStats without waiting for the answer: `done` gets it once, on any thread, possibly before
  // this returns, possibly after this client is gone. The default calls GetStats here.
  virtual void GetStatsAsync(std::function<void(absl::StatusOr<wire::Stats>)> done) {
    done(GetStats());
  }
};

// Whether a worker whose GetStats answered `stats` can serve a step: it answered, with nothing in
// not_ready. The router takes a failed worker back on this, and GET /health is 200 on it.
inline bool CanServe(const absl::StatusOr<wire::Stats>& stats) {
  return stats.ok() && stats->not_ready().empty();
}

// Receives one request's responses. The router calls it from its scheduler thread (or from
// Submit/Cancel's caller), never concurrently for one request, and never after OnFinish.
class GenerationSink {
 public:
  virtual ~GenerationSink() = default;
  virtual void OnResponse(const moemesh::v1::GenerateResponse& r) = 0;
  // The last call. OK after a response with a finish reason; otherwise the request failed.
  virtual void OnFinish(const absl::Status& status) = 0;
};

struct RouterOptions {
  int64_t max_queue = 256;       // requests waiting for KV cache room; beyond: RESOURCE_EXHAUSTED
  int64_t max_running = 64;      // sequences in one step's batch (per attention worker)
  int64_t prefill_chunk = 256;   // prompt tokens per step over all prefilling sequences
  int64_t kv_capacity_tokens = 0;  // per attention worker; 0 = ask each worker
  // Times a request may go back to the queue after its worker's step failed as a whole (to move
  // to another worker, or to wait for this one); the next failure fails it.
  int max_moves = 2;
  // A worker whose step failed is asked again (GetStats) after this, then at doubling intervals
  // up to Router::kMaxRetrySeconds; it is back in service once it answers with an empty not_ready.
  double worker_retry_seconds = 0.5;
  // With no attention worker in service, requests wait this long for one to come back (a worker
  // restarted, an expert worker back); then those waiting fail with UNAVAILABLE, and new ones are
  // refused with UNAVAILABLE until a worker serves again. 0: at once.
  double outage_wait_seconds = 10;
  // "START,END": the tokens between which SamplingParams::thinking_budget counts. Empty:
  // <think>,</think> when the tokenizer has both (otherwise budgets are refused).
  std::string think_tokens;
  // This router's name (--router_name). Its steps carry it, with a random id of this run; at
  // start it asks each attention worker to free the sequences an earlier run of the same name
  // left (a router killed and started again), which otherwise hold KV rows until the worker's
  // --idle_sequence_seconds. Routers running at once over the same workers need different
  // names. Empty: none of this.
  std::string name;
};

// The ids of the think markers named by `spec` ("START,END", as --think_tokens). Empty:
// <think>,</think> when the tokenizer has both, else {-1, -1}. InvalidArgument when `spec`
// names a token the tokenizer (or the model's vocabulary) lacks.
absl::StatusOr<std::pair<int32_t, int32_t>> ThinkTokenIds(const Tokenizer& tok,
                                                          const ModelConfig& cfg,
                                                          const std::string& spec);

class Router {
 public:
  // The longest interval between two GetStats calls to a worker that is down.
  static constexpr double kMaxRetrySeconds = 2;
  // How often a worker that holds rows of other routers' sequences is asked how many (Lane).
  static constexpr double kForeignPollSeconds = 1;

  // `tok` and the attention clients must outlive the router. With several attention workers,
  // each request is admitted to the one with the most free KV cache (among those with room
  // for its prompt + max_tokens) and stays there; each worker gets its own scheduler thread
  // and steps, so the workers compute side by side. Requests wait in one queue, by priority
  // then arrival (GenerateRequest.priority: lower first). When a worker's step fails as a
  // whole (the worker is down or unreachable, or one of its encoder or expert workers is), its
  // requests go back to the head of the queue and continue from their last token on another
  // worker, or on the same one once it serves again (the KV cache rebuilt by a prefill of the
  // prompt and the tokens generated so far; greedy output is unchanged, sampling continues with
  // a fresh random stream), at most RouterOptions::max_moves times; the failed worker takes no
  // requests until its GetStats answers with an empty not_ready. While no worker is in service
  // requests wait, for RouterOptions::outage_wait_seconds.
  static absl::StatusOr<std::unique_ptr<Router>> Create(const Tokenizer* tok, const ModelConfig& cfg,
                                                        const GenerationDefaults& defaults,
                                                        std::vector<AttentionClient*> attention,
                                                        const RouterOptions& opt);
  static absl::StatusOr<std::unique_ptr<Router>> Create(const Tokenizer* tok, const ModelConfig& cfg,
                                                        const GenerationDefaults& defaults,
                                                        AttentionClient* attention,
                                                        const RouterOptions& opt) {
    return Create(tok, cfg, defaults, std::vector<AttentionClient*>{attention}, opt);
  }
  ~Router();  // stops scheduling; unfinished requests end with UNAVAILABLE
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  // Validates and queues a request. A non-OK result (INVALID_ARGUMENT naming the field,
  // RESOURCE_EXHAUSTED when the queue is full) means the sink is never called. Thread-safe.
  absl::StatusOr<uint64_t> Submit(const moemesh::v1::GenerateRequest& req, GenerationSink* sink);
  const Tokenizer* tokenizer() const { return tok_; }
  // Stops a request: its sequence is freed at the next step boundary, its sink gets a final
  // response with FINISH_REASON_CANCELLED. Unknown or finished ids are ignored. Thread-safe.
  void Cancel(uint64_t id);

  // Prompt tokens for `req` as Submit would compute them (text, ids or chat messages).
  absl::StatusOr<std::vector<int32_t>> PromptIds(const moemesh::v1::GenerateRequest& req) const;

  // Totals since start, and the state now. Finished = ended with a finish reason stop or
  // length; rejected = RESOURCE_EXHAUSTED at Submit; invalid = INVALID_ARGUMENT at Submit.
  struct Counters {
    int64_t submitted = 0, finished = 0, cancelled = 0, failed = 0, rejected = 0, invalid = 0;
    int64_t finished_length = 0;  // of `finished`, those that reached max_tokens or the context
    int64_t refused_draining = 0;  // UNAVAILABLE at Submit: the router is draining (Drain)
    // UNAVAILABLE at Submit: no worker has been in service for outage_wait_seconds.
    int64_t refused_unavailable = 0;
    bool draining = false;
    int64_t waiting = 0, running = 0, steps = 0, kv_reserved = 0;  // over all workers
    // Requests requeued after their worker's step failed, or after it lost their sequence.
    int64_t moved = 0;
    // Requests sent back to the queue because their worker had no KV room for them (rows held
    // by sequences this router does not run: another router's, or a killed router's).
    int64_t requeued_no_room = 0;
    // Prompt tokens of requests whose prompt is prefilled (once each: not again when a moved
    // request rebuilds its cache), and tokens generated (sent to clients).
    int64_t prompt_tokens = 0, generation_tokens = 0;
    // Per attention worker, in Create's order.
    std::vector<int64_t> steps_per_worker, kv_reserved_per_worker, kv_capacity_per_worker;
    // KV rows each worker holds for sequences this router does not run, as last asked (Lane).
    std::vector<int64_t> kv_foreign_per_worker;
    std::vector<bool> worker_up;
    // Seconds from Submit to the first token; between two tokens of a request (tokens that
    // arrive together, as speculative decoding's, count a gap of 0 after the first); Submit to
    // the last token (finished requests); Submit to the first admission to a worker.
    Histogram time_to_first_token{Histogram::LatencySeconds()};
    Histogram inter_token{Histogram::TokenGapSeconds()};
    Histogram request_latency{Histogram::LatencySeconds()};
    Histogram queue_time{Histogram::LatencySeconds()};
    // Prompt and generated tokens of finished requests.
    Histogram request_prompt_tokens{Histogram::TokenCounts()};
    Histogram request_generation_tokens{Histogram::TokenCounts()};
  };
  Counters counters() const;

  // Each attention worker's own Stats (KV rows in use, prefix cache, speculative decoding,
  // time spent), in Create's order: one GetStats call each, all at once (so a worker that does
  // not answer costs its deadline once, not once per worker), not under the router's lock.
  std::vector<absl::StatusOr<wire::Stats>> WorkerStats() const;
  // OK as soon as some worker's GetStats CanServe (GET /health), without waiting for the others;
  // otherwise UNAVAILABLE with why the first worker cannot (its not_ready, or its error).
  absl::Status SomeWorkerCanServe() const;

  // Graceful shutdown: from now on Submit refuses new requests with UNAVAILABLE while those
  // accepted run to their end.
  void Drain();
  bool draining() const;
  // Waits until no request is waiting or running, at most `timeout` (polling); whether it got
  // there.
  bool WaitIdle(std::chrono::steady_clock::duration timeout) const;
  const ModelConfig& config() const { return cfg_; }
  // The largest KV cache of one attention worker (what one request can use at most).
  int64_t kv_capacity_tokens() const { return max_kv_capacity_; }

 private:
  // One GetStatsAsync to every worker; the answers arrive in it (WorkerStats, SomeWorkerCanServe).
  struct StatsRound;
  std::shared_ptr<StatsRound> AskStats() const;

  struct Request {
    uint64_t id = 0;
    int32_t priority = 0;  // GenerateRequest.priority: lower first
    GenerationSink* sink = nullptr;
    std::vector<int32_t> prompt;
    moemesh::v1::SamplingParams sampling;  // defaults resolved
    int64_t max_tokens = 0;
    bool ignore_eos = false;
    int32_t experts_per_token = 0;
    bool thinking_budget = false;  // sampling.thinking_budget is set
    std::vector<int32_t> stop_ids;
    std::unique_ptr<TextStream> stream;
    // sampling.prompt_logprobs: the prompt's scores gathered from its prefill steps, sent with
    // the first token.
    std::vector<moemesh::v1::TokenLogprobs> prompt_logprobs;
    // Scheduling state.
    int64_t prefilled = 0;          // prompt tokens in the KV cache
    std::vector<int32_t> generated;
    bool started = false;           // sent its first step
    bool cancelled = false;
    int64_t reserved = 0;           // KV slots counted against its worker's capacity
    int lane = -1;                  // its attention worker, once admitted
    std::chrono::steady_clock::time_point submitted_at, last_token_at;
    bool prompt_counted = false;  // in Counters::prompt_tokens (once, though a move re-prefills)
    // After a move: generated tokens (all but the last) prefilled after the prompt, to rebuild
    // the KV cache; the last is the next decode step's input.
    int64_t replay = 0;
    int moves = 0;
    bool admitted_once = false;  // in Counters::queue_time
    // Tokens the KV cache holds once prefilled (prompt, then replayed ones).
    int64_t context() const { return static_cast<int64_t>(prompt.size()) + replay; }
    int32_t context_token(int64_t i) const {
      const int64_t plen = static_cast<int64_t>(prompt.size());
      return i < plen ? prompt[i] : generated[i - plen];
    }
    // KV rows its worker holds for it: those prefilled, then one per decode step (the last
    // generated token is the next step's input).
    int64_t rows() const {
      if (!started) return 0;
      if (prefilled < context() || generated.empty()) return prefilled;
      return std::max(prefilled,
                      static_cast<int64_t>(prompt.size() + generated.size()) - 1);
    }
  };
  // One attention worker and the requests admitted to it.
  struct Lane {
    AttentionClient* client = nullptr;
    int64_t kv_capacity = 0;
    int64_t kv_reserved = 0;
    // KV rows the worker holds for sequences this router does not run: another router's (two
    // routers over the same workers in a rolling update's overlap) or a killed router's (until
    // the worker releases them, --idle_sequence_seconds). Admission leaves them room. Learned
    // from GetStats (kv_used_tokens less this router's own rows) at Create and, once a step
    // finds the worker without room, every kForeignPollSeconds until none are left.
    int64_t foreign = 0;
    std::chrono::steady_clock::time_point foreign_check;  // when to ask again (foreign > 0)
    std::vector<std::unique_ptr<Request>> running;
    std::vector<uint64_t> to_release;
    int64_t steps = 0;
    // Down after a failed step: takes no requests until GetStats answers with an empty not_ready
    // (asked at retry_at).
    bool down = false;
    std::chrono::steady_clock::time_point retry_at;
    double retry_seconds = 0;
    void AskAgainIn(double seconds) {
      retry_at = std::chrono::steady_clock::now() +
                 std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6));
    }
    std::thread thread;
  };
  struct Outgoing {
    GenerationSink* sink;
    bool final_response = false;
    moemesh::v1::GenerateResponse response;
    bool finish = false;
    absl::Status status;
  };

  Router(const Tokenizer* tok, const ModelConfig& cfg, const GenerationDefaults& defaults,
         std::vector<AttentionClient*> attention, const RouterOptions& opt,
         const std::vector<int64_t>& kv_capacity, const std::vector<int64_t>& kv_foreign,
         std::pair<int32_t, int32_t> think_ids, uint32_t run);
  // Scheduler of lanes_[lane]: one step after another.
  void Loop(size_t lane);
  // Sends the lane's pending releases, then asks its worker's GetStats for the rows of other
  // routers' sequences (Lane::foreign); unlocks `l` meanwhile. Admits if that made room.
  void CheckForeignRows(size_t lane, std::unique_lock<std::mutex>& l)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // After a step in which lane `lane`'s worker refused `which` (their results' `why`): sends
  // them back to the queue's head, to start again (replaying their tokens). With `no_room` (the
  // worker had no KV room: rows other routers' sequences hold) they wait for room, and the
  // worker's free rows count as foreign until it is asked again; otherwise (it lost their
  // sequences) they count as moved (failing those that moved max_moves times).
  void SendBack(size_t lane, const std::vector<Request*>& which, const absl::Status& why,
                bool no_room, std::vector<Outgoing>* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes lane `lane`'s running requests in `which` (every one when null) off it, to start
  // again from the queue's head, in their order, replaying their generated tokens (their
  // reservations freed, their sequences' releases queued); drops its ended ones. Cancelled ones
  // finish. With `move` each counts as a move, and those that moved max_moves times fail with
  // `why`; otherwise each counts as requeued for want of room. Returns how many went back.
  size_t TakeBack(size_t lane, const std::vector<Request*>* which, const absl::Status& why,
                  bool move, std::vector<Outgoing>* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves waiting requests, in order, to the lane with the most free KV cache that has room
  // for them; stops at the first that fits nowhere yet. Wakes the lanes.
  void Admit() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<uint64_t> SubmitChecked(const moemesh::v1::GenerateRequest& req,
                                         GenerationSink* sink);
  // Ends `r` (running or waiting): queues its last response / status; frees its KV reservation.
  void Finish(Request* r, moemesh::v1::FinishReason reason, const std::string& text_tail,
              std::vector<Outgoing>* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Fail(Request* r, const absl::Status& st, std::vector<Outgoing>* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Returns r's KV reservation to its worker and queues its sequence's release there.
  void Unreserve(Request* r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // After lane `lane`'s step failed with `st`: marks the lane down and moves its requests back to
  // the queue's head (failing those that moved max_moves times); starts an outage when no lane
  // is up.
  void Requeue(size_t lane, const absl::Status& st, std::vector<Outgoing>* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // When the outage that began at outage_since_ has waited outage_wait_seconds.
  std::chrono::steady_clock::time_point OutageDeadline() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The error of an outage that has lasted outage_wait_seconds (OK: none, or not that long).
  absl::Status OutageError() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // After that: fails every waiting request with OutageError; whether there was one.
  bool FailWaitingAfterOutage(std::vector<Outgoing>* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Applies one sampled token, a SeqResult's `token` or one of its `earlier` ones (both carry
  // token, logprob, top_ids, top_logprobs); true when the request is finished.
  template <typename Sampled>
  bool OnToken(Request* r, const Sampled& res, std::vector<Outgoing>* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static void Deliver(std::vector<Outgoing>* out);

  // Constant after construction.
  const Tokenizer* const tok_;
  const ModelConfig cfg_;
  const GenerationDefaults defaults_;
  const RouterOptions opt_;
  int64_t max_kv_capacity_ = 0;
  // Ids of the think markers; -1 when the tokenizer has none (thinking budgets are refused).
  const int32_t think_start_id_, think_end_id_;
  // Seeds for requests that name none: SplitMix64 of seed_base_ + a counter, the base drawn from
  // std::random_device at construction (so two unseeded requests sample differently, as OpenAI's
  // and vLLM's do, and a seed is still sent, so a moved sequence replays its draws).
  const uint64_t seed_base_;
  std::atomic<uint64_t> seeds_drawn_{0};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  const uint32_t run_;  // this run's id (StepRequest.router_run): random, and next_id_'s high bits
  std::deque<std::unique_ptr<Request>> waiting_ ABSL_GUARDED_BY(mu_);
  // The lanes' scheduling state is guarded by mu_ (their clients and threads are not touched
  // after construction but by their own thread).
  std::vector<Lane> lanes_;
  Counters counters_ ABSL_GUARDED_BY(mu_);
  // Since outage_since_ no lane has been up (a failed step took down the last one); the status
  // of the last failed step.
  bool outage_ ABSL_GUARDED_BY(mu_) = false;
  std::chrono::steady_clock::time_point outage_since_ ABSL_GUARDED_BY(mu_);
  absl::Status outage_status_ ABSL_GUARDED_BY(mu_);
};

// INVALID_ARGUMENT "field 'FIELD' holds id X outside the vocabulary [0, VOCAB)" for the first
// id of `ids` out of range; OK when all are in it.
absl::Status CheckTokenIds(const std::string& field, absl::Span<const int32_t> ids, int64_t vocab);

// The counters in Prometheus' text format (GET /metrics): moemesh_* counters, gauges and
// histograms, per worker with a worker="i" label; with `workers` (Router::WorkerStats) also
// what each worker reports of itself (those that did not answer are left out).
std::string PrometheusMetrics(const Router::Counters& c,
                              const std::vector<absl::StatusOr<wire::Stats>>& workers = {});

// In-process attention client over an AttentionWorker-like object.
template <typename Worker>
class LocalAttentionClient : public AttentionClient {
 public:
  explicit LocalAttentionClient(Worker* w) : w_(w) {}
  absl::Status Step(const wire::StepRequest& req, wire::StepResponse* resp) override {
    return w_->Step(req, resp);
  }
  absl::Status Release(const std::vector<uint64_t>& ids) override {
    w_->Release(ids);
    return absl::OkStatus();
  }
  absl::Status ReleaseStale(const std::string& router, uint64_t keep_run) override {
    w_->ReleaseStale(router, keep_run);
    return absl::OkStatus();
  }
  absl::StatusOr<wire::Stats> GetStats() override { return w_->GetStats(); }

 private:
  Worker* w_;
};

}  // namespace moemesh

#endif  // MOEMESH_ROUTER_ROUTER_H_
