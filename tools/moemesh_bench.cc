// moemesh_bench: repeatable benchmarks of MoE Mesh.
//
//   moemesh_bench --mode=offline --model=DIR [--compute_dtype=fp32|bf16] [--threads=2]
//                 [--prompt_tokens=512] [--decode_tokens=128] [--repeats=3]
//       In-process Model: one warm-up run, then `repeats` single-stream greedy Generate runs (no
//       stop tokens); median prefill tok/s (prompt / prefill time) and decode tok/s ((new tokens
//       - 1) / decode time, as `moemesh generate`).
//   moemesh_bench --mode=bandwidth [--bandwidth_mib=1024] [--threads=2]
//       STREAM-style read: the sum of a float array by `threads` threads, best of 5, in GB/s.
//   moemesh_bench --mode=serving --addr=HOST:PORT [--concurrency=N] [--requests=M]
//                 [--prompt_tokens=128] [--output_tokens=128] [--length_jitter=0 --seed=1]
//                 [--attention_addr=HOST:PORT]
//       M requests over N concurrent streams of moemesh.v1.Generation/Generate (token id prompts,
//       temperature 0, ignore_eos, max_tokens = output length); lengths uniform within
//       +-jitter * length. TTFT / TPOT percentiles, output, total tok/s and requests/s over the
//       run's wall time. With --attention_addr: Attention/GetStats deltas per step.
//
// Prompts are the first tokens (serving: consecutive slices) of --ids_file, or token id 1
// repeated when it is missing. A table on stdout; with --json=FILE the same figures as JSON;
// progress on stderr.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

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
#include "nlohmann/json.hpp"
#include "protos/generation.grpc.pb.h"
#include "protos/worker.grpc.pb.h"
#include "tools/bench_stats.h"

ABSL_FLAG(std::string, mode, "offline", "offline, bandwidth or serving.");
ABSL_FLAG(std::string, model, "models/pydoc-moe-17m", "offline: model directory.");
ABSL_FLAG(std::string, compute_dtype, "fp32", "offline: fp32 or bf16.");
ABSL_FLAG(int32_t, threads, 2, "offline, bandwidth: compute threads.");
ABSL_FLAG(std::string, load_format, "auto", "offline: auto (the checkpoint's safetensors) or dummy (random weights from config.json alone).");
ABSL_FLAG(int64_t, num_layers, 0, "offline: use only the first N layers (0 = all); with --load_format=dummy.");
ABSL_FLAG(int32_t, batch, 1, "offline: also decode this many sequences together (> 1) and report output tok/s.");
ABSL_FLAG(std::string, device, "cpu", "offline: cpu, cuda or cuda:N (CUDA needs a --config=cuda build).");
ABSL_FLAG(int64_t, prompt_tokens, -1, "Prompt length (default: offline 512, serving 128).");
ABSL_FLAG(int64_t, decode_tokens, 128, "offline: new tokens per run.");
ABSL_FLAG(int32_t, repeats, 3, "offline: measured runs after the warm-up.");
ABSL_FLAG(int64_t, bandwidth_mib, 1024, "bandwidth: array size in MiB.");
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

