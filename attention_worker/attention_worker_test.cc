// AttentionWorker over two expert "workers" (in-process transports behind the dispatcher, as
// remote workers are): greedy decoding of the oracle's prompts, all in one batch, reproduces
// transformers' greedy ids with the step run whole and as two overlapping halves; a sequence
// moved from another worker continues exactly as if it had not moved.
#include "attention_worker/attention_worker.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/arch.h"
#include "engine/config.h"
#include "engine/model.h"
#include "engine/json_constraint.h"
#include "engine/safetensors.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"
#include "mesh/encoder_backend.h"
#include "mesh/expert_dispatch.h"
#include "mesh/placement.h"
#include "nlohmann/json.hpp"

namespace moemesh {
namespace {

struct Parts {
  ModelConfig cfg;
  std::unique_ptr<CheckpointReader> ckpt;
  std::unique_ptr<AttentionStack> stack;
  std::unique_ptr<Embedder> embedder;
  std::unique_ptr<LocalEncoder> encoder;
  std::vector<std::unique_ptr<ExpertShard>> shards;
  std::unique_ptr<ExpertDispatcher> experts;
};

std::unique_ptr<Parts> Load(const std::string& dir) {
  auto p = std::make_unique<Parts>();
  auto cfg = ModelConfig::FromFile(dir + "/config.json");
  EXPECT_TRUE(cfg.ok()) << cfg.status();
  p->cfg = *cfg;
  auto arch = ArchFor(p->cfg);
  auto ckpt = CheckpointReader::Open(dir);
  EXPECT_TRUE(arch.ok() && ckpt.ok());
  p->ckpt = std::move(*ckpt);
  LoadOptions lo;
  auto stack = AttentionStack::Load(*p->ckpt, p->cfg, *arch, lo);
  auto emb = Embedder::Load(*p->ckpt, p->cfg);
  EXPECT_TRUE(stack.ok() && emb.ok());
  p->stack = std::move(*stack);
  p->embedder = std::move(*emb);
  p->encoder = std::make_unique<LocalEncoder>(p->embedder.get());
  std::vector<ExpertWorkerHandle> handles;
  for (int w = 0; w < 2; ++w) {
    std::set<ExpertId> share = EvenShare(p->cfg, w, 2);
    auto shard = ExpertShard::Load(*p->ckpt, p->cfg, *arch, share, lo);
    EXPECT_TRUE(shard.ok()) << shard.status();
    handles.push_back({std::make_unique<LocalExpertTransport>(shard->get(), p->cfg.hidden_size,
                                                              "worker" + std::to_string(w)),
                       share});
    p->shards.push_back(std::move(*shard));
  }
  p->experts = std::make_unique<ExpertDispatcher>(std::move(handles), p->cfg.hidden_size,
                                                  wire::DTYPE_F32);
  return p;
}

// The attention stack, counting which way each forward pass ran.
class CountingStack : public AttentionStack {
 public:
  explicit CountingStack(const AttentionStack* inner) : inner_(inner) { cfg_ = inner->config(); }
  absl::Status Forward(const std::vector<SeqStep>& batch, float* hidden, KvCache* cache,
                       ExpertBackend* experts, std::vector<float>* logits) const override {
    ++rows_calls;
    return inner_->Forward(batch, hidden, cache, experts, logits);
  }
  absl::Status ForwardArgMax(const std::vector<SeqStep>& batch, float* hidden, KvCache* cache,
                             ExpertBackend* experts, std::vector<int32_t>* ids) const override {
    ++argmax_calls;
    return inner_->ForwardArgMax(batch, hidden, cache, experts, ids);
  }
  std::unique_ptr<KvCache> NewCache(int64_t capacity_tokens) const override {
    return inner_->NewCache(capacity_tokens);
  }
  Device device() const override { return inner_->device(); }

  mutable int rows_calls = 0, argmax_calls = 0;

