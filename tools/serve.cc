// moemesh serve: the whole model in one process behind the public API, through the same classes
// as the cluster (AttentionWorker, Router, GenerationService) with in-process transports.
#include <chrono>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "attention_worker/setup.h"
#include "attention_worker/worker_flags.h"
#include "engine/ops/threading.h"
#include "engine/tokenizer.h"
#include "mesh/load_flags.h"
#include "mesh/server.h"
#include "router/attention_client.h"
#include "router/generation_service.h"
#include "router/router.h"
#include "router/router_flags.h"
#include "tools/commands.h"

ABSL_FLAG(int64_t, kv_capacity_tokens, 65536, "serve: KV cache size in tokens over all sequences.");

namespace moemesh {
namespace {

int Fail(const absl::Status& st) {
  std::cerr << "moemesh serve: " << st << std::endl;
  return 1;
}

}  // namespace

int RunServe() {
  const std::string dir = absl::GetFlag(FLAGS_model);
  ops::SetNumThreads(absl::GetFlag(FLAGS_threads));
  AttentionSetupOptions o;
  o.model_dir = dir;
  o.kv_capacity_tokens = absl::GetFlag(FLAGS_kv_capacity_tokens);
  AttentionFlagsInto(&o);
  if (absl::GetFlag(FLAGS_compute_dtype) == "bf16") o.load.compute = ComputeType::kBF16;
  auto device = ParseDevice(absl::GetFlag(FLAGS_device));
  if (!device.ok()) return Fail(device.status());
  o.load.device = *device;
  absl::Status load_flags = LoadOptionsFromFlags(&o.load);
  if (!load_flags.ok()) return Fail(load_flags);
  auto tok = Tokenizer::FromFile(dir + "/tokenizer.json");
  if (!tok.ok()) return Fail(tok.status());
  o.tokenizer = tok->get();  // the router's, also JSON mode's token table
  auto setup = BuildAttentionWorker(std::move(o));
  if (!setup.ok()) return Fail(setup.status());
  auto gen = GenerationDefaults::FromFile(dir + "/generation_config.json");
  if (!gen.ok()) return Fail(gen.status());
  LocalAttentionClient<AttentionWorker> client((*setup)->worker.get());
  RouterOptions ro = RouterOptionsFromFlags();
  auto router = Router::Create(tok->get(), (*setup)->cfg, *gen, &client, ro);
  if (!router.ok()) return Fail(router.status());
  const std::string address = absl::StrCat(absl::GetFlag(FLAGS_host), ":", absl::GetFlag(FLAGS_port));
  moemesh::v1::ModelInfo info = BasicModelInfo((*setup)->cfg);
  AddWorker(&info, "router", address, "cpu");
  AddWorker(&info, "encoder", "in-process", "cpu");
  // The attention stack and the in-process experts run on --device.
  const std::string where = (*setup)->worker->GetStats().device();
  AddWorker(&info, "attention", "in-process", where);
  AddWorker(&info, "expert", "in-process", where, (*setup)->expert_placement.front().second);
  GenerationService service(router->get(), tok->get(), info);
  std::string bound;
  auto server = StartServer(address, {&service}, &bound);
  if (!server.ok()) return Fail(server.status());
  auto http = StartHttpFromFlags(router->get(), dir, "moemesh serve");
  if (!http.ok()) return Fail(http.status());
  std::cerr << "moemesh serve: serving " << dir << " on " << bound << std::endl;
  // On SIGTERM: drain, then shut down (cancelling what is left; the router, destroyed after
  // the servers, ends them).
  WaitForSignalThenDrain(router->get(), server->get(), "moemesh serve");
  server->get()->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}

}  // namespace moemesh
