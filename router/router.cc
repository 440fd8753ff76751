#include "router/router.h"

#include <algorithm>
#include <iostream>
#include <optional>
#include <random>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/json_schema.h"
#include "mesh/sampling_params.h"
#include "router/chat_template.h"

namespace moemesh {
namespace {

using moemesh::v1::FinishReason;
using moemesh::v1::GenerateRequest;
using moemesh::v1::GenerateResponse;

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

absl::Status BadField(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("field '", field, "' ", why));
}

}  // namespace

absl::StatusOr<std::pair<int32_t, int32_t>> ThinkTokenIds(const Tokenizer& tok,
                                                          const ModelConfig& cfg,
                                                          const std::string& spec) {
  const std::vector<std::string> names =
      spec.empty() ? std::vector<std::string>{"<think>", "</think>"}
                   : std::vector<std::string>(absl::StrSplit(spec, ','));
  if (names.size() != 2 || names[0].empty() || names[1].empty() || names[0] == names[1]) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--think_tokens must be two different tokens START,END (e.g. <think>,</think>), not '",
        spec, "'"));
  }
  int32_t ids[2];
  for (int i = 0; i < 2; ++i) {
    const std::optional<int32_t> id = tok.TokenToId(names[i]);
    if (!id.has_value() || *id >= cfg.vocab_size) {
      if (spec.empty()) return std::make_pair(-1, -1);
      return absl::InvalidArgumentError(absl::StrCat("--think_tokens: '", names[i],
                                                     "' is not a token of the model's tokenizer"));
    }
    ids[i] = *id;
  }
  return std::make_pair(ids[0], ids[1]);
}

absl::StatusOr<std::unique_ptr<Router>> Router::Create(const Tokenizer* tok, const ModelConfig& cfg,
                                                       const GenerationDefaults& defaults,
                                                       std::vector<AttentionClient*> attention,
                                                       const RouterOptions& opt) {
  if (attention.empty()) return absl::InvalidArgumentError("the router needs an attention worker");
  if (!(opt.worker_retry_seconds > 0 && opt.worker_retry_seconds <= kMaxRetrySeconds)) {
    return absl::InvalidArgumentError(absl::StrCat("--worker_retry_seconds must be in (0, ",
                                                   kMaxRetrySeconds, "]"));
  }
  if (!(opt.outage_wait_seconds >= 0)) {
    return absl::InvalidArgumentError("--outage_wait_seconds must be >= 0");
  }
  auto think_ids = ThinkTokenIds(*tok, cfg, opt.think_tokens);
  if (!think_ids.ok()) return think_ids.status();
  // Sequence ids unique to this run in their high 31 bits (bit 63 is the workers' own): a
  // router started while another is still draining on the same workers (a rolling update), or
  // after one was killed, takes no sequence of the other's over.
  const uint32_t run = std::random_device()() & 0x7fffffffu;
  std::vector<int64_t> caps, foreign;
  for (size_t i = 0; i < attention.size(); ++i) {
    AttentionClient* a = attention[i];
    if (!opt.name.empty()) {
      // What an earlier run of this router left (it was killed): free now, before counting.
      absl::Status st = a->ReleaseStale(opt.name, run);
      if (!st.ok()) {
        std::cerr << "router: could not ask attention worker " << i << " to free what an "
                  << "earlier run of router " << opt.name << " left (" << st.message()
                  << "); its --idle_sequence_seconds will" << std::endl;
      }
    }
    int64_t cap = opt.kv_capacity_tokens, used = 0;
    if (cap <= 0) {
      auto stats = a->GetStats();
      if (!stats.ok()) return stats.status();
      cap = stats->kv_capacity_tokens();
      used = stats->kv_used_tokens();  // none of them ours yet
    }
    caps.push_back(cap);
    foreign.push_back(used);
  }
  return std::unique_ptr<Router>(
      new Router(tok, cfg, defaults, std::move(attention), opt, caps, foreign, *think_ids, run));
}

Router::Router(const Tokenizer* tok, const ModelConfig& cfg, const GenerationDefaults& defaults,
               std::vector<AttentionClient*> attention, const RouterOptions& opt,
               const std::vector<int64_t>& kv_capacity, const std::vector<int64_t>& kv_foreign,
               std::pair<int32_t, int32_t> think_ids, uint32_t run)
    : tok_(tok),
      cfg_(cfg),
      defaults_(defaults),
      opt_(opt),
      think_start_id_(think_ids.first),
      think_end_id_(think_ids.second),
      seed_base_((static_cast<uint64_t>(std::random_device()()) << 32) ^ std::random_device()()),
      run_(run),
      lanes_(attention.size()) {
  {
    std::lock_guard<std::mutex> l(mu_);
    next_id_ = (static_cast<uint64_t>(run) << 32) + 1;
  }
  for (size_t i = 0; i < lanes_.size(); ++i) {
    lanes_[i].client = attention[i];
    lanes_[i].kv_capacity = kv_capacity[i];
    lanes_[i].foreign = kv_foreign[i];  // asked again at once (foreign_check)
    lanes_[i].retry_seconds = opt_.worker_retry_seconds;
    max_kv_capacity_ = std::max(max_kv_capacity_, kv_capacity[i]);
  }
  for (size_t i = 0; i < lanes_.size(); ++i) {
    lanes_[i].thread = std::thread([this, i] { Loop(i); });
  }
}

