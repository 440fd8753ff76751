// The model, split along the service boundaries of MoE Mesh:
//   Embedder        (encoder worker)   token ids -> first hidden states
//   AttentionStack  (attention worker) norms, attention + KV cache, routing, shared expert, LM head
//   ExpertShard     (expert worker)    the SwiGLU experts of the (layer, expert) pairs it holds
// AttentionStack reaches experts through ExpertBackend, so the same forward pass runs with the
// experts in-process (LocalExperts), behind gRPC or behind MPI.
#ifndef MOEMESH_ENGINE_MODEL_H_
#define MOEMESH_ENGINE_MODEL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/arch.h"
#include "engine/config.h"
#include "engine/kv_cache.h"
#include "engine/ops/linear.h"
#include "engine/safetensors.h"
#include "engine/weights.h"

namespace moemesh {

struct LoadOptions {
  ComputeType compute = ComputeType::kF32;
  // kAuto: the checkpoint's safetensors. kDummy: random weights made at load time from
  // config.json alone (CheckpointReader::OpenDummy, config's dtype, seed 0), for benchmarks;
  // the directory needs only config.json.
  enum class LoadFormat { kAuto, kDummy } load_format = LoadFormat::kAuto;
  // 0 = config.json's num_hidden_layers; otherwise use only the first num_layers layers
  // (1..num_hidden_layers, else InvalidArgument), e.g. to fit a big model's dummy weights in
  // memory for a benchmark.
  int64_t num_layers = 0;
};

// "auto" -> kAuto, "dummy" -> kDummy; InvalidArgument otherwise.
absl::StatusOr<LoadOptions::LoadFormat> ParseLoadFormat(std::string_view s);

// Applies opt.num_layers to `cfg` (InvalidArgument outside 0..cfg->num_hidden_layers).
absl::Status ApplyNumLayers(const LoadOptions& opt, ModelConfig* cfg);

// dir/config.json with opt.num_layers applied.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir, const LoadOptions& opt);

// The checkpoint of `dir` (kAuto: CheckpointReader::Open) or dummy weights of `cfg` (kDummy:
// CheckpointReader::OpenDummy with cfg.dtype, seed 0: every process of a cluster makes the same
// values), restricted by `want`.
absl::StatusOr<std::unique_ptr<CheckpointReader>> OpenCheckpoint(
    const std::string& dir, const ModelConfig& cfg, const ArchSpec& arch, const LoadOptions& opt,
    std::function<bool(std::string_view name)> want = nullptr);

// Token embedding table. Thread-safe after Load.
class Embedder {
 public:
  static absl::StatusOr<std::unique_ptr<Embedder>> Load(const CheckpointReader& ckpt,
                                                        const ModelConfig& cfg);
  // out: [n, hidden] fp32. InvalidArgument for an id outside the vocabulary.
  absl::Status Embed(const int32_t* ids, int64_t n, float* out) const;
  int64_t hidden() const { return hidden_; }

 private:
  const TensorInfo* table_ = nullptr;  // [vocab, hidden], in the checkpoint's dtype (mmap'ed)
  int64_t vocab_ = 0, hidden_ = 0;
};

// A (layer, expert) pair.
using ExpertId = std::pair<int32_t, int32_t>;

// The routed expert computation of one MoE layer for a set of rows:
//   out[r, :] += sum_j weights[r, j] * Expert_{ids[r, j]}(x[r, :])     (ids < 0 are skipped)
// Implementations: LocalExperts (in-process), gRPC and MPI clients. Thread-compatible.
class ExpertBackend {
 public:
  virtual ~ExpertBackend() = default;
  // x: [n, hidden]; ids, weights: [n, k]; out: [n, hidden], accumulated into.
  virtual absl::Status RunExperts(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                                  const float* weights, int64_t k, float* out) = 0;
};

// The experts an expert worker holds. RunExperts is const and thread-safe.
class ExpertShard {
 public:
  // Loads `shards` (empty = every routed expert of every MoE layer).
  static absl::StatusOr<std::unique_ptr<ExpertShard>> Load(const CheckpointReader& ckpt,
                                                           const ModelConfig& cfg,
                                                           const ArchSpec& arch,
                                                           const std::set<ExpertId>& shards,
                                                           const LoadOptions& opt);
  // As ExpertBackend::RunExperts; FailedPrecondition if a row routes to an expert not held here.
  absl::Status RunExperts(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                          const float* weights, int64_t k, float* out) const;
  bool Holds(int32_t layer, int32_t expert) const;
  const std::set<ExpertId>& shards() const { return shards_; }

