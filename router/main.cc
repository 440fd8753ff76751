// router: serves the public API (moemesh.v1.Generation) over one or more attention workers.
//   router --model=DIR --address=127.0.0.1:50051 --attention=127.0.0.1:50053[,127.0.0.1:50054]
//   router --config=cluster.textproto
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/config.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "mesh/grpc_clients.h"
#include "mesh/load_flags.h"
#include "mesh/placement.h"
#include "mesh/server.h"
#include "router/attention_client.h"
#include "router/generation_service.h"
#include "router/router.h"
#include "router/router_flags.h"

ABSL_FLAG(std::string, model, "models/pydoc-moe-17m", "Checkpoint directory (tokenizer.json, config.json, generation_config.json).");
ABSL_FLAG(std::string, address, "127.0.0.1:50051", "host:port of the public API.");
ABSL_FLAG(std::string, attention, "127.0.0.1:50053",
          "Attention worker address, or comma-separated addresses of several (data parallel: each "
          "request goes to the one with the most free KV cache).");
ABSL_FLAG(std::string, config, "", "Cluster config (protobuf text): gives model and every address.");
ABSL_FLAG(double, step_timeout, 60, "Seconds before a step RPC to the attention worker fails.");
ABSL_FLAG(std::string, router_name, "",
          "This router's name on the attention workers. When it starts, they free at once the "
          "sequences an earlier run of the same name left (a router killed and started again), "
          "instead of holding their KV rows until --idle_sequence_seconds. Routers running at "
          "the same time over the same workers need different names. Empty: HOSTNAME/ADDRESS "
          "(this host's name and --address: the same router started again is the same, one on "
          "another host or address another; off for a port 0 address); none: off.");

namespace moemesh {
namespace {

int Fail(const absl::Status& st) {
  std::cerr << "router: " << st << std::endl;
  return 1;
}

// --router_name, or its default for a router listening on `address`.
std::string RouterName(const std::string& address) {
  const std::string flag = absl::GetFlag(FLAGS_router_name);
  if (flag == "none") return "";
  if (!flag.empty()) return flag;
  // A port the system picks is another each run: no earlier run is known by it.
  if (absl::EndsWith(address, ":0")) return "";
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) host[0] = '\0';
  return absl::StrCat(host[0] != '\0' ? host : "localhost", "/", address);
}

int Main() {
  std::string model_dir = absl::GetFlag(FLAGS_model);
  std::string address = absl::GetFlag(FLAGS_address);
  std::vector<std::string> attention;
  for (absl::string_view a :
       absl::StrSplit(absl::GetFlag(FLAGS_attention), ',', absl::SkipWhitespace())) {
    attention.emplace_back(a);
  }
  ClusterConfig cluster;
  if (!absl::GetFlag(FLAGS_config).empty()) {
    auto c = LoadClusterConfig(absl::GetFlag(FLAGS_config));
    if (!c.ok()) return Fail(c.status());
    cluster = *c;
    if (!cluster.model().empty()) model_dir = cluster.model();
    address = cluster.router().address();
    attention.clear();
    for (const auto& a : cluster.attention()) attention.push_back(a.address());
  }
  // Weights are the workers' business; --num_layers only changes the layer count reported.
  LoadOptions lo;
  absl::Status load_flags = LoadOptionsFromFlags(&lo);
  if (!load_flags.ok()) return Fail(load_flags);
  auto cfg = LoadModelConfig(model_dir, lo);
  if (!cfg.ok()) return Fail(cfg.status());
  auto gen = GenerationDefaults::FromFile(model_dir + "/generation_config.json");
  if (!gen.ok()) return Fail(gen.status());
  auto tok = Tokenizer::FromFile(model_dir + "/tokenizer.json");
  if (!tok.ok()) return Fail(tok.status());
  absl::Status peer = CheckPeerTimeoutFlag();
  if (!peer.ok()) return Fail(peer);
  std::vector<AttentionClient*> lanes;
  auto clients =
      ConnectAttentionWorkers(attention, absl::GetFlag(FLAGS_step_timeout), 120, &lanes);
  if (!clients.ok()) return Fail(clients.status());
  RouterOptions ro = RouterOptionsFromFlags();
  ro.name = RouterName(address);
  // Before Create frees what an earlier run under this name left: not while it still serves.
  if (absl::Status free = CheckCanListen(address); !free.ok()) return Fail(free);
  auto router = Router::Create(tok->get(), *cfg, *gen, lanes, ro);
  if (!router.ok()) return Fail(router.status());
  // Every worker in GetModelInfo: from the cluster config, or (given only --attention) the
  // encoder and expert workers the attention workers say they reach.
  moemesh::v1::ModelInfo info = BasicModelInfo(*cfg);
  AddWorker(&info, "router", address, "cpu");
  std::string encoder = cluster.encoder().address();
  std::vector<std::string> experts;
  for (const auto& e : cluster.experts()) experts.push_back(e.address());
  std::vector<std::string> attention_devices;
  for (size_t i = 0; i < attention.size(); ++i) {
    auto stats = (*clients)[i]->GetStats();
    attention_devices.push_back(stats.ok() ? stats->device() : "cpu");
    if (!stats.ok() || !absl::GetFlag(FLAGS_config).empty()) continue;
    if (encoder.empty()) encoder = stats->encoder_address();
    for (const std::string& e : stats->expert_addresses()) {
      if (std::find(experts.begin(), experts.end(), e) == experts.end()) experts.push_back(e);
    }
  }
  if (!encoder.empty()) AddWorker(&info, "encoder", encoder, "cpu");
  for (size_t i = 0; i < attention.size(); ++i) {
    AddWorker(&info, "attention", attention[i], attention_devices[i]);
  }
  for (const std::string& e : experts) {
    GrpcExpertTransport t(e, 10);
    auto es = t.GetStats();
    auto shards = es.ok() ? ShardsFromStats(*es) : absl::StatusOr<std::set<ExpertId>>(es.status());
    AddWorker(&info, "expert", e, es.ok() ? es->device() : "unknown",
              shards.ok() ? ShardSummary(*shards) : "");
  }
  GenerationService service(router->get(), tok->get(), info);
  std::string bound;
  auto server = StartServer(address, {&service}, &bound);
  if (!server.ok()) return Fail(server.status());
  auto http = StartHttpFromFlags(router->get(), model_dir, "router");
  if (!http.ok()) return Fail(http.status());
  std::cerr << "router: serving moemesh.v1.Generation on " << bound << std::endl;
  // On SIGTERM: drain, then shut down (cancelling what is left; the router, destroyed after
  // the server, ends them).
  WaitForSignalThenDrain(router->get(), server->get(), "router");
  server->get()->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("router --model=DIR --address=HOST:PORT --attention=ADDR[,ADDR...]");
  absl::ParseCommandLine(argc, argv);
  return moemesh::Main();
}
