#include "attention_worker/setup.h"

#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer.h"
#include "mesh/grpc_clients.h"
#include "mesh/placement.h"

namespace moemesh {
namespace {

bool IsRoutedExpertTensor(std::string_view name) {
  return absl::StrContains(std::string(name), ".experts.");
}

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionSetup>> BuildAttentionWorker(AttentionSetupOptions opt) {
  auto s = std::make_unique<AttentionSetup>();
  const LoadOptions& lo = opt.load;
  if (opt.prefix_cache_tokens < 0) {
    return absl::InvalidArgumentError("--prefix_cache_tokens must be >= 0");
  }
  if (opt.speculative_tokens < 0 || opt.speculative_tokens > 16) {
    return absl::InvalidArgumentError("--speculative_tokens must be in [0, 16]");
  }
  if (opt.speculative_max_batch < 1) {
    return absl::InvalidArgumentError("--speculative_max_batch must be >= 1");
  }
  if (!(opt.idle_sequence_seconds >= 0)) {
    return absl::InvalidArgumentError("--idle_sequence_seconds must be >= 0");
  }
  auto cfg = LoadModelConfig(opt.model_dir, lo);
  if (!cfg.ok()) return cfg.status();
  s->cfg = *cfg;
  auto arch = ArchFor(s->cfg);
  if (!arch.ok()) return arch.status();
  s->arch = *arch;
  const bool remote_experts = !opt.expert_addresses.empty();
  auto ckpt = OpenCheckpoint(opt.model_dir, s->cfg, s->arch, lo, [&](std::string_view name) {
    return !remote_experts || !IsRoutedExpertTensor(name);
  });
  if (!ckpt.ok()) return ckpt.status();
  s->ckpt = std::move(*ckpt);
  auto described = DescribeDevice(lo.device);
  if (!described.ok()) return described.status();
  auto stack = AttentionStack::Load(*s->ckpt, s->cfg, s->arch, lo);
  if (!stack.ok()) return stack.status();
  s->stack = std::move(*stack);

  if (opt.encoder_address.empty()) {
    auto emb = Embedder::Load(*s->ckpt, s->cfg);
    if (!emb.ok()) return emb.status();
    s->embedder = std::move(*emb);
    s->encoder = std::make_unique<LocalEncoder>(s->embedder.get());
  } else {
    absl::Status st = WaitHealthy(opt.encoder_address, opt.connect_timeout_seconds);
    if (!st.ok()) return st;
    s->encoder = std::make_unique<GrpcEncoder>(opt.encoder_address);
  }

  if (!remote_experts) {
    auto ex = ExpertShard::Load(*s->ckpt, s->cfg, s->arch, {}, lo);
    if (!ex.ok()) return ex.status();
    s->local_experts = std::move(*ex);
    s->experts = std::make_unique<LocalExperts>(s->local_experts.get());
    s->expert_placement.emplace_back("local", ShardSummary(s->local_experts->shards()));
  } else {
    if (!opt.expert_transports.empty() &&
        opt.expert_transports.size() != opt.expert_addresses.size()) {
      return absl::InvalidArgumentError(absl::StrCat(opt.expert_transports.size(),
                                                     " expert transports for ",
                                                     opt.expert_addresses.size(), " addresses"));
    }
    std::vector<ExpertWorkerHandle> handles;
    for (size_t i = 0; i < opt.expert_addresses.size(); ++i) {
      const std::string& addr = opt.expert_addresses[i];
      absl::Status st = WaitHealthy(addr, opt.connect_timeout_seconds);
      if (!st.ok()) return st;
      auto t = std::make_unique<GrpcExpertTransport>(addr, opt.expert_timeout_seconds);
      auto stats = t->GetStats();
      if (!stats.ok()) return absl::Status(stats.status().code(), absl::StrCat(addr, ": ", stats.status().message()));
      auto shards = ShardsFromStats(*stats);
      if (!shards.ok()) return shards.status();
      if (opt.expert_transports.empty()) {
        handles.push_back({std::move(t), *shards});
      } else {
        handles.push_back({std::move(opt.expert_transports[i]), *shards});
      }
    }
    std::vector<std::set<ExpertId>> sets;
    for (const auto& h : handles) {
      sets.push_back(h.shards);
      s->expert_placement.emplace_back(h.transport->name(), ShardSummary(h.shards));
    }
    absl::Status cov = CheckCoverage(sets, s->cfg);
    if (!cov.ok()) return cov;
    auto dispatcher = std::make_unique<ExpertDispatcher>(std::move(handles), s->cfg.hidden_size,
                                                         opt.wire_dtype);
    s->dispatcher = dispatcher.get();
    s->experts = std::move(dispatcher);
  }
  // JSON mode needs the token bytes: from the caller's tokenizer, else from tokenizer.json when
  // the model has one.
  if (opt.tokenizer != nullptr) {
    s->json_tokens = std::make_unique<TokenTable>(opt.tokenizer->AllTokenBytes());
  } else if (std::ifstream(opt.model_dir + "/tokenizer.json").good()) {
    auto tok = Tokenizer::FromFile(opt.model_dir + "/tokenizer.json");
    if (!tok.ok()) return tok.status();
    s->json_tokens = std::make_unique<TokenTable>((*tok)->AllTokenBytes());
  }
  AttentionWorker::Options wo;
  wo.json_tokens = s->json_tokens.get();
  wo.kv_capacity_tokens = opt.kv_capacity_tokens;
  wo.prefix_cache_tokens = opt.prefix_cache_tokens;
  wo.speculative_tokens = opt.speculative_tokens;
  wo.speculative_max_batch = opt.speculative_max_batch;
  wo.idle_sequence_seconds = opt.idle_sequence_seconds;
  wo.device = lo.device.ToString();
  wo.overlap_halves = opt.overlap_halves;
  s->worker = std::make_unique<AttentionWorker>(s->stack.get(), s->encoder.get(), s->experts.get(), wo);
  return s;
}

}  // namespace moemesh
