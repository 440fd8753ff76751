#include "attention_worker/attention_worker.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <iostream>
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

// A sampled token into a SeqResult or an EarlierToken (the same fields).
template <typename Sampled>
void SetSampled(const TokenChoice& c, Sampled* m) {
  m->set_token(c.id);
  m->set_logprob(c.logprob);
  for (const auto& [id, lp] : c.top) {
    m->add_top_ids(id);
    m->add_top_logprobs(lp);
  }
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
      kv_capacity_(opt.kv_capacity_tokens),
      prefix_budget_(std::max<int64_t>(opt.prefix_cache_tokens, 0)),
      json_tokens_(opt.json_tokens),
      speculative_tokens_(std::max(opt.speculative_tokens, 0)),
      speculative_max_batch_(opt.speculative_max_batch),
      idle_sequence_seconds_(opt.idle_sequence_seconds),
      cache_(stack->NewCache(opt.kv_capacity_tokens + prefix_budget_)) {
  if (overlap_halves_) side_ = std::make_unique<SideThread>();
}

std::vector<int32_t> AttentionWorker::SeqState::History() const {
  std::vector<int32_t> h(prompt.begin(), prompt.end());
  h.insert(h.end(), generated.begin(), generated.end());
  if (static_cast<int64_t>(h.size()) > length) h.resize(length);
  return h;
}

int64_t AttentionWorker::ReusePrefix(uint64_t seq, const std::vector<int32_t>& history,
                                     int64_t start, int64_t end) {
  size_t best = 0;
  int64_t best_len = start;
  for (size_t i = 0; i < prefix_.size(); ++i) {
    const std::vector<int32_t>& t = prefix_[i].tokens;
    const int64_t limit = std::min(static_cast<int64_t>(t.size()), end - 1);
    if (limit <= best_len) continue;
    const auto [a, b] = std::mismatch(history.begin(), history.begin() + limit, t.begin());
    const int64_t common = a - history.begin();
    if (common > best_len) {
      best = i;
      best_len = common;
    }
  }
  if (best_len <= start) return start;
  if (!cache_->CopyRows(prefix_[best].cache_id, seq, start, best_len).ok()) return start;
  prefix_[best].last_used = steps_;
  prefix_hit_tokens_ += best_len - start;
  return best_len;
}

void AttentionWorker::DropPrefix(size_t index) {
  cache_->Free(prefix_[index].cache_id);
  prefix_tokens_ -= static_cast<int64_t>(prefix_[index].tokens.size());
  prefix_.erase(prefix_.begin() + static_cast<std::ptrdiff_t>(index));
}

bool AttentionWorker::KeepPrefix(uint64_t seq, const SeqState& state) {
  std::vector<int32_t> tokens = state.History();
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n < 2 || n > prefix_budget_) return false;
  // An entry that starts with these tokens already holds their rows.
  for (PrefixEntry& e : prefix_) {
    if (static_cast<int64_t>(e.tokens.size()) >= n &&
        std::equal(tokens.begin(), tokens.end(), e.tokens.begin())) {
      e.last_used = steps_;
      return false;
    }
  }
  // Entries this one extends hold nothing it does not.
  for (size_t i = prefix_.size(); i-- > 0;) {
    const std::vector<int32_t>& t = prefix_[i].tokens;
    if (static_cast<int64_t>(t.size()) <= n && std::equal(t.begin(), t.end(), tokens.begin())) {
      DropPrefix(i);
    }
  }
  // Its positions past `n` (reserved for a step that did not run) go back.
  cache_->Truncate(seq, n);
  const uint64_t id = (uint64_t{1} << 63) | next_prefix_id_++;
  if (!cache_->Rename(seq, id)) return false;
  prefix_.push_back(PrefixEntry{id, std::move(tokens), steps_});
  prefix_tokens_ += n;
  while (prefix_tokens_ > prefix_budget_ && DropOldestPrefix()) {
  }
  return true;
}

