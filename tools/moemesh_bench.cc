// moemesh_bench: repeatable benchmarks of MoE Mesh.
//
//   moemesh_bench --mode=offline --model=DIR [--compute_dtype=fp32|bf16] [--threads=2]
//                 [--prompt_tokens=512] [--decode_tokens=128] [--repeats=3]
//                 [--load_format=auto|dummy] [--num_layers=N] [--bandwidth_gbs=X]
//       In-process Model: one warm-up run, then `repeats` single-stream greedy Generate runs (no
//       stop tokens); median prefill tok/s (prompt / prefill time) and decode tok/s ((new tokens
//       - 1) / decode time, as `moemesh generate`). Also the weight bytes one decode step reads
//       (from the config: bench_stats.h DecodeWeightBytes) and the memory-bandwidth bound
//       bandwidth / bytes, with --bandwidth_gbs or the bandwidth mode's read (2 MiB pages)
//       measured right before each run (--bandwidth_gbs=-1: neither), and the fraction of it
//       decode reaches (the median of the runs' fractions). With
//       --load_format=dummy the directory needs only config.json (no tokenizer either).
//   moemesh_bench --mode=bandwidth [--bandwidth_mib=1024] [--threads=2]
//       STREAM-style read: the sum of a float array by `threads` threads, best of 5, in GB/s;
//       the array in 4 KiB pages, then in 2 MiB (transparent huge) pages as Linear keeps weights.
//   moemesh_bench --mode=serving --addr=HOST:PORT [--concurrency=N] [--requests=M]
//                 [--prompt_tokens=128] [--output_tokens=128] [--length_jitter=0 --seed=1]
//                 [--attention_addr=HOST:PORT]
//       M requests over N concurrent streams of moemesh.v1.Generation/Generate (token id prompts,
//       temperature 0, ignore_eos, max_tokens = output length); lengths uniform within
//       +-jitter * length. TTFT / TPOT percentiles, output, total tok/s and requests/s over the
//       run's wall time. With --attention_addr: Attention/GetStats deltas per step. Expert
//       workers the public API names (GetModelInfo) report their compute (Expert/GetStats).
//
// Prompts are the first tokens (serving: consecutive slices) of --ids_file, or token id 1
// repeated when it is missing; offline, ids are taken modulo the model's vocabulary. A table on stdout; with --json=FILE the same figures as JSON;
// progress on stderr.
#include <sys/mman.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/generate.h"
#include "engine/model.h"
#include "engine/ops/linear.h"
#include "engine/ops/threading.h"
#include "mesh/load_flags.h"
#include "nlohmann/json.hpp"
#include "protos/generation.grpc.pb.h"
#include "protos/worker.grpc.pb.h"
#include "tools/bench_stats.h"

ABSL_FLAG(std::string, mode, "offline", "offline, bandwidth or serving.");
ABSL_FLAG(std::string, model, "models/pydoc-moe-17m", "offline: model directory.");
ABSL_FLAG(std::string, compute_dtype, "fp32", "offline: fp32 or bf16.");
ABSL_FLAG(int32_t, threads, 2, "offline, bandwidth: compute threads.");
ABSL_FLAG(int32_t, batch, 1, "offline: also decode this many sequences together (> 1) and report output tok/s.");
ABSL_FLAG(std::string, device, "cpu", "offline: cpu, cuda or cuda:N (CUDA needs a --config=cuda build).");
ABSL_FLAG(int64_t, prompt_tokens, -1, "Prompt length (default: offline 512, serving 128).");
ABSL_FLAG(int64_t, decode_tokens, 128, "offline: new tokens per run.");
ABSL_FLAG(int32_t, repeats, 3, "offline: measured runs after the warm-up.");
ABSL_FLAG(int64_t, bandwidth_mib, 1024, "bandwidth (and offline, when it measures): array size in MiB.");
ABSL_FLAG(double, bandwidth_gbs, 0,
          "offline: memory bandwidth in GB/s for the decode bound; 0 = measure it as "
          "--mode=bandwidth does, < 0 = no bound.");
ABSL_FLAG(std::string, addr, "127.0.0.1:50051", "serving: public API address.");
ABSL_FLAG(int32_t, concurrency, 1, "serving: concurrent streams.");
ABSL_FLAG(int32_t, requests, 8, "serving: total requests.");
ABSL_FLAG(int64_t, output_tokens, 128, "serving: max_tokens per request.");
ABSL_FLAG(double, length_jitter, 0.0, "serving: lengths uniform in [L(1-j), L(1+j)].");
ABSL_FLAG(uint64_t, seed, 1, "serving: seed of the length jitter.");
ABSL_FLAG(std::string, attention_addr, "", "serving: attention worker for GetStats deltas.");
ABSL_FLAG(std::string, ids_file, "models/pydoc-moe-17m/heldout_ids.json",
          "Token ids (JSON array) the prompts are cut from.");
