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
#include "engine/device.h"
#include "engine/kv_cache.h"
#include "engine/ops/linear.h"
#include "engine/safetensors.h"
#include "engine/weights.h"

namespace moemesh {

struct LoadOptions {
  ComputeType compute = ComputeType::kF32;
  // Where the attention stack and the experts run. kCuda needs a binary built with
  // --config=cuda (see DeviceBackend below); the embedding table always stays on the host.
  Device device;
  // kAuto: the checkpoint's safetensors. kDummy: random weights made at load time from
  // config.json alone (CheckpointReader::OpenDummy, config's dtype, seed 0), for benchmarks;
  // the directory needs only config.json.
  enum class LoadFormat { kAuto, kDummy } load_format = LoadFormat::kAuto;
  // 0 = config.json's num_hidden_layers; otherwise use only the first num_layers layers
  // (1..num_hidden_layers, else InvalidArgument), e.g. to fit a big model's dummy weights in
  // memory for a benchmark.
  int64_t num_layers = 0;
  // CUDA attention stacks only: replay decode steps (one token per sequence, experts in process
  // on the same GPU) from CUDA graphs, one per batch shape, instead of launching each step's
  // ~13 kernels per layer from the host. Off by default until measured on a GPU.
  bool cuda_graphs = false;
  // CUDA stacks and shards: launch the decode step's kernels with programmatic dependent launch
  // (cuda::SetProgrammaticLaunch; process-wide once a load asks for it; sm_90), so each kernel's
  // blocks are scheduled, and a product's weights fetched, while the kernel before it finishes.
  // Same results. Off by default until measured on a GPU.
  bool cuda_pdl = false;
  // CUDA stacks and shards: the small-batch products' automatic choice takes the deep-load
  // kernels (cuda::SetDeepLoads; process-wide once a load asks for it; bf16 weights): several
  // steps of weight loads issued before they are used. Same results. Off until measured.
  bool cuda_deep_loads = false;
  // Element type of the KV cache the attention stack's NewCache makes (--kv_cache_dtype): fp32
  // (default, exact), bf16 (half the memory and attention reads) or int8 (a quarter plus row
  // scales); CPU only.
  KvDType kv_dtype = KvDType::kF32;
  // Quantised weights on the CPU: kNone computes with `compute`; kInt8 stores int8 with a scale
  // per output row and computes with ComputeType::kInt8 (activations quantised per group of 64
  // on the fly; half of bf16's bytes, a quarter of fp32's); kInt4 stores 4-bit values with a
  // scale per row and group of 64 (ComputeType::kInt4; 4.5 bits a weight).
  enum class WeightQuant { kNone, kInt8, kInt4 };
  // The routed experts' weights on CPU expert shards (--quantize_experts). CUDA shards refuse it.
  WeightQuant expert_quant = WeightQuant::kNone;
  // The CPU attention stack's matrices (--quantize_attention): q/k/v/o, dense and shared-expert
  // MLPs and the LM head. The MoE gates (routers) stay fp32. A CUDA attention stack refuses it.
  WeightQuant attention_quant = WeightQuant::kNone;
  // The compute types these give.
  ComputeType expert_compute() const { return QuantCompute(expert_quant); }
  ComputeType attention_compute() const { return QuantCompute(attention_quant); }
  ComputeType QuantCompute(WeightQuant q) const {
    switch (q) {
      case WeightQuant::kInt8:
        return ComputeType::kInt8;
      case WeightQuant::kInt4:
        return ComputeType::kInt4;
      default:
        return compute;
    }
  }
};

// "auto" -> kAuto, "dummy" -> kDummy; InvalidArgument otherwise.
absl::StatusOr<LoadOptions::LoadFormat> ParseLoadFormat(std::string_view s);

// "none" -> kNone, "int8" -> kInt8, "int4" -> kInt4; InvalidArgument naming `flag` otherwise.
absl::StatusOr<LoadOptions::WeightQuant> ParseWeightQuant(std::string_view s,
                                                          std::string_view flag);

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

class ExpertShard;

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
  // The in-process shard behind this backend, if any: a device's attention stack that finds
  // a shard on its own device calls that shard's device-memory entry point instead of going
  // through host memory. nullptr for remote experts.
  virtual const ExpertShard* local_shard() const { return nullptr; }
  // Why RunExperts would fail now ("" when nothing is known to stop it): remote experts with no
  // holder in service. Thread-safe.
  virtual std::string Unavailable() { return ""; }
};

