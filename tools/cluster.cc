// moemesh cluster: one machine, one process per role, on loopback.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "mesh/grpc_clients.h"
#include "attention_worker/worker_flags.h"
#include "mesh/load_flags.h"
#include "router/router_flags.h"
#include "tools/commands.h"

ABSL_FLAG(int32_t, expert_workers, 2, "cluster: number of expert-worker processes (experts split evenly).");
ABSL_FLAG(int32_t, attention_workers, 1,
          "cluster: number of attention-worker processes (data parallel: the router admits each "
          "request to the one with the most free KV cache).");
ABSL_FLAG(std::string, bin_dir, "", "cluster: directory holding router/, encoder_worker/, attention_worker/, expert_worker/ binaries (default: the bazel-bin this tool runs from).");
ABSL_FLAG(std::string, wire_dtype, "f32", "cluster: hidden states to expert workers as f32 (exact) or bf16.");
ABSL_FLAG(std::string, log_dir, "", "cluster: where each process's log goes (default: a new directory under /tmp).");
ABSL_FLAG(bool, restart_workers, true,
          "cluster: when a process exits after start-up, start it again (same command and address, "
          "its log appended), so the router's requests wait for it and continue "
          "(--outage_wait_seconds); after 5 restarts within a minute, its next exit stops the "
          "cluster. false: any exit stops the cluster.");

