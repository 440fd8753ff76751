#include "engine/arch.h"

#include <algorithm>

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

std::string LayerWeightName(int64_t layer, const std::string& suffix) {
  return absl::StrCat("model.layers.", layer, ".", suffix);
}

std::string WeightName(const std::string& pattern, int64_t layer, int64_t expert) {
  return absl::StrReplaceAll(pattern, {{"{L}", absl::StrCat(layer)}, {"{E}", absl::StrCat(expert)}});
}

std::vector<WeightSpec> CheckpointWeights(const ModelConfig& cfg, const ArchSpec& arch) {
  const int64_t h = cfg.hidden_size, hd = cfg.head_dim;
  const int64_t qd = cfg.num_attention_heads * hd, kvd = cfg.num_key_value_heads * hd;
  std::vector<WeightSpec> w;
  auto add = [&w](std::string name, std::vector<int64_t> shape) {
    w.push_back({std::move(name), std::move(shape)});
  };
  add("model.embed_tokens.weight", {cfg.vocab_size, h});
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string layer = absl::StrCat("model.layers.", l, ".");
    add(layer + "input_layernorm.weight", {h});
    add(layer + "post_attention_layernorm.weight", {h});
    // Attention: q [q_dim, hidden], k/v [kv_dim, hidden], o [hidden, q_dim].
    add(layer + "self_attn.q_proj.weight", {qd, h});
    add(layer + "self_attn.k_proj.weight", {kvd, h});
    add(layer + "self_attn.v_proj.weight", {kvd, h});
    add(layer + "self_attn.o_proj.weight", {h, qd});
    if (arch.qkv_bias) {
      add(layer + "self_attn.q_proj.bias", {qd});
      add(layer + "self_attn.k_proj.bias", {kvd});
      add(layer + "self_attn.v_proj.bias", {kvd});
    }
    if (arch.o_bias) add(layer + "self_attn.o_proj.bias", {h});
    if (arch.qk_norm != QkNorm::kNone) {
      const bool full = arch.qk_norm == QkNorm::kFull;
      add(layer + "self_attn.q_norm.weight", {full ? qd : hd});
      add(layer + "self_attn.k_norm.weight", {full ? kvd : hd});
    }
    if (cfg.IsMoeLayer(l)) {
      const std::string moe = WeightName(arch.moe_prefix, l) + ".";
      add(moe + arch.router + ".weight", {cfg.num_experts, h});
      const int64_t w_e = cfg.moe_intermediate_size;
      for (int64_t e = 0; e < cfg.num_experts; ++e) {
        const std::string ex = moe + WeightName(arch.expert, l, e) + ".";
        add(ex + arch.expert_gate + ".weight", {w_e, h});
        add(ex + arch.expert_up + ".weight", {w_e, h});
        add(ex + arch.expert_down + ".weight", {h, w_e});
      }
      if (arch.shared_expert) {
        const int64_t w_s = cfg.shared_expert_intermediate_size;
        add(moe + "shared_expert.gate_proj.weight", {w_s, h});
        add(moe + "shared_expert.up_proj.weight", {w_s, h});
        add(moe + "shared_expert.down_proj.weight", {h, w_s});
        add(moe + "shared_expert_gate.weight", {1, h});
      }
    } else {
      const int64_t w_d = cfg.intermediate_size;
      add(layer + "mlp.gate_proj.weight", {w_d, h});
      add(layer + "mlp.up_proj.weight", {w_d, h});
      add(layer + "mlp.down_proj.weight", {h, w_d});
    }
  }
  add("model.norm.weight", {h});
  if (!cfg.tie_word_embeddings) add("lm_head.weight", {cfg.vocab_size, h});
  std::sort(w.begin(), w.end(),
            [](const WeightSpec& a, const WeightSpec& b) { return a.name < b.name; });
  return w;
}

}  // namespace moemesh