ABSL_FLAG(std::string, json, "", "Also write the figures as JSON to this file.");

namespace moemesh {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The ids of --ids_file, or empty when it cannot be read.
std::vector<int32_t> LoadIds() {
  std::ifstream in(absl::GetFlag(FLAGS_ids_file));
  if (!in) return {};
  try {
    return json::parse(in).get<std::vector<int32_t>>();
  } catch (const std::exception&) {
    return {};
  }
}

// n ids starting at `offset` (wrapping) of `pool`, or id 1 repeated when the pool is empty;
// with vocab > 0, each id modulo vocab (the pool may come from another model's tokenizer).
std::vector<int32_t> Prompt(const std::vector<int32_t>& pool, int64_t offset, int64_t n,
                            int64_t vocab = 0) {
  std::vector<int32_t> p(n, vocab == 1 ? 0 : 1);
  if (pool.empty()) return p;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t id = pool[(offset + i) % pool.size()];
    p[i] = vocab > 0 ? static_cast<int32_t>(((id % vocab) + vocab) % vocab) : id;
  }
  return p;
}

double Median(std::vector<double> v) { return v.empty() ? 0.0 : *Percentile(std::move(v), 50); }

absl::Status WriteJson(const json& j) {
  const std::string path = absl::GetFlag(FLAGS_json);
  if (path.empty()) return absl::OkStatus();
  std::ofstream out(path);
  out << j.dump(2) << "\n";
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------- bandwidth

struct Bandwidth {
  double best_gb_s = 0;
  std::vector<double> runs_gb_s;
  double checksum = 0;
};

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// STREAM-style read: `mib` MiB of floats, first touched by the threads that later read them,
// summed by `threads` threads. With `huge_pages` the array is 2 MiB-aligned and
// madvise(MADV_HUGEPAGE)'d, as Linear's packed weights are (engine/ops/linear_cpu.cc): on the
// dev VM that reads faster than 4 KiB pages, so it is the bound for decode.
class BandwidthProbe {
 public:
  static absl::StatusOr<std::unique_ptr<BandwidthProbe>> Create(int64_t mib, int threads,
                                                                bool huge_pages) {
    if (mib < 1) return absl::InvalidArgumentError("--bandwidth_mib must be >= 1");
    std::unique_ptr<BandwidthProbe> p(new BandwidthProbe());
    p->threads_ = std::max(1, threads);
    p->n_ = mib * (1 << 20) / static_cast<int64_t>(sizeof(float));
    const size_t bytes = static_cast<size_t>(mib) << 20;
    p->a_.reset(static_cast<float*>(huge_pages ? std::aligned_alloc(size_t{2} << 20, bytes)
                                               : std::malloc(bytes)));
    if (p->a_ == nullptr) return absl::ResourceExhaustedError("bandwidth: no memory");
#ifdef MADV_HUGEPAGE
    if (huge_pages) ::madvise(p->a_.get(), bytes, MADV_HUGEPAGE);
#endif
    float* a = p->a_.get();
    p->OnThreads([a](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) a[i] = static_cast<float>(i & 7);
      return 0.0;
    });
    return p;
  }

  // `passes` reads of the whole array: GB/s of each and the best.
  Bandwidth Measure(int passes = 5) const {
    Bandwidth bw;
    const float* a = a_.get();
    for (int rep = 0; rep < passes; ++rep) {
      auto t0 = Clock::now();
      bw.checksum += OnThreads([a](int64_t lo, int64_t hi) { return Sum(a, lo, hi); });
      bw.runs_gb_s.push_back(static_cast<double>(n_) * sizeof(float) / 1e9 / SecondsSince(t0));
    }
    bw.best_gb_s = *std::max_element(bw.runs_gb_s.begin(), bw.runs_gb_s.end());
    return bw;
  }

 private:
  BandwidthProbe() = default;

  // Sum of a[lo, hi). Eight independent AVX-512 chains in registers, as the Linear kernels keep
  // in flight: a plain loop (GCC -O2 keeps its accumulators in memory) read 20-30% slower than
  // the kernels stream their weights, which made the "bound" lower than what decode reached.
  static double Sum(const float* a, int64_t lo, int64_t hi) {
    double s = 0;
    int64_t i = lo;
#if defined(__AVX512F__)
    __m512 acc[8];
    for (auto& v : acc) v = _mm512_setzero_ps();
    for (; i + 128 <= hi; i += 128) {
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) acc[k] = _mm512_add_ps(acc[k], _mm512_loadu_ps(a + i + 16 * k));
    }
    for (int k = 1; k < 8; ++k) acc[0] = _mm512_add_ps(acc[0], acc[k]);
    alignas(64) float lanes[16];  // (not _mm512_reduce_add_ps: GCC 12 warns in its header here)
    _mm512_store_ps(lanes, acc[0]);
    for (float v : lanes) s += v;
#endif
    for (; i < hi; ++i) s += a[i];
    return s;
  }

  // Runs fn(lo, hi) over `threads_` equal parts of [0, n_) on as many threads; sum of results.
  template <typename F>
  double OnThreads(F fn) const {
    std::vector<double> partial(threads_, 0.0);
    std::vector<std::thread> ts;
    for (int t = 0; t < threads_; ++t) {
      ts.emplace_back([&, t] { partial[t] = fn(n_ * t / threads_, n_ * (t + 1) / threads_); });
    }
    for (auto& th : ts) th.join();
    double sum = 0;
    for (double p : partial) sum += p;
    return sum;
  }

  int threads_ = 1;
  int64_t n_ = 0;
  std::unique_ptr<float[], FreeDeleter> a_;
};

