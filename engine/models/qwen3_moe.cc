// Qwen3-MoE: per-head q/k RMSNorm, no biases, top-k softmax routing (renormalised when
// norm_topk_prob, true for the published checkpoints).
#include "engine/models/families.h"

namespace moemesh {

ArchSpec Qwen3MoeArch(const ModelConfig& cfg) {
  ArchSpec a = StandardMoeNames();
  a.family = "qwen3_moe";
  a.qk_norm = QkNorm::kPerHead;
  a.qkv_bias = cfg.attention_bias;
  a.o_bias = cfg.attention_bias;
  a.norm_topk_prob = cfg.norm_topk_prob;
  return a;
}

}  // namespace moemesh
