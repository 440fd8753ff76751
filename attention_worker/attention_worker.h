// The attention worker as a plain object: owns the KV cache and the per-sequence sampler state,
// runs batched forward steps of AttentionStack with embeddings from an EncoderBackend and experts
// behind an ExpertBackend. The gRPC service (attention_service.h) and the in-process mode both
// drive this class.
#ifndef MOEMESH_ATTENTION_WORKER_ATTENTION_WORKER_H_
#define MOEMESH_ATTENTION_WORKER_ATTENTION_WORKER_H_

#include <chrono>
#include <functional>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "engine/json_constraint.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/speculation.h"
#include "mesh/encoder_backend.h"
#include "mesh/sampling_params.h"
#include "protos/worker.pb.h"

namespace moemesh {

namespace wire = ::moemesh::internal::v1;

class AttentionWorker {
 public:
  struct Options {
    int64_t kv_capacity_tokens = 1 << 16;
    std::string device = "cpu";
    // With remote experts and a CPU stack, a step of at least overlap_min_sequences sequences
    // runs as two halves on two threads, so one half's attention overlaps the other's wait on
    // expert workers. Smaller steps run whole: the halves double the expert calls, which costs
    // more than the overlap gains at low load (2-core host, 128/128 load: at 4-8 streams
    // -10..-20% over gRPC, at 16 streams +18% over MPI and -7% over gRPC, at 32 streams
    // +15..+46% over either).
    bool overlap_halves = true;
    int overlap_min_sequences = 16;
    // Prefix cache: KV rows of released sequences kept for up to this
    // many tokens (beyond kv_capacity_tokens, least recently used dropped first). A later
    // sequence whose tokens start with one of them copies those rows instead of computing them.
    // 0 = off.
    int64_t prefix_cache_tokens = 0;
    // The model's token bytes for JSON mode (sampling.response_format JSON_OBJECT); null: such
    // sequences are refused. Must outlive the worker.
    const TokenTable* json_tokens = nullptr;
    // Speculative decoding (prompt lookup, engine/speculation.h): up to this many draft tokens
    // per decoding sequence and step, when the step has at most speculative_max_batch decoding
    // sequences (beyond that the extra rows cost more than they save). 0 = off. Tokens are those
    // of plain decoding (see speculation.h). CPU attention only (rejected drafts' KV slots are
    // given back).
    int speculative_tokens = 0;
    int speculative_max_batch = 8;
    // A sequence no step has touched for this long is released at the next step (its router is
    // gone: killed or restarted without releasing it, so its KV rows would stay taken). A
    // router steps every sequence it runs each step. 0 = never.
    double idle_sequence_seconds = 600;
  };
  // `stack`, `encoder` and `experts` must outlive the worker.
  AttentionWorker(const AttentionStack* stack, EncoderBackend* encoder, ExpertBackend* experts,
                  const Options& opt);
  ~AttentionWorker();
  AttentionWorker(const AttentionWorker&) = delete;
  AttentionWorker& operator=(const AttentionWorker&) = delete;

  // Runs one step. A sequence whose entry is invalid (unknown sequence, wrong position, token id
  // outside the vocabulary, KV cache full, ...) gets an error in its SeqResult and is left out;
  // the others run. A non-OK return (e.g. an expert worker is down) means the whole step failed
  // and every sequence in it must be released. Thread-safe: steps run one at a time.
  absl::Status Step(const wire::StepRequest& req, wire::StepResponse* resp);
  // Forward over `batch` (hidden: its tokens' rows), as two overlapping halves when
  // Options::overlap_halves applies: the logits rows, or with `ids` (logits null) only each
  // row's argmax (AttentionStack::ForwardArgMax). Adds the time spent waiting on experts to
  // *expert_s (overlapped halves: the mean of the two halves' waits).
  absl::Status Forward(const std::vector<SeqStep>& batch, float* hidden,
                       std::vector<float>* logits, std::vector<int32_t>* ids, double* expert_s)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees the sequences' KV cache and sampler state (with a prefix cache, keeps their rows
  // there); returns the free KV slots after (prefix cache excluded).
  int64_t Release(const std::vector<uint64_t>& seq_ids);
  // Frees the sequences `router` started in a run other than `keep_run` (StepRequest.router,
  // .router_run): those of an earlier run of a router that started again. Returns how many.
  int64_t ReleaseStale(const std::string& router, uint64_t keep_run);
  wire::Stats GetStats() const;

  const ModelConfig& config() const { return stack_->config(); }