Router::~Router() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (Lane& lane : lanes_) lane.thread.join();
  std::vector<Outgoing> out;
  {
    std::lock_guard<std::mutex> l(mu_);
    const absl::Status st = absl::UnavailableError("the router is shutting down");
    for (Lane& lane : lanes_) {
      for (auto& r : lane.running) Fail(r.get(), st, &out);
      lane.running.clear();
    }
    for (auto& r : waiting_) Fail(r.get(), st, &out);
    waiting_.clear();
  }
  Deliver(&out);
}

absl::StatusOr<std::vector<int32_t>> Router::PromptIds(const GenerateRequest& req) const {
  std::vector<int32_t> ids;
  switch (req.input_case()) {
    case GenerateRequest::kText:
      ids = tok_->Encode(req.text(), /*add_special_tokens=*/true);
      break;
    case GenerateRequest::kTokenIds:
      if (absl::Status st = CheckTokenIds("token_ids", req.token_ids().ids(), cfg_.vocab_size);
          !st.ok()) {
        return st;
      }
      ids.assign(req.token_ids().ids().begin(), req.token_ids().ids().end());
      break;
    case GenerateRequest::kChat: {
      if (!SupportsChatML(*tok_)) {
        return BadField("chat", "is not supported: the tokenizer has no <|im_start|> token");
      }
      std::vector<std::pair<std::string, std::string>> msgs;
      for (const auto& m : req.chat().messages()) msgs.emplace_back(m.role(), m.content());
      auto text = RenderChatML(msgs, /*add_generation_prompt=*/true);
      if (!text.ok()) return BadField("chat", std::string(text.status().message()));
      ids = tok_->Encode(*text, /*add_special_tokens=*/true);
      break;
    }
    default:
      return absl::InvalidArgumentError("the request has no input: set text, token_ids or chat");
  }
  if (ids.empty()) return absl::InvalidArgumentError("the prompt is empty");
  return ids;
}