bool AttentionWorker::DropOldestPrefix() {
  if (prefix_.empty()) return false;
  size_t oldest = 0;
  for (size_t i = 1; i < prefix_.size(); ++i) {
    if (prefix_[i].last_used < prefix_[oldest].last_used) oldest = i;
  }
  DropPrefix(oldest);
  return true;
}

AttentionWorker::~AttentionWorker() = default;

absl::Status AttentionWorker::Step(const wire::StepRequest& req, wire::StepResponse* resp) {
  std::lock_guard<std::mutex> lock(mu_);
  ReleaseIdle();
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
    if (s.seq_id() >> 63) {  // the prefix cache's own ids
      fail(absl::InvalidArgumentError("seq_id must be below 2^63"));
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
      sc.end_ids.assign(s.end_ids().begin(), s.end_ids().end());
      if (absl::Status valid = sc.Validate(); !valid.ok()) {
        fail(valid);
        continue;
      }
      const moemesh::v1::ResponseFormat format = s.sampling().response_format();
      const bool json = format != moemesh::v1::RESPONSE_FORMAT_TEXT;
      if (json && json_tokens_ == nullptr) {
        fail(absl::FailedPreconditionError(
            "response_format JSON_OBJECT / JSON_SCHEMA needs the model's tokenizer.json beside "
            "the attention worker's weights"));
        continue;
      }
      if (json && s.end_ids_size() == 0) {
        fail(absl::InvalidArgumentError("response_format JSON_OBJECT / JSON_SCHEMA needs end_ids"));
        continue;
      }
      std::shared_ptr<const JsonSchema> schema;
      if (format == moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA) {
        absl::StatusOr<std::shared_ptr<const JsonSchema>> compiled =
            JsonSchema::Compile(s.sampling().json_schema());
        if (!compiled.ok()) {
          fail(compiled.status());
          continue;
        }
        schema = std::move(*compiled);
      } else if (json && format != moemesh::v1::RESPONSE_FORMAT_JSON_OBJECT) {
        fail(absl::InvalidArgumentError(
            absl::StrCat("unknown response_format ", static_cast<int>(format))));
        continue;
      }
      if (it != seqs_.end()) cache_->Free(s.seq_id());
      it = seqs_.insert_or_assign(s.seq_id(), std::make_unique<SeqState>(sc)).first;
      it->second->prompt_len = std::max<int64_t>(s.prompt_tokens(), 0);
      it->second->router = req.router();
      it->second->router_run = req.router_run();
      it->second->prompt_logprobs = sc.prompt_logprobs;
      if (json) {
        it->second->sampler.Constrain(std::make_unique<JsonConstraint>(
            json_tokens_, std::vector<int32_t>(s.end_ids().begin(), s.end_ids().end()),
            std::move(schema)));
      }
    } else if (it == seqs_.end()) {
      fail(absl::FailedPreconditionError(absl::StrCat("unknown sequence ", s.seq_id())));
      continue;
    }
    SeqState& st = *it->second;
    st.last_step = t_start;
    if (s.start_pos() != st.length) {
      fail(absl::FailedPreconditionError(absl::StrCat("sequence ", s.seq_id(), " has ", st.length,
                                                      " tokens, step starts at ", s.start_pos())));
      continue;
    }
    absl::Status reserved = cache_->Reserve(s.seq_id(), s.start_pos() + s.tokens_size());
    // A cache that allocates in pages (the GPU's) can run out of them before its token count
    // does: kept prefixes hold partly filled pages. Those give way to live sequences.
    while (absl::IsResourceExhausted(reserved) && DropOldestPrefix()) {
      reserved = cache_->Reserve(s.seq_id(), s.start_pos() + s.tokens_size());
    }
    if (!reserved.ok()) {
      fail(reserved);
      if (s.new_sequence()) seqs_.erase(it);
      continue;
    }
    // With a prefix cache, rows another sequence computed for the same tokens are copied and
    // only the rest computed (prefill steps: a decode step computes its one token).
    // (Not for a sequence scoring its prompt: that needs every position's logits.)
    int64_t from = s.start_pos();
    if (!prefix_.empty() && s.tokens_size() > 1 && !st.ScoresPrompt()) {
      std::vector<int32_t> history = st.History();
      history.insert(history.end(), s.tokens().begin(), s.tokens().end());
      from = ReusePrefix(s.seq_id(), history, s.start_pos(), s.start_pos() + s.tokens_size());
    }
    SeqStep b;
    b.seq_id = s.seq_id();
    b.tokens.assign(s.tokens().begin() + (from - s.start_pos()), s.tokens().end());
    b.start_pos = from;
    b.experts_per_token = s.experts_per_token();
    b.all_logits = st.ScoresPrompt();
    batch.push_back(std::move(b));
    result_of.push_back(resp->results_size() - 1);
  }
  if (batch.empty()) return absl::OkStatus();
  // Speculative decoding: decode entries get draft tokens (after every entry's own room is
  // reserved, so drafts only take KV slots nobody in the step needs).
  std::vector<std::vector<int32_t>> drafts(batch.size());
  Speculate(req, result_of, &batch, &drafts);
  for (const SeqStep& b : batch) all_tokens.insert(all_tokens.end(), b.tokens.begin(), b.tokens.end());

  // Step buffers kept between steps: a step's logits are rows x vocabulary (39 MB for 64 rows of
  // Qwen3), which fresh each step would page-fault in again.
  std::vector<float>& hidden = hidden_buf_;
  hidden.resize(all_tokens.size() * cfg.hidden_size);
  absl::Status st = encoder_->Encode(all_tokens.data(), static_cast<int64_t>(all_tokens.size()),
                                     hidden.data());
  if (!st.ok()) return st;
  // When every draw of the step is its row's argmax (greedy, nothing that reads the rest of
  // the row; no prompt scoring or drafts, which need whole rows), only the argmax ids come back
  // from the stack: a GPU's rows stay on the GPU. A moved sequence's replay below may add
  // generated tokens first: counting them before it errs towards whole rows (min_tokens).
  bool argmax_only = true;
  for (size_t b = 0; b < batch.size() && argmax_only; ++b) {
    const SeqState& state = *seqs_.at(batch[b].seq_id);
    argmax_only = !batch[b].all_logits &&
                  (!req.seqs(result_of[b]).sample() ||
                   state.sampler.ArgMaxSuffices(static_cast<int64_t>(state.generated.size())));
  }
  std::vector<float>& logits = logits_buf_;
  std::vector<int32_t>& argmax = argmax_buf_;
  double expert_s = 0;
  st = argmax_only ? Forward(batch, hidden.data(), nullptr, &argmax, &expert_s)
                   : Forward(batch, hidden.data(), &logits, nullptr, &expert_s);
  if (!st.ok()) return st;
  auto t_sample = Clock::now();
  // Batch entries that sample a token, with their logits row (the last of the entry's rows).
  std::vector<std::pair<size_t, SeqState*>> to_sample;
  std::vector<int64_t> sample_row(batch.size());
  int64_t row = 0;  // the entry's first logits row
  for (size_t b = 0; b < batch.size(); ++b) {
    const wire::SeqStep& s = req.seqs(result_of[b]);
    SeqState& state = *seqs_.at(batch[b].seq_id);
    const int64_t rows = batch[b].all_logits ? static_cast<int64_t>(batch[b].tokens.size()) : 1;
    sample_row[b] = row + rows - 1;
    if (batch[b].all_logits && drafts[b].empty()) {  // (a speculating entry's rows are drafts')
      ScorePrompt(s, &logits[row * cfg.vocab_size], &state, resp->mutable_results(result_of[b]));
    }
    row += rows;
    // The step's tokens as sent (a prefix-cache hit computed only the last of them).
    state.length += s.tokens_size();
    if (state.prompt_len > 0) {
      // A moved sequence: tokens from prompt_len on were generated (on another worker); the
      // decode input after its replay is the last of them.
      for (int i = 0; i < s.tokens_size(); ++i) {
        const int64_t p = s.start_pos() + i;
        if (p < state.prompt_len) {
          state.prompt.push_back(s.tokens(i));
        } else if (static_cast<int64_t>(state.generated.size()) == p - state.prompt_len) {
          state.generated.push_back(s.tokens(i));
          state.sampler.Observe(s.tokens(i));  // JSON mode: the replayed text counts
        }
      }
    } else if (state.generated.empty()) {
      state.prompt.insert(state.prompt.end(), s.tokens().begin(), s.tokens().end());
    }
    if (s.sample()) to_sample.emplace_back(b, &state);
  }
  // Each sequence samples from its own row with its own sampler: in parallel when the rows are
  // big (a vocabulary of 151,936 takes ~1-2 ms a row to sample at a temperature).
  // accepted[b]: draft tokens of entry b the sampler confirmed.
  std::vector<int64_t> accepted(batch.size(), 0);
  auto sample = [&](int64_t i) {
    const size_t b = to_sample[i].first;
    SeqState& state = *to_sample[i].second;
    const std::vector<int32_t>& draft = drafts[b];
    // A speculating entry has a row for its input token and one per draft: the draw from row j
    // checks draft j, and draws go on while they confirm their drafts (the first that does not,
    // or the one after the last draft, is the step's `token`).
    const int64_t first_row = sample_row[b] - static_cast<int64_t>(draft.size());
    wire::SeqResult* r = resp->mutable_results(result_of[b]);
    if (argmax_only) {  // no drafts here
      TokenChoice c = state.sampler.TakeArgMax(argmax[sample_row[b]], cfg.vocab_size,
                                               state.prompt, state.generated);
      state.generated.push_back(c.id);
      r->set_sampled(true);
      SetSampled(c, r);
      return;
    }
    for (size_t j = 0;; ++j) {
      TokenChoice c = state.sampler.Sample(&logits[(first_row + j) * cfg.vocab_size],
                                           cfg.vocab_size, state.prompt, state.generated);
      state.generated.push_back(c.id);
      if (j < draft.size() && c.id == draft[j]) {
        SetSampled(c, r->add_earlier());
        ++accepted[b];
        continue;
      }
      r->set_sampled(true);
      SetSampled(c, r);
      break;
    }
  };
  const int64_t n_sample = static_cast<int64_t>(to_sample.size());
  const int threads =
      argmax_only ? 1
                  : ops::ThreadsFor(n_sample * cfg.vocab_size, ops::SyncThreads(),
                                    kSampleWorkPerThread);
  if (threads > 1) {
    ops::ParallelForDynamic(threads, n_sample, sample);
  } else {
    for (int64_t i = 0; i < n_sample; ++i) sample(i);
  }
  // The confirmed drafts' rows stay in the KV cache; the others' slots are given back.
  for (size_t b = 0; b < batch.size(); ++b) {
    if (drafts[b].empty()) continue;
    SeqState& state = *seqs_.at(batch[b].seq_id);
    state.length += accepted[b];
    cache_->Truncate(batch[b].seq_id, state.length);
    draft_tokens_ += static_cast<int64_t>(drafts[b].size());
    accepted_draft_tokens_ += accepted[b];
  }
  ++steps_;
  sampling_s_ += Since(t_sample);
  expert_s_ += expert_s;
  attention_s_ += std::chrono::duration<double>(t_sample - t_start).count() - expert_s;
  return absl::OkStatus();
}

