#include "attention_worker/attention_worker.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/ops/threading.h"

namespace moemesh {
namespace {

using Clock = std::chrono::steady_clock;

// Logits per thread below which sampling stays on one thread (about 0.5 ms of sampling).
constexpr int64_t kSampleWorkPerThread = 1 << 18;

double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Times the calls into the expert backend (the step's "waiting on experts" share).
class TimedExperts : public ExpertBackend {
 public:
  explicit TimedExperts(ExpertBackend* inner) : inner_(inner) {}
  absl::Status RunExperts(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                          const float* weights, int64_t k, float* out) override {
    auto t = Clock::now();
    absl::Status st = inner_->RunExperts(layer, x, n, ids, weights, k, out);
    seconds += Since(t);
    return st;
  }
  // In-process experts on the stack's own device run inside Forward (not timed separately).
  const ExpertShard* local_shard() const override { return inner_->local_shard(); }
  double seconds = 0;

 private:
  ExpertBackend* inner_;
};

}  // namespace

// One long-lived thread that runs the second half of an overlapped step while the caller runs
// the first (no thread started per step).
class AttentionWorker::SideThread {
 public:
  SideThread() : thread_([this] { Loop(); }) {}
  ~SideThread() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }
  // Starts `task` on the thread; the previous task must have been waited for.
  void Start(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = std::move(task);
      done_ = false;
    }
    wake_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    finished_.wait(lock, [this] { return done_; });
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [this] { return stop_ || task_ != nullptr; });
      if (stop_) return;
      std::function<void()> task = std::move(task_);
      task_ = nullptr;
      lock.unlock();
      task();
      lock.lock();
      done_ = true;
      finished_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_, finished_;
  std::function<void()> task_;
  bool done_ = true, stop_ = false;
  std::thread thread_;  // last: starts after the members above exist
};

namespace {

void SetError(wire::SeqResult* r, const absl::Status& st) {
  r->set_error_code(static_cast<int32_t>(st.code()));
  r->set_error(std::string(st.message()));
}

}  // namespace

AttentionWorker::AttentionWorker(const AttentionStack* stack, EncoderBackend* encoder,
                                 ExpertBackend* experts, const Options& opt)
    : stack_(stack),
      encoder_(encoder),
      experts_(experts),
      device_(opt.device),
      overlap_halves_(opt.overlap_halves && opt.device == "cpu"),
      overlap_min_sequences_(std::max(2, opt.overlap_min_sequences)),
      cache_(stack->NewCache(opt.kv_capacity_tokens)) {
  if (overlap_halves_) side_ = std::make_unique<SideThread>();
}

AttentionWorker::~AttentionWorker() = default;