 private:
  struct SeqState {
    explicit SeqState(const SamplingConfig& c) : sampler(c) {}
    Sampler sampler;
    std::vector<int32_t> prompt, generated;
    int64_t length = 0;  // tokens in the KV cache
    std::chrono::steady_clock::time_point last_step = std::chrono::steady_clock::now();
    int64_t prompt_len = 0;  // SeqStep::prompt_tokens of a moved sequence, else 0
    // The router that started it, and that router's run (StepRequest.router, .router_run).
    std::string router;
    uint64_t router_run = 0;
    // SamplingConfig::prompt_logprobs (-1: none). While the prompt is prefilled, the logits of
    // a chunk's last token, which score the next chunk's first token.
    int32_t prompt_logprobs = -1;
    std::vector<float> last_row;
    // Whether this step's tokens are prompt tokens to score.
    bool ScoresPrompt() const {
      return prompt_logprobs >= 0 && prompt_len == 0 && generated.empty();
    }
    // The tokens at positions [0, length): prompt, then generated ones.
    std::vector<int32_t> History() const;
  };
  // A released sequence's KV rows kept under its own cache id (high bit set), and its tokens.
  struct PrefixEntry {
    uint64_t cache_id = 0;
    std::vector<int32_t> tokens;
    int64_t last_used = 0;  // step count of its last hit (or of its release)
  };
  // Gives decode entries of `batch` (result_of: their index in req) draft tokens when
  // speculative decoding applies: appends them to the entry's tokens (all_logits set), reserves
  // their KV slots, and records them in (*drafts)[entry].
  void Speculate(const wire::StepRequest& req, const std::vector<int>& result_of,
                 std::vector<SeqStep>* batch, std::vector<std::vector<int32_t>>* drafts)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Scores the prompt tokens of step `s` (ScoreToken with state->prompt_logprobs top entries)
  // into r->prompt_logprobs from `rows`, the step's logits of every token, and keeps the last
  // row for the next chunk (a step that samples ends the prompt and drops it).
  void ScorePrompt(const wire::SeqStep& s, const float* rows, SeqState* state,
                   wire::SeqResult* r) const;
  // Copies the longest prefix-cache match beyond `start` of `history` (the sequence's tokens so
  // far followed by this step's, of which positions [start, end) are reserved and must be
  // computed) into `seq`'s rows [start, m), m <= end - 1 (a step computes at least its last
  // token); returns m (start when nothing matched).
  int64_t ReusePrefix(uint64_t seq, const std::vector<int32_t>& history, int64_t start,
                      int64_t end) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Keeps `seq`'s rows [0, state.length) in the prefix cache under a new id, then trims the
  // cache to its budget.
  // False when it kept nothing (the caller frees the rows).
  bool KeepPrefix(uint64_t seq, const SeqState& state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropPrefix(size_t index) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops the least recently used prefix entry; false when there is none.
  bool DropOldestPrefix() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // KV positions held by live sequences (the prefix cache's excluded).
  // Release's work, under the lock.
  void ReleaseLocked(const std::vector<uint64_t>& seq_ids) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Releases the sequences idle past Options::idle_sequence_seconds.
  void ReleaseIdle() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Releases the sequences `which` picks; returns how many.
  int64_t ReleaseWhere(const std::function<bool(const SeqState&)>& which)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t LiveTokens() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return cache_->used_tokens() - prefix_tokens_;
  }

  const AttentionStack* const stack_;
  EncoderBackend* const encoder_;
  ExpertBackend* const experts_;
  const std::string device_;
  const bool overlap_halves_;
  const int overlap_min_sequences_;
  class SideThread;
  std::unique_ptr<SideThread> side_;  // runs the second overlapped half; null without halves

  const int64_t kv_capacity_;     // positions for live sequences (what GetStats reports)
  const int64_t prefix_budget_;   // Options::prefix_cache_tokens (0 when unsupported)
  const TokenTable* const json_tokens_;
  const int speculative_tokens_, speculative_max_batch_;
  const double idle_sequence_seconds_;
  // Draft n-gram lengths tried, longest first.
  static constexpr int kDraftMaxNgram = 4, kDraftMinNgram = 2;

  mutable std::mutex mu_;
  const std::unique_ptr<KvCache> cache_ ABSL_GUARDED_BY(mu_);
  std::vector<PrefixEntry> prefix_ ABSL_GUARDED_BY(mu_);
  int64_t prefix_tokens_ ABSL_GUARDED_BY(mu_) = 0;     // held by prefix_
  uint64_t next_prefix_id_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t prefix_hit_tokens_ ABSL_GUARDED_BY(mu_) = 0;  // rows copied instead of computed
  int64_t draft_tokens_ ABSL_GUARDED_BY(mu_) = 0, accepted_draft_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  std::unordered_map<uint64_t, std::unique_ptr<SeqState>> seqs_ ABSL_GUARDED_BY(mu_);
  int64_t steps_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t released_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t idle_released_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t stale_released_ ABSL_GUARDED_BY(mu_) = 0;
  double attention_s_ ABSL_GUARDED_BY(mu_) = 0, expert_s_ ABSL_GUARDED_BY(mu_) = 0,
         sampling_s_ ABSL_GUARDED_BY(mu_) = 0;
  // A step's hidden rows and logits (the second overlapped half's apart), reused step to step.
  std::vector<float> hidden_buf_ ABSL_GUARDED_BY(mu_), logits_buf_ ABSL_GUARDED_BY(mu_),
      logits_b_buf_ ABSL_GUARDED_BY(mu_);
  // Steps whose every draw is the raw argmax (Sampler::ArgMaxSuffices): the rows' argmax ids.
  std::vector<int32_t> argmax_buf_ ABSL_GUARDED_BY(mu_), argmax_b_buf_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moemesh

#endif  // MOEMESH_ATTENTION_WORKER_ATTENTION_WORKER_H_