void AttentionWorker::Speculate(const wire::StepRequest& req, const std::vector<int>& result_of,
                                std::vector<SeqStep>* batch,
                                std::vector<std::vector<int32_t>>* drafts) {
  if (speculative_tokens_ <= 0) return;
  std::vector<size_t> decoding;  // entries decoding one token
  for (size_t b = 0; b < batch->size(); ++b) {
    const wire::SeqStep& s = req.seqs(result_of[b]);
    if (s.sample() && s.tokens_size() == 1 && !s.new_sequence()) decoding.push_back(b);
  }
  if (decoding.empty() || static_cast<int>(decoding.size()) > speculative_max_batch_) return;
  const int64_t context = stack_->config().max_position_embeddings;
  for (size_t b : decoding) {
    const wire::SeqStep& s = req.seqs(result_of[b]);
    SeqStep& e = (*batch)[b];
    if (e.all_logits) continue;  // scoring its prompt
    const SeqState& state = *seqs_.at(e.seq_id);
    std::vector<int32_t> history = state.History();
    history.push_back(s.tokens(0));
    std::vector<int32_t> draft =
        LookupDraft(history, kDraftMaxNgram, kDraftMinNgram, speculative_tokens_);
    const int64_t room = context - (s.start_pos() + 1);
    if (static_cast<int64_t>(draft.size()) > room) draft.resize(std::max<int64_t>(room, 0));
    if (draft.empty()) continue;
    if (!cache_->Reserve(e.seq_id, s.start_pos() + 1 + static_cast<int64_t>(draft.size())).ok()) {
      continue;  // no free slots: this one decodes plainly
    }
    e.tokens.insert(e.tokens.end(), draft.begin(), draft.end());
    e.all_logits = true;
    (*drafts)[b] = std::move(draft);
  }
}

