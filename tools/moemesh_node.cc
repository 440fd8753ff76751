// moemesh_node: one MoE Mesh process per MPI rank, for launching a cluster with OpenMPI:
//   mpirun -np N moemesh_node [--config=FILE | --model=DIR] [--port=50051]
// Rank 0 is the router (public API on --port), rank 1 the encoder worker, ranks 2..A+1 the
// attention workers (A = --attention_ranks, default 1), the rest expert workers (N >= A + 3).
// Every rank listens on a free port; addresses are
// exchanged with MPI_Allgather at start-up. gRPC carries the public API, health, control and the
// encoder's traffic; RunExperts (attention -> expert workers, once per worker per layer) goes
// over MPI point-to-point messages (mesh/mpi_transport.h) unless --expert_transport=grpc.
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <thread>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "attention_worker/attention_service.h"
#include "attention_worker/setup.h"
#include "attention_worker/worker_flags.h"
#include "encoder_worker/encoder_service.h"
#include "engine/arch.h"
#include "engine/ops/threading.h"
#include "engine/tokenizer.h"
#include "expert_worker/expert_service.h"
#include "mesh/grpc_clients.h"
#include "mesh/load_flags.h"
#include "mesh/mpi_transport.h"
#include "mesh/placement.h"
#include "mesh/server.h"
#include "router/attention_client.h"
#include "router/generation_service.h"
#include "router/router.h"
#include "router/router_flags.h"

ABSL_FLAG(std::string, config, "", "Cluster config (protobuf text): model, expert shards by expert index (rank - 2 - attention ranks), wire_dtype. Addresses in it are ignored.");
ABSL_FLAG(int32_t, attention_ranks, 1,
          "Ranks 2..A+1 are attention workers (data parallel: the router admits each request to "
          "the one with the most free KV cache); the ranks after them are expert workers.");
ABSL_FLAG(std::string, model, "models/pydoc-moe-17m", "Checkpoint directory (when no --config).");
ABSL_FLAG(int32_t, port, 50051, "Port of the public API on rank 0.");
ABSL_FLAG(std::string, listen_host, "0.0.0.0", "Address every rank listens on.");
ABSL_FLAG(std::string, advertise_host, "", "Host name other ranks use to reach this one (default: this host's name).");
ABSL_FLAG(int32_t, threads, 1, "Compute threads per rank.");
ABSL_FLAG(int32_t, attention_threads, 0,
          "Compute threads of the attention ranks (0 = --threads). The attention and the expert "
          "ranks compute in turn, so on one small host it can use every core while each expert rank "
          "uses one.");
ABSL_FLAG(std::string, compute_dtype, "fp32", "Matrix-product compute type: fp32 or bf16.");
ABSL_FLAG(int64_t, kv_capacity_tokens, 65536, "Attention worker's KV cache size in tokens.");
ABSL_FLAG(std::string, expert_transport, "mpi",
          "How the attention worker reaches the expert workers for RunExperts: mpi (MPI messages, "
          "shared memory on one host) or grpc (as a cluster outside mpirun). Health and GetStats "
          "use gRPC either way.");
ABSL_FLAG(bool, overlap_halves, true,
          "Attention rank: run a step of 16 or more sequences as two halves on two threads, so "
          "that one half's attention overlaps the other's wait on the expert ranks.");
ABSL_FLAG(int32_t, mpi_spin_us, 0,
          "MPI transport: busy-poll this long after a message before napping (0 = nap at once, "
          "which leaves the CPU to the computing ranks when mpirun oversubscribes cores).");
ABSL_FLAG(int32_t, mpi_max_nap_us, 40,
          "MPI transport: longest nap between polls while waiting (naps double from 5 us).");