absl::Status RunBandwidth() {
  const int64_t mib = absl::GetFlag(FLAGS_bandwidth_mib);
  const int threads = std::max(1, absl::GetFlag(FLAGS_threads));
  absl::StatusOr<Bandwidth> small, huge;
  for (bool hp : {false, true}) {
    auto probe = BandwidthProbe::Create(mib, threads, hp);
    if (!probe.ok()) return probe.status();
    (hp ? huge : small) = (*probe)->Measure();
  }
  std::cout << absl::StrFormat("bandwidth  %d MiB read, %d threads, best of 5 (checksum %.0f)\n",
                               mib, threads, small->checksum + huge->checksum);
  std::cout << absl::StrFormat("%-22s %12s %12s\n", "read GB/s", "best", "median");
  std::cout << absl::StrFormat("%-22s %12.2f %12.2f\n", "4 KiB pages", small->best_gb_s,
                               Median(small->runs_gb_s));
  std::cout << absl::StrFormat("%-22s %12.2f %12.2f\n", "2 MiB pages", huge->best_gb_s,
                               Median(huge->runs_gb_s));
  json j = {{"mode", "bandwidth"},
            {"mib", mib},
            {"threads", threads},
            {"gb_s", small->best_gb_s},
            {"gb_s_runs", small->runs_gb_s},
            {"huge_pages_gb_s", huge->best_gb_s},
            {"huge_pages_gb_s_runs", huge->runs_gb_s}};
  return WriteJson(j);
}

// ------------------------------------------------------------------------------------ offline

