// expert_worker: serves moemesh.internal.v1.Expert for the (layer, expert) shards it holds.
//   expert_worker --model=DIR --address=127.0.0.1:50061 [--shards="0-5:0-7"] [--threads=2]
//   expert_worker --config=cluster.textproto --index=I   (model, address and shards from the config)
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/arch.h"
#include "engine/config.h"
#include "engine/model.h"
#include "engine/ops/threading.h"
#include "expert_worker/expert_service.h"
#include "mesh/load_flags.h"
#include "mesh/placement.h"
#include "mesh/server.h"

ABSL_FLAG(std::string, model, "models/pydoc-moe-17m", "Checkpoint directory.");
ABSL_FLAG(std::string, address, "127.0.0.1:50061", "host:port to serve on.");
ABSL_FLAG(std::string, shards, "", "Shards to hold, LAYERS:EXPERTS entries separated by ';' (e.g. \"0-5:0-7\"). Empty = every expert.");
ABSL_FLAG(std::string, even_share, "",
          "I/N: hold the I-th of N even shares of every MoE layer's experts (what a cluster "
          "config's expert worker with no shards gets), e.g. $(POD_INDEX)/4 in a Kubernetes "
          "StatefulSet. Instead of --shards.");
ABSL_FLAG(std::string, config, "", "Cluster config (protobuf text); with --index, gives model, address and shards.");
ABSL_FLAG(int32_t, index, -1, "This worker's index among the config's experts.");
ABSL_FLAG(int32_t, threads, 2, "Compute threads.");
ABSL_FLAG(std::string, compute_dtype, "fp32", "Matrix-product compute type: fp32 or bf16.");
ABSL_FLAG(std::string, device, "cpu", "Device the experts run on: cpu, cuda or cuda:N (CUDA needs a binary built with --config=cuda). With --config, the config's device for this worker wins when set.");

namespace moemesh {
namespace {

int Fail(const absl::Status& st) {
  std::cerr << "expert_worker: " << st << std::endl;
  return 1;
}

int Main() {
  std::string model_dir = absl::GetFlag(FLAGS_model);
  std::string address = absl::GetFlag(FLAGS_address);
  std::set<ExpertId> shards;
  ClusterConfig cluster;
  const bool from_config = !absl::GetFlag(FLAGS_config).empty();
  if (from_config) {
    auto c = LoadClusterConfig(absl::GetFlag(FLAGS_config));
    if (!c.ok()) return Fail(c.status());
    cluster = *c;
    if (!cluster.model().empty()) model_dir = cluster.model();
    const int i = absl::GetFlag(FLAGS_index);
    if (i < 0 || i >= cluster.experts_size()) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--index must be in [0, ", cluster.experts_size(), ")")));
    }
    address = cluster.experts(i).address();
  }
  std::string device_name = absl::GetFlag(FLAGS_device);
  if (from_config && !cluster.experts(absl::GetFlag(FLAGS_index)).device().empty()) {
    device_name = cluster.experts(absl::GetFlag(FLAGS_index)).device();
  }
  auto device = ParseDevice(device_name);
  if (!device.ok()) return Fail(device.status());
  auto described = DescribeDevice(*device);
  if (!described.ok()) return Fail(described.status());
  LoadOptions opt;
  absl::Status load_flags = LoadOptionsFromFlags(&opt);
  if (!load_flags.ok()) return Fail(load_flags);
  auto cfg = LoadModelConfig(model_dir, opt);
  if (!cfg.ok()) return Fail(cfg.status());
  auto arch = ArchFor(*cfg);
  if (!arch.ok()) return Fail(arch.status());
  if (from_config) {
    auto s = ShardsOf(cluster, *cfg, absl::GetFlag(FLAGS_index));
    if (!s.ok()) return Fail(s.status());
    shards = *s;
  } else if (!absl::GetFlag(FLAGS_even_share).empty()) {
    if (!absl::GetFlag(FLAGS_shards).empty()) {
      return Fail(absl::InvalidArgumentError("give --shards or --even_share, not both"));
    }
    const std::string spec = absl::GetFlag(FLAGS_even_share);
    std::vector<std::string> parts = absl::StrSplit(spec, '/');
    int i = -1, n = 0;
    if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &i) || !absl::SimpleAtoi(parts[1], &n) ||
        n < 1 || i < 0 || i >= n) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
          "--even_share must be I/N with 0 <= I < N (e.g. 0/2), not '", spec, "'")));
    }
    shards = EvenShare(*cfg, i, n);
  } else if (!absl::GetFlag(FLAGS_shards).empty()) {
    auto s = ParseShardSpec(absl::GetFlag(FLAGS_shards), *cfg);
    if (!s.ok()) return Fail(s.status());
    shards = *s;
  } else {
    shards = EvenShare(*cfg, 0, 1);
  }
  // Open only the tensors of the held experts.
  std::set<std::string> prefixes;
  for (const auto& [l, e] : shards) prefixes.insert(ExpertPrefix(*arch, l, e));
  auto want = [&prefixes](std::string_view name) {
    auto it = prefixes.upper_bound(std::string(name));
    if (it == prefixes.begin()) return false;
    --it;
    return absl::StartsWith(std::string(name), *it);
  };
  auto ckpt = OpenCheckpoint(model_dir, *cfg, *arch, opt, want);
  if (!ckpt.ok()) return Fail(ckpt.status());
  if (absl::GetFlag(FLAGS_compute_dtype) == "bf16") opt.compute = ComputeType::kBF16;
  opt.device = *device;
  ops::SetNumThreads(absl::GetFlag(FLAGS_threads));
  auto shard = ExpertShard::Load(**ckpt, *cfg, *arch, shards, opt);
  if (!shard.ok()) return Fail(shard.status());
  ExpertService service(shard->get(), cfg->hidden_size, device->ToString());
  std::string bound;
  auto server = StartServer(address, {&service}, &bound);
  if (!server.ok()) return Fail(server.status());
  std::cerr << "expert_worker: serving " << shards.size() << " experts (" << ShardSummary(shards)
            << ") of " << model_dir << " on " << *described << " ("
            << ComputeTypeName(opt.expert_compute()) << " products), listening on " << bound
            << std::endl;
  ServeUntilSignal(server->get());
  return 0;
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("expert_worker --model=DIR --address=HOST:PORT [--shards=L:E;...]");
  absl::ParseCommandLine(argc, argv);
  return moemesh::Main();
}
