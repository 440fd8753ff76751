#include "engine/arch.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "engine/models/families.h"

namespace moemesh {

ArchSpec StandardMoeNames() {
  ArchSpec a;
  a.moe_prefix = "model.layers.{L}.mlp";
  a.router = "gate";
  a.expert = "experts.{E}";
  a.expert_gate = "gate_proj";
  a.expert_up = "up_proj";
  a.expert_down = "down_proj";
  return a;
}

absl::StatusOr<ArchSpec> ArchFor(const ModelConfig& cfg) {
  if (cfg.model_type == "qwen3_moe") return Qwen3MoeArch(cfg);
  if (cfg.model_type == "qwen2_moe") return Qwen2MoeArch(cfg);
  if (cfg.model_type == "mixtral") return MixtralArch(cfg);
  if (cfg.model_type == "olmoe") return OlmoeArch(cfg);
  return absl::InvalidArgumentError(absl::StrCat(
      "unsupported model_type '", cfg.model_type,
      "' (supported: qwen3_moe, qwen2_moe, mixtral, olmoe)"));
}

std::string WeightName(const std::string& pattern, int64_t layer, int64_t expert) {
  return absl::StrReplaceAll(pattern, {{"{L}", absl::StrCat(layer)}, {"{E}", absl::StrCat(expert)}});
}

}  // namespace moemesh
