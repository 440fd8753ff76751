// Arithmetic of moemesh_bench: percentiles, latency summaries, per-request serving metrics and
// the weight bytes a decode step reads (its memory-bandwidth bound). Pure functions, no timing
// or I/O: unit-tested in bench_stats_test.cc.
#ifndef MOEMESH_TOOLS_BENCH_STATS_H_
#define MOEMESH_TOOLS_BENCH_STATS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/config.h"
#include "engine/dtype.h"

namespace moemesh {

// The p-th percentile (p in [0, 100]) of `v` by linear interpolation between the closest ranks,
// as numpy.percentile's default ("linear"): rank = p / 100 * (n - 1) over the sorted values.
// InvalidArgument for an empty `v` or p outside [0, 100] (or NaN).
absl::StatusOr<double> Percentile(std::vector<double> v, double p);

struct LatencySummary {
  double p50 = 0, p90 = 0, p99 = 0, mean = 0;
  int64_t count = 0;
};

// Summary of `samples`; all zeros with count 0 when `samples` is empty.
LatencySummary Summarize(const std::vector<double>& samples);

// One request of a serving run. Times in seconds on any common clock (e.g. since the run began).
struct RequestRecord {
  int64_t prompt_tokens = 0;
  int64_t output_tokens = 0;
  double start = 0;        // request sent
  double first_token = 0;  // first response holding a token received
  double end = 0;          // last response received
  bool ok = true;          // failed requests count as errors and enter no other figure
};

// Time to first token: first_token - start.
double Ttft(const RequestRecord& r);
// Time per output token after the first: (end - first_token) / (output_tokens - 1). Returns
// false (and leaves *tpot alone) when output_tokens < 2: such requests are excluded.
bool Tpot(const RequestRecord& r, double* tpot);

struct ServingSummary {
  LatencySummary ttft, tpot;   // seconds
  int64_t requests = 0;        // successful
  int64_t errors = 0;
  int64_t prompt_tokens = 0, output_tokens = 0;  // sums over successful requests
  double wall_seconds = 0;
  double output_tokens_per_s = 0;  // output_tokens / wall_seconds
  double total_tokens_per_s = 0;   // (prompt_tokens + output_tokens) / wall_seconds
  double requests_per_s = 0;       // requests / wall_seconds
};

// Summary of a run whose wall time is `wall_seconds` (rates are 0 when it is <= 0).
ServingSummary SummarizeServing(const std::vector<RequestRecord>& records, double wall_seconds);

// Bytes per element of the weights as Linear (engine/ops/linear.h) keeps them: bf16 compute
// keeps bf16 (2); fp32 compute keeps BF16 checkpoints bf16 (2) and F32/F16 ones fp32 (4).
int64_t PackedBytesPerWeight(bool bf16_compute, DType checkpoint);

// Bytes per element of each kind of weight a decode step reads.
struct WeightElementBytes {
  double matrix = 2;      // attention, shared experts, dense MLPs, lm_head (1 or 0.5625 with
                          // --quantize_attention=int8|int4)
  double expert = 2;      // routed experts: as matrix, 1 with --quantize_experts=int8 (its
                          // scales and per-group sums, 1/16 byte more a weight, left out), or
                          // 0.5625 with int4 (4 bits and a 4-byte scale per 64)
  int64_t router = 2;     // MoE routers (always fp32 compute: PackedBytesPerWeight(false, ...))
  int64_t embedding = 2;  // the embedding table, kept in the checkpoint's dtype
};

// Weight bytes one single-stream decode step (one token) reads, from the config alone: every
// layer's q/k/v/o projections; per MoE layer (cfg.IsMoeLayer) the router and
// `experts_per_token` routed experts' gate/up/down (each token uses k distinct experts), plus
// the shared expert and its gate when cfg.shared_expert_intermediate_size > 0; per dense layer
// its MLP; the LM head (the embedding table when tied) and one embedding row. Norm weights and
// biases (< 0.01%) and the KV cache are left out.
struct DecodeBytes {
  int64_t attention = 0, router = 0, experts = 0, dense_mlp = 0, lm_head = 0, embedding = 0;
  int64_t total() const { return attention + router + experts + dense_mlp + lm_head + embedding; }
};
DecodeBytes DecodeWeightBytes(const ModelConfig& cfg, int64_t experts_per_token,
                              const WeightElementBytes& bytes);

// Single-stream decode tok/s a memory bandwidth allows: bandwidth / bytes per token (0 when
// either is <= 0).
double BandwidthBoundTokensPerSecond(double bandwidth_gb_s, int64_t bytes_per_token);

}  // namespace moemesh

#endif  // MOEMESH_TOOLS_BENCH_STATS_H_