absl::Status CheckTokenIds(const std::string& field, absl::Span<const int32_t> ids,
                           int64_t vocab) {
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab) {
      return BadField(field, absl::StrCat("holds id ", id, " outside the vocabulary [0, ", vocab,
                                          ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> Router::Submit(const GenerateRequest& req, GenerationSink* sink) {
  absl::StatusOr<uint64_t> id = SubmitChecked(req, sink);
  if (absl::IsInvalidArgument(id.status())) {
    std::lock_guard<std::mutex> l(mu_);
    ++counters_.invalid;
  }
  return id;
}

absl::StatusOr<uint64_t> Router::SubmitChecked(const GenerateRequest& req, GenerationSink* sink) {
  const auto submitted_at = std::chrono::steady_clock::now();
  auto prompt = PromptIds(req);
  if (!prompt.ok()) return prompt.status();
  const int64_t ctx = cfg_.max_position_embeddings;
  const int64_t plen = static_cast<int64_t>(prompt->size());
  if (plen >= ctx) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt has ", plen,
                                                   " tokens; the model's context is ", ctx));
  }
  auto r = std::make_unique<Request>();
  r->prompt = std::move(*prompt);
  const auto& sp = req.sampling();
  r->sampling = ResolveDefaults(sp, defaults_);
  if (!r->sampling.has_seed()) {
    uint64_t z = seed_base_ + 0x9e3779b97f4a7c15ull * (seeds_drawn_.fetch_add(1) + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    r->sampling.set_seed(z ^ (z >> 31));
  }
  if (sp.has_thinking_budget()) {
    if (sp.thinking_budget() < 0) return BadField("thinking_budget", "must be >= 0");
    if (think_end_id_ < 0) {
      return BadField("thinking_budget",
                      "is not supported: the model's tokenizer has no <think> and </think> tokens "
                      "(the server's --think_tokens names other markers)");
    }
    r->thinking_budget = true;
  }
  const moemesh::v1::ResponseFormat format = sp.response_format();
  if (format != moemesh::v1::RESPONSE_FORMAT_TEXT &&
      format != moemesh::v1::RESPONSE_FORMAT_JSON_OBJECT &&
      format != moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA) {
    return BadField("response_format",
                    absl::StrCat("has an unknown value ", static_cast<int>(format)));
  }
  if (!sp.json_schema().empty() && format != moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA) {
    return BadField("json_schema", "is only for response_format JSON_SCHEMA");
  }
  if (format != moemesh::v1::RESPONSE_FORMAT_TEXT) {
    const std::string name =
        format == moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA ? "JSON_SCHEMA" : "JSON_OBJECT";
    if (sp.has_thinking_budget()) {
      return BadField("response_format", name + " cannot be combined with thinking_budget");
    }
    if (sp.has_ignore_eos() && sp.ignore_eos()) {
      return BadField("response_format", name + " needs an end token: not with ignore_eos");
    }
    if (format == moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA) {
      auto schema = JsonSchema::Compile(sp.json_schema());  // checked here, used by the worker
      if (!schema.ok()) return schema.status();
    }
  }
  SamplingConfig sc = ToSamplingConfig(r->sampling);
  sc.think_start_id = think_start_id_;
  sc.think_end_id = think_end_id_;
  absl::Status st = sc.Validate();
  if (!st.ok()) return st;
  if (sp.has_max_tokens() && sp.max_tokens() < 1) return BadField("max_tokens", "must be >= 1");
  r->max_tokens = ctx - plen;
  if (sp.has_max_tokens()) {
    r->max_tokens = std::min<int64_t>(r->max_tokens, sp.max_tokens());
  } else if (defaults_.max_new_tokens) {
    r->max_tokens = std::min<int64_t>(r->max_tokens, *defaults_.max_new_tokens);
  }
  if (sp.has_experts_per_token() &&
      (sp.experts_per_token() < 1 || sp.experts_per_token() > cfg_.num_experts)) {
    return BadField("experts_per_token", absl::StrCat("must be in [1, ", cfg_.num_experts, "]"));
  }
  r->experts_per_token = sp.has_experts_per_token() ? sp.experts_per_token() : 0;
  if (absl::Status st = CheckTokenIds("stop_token_ids", sp.stop_token_ids(), cfg_.vocab_size);
      !st.ok()) {
    return st;
  }
  r->stop_ids.assign(sp.stop_token_ids().begin(), sp.stop_token_ids().end());
  const int32_t min_tokens = sp.has_min_tokens() ? sp.min_tokens() : 0;
  if (min_tokens < 0 || min_tokens > r->max_tokens) {
    return BadField("min_tokens", absl::StrCat("must be in [0, max_tokens = ", r->max_tokens, "]"));
  }
  if (min_tokens > 0 && format != moemesh::v1::RESPONSE_FORMAT_TEXT) {
    return BadField("min_tokens", "cannot be combined with a JSON response_format");
  }
  if (sp.logit_bias_size() > 1024) {
    return BadField("logit_bias", absl::StrCat("has ", sp.logit_bias_size(),
                                               " entries; at most 1024"));
  }
  for (const auto& [id, bias] : sp.logit_bias()) {
    if (id < 0 || id >= cfg_.vocab_size) {
      return BadField("logit_bias", absl::StrCat("holds id ", id, " outside the vocabulary"));
    }
  }
  r->ignore_eos = sp.has_ignore_eos() && sp.ignore_eos();
  if (!r->ignore_eos) {
    for (int32_t id : cfg_.eos_token_ids) r->stop_ids.push_back(id);
    for (int32_t id : defaults_.eos_token_ids) r->stop_ids.push_back(id);
  }
  r->stream = std::make_unique<TextStream>(
      tok_, std::vector<std::string>(sp.stop().begin(), sp.stop().end()), /*skip_special=*/true,
      min_tokens);
  r->sink = sink;
  const int64_t need = plen + r->max_tokens;
  std::lock_guard<std::mutex> l(mu_);
  if (draining_) {
    ++counters_.refused_draining;
    return absl::UnavailableError(
        "the server is shutting down (draining its requests): send this one to another replica");
  }
  if (absl::Status e = OutageError(); !e.ok()) {
    ++counters_.refused_unavailable;
    return e;
  }
  if (need > max_kv_capacity_) {
    ++counters_.rejected;
    return absl::ResourceExhaustedError(absl::StrCat(
        "the request needs ", need, " KV cache slots (prompt + max_tokens); the cache holds ",
        max_kv_capacity_, ": lower max_tokens"));
  }
  if (static_cast<int64_t>(waiting_.size()) >= opt_.max_queue) {
    ++counters_.rejected;
    return absl::ResourceExhaustedError(
        absl::StrCat("the request queue is full (", waiting_.size(), " waiting): retry later"));
  }
  r->id = next_id_++;
  r->submitted_at = submitted_at;
  const uint64_t id = r->id;
  r->priority = req.priority();
  // After every waiting request of the same or a more urgent priority.
  auto at = std::find_if(waiting_.begin(), waiting_.end(),
                         [p = r->priority](const auto& w) { return w->priority > p; });
  waiting_.insert(at, std::move(r));
  ++counters_.submitted;
  Admit();
  return id;
}

void Router::Admit() {
  while (!waiting_.empty()) {
    Request* r = waiting_.front().get();
    const int64_t need = static_cast<int64_t>(r->prompt.size()) + r->max_tokens;
    Lane* best = nullptr;
    int64_t best_free = 0;
    for (Lane& lane : lanes_) {
      const int64_t free = lane.kv_capacity - lane.kv_reserved - lane.foreign;
      if (lane.down || free < need ||
          static_cast<int64_t>(lane.running.size()) >= opt_.max_running) {
        continue;
      }
      if (best == nullptr || free > best_free) {
        best = &lane;
        best_free = free;
      }
    }
    if (best == nullptr) break;  // in queue order: the head waits for room
    if (!r->admitted_once) {  // (a moved or refused request is back in the queue)
      r->admitted_once = true;
      counters_.queue_time.Observe(Seconds(std::chrono::steady_clock::now() - r->submitted_at));
    }
    best->kv_reserved += need;
    r->reserved = need;
    r->lane = static_cast<int>(best - lanes_.data());
    best->running.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  cv_.notify_all();
}

void Router::Cancel(uint64_t id) {
  std::vector<Outgoing> out;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
      if ((*it)->id == id) {
        Finish(it->get(), moemesh::v1::FINISH_REASON_CANCELLED, "", &out);
        waiting_.erase(it);
        break;
      }
    }
    for (Lane& lane : lanes_) {
      for (auto& r : lane.running) {
        if (r->id == id) r->cancelled = true;
      }
    }
    Admit();
  }
  Deliver(&out);
}