absl::Status AttentionWorker::Step(const wire::StepRequest& req, wire::StepResponse* resp) {
  std::lock_guard<std::mutex> lock(mu_);
  const ModelConfig& cfg = stack_->config();
  auto t_start = Clock::now();
  std::vector<SeqStep> batch;
  std::vector<int> result_of;  // batch entry -> index in resp->results
  std::vector<int32_t> all_tokens;
  for (const wire::SeqStep& s : req.seqs()) {
    wire::SeqResult* r = resp->add_results();
    r->set_seq_id(s.seq_id());
    auto fail = [&](absl::Status st) { SetError(r, st); };
    if (s.tokens_size() == 0) {
      fail(absl::InvalidArgumentError("no tokens"));
      continue;
    }
    bool bad_id = false;
    for (int32_t id : s.tokens()) bad_id |= id < 0 || id >= cfg.vocab_size;
    if (bad_id) {
      fail(absl::InvalidArgumentError(
          absl::StrCat("token id outside the vocabulary [0, ", cfg.vocab_size, ")")));
      continue;
    }
    if (s.experts_per_token() < 0 || s.experts_per_token() > cfg.num_experts) {
      fail(absl::InvalidArgumentError(absl::StrCat("experts_per_token must be in [1, ",
                                                   cfg.num_experts, "]")));
      continue;
    }
    if (s.start_pos() + s.tokens_size() > cfg.max_position_embeddings) {
      fail(absl::InvalidArgumentError(absl::StrCat("sequence would exceed the context of ",
                                                   cfg.max_position_embeddings, " tokens")));
      continue;
    }
    auto it = seqs_.find(s.seq_id());
    if (s.new_sequence()) {
      if (s.start_pos() != 0) {
        fail(absl::InvalidArgumentError("a new sequence starts at position 0"));
        continue;
      }
      SamplingConfig sc = ToSamplingConfig(s.sampling());
      sc.think_start_id = s.think_start_id();
      sc.think_end_id = s.think_end_id();
      if (absl::Status valid = sc.Validate(); !valid.ok()) {
        fail(valid);
        continue;
      }
      if (it != seqs_.end()) cache_->Free(s.seq_id());
      it = seqs_.insert_or_assign(s.seq_id(), std::make_unique<SeqState>(sc)).first;
      it->second->prompt_len = std::max<int64_t>(s.prompt_tokens(), 0);
    } else if (it == seqs_.end()) {
      fail(absl::FailedPreconditionError(absl::StrCat("unknown sequence ", s.seq_id())));
      continue;
    }
    SeqState& st = *it->second;
    if (s.start_pos() != st.length) {
      fail(absl::FailedPreconditionError(absl::StrCat("sequence ", s.seq_id(), " has ", st.length,
                                                      " tokens, step starts at ", s.start_pos())));
      continue;
    }
    absl::Status reserved = cache_->Reserve(s.seq_id(), s.start_pos() + s.tokens_size());
    if (!reserved.ok()) {
      fail(reserved);
      if (s.new_sequence()) seqs_.erase(it);
      continue;
    }
    SeqStep b;
    b.seq_id = s.seq_id();
    b.tokens.assign(s.tokens().begin(), s.tokens().end());
    b.start_pos = s.start_pos();
    b.experts_per_token = s.experts_per_token();
    batch.push_back(std::move(b));
    result_of.push_back(resp->results_size() - 1);
    all_tokens.insert(all_tokens.end(), s.tokens().begin(), s.tokens().end());
  }
  if (batch.empty()) return absl::OkStatus();

  // Step buffers kept between steps: a step's logits are rows x vocabulary (39 MB for 64 rows of
  // Qwen3), which fresh each step would page-fault in again.
  std::vector<float>& hidden = hidden_buf_;
  hidden.resize(all_tokens.size() * cfg.hidden_size);
  absl::Status st = encoder_->Encode(all_tokens.data(), static_cast<int64_t>(all_tokens.size()),
                                     hidden.data());
  if (!st.ok()) return st;
  std::vector<float>& logits = logits_buf_;
  double expert_s = 0;
  st = Forward(batch, hidden.data(), &logits, &expert_s);
  if (!st.ok()) return st;
  auto t_sample = Clock::now();
  std::vector<std::pair<size_t, SeqState*>> to_sample;  // batch entries that sample a token
  for (size_t b = 0; b < batch.size(); ++b) {
    const wire::SeqStep& s = req.seqs(result_of[b]);
    SeqState& state = *seqs_.at(batch[b].seq_id);
    state.length += static_cast<int64_t>(batch[b].tokens.size());
    if (state.prompt_len > 0) {
      // A moved sequence: tokens from prompt_len on were generated (on another worker); the
      // decode input after its replay is the last of them.
      for (size_t i = 0; i < batch[b].tokens.size(); ++i) {
        const int64_t p = batch[b].start_pos + static_cast<int64_t>(i);
        if (p < state.prompt_len) {
          state.prompt.push_back(batch[b].tokens[i]);
        } else if (static_cast<int64_t>(state.generated.size()) == p - state.prompt_len) {
          state.generated.push_back(batch[b].tokens[i]);
        }
      }
    } else if (state.generated.empty()) {
      state.prompt.insert(state.prompt.end(), batch[b].tokens.begin(), batch[b].tokens.end());
    }
    if (s.sample()) to_sample.emplace_back(b, &state);
  }
  // Each sequence samples from its own row with its own sampler: in parallel when the rows are
  // big (a vocabulary of 151,936 takes ~1-2 ms a row to sample at a temperature).
  auto sample = [&](int64_t i) {
    const size_t b = to_sample[i].first;
    SeqState& state = *to_sample[i].second;
    TokenChoice c = state.sampler.Sample(&logits[b * cfg.vocab_size], cfg.vocab_size,
                                         state.prompt, state.generated);
    state.generated.push_back(c.id);
    wire::SeqResult* r = resp->mutable_results(result_of[b]);
    r->set_sampled(true);
    r->set_token(c.id);
    r->set_logprob(c.logprob);
    for (const auto& [id, lp] : c.top) {
      r->add_top_ids(id);
      r->add_top_logprobs(lp);
    }
  };
  const int64_t n_sample = static_cast<int64_t>(to_sample.size());
  const int threads =
      ops::ThreadsFor(n_sample * cfg.vocab_size, ops::SyncThreads(), kSampleWorkPerThread);
  if (threads > 1) {
    ops::ParallelForDynamic(threads, n_sample, sample);
  } else {
    for (int64_t i = 0; i < n_sample; ++i) sample(i);
  }
  ++steps_;
  sampling_s_ += Since(t_sample);
  expert_s_ += expert_s;
  attention_s_ += std::chrono::duration<double>(t_sample - t_start).count() - expert_s;
  return absl::OkStatus();
}

