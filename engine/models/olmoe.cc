// OLMoE: RMSNorm over the whole q and k projections (before splitting into heads), routing
// weights not renormalised by default.
#include "engine/models/families.h"

namespace moemesh {

ArchSpec OlmoeArch(const ModelConfig& cfg) {
  ArchSpec a = StandardMoeNames();
  a.family = "olmoe";
  a.qk_norm = QkNorm::kFull;
  a.qkv_bias = cfg.attention_bias;
  a.o_bias = cfg.attention_bias;
  a.norm_topk_prob = cfg.norm_topk_prob;
  return a;
}

}  // namespace moemesh