namespace moemesh {
namespace {

volatile sig_atomic_t g_signal = 0;
void OnSignal(int s) { g_signal = s; }

struct Child {
  std::string name;
  pid_t pid = -1;
  std::string address;
  std::vector<std::string> argv;
  std::string log;
  int status = 0;  // waitpid's, once it exited
  std::deque<std::chrono::steady_clock::time_point> restarts;  // within the last minute
};

// Restarts of one process within a minute; its next exit stops the cluster.
constexpr int kMaxRestartsPerMinute = 5;

std::string ExitDescription(int status) {
  if (WIFSIGNALED(status)) return absl::StrCat("killed by signal ", WTERMSIG(status));
  if (WIFEXITED(status)) return absl::StrCat("exit status ", WEXITSTATUS(status));
  return "exited";
}

std::string Dirname(const std::string& p) {
  auto i = p.rfind('/');
  return i == std::string::npos ? "." : p.substr(0, i);
}

pid_t Spawn(const std::vector<std::string>& argv, const std::string& log, bool append) {
  pid_t pid = fork();
  if (pid == 0) {
    FILE* f = std::fopen(log.c_str(), append ? "a" : "w");
    if (f != nullptr) {
      dup2(fileno(f), 1);
      dup2(fileno(f), 2);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    std::perror(("exec " + argv[0]).c_str());
    _exit(127);
  }
  return pid;
}

// Waits for `c` to exit; SIGKILL once `deadline` passes.
void Reap(Child* c, std::chrono::steady_clock::time_point deadline) {
  while (c->pid > 0) {
    int status;
    const pid_t r = waitpid(c->pid, &status, WNOHANG);
    if (r == c->pid || r < 0) {
      c->pid = -1;
    } else if (std::chrono::steady_clock::now() > deadline) {
      kill(c->pid, SIGKILL);
      waitpid(c->pid, &status, 0);
      c->pid = -1;
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
}

// SIGTERM to the router first, which drains (the requests it accepted finish on the workers,
// for up to --drain_seconds), then to the workers; SIGKILL to any still there 5 s later.
void StopAll(std::vector<Child>* children) {
  const auto drain = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(std::max(0.0, absl::GetFlag(FLAGS_drain_seconds)) + 5));
  for (Child& c : *children) {
    if (c.name != "router" || c.pid <= 0) continue;
    kill(c.pid, SIGTERM);
    Reap(&c, std::chrono::steady_clock::now() + drain);
  }
  for (Child& c : *children) {
    if (c.pid > 0) kill(c.pid, SIGTERM);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (Child& c : *children) Reap(&c, deadline);
}

}  // namespace

int RunCluster(const std::string& argv0) {
  const int n = absl::GetFlag(FLAGS_expert_workers);
  if (n < 1) {
    std::cerr << "moemesh cluster: --expert_workers must be >= 1" << std::endl;
    return 2;
  }
  const int na = absl::GetFlag(FLAGS_attention_workers);
  if (na < 1) {
    std::cerr << "moemesh cluster: --attention_workers must be >= 1" << std::endl;
    return 2;
  }
  // --load_format / --num_layers go to every process (dummy weights are the same in each).
  LoadOptions load;
  absl::Status load_flags = LoadOptionsFromFlags(&load);
  if (!load_flags.ok()) {
    std::cerr << "moemesh cluster: " << load_flags.message() << std::endl;
    return 2;
  }
  const std::vector<std::string> load_args = LoadFlagsForChild();
  absl::Status peer = CheckPeerTimeoutFlag();
  if (!peer.ok()) {
    std::cerr << "moemesh cluster: " << peer.message() << std::endl;
    return 2;
  }
  std::string bin = absl::GetFlag(FLAGS_bin_dir);
  if (bin.empty()) {
    char self[4096];
    ssize_t len = readlink("/proc/self/exe", self, sizeof(self) - 1);
    std::string exe = len > 0 ? std::string(self, len) : argv0;
    bin = Dirname(Dirname(exe));  // bazel-bin/tools/moemesh -> bazel-bin
  }
  for (const char* b : {"router/router", "encoder_worker/encoder_worker",
                        "attention_worker/attention_worker", "expert_worker/expert_worker"}) {
    if (access((bin + "/" + b).c_str(), X_OK) != 0) {
      std::cerr << "moemesh cluster: " << bin << "/" << b
                << " not found: build it (bazel build //...) or pass --bin_dir" << std::endl;
      return 1;
    }
  }
  std::string logs = absl::GetFlag(FLAGS_log_dir);
  if (logs.empty()) {
    char tmpl[] = "/tmp/moemesh-cluster-XXXXXX";
    logs = mkdtemp(tmpl);
  }
  const std::string host = absl::GetFlag(FLAGS_host);
  const int port = absl::GetFlag(FLAGS_port);
  auto addr = [&](int offset) { return absl::StrCat(host, ":", port + offset); };
  // Ports: router, encoder, attention 0, the expert workers, then attention 1, 2, ...
  auto attention_addr = [&](int i) { return addr(i == 0 ? 2 : 2 + n + i); };

  // The cluster config every process reads (experts split evenly: no shards listed).
  const std::string config = logs + "/cluster.textproto";
  {
    std::ofstream c(config);
    c << "model: \"" << absl::GetFlag(FLAGS_model) << "\"\n"
      << "router { address: \"" << addr(0) << "\" }\n"
      << "encoder { address: \"" << addr(1) << "\" }\n";
    for (int i = 0; i < na; ++i) c << "attention { address: \"" << attention_addr(i) << "\" }\n";
    for (int i = 0; i < n; ++i) c << "experts { address: \"" << addr(3 + i) << "\" }\n";
    c << "wire_dtype: \"" << absl::GetFlag(FLAGS_wire_dtype) << "\"\n";
    if (!c) {
      std::cerr << "moemesh cluster: cannot write " << config << std::endl;
      return 1;
    }
  }
  signal(SIGINT, OnSignal);
  signal(SIGTERM, OnSignal);
  const std::string threads = absl::StrCat("--threads=", absl::GetFlag(FLAGS_threads));
  std::vector<Child> children;
  auto start = [&](const std::string& name, std::vector<std::string> argv, const std::string& a,
                   const std::vector<std::string>& more = {}) {
    argv.insert(argv.end(), load_args.begin(), load_args.end());
    argv.insert(argv.end(), more.begin(), more.end());
    Child c;
    c.name = name;
    c.address = a;
    c.argv = std::move(argv);
    c.log = logs + "/" + name + ".log";
    c.pid = Spawn(c.argv, c.log, /*append=*/false);
    children.push_back(std::move(c));
  };
  start("encoder", {bin + "/encoder_worker/encoder_worker", "--config=" + config}, addr(1));
  for (int i = 0; i < n; ++i) {
    start(absl::StrCat("expert", i),
          {bin + "/expert_worker/expert_worker", "--config=" + config, absl::StrCat("--index=", i),
           threads, "--compute_dtype=" + absl::GetFlag(FLAGS_compute_dtype)},
          addr(3 + i));
  }
  for (int i = 0; i < na; ++i) {
    start(na == 1 ? std::string("attention") : absl::StrCat("attention", i),
          {bin + "/attention_worker/attention_worker", "--config=" + config,
           absl::StrCat("--index=", i), threads,
           "--compute_dtype=" + absl::GetFlag(FLAGS_compute_dtype), PeerTimeoutFlagForChild()},
          attention_addr(i), AttentionFlagsForChild());
  }
  // The router also serves the HTTP API with --http_address (it listens before it is healthy).
  const std::string http = absl::GetFlag(FLAGS_http_address);
  std::vector<std::string> router_argv = {bin + "/router/router", "--config=" + config,
                                          PeerTimeoutFlagForChild()};
  for (std::string& f : RouterFlagsForChild()) router_argv.push_back(std::move(f));
  start("router", router_argv, addr(0));

  // Healthy, in start order; give up if a process dies or the deadline passes.
  auto died = [&]() -> Child* {
    for (auto& c : children) {
      if (c.pid > 0 && waitpid(c.pid, &c.status, WNOHANG) == c.pid) {
        c.pid = -1;
        return &c;
      }
    }
    return nullptr;
  };
  for (const Child& c : children) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(180);
    while (true) {
      if (g_signal) {
        StopAll(&children);
        return 130;
      }
      if (const Child* d = died()) {
        std::cerr << "moemesh cluster: " << d->name << " exited during start-up; see " << logs
                  << "/" << d->name << ".log" << std::endl;
        StopAll(&children);
        return 1;
      }
      if (WaitHealthy(c.address, 0.5).ok()) break;
      if (std::chrono::steady_clock::now() > deadline) {
        std::cerr << "moemesh cluster: " << c.name << " not healthy after 180 s; see " << logs
                  << "/" << c.name << ".log" << std::endl;
        StopAll(&children);
        return 1;
      }
    }
  }
  std::string attention_list;
  for (int i = 0; i < na; ++i) absl::StrAppend(&attention_list, i ? ", " : "", attention_addr(i));
  std::cout << "MoE Mesh cluster ready: router on " << addr(0) << " (encoder " << addr(1)
            << ", attention " << attention_list << ", " << n << " expert workers from "
            << addr(3) << "); logs and config in " << logs << std::endl;
  std::cout << "Query it:  /usr/bin/python3 scripts/client.py --addr=" << addr(0)
            << " \"your prompt\"   Stop it: Ctrl-C" << std::endl;
  if (!http.empty()) {
    std::cout << "HTTP API (OpenAI-compatible): http://" << http
              << "/v1/completions, /v1/chat/completions" << std::endl;
  }
  const bool restart = absl::GetFlag(FLAGS_restart_workers);
  while (!g_signal) {
    if (Child* d = died()) {
      const auto now = std::chrono::steady_clock::now();
      while (!d->restarts.empty() && now - d->restarts.front() > std::chrono::minutes(1)) {
        d->restarts.pop_front();
      }
      if (!restart || d->restarts.size() >= kMaxRestartsPerMinute) {
        std::cerr << "moemesh cluster: " << d->name << " exited (" << ExitDescription(d->status)
                  << (restart ? absl::StrCat(", its ", kMaxRestartsPerMinute + 1,
                                             "th exit within a minute")
                              : std::string())
                  << "); stopping the cluster (see " << d->log << ")" << std::endl;
        StopAll(&children);
        return 1;
      }
      d->restarts.push_back(now);
      std::cerr << "moemesh cluster: " << d->name << " exited (" << ExitDescription(d->status)
                << "); starting it again on " << d->address << " (see " << d->log << ")"
                << std::endl;
      d->pid = Spawn(d->argv, d->log, /*append=*/true);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::cout << "moemesh cluster: stopping" << std::endl;
  StopAll(&children);
  return 0;
}

}  // namespace moemesh
