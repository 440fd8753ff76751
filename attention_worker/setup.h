// Assembles an attention worker: its checkpoint tensors, the encoder (local or remote) and the
// experts (local, or remote expert workers found by address). Used by the attention_worker
// binary, by the in-process `moemesh serve` and by `moemesh_node` under mpirun.
#ifndef MOEMESH_ATTENTION_WORKER_SETUP_H_
#define MOEMESH_ATTENTION_WORKER_SETUP_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "attention_worker/attention_worker.h"
#include "engine/arch.h"
#include "engine/config.h"
#include "engine/json_constraint.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "mesh/encoder_backend.h"
#include "mesh/expert_dispatch.h"

namespace moemesh {

struct AttentionSetupOptions {
  std::string model_dir;
  // The model's tokenizer when the caller has loaded it (`moemesh serve`'s router); null: read
  // model_dir/tokenizer.json (if any) for JSON mode's token table.
  const Tokenizer* tokenizer = nullptr;
  std::string encoder_address;                // "" = embed in this process
  std::vector<std::string> expert_addresses;  // empty = every expert in this process
  // Optional: one pre-built transport per expert address (e.g. MPI under mpirun), used for
  // RunExperts instead of a gRPC channel to it; the address still serves health and GetStats
  // (the worker's shards).
  std::vector<std::unique_ptr<ExpertTransport>> expert_transports;
  wire::DType wire_dtype = wire::DTYPE_F32;
  // How and where weights are loaded: compute type, device of the attention stack (and of
  // in-process experts), --load_format, --num_layers (every process of a cluster must be given
  // the same), --cuda_graphs.
  LoadOptions load;
  int64_t kv_capacity_tokens = 1 << 16;
  int64_t prefix_cache_tokens = 0;  // AttentionWorker::Options::prefix_cache_tokens
  int speculative_tokens = 0;       // AttentionWorker::Options::speculative_tokens
  int speculative_max_batch = 8;
  double idle_sequence_seconds = 600;  // AttentionWorker::Options::idle_sequence_seconds
  double expert_timeout_seconds = 30;
  double connect_timeout_seconds = 60;
  bool overlap_halves = true;  // AttentionWorker::Options::overlap_halves
};

struct AttentionSetup {
  ModelConfig cfg;
  ArchSpec arch;
  std::unique_ptr<CheckpointReader> ckpt;
  std::unique_ptr<AttentionStack> stack;
  std::unique_ptr<Embedder> embedder;
  std::unique_ptr<EncoderBackend> encoder;
  std::unique_ptr<ExpertShard> local_experts;
  std::unique_ptr<ExpertBackend> experts;
  const ExpertDispatcher* dispatcher = nullptr;  // = experts when they are remote, else null
  std::vector<std::pair<std::string, std::string>> expert_placement;  // (name, shard summary)
  std::unique_ptr<TokenTable> json_tokens;  // null without tokenizer.json (JSON mode refused)
  std::unique_ptr<AttentionWorker> worker;
};

absl::StatusOr<std::unique_ptr<AttentionSetup>> BuildAttentionWorker(AttentionSetupOptions opt);

}  // namespace moemesh

#endif  // MOEMESH_ATTENTION_WORKER_SETUP_H_