struct Router::StatsRound {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<absl::StatusOr<wire::Stats>> stats ABSL_GUARDED_BY(mu);
  size_t waiting ABSL_GUARDED_BY(mu) = 0;  // workers yet to answer
  bool can_serve ABSL_GUARDED_BY(mu) = false;  // some worker's answer CanServe
};

std::shared_ptr<Router::StatsRound> Router::AskStats() const {
  auto round = std::make_shared<StatsRound>();
  {
    std::lock_guard<std::mutex> l(round->mu);
    round->stats.assign(lanes_.size(), absl::UnavailableError("no answer yet"));
    round->waiting = lanes_.size();
  }
  for (size_t i = 0; i < lanes_.size(); ++i) {
    // The callback holds the round, not the router: it may come after the caller stopped waiting.
    lanes_[i].client->GetStatsAsync([round, i](absl::StatusOr<wire::Stats> s) {  // client: fixed
      std::lock_guard<std::mutex> l(round->mu);
      round->can_serve = round->can_serve || CanServe(s);
      round->stats[i] = std::move(s);
      --round->waiting;
      round->cv.notify_all();
    });
  }
  return round;
}

std::vector<absl::StatusOr<wire::Stats>> Router::WorkerStats() const {
  const std::shared_ptr<StatsRound> round = AskStats();
  std::unique_lock<std::mutex> l(round->mu);
  round->cv.wait(l, [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return round->waiting == 0; });
  return round->stats;
}

absl::Status Router::SomeWorkerCanServe() const {
  const std::shared_ptr<StatsRound> round = AskStats();
  std::unique_lock<std::mutex> l(round->mu);
  round->cv.wait(l, [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return round->can_serve || round->waiting == 0;
  });
  if (round->can_serve) return absl::OkStatus();
  const absl::StatusOr<wire::Stats>& first = round->stats[0];
  return absl::UnavailableError(first.ok() ? first->not_ready() : first.status().ToString());
}

void Router::Drain() {
  std::lock_guard<std::mutex> l(mu_);
  draining_ = true;
}

bool Router::draining() const {
  std::lock_guard<std::mutex> l(mu_);
  return draining_;
}