void AttentionWorker::ScorePrompt(const wire::SeqStep& s, const float* rows, SeqState* state,
                                  wire::SeqResult* r) const {
  const int64_t vocab = stack_->config().vocab_size;
  const int n = s.tokens_size();
  for (int i = 0; i < n; ++i) {
    // Token i is predicted by the row before it: the previous chunk's last (kept) or this
    // chunk's row i - 1; the sequence's first token by none.
    const float* pred = i > 0 ? rows + (i - 1) * vocab
                              : (state->last_row.empty() ? nullptr : state->last_row.data());
    auto* e = r->add_prompt_logprobs();
    e->mutable_chosen()->set_id(s.tokens(i));
    if (pred == nullptr) continue;
    TokenChoice c = ScoreToken(pred, vocab, s.tokens(i), state->prompt_logprobs);
    e->mutable_chosen()->set_logprob(c.logprob);
    for (const auto& [id, lp] : c.top) {
      auto* t = e->add_top();
      t->set_id(id);
      t->set_logprob(lp);
    }
  }
  if (s.sample()) {
    state->last_row.clear();
    state->last_row.shrink_to_fit();
  } else {  // the next chunk's first token is scored with this chunk's last row
    state->last_row.assign(rows + (n - 1) * vocab, rows + n * vocab);
  }
}