absl::Status RunOffline() {
  const std::string dt = absl::GetFlag(FLAGS_compute_dtype);
  LoadOptions lo;
  if (dt == "bf16") {
    lo.compute = ComputeType::kBF16;
  } else if (dt != "fp32") {
    return absl::InvalidArgumentError("--compute_dtype must be fp32 or bf16");
  }
  absl::Status load_flags = LoadOptionsFromFlags(&lo);
  if (!load_flags.ok()) return load_flags;
  const bool dummy = lo.load_format == LoadOptions::LoadFormat::kDummy;
  const int threads = absl::GetFlag(FLAGS_threads);
  ops::SetNumThreads(threads);
  auto device = ParseDevice(absl::GetFlag(FLAGS_device));
  if (!device.ok()) return device.status();
  auto described = DescribeDevice(*device);
  if (!described.ok()) return described.status();
  lo.device = *device;
  int64_t n_prompt = absl::GetFlag(FLAGS_prompt_tokens);
  if (n_prompt < 0) n_prompt = 512;
  const int64_t n_decode = absl::GetFlag(FLAGS_decode_tokens);
  const int repeats = absl::GetFlag(FLAGS_repeats);
  if (n_prompt < 1 || n_decode < 1 || repeats < 1) {
    return absl::InvalidArgumentError("--prompt_tokens, --decode_tokens, --repeats must be >= 1");
  }
  // The bandwidth is measured right before each measured run (the dev VM's bandwidth drifts by
  // 1.5x within minutes): each run's fraction of its own bound.
  const double given_bandwidth = absl::GetFlag(FLAGS_bandwidth_gbs);
  std::unique_ptr<BandwidthProbe> probe;
  if (given_bandwidth == 0 && device->is_cpu()) {  // a GPU's: pass --bandwidth_gbs
    auto p = BandwidthProbe::Create(absl::GetFlag(FLAGS_bandwidth_mib), threads,
                                    /*huge_pages=*/true);
    if (!p.ok()) return p.status();
    probe = std::move(*p);
  }
  const std::string dir = absl::GetFlag(FLAGS_model);
  std::cerr << "loading " << dir << (dummy ? " (dummy weights)" : "") << std::flush;
  auto t_load = Clock::now();
  auto model = Model::Load(dir, lo);
  std::cerr << "\r" << std::string(dir.size() + 40, ' ') << "\r";
  if (!model.ok()) return model.status();
  const double load_s = SecondsSince(t_load);
  const ModelConfig& cfg = (*model)->config();
  const std::vector<int32_t> pool = LoadIds();
  const std::vector<int32_t> prompt = Prompt(pool, 0, n_prompt, cfg.vocab_size);
  GenerateOptions go;
  go.max_new_tokens = n_decode;  // greedy by default, no stop tokens

  // Weights held (as loaded) and read per decoded token.
  WeightElementBytes eb;
  // Bytes a weight of each kind reads: int8 1, int4 4 bits plus a 4-byte scale per 64.
  auto quant_bytes = [](LoadOptions::WeightQuant q, double otherwise) {
    return q == LoadOptions::WeightQuant::kInt8   ? 1.0
           : q == LoadOptions::WeightQuant::kInt4 ? 0.5625
                                                  : otherwise;
  };
  const double unquantised = PackedBytesPerWeight(lo.compute == ComputeType::kBF16, cfg.dtype);
  eb.matrix = quant_bytes(lo.attention_quant, unquantised);
  eb.expert = quant_bytes(lo.expert_quant, unquantised);
  eb.router = PackedBytesPerWeight(false, cfg.dtype);
  eb.embedding = static_cast<int64_t>(DTypeSize(cfg.dtype));
  const DecodeBytes per_token = DecodeWeightBytes(cfg, cfg.num_experts_per_tok, eb);
  int64_t weight_bytes = 0;
  for (const WeightSpec& w : CheckpointWeights(cfg, (*model)->arch())) {
    int64_t n = 1;
    for (int64_t d : w.shape) n *= d;
    weight_bytes += n * static_cast<int64_t>(DTypeSize(cfg.dtype));
  }

  std::vector<double> prefill, decode, bandwidths, fractions;
  for (int i = 0; i <= repeats; ++i) {
    std::cerr << "\r" << (i == 0 ? "warm-up" : absl::StrCat("run ", i, "/", repeats)) << "   "
              << std::flush;
    const double bw = probe != nullptr && i > 0 ? probe->Measure().best_gb_s : given_bandwidth;
    auto r = Generate(**model, prompt, go);
    if (!r.ok()) return r.status();
    if (i == 0) continue;
    prefill.push_back(r->prefill_seconds > 0 ? n_prompt / r->prefill_seconds : 0.0);
    decode.push_back(r->ids.size() > 1 && r->decode_seconds > 0
                         ? (r->ids.size() - 1) / r->decode_seconds
                         : 0.0);
    const double bound_i = BandwidthBoundTokensPerSecond(bw, per_token.total());
    if (bound_i > 0) {
      bandwidths.push_back(bw);
      fractions.push_back(decode.back() / bound_i);
    }
  }
  std::cerr << "\r" << std::string(20, ' ') << "\r";
  const double p = Median(prefill), d = Median(decode);
  // Batched decode: `batch` sequences prefilled in one step, then decoded together (greedy).
  const int batch = absl::GetFlag(FLAGS_batch);
  double batch_tok_s = 0, batch_step_ms = 0;
  if (batch > 1) {
    auto cache = (*model)->NewCache(batch * (n_prompt + n_decode) + 64);
    std::vector<SeqStep> steps(batch);
    for (int b = 0; b < batch; ++b) {
      steps[b].seq_id = static_cast<uint64_t>(b + 1);
      steps[b].tokens = Prompt(pool, b, n_prompt, cfg.vocab_size);
    }
    // Greedy: each step returns its rows' argmax only (Model::StepArgMax; on a GPU the logits
    // stay there, as the attention worker's plain greedy steps do).
    std::vector<int32_t> ids;
    auto next = [&]() {
      for (int b = 0; b < batch; ++b) {
        steps[b].start_pos += static_cast<int64_t>(steps[b].tokens.size());
        steps[b].tokens = {ids[b]};
      }
    };
    absl::Status st = (*model)->StepArgMax(steps, cache.get(), &ids);
    if (!st.ok()) return st;
    next();
    auto t0 = Clock::now();
    for (int64_t i = 1; i < n_decode; ++i) {
      std::cerr << "\rbatch " << batch << ": token " << i << "/" << n_decode - 1 << "   " << std::flush;
      st = (*model)->StepArgMax(steps, cache.get(), &ids);
      if (!st.ok()) return st;
      next();
    }
    const double total_s = SecondsSince(t0);
    batch_tok_s = batch * (n_decode - 1) / total_s;
    if (n_decode > 1) batch_step_ms = 1e3 * total_s / (n_decode - 1);
    std::cerr << "\r" << std::string(40, ' ') << "\r";
  }
  const double bandwidth = Median(bandwidths);
  const double bound = BandwidthBoundTokensPerSecond(bandwidth, per_token.total());
  const double fraction = Median(fractions);
  const std::string bandwidth_source =
      probe != nullptr ? absl::StrFormat("measured before each run: %.1f-%.1f; %d MiB in 2 MiB "
                                         "pages, %d threads, best of 5",
                                         bandwidths.empty() ? 0.0 : *std::min_element(bandwidths.begin(), bandwidths.end()),
                                         bandwidths.empty() ? 0.0 : *std::max_element(bandwidths.begin(), bandwidths.end()),
                                         absl::GetFlag(FLAGS_bandwidth_mib), threads)
                       : given_bandwidth > 0 ? "--bandwidth_gbs" : "none";
  std::cout << absl::StrFormat(
      "offline  model=%s%s layers=%d device=%s compute=%s attention=%s experts=%s threads=%d "
      "prompt=%d decode=%d repeats=%d (ids: %s, load %.2f s)\n",
      dir, dummy ? " (dummy weights)" : "", cfg.num_hidden_layers, *described, dt,
      ComputeTypeName(lo.attention_compute()), ComputeTypeName(lo.expert_compute()), threads,
      n_prompt, n_decode, repeats,
      pool.empty() ? "id 1 repeated" : "ids_file", load_s);
  std::cout << absl::StrFormat("%-22s %12s %12s %12s\n", "", "median", "min", "max");
  std::cout << absl::StrFormat("%-22s %12.1f %12.1f %12.1f\n", "prefill tok/s", p,
                               *std::min_element(prefill.begin(), prefill.end()),
                               *std::max_element(prefill.begin(), prefill.end()));
  std::cout << absl::StrFormat("%-22s %12.1f %12.1f %12.1f\n", "decode tok/s", d,
                               *std::min_element(decode.begin(), decode.end()),
                               *std::max_element(decode.begin(), decode.end()));
  if (batch > 1) {
    std::cout << absl::StrFormat(
        "%-22s %12.1f   (%d sequences decoding together, greedy; %.2f ms per step)\n",
        "batched out tok/s", batch_tok_s, batch, batch_step_ms);
  }
  std::cout << absl::StrFormat("%-22s %12.3f GiB (checkpoint dtype %s)\n", "weights",
                               weight_bytes / 1073741824.0, std::string(DTypeName(cfg.dtype)));
  // The process's peak resident memory so far (weights as packed, KV cache, scratch).
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  const double peak_rss_gb = usage.ru_maxrss * 1024.0 / 1e9;  // ru_maxrss is in KiB
  std::cout << absl::StrFormat("%-22s %12.2f GB (host, this process)\n", "peak RSS", peak_rss_gb);
  std::cout << absl::StrFormat(
      "%-22s %12.1f MB (attention %.1f, router %.1f, %d experts %.1f, dense/shared mlp %.1f, "
      "lm_head %.1f, embedding row %.3f)\n",
      "weight bytes / token", per_token.total() / 1e6, per_token.attention / 1e6,
      per_token.router / 1e6, cfg.num_experts_per_tok, per_token.experts / 1e6,
      per_token.dense_mlp / 1e6, per_token.lm_head / 1e6, per_token.embedding / 1e6);
  if (bound > 0) {
    std::cout << absl::StrFormat("%-22s %12.2f GB/s median (%s)\n", "memory bandwidth",
                                 bandwidth, bandwidth_source);
    std::cout << absl::StrFormat("%-22s %12.1f tok/s (bandwidth / bytes per token)\n",
                                 "decode bound", bound);
    std::cout << absl::StrFormat(
        "%-22s %12.1f %% of the bound (median over runs of each run's decode / bound; "
        "%.2f GB/s of weights read)\n",
        "decode achieved", 100.0 * fraction, d * per_token.total() / 1e9);
  }
  // What the device backend counted (CUDA: graph captures and replays).
  std::string backend_report;
  if (!device->is_cpu()) {
    auto backend = GetDeviceBackend(device->kind);
    if (backend.ok() && (*backend)->report) backend_report = (*backend)->report();
    if (!backend_report.empty()) std::cout << backend_report << "\n";
  }
  json j = {{"mode", "offline"},
            {"model", dir},
            {"device", *described},
            {"device_report", backend_report},
            {"batch", batch},
            {"peak_rss_gb", peak_rss_gb},
            {"batch_out_tok_s", batch_tok_s},
            {"batch_step_ms", batch_step_ms},
            {"load_format", dummy ? "dummy" : "auto"},
            {"num_layers", cfg.num_hidden_layers},
            {"compute_dtype", dt},
            {"expert_compute", ComputeTypeName(lo.expert_compute())},
            {"attention_compute", ComputeTypeName(lo.attention_compute())},
            {"threads", threads},
            {"prompt_tokens", n_prompt},
            {"decode_tokens", n_decode},
            {"repeats", repeats},
            {"load_s", load_s},
            {"prefill_tok_s", p},
            {"decode_tok_s", d},
            {"prefill_tok_s_runs", prefill},
            {"decode_tok_s_runs", decode},
            {"weight_bytes", weight_bytes},
            {"weight_bytes_per_token",
             {{"total", per_token.total()},
              {"attention", per_token.attention},
              {"router", per_token.router},
              {"experts", per_token.experts},
              {"dense_mlp", per_token.dense_mlp},
              {"lm_head", per_token.lm_head},
              {"embedding", per_token.embedding}}}};
  if (bound > 0) {
    j["bandwidth_gb_s"] = bandwidth;
    j["bandwidth_gb_s_runs"] = bandwidths;
    j["bandwidth_source"] = bandwidth_source;
    j["bandwidth_bound_tok_s"] = bound;
    j["decode_fraction_of_bound"] = fraction;
    j["decode_fraction_of_bound_runs"] = fractions;
  }
  return WriteJson(j);
}

