// What differs between MoE model families, as data. One file per family in engine/models/ fills
// this in from config.json; the shared blocks (engine/model.h) read only this and the config.
#ifndef MOEMESH_ENGINE_ARCH_H_
#define MOEMESH_ENGINE_ARCH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/config.h"

namespace moemesh {

enum class QkNorm {
  kNone,     // mixtral, qwen2_moe
  kPerHead,  // qwen3_moe: RMSNorm over each head's head_dim, weight [head_dim]
  kFull,     // olmoe: RMSNorm over the whole q (k) projection, weight [heads * head_dim]
};

// Weight names use "{L}" for the layer index and "{E}" for the expert index.
struct ArchSpec {
  std::string family;
  QkNorm qk_norm = QkNorm::kNone;
  bool qkv_bias = false;           // q/k/v projections carry biases
  bool o_bias = false;             // o_proj carries a bias (qwen3_moe, olmoe: attention_bias)
  bool shared_expert = false;      // qwen2_moe: dense shared expert scaled by sigmoid(shared_expert_gate)
  bool norm_topk_prob = false;     // renormalise the top-k routing weights to sum to 1
  std::string moe_prefix;          // "model.layers.{L}.mlp"
  std::string router;              // relative to moe_prefix: "gate"
  std::string expert;              // relative to moe_prefix: "experts.{E}"
  std::string expert_gate;         // relative to expert: "gate_proj" (SwiGLU gate)
  std::string expert_up;           // "up_proj"
  std::string expert_down;         // "down_proj"
};

// The ArchSpec for cfg.model_type; InvalidArgument for families the engine does not run.
absl::StatusOr<ArchSpec> ArchFor(const ModelConfig& cfg);

// "model.layers.<layer>.<suffix>": the name of a per-layer tensor outside the MoE block.
std::string LayerWeightName(int64_t layer, const std::string& suffix);

// "model.layers.{L}.mlp" -> "model.layers.3.mlp" (and {E} likewise).
std::string WeightName(const std::string& pattern, int64_t layer, int64_t expert = -1);

// One tensor of a Hugging Face checkpoint.
struct WeightSpec {
  std::string name;
  std::vector<int64_t> shape;  // PyTorch layout: nn.Linear weights are [out, in]
};

// Every tensor a Hugging Face checkpoint of this family and config holds, named and shaped as
// engine/model.cc loads them, sorted by name: model.embed_tokens; per layer the input/post
// norms, q/k/v/o projections (+ q/k/v biases when arch.qkv_bias), q_norm/k_norm (arch.qk_norm),
// and for MoE layers (cfg.IsMoeLayer) the router and every routed expert's gate/up/down (+ the
// shared expert and its gate when arch.shared_expert), for dense layers mlp.gate/up/down; then
// model.norm and lm_head (absent when cfg.tie_word_embeddings). Only the first
// cfg.num_hidden_layers layers. The dummy checkpoint (CheckpointReader::OpenDummy) is built
// from this table.
std::vector<WeightSpec> CheckpointWeights(const ModelConfig& cfg, const ArchSpec& arch);

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_ARCH_H_