bool Router::WaitIdle(std::chrono::steady_clock::duration timeout) const {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    {
      std::lock_guard<std::mutex> l(mu_);
      bool idle = waiting_.empty();
      for (const Lane& lane : lanes_) idle = idle && lane.running.empty();
      if (idle) return true;
    }
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Router::Counters Router::counters() const {
  std::lock_guard<std::mutex> l(mu_);
  Counters c = counters_;
  c.waiting = static_cast<int64_t>(waiting_.size());
  c.draining = draining_;
  for (const Lane& lane : lanes_) {
    c.running += static_cast<int64_t>(lane.running.size());
    c.kv_reserved += lane.kv_reserved;
    c.steps += lane.steps;
    c.steps_per_worker.push_back(lane.steps);
    c.kv_reserved_per_worker.push_back(lane.kv_reserved);
    c.kv_capacity_per_worker.push_back(lane.kv_capacity);
    c.kv_foreign_per_worker.push_back(lane.foreign);
    c.worker_up.push_back(!lane.down);
  }
  return c;
}

void Router::Finish(Request* r, FinishReason reason, const std::string& text_tail,
                    std::vector<Outgoing>* out) {
  Outgoing o;
  o.sink = r->sink;
  o.final_response = true;
  o.response.set_text(text_tail);
  o.response.set_finish_reason(reason);
  o.response.set_prompt_tokens(static_cast<int32_t>(r->prompt.size()));
  o.response.set_completion_tokens(static_cast<int32_t>(r->generated.size()));
  out->push_back(std::move(o));
  Outgoing f;
  f.sink = r->sink;
  f.finish = true;
  out->push_back(std::move(f));
  if (reason == moemesh::v1::FINISH_REASON_CANCELLED) {
    ++counters_.cancelled;
  } else {
    ++counters_.finished;
    if (reason == moemesh::v1::FINISH_REASON_LENGTH) ++counters_.finished_length;
    const auto end = r->generated.empty() ? std::chrono::steady_clock::now() : r->last_token_at;
    counters_.request_latency.Observe(Seconds(end - r->submitted_at));
    counters_.request_prompt_tokens.Observe(static_cast<double>(r->prompt.size()));
    counters_.request_generation_tokens.Observe(static_cast<double>(r->generated.size()));
  }
  Unreserve(r);
  r->sink = nullptr;
}

void Router::Fail(Request* r, const absl::Status& st, std::vector<Outgoing>* out) {
  if (r->sink == nullptr) return;
  Outgoing f;
  f.sink = r->sink;
  f.finish = true;
  f.status = st;
  out->push_back(std::move(f));
  ++counters_.failed;
  Unreserve(r);
  r->sink = nullptr;
}

void Router::Requeue(size_t index, const absl::Status& st, std::vector<Outgoing>* out) {
  Lane& lane = lanes_[index];
  const absl::Status failed(st.code(), absl::StrCat("step failed: ", st.message()));
  if (!lane.down) {
    std::cerr << "router: attention worker " << index << " is out of service (" << failed
              << "); its requests go back to the queue" << std::endl;
  }
  lane.down = true;
  lane.AskAgainIn(lane.retry_seconds);
  TakeBack(index, nullptr, failed, /*move=*/true, out);
  outage_status_ = failed;
  if (!outage_ && std::all_of(lanes_.begin(), lanes_.end(), [](const Lane& l) { return l.down; })) {
    outage_ = true;
    outage_since_ = std::chrono::steady_clock::now();
  }
  FailWaitingAfterOutage(out);  // at once with outage_wait_seconds = 0
  Admit();
}

size_t Router::TakeBack(size_t index, const std::vector<Request*>* which,
                        const absl::Status& why, bool move, std::vector<Outgoing>* out) {
  Lane& lane = lanes_[index];
  std::deque<std::unique_ptr<Request>> back;
  for (auto& rp : lane.running) {
    Request* r = rp.get();
    if (r->sink == nullptr ||
        (which != nullptr && std::find(which->begin(), which->end(), r) == which->end())) {
      continue;
    }
    if (r->cancelled) {
      Finish(r, moemesh::v1::FINISH_REASON_CANCELLED, "", out);
      continue;
    }
    if (move && r->moves >= opt_.max_moves) {
      Fail(r, why, out);
      continue;
    }
    Unreserve(r);  // its sequence is released on this worker (once it answers again)
    r->lane = -1;
    r->started = false;
    r->prefilled = 0;
    r->replay = std::max<int64_t>(static_cast<int64_t>(r->generated.size()) - 1, 0);
    if (move) {
      ++r->moves;
      ++counters_.moved;
    } else {
      ++counters_.requeued_no_room;
    }
    back.push_back(std::move(rp));
  }
  // Those taken back, and those that ended.
  lane.running.erase(std::remove_if(lane.running.begin(), lane.running.end(),
                                    [](const auto& r) { return r == nullptr || r->sink == nullptr; }),
                     lane.running.end());
  // Ahead of the queue, in their order: they were admitted before anything waiting.
  const size_t n = back.size();
  waiting_.insert(waiting_.begin(), std::make_move_iterator(back.begin()),
                  std::make_move_iterator(back.end()));
  return n;
}

void Router::SendBack(size_t index, const std::vector<Request*>& which, const absl::Status& why,
                      bool no_room, std::vector<Outgoing>* out) {
  Lane& lane = lanes_[index];
  const size_t back = TakeBack(index, &which, why, /*move=*/!no_room, out);
  if (!no_room) {
    if (back > 0) {
      std::cerr << "router: attention worker " << index << " no longer has the sequences of "
                << back << " of its requests (" << why.message()
                << ": it was restarted, or released them after --idle_sequence_seconds); they "
                   "start again from the queue"
                << std::endl;
    }
  } else {
    if (back > 0 && lane.foreign == 0) {
      std::cerr << "router: attention worker " << index << " has no KV cache room for "
                << back << " of its requests (" << why.message()
                << "): it holds sequences this router does not run (another router's, or a "
                   "stopped one's until --idle_sequence_seconds); they go back to the queue"
                << std::endl;
    }
    // Until it is asked, the worker has no room but what this router's reservations leave.
    lane.foreign = std::max<int64_t>(
        {lane.foreign, lane.kv_capacity - lane.kv_reserved, int64_t{1}});
    lane.foreign_check = std::chrono::steady_clock::now();
  }
}

void Router::CheckForeignRows(size_t index, std::unique_lock<std::mutex>& l) {
  Lane& lane = lanes_[index];
  std::vector<uint64_t> releases;
  releases.swap(lane.to_release);
  l.unlock();
  if (!releases.empty()) lane.client->Release(releases).IgnoreError();
  const absl::StatusOr<wire::Stats> stats = lane.client->GetStats();
  l.lock();
  // Only this thread steps the lane, so its requests' rows are those the worker reported
  // (those admitted meanwhile have none yet).
  int64_t own = 0;
  for (const auto& r : lane.running) own += r->rows();
  const int64_t before = lane.foreign;
  if (stats.ok()) lane.foreign = std::max<int64_t>(stats->kv_used_tokens() - own, 0);
  lane.foreign_check = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(kForeignPollSeconds * 1e3));
  if (lane.foreign < before) Admit();
}