// The experts an expert worker holds, on one device. RunExperts is const and thread-safe.
class ExpertShard {
 public:
  virtual ~ExpertShard() = default;
  // Loads `shards` (empty = every routed expert of every MoE layer) on opt.device: the one
  // dispatch point between the CPU and the CUDA implementation.
  static absl::StatusOr<std::unique_ptr<ExpertShard>> Load(const CheckpointReader& ckpt,
                                                           const ModelConfig& cfg,
                                                           const ArchSpec& arch,
                                                           const std::set<ExpertId>& shards,
                                                           const LoadOptions& opt);
  // As ExpertBackend::RunExperts (host memory); FailedPrecondition if a row routes to an expert
  // not held here.
  virtual absl::Status RunExperts(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                                  const float* weights, int64_t k, float* out) const = 0;
  virtual Device device() const = 0;
  bool Holds(int32_t layer, int32_t expert) const {
    return layer >= 0 && layer < static_cast<int32_t>(held_.size()) && expert >= 0 &&
           expert < static_cast<int32_t>(held_[layer].size()) && held_[layer][expert];
  }
  const std::set<ExpertId>& shards() const { return shards_; }

 protected:
  // Checks `shards` against the model and fills held_/shards_ (empty = all routed experts).
  absl::Status SetShards(const ModelConfig& cfg, const std::set<ExpertId>& shards);
  // InvalidArgument for a bad layer, FailedPrecondition for an expert not held here.
  absl::Status CheckRouting(int32_t layer, int64_t n, const int32_t* ids, int64_t k) const;

 private:
  std::vector<std::vector<bool>> held_;  // [layer][expert]
  std::set<ExpertId> shards_;
};

// The CPU implementation (Linear kernels: AVX-512 and oneDNN).
class CpuExpertShard : public ExpertShard {
 public:
  static absl::StatusOr<std::unique_ptr<CpuExpertShard>> Load(const CheckpointReader& ckpt,
                                                              const ModelConfig& cfg,
                                                              const ArchSpec& arch,
                                                              const std::set<ExpertId>& shards,
                                                              const LoadOptions& opt);
  absl::Status RunExperts(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                          const float* weights, int64_t k, float* out) const override;
  Device device() const override { return Device(); }

 private:
  struct Expert {
    ops::Linear gate_up;  // [2 * width, hidden]: rows [0, width) gate, [width, 2 width) up
    ops::Linear down;     // [hidden, width]
  };
  int64_t hidden_ = 0, width_ = 0, num_experts_ = 0;
  std::vector<std::vector<std::unique_ptr<Expert>>> experts_;  // [layer][expert], null = not held
};

// In-process expert backend over one ExpertShard.
class LocalExperts : public ExpertBackend {
 public:
  explicit LocalExperts(const ExpertShard* shard) : shard_(shard) {}
  absl::Status RunExperts(int32_t layer, const float* x, int64_t n, const int32_t* ids,
                          const float* weights, int64_t k, float* out) override {
    return shard_->RunExperts(layer, x, n, ids, weights, k, out);
  }
  const ExpertShard* local_shard() const override { return shard_; }

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
  virtual ~AttentionStack() = default;
  // Loads on opt.device (the dispatch point between the CPU and the CUDA implementation).
  static absl::StatusOr<std::unique_ptr<AttentionStack>> Load(const CheckpointReader& ckpt,
                                                              const ModelConfig& cfg,
                                                              const ArchSpec& arch,
                                                              const LoadOptions& opt);
  // One forward step over a batch. `hidden`: [sum tokens, hidden] (host memory), the embeddings
  // of every batch entry's tokens in order; the CPU stack overwrites it. `cache` must come from
  // this stack's NewCache() and hold room for each sequence (Reserve start_pos + tokens).
  // `logits` gets one row of vocab_size per requested position, in batch order (all tokens of
  // an all_logits entry, else its last token).
  virtual absl::Status Forward(const std::vector<SeqStep>& batch, float* hidden, KvCache* cache,
                               ExpertBackend* experts, std::vector<float>* logits) const = 0;
  // Forward, returning only each logits row's argmax (lowest id on ties; a row whose first
  // value is NaN gives 0, other NaNs are passed over: sampler.h's ArgMax): for steps whose
  // draws need nothing else (Sampler::ArgMaxSuffices). This default runs Forward and takes the
  // argmax on the host; the CUDA stack takes it on the GPU, so a step's 151,936-wide rows never
  // leave the device (39 MB a step at 64 sequences of Qwen3).
  virtual absl::Status ForwardArgMax(const std::vector<SeqStep>& batch, float* hidden,
                                     KvCache* cache, ExpertBackend* experts,
                                     std::vector<int32_t>* ids) const;
  // A KV cache for this stack (on its device) of `capacity_tokens` token slots.
  virtual std::unique_ptr<KvCache> NewCache(int64_t capacity_tokens) const = 0;
  virtual Device device() const = 0;

