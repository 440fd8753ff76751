// Arithmetic of moemesh_bench: percentiles, latency summaries and per-request serving metrics.
// Pure functions, no timing or I/O: unit-tested in bench_stats_test.cc.
#ifndef MOEMESH_TOOLS_BENCH_STATS_H_
#define MOEMESH_TOOLS_BENCH_STATS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

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

}  // namespace moemesh

#endif  // MOEMESH_TOOLS_BENCH_STATS_H_
