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

// One tensor of a Hugging Face checkpoint. In LayerTensors, an empty name (and shape) stands for
// a tensor that the architecture or the layer lacks.
struct WeightSpec {
  std::string name;
  std::vector<int64_t> shape;  // PyTorch layout: nn.Linear weights are [out, in]
};

// A SwiGLU MLP's matrices: gate and up [width, hidden], down [hidden, width].
struct MlpTensors {
  WeightSpec gate, up, down;
};

// The tensors of one decoder layer outside its routed experts, named and shaped as a Hugging Face
// checkpoint holds them: the one place these names are spelled out (CheckpointWeights and the CPU
// and CUDA loaders read them here). Absent tensors have empty names.
struct LayerTensors {
  WeightSpec input_norm, post_norm;   // input_layernorm, post_attention_layernorm: [hidden]
  WeightSpec q, k, v, o;              // q [q_dim, hidden], k/v [kv_dim, hidden], o [hidden, q_dim]
  WeightSpec q_bias, k_bias, v_bias;  // arch.qkv_bias: [q_dim], [kv_dim], [kv_dim]
  WeightSpec o_bias;                  // arch.o_bias: [hidden]
  // arch.qk_norm: [head_dim] each (kPerHead); [q_dim] and [kv_dim] (kFull).
  WeightSpec q_norm, k_norm;
  WeightSpec router;  // MoE layers: [num_experts, hidden]
  // The MLP beside the routed experts: mlp.{gate,up,down}_proj on dense layers (width
  // intermediate_size), the shared expert on MoE layers when arch.shared_expert (width
  // shared_expert_intermediate_size); empty otherwise.
  MlpTensors mlp;
  WeightSpec shared_expert_gate;  // MoE layers when arch.shared_expert: [1, hidden]

  // The tensors above that the layer has (non-empty names), in declaration order.
  std::vector<WeightSpec> All() const;
};

// The tensors of layer `layer` (0 <= layer < cfg.num_hidden_layers), dense or MoE as
// cfg.IsMoeLayer(layer) says.
LayerTensors LayerTensorsOf(const ModelConfig& cfg, const ArchSpec& arch, int64_t layer);

// "model.layers.3.mlp.experts.5.": the prefix of every name of routed expert 5 of layer 3.
std::string ExpertPrefix(const ArchSpec& arch, int64_t layer, int64_t expert);

// The matrices of routed expert `expert` of MoE layer `layer` (width moe_intermediate_size).
MlpTensors ExpertTensorsOf(const ModelConfig& cfg, const ArchSpec& arch, int64_t layer,
                           int64_t expert);

// Every tensor a Hugging Face checkpoint of this family and config holds, sorted by name:
// model.embed_tokens; per layer its LayerTensorsOf and, for MoE layers, every routed expert's
// ExpertTensorsOf; then model.norm and lm_head (absent when cfg.tie_word_embeddings). Only the
// first cfg.num_hidden_layers layers. The dummy checkpoint (CheckpointReader::OpenDummy) is
// built from this table.
std::vector<WeightSpec> CheckpointWeights(const ModelConfig& cfg, const ArchSpec& arch);

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_ARCH_H_