 private:
  struct Expert {
    ops::Linear gate_up;  // [2 * width, hidden]: rows [0, width) gate, [width, 2 width) up
    ops::Linear down;     // [hidden, width]
  };
  int64_t hidden_ = 0, width_ = 0, num_experts_ = 0;
  std::vector<std::vector<std::unique_ptr<Expert>>> experts_;  // [layer][expert], null = not held
  std::set<ExpertId> shards_;
};

// In-process expert backend over one ExpertShard.
class LocalExperts : public ExpertBackend {
 public:
  explicit LocalExperts(const ExpertShard* shard) : shard_(shard) {}
  absl::Status RunExperts(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                          const float* weights, int64_t k, float* out) override {
    return shard_->RunExperts(layer, x, n, ids, weights, k, out);
  }

 private:
  const ExpertShard* shard_;
};

// One sequence's share of a forward step.
struct SeqStep {
  uint64_t seq_id = 0;
  std::vector<int32_t> tokens;     // new tokens, at positions start_pos ...
  int64_t start_pos = 0;           // tokens already in the KV cache for this sequence
  int32_t experts_per_token = 0;   // 0 = the model's num_experts_per_tok
  bool all_logits = false;         // logits for every new token; otherwise only the last
};

// Everything of a decoder-only MoE model except the embedding table and the routed experts.
class AttentionStack {
 public:
  static absl::StatusOr<std::unique_ptr<AttentionStack>> Load(const CheckpointReader& ckpt,
                                                              const ModelConfig& cfg,
                                                              const ArchSpec& arch,
                                                              const LoadOptions& opt);
  // One forward step over a batch. `hidden`: [sum tokens, hidden], the embeddings of every
  // batch entry's tokens in order; overwritten. The KV cache must hold room for each sequence
  // (Reserve start_pos + tokens). `logits` gets one row of vocab_size per requested position, in
  // batch order (all tokens of an all_logits entry, else its last token).
  absl::Status Forward(const std::vector<SeqStep>& batch, float* hidden, KvCache* cache,
                       ExpertBackend* experts, std::vector<float>* logits) const;

  const ModelConfig& config() const { return cfg_; }
  int64_t kv_dim() const { return cfg_.num_key_value_heads * cfg_.head_dim; }

 private:
  struct Layer {
    std::vector<float> input_norm, post_norm, q_norm, k_norm;
    ops::Linear qkv;    // [q_dim + 2 kv_dim, hidden]
    ops::Linear o;      // [hidden, q_dim]
    bool moe = true;
    ops::Linear router; // [experts, hidden] (fp32)
    // Dense MLP (non-MoE layers) or the shared expert (qwen2_moe).
    bool has_mlp = false;
    ops::Linear mlp_gate_up, mlp_down;
    bool has_shared_gate = false;
    ops::Linear shared_gate;  // [1, hidden]
  };
  ModelConfig cfg_;
  ArchSpec arch_;
  std::vector<Layer> layers_;
  std::vector<float> final_norm_;
  ops::Linear lm_head_;
};

// A whole model in one process: the in-process mode and the CLI.
class Model {
 public:
  // Reads dir/config.json (with opt.num_layers applied) and the weights opt.load_format says.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     const LoadOptions& opt);
  // Embeds, reserves KV cache room and runs one forward step (see AttentionStack::Forward).
  absl::Status Step(const std::vector<SeqStep>& batch, KvCache* cache,
                    std::vector<float>* logits) const;
  std::unique_ptr<KvCache> NewCache(int64_t capacity_tokens) const;

  const ModelConfig& config() const { return cfg_; }
  const ArchSpec& arch() const { return arch_; }

 private:
  ModelConfig cfg_;
  ArchSpec arch_;
  std::unique_ptr<CheckpointReader> ckpt_;
  std::unique_ptr<Embedder> embedder_;
  std::unique_ptr<AttentionStack> attention_;
  std::unique_ptr<ExpertShard> experts_;
  std::unique_ptr<LocalExperts> backend_;
};

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_MODEL_H_
