// encoder_worker: serves moemesh.internal.v1.Encoder (token embeddings) for one model.
//   encoder_worker --model=DIR --address=127.0.0.1:50052
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "encoder_worker/encoder_service.h"
#include "engine/arch.h"
#include "engine/config.h"
#include "engine/model.h"
#include "mesh/load_flags.h"
#include "mesh/placement.h"
#include "mesh/server.h"

ABSL_FLAG(std::string, model, "models/pydoc-moe-17m", "Checkpoint directory.");
ABSL_FLAG(std::string, address, "127.0.0.1:50052", "host:port to serve on.");
ABSL_FLAG(std::string, config, "", "Cluster config (protobuf text): gives model and address.");

namespace moemesh {
namespace {

int Fail(const absl::Status& st) {
  std::cerr << "encoder_worker: " << st << std::endl;
  return 1;
}

int Main() {
  std::string model_dir = absl::GetFlag(FLAGS_model);
  std::string address = absl::GetFlag(FLAGS_address);
  if (!absl::GetFlag(FLAGS_config).empty()) {
    auto c = LoadClusterConfig(absl::GetFlag(FLAGS_config));
    if (!c.ok()) return Fail(c.status());
    if (!c->model().empty()) model_dir = c->model();
    address = c->encoder().address();
  }
  LoadOptions lo;
  absl::Status load_flags = LoadOptionsFromFlags(&lo);
  if (!load_flags.ok()) return Fail(load_flags);
  auto cfg = LoadModelConfig(model_dir, lo);
  if (!cfg.ok()) return Fail(cfg.status());
  auto arch = ArchFor(*cfg);
  if (!arch.ok()) return Fail(arch.status());
  auto ckpt = OpenCheckpoint(model_dir, *cfg, *arch, lo, [](std::string_view n) {
    return n == "model.embed_tokens.weight";
  });
  if (!ckpt.ok()) return Fail(ckpt.status());
  auto emb = Embedder::Load(**ckpt, *cfg);
  if (!emb.ok()) return Fail(emb.status());
  EncoderService service(emb->get());
  std::string bound;
  auto server = StartServer(address, {&service}, &bound);
  if (!server.ok()) return Fail(server.status());
  std::cerr << "encoder_worker: serving embeddings of " << model_dir << " on " << bound << std::endl;
  ServeUntilSignal(server->get());
  return 0;
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("encoder_worker --model=DIR --address=HOST:PORT");
  absl::ParseCommandLine(argc, argv);
  return moemesh::Main();
}
