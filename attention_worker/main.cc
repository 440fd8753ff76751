// attention_worker: serves moemesh.internal.v1.Attention (batched forward steps, KV cache,
// sampling) with embeddings from an encoder worker and experts on expert workers.
//   attention_worker --model=DIR --address=127.0.0.1:50053 --encoder=127.0.0.1:50052
//                    --experts=127.0.0.1:50061,127.0.0.1:50062   (one command line)
//   attention_worker --config=cluster.textproto [--index=I]   (the config's I-th attention worker)
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "attention_worker/attention_service.h"
#include "attention_worker/setup.h"
#include "attention_worker/worker_flags.h"
#include "engine/ops/threading.h"
#include "mesh/grpc_clients.h"
#include "mesh/load_flags.h"
#include "mesh/placement.h"
#include "mesh/server.h"

ABSL_FLAG(std::string, model, "models/pydoc-moe-17m", "Checkpoint directory.");
ABSL_FLAG(std::string, address, "127.0.0.1:50053", "host:port to serve on.");
ABSL_FLAG(std::string, encoder, "", "Encoder worker address; empty = embed in this process.");
ABSL_FLAG(std::string, experts, "", "Comma-separated expert worker addresses; empty = all experts in this process.");
ABSL_FLAG(std::string, config, "", "Cluster config (protobuf text): gives model and every address.");
ABSL_FLAG(int32_t, index, 0, "With --config: this worker's index among the config's attention workers.");
ABSL_FLAG(int64_t, kv_capacity_tokens, 65536, "KV cache size in tokens over all sequences.");
ABSL_FLAG(std::string, wire_dtype, "f32", "Hidden states sent to expert workers as f32 (exact) or bf16.");
ABSL_FLAG(int32_t, threads, 2, "Compute threads.");
ABSL_FLAG(std::string, compute_dtype, "fp32", "Matrix-product compute type: fp32 or bf16.");
ABSL_FLAG(std::string, device, "cpu", "Device the attention stack and KV cache live on: cpu, cuda or cuda:N (CUDA needs a binary built with --config=cuda). With --config, the config's attention device wins when set.");
ABSL_FLAG(bool, overlap_halves, true, "With remote expert workers: run a step of 16 or more sequences as two halves on two threads, so that one half's attention overlaps the other's wait on the expert workers (CPU attention only).");
ABSL_FLAG(double, expert_timeout, 30, "Seconds before an expert call fails over or fails.");

namespace moemesh {
namespace {

int Fail(const absl::Status& st) {
  std::cerr << "attention_worker: " << st << std::endl;
  return 1;
}

int Main() {
  AttentionSetupOptions o;
  o.model_dir = absl::GetFlag(FLAGS_model);
  std::string address = absl::GetFlag(FLAGS_address);
  o.encoder_address = absl::GetFlag(FLAGS_encoder);
  for (absl::string_view a : absl::StrSplit(absl::GetFlag(FLAGS_experts), ',', absl::SkipWhitespace())) {
    o.expert_addresses.emplace_back(a);
  }
  std::string wire = absl::GetFlag(FLAGS_wire_dtype);
  std::string device = absl::GetFlag(FLAGS_device);
  if (!absl::GetFlag(FLAGS_config).empty()) {
    auto c = LoadClusterConfig(absl::GetFlag(FLAGS_config));
    if (!c.ok()) return Fail(c.status());
    if (!c->model().empty()) o.model_dir = c->model();
    const int i = absl::GetFlag(FLAGS_index);
    if (i < 0 || i >= c->attention_size()) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("--index must be in [0, ", c->attention_size(), ") (the config's attention workers)")));
    }
    const auto& self = c->attention(i);
    address = self.address();
    o.encoder_address = c->encoder().address();
    o.expert_addresses.clear();
    for (const auto& e : c->experts()) o.expert_addresses.push_back(e.address());
    if (!c->wire_dtype().empty()) wire = c->wire_dtype();
    if (!self.device().empty()) device = self.device();
  }
  auto dev = ParseDevice(device);
  if (!dev.ok()) return Fail(dev.status());
  o.load.device = *dev;
  if (wire != "f32" && wire != "bf16") return Fail(absl::InvalidArgumentError("--wire_dtype must be f32 or bf16"));
  o.wire_dtype = wire == "bf16" ? wire::DTYPE_BF16 : wire::DTYPE_F32;
  if (absl::GetFlag(FLAGS_compute_dtype) == "bf16") o.load.compute = ComputeType::kBF16;
  absl::Status load_flags = LoadOptionsFromFlags(&o.load);
  if (!load_flags.ok()) return Fail(load_flags);
  o.kv_capacity_tokens = absl::GetFlag(FLAGS_kv_capacity_tokens);
  AttentionFlagsInto(&o);
  o.expert_timeout_seconds = absl::GetFlag(FLAGS_expert_timeout);
  absl::Status peer = CheckPeerTimeoutFlag();
  if (!peer.ok()) return Fail(peer);
  o.overlap_halves = absl::GetFlag(FLAGS_overlap_halves);
  ops::SetNumThreads(absl::GetFlag(FLAGS_threads));
  const char* products = ComputeTypeName(o.load.attention_compute());
  std::string encoder_address = o.encoder_address;
  std::vector<std::string> expert_addresses = o.expert_addresses;
  auto setup = BuildAttentionWorker(std::move(o));
  if (!setup.ok()) return Fail(setup.status());
  AttentionService service((*setup)->worker.get(), std::move(encoder_address),
                           std::move(expert_addresses), (*setup)->dispatcher);
  std::string bound;
  auto server = StartServer(address, {&service}, &bound);
  if (!server.ok()) return Fail(server.status());
  std::cerr << "attention_worker: serving on " << bound << " ("
            << (*setup)->worker->GetStats().device() << ", "
            << products << " products); experts:";
  for (const auto& [name, shards] : (*setup)->expert_placement) std::cerr << " " << name << "=" << shards;
  std::cerr << std::endl;
  ServeUntilSignal(server->get());
  return 0;
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("attention_worker --model=DIR --address=HOST:PORT [--encoder=ADDR] [--experts=ADDR,...]");
  absl::ParseCommandLine(argc, argv);
  return moemesh::Main();
}
