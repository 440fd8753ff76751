// Parsing of a Hugging Face checkpoint's config.json (ModelConfig) and
// generation_config.json (GenerationDefaults) for the MoE families MoE Mesh serves:
// qwen3_moe, qwen2_moe, mixtral, olmoe.
//
// Both spellings that transformers writes are accepted:
//   4.x (most of the Hub): "rope_theta", "num_experts" (qwen*/olmoe), "torch_dtype";
//   5.x: "rope_parameters": {"rope_theta": ...}, "num_local_experts" (qwen3_moe), "dtype".
// Unknown model types are parsed with the generic rules; rejecting them is the caller's job.
#ifndef MOEMESH_ENGINE_CONFIG_H_
#define MOEMESH_ENGINE_CONFIG_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/dtype.h"

namespace moemesh {

struct ModelConfig {
  // "qwen3_moe", "qwen2_moe", "mixtral", "olmoe" (others: error at a higher level).
  std::string model_type;
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // Defaults to num_attention_heads when absent or null.
  int64_t head_dim = 0;             // hidden_size / num_attention_heads when absent or null.
  int64_t vocab_size = 0;
  int64_t intermediate_size = 0;  // Dense MLP width (mixtral/olmoe: the expert width).
  // "num_experts" (qwen*/olmoe, 4.x) or "num_local_experts" (mixtral; qwen3_moe in 5.x).
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  // Expert FFN width: "moe_intermediate_size" (qwen*); mixtral/olmoe: intermediate_size.
  int64_t moe_intermediate_size = 0;
  int64_t shared_expert_intermediate_size = 0;  // qwen2_moe only (0 elsewhere).
  // qwen2_moe/qwen3_moe/olmoe read it (default false); mixtral always true.
  bool norm_topk_prob = false;
  double rms_norm_eps = 1e-6;  // Family default when absent (1e-6 qwen*, 1e-5 mixtral/olmoe).
  // "rope_theta" (4.x) or "rope_parameters": {"rope_theta": ...} (5.x); default 10000.
  double rope_theta = 10000.0;
  // "rope_parameters.rope_type" (5.x) or "rope_scaling.rope_type"/"type" (4.x); "default"
  // when absent or null. Anything else is RoPE scaling the engine may not implement.
  std::string rope_type = "default";
  bool tie_word_embeddings = false;
  // qwen2_moe: "qkv_bias" (default true); others: "attention_bias" (default false).
  bool attention_bias = false;
  int64_t max_position_embeddings = 0;  // Family default when absent.
  // Sparse-layer selection (qwen2_moe/qwen3_moe); mixtral/olmoe: every layer is MoE.
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  std::optional<double> clip_qkv;  // olmoe only; nullopt when absent or null.
  // "dtype" (5.x) or "torch_dtype" (4.x): float32/bfloat16/float16; default kF32.
  DType dtype = DType::kF32;
  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids;  // eos_token_id may be an int, a list, or null.
  std::optional<int32_t> pad_token_id;

  std::string path;  // Where it was read from (for error messages).

  static absl::StatusOr<ModelConfig> FromFile(const std::string& path);
  static absl::StatusOr<ModelConfig> FromJson(std::string_view text,
                                              const std::string& path_for_errors);

  // Whether decoder layer `layer` has a sparse MoE block (else a dense MLP of
  // intermediate_size), as transformers decides: not in mlp_only_layers, num_experts > 0,
  // and (layer + 1) % decoder_sparse_step == 0.
  bool IsMoeLayer(int64_t layer) const;
};

// generation_config.json (all optional; absent file = all unset).
struct GenerationDefaults {
  std::optional<float> temperature, top_p, min_p, repetition_penalty;
  std::optional<int32_t> top_k;
  std::optional<bool> do_sample;
  std::vector<int32_t> eos_token_ids;
  std::optional<int32_t> bos_token_id, pad_token_id;
  std::optional<int64_t> max_new_tokens;

  // NotFound-tolerant: a missing file gives all-unset defaults; a malformed one is an error.
  static absl::StatusOr<GenerationDefaults> FromFile(const std::string& path);
  static absl::StatusOr<GenerationDefaults> FromJson(std::string_view text,
                                                     const std::string& path_for_errors);
};

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_CONFIG_H_