std::chrono::steady_clock::time_point Router::OutageDeadline() const {
  return outage_since_ +
         std::chrono::microseconds(static_cast<int64_t>(opt_.outage_wait_seconds * 1e6));
}

absl::Status Router::OutageError() const {
  const auto now = std::chrono::steady_clock::now();
  if (!outage_ || now < OutageDeadline()) return absl::OkStatus();
  const double down = Seconds(now - outage_since_);
  return absl::UnavailableError(
      absl::StrCat("no attention worker has been in service for ", absl::SixDigits(down),
                   " s (--outage_wait_seconds=", opt_.outage_wait_seconds,
                   "); the last failure: ", outage_status_.message()));
}

bool Router::FailWaitingAfterOutage(std::vector<Outgoing>* out) {
  const absl::Status e = OutageError();
  if (e.ok() || waiting_.empty()) return false;
  for (auto& r : waiting_) Fail(r.get(), e, out);
  waiting_.clear();
  return true;
}

void Router::Unreserve(Request* r) {
  if (r->lane < 0) return;  // still waiting: nothing reserved
  Lane& lane = lanes_[r->lane];
  lane.kv_reserved -= r->reserved;
  r->reserved = 0;
  if (r->started) lane.to_release.push_back(r->id);
}

template <typename Sampled>
bool Router::OnToken(Request* r, const Sampled& res, std::vector<Outgoing>* out) {
  const int32_t id = res.token();
  r->generated.push_back(id);
  const auto now = std::chrono::steady_clock::now();
  if (r->generated.size() == 1) {
    counters_.time_to_first_token.Observe(Seconds(now - r->submitted_at));
  } else {
    counters_.inter_token.Observe(Seconds(now - r->last_token_at));
  }
  r->last_token_at = now;
  ++counters_.generation_tokens;
  Outgoing o;
  o.sink = r->sink;
  GenerateResponse& resp = o.response;
  resp.add_ids(id);
  if (r->generated.size() == 1 && r->sampling.has_prompt_logprobs()) {
    for (auto& e : r->prompt_logprobs) *resp.add_prompt_logprobs() = std::move(e);
    r->prompt_logprobs.clear();
  }
  if (r->sampling.has_logprobs() && r->sampling.logprobs() > 0) {
    auto* lp = resp.add_logprobs();
    lp->mutable_chosen()->set_id(id);
    lp->mutable_chosen()->set_logprob(res.logprob());
    lp->mutable_chosen()->set_text(tok_->Decode({id}, false));
    for (int i = 0; i < res.top_ids_size(); ++i) {
      auto* t = lp->add_top();
      t->set_id(res.top_ids(i));
      t->set_logprob(res.top_logprobs(i));
      t->set_text(tok_->Decode({res.top_ids(i)}, false));
    }
  }
  StreamDelta d = r->stream->Push(id);
  std::string text = d.text;
  FinishReason reason = moemesh::v1::FINISH_REASON_UNSPECIFIED;
  const bool stop_id = std::find(r->stop_ids.begin(), r->stop_ids.end(), id) != r->stop_ids.end();
  const int64_t total = static_cast<int64_t>(r->prompt.size() + r->generated.size());
  if (d.stopped) {
    reason = moemesh::v1::FINISH_REASON_STOP;
  } else if (stop_id || static_cast<int64_t>(r->generated.size()) >= r->max_tokens ||
             total >= cfg_.max_position_embeddings) {
    text += r->stream->Finish();
    reason = stop_id || r->stream->stopped() ? moemesh::v1::FINISH_REASON_STOP
                                             : moemesh::v1::FINISH_REASON_LENGTH;
  }
  if (reason == moemesh::v1::FINISH_REASON_UNSPECIFIED) {
    resp.set_text(text);
    out->push_back(std::move(o));
    return false;
  }
  // The token's response is the last one: it carries the finish reason and the counts.
  Finish(r, reason, text, out);
  // Merge: move ids/logprobs into the final response Finish queued.
  GenerateResponse& fin = (*out)[out->size() - 2].response;
  *fin.mutable_ids() = resp.ids();
  *fin.mutable_logprobs() = resp.logprobs();
  *fin.mutable_prompt_logprobs() = resp.prompt_logprobs();
  return true;
}

