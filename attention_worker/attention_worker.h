// The attention worker as a plain object: owns the KV cache and the per-sequence sampler state,
// runs batched forward steps of AttentionStack with embeddings from an EncoderBackend and experts
// behind an ExpertBackend. The gRPC service (attention_service.h) and the in-process mode both
// drive this class.
#ifndef MOEMESH_ATTENTION_WORKER_ATTENTION_WORKER_H_
#define MOEMESH_ATTENTION_WORKER_ATTENTION_WORKER_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/sampler.h"
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
  // Options::overlap_halves applies. Adds the time spent waiting on experts to *expert_s
  // (overlapped halves: the mean of the two halves' waits).
  absl::Status Forward(const std::vector<SeqStep>& batch, float* hidden,
                       std::vector<float>* logits, double* expert_s)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees the sequences' KV cache and sampler state; returns the free KV slots after.
  int64_t Release(const std::vector<uint64_t>& seq_ids);
  wire::Stats GetStats() const;

  const ModelConfig& config() const { return stack_->config(); }

 private:
  struct SeqState {
    explicit SeqState(const SamplingConfig& c) : sampler(c) {}
    Sampler sampler;
    std::vector<int32_t> prompt, generated;
    int64_t length = 0;  // tokens in the KV cache
    int64_t prompt_len = 0;  // SeqStep::prompt_tokens of a moved sequence, else 0
  };

  const AttentionStack* const stack_;
  EncoderBackend* const encoder_;
  ExpertBackend* const experts_;
  const std::string device_;
  const bool overlap_halves_;
  const int overlap_min_sequences_;
  class SideThread;
  std::unique_ptr<SideThread> side_;  // runs the second overlapped half; null without halves

  mutable std::mutex mu_;
  const std::unique_ptr<KvCache> cache_ ABSL_GUARDED_BY(mu_);
  std::unordered_map<uint64_t, std::unique_ptr<SeqState>> seqs_ ABSL_GUARDED_BY(mu_);
  int64_t steps_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t released_ ABSL_GUARDED_BY(mu_) = 0;
  double attention_s_ ABSL_GUARDED_BY(mu_) = 0, expert_s_ ABSL_GUARDED_BY(mu_) = 0,
         sampling_s_ ABSL_GUARDED_BY(mu_) = 0;
  // A step's hidden rows and logits (the second overlapped half's apart), reused step to step.
  std::vector<float> hidden_buf_ ABSL_GUARDED_BY(mu_), logits_buf_ ABSL_GUARDED_BY(mu_),
      logits_b_buf_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moemesh

#endif  // MOEMESH_ATTENTION_WORKER_ATTENTION_WORKER_H_
