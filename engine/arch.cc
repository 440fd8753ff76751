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

std::vector<WeightSpec> LayerTensors::All() const {
  std::vector<WeightSpec> all;
  for (const WeightSpec* w : {&input_norm, &post_norm, &q, &k, &v, &o, &q_bias, &k_bias, &v_bias,
                              &o_bias, &q_norm, &k_norm, &router, &mlp.gate, &mlp.up, &mlp.down,
                              &shared_expert_gate}) {
    if (!w->name.empty()) all.push_back(*w);
  }
  return all;
}

LayerTensors LayerTensorsOf(const ModelConfig& cfg, const ArchSpec& arch, int64_t l) {
  const int64_t h = cfg.hidden_size, hd = cfg.head_dim;
  const int64_t qd = cfg.num_attention_heads * hd, kvd = cfg.num_key_value_heads * hd;
  auto layer = [l](const char* suffix) { return LayerWeightName(l, suffix); };
  auto mlp = [h](const std::string& prefix, int64_t width) {
    return MlpTensors{{prefix + "gate_proj.weight", {width, h}},
                      {prefix + "up_proj.weight", {width, h}},
                      {prefix + "down_proj.weight", {h, width}}};
  };
  LayerTensors t;
  t.input_norm = {layer("input_layernorm.weight"), {h}};
  t.post_norm = {layer("post_attention_layernorm.weight"), {h}};
  t.q = {layer("self_attn.q_proj.weight"), {qd, h}};
  t.k = {layer("self_attn.k_proj.weight"), {kvd, h}};
  t.v = {layer("self_attn.v_proj.weight"), {kvd, h}};
  t.o = {layer("self_attn.o_proj.weight"), {h, qd}};
  if (arch.qkv_bias) {
    t.q_bias = {layer("self_attn.q_proj.bias"), {qd}};
    t.k_bias = {layer("self_attn.k_proj.bias"), {kvd}};
    t.v_bias = {layer("self_attn.v_proj.bias"), {kvd}};
  }
  if (arch.o_bias) t.o_bias = {layer("self_attn.o_proj.bias"), {h}};
  if (arch.qk_norm != QkNorm::kNone) {
    const bool full = arch.qk_norm == QkNorm::kFull;
    t.q_norm = {layer("self_attn.q_norm.weight"), {full ? qd : hd}};
    t.k_norm = {layer("self_attn.k_norm.weight"), {full ? kvd : hd}};
  }
  if (cfg.IsMoeLayer(l)) {
    const std::string moe = WeightName(arch.moe_prefix, l) + ".";
    t.router = {moe + arch.router + ".weight", {cfg.num_experts, h}};
    if (arch.shared_expert) {
      t.mlp = mlp(moe + "shared_expert.", cfg.shared_expert_intermediate_size);
      t.shared_expert_gate = {moe + "shared_expert_gate.weight", {1, h}};
    }
  } else {
    t.mlp = mlp(layer("mlp."), cfg.intermediate_size);
  }
  return t;
}

std::string ExpertPrefix(const ArchSpec& arch, int64_t layer, int64_t expert) {
  return WeightName(arch.moe_prefix, layer) + "." + WeightName(arch.expert, layer, expert) + ".";
}

MlpTensors ExpertTensorsOf(const ModelConfig& cfg, const ArchSpec& arch, int64_t layer,
                           int64_t expert) {
  const std::string ex = ExpertPrefix(arch, layer, expert);
  const int64_t h = cfg.hidden_size, w = cfg.moe_intermediate_size;
  return MlpTensors{{ex + arch.expert_gate + ".weight", {w, h}},
                    {ex + arch.expert_up + ".weight", {w, h}},
                    {ex + arch.expert_down + ".weight", {h, w}}};
}

std::vector<WeightSpec> CheckpointWeights(const ModelConfig& cfg, const ArchSpec& arch) {
  const int64_t h = cfg.hidden_size;
  std::vector<WeightSpec> w;
  w.push_back({"model.embed_tokens.weight", {cfg.vocab_size, h}});
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    for (WeightSpec& t : LayerTensorsOf(cfg, arch, l).All()) w.push_back(std::move(t));
    if (!cfg.IsMoeLayer(l)) continue;
    for (int64_t e = 0; e < cfg.num_experts; ++e) {
      MlpTensors ex = ExpertTensorsOf(cfg, arch, l, e);
      for (WeightSpec* t : {&ex.gate, &ex.up, &ex.down}) w.push_back(std::move(*t));
    }
  }
  w.push_back({"model.norm.weight", {h}});
  if (!cfg.tie_word_embeddings) w.push_back({"lm_head.weight", {cfg.vocab_size, h}});
  std::sort(w.begin(), w.end(),
            [](const WeightSpec& a, const WeightSpec& b) { return a.name < b.name; });
  return w;
}

}  // namespace moemesh