  const ModelConfig& config() const { return cfg_; }
  int64_t kv_dim() const { return cfg_.num_key_value_heads * cfg_.head_dim; }

 protected:
  // Checks a batch against the cache and the model: per-entry experts_per_token <= experts,
  // tokens present, KV cache present. Returns the total number of tokens and fills offsets
  // (first row of each entry), the largest k and the number of logits rows.
  absl::Status PlanBatch(const std::vector<SeqStep>& batch, const KvCache& cache,
                         std::vector<int64_t>* offset, int64_t* tokens, int64_t* kmax,
                         int64_t* out_rows) const;

  ModelConfig cfg_;
  ArchSpec arch_;
};

// The CPU implementation.
class CpuAttentionStack : public AttentionStack {
 public:
  static absl::StatusOr<std::unique_ptr<CpuAttentionStack>> Load(const CheckpointReader& ckpt,
                                                                 const ModelConfig& cfg,
                                                                 const ArchSpec& arch,
                                                                 const LoadOptions& opt);
  absl::Status Forward(const std::vector<SeqStep>& batch, float* hidden, KvCache* cache,
                       ExpertBackend* experts, std::vector<float>* logits) const override;
  std::unique_ptr<KvCache> NewCache(int64_t capacity_tokens) const override;
  Device device() const override { return Device(); }

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
  std::vector<Layer> layers_;
  std::vector<float> final_norm_;
  ops::Linear lm_head_;
  KvDType kv_dtype_ = KvDType::kF32;
};

// Device backends other than the CPU register themselves here when linked into a binary
// (//engine/cuda:backend, with --config=cuda). Without one, loading on that device fails with a
// message that says how to build with it.
struct DeviceBackend {
  std::function<absl::StatusOr<std::unique_ptr<AttentionStack>>(
      const CheckpointReader&, const ModelConfig&, const ArchSpec&, const LoadOptions&)>
      load_attention;
  std::function<absl::StatusOr<std::unique_ptr<ExpertShard>>(
      const CheckpointReader&, const ModelConfig&, const ArchSpec&, const std::set<ExpertId>&,
      const LoadOptions&)>
      load_experts;
  // Ok when `d` exists (e.g. cuda:1 on a machine with one GPU is NotFound); its name otherwise.
  std::function<absl::StatusOr<std::string>(const Device& d)> describe;
  // Optional: counters worth printing after a run, e.g. "CUDA graphs: 2 captured, 120 replayed".
  std::function<std::string()> report;
};
void RegisterDeviceBackend(Device::Kind kind, DeviceBackend backend);
// The registered backend, or FailedPrecondition naming the build flag that adds it.
absl::StatusOr<const DeviceBackend*> GetDeviceBackend(Device::Kind kind);
// Checks that `d` can be used in this binary on this machine; returns a description such as
// "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3)".
absl::StatusOr<std::string> DescribeDevice(const Device& d);

// A whole model in one process: the in-process mode and the CLI.
class Model {
 public:
  // Reads dir/config.json (with opt.num_layers applied) and the weights opt.load_format says.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     const LoadOptions& opt);
  // Embeds, reserves KV cache room and runs one forward step (see AttentionStack::Forward).
  absl::Status Step(const std::vector<SeqStep>& batch, KvCache* cache,
                    std::vector<float>* logits) const;
  // The same with the logits rows' argmax only (AttentionStack::ForwardArgMax).
  absl::Status StepArgMax(const std::vector<SeqStep>& batch, KvCache* cache,
                          std::vector<int32_t>* ids) const;
  std::unique_ptr<KvCache> NewCache(int64_t capacity_tokens) const;

  const ModelConfig& config() const { return cfg_; }
  const ArchSpec& arch() const { return arch_; }

 private:
  // Step (ids null) or StepArgMax (logits null).
  absl::Status Run(const std::vector<SeqStep>& batch, KvCache* cache, std::vector<float>* logits,
                   std::vector<int32_t>* ids) const;

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