void Router::Deliver(std::vector<Outgoing>* out) {
  for (Outgoing& o : *out) {
    if (o.finish) {
      o.sink->OnFinish(o.status);
    } else {
      o.sink->OnResponse(o.response);
    }
  }
  out->clear();
}

void Router::Loop(size_t index) {
  Lane& lane = lanes_[index];
  std::vector<Outgoing> out;
  auto remove_ended = [&lane]() {
    lane.running.erase(std::remove_if(lane.running.begin(), lane.running.end(),
                                      [](const auto& r) { return r->sink == nullptr; }),
                       lane.running.end());
  };
  while (true) {
    wire::StepRequest req;
    std::vector<Request*> in_step;
    std::vector<int64_t> chunk;  // prompt tokens each step entry carries (0 = decode)
    std::vector<bool> fresh;     // whether each step entry starts its sequence
    std::vector<uint64_t> releases;
    {
      std::unique_lock<std::mutex> l(mu_);
      while (!stop_) {
        if (lane.down) {
          // An outage past its wait fails the waiting requests (any lane's thread, once).
          if (FailWaitingAfterOutage(&out)) {
            l.unlock();
            Deliver(&out);
            l.lock();
            continue;
          }
          // Ask the failed worker again at retry_at (or wake at the outage's end, above).
          const auto now = std::chrono::steady_clock::now();
          if (now < lane.retry_at) {
            auto until = lane.retry_at;
            if (outage_ && !waiting_.empty()) until = std::min(until, OutageDeadline());
            cv_.wait_until(l, std::max(until, now + std::chrono::milliseconds(1)));
            continue;
          }
          l.unlock();
          const absl::StatusOr<wire::Stats> stats = lane.client->GetStats();
          l.lock();
          if (CanServe(stats)) {
            std::cerr << "router: attention worker " << index << " serves again" << std::endl;
            lane.down = false;
            lane.retry_seconds = opt_.worker_retry_seconds;
            outage_ = false;
            Admit();
          } else {
            lane.retry_seconds = std::min(lane.retry_seconds * 2, kMaxRetrySeconds);
            lane.AskAgainIn(lane.retry_seconds);
          }
          continue;
        }
        if (lane.foreign > 0 && std::chrono::steady_clock::now() >= lane.foreign_check) {
          CheckForeignRows(index, l);
          continue;
        }
        if (!lane.running.empty() || !lane.to_release.empty()) break;
        if (lane.foreign > 0) {
          cv_.wait_until(l, lane.foreign_check);
        } else {
          cv_.wait(l);
        }
      }
      if (stop_) break;
      // Cancelled requests end at this step boundary.
      bool ended = false;
      for (auto& r : lane.running) {
        if (r->cancelled && r->sink != nullptr) {
          Finish(r.get(), moemesh::v1::FINISH_REASON_CANCELLED, "", &out);
          ended = true;
        }
      }
      remove_ended();
      if (ended) Admit();
      // One step: a token for every decoding sequence, prompt chunks within the budget.
      int64_t budget = opt_.prefill_chunk;
      for (auto& rp : lane.running) {
        Request* r = rp.get();
        wire::SeqStep* s = nullptr;
        const int64_t plen = static_cast<int64_t>(r->prompt.size());
        const int64_t ctx = r->context();
        if (r->prefilled < ctx) {
          const int64_t n = std::min(ctx - r->prefilled, budget);
          if (n <= 0) continue;
          budget -= n;
          s = req.add_seqs();
          for (int64_t i = r->prefilled; i < r->prefilled + n; ++i) {
            s->add_tokens(r->context_token(i));
          }
          s->set_start_pos(r->prefilled);
          // A moved request already has its next input token: its prefill samples nothing.
          s->set_sample(r->prefilled + n == ctx && r->generated.empty());
          chunk.push_back(n);
        } else {
          s = req.add_seqs();
          s->add_tokens(r->generated.back());
          s->set_start_pos(plen + static_cast<int64_t>(r->generated.size()) - 1);
          s->set_sample(true);
          chunk.push_back(0);
        }
        s->set_seq_id(r->id);
        s->set_experts_per_token(r->experts_per_token);
        fresh.push_back(!r->started);
        if (!r->started) {
          s->set_new_sequence(true);
          *s->mutable_sampling() = r->sampling;
          if (r->thinking_budget) {
            s->set_think_start_id(think_start_id_);
            s->set_think_end_id(think_end_id_);
          }
          if (r->sampling.response_format() != moemesh::v1::RESPONSE_FORMAT_TEXT ||
              r->sampling.min_tokens() > 0) {
            for (int32_t id : r->stop_ids) s->add_end_ids(id);
          }
          if (!r->generated.empty()) s->set_prompt_tokens(plen);  // moved: replays its tokens
          r->prompt_logprobs.clear();  // (a prefill moved before its first token starts over)
          r->started = true;
        }
        in_step.push_back(r);
      }
      releases.swap(lane.to_release);
    }
    // Noted on the sequences the step starts (ReleaseStale); only those read it.
    if (!opt_.name.empty() && std::find(fresh.begin(), fresh.end(), true) != fresh.end()) {
      req.set_router(opt_.name);
      req.set_router_run(run_);
    }
    Deliver(&out);
    if (!releases.empty()) lane.client->Release(releases).IgnoreError();
    if (in_step.empty()) continue;

    wire::StepResponse resp;
    absl::Status st = lane.client->Step(req, &resp);
    {
      std::lock_guard<std::mutex> l(mu_);
      ++lane.steps;
      if (st.ok() && resp.results_size() != static_cast<int>(in_step.size())) {
        st = absl::InternalError("the attention worker answered a different number of sequences");
      }
      if (!st.ok()) {
        Requeue(index, st, &out);  // the step's results are void
        in_step.clear();
      }
      std::vector<Request*> no_room, lost;
      absl::Status no_room_why, lost_why;
      for (size_t i = 0; i < in_step.size(); ++i) {
        Request* r = in_step[i];
        if (r->sink == nullptr) continue;
        const wire::SeqResult& res = resp.results(static_cast<int>(i));
        const auto code = static_cast<absl::StatusCode>(res.error_code());
        // No KV room: the worker holds other routers' sequences. The request waits for room.
        if (code == absl::StatusCode::kResourceExhausted) {
          no_room.push_back(r);
          no_room_why = absl::ResourceExhaustedError(res.error());
          continue;
        }
        // A sequence the worker no longer has as this router left it ("unknown sequence": the
        // worker was restarted, or released it as idle while this router was stopped): it
        // starts again, as a moved request does.
        if (code == absl::StatusCode::kFailedPrecondition && !fresh[i]) {
          lost.push_back(r);
          lost_why = absl::FailedPreconditionError(res.error());
          continue;
        }
        if (res.error_code() != 0) {
          Fail(r, absl::Status(static_cast<absl::StatusCode>(res.error_code()), res.error()), &out);
          continue;
        }
        r->prefilled += chunk[i];
        if (!r->prompt_counted && r->prefilled >= static_cast<int64_t>(r->prompt.size())) {
          r->prompt_counted = true;
          counters_.prompt_tokens += static_cast<int64_t>(r->prompt.size());
        }
        if (r->generated.empty()) {
          for (const moemesh::v1::TokenLogprobs& e : res.prompt_logprobs()) {
            moemesh::v1::TokenLogprobs& kept = r->prompt_logprobs.emplace_back(e);
            kept.mutable_chosen()->set_text(tok_->Decode({e.chosen().id()}, false));
            for (auto& t : *kept.mutable_top()) t.set_text(tok_->Decode({t.id()}, false));
          }
        }
        if (r->cancelled || !res.sampled()) continue;
        // Speculative decoding: tokens confirmed before the step's last one, in order.
        bool finished = false;
        for (const wire::EarlierToken& e : res.earlier()) {
          if ((finished = OnToken(r, e, &out))) break;
        }
        if (!finished) OnToken(r, res, &out);
      }
      if (!no_room.empty()) SendBack(index, no_room, no_room_why, /*no_room=*/true, &out);
      if (!lost.empty()) SendBack(index, lost, lost_why, /*no_room=*/false, &out);
      remove_ended();
      Admit();  // the KV cache freed above may fit waiting requests (on any worker)
    }
    Deliver(&out);
  }
}

}  // namespace moemesh