namespace moemesh {
namespace {

constexpr int kAddrLen = 256;

// One line on stderr for this rank, written with a single write(2): mpirun merges the ranks'
// stderr, and an unbuffered std::cerr writes each << piece separately, so lines written piece by
// piece interleave with other ranks' lines (a pipe write of under PIPE_BUF bytes is atomic).
void Say(int rank, const std::string& msg) {
  const std::string line = absl::StrCat("moemesh_node rank ", rank, ": ", msg, "\n");
  if (::write(STDERR_FILENO, line.data(), line.size()) < 0) std::perror("moemesh_node");
}

int Fail(int rank, const absl::Status& st) {
  Say(rank, st.ToString());
  MPI_Abort(MPI_COMM_WORLD, 1);
  return 1;
}

// Every rank contributes `mine` (may be empty); returns all ranks' strings.
std::vector<std::string> AllGather(const std::string& mine, int size) {
  char buf[kAddrLen] = {0};
  mine.copy(buf, kAddrLen - 1);
  std::vector<char> all(static_cast<size_t>(kAddrLen) * size);
  MPI_Allgather(buf, kAddrLen, MPI_CHAR, all.data(), kAddrLen, MPI_CHAR, MPI_COMM_WORLD);
  std::vector<std::string> out;
  for (int i = 0; i < size; ++i) out.emplace_back(&all[static_cast<size_t>(i) * kAddrLen]);
  return out;
}

std::string Advertised(const std::string& bound) {
  std::string host = absl::GetFlag(FLAGS_advertise_host);
  if (host.empty()) {
    char name[256] = {0};
    gethostname(name, sizeof(name) - 1);
    host = name;
  }
  return absl::StrCat(host, bound.substr(bound.rfind(':')));
}

int Main(int rank, int size, int thread_level) {
  const int n_attention = absl::GetFlag(FLAGS_attention_ranks);
  const int first_expert = 2 + n_attention;
  if (n_attention < 1 || size < first_expert + 1) {
    if (rank == 0) {
      std::cerr << "moemesh_node: needs --attention_ranks >= 1 and at least attention_ranks + 3 "
                   "ranks (router, encoder, attention and expert workers); got "
                << n_attention << " and " << size << std::endl;
    }
    return 2;
  }
  const bool is_attention = rank >= 2 && rank < first_expert;
  const bool is_expert = rank >= first_expert;
  const std::string transport = absl::GetFlag(FLAGS_expert_transport);
  if (transport != "mpi" && transport != "grpc") {
    if (rank == 0) std::cerr << "moemesh_node: --expert_transport must be mpi or grpc, got '" << transport << "'" << std::endl;
    return 2;
  }
  const bool use_mpi = transport == "mpi";
  if (use_mpi) {
    absl::Status st = CheckMpiThreadLevel(thread_level);
    if (!st.ok()) {
      if (rank == 0) std::cerr << "moemesh_node: " << st << std::endl;
      return 2;
    }
  }
  MpiPollOptions poll;
  poll.spin_us = absl::GetFlag(FLAGS_mpi_spin_us);
  poll.max_nap_us = std::max(absl::GetFlag(FLAGS_mpi_max_nap_us), poll.min_nap_us);
  ClusterConfig cluster;
  std::string model_dir = absl::GetFlag(FLAGS_model);
  if (!absl::GetFlag(FLAGS_config).empty()) {
    auto c = LoadClusterConfig(absl::GetFlag(FLAGS_config));
    if (!c.ok()) return Fail(rank, c.status());
    cluster = *c;
    if (!cluster.model().empty()) model_dir = cluster.model();
  }
  const int n_experts = size - first_expert;
  while (cluster.experts_size() < n_experts) cluster.add_experts();
  LoadOptions lo;
  if (absl::GetFlag(FLAGS_compute_dtype) == "bf16") lo.compute = ComputeType::kBF16;
  absl::Status load_flags = LoadOptionsFromFlags(&lo);
  if (!load_flags.ok()) return Fail(rank, load_flags);
  absl::Status peer = CheckPeerTimeoutFlag();
  if (!peer.ok()) return Fail(rank, peer);
  auto cfg = LoadModelConfig(model_dir, lo);
  if (!cfg.ok()) return Fail(rank, cfg.status());
  const int attention_threads = absl::GetFlag(FLAGS_attention_threads);
  ops::SetNumThreads(is_attention && attention_threads > 0 ? attention_threads
                                                            : absl::GetFlag(FLAGS_threads));
  const std::string listen = absl::StrCat(absl::GetFlag(FLAGS_listen_host), ":0");

  // Phase 1: encoder and expert workers start and publish their addresses.
  std::unique_ptr<CheckpointReader> ckpt;
  std::unique_ptr<Embedder> embedder;
  std::unique_ptr<ExpertShard> shard;
  std::unique_ptr<grpc::Service> service;
  std::unique_ptr<grpc::Server> server;
  std::string mine;
  if (rank == 1 || is_expert) {
    auto arch = ArchFor(*cfg);
    if (!arch.ok()) return Fail(rank, arch.status());
    std::set<ExpertId> shards;
    if (is_expert) {
      auto s = ShardsOf(cluster, *cfg, rank - first_expert);
      if (!s.ok()) return Fail(rank, s.status());
      shards = *s;
    }
    auto c = OpenCheckpoint(model_dir, *cfg, *arch, lo, [&](std::string_view name) {
      if (rank == 1) return name == "model.embed_tokens.weight";
      return absl::StrContains(std::string(name), ".experts.");
    });
    if (!c.ok()) return Fail(rank, c.status());
    ckpt = std::move(*c);
    if (rank == 1) {
      auto e = Embedder::Load(*ckpt, *cfg);
      if (!e.ok()) return Fail(rank, e.status());
      embedder = std::move(*e);
      service = std::make_unique<EncoderService>(embedder.get());
    } else {
      auto s = ExpertShard::Load(*ckpt, *cfg, *arch, shards, lo);
      if (!s.ok()) return Fail(rank, s.status());
      shard = std::move(*s);
      service = std::make_unique<ExpertService>(shard.get(), cfg->hidden_size, "cpu");
    }
    std::string bound;
    auto srv = StartServer(listen, {service.get()}, &bound);
    if (!srv.ok()) return Fail(rank, srv.status());
    server = std::move(*srv);
    mine = Advertised(bound);
    Say(rank, absl::StrCat(rank == 1 ? "encoder" : "expert worker", " on ", mine,
                           is_expert ? absl::StrCat(" holding ", ShardSummary(shards), " (",
                                                    ComputeTypeName(lo.expert_compute()), " products)")
                                     : ""));
  }
  std::vector<std::string> addrs = AllGather(mine, size);

  // Phase 2: the attention workers connect to them and publish their addresses.
  std::unique_ptr<MpiExpertClient> mpi_client;  // outlives `setup`, whose transports use it
  std::unique_ptr<AttentionSetup> setup;
  mine.clear();
  if (is_attention) {
    AttentionSetupOptions o;
    o.model_dir = model_dir;
    o.encoder_address = addrs[1];
    if (use_mpi) mpi_client = std::make_unique<MpiExpertClient>(MPI_COMM_WORLD, poll);
    for (int r = first_expert; r < size; ++r) {
      o.expert_addresses.push_back(addrs[r]);
      if (use_mpi) {
        o.expert_transports.push_back(
            mpi_client->TransportTo(r, absl::StrCat("rank ", r, " (", addrs[r], ")")));
      }
    }
    o.load = lo;
    o.kv_capacity_tokens = absl::GetFlag(FLAGS_kv_capacity_tokens);
    AttentionFlagsInto(&o);
    o.overlap_halves = absl::GetFlag(FLAGS_overlap_halves);
    if (cluster.wire_dtype() == "bf16") o.wire_dtype = wire::DTYPE_BF16;
    auto s = BuildAttentionWorker(std::move(o));
    if (!s.ok()) return Fail(rank, s.status());
    setup = std::move(*s);
    service = std::make_unique<AttentionService>(setup->worker.get(), "",
                                                 std::vector<std::string>{}, setup->dispatcher);
    std::string bound;
    auto srv = StartServer(listen, {service.get()}, &bound);
    if (!srv.ok()) return Fail(rank, srv.status());
    server = std::move(*srv);
    mine = Advertised(bound);
    Say(rank, absl::StrCat("attention worker on ", mine, ", experts over ", transport));
  }
  {
    const std::vector<std::string> attention = AllGather(mine, size);
    for (int r = 2; r < first_expert; ++r) addrs[r] = attention[r];
  }

  // The last collective call is behind us: from here one thread per rank owns MPI (the attention
  // rank's progress thread, each expert rank's serving loop) until shutdown.
  std::atomic<bool> stop_serving{false};
  std::thread mpi_server;
  MpiServeStats serve_stats;
  if (use_mpi && is_attention) mpi_client->Start();
  if (use_mpi && is_expert) {
    auto* expert_service = static_cast<ExpertService*>(service.get());
    mpi_server = std::thread([&, expert_service] {
      std::vector<int> clients;
      for (int r = 2; r < first_expert; ++r) clients.push_back(r);
      serve_stats = ServeExpertsOverMpi(
          MPI_COMM_WORLD, clients,
          [expert_service](const wire::RunExpertsRequest& req, wire::RunExpertsResponse* resp) {
            return expert_service->Run(req, resp);
          },
          stop_serving, poll);
    });
  }

  // Phase 3: the router serves the public API.
  std::unique_ptr<Tokenizer> tok;
  std::vector<std::unique_ptr<GrpcAttentionClient>> clients;
  std::unique_ptr<Router> router;
  std::unique_ptr<HttpServer> http;  // rank 0 with --http_address
  if (rank == 0) {
    auto t = Tokenizer::FromFile(model_dir + "/tokenizer.json");
    if (!t.ok()) return Fail(rank, t.status());
    tok = std::move(*t);
    auto gen = GenerationDefaults::FromFile(model_dir + "/generation_config.json");
    if (!gen.ok()) return Fail(rank, gen.status());
    std::vector<AttentionClient*> lanes;
    auto c = ConnectAttentionWorkers(
        std::vector<std::string>(addrs.begin() + 2, addrs.begin() + first_expert), 60, 120, &lanes);
    if (!c.ok()) return Fail(rank, c.status());
    clients = std::move(*c);
    auto r = Router::Create(tok.get(), *cfg, *gen, lanes, RouterOptionsFromFlags());
    if (!r.ok()) return Fail(rank, r.status());
    router = std::move(*r);
    const std::string address =
        absl::StrCat(absl::GetFlag(FLAGS_listen_host), ":", absl::GetFlag(FLAGS_port));
    moemesh::v1::ModelInfo info = BasicModelInfo(*cfg);
    AddWorker(&info, "router", address, "cpu");
    AddWorker(&info, "encoder", addrs[1], "cpu");
    for (int a = 2; a < first_expert; ++a) AddWorker(&info, "attention", addrs[a], "cpu");
    for (int r = first_expert; r < size; ++r) {
      auto s = ShardsOf(cluster, *cfg, r - first_expert);
      AddWorker(&info, "expert", addrs[r], "cpu", s.ok() ? ShardSummary(*s) : "");
    }
    service = std::make_unique<GenerationService>(router.get(), tok.get(), info);
    std::string bound;
    auto srv = StartServer(address, {service.get()}, &bound);
    if (!srv.ok()) return Fail(rank, srv.status());
    server = std::move(*srv);
    auto h = StartHttpFromFlags(router.get(), model_dir, "moemesh_node rank 0");
    if (!h.ok()) return Fail(rank, h.status());
    http = std::move(*h);
    std::cout << "MoE Mesh cluster ready (mpirun, " << size << " ranks): router on " << bound
              << std::endl;
  }
  if (router != nullptr) {
    WaitForSignalThenDrain(router.get(), server.get(), "moemesh_node rank 0");
  } else {
    WaitForSignal();
  }
  // Stop the MPI data plane first: a Step waiting on experts then fails at once instead of
  // holding up the gRPC shutdown.
  if (mpi_client != nullptr) {
    mpi_client->Stop();
    MpiExpertClient::Stats s = mpi_client->stats();
    Say(rank, absl::StrCat("MPI transport: ", s.calls, " RunExperts calls, ", s.bytes_sent,
                           " bytes sent, ", s.bytes_received, " bytes received"));
  }
  if (mpi_server.joinable()) {
    stop_serving = true;
    mpi_server.join();
    Say(rank, absl::StrCat("served ", serve_stats.calls, " RunExperts calls over MPI (",
                           serve_stats.bytes_received, " bytes in, ", serve_stats.bytes_sent,
                           " out)"));
  }
  http.reset();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  server.reset();
  router.reset();
  return 0;
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "mpirun -np N moemesh_node [--config=FILE | --model=DIR] [--port=P] "
      "[--expert_transport=mpi|grpc]");
  absl::ParseCommandLine(argc, argv);
  // SERIALIZED: after start-up one thread per rank makes the MPI calls (mesh/mpi_transport.h).
  int provided = MPI_THREAD_SINGLE;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int rc = moemesh::Main(rank, size, provided);
  MPI_Finalize();
  return rc;
}