absl::Status AttentionWorker::Forward(const std::vector<SeqStep>& batch, float* hidden,
                                      std::vector<float>* logits, std::vector<int32_t>* ids,
                                      double* expert_s) {
  const bool overlap =
      overlap_halves_ && experts_->local_shard() == nullptr &&
      static_cast<int>(batch.size()) >= overlap_min_sequences_;
  auto run = [&](const std::vector<SeqStep>& part, float* h, ExpertBackend* experts,
                 std::vector<float>* part_logits, std::vector<int32_t>* part_ids) {
    return part_ids != nullptr
               ? stack_->ForwardArgMax(part, h, cache_.get(), experts, part_ids)
               : stack_->Forward(part, h, cache_.get(), experts, part_logits);
  };
  if (!overlap) {
    TimedExperts timed(experts_);
    absl::Status st = run(batch, hidden, &timed, logits, ids);
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
  std::vector<int32_t>& ids_b = argmax_b_buf_;
  absl::Status st_b;
  side_->Start([&] {
    st_b = run(b, hidden + first_tokens * stack_->config().hidden_size, &timed_b, &logits_b,
               ids != nullptr ? &ids_b : nullptr);
  });
  absl::Status st = run(a, hidden, &timed_a, logits, ids);
  side_->Wait();
  *expert_s += (timed_a.seconds + timed_b.seconds) / 2;
  if (!st.ok()) return st;
  if (!st_b.ok()) return st_b;
  if (ids != nullptr) {
    ids->insert(ids->end(), ids_b.begin(), ids_b.end());
  } else {
    logits->insert(logits->end(), logits_b.begin(), logits_b.end());
  }
  return absl::OkStatus();
}

int64_t AttentionWorker::Release(const std::vector<uint64_t>& seq_ids) {
  std::lock_guard<std::mutex> lock(mu_);
  ReleaseLocked(seq_ids);
  return kv_capacity_ - LiveTokens();
}

int64_t AttentionWorker::ReleaseStale(const std::string& router, uint64_t keep_run) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t n = ReleaseWhere([&](const SeqState& st) {
    return st.router == router && st.router_run != keep_run;
  });
  if (n == 0) return 0;
  stale_released_ += n;
  std::cerr << "attention_worker: released " << n << " sequences of router " << router
            << "'s earlier run (it started again)" << std::endl;
  return n;
}

