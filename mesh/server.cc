#include "mesh/server.h"

#include <csignal>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace moemesh {
namespace {

constexpr int kMinPingMs = 100;

volatile std::sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }

}  // namespace

absl::StatusOr<std::unique_ptr<grpc::Server>> StartServer(const std::string& address,
                                                          const std::vector<grpc::Service*>& services,
                                                          std::string* bound_address) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(-1);
  builder.SetMaxSendMessageSize(-1);
  // Clients' keepalive pings during long calls (InternalChannel's --peer_timeout): accepted as
  // often as every kMinPingMs (gRPC's default refuses more than one per 5 minutes without data,
  // and closes the connection after two such).
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, kMinPingMs);
  for (grpc::Service* s : services) builder.RegisterService(s);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address,
                                               " (in use, or not a host:port address)"));
  }
  if (bound_address != nullptr) {
    *bound_address = absl::StrCat(address.substr(0, address.rfind(':')), ":", port);
  }
  return server;
}

void WaitForSignal() {
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
}

void ServeUntilSignal(grpc::Server* server) {
  WaitForSignal();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
}

}  // namespace moemesh
