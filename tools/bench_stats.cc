#include "tools/bench_stats.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"

namespace moemesh {

absl::StatusOr<double> Percentile(std::vector<double> v, double p) {
  if (v.empty()) return absl::InvalidArgumentError("Percentile of no samples");
  if (!(p >= 0.0 && p <= 100.0)) return absl::InvalidArgumentError("percentile outside [0, 100]");
  std::sort(v.begin(), v.end());
  const double rank = p / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  const double frac = rank - static_cast<double>(lo);
  return v[lo] + (v[hi] - v[lo]) * frac;
}

LatencySummary Summarize(const std::vector<double>& samples) {
  LatencySummary s;
  if (samples.empty()) return s;
  s.count = static_cast<int64_t>(samples.size());
  s.p50 = *Percentile(samples, 50);
  s.p90 = *Percentile(samples, 90);
  s.p99 = *Percentile(samples, 99);
  double sum = 0;
  for (double x : samples) sum += x;
  s.mean = sum / static_cast<double>(samples.size());
  return s;
}

double Ttft(const RequestRecord& r) { return r.first_token - r.start; }

bool Tpot(const RequestRecord& r, double* tpot) {
  if (r.output_tokens < 2) return false;
  *tpot = (r.end - r.first_token) / static_cast<double>(r.output_tokens - 1);
  return true;
}

ServingSummary SummarizeServing(const std::vector<RequestRecord>& records, double wall_seconds) {
  ServingSummary s;
  std::vector<double> ttft, tpot;
  for (const RequestRecord& r : records) {
    if (!r.ok) {
      ++s.errors;
      continue;
    }
    ++s.requests;
    s.prompt_tokens += r.prompt_tokens;
    s.output_tokens += r.output_tokens;
    if (r.output_tokens > 0) ttft.push_back(Ttft(r));
    double t;
    if (Tpot(r, &t)) tpot.push_back(t);
  }
  s.ttft = Summarize(ttft);
  s.tpot = Summarize(tpot);
  s.wall_seconds = wall_seconds;
  if (wall_seconds > 0) {
    s.output_tokens_per_s = static_cast<double>(s.output_tokens) / wall_seconds;
    s.total_tokens_per_s = static_cast<double>(s.prompt_tokens + s.output_tokens) / wall_seconds;
    s.requests_per_s = static_cast<double>(s.requests) / wall_seconds;
  }
  return s;
}

int64_t PackedBytesPerWeight(bool bf16_compute, DType checkpoint) {
  return bf16_compute || checkpoint == DType::kBF16 ? 2 : 4;
}

DecodeBytes DecodeWeightBytes(const ModelConfig& cfg, int64_t experts_per_token,
                              const WeightElementBytes& bytes) {
  const int64_t h = cfg.hidden_size;
  const int64_t qd = cfg.num_attention_heads * cfg.head_dim;
  const int64_t kvd = cfg.num_key_value_heads * cfg.head_dim;
  DecodeBytes d;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    d.attention += static_cast<int64_t>((qd * h + 2 * kvd * h + h * qd) *
                                        bytes.matrix);  // q, k, v [out, h]; o [h, qd]
    if (cfg.IsMoeLayer(l)) {
      d.router += cfg.num_experts * h * bytes.router;
      d.experts += static_cast<int64_t>(experts_per_token * 3 * cfg.moe_intermediate_size * h *
                                        bytes.expert);
      if (cfg.shared_expert_intermediate_size > 0) {
        d.dense_mlp +=
            static_cast<int64_t>(3 * cfg.shared_expert_intermediate_size * h * bytes.matrix);
        d.dense_mlp += h * bytes.router;  // shared_expert_gate [1, h], fp32 compute
      }
    } else {
      d.dense_mlp += static_cast<int64_t>(3 * cfg.intermediate_size * h * bytes.matrix);
    }
  }
  d.lm_head = static_cast<int64_t>(cfg.vocab_size * h * bytes.matrix);
  d.embedding = h * bytes.embedding;
  return d;
}

double BandwidthBoundTokensPerSecond(double bandwidth_gb_s, int64_t bytes_per_token) {
  if (bandwidth_gb_s <= 0 || bytes_per_token <= 0) return 0.0;
  return bandwidth_gb_s * 1e9 / static_cast<double>(bytes_per_token);
}

}  // namespace moemesh