void AttentionWorker::ReleaseIdle() {
  if (idle_sequence_seconds_ <= 0) return;
  const auto now = Clock::now();
  const int64_t n = ReleaseWhere([&](const SeqState& st) {
    return std::chrono::duration<double>(now - st.last_step).count() > idle_sequence_seconds_;
  });
  if (n == 0) return;
  idle_released_ += n;
  std::cerr << "attention_worker: released " << n << " sequences no step touched for "
            << idle_sequence_seconds_ << " s (--idle_sequence_seconds: their router is gone)"
            << std::endl;
}

int64_t AttentionWorker::ReleaseWhere(const std::function<bool(const SeqState&)>& which) {
  std::vector<uint64_t> ids;
  for (const auto& [id, st] : seqs_) {
    if (which(*st)) ids.push_back(id);
  }
  ReleaseLocked(ids);
  return static_cast<int64_t>(ids.size());
}

void AttentionWorker::ReleaseLocked(const std::vector<uint64_t>& seq_ids) {
  for (uint64_t id : seq_ids) {
    auto it = seqs_.find(id);
    if (it != seqs_.end()) {
      ++released_;
      if (prefix_budget_ > 0 && KeepPrefix(id, *it->second)) {
        seqs_.erase(it);
        continue;
      }
      seqs_.erase(it);
    }
    cache_->Free(id);
  }
}

wire::Stats AttentionWorker::GetStats() const {
  wire::Stats s;
  // Outside the lock: these may ask the encoder or start probes of the expert workers.
  std::string why = encoder_->Unavailable();
  const std::string experts = experts_->Unavailable();
  if (!experts.empty()) absl::StrAppend(&why, why.empty() ? "" : "; ", experts);
  s.set_not_ready(why);
  std::lock_guard<std::mutex> lock(mu_);
  s.set_kv_capacity_tokens(kv_capacity_);
  s.set_kv_used_tokens(LiveTokens());
  s.set_prefix_cache_tokens(prefix_tokens_);
  s.set_prefix_hit_tokens(prefix_hit_tokens_);
  s.set_draft_tokens(draft_tokens_);
  s.set_accepted_draft_tokens(accepted_draft_tokens_);
  s.set_active_sequences(static_cast<int64_t>(seqs_.size()));
  s.set_released_sequences(released_);
  s.set_idle_released_sequences(idle_released_);
  s.set_stale_released_sequences(stale_released_);
  s.set_steps(steps_);
  s.set_attention_seconds(attention_s_);
  s.set_expert_wait_seconds(expert_s_);
  s.set_sampling_seconds(sampling_s_);
  s.set_device(device_);
  return s;
}

}  // namespace moemesh