// ------------------------------------------------------------------------------------ serving

// A worker's GetStats (Attention -> Stats, Expert -> ExpertStats), 10 s deadline.
template <typename StatsT, typename StubT>
absl::StatusOr<StatsT> GetWorkerStats(StubT* stub, const char* service) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  StatsT s;
  grpc::Status st = stub->GetStats(&ctx, internal::v1::StatsRequest(), &s);
  if (!st.ok()) {
    return absl::UnavailableError(absl::StrCat(service, "/GetStats: gRPC code ", st.error_code(),
                                               " ", st.error_message()));
  }
  return s;
}

absl::StatusOr<internal::v1::Stats> GetAttentionStats(internal::v1::Attention::Stub* stub) {
  return GetWorkerStats<internal::v1::Stats>(stub, "Attention");
}

// An expert worker the public API names (GetModelInfo, role "expert"), for its compute counters.
struct ExpertProbe {
  std::string addr;
  std::unique_ptr<internal::v1::Expert::Stub> stub;
  internal::v1::ExpertStats before;
};

absl::StatusOr<internal::v1::ExpertStats> GetExpertStats(internal::v1::Expert::Stub* stub) {
  return GetWorkerStats<internal::v1::ExpertStats>(stub, "Expert");
}

// Expert workers with a network address (not "in-process") that answer GetStats.
std::vector<ExpertProbe> FindExpertWorkers(v1::Generation::Stub* stub) {
  std::vector<ExpertProbe> out;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ModelInfo info;
  if (!stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok()) return out;
  for (const v1::WorkerInfo& w : info.workers()) {
    if (w.role() != "expert" || w.address().find(':') == std::string::npos) continue;
    ExpertProbe p;
    p.addr = w.address();
    p.stub = internal::v1::Expert::NewStub(
        grpc::CreateChannel(w.address(), grpc::InsecureChannelCredentials()));
    auto s = GetExpertStats(p.stub.get());
    if (!s.ok()) continue;
    p.before = *s;
    out.push_back(std::move(p));
  }
  return out;
}

