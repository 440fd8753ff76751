// Router::Counters in Prometheus' text format.
#include <initializer_list>
#include <string>
#include <utility>

#include "router/metrics.h"
#include "router/router.h"

namespace moemesh {

std::string PrometheusMetrics(const Router::Counters& c,
                              const std::vector<absl::StatusOr<wire::Stats>>& workers) {
  PrometheusText p;
  auto one = [&p](const char* name, const char* type, const char* help, double value) {
    p.Family(name, type, help);
    p.Sample(name, value);
  };
  auto d = [](int64_t v) { return static_cast<double>(v); };
  one("moemesh_requests_submitted_total", "counter", "Requests accepted into the queue.",
      d(c.submitted));
  // A counter family with one sample per value of label `key`.
  auto by = [&p](const char* name, const char* help, const char* key,
                 std::initializer_list<std::pair<const char*, int64_t>> values) {
    p.Family(name, "counter", help);
    for (const auto& [label, v] : values) {
      p.Sample(name, static_cast<double>(v), PrometheusText::Label(key, label));
    }
  };
  by("moemesh_requests_finished_total",
     "Requests ended, by finish reason (stop: an end token or stop string; length: max_tokens or "
     "the context; cancelled: by the client).",
     "reason",
     {{"stop", c.finished - c.finished_length}, {"length", c.finished_length},
      {"cancelled", c.cancelled}});
  one("moemesh_requests_failed_total", "counter",
      "Requests that ended with an error after they were accepted (a worker failed).",
      d(c.failed));
  by("moemesh_requests_rejected_total",
     "Requests refused at submission: invalid (INVALID_ARGUMENT), no room (RESOURCE_EXHAUSTED: "
     "queue full, or more KV cache than a worker holds), draining (UNAVAILABLE: shutting "
     "down) or unavailable (UNAVAILABLE: no attention worker in service for "
     "--outage_wait_seconds).",
     "reason",
     {{"invalid", c.invalid}, {"resource_exhausted", c.rejected},
      {"draining", c.refused_draining}, {"unavailable", c.refused_unavailable}});
  one("moemesh_requests_moved_total", "counter",
      "Requests sent back to the queue after their attention worker's step failed or it lost "
      "their sequence (to continue on another worker, or on the same one once it serves again).",
      d(c.moved));
  one("moemesh_requests_requeued_no_room_total", "counter",
      "Requests sent back to the queue because their attention worker had no KV cache room for "
      "them: it held sequences this router does not run (another router's over the same "
      "workers, or a stopped router's until the worker releases them).",
      d(c.requeued_no_room));
  one("moemesh_prompt_tokens_total", "counter", "Prompt tokens prefilled (each prompt once).",
      d(c.prompt_tokens));
  one("moemesh_generation_tokens_total", "counter", "Tokens generated and sent to clients.",
      d(c.generation_tokens));
  one("moemesh_requests_running", "gauge", "Requests admitted to an attention worker.",
      d(c.running));
  one("moemesh_requests_waiting", "gauge", "Requests queued for KV cache room.", d(c.waiting));
  one("moemesh_draining", "gauge",
      "1 once the router is shutting down (new requests refused, accepted ones finishing).",
      c.draining ? 1 : 0);

  // One sample per attention worker, labelled worker="i" (Create's order).
  auto per_worker = [&p, &c](const char* name, const char* type, const char* help,
                             auto value_of) {
    p.Family(name, type, help);
    for (size_t w = 0; w < c.steps_per_worker.size(); ++w) {
      p.Sample(name, static_cast<double>(value_of(w)),
               PrometheusText::Label("worker", std::to_string(w)));
    }
  };
  per_worker("moemesh_worker_steps_total", "counter", "Steps sent to the attention worker.",
             [&c](size_t w) { return c.steps_per_worker[w]; });
  per_worker("moemesh_kv_cache_reserved_tokens", "gauge",
             "KV cache slots reserved by the worker's requests (prompt + max_tokens each).",
             [&c](size_t w) { return c.kv_reserved_per_worker[w]; });
  per_worker("moemesh_kv_cache_capacity_tokens", "gauge", "KV cache slots of the worker.",
             [&c](size_t w) { return c.kv_capacity_per_worker[w]; });
  per_worker("moemesh_kv_cache_foreign_tokens", "gauge",
             "KV cache rows the worker holds for sequences this router does not run (another "
             "router's, or a stopped router's), as last asked; admission leaves them room.",
             [&c](size_t w) { return c.kv_foreign_per_worker[w]; });
  per_worker("moemesh_worker_up", "gauge",
             "1 while the attention worker takes requests, 0 after a failed step until it "
             "answers again.",
             [&c](size_t w) { return c.worker_up[w] ? 1 : 0; });

  // What each worker reports of itself (GetStats), for those that answered.
  auto reported = [&p, &workers](const char* name, const char* type, const char* help,
                                 double (*value_of)(const wire::Stats&)) {
    p.Family(name, type, help);
    for (size_t w = 0; w < workers.size(); ++w) {
      if (!workers[w].ok()) continue;
      p.Sample(name, value_of(*workers[w]), PrometheusText::Label("worker", std::to_string(w)));
    }
  };
  if (!workers.empty()) {
    reported("moemesh_kv_cache_used_tokens", "gauge",
             "KV cache rows in use on the attention worker (its own count).",
             [](const wire::Stats& s) { return static_cast<double>(s.kv_used_tokens()); });
    reported("moemesh_prefix_cache_tokens", "gauge",
             "KV rows of finished requests the worker keeps for reuse (--prefix_cache_tokens).",
             [](const wire::Stats& s) { return static_cast<double>(s.prefix_cache_tokens()); });
    reported("moemesh_prefix_cache_hit_tokens_total", "counter",
             "Prompt rows copied from the prefix cache instead of computed.",
             [](const wire::Stats& s) { return static_cast<double>(s.prefix_hit_tokens()); });
    reported("moemesh_spec_draft_tokens_total", "counter",
             "Speculative decoding: draft tokens verified (--speculative_tokens).",
             [](const wire::Stats& s) { return static_cast<double>(s.draft_tokens()); });
    reported("moemesh_spec_accepted_draft_tokens_total", "counter",
             "Speculative decoding: draft tokens the sampler's draws confirmed.",
             [](const wire::Stats& s) { return static_cast<double>(s.accepted_draft_tokens()); });
    reported("moemesh_worker_attention_seconds_total", "counter",
             "Seconds the attention worker spent in attention (and the rest of its stack).",
             [](const wire::Stats& s) { return s.attention_seconds(); });
    reported("moemesh_worker_expert_wait_seconds_total", "counter",
             "Seconds the attention worker waited for expert workers.",
             [](const wire::Stats& s) { return s.expert_wait_seconds(); });
    reported("moemesh_worker_sampling_seconds_total", "counter",
             "Seconds the attention worker spent sampling.",
             [](const wire::Stats& s) { return s.sampling_seconds(); });
    reported("moemesh_worker_idle_released_sequences_total", "counter",
             "Sequences the attention worker released because no step touched them for "
             "--idle_sequence_seconds (their router went away).",
             [](const wire::Stats& s) { return static_cast<double>(s.idle_released_sequences()); });
    reported("moemesh_worker_stale_released_sequences_total", "counter",
             "Sequences the attention worker released because their router started again "
             "(--router_name): those its killed run left.",
             [](const wire::Stats& s) { return static_cast<double>(s.stale_released_sequences()); });
    reported("moemesh_expert_failovers_total", "counter",
             "Calls from the attention worker to expert workers that failed and whose rows went "
             "to replicas.",
             [](const wire::Stats& s) { return static_cast<double>(s.expert_failovers()); });
    reported("moemesh_expert_workers_down", "gauge",
             "Expert workers the attention worker passes over (failed, not yet answering again).",
             [](const wire::Stats& s) { return static_cast<double>(s.expert_workers_down_size()); });
  }

  p.AddHistogram("moemesh_time_to_first_token_seconds",
                 "Seconds from a request's arrival to its first token.", c.time_to_first_token);
  p.AddHistogram("moemesh_inter_token_latency_seconds",
                 "Seconds between two tokens of one request (0 after the first of tokens that "
                 "arrive together, as speculative decoding's).",
                 c.inter_token);
  p.AddHistogram("moemesh_e2e_request_latency_seconds",
                 "Seconds from a finished request's arrival to its last token.",
                 c.request_latency);
  p.AddHistogram("moemesh_queue_time_seconds",
                 "Seconds from a request's arrival to its admission to an attention worker.",
                 c.queue_time);
  p.AddHistogram("moemesh_request_prompt_tokens", "Prompt tokens of finished requests.",
                 c.request_prompt_tokens);
  p.AddHistogram("moemesh_request_generation_tokens", "Tokens generated by finished requests.",
                 c.request_generation_tokens);
  return p.text();
}

}  // namespace moemesh
