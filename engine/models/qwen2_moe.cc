// Qwen2-MoE: q/k/v biases, a dense shared expert gated by sigmoid(shared_expert_gate(x)),
// routing weights not renormalised by default.
#include "engine/models/families.h"

namespace moemesh {

ArchSpec Qwen2MoeArch(const ModelConfig& cfg) {
  ArchSpec a = StandardMoeNames();
  a.family = "qwen2_moe";
  a.qkv_bias = cfg.attention_bias;
  a.shared_expert = cfg.shared_expert_intermediate_size > 0;
  a.norm_topk_prob = cfg.norm_topk_prob;
  return a;
}

}  // namespace moemesh
