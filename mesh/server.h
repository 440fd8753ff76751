// Starting a gRPC server the way every MoE Mesh service does: health checking and reflection on,
// large messages allowed, listening on one address.
#ifndef MOEMESH_MESH_SERVER_H_
#define MOEMESH_MESH_SERVER_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"

namespace moemesh {

// Builds and starts a server on `address` ("host:port"; port 0 picks a free one, reported in
// `bound_address`). InvalidArgument/Unavailable with the address when it cannot listen, among
// others when another process listens there: no two servers share a port (gRPC's default,
// SO_REUSEPORT, would split the calls between them).
absl::StatusOr<std::unique_ptr<grpc::Server>> StartServer(const std::string& address,
                                                          const std::vector<grpc::Service*>& services,
                                                          std::string* bound_address = nullptr);

// Unavailable when another process listens on `address` ("host:port") now, as a server would
// find it (port 0, "unix:" and addresses that do not resolve: OK). For a process that must not
// act before it knows it can serve there (a router, whose start frees what an earlier run under
// its name left).
absl::Status CheckCanListen(const std::string& address);

// Blocks until SIGINT or SIGTERM.
void WaitForSignal();

// WaitForSignal, then shuts `server` down (in-flight calls get 2 s to finish).
void ServeUntilSignal(grpc::Server* server);

}  // namespace moemesh

#endif  // MOEMESH_MESH_SERVER_H_