int64_t Jittered(int64_t len, double jitter, std::mt19937_64* rng) {
  if (jitter <= 0) return len;
  const int64_t lo = std::max<int64_t>(1, std::llround(len * (1.0 - jitter)));
  const int64_t hi = std::max<int64_t>(lo, std::llround(len * (1.0 + jitter)));
  return std::uniform_int_distribution<int64_t>(lo, hi)(*rng);
}

json SummaryJson(const LatencySummary& s) {
  return {{"p50", s.p50}, {"p90", s.p90}, {"p99", s.p99}, {"mean", s.mean}, {"count", s.count}};
}

absl::Status RunServing() {
  const std::string addr = absl::GetFlag(FLAGS_addr);
  const int concurrency = absl::GetFlag(FLAGS_concurrency);
  const int n_requests = absl::GetFlag(FLAGS_requests);
  int64_t n_prompt = absl::GetFlag(FLAGS_prompt_tokens);
  if (n_prompt < 0) n_prompt = 128;
  const int64_t n_output = absl::GetFlag(FLAGS_output_tokens);
  const double jitter = absl::GetFlag(FLAGS_length_jitter);
  if (concurrency < 1 || n_requests < 1 || n_prompt < 1 || n_output < 1 || jitter < 0 ||
      jitter >= 1) {
    return absl::InvalidArgumentError(
        "need --concurrency, --requests, --prompt_tokens, --output_tokens >= 1 and "
        "--length_jitter in [0, 1)");
  }
  // Request shapes, drawn up front so that they depend on the seed only.
  const std::vector<int32_t> pool = LoadIds();
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  std::vector<std::vector<int32_t>> prompts(n_requests);
  std::vector<int64_t> outputs(n_requests);
  int64_t offset = 0;
  for (int i = 0; i < n_requests; ++i) {
    const int64_t p = Jittered(n_prompt, jitter, &rng);
    outputs[i] = Jittered(n_output, jitter, &rng);
    prompts[i] = Prompt(pool, offset, p);
    offset += p;
  }

  auto channel = grpc::CreateChannel(addr, grpc::InsecureChannelCredentials());
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(10))) {
    return absl::UnavailableError(absl::StrCat("cannot connect to ", addr));
  }
  auto stub = v1::Generation::NewStub(channel);
  std::vector<ExpertProbe> expert_workers = FindExpertWorkers(stub.get());
  std::unique_ptr<internal::v1::Attention::Stub> attention;
  internal::v1::Stats before;
  const std::string attention_addr = absl::GetFlag(FLAGS_attention_addr);
  if (!attention_addr.empty()) {
    attention = internal::v1::Attention::NewStub(
        grpc::CreateChannel(attention_addr, grpc::InsecureChannelCredentials()));
    auto s = GetAttentionStats(attention.get());
    if (!s.ok()) return s.status();
    before = *s;
  }

  std::vector<RequestRecord> records(n_requests);
  std::vector<std::string> errors;
  std::mutex mu;
  std::atomic<int> next{0}, done{0};
  std::mutex done_mu;
  std::condition_variable done_cv;
  std::atomic<int64_t> tokens_out{0};
  const auto t0 = Clock::now();
  auto worker = [&] {
    for (int i = next++; i < n_requests; i = next++) {
      RequestRecord& r = records[i];
      r.prompt_tokens = static_cast<int64_t>(prompts[i].size());
      v1::GenerateRequest req;
      req.set_request_id(absl::StrCat("bench-", i));
      req.mutable_token_ids()->mutable_ids()->Add(prompts[i].begin(), prompts[i].end());
      v1::SamplingParams* sp = req.mutable_sampling();
      sp->set_temperature(0);
      sp->set_ignore_eos(true);
      sp->set_max_tokens(static_cast<int32_t>(outputs[i]));
      grpc::ClientContext ctx;
      r.start = SecondsSince(t0);
      auto reader = stub->Generate(&ctx, req);
      v1::GenerateResponse resp;
      bool first = true;
      while (reader->Read(&resp)) {
        if (resp.ids_size() == 0) continue;
        const double now = SecondsSince(t0);
        if (first) {
          r.first_token = now;
          first = false;
        }
        r.end = now;
        r.output_tokens += resp.ids_size();
        tokens_out += resp.ids_size();
      }
      grpc::Status st = reader->Finish();
      if (!st.ok()) {
        r.ok = false;
        std::lock_guard<std::mutex> l(mu);
        errors.push_back(absl::StrCat("request ", i, ": ", st.error_code(), " ", st.error_message()));
      }
      {
        std::lock_guard<std::mutex> l(done_mu);
        ++done;
      }
      done_cv.notify_all();
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < concurrency; ++t) threads.emplace_back(worker);
  // Progress every 200 ms; the wall time ends when the last request does (not at a tick).
  double wall = 0;
  {
    std::unique_lock<std::mutex> l(done_mu);
    while (!done_cv.wait_for(l, std::chrono::milliseconds(200),
                             [&] { return done.load() >= n_requests; })) {
      std::cerr << absl::StrFormat("\rserving: %d/%d requests done, %d tokens, %.1f s",
                                   done.load(), n_requests, tokens_out.load(), SecondsSince(t0))
                << std::flush;
    }
    wall = SecondsSince(t0);
  }
  for (auto& th : threads) th.join();
  std::cerr << "\r" << std::string(60, ' ') << "\r";
  const ServingSummary s = SummarizeServing(records, wall);

  std::cout << absl::StrFormat(
      "serving  addr=%s concurrency=%d requests=%d prompt=%d output=%d jitter=%.2f seed=%d "
      "(ids: %s)\n",
      addr, concurrency, n_requests, n_prompt, n_output, jitter, absl::GetFlag(FLAGS_seed),
      pool.empty() ? "id 1 repeated" : "ids_file");
  std::cout << absl::StrFormat("%-14s %10s %10s %10s %10s %8s\n", "latency (ms)", "p50", "p90",
                               "p99", "mean", "count");
  for (const auto& [name, l] : {std::make_pair("TTFT", s.ttft), std::make_pair("TPOT", s.tpot)}) {
    std::cout << absl::StrFormat("%-14s %10.2f %10.2f %10.2f %10.2f %8d\n", name, l.p50 * 1e3,
                                 l.p90 * 1e3, l.p99 * 1e3, l.mean * 1e3, l.count);
  }
  std::cout << absl::StrFormat("%-22s %12.2f\n", "wall s", s.wall_seconds);
  std::cout << absl::StrFormat("%-22s %12d\n", "requests ok", s.requests);
  std::cout << absl::StrFormat("%-22s %12d\n", "errors", s.errors);
  std::cout << absl::StrFormat("%-22s %12d\n", "prompt tokens", s.prompt_tokens);
  std::cout << absl::StrFormat("%-22s %12d\n", "output tokens", s.output_tokens);
  std::cout << absl::StrFormat("%-22s %12.1f\n", "output tok/s", s.output_tokens_per_s);
  std::cout << absl::StrFormat("%-22s %12.1f\n", "total tok/s", s.total_tokens_per_s);
  std::cout << absl::StrFormat("%-22s %12.3f\n", "requests/s", s.requests_per_s);
  for (size_t i = 0; i < errors.size() && i < 5; ++i) std::cout << "  " << errors[i] << "\n";

  json j = {{"mode", "serving"},
            {"addr", addr},
            {"concurrency", concurrency},
            {"requests", n_requests},
            {"prompt_tokens", n_prompt},
            {"output_tokens", n_output},
            {"length_jitter", jitter},
            {"seed", absl::GetFlag(FLAGS_seed)},
            {"ttft_s", SummaryJson(s.ttft)},
            {"tpot_s", SummaryJson(s.tpot)},
            {"wall_s", s.wall_seconds},
            {"requests_ok", s.requests},
            {"errors", s.errors},
            {"prompt_tokens_total", s.prompt_tokens},
            {"output_tokens_total", s.output_tokens},
            {"output_tok_s", s.output_tokens_per_s},
            {"total_tok_s", s.total_tokens_per_s},
            {"requests_s", s.requests_per_s}};
  int64_t attention_steps = 0;
  if (attention) {
    auto after = GetAttentionStats(attention.get());
    if (!after.ok()) return after.status();
    const int64_t steps = after->steps() - before.steps();
    const double per = steps > 0 ? 1.0 / steps : 0.0;
    const double att = (after->attention_seconds() - before.attention_seconds()) * per;
    const double exp = (after->expert_wait_seconds() - before.expert_wait_seconds()) * per;
    const double smp = (after->sampling_seconds() - before.sampling_seconds()) * per;
    std::cout << absl::StrFormat("attention worker %s: %d steps, per step (ms)\n", attention_addr,
                                 steps);
    std::cout << absl::StrFormat("%-22s %12.3f\n", "  attention", att * 1e3);
    std::cout << absl::StrFormat("%-22s %12.3f\n", "  expert wait", exp * 1e3);
    std::cout << absl::StrFormat("%-22s %12.3f\n", "  sampling", smp * 1e3);
    j["attention_stats"] = {{"steps", steps},
                            {"attention_s_per_step", att},
                            {"expert_wait_s_per_step", exp},
                            {"sampling_s_per_step", smp}};
    attention_steps = steps;
  }
  // Expert workers' own compute (RunExperts on their shards), per step when the attention
  // worker's step count is known.
  json experts_json = json::array();
  for (ExpertProbe& p : expert_workers) {
    auto after = GetExpertStats(p.stub.get());
    if (!after.ok()) continue;
    const double compute = after->compute_seconds() - p.before.compute_seconds();
    const int64_t calls = after->calls() - p.before.calls();
    const int64_t rows = after->rows() - p.before.rows();
    std::cout << absl::StrFormat("expert worker %s: %d calls, %d rows, compute %.3f s", p.addr,
                                 calls, rows, compute);
    if (attention_steps > 0) {
      std::cout << absl::StrFormat(" (%.3f ms per step)", compute * 1e3 / attention_steps);
    }
    std::cout << "\n";
    experts_json.push_back({{"addr", p.addr},
                            {"calls", calls},
                            {"rows", rows},
                            {"compute_s", compute},
                            {"compute_s_per_step",
                             attention_steps > 0 ? compute / attention_steps : 0.0}});
  }
  if (!experts_json.empty()) j["expert_stats"] = experts_json;
  return WriteJson(j);
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "moemesh_bench --mode=offline|bandwidth|serving [flags]; see tools/moemesh_bench.cc");
  absl::ParseCommandLine(argc, argv);
  const std::string mode = absl::GetFlag(FLAGS_mode);
  absl::Status st;
  if (mode == "offline") {
    st = moemesh::RunOffline();
  } else if (mode == "bandwidth") {
    st = moemesh::RunBandwidth();
  } else if (mode == "serving") {
    st = moemesh::RunServing();
  } else {
    st = absl::InvalidArgumentError(
        absl::StrCat("--mode must be offline, bandwidth or serving, not '", mode, "'"));
  }
  if (!st.ok()) {
    std::cerr << "moemesh_bench: " << st << std::endl;
    return 1;
  }
  return 0;
}