// n ids starting at `offset` (wrapping) of `pool`, or id 1 repeated when the pool is empty.
std::vector<int32_t> Prompt(const std::vector<int32_t>& pool, int64_t offset, int64_t n) {
  std::vector<int32_t> p(n, 1);
  if (pool.empty()) return p;
  for (int64_t i = 0; i < n; ++i) p[i] = pool[(offset + i) % pool.size()];
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

// ------------------------------------------------------------------------------------ offline

absl::Status RunOffline() {
  const std::string dt = absl::GetFlag(FLAGS_compute_dtype);
  LoadOptions lo;
  if (dt == "bf16") {
    lo.compute = ComputeType::kBF16;
  } else if (dt != "fp32") {
    return absl::InvalidArgumentError("--compute_dtype must be fp32 or bf16");
  }
  const int threads = absl::GetFlag(FLAGS_threads);
  ops::SetNumThreads(threads);
  auto device = ParseDevice(absl::GetFlag(FLAGS_device));
  if (!device.ok()) return device.status();
  auto described = DescribeDevice(*device);
  if (!described.ok()) return described.status();
  lo.device = *device;
  auto format = ParseLoadFormat(absl::GetFlag(FLAGS_load_format));
  if (!format.ok()) return format.status();
  lo.load_format = *format;
  lo.num_layers = absl::GetFlag(FLAGS_num_layers);
  int64_t n_prompt = absl::GetFlag(FLAGS_prompt_tokens);
  if (n_prompt < 0) n_prompt = 512;
  const int64_t n_decode = absl::GetFlag(FLAGS_decode_tokens);
  const int repeats = absl::GetFlag(FLAGS_repeats);
  if (n_prompt < 1 || n_decode < 1 || repeats < 1) {
    return absl::InvalidArgumentError("--prompt_tokens, --decode_tokens, --repeats must be >= 1");
  }
  const std::string dir = absl::GetFlag(FLAGS_model);
  auto t_load = Clock::now();
  auto model = Model::Load(dir, lo);
  if (!model.ok()) return model.status();
  const double load_s = SecondsSince(t_load);
  const std::vector<int32_t> pool = LoadIds();
  const std::vector<int32_t> prompt = Prompt(pool, 0, n_prompt);
  GenerateOptions go;
  go.max_new_tokens = n_decode;  // greedy by default, no stop tokens

  std::vector<double> prefill, decode;
  for (int i = 0; i <= repeats; ++i) {
    std::cerr << "\r" << (i == 0 ? "warm-up" : absl::StrCat("run ", i, "/", repeats)) << "   "
              << std::flush;
    auto r = Generate(**model, prompt, go);
    if (!r.ok()) return r.status();
    if (i == 0) continue;
    prefill.push_back(r->prefill_seconds > 0 ? n_prompt / r->prefill_seconds : 0.0);
    decode.push_back(r->ids.size() > 1 && r->decode_seconds > 0
                         ? (r->ids.size() - 1) / r->decode_seconds
                         : 0.0);
  }
  std::cerr << "\r" << std::string(20, ' ') << "\r";
  const double p = Median(prefill), d = Median(decode);
  // Batched decode: `batch` sequences prefilled in one step, then decoded together (greedy).
  const int batch = absl::GetFlag(FLAGS_batch);
  double batch_tok_s = 0;
  if (batch > 1) {
    auto cache = (*model)->NewCache(batch * (n_prompt + n_decode) + 64);
    std::vector<SeqStep> steps(batch);
    for (int b = 0; b < batch; ++b) {
      steps[b].seq_id = static_cast<uint64_t>(b + 1);
      steps[b].tokens = Prompt(pool, b, n_prompt);
    }
    std::vector<float> logits;
    const int64_t V = (*model)->config().vocab_size;
    auto next = [&]() {
      for (int b = 0; b < batch; ++b) {
        const float* row = logits.data() + b * V;
        steps[b].start_pos += static_cast<int64_t>(steps[b].tokens.size());
        steps[b].tokens = {static_cast<int32_t>(std::max_element(row, row + V) - row)};
      }
    };
    absl::Status st = (*model)->Step(steps, cache.get(), &logits);
    if (!st.ok()) return st;
    next();
    auto t0 = Clock::now();
    for (int64_t i = 1; i < n_decode; ++i) {
      std::cerr << "\rbatch " << batch << ": token " << i << "/" << n_decode - 1 << "   " << std::flush;
      st = (*model)->Step(steps, cache.get(), &logits);
      if (!st.ok()) return st;
      next();
    }
    batch_tok_s = batch * (n_decode - 1) / SecondsSince(t0);
    std::cerr << "\r" << std::string(40, ' ') << "\r";
  }
  std::cout << absl::StrFormat(
      "offline  model=%s device=%s compute=%s threads=%d prompt=%d decode=%d repeats=%d "
      "(ids: %s, load %.2f s)\n",
      dir, *described, dt, threads, n_prompt, n_decode, repeats, pool.empty() ? "id 1 repeated" : "ids_file",
      load_s);
  std::cout << absl::StrFormat("%-22s %12s %12s %12s\n", "", "median", "min", "max");
  std::cout << absl::StrFormat("%-22s %12.1f %12.1f %12.1f\n", "prefill tok/s", p,
                               *std::min_element(prefill.begin(), prefill.end()),
                               *std::max_element(prefill.begin(), prefill.end()));
  std::cout << absl::StrFormat("%-22s %12.1f %12.1f %12.1f\n", "decode tok/s", d,
                               *std::min_element(decode.begin(), decode.end()),
                               *std::max_element(decode.begin(), decode.end()));
  if (batch > 1) {
    std::cout << absl::StrFormat("%-22s %12.1f   (%d sequences decoding together)\n",
                                 "batched out tok/s", batch_tok_s, batch);
  }
  json j = {{"batch", batch}, {"batch_out_tok_s", batch_tok_s}, {"load_format", absl::GetFlag(FLAGS_load_format)}, {"mode", "offline"},         {"model", dir},
            {"compute_dtype", dt},       {"threads", threads},
            {"device", *described},
            {"prompt_tokens", n_prompt}, {"decode_tokens", n_decode},
            {"repeats", repeats},        {"prefill_tok_s", p},
            {"decode_tok_s", d},         {"prefill_tok_s_runs", prefill},
            {"decode_tok_s_runs", decode}};
  return WriteJson(j);
}

// ---------------------------------------------------------------------------------- bandwidth

absl::Status RunBandwidth() {
  const int64_t mib = absl::GetFlag(FLAGS_bandwidth_mib);
  const int threads = std::max(1, absl::GetFlag(FLAGS_threads));
  if (mib < 1) return absl::InvalidArgumentError("--bandwidth_mib must be >= 1");
  const int64_t n = mib * (1 << 20) / static_cast<int64_t>(sizeof(float));
  std::unique_ptr<float[]> a(new float[n]);
  auto chunk = [&](int t, int64_t* lo, int64_t* hi) {
    *lo = n * t / threads;
    *hi = n * (t + 1) / threads;
  };
  {  // First touch by the thread that later reads each part.
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        int64_t lo, hi;
        chunk(t, &lo, &hi);
        for (int64_t i = lo; i < hi; ++i) a[i] = static_cast<float>(i & 7);
      });
    }
    for (auto& th : ts) th.join();
  }
  std::vector<double> gbs;
  double checksum = 0;
  for (int rep = 0; rep < 5; ++rep) {
    std::cerr << "\rbandwidth pass " << rep + 1 << "/5" << std::flush;
    std::vector<double> partial(threads, 0.0);
    auto t0 = Clock::now();
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        int64_t lo, hi;
        chunk(t, &lo, &hi);
        // 16 independent accumulators so the adds vectorize without -ffast-math.
        float acc[16] = {0};
        int64_t i = lo;
        for (; i + 16 <= hi; i += 16) {
          for (int k = 0; k < 16; ++k) acc[k] += a[i + k];
        }
        double s = 0;
        for (; i < hi; ++i) s += a[i];
        for (int k = 0; k < 16; ++k) s += acc[k];
        partial[t] = s;
      });
    }
    for (auto& th : ts) th.join();
    const double sec = SecondsSince(t0);
    for (double s : partial) checksum += s;
    gbs.push_back(static_cast<double>(n) * sizeof(float) / 1e9 / sec);
  }
  std::cerr << "\r" << std::string(24, ' ') << "\r";
  const double best = *std::max_element(gbs.begin(), gbs.end());
  std::cout << absl::StrFormat("bandwidth  %d MiB read, %d threads, best of 5 (checksum %.0f)\n",
                               mib, threads, checksum);
  std::cout << absl::StrFormat("%-22s %12.2f\n", "read GB/s (best)", best);
  std::cout << absl::StrFormat("%-22s %12.2f\n", "read GB/s (median)", Median(gbs));
  json j = {{"mode", "bandwidth"}, {"mib", mib},   {"threads", threads},
            {"gb_s", best},        {"gb_s_runs", gbs}};
  return WriteJson(j);
}

// ------------------------------------------------------------------------------------ serving

absl::StatusOr<internal::v1::Stats> GetAttentionStats(internal::v1::Attention::Stub* stub) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  internal::v1::Stats s;
  grpc::Status st = stub->GetStats(&ctx, internal::v1::StatsRequest(), &s);
  if (!st.ok()) {
    return absl::UnavailableError(absl::StrCat("Attention/GetStats: gRPC code ", st.error_code(), " ", st.error_message()));
  }
  return s;
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
      ++done;
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < concurrency; ++t) threads.emplace_back(worker);
  while (done.load() < n_requests) {
    std::cerr << absl::StrFormat("\rserving: %d/%d requests done, %d tokens, %.1f s", done.load(),
                                 n_requests, tokens_out.load(), SecondsSince(t0))
              << std::flush;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  for (auto& th : threads) th.join();
  const double wall = SecondsSince(t0);
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
  }
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