absl::Status AttentionWorker::Forward(const std::vector<SeqStep>& batch, float* hidden,
                                      std::vector<float>* logits, double* expert_s) {
  const bool overlap =
      overlap_halves_ && experts_->local_shard() == nullptr &&
      static_cast<int>(batch.size()) >= overlap_min_sequences_;
  if (!overlap) {
    TimedExperts timed(experts_);
    absl::Status st = stack_->Forward(batch, hidden, cache_.get(), &timed, logits);
    *expert_s += timed.seconds;
    return st;
  }
  // Split where the tokens are closest to half (both halves non-empty). The halves touch
  // disjoint sequences of the KV cache, whose slots were all reserved above.
  int64_t total = 0;
  for (const SeqStep& s : batch) total += static_cast<int64_t>(s.tokens.size());
  size_t split = 1;
  int64_t first_tokens = static_cast<int64_t>(batch[0].tokens.size());
  while (split + 1 < batch.size() &&
         std::abs(2 * (first_tokens + static_cast<int64_t>(batch[split].tokens.size())) - total) <
             std::abs(2 * first_tokens - total)) {
    first_tokens += static_cast<int64_t>(batch[split].tokens.size());
    ++split;
  }
  const std::vector<SeqStep> a(batch.begin(), batch.begin() + split);
  const std::vector<SeqStep> b(batch.begin() + split, batch.end());
  TimedExperts timed_a(experts_), timed_b(experts_);
  std::vector<float>& logits_b = logits_b_buf_;
  absl::Status st_b;
  side_->Start([&] {
    st_b = stack_->Forward(b, hidden + first_tokens * stack_->config().hidden_size, cache_.get(),
                           &timed_b, &logits_b);
  });
  absl::Status st = stack_->Forward(a, hidden, cache_.get(), &timed_a, logits);
  side_->Wait();
  *expert_s += (timed_a.seconds + timed_b.seconds) / 2;
  if (!st.ok()) return st;
  if (!st_b.ok()) return st_b;
  logits->insert(logits->end(), logits_b.begin(), logits_b.end());
  return absl::OkStatus();
}

int64_t AttentionWorker::Release(const std::vector<uint64_t>& seq_ids) {
  std::lock_guard<std::mutex> lock(mu_);
  for (uint64_t id : seq_ids) {
    if (seqs_.erase(id)) ++released_;
    cache_->Free(id);
  }
  return cache_->capacity_tokens() - cache_->used_tokens();
}

wire::Stats AttentionWorker::GetStats() const {
  std::lock_guard<std::mutex> lock(mu_);
  wire::Stats s;
  s.set_kv_capacity_tokens(cache_->capacity_tokens());
  s.set_kv_used_tokens(cache_->used_tokens());
  s.set_active_sequences(static_cast<int64_t>(seqs_.size()));
  s.set_released_sequences(released_);
  s.set_steps(steps_);
  s.set_attention_seconds(attention_s_);
  s.set_expert_wait_seconds(expert_s_);
  s.set_sampling_seconds(sampling_s_);
  s.set_device(device_);
  return s;
}

}  // namespace moemesh
