// Mixtral: block_sparse_moe.experts.{E}.w1 (gate) / w3 (up) / w2 (down); top-k of the softmax,
// always renormalised.
#include "engine/models/families.h"

namespace moemesh {

ArchSpec MixtralArch(const ModelConfig& cfg) {
  ArchSpec a;
  a.family = "mixtral";
  a.qkv_bias = cfg.attention_bias;
  a.norm_topk_prob = true;
  a.moe_prefix = "model.layers.{L}.block_sparse_moe";
  a.router = "gate";
  a.expert = "experts.{E}";
  a.expert_gate = "w1";
  a.expert_up = "w3";
  a.expert_down = "w2";
  return a;
}

}  // namespace moemesh