 private:
  const AttentionStack* inner_;
};

// Parameter: whether steps run as two overlapping halves (from 2 sequences: the oracle's few
// prompts).
class OverlapTest : public ::testing::TestWithParam<bool> {
 protected:
  std::unique_ptr<AttentionWorker> MakeWorker(const Parts& parts,
                                              const AttentionStack* stack = nullptr) {
    AttentionWorker::Options opt;
    opt.overlap_halves = GetParam();
    opt.overlap_min_sequences = 2;
    return std::make_unique<AttentionWorker>(stack != nullptr ? stack : parts.stack.get(),
                                             parts.encoder.get(), parts.experts.get(), opt);
  }
};

TEST_P(OverlapTest, BatchedGreedyMatchesTransformers) {
  const std::string dir = "testdata/oracle/qwen3_moe";
  auto parts = Load(dir);
  ASSERT_NE(parts->stack, nullptr);
  // Plain greedy draws need only each row's argmax: every step asks the stack for ids alone.
  const CountingStack counting(parts->stack.get());
  const std::unique_ptr<AttentionWorker> owned = MakeWorker(*parts, &counting);
  AttentionWorker& worker = *owned;

  std::ifstream in(dir + "/reference.json");
  nlohmann::json ref = nlohmann::json::parse(in);
  ASSERT_GE(ref.size(), 2u);
  const size_t n = ref.size();
  std::vector<std::vector<int32_t>> got(n);
  size_t steps = 0;
  for (const auto& c : ref) steps = std::max(steps, c["greedy"].size());
  int64_t calls_before = parts->experts->calls();
  for (size_t step = 0; step < steps; ++step) {
    wire::StepRequest req;
    std::vector<size_t> which;
    for (size_t i = 0; i < n; ++i) {
      const auto prompt = ref[i]["input_ids"].get<std::vector<int32_t>>();
      if (got[i].size() >= ref[i]["greedy"].size()) continue;
      wire::SeqStep* s = req.add_seqs();
      s->set_seq_id(i + 1);
      s->set_sample(true);
      if (step == 0) {
        s->set_new_sequence(true);
        s->mutable_sampling()->set_temperature(0);
        for (int32_t t : prompt) s->add_tokens(t);
      } else {
        s->add_tokens(got[i].back());
        s->set_start_pos(static_cast<int64_t>(prompt.size() + got[i].size()) - 1);
      }
      which.push_back(i);
    }
    wire::StepResponse resp;
    ASSERT_TRUE(worker.Step(req, &resp).ok());
    ASSERT_EQ(resp.results_size(), static_cast<int>(which.size()));
    for (size_t j = 0; j < which.size(); ++j) {
      ASSERT_EQ(resp.results(j).error(), "");
      ASSERT_TRUE(resp.results(j).sampled());
      got[which[j]].push_back(resp.results(j).token());
    }
  }
  for (size_t i = 0; i < n; ++i) {
    EXPECT_EQ(got[i], ref[i]["greedy"].get<std::vector<int32_t>>()) << "prompt " << i;
  }
  EXPECT_EQ(counting.rows_calls, 0);
  EXPECT_EQ(counting.argmax_calls, static_cast<int>(steps) * (GetParam() ? 2 : 1));
  // A whole step calls each worker at most once per layer; overlapped halves call it once per
  // half and layer, so more often than that over the run.
  const int64_t once_per_layer = static_cast<int64_t>(steps) * parts->cfg.num_hidden_layers * 2;
  if (GetParam()) {
    EXPECT_GT(parts->experts->calls() - calls_before, once_per_layer);
  } else {
    EXPECT_LE(parts->experts->calls() - calls_before, once_per_layer);
  }
}

INSTANTIATE_TEST_SUITE_P(Halves, OverlapTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "overlapped" : "whole"; });

// Prompt log-probabilities (sampling.prompt_logprobs) over prompts prefilled in two chunks,
// batched with sequences that do not ask for them: each prompt token's logprob and top entries
// are the log-softmax of transformers' logits at the position before it; the first token has
// none; the first sampled token of every sequence is still transformers' greedy one.
TEST_P(OverlapTest, PromptLogprobsAreTransformersLogSoftmax) {
  const std::string dir = "testdata/oracle/qwen3_moe";
  auto parts = Load(dir);
  ASSERT_NE(parts->stack, nullptr);
  const CountingStack counting(parts->stack.get());
  const std::unique_ptr<AttentionWorker> owned = MakeWorker(*parts, &counting);
  AttentionWorker& worker = *owned;
  std::ifstream in(dir + "/reference.json");
  nlohmann::json ref = nlohmann::json::parse(in);
  const int64_t vocab = parts->cfg.vocab_size;
  constexpr int kTop = 3;
  // Sequences 1..n score their prompts; n+1..2n (the same prompts) do not.
  const size_t n = ref.size();
  std::vector<std::vector<wire::SeqResult>> results(2 * n);
  for (int chunk = 0; chunk < 2; ++chunk) {
    wire::StepRequest req;
    for (size_t k = 0; k < 2 * n; ++k) {
      const auto prompt = ref[k % n]["input_ids"].get<std::vector<int32_t>>();
      ASSERT_GE(prompt.size(), 2u);
      const size_t first = prompt.size() / 2;  // the first chunk's tokens
      wire::SeqStep* s = req.add_seqs();
      s->set_seq_id(k + 1);
      if (chunk == 0) {
        s->set_new_sequence(true);
        s->mutable_sampling()->set_temperature(0);
        if (k < n) s->mutable_sampling()->set_prompt_logprobs(kTop);
      }
      s->set_start_pos(chunk == 0 ? 0 : first);
      for (size_t i = chunk == 0 ? 0 : first; i < (chunk == 0 ? first : prompt.size()); ++i) {
        s->add_tokens(prompt[i]);
      }
      s->set_sample(chunk == 1);
    }
    wire::StepResponse resp;
    ASSERT_TRUE(worker.Step(req, &resp).ok());
    ASSERT_EQ(resp.results_size(), static_cast<int>(2 * n));
    for (size_t k = 0; k < 2 * n; ++k) results[k].push_back(resp.results(static_cast<int>(k)));
  }
  // Scoring prompts needs whole rows: no step took the argmax-only way.
  EXPECT_EQ(counting.argmax_calls, 0);
  EXPECT_EQ(counting.rows_calls, GetParam() ? 4 : 2);
  double worst = 0;
  for (size_t k = 0; k < 2 * n; ++k) {
    const nlohmann::json& c = ref[k % n];
    const auto prompt = c["input_ids"].get<std::vector<int32_t>>();
    ASSERT_EQ(results[k][0].error(), "");
    ASSERT_EQ(results[k][1].error(), "");
    EXPECT_FALSE(results[k][0].sampled());
    ASSERT_TRUE(results[k][1].sampled());
    EXPECT_EQ(results[k][1].token(), c["greedy"][0].get<int32_t>()) << "sequence " << k;
    if (k >= n) {
      EXPECT_EQ(results[k][0].prompt_logprobs_size() + results[k][1].prompt_logprobs_size(), 0);
      continue;
    }
    std::vector<moemesh::v1::TokenLogprobs> got;
    for (const auto& r : results[k]) got.insert(got.end(), r.prompt_logprobs().begin(),
                                                 r.prompt_logprobs().end());
    ASSERT_EQ(got.size(), prompt.size());
    EXPECT_EQ(got[0].chosen().id(), prompt[0]);
    EXPECT_EQ(got[0].chosen().logprob(), 0.0f);
    EXPECT_EQ(got[0].top_size(), 0);
    for (size_t i = 1; i < prompt.size(); ++i) {
      const std::vector<double> row = c["logits"][i - 1].get<std::vector<double>>();
      ASSERT_EQ(static_cast<int64_t>(row.size()), vocab);
      double mx = row[0], z = 0;
      for (double v : row) mx = std::max(mx, v);
      for (double v : row) z += std::exp(v - mx);
      const double lse = mx + std::log(z);
      std::vector<double> sorted(row);
      std::sort(sorted.begin(), sorted.end(), std::greater<double>());
      EXPECT_EQ(got[i].chosen().id(), prompt[i]);
      worst = std::max(worst, std::abs(got[i].chosen().logprob() - (row[prompt[i]] - lse)));
      ASSERT_EQ(got[i].top_size(), kTop);
      for (int t = 0; t < kTop; ++t) {
        worst = std::max(worst, std::abs(got[i].top(t).logprob() - (sorted[t] - lse)));
        EXPECT_NEAR(got[i].top(t).logprob(), row[got[i].top(t).id()] - lse, 1e-3);
      }
    }
  }
  EXPECT_LT(worst, 1e-3);
}

// A sequence moved from another worker (the router replays its prompt and generated tokens, with
// prompt_tokens saying where the prompt ends) continues exactly as it would have: greedy with
// frequency and presence penalties, which depend on which tokens were generated. Without
// prompt_tokens the replayed tokens count as prompt, and the continuation differs.
// Greedy decoding of the embedded model's first reference prompt with `sp`, 24 tokens: never
// moved (full); moved after 10 tokens, its replay marked as prompt + generated (moved); and the
// same replay all counted as prompt (as_prompt).
struct MovedRuns {
  std::vector<int32_t> full, moved, as_prompt;
};
MovedRuns RunMoved(const moemesh::v1::SamplingParams& sp, const TokenTable* json_tokens) {
  const std::string dir = "models/pydoc-moe-17m";
  auto parts = Load(dir);
  EXPECT_NE(parts->stack, nullptr);
  AttentionWorker::Options opt;
  opt.json_tokens = json_tokens;
  AttentionWorker worker(parts->stack.get(), parts->encoder.get(), parts->experts.get(), opt);
  std::ifstream in(dir + "/reference.json");
  const std::vector<int32_t> prompt =
      nlohmann::json::parse(in)["prompts"][0]["input_ids"].get<std::vector<int32_t>>();
  const int64_t plen = static_cast<int64_t>(prompt.size());
  // One step of sequence `id`: tokens at start_pos; the sampled token, or -1.
  auto step = [&](uint64_t id, const std::vector<int32_t>& tokens, int64_t start_pos, bool sample,
                  bool first, int64_t prompt_tokens) {
    wire::StepRequest req;
    wire::SeqStep* s = req.add_seqs();
    s->set_seq_id(id);
    for (int32_t t : tokens) s->add_tokens(t);
    s->set_start_pos(start_pos);
    s->set_sample(sample);
    if (first) {
      s->set_new_sequence(true);
      *s->mutable_sampling() = sp;
      s->set_prompt_tokens(prompt_tokens);
      s->add_end_ids(0);
    }
    wire::StepResponse resp;
    EXPECT_TRUE(worker.Step(req, &resp).ok());
    EXPECT_EQ(resp.results(0).error(), "");
    return resp.results(0).sampled() ? resp.results(0).token() : -1;
  };
  // Never moved: 24 tokens.
  std::vector<int32_t> full = {step(1, prompt, 0, true, true, 0)};
  while (full.size() < 24) {
    full.push_back(step(1, {full.back()}, plen + static_cast<int64_t>(full.size()) - 1, true,
                        false, 0));
  }
  // Moved after 10 tokens: replay prompt + the first 9, then decode from the 10th.
  auto moved = [&](uint64_t id, int64_t prompt_tokens) {
    std::vector<int32_t> replay = prompt;
    replay.insert(replay.end(), full.begin(), full.begin() + 9);
    EXPECT_EQ(step(id, replay, 0, false, true, prompt_tokens), -1);
    std::vector<int32_t> got(full.begin(), full.begin() + 10);
    while (got.size() < full.size()) {
      got.push_back(step(id, {got.back()}, plen + static_cast<int64_t>(got.size()) - 1, true,
                         false, 0));
    }
    return got;
  };
  return {full, moved(2, plen), moved(3, 0)};
}

TEST(MovedSequenceTest, ReplayKeepsThePenaltyHistory) {
  // The trained embedded model: its greedy text repeats tokens, which the penalties act on.
  moemesh::v1::SamplingParams sp;
  sp.set_temperature(0);
  sp.set_frequency_penalty(2.0f);
  sp.set_presence_penalty(2.0f);
  const MovedRuns r = RunMoved(sp, nullptr);
  EXPECT_EQ(r.moved, r.full);
  EXPECT_NE(r.as_prompt, r.full) << "the penalties did not depend on the generated tokens";
}

// JSON mode: a moved sequence's replayed tokens advance its constraint as if generated there.
TEST(MovedSequenceTest, ReplayKeepsTheJsonState) {
  auto tok = Tokenizer::FromFile("models/pydoc-moe-17m/tokenizer.json");
  ASSERT_TRUE(tok.ok());
  const TokenTable table((*tok)->AllTokenBytes());
  moemesh::v1::SamplingParams sp;
  sp.set_temperature(0);
  sp.set_response_format(moemesh::v1::RESPONSE_FORMAT_JSON_OBJECT);
  const MovedRuns r = RunMoved(sp, &table);
  std::string text;
  for (int32_t id : r.full) text += id == 0 ? "" : table.bytes(id);
  JsonState s;
  EXPECT_TRUE(s.FeedAll(text)) << text;
  EXPECT_EQ(r.moved, r.full);
  EXPECT_NE(r.as_prompt, r.full) << "the replayed tokens did not advance the JSON state";
  // Without the token table (no tokenizer.json) the worker refuses JSON mode, naming the file.
  auto parts = Load("models/pydoc-moe-17m");
  AttentionWorker plain(parts->stack.get(), parts->encoder.get(), parts->experts.get(),
                        AttentionWorker::Options());
  wire::StepRequest req;
  wire::SeqStep* step = req.add_seqs();
  step->set_seq_id(1);
  step->add_tokens(5);
  step->set_sample(true);
  step->set_new_sequence(true);
  *step->mutable_sampling() = sp;
  step->add_end_ids(0);
  wire::StepResponse resp;
  ASSERT_TRUE(plain.Step(req, &resp).ok());
  EXPECT_EQ(resp.results(0).error_code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_NE(resp.results(0).error().find("tokenizer.json"), std::string::npos);
}

// A KV cache that runs out of room by sequences before positions, as the GPU's paged cache does
// when kept prefixes hold partly filled pages: at most `max_seqs` sequences, live or kept.
class FewSequencesCache : public KvCache {
 public:
  FewSequencesCache(const ModelConfig& cfg, int64_t capacity, int64_t max_seqs)
      : KvCache(cfg.num_hidden_layers, cfg.num_key_value_heads * cfg.head_dim, capacity, true,
                cfg.num_key_value_heads),
        max_(max_seqs) {}
  absl::Status Reserve(uint64_t seq, int64_t length) override {
    if (!Has(seq) && num_sequences() >= max_) return absl::ResourceExhaustedError("no page left");
    return KvCache::Reserve(seq, length);
  }

 private:
  const int64_t max_;
};

class FewSequencesStack : public CountingStack {
 public:
  FewSequencesStack(const AttentionStack* inner, int64_t max_seqs)
      : CountingStack(inner), max_(max_seqs) {}
  std::unique_ptr<KvCache> NewCache(int64_t capacity_tokens) const override {
    return std::make_unique<FewSequencesCache>(cfg_, capacity_tokens, max_);
  }

 private:
  const int64_t max_;
};

// Kept prefixes give way when the cache has no room for a live sequence: with room for two
// sequences, two released requests' prefixes are kept, and a third request still runs (the older
// prefix dropped), where without that it would fail with RESOURCE_EXHAUSTED.
TEST(PrefixCacheTest, KeptPrefixesGiveWayToLiveSequences) {
  auto parts = Load("models/pydoc-moe-17m");
  FewSequencesStack stack(parts->stack.get(), 2);
  AttentionWorker::Options opt;
  opt.prefix_cache_tokens = 1000;
  AttentionWorker worker(&stack, parts->encoder.get(), parts->experts.get(), opt);
  auto run = [&](uint64_t id, int32_t first) {
    wire::StepRequest req;
    wire::SeqStep* step = req.add_seqs();
    step->set_seq_id(id);
    for (int32_t t = 0; t < 12; ++t) step->add_tokens(first + t);
    step->set_sample(true);
    step->set_new_sequence(true);
    step->mutable_sampling()->set_temperature(0);
    wire::StepResponse resp;
    EXPECT_TRUE(worker.Step(req, &resp).ok());
    EXPECT_EQ(resp.results(0).error(), "") << "request " << id;
    worker.Release({id});
  };
  run(1, 100);
  run(2, 200);
  EXPECT_EQ(worker.GetStats().prefix_cache_tokens(), 24);  // both kept: the cache is full
  run(3, 300);
  EXPECT_EQ(worker.GetStats().prefix_cache_tokens(), 24);  // the first gave way, the third kept
}

// A sequence no step touched for --idle_sequence_seconds (its router went away without releasing
// it) is released at the next step: its KV rows are free and a step on it is refused, while a
// sequence stepped in time is kept.
TEST(IdleSequenceTest, SequencesLeftIdleAreReleasedAtTheNextStep) {
  auto parts = Load("models/pydoc-moe-17m");
  AttentionWorker::Options opt;
  opt.idle_sequence_seconds = 1.0;
  AttentionWorker worker(parts->stack.get(), parts->encoder.get(), parts->experts.get(), opt);
  std::map<uint64_t, int64_t> length;  // tokens each sequence has
  // One step: the sequences `ids` get 4 tokens each (new ones start); each one's error.
  auto step = [&](std::vector<uint64_t> ids) {
    wire::StepRequest req;
    for (uint64_t id : ids) {
      wire::SeqStep* s = req.add_seqs();
      s->set_seq_id(id);
      for (int32_t t = 0; t < 4; ++t) s->add_tokens(100 + t);
      s->set_start_pos(length[id]);
      s->set_new_sequence(length[id] == 0);
      s->set_sample(true);
      s->mutable_sampling()->set_temperature(0);
    }
    wire::StepResponse resp;
    EXPECT_TRUE(worker.Step(req, &resp).ok());
    std::vector<std::string> errors;
    for (int i = 0; i < resp.results_size(); ++i) {
      errors.push_back(resp.results(i).error());
      if (resp.results(i).error().empty()) length[ids[i]] += 4;
    }
    return errors;
  };
  EXPECT_EQ(step({1, 2}), std::vector<std::string>({"", ""}));
  EXPECT_EQ(worker.GetStats().kv_used_tokens(), 8);
  // Sequence 2 is stepped within the idle time, 1 is not.
  for (int i = 0; i < 5; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    EXPECT_EQ(step({2}), std::vector<std::string>({""}));
  }
  const wire::Stats stats = worker.GetStats();
  EXPECT_EQ(stats.idle_released_sequences(), 1);
  EXPECT_EQ(stats.active_sequences(), 1);
  EXPECT_EQ(stats.kv_used_tokens(), length[2]);
  EXPECT_EQ(step({1}), std::vector<std::string>({"unknown sequence 1"}));
}

// A router started again asks for the sequences its earlier run left (ReleaseRequest.router): only
// those the same router name started in another run are freed; its current run's, another
// router's and those of a step without a name stay, and the freed ones are unknown after.
TEST(StaleSequenceTest, ARouterStartedAgainFreesOnlyItsEarlierRunsSequences) {
  auto parts = Load("models/pydoc-moe-17m");
  AttentionWorker worker(parts->stack.get(), parts->encoder.get(), parts->experts.get(), {});
  // One step of `router`'s run `run` starting sequence `id` with `n` tokens; its error.
  auto start = [&](uint64_t id, const std::string& router, uint64_t run, int n) {
    wire::StepRequest req;
    req.set_router(router);
    req.set_router_run(run);
    wire::SeqStep* s = req.add_seqs();
    s->set_seq_id(id);
    for (int32_t t = 0; t < n; ++t) s->add_tokens(100 + t);
    s->set_new_sequence(true);
    s->set_sample(true);
    s->mutable_sampling()->set_temperature(0);
    wire::StepResponse resp;
    EXPECT_TRUE(worker.Step(req, &resp).ok());
    return resp.results(0).error();
  };
  EXPECT_EQ(start(1, "h/a:1", 7, 3), "");  // router a's earlier run
  EXPECT_EQ(start(2, "h/a:1", 7, 5), "");
  EXPECT_EQ(start(3, "h/a:1", 8, 7), "");  // its current run
  EXPECT_EQ(start(4, "h/b:1", 7, 11), "");  // another router, same run id
  EXPECT_EQ(start(5, "", 7, 13), "");      // a router without a name
  EXPECT_EQ(worker.GetStats().kv_used_tokens(), 39);
  EXPECT_EQ(worker.ReleaseStale("h/a:1", 8), 2);
  wire::Stats stats = worker.GetStats();
  EXPECT_EQ(stats.stale_released_sequences(), 2);
  EXPECT_EQ(stats.active_sequences(), 3);
  EXPECT_EQ(stats.kv_used_tokens(), 31);
  EXPECT_EQ(worker.ReleaseStale("h/a:1", 8), 0);  // nothing left of it
  // A step continuing a freed sequence finds it unknown.
  wire::StepRequest req;
  wire::SeqStep* s = req.add_seqs();
  s->set_seq_id(1);
  s->add_tokens(100);
  s->set_start_pos(3);
  s->set_sample(true);
  wire::StepResponse resp;
  ASSERT_TRUE(worker.Step(req, &resp).ok());
  EXPECT_EQ(resp.results(0).error(), "unknown sequence 1");
  EXPECT_EQ(worker.GetStats().stale_released_sequences(), 2);
}

// Speculative decoding: three sequences of the embedded model decoded together for 80 tokens with
// up to 4 prompt-lookup drafts per step give the tokens of plain decoding, greedy and seeded
// sampling with penalties alike, with logprobs within 1e-4 (a step over several tokens of a
// sequence sums attention in another order: ~1e-6 apart), and drafts were confirmed along the
// way (the model's text repeats itself), greedy in far fewer steps.
struct Decoded {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<std::vector<float>> logprobs;
  int64_t steps = 0, drafts = 0, accepted = 0;
};
Decoded DecodeBatch(Parts* parts, const moemesh::v1::SamplingParams& sp, int speculative,
                    size_t n_tokens) {
  AttentionWorker::Options opt;
  opt.speculative_tokens = speculative;
  AttentionWorker worker(parts->stack.get(), parts->encoder.get(), parts->experts.get(), opt);
  std::ifstream in("models/pydoc-moe-17m/reference.json");
  const nlohmann::json ref = nlohmann::json::parse(in)["prompts"];
  const size_t n = 3;
  Decoded d;
  d.tokens.resize(n);
  d.logprobs.resize(n);
  std::vector<int64_t> pos(n, 0);
  for (bool first = true;; first = false) {
    wire::StepRequest req;
    std::vector<size_t> which;
    for (size_t i = 0; i < n; ++i) {
      if (d.tokens[i].size() >= n_tokens) continue;
      wire::SeqStep* s = req.add_seqs();
      s->set_seq_id(i + 1);
      s->set_sample(true);
      s->set_start_pos(pos[i]);
      if (first) {
        s->set_new_sequence(true);
        *s->mutable_sampling() = sp;
        s->mutable_sampling()->set_seed(100 + i);
        for (int32_t t : ref[i]["input_ids"].get<std::vector<int32_t>>()) s->add_tokens(t);
      } else {
        s->add_tokens(d.tokens[i].back());
      }
      which.push_back(i);
    }
    if (which.empty()) break;
    wire::StepResponse resp;
    EXPECT_TRUE(worker.Step(req, &resp).ok());
    ++d.steps;
    for (size_t j = 0; j < which.size(); ++j) {
      const wire::SeqResult& r = resp.results(static_cast<int>(j));
      EXPECT_EQ(r.error(), "");
      const size_t i = which[j];
      pos[i] += req.seqs(static_cast<int>(j)).tokens_size() + r.earlier_size();
      for (const wire::EarlierToken& e : r.earlier()) {
        d.tokens[i].push_back(e.token());
        d.logprobs[i].push_back(e.logprob());
      }
      d.tokens[i].push_back(r.token());
      d.logprobs[i].push_back(r.logprob());
    }
  }
  for (auto& t : d.tokens) t.resize(n_tokens);  // a last step may give more than asked
  for (auto& l : d.logprobs) l.resize(n_tokens);
  const wire::Stats st = worker.GetStats();
  d.drafts = st.draft_tokens();
  d.accepted = st.accepted_draft_tokens();
  EXPECT_EQ(st.kv_used_tokens(), [&] {  // rejected drafts' slots were given back
    int64_t used = 0;
    for (int64_t p : pos) used += p;
    return used;
  }());
  return d;
}

TEST(SpeculativeDecodingTest, GivesThePlainTokensInFewerSteps) {
  auto parts = Load("models/pydoc-moe-17m");
  ASSERT_NE(parts->stack, nullptr);
  moemesh::v1::SamplingParams greedy;
  greedy.set_temperature(0);
  greedy.set_logprobs(2);
  moemesh::v1::SamplingParams sampled;
  sampled.set_temperature(0.7f);
  sampled.set_top_p(0.95f);
  sampled.set_frequency_penalty(0.2f);
  for (const auto& sp : {greedy, sampled}) {
    const Decoded plain = DecodeBatch(parts.get(), sp, 0, 80);
    const Decoded spec = DecodeBatch(parts.get(), sp, 4, 80);
    ASSERT_EQ(spec.tokens, plain.tokens) << "temperature " << sp.temperature();
    for (size_t i = 0; i < plain.logprobs.size(); ++i) {
      for (size_t t = 0; t < plain.logprobs[i].size(); ++t) {
        EXPECT_NEAR(spec.logprobs[i][t], plain.logprobs[i][t], 1e-4) << i << " " << t;
      }
    }
    EXPECT_EQ(plain.drafts, 0);
    EXPECT_GT(spec.accepted, 0);
    EXPECT_GE(spec.drafts, spec.accepted);
    EXPECT_LE(spec.steps, plain.steps);
    if (sp.temperature() == 0) {
      EXPECT_LT(spec.steps, plain.steps * 2 / 3);
    }
    std::cout << "temperature " << sp.temperature() << ": " << plain.steps << " steps plain, "
              << spec.steps << " speculating; drafts " << spec.accepted << "/" << spec.drafts
              << " confirmed\n";
  }
}

}  // namespace
}  // namespace moemesh
