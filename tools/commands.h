// Subcommands of the moemesh tool that run services (serve, cluster).
#ifndef MOEMESH_TOOLS_COMMANDS_H_
#define MOEMESH_TOOLS_COMMANDS_H_

#include <string>

#include "absl/flags/declare.h"

ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(int32_t, threads);
ABSL_DECLARE_FLAG(std::string, compute_dtype);
ABSL_DECLARE_FLAG(std::string, device);
ABSL_DECLARE_FLAG(int32_t, port);
ABSL_DECLARE_FLAG(std::string, host);

namespace moemesh {

// moemesh serve: every role in this process, the public API on --host:--port.
int RunServe();
// moemesh cluster: router, encoder, attention and --expert_workers expert-worker processes on
// loopback; prints the address once all are healthy; stops them all on Ctrl-C or when one dies.
// `argv0` locates the service binaries (bazel-bin/<pkg>/<name> beside bazel-bin/tools/moemesh).
int RunCluster(const std::string& argv0);

}  // namespace moemesh

#endif  // MOEMESH_TOOLS_COMMANDS_H_
