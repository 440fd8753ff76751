#include "engine/config.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/json_fields.h"
#include <nlohmann/json.hpp>

namespace moemesh {
namespace {

using json = nlohmann::json;

// float32/bfloat16/float16, optionally spelled "torch.float32" etc.
std::optional<DType> ParseTorchDType(std::string s) {
  if (s.rfind("torch.", 0) == 0) s = s.substr(6);
  if (s == "float32" || s == "float" || s == "fp32") return DType::kF32;
  if (s == "bfloat16" || s == "bf16") return DType::kBF16;
  if (s == "float16" || s == "half" || s == "fp16") return DType::kF16;
  return std::nullopt;
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfig::FromFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (!text.ok()) return text.status();
  return FromJson(*text, path);
}

absl::StatusOr<ModelConfig> ModelConfig::FromJson(std::string_view text,
                                                  const std::string& path_for_errors) {
  const std::string& path = path_for_errors;
  absl::StatusOr<json> parsed = ParseObject(text, path);
  if (!parsed.ok()) return parsed.status();
  const json& j = *parsed;

  ModelConfig c;
  c.path = path;
  Fields f(j, path);
  try {
    std::optional<std::string> model_type = f.OptString("model_type");
    if (f.ok() && !model_type) f.Fail("missing field 'model_type'");
    c.model_type = model_type.value_or("");
    if (c.model_type == "switch_transformers") {
      f.Fail("model_type 'switch_transformers' (encoder-decoder) runs in `moemesh generate` only "
             "(engine/switch_model.h); serving supports the decoder-only qwen3_moe, qwen2_moe, "
             "mixtral and olmoe");
    }
    const bool qwen2 = c.model_type == "qwen2_moe";
    const bool qwen3 = c.model_type == "qwen3_moe";
    const bool mixtral = c.model_type == "mixtral";
    const bool olmoe = c.model_type == "olmoe";

    c.hidden_size = f.Int("hidden_size");
    c.num_hidden_layers = f.Int("num_hidden_layers");
    c.num_attention_heads = f.Int("num_attention_heads");
    c.num_key_value_heads = f.OptInt("num_key_value_heads").value_or(c.num_attention_heads);
    c.vocab_size = f.Int("vocab_size");
    c.intermediate_size = f.Int("intermediate_size");

    // Experts: either spelling; both present must agree.
    std::optional<int64_t> ne = f.OptInt("num_experts");
    std::optional<int64_t> nle = f.OptInt("num_local_experts");
    if (ne && nle && *ne != *nle) {
      f.Fail(absl::StrCat("fields 'num_experts' (", *ne, ") and 'num_local_experts' (", *nle,
                          ") disagree"));
    } else if (!ne && !nle) {
      if (f.ok()) f.Fail("missing field 'num_experts' (or 'num_local_experts')");
    } else {
      c.num_experts = ne ? *ne : *nle;
    }
    c.num_experts_per_tok = f.Int("num_experts_per_tok");

    if (mixtral || olmoe) {
      c.moe_intermediate_size = c.intermediate_size;
    } else if (qwen2 || qwen3) {
      c.moe_intermediate_size = f.Int("moe_intermediate_size");
    } else {
      c.moe_intermediate_size = f.OptInt("moe_intermediate_size").value_or(c.intermediate_size);
    }
    if (qwen2) c.shared_expert_intermediate_size = f.Int("shared_expert_intermediate_size");

    c.norm_topk_prob = mixtral ? true : f.OptBool("norm_topk_prob").value_or(false);
    c.rms_norm_eps = f.OptNumber("rms_norm_eps").value_or((mixtral || olmoe) ? 1e-5 : 1e-6);

    // RoPE: 5.x nests it in rope_parameters, 4.x has it at the top level.
    std::optional<double> theta_top = f.OptNumber("rope_theta");
    std::optional<double> theta_nested;
    if (const json* rp = f.OptObject("rope_parameters")) {
      Fields rpf(*rp, path, "rope_parameters.");
      theta_nested = rpf.OptNumber("rope_theta");
      if (auto t = rpf.OptString("rope_type")) c.rope_type = *t;
      f.Merge(rpf.status());
    }
    if (const json* rs = f.OptObject("rope_scaling")) {
      Fields rsf(*rs, path, "rope_scaling.");
      std::optional<std::string> t = rsf.OptString("rope_type");
      if (!t) t = rsf.OptString("type");
      if (t && c.rope_type == "default") c.rope_type = *t;
      f.Merge(rsf.status());
    }
    if (theta_top && theta_nested && *theta_top != *theta_nested) {
      f.Fail(absl::StrCat("fields 'rope_theta' (", *theta_top,
                          ") and 'rope_parameters.rope_theta' (", *theta_nested, ") disagree"));
    }
    c.rope_theta = theta_nested ? *theta_nested : theta_top.value_or(10000.0);

    c.tie_word_embeddings = f.OptBool("tie_word_embeddings").value_or(false);
    c.attention_bias =
        qwen2 ? f.OptBool("qkv_bias").value_or(true) : f.OptBool("attention_bias").value_or(false);
    int64_t default_max_pos = 2048;
    if (qwen2 || qwen3) default_max_pos = 32768;
    if (mixtral) default_max_pos = 4096 * 32;
    if (olmoe) default_max_pos = 4096;
    c.max_position_embeddings = f.OptInt("max_position_embeddings").value_or(default_max_pos);

    if (!mixtral && !olmoe) {
      c.decoder_sparse_step = f.OptInt("decoder_sparse_step").value_or(1);
      c.mlp_only_layers = f.IntList("mlp_only_layers");
    }
    if (olmoe) c.clip_qkv = f.OptNumber("clip_qkv");

    // dtype (5.x) wins over torch_dtype (4.x).
    std::optional<std::string> dtype = f.OptString("dtype");
    const char* dtype_key = "dtype";
    if (!dtype) {
      dtype = f.OptString("torch_dtype");
      dtype_key = "torch_dtype";
    }
    if (dtype) {
      std::optional<DType> d = ParseTorchDType(*dtype);
      if (!d) {
        f.Fail(absl::StrCat("field '", dtype_key, "' has unsupported value '", *dtype,
                            "' (expected float32, bfloat16 or float16)"));
      } else {
        c.dtype = *d;
      }
    }

    c.bos_token_id = f.OptTokenId("bos_token_id");
    c.eos_token_ids = f.TokenIds("eos_token_id");
    c.pad_token_id = f.OptTokenId("pad_token_id");

    // head_dim: absent or null -> hidden / heads.
    std::optional<int64_t> head_dim = f.OptInt("head_dim");

    // Range checks (only once every field has the right type).
    f.CheckAtLeast("hidden_size", c.hidden_size, 1);
    f.CheckAtLeast("num_hidden_layers", c.num_hidden_layers, 1);
    f.CheckAtLeast("num_attention_heads", c.num_attention_heads, 1);
    f.CheckAtLeast("num_key_value_heads", c.num_key_value_heads, 1);
    f.CheckAtLeast("vocab_size", c.vocab_size, 1);
    f.CheckAtLeast("intermediate_size", c.intermediate_size, 1);
    f.CheckAtLeast("num_experts", c.num_experts, 1);
    f.CheckAtLeast("num_experts_per_tok", c.num_experts_per_tok, 1);
    f.CheckAtLeast("moe_intermediate_size", c.moe_intermediate_size, 1);
    f.CheckAtLeast("shared_expert_intermediate_size", c.shared_expert_intermediate_size, 0);
    f.CheckAtLeast("max_position_embeddings", c.max_position_embeddings, 1);
    f.CheckAtLeast("decoder_sparse_step", c.decoder_sparse_step, 1);
    if (f.ok() && c.num_experts_per_tok > c.num_experts) {
      f.Fail(absl::StrCat("field 'num_experts_per_tok' (", c.num_experts_per_tok,
                          ") exceeds the number of experts (", c.num_experts, ")"));
    }
    if (f.ok() && c.num_attention_heads % c.num_key_value_heads != 0) {
      f.Fail(absl::StrCat("field 'num_attention_heads' (", c.num_attention_heads,
                          ") is not a multiple of 'num_key_value_heads' (", c.num_key_value_heads,
                          ")"));
    }
    if (f.ok()) {
      if (head_dim) {
        c.head_dim = *head_dim;
        f.CheckAtLeast("head_dim", c.head_dim, 1);
      } else if (c.hidden_size % c.num_attention_heads != 0) {
        f.Fail(absl::StrCat("no 'head_dim', and 'hidden_size' (", c.hidden_size,
                            ") is not a multiple of 'num_attention_heads' (", c.num_attention_heads,
                            ")"));
      } else {
        c.head_dim = c.hidden_size / c.num_attention_heads;
      }
    }
    if (f.ok() && !(c.rms_norm_eps > 0.0 && std::isfinite(c.rms_norm_eps))) {
      f.Fail("field 'rms_norm_eps' must be a positive number");
    }
    if (f.ok() && !(c.rope_theta > 0.0 && std::isfinite(c.rope_theta))) {
      f.Fail("field 'rope_theta' must be a positive number");
    }
    for (int64_t l : c.mlp_only_layers) {
      if (f.ok() && (l < 0 || l >= c.num_hidden_layers)) {
        f.Fail(absl::StrCat("field 'mlp_only_layers' names layer ", l, " but the model has ",
                            c.num_hidden_layers, " layers"));
      }
    }
  } catch (const std::exception& e) {  // Defensive: types are checked before every get<>.
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", e.what()));
  }
  if (!f.ok()) return f.status();
  return c;
}

bool ModelConfig::IsMoeLayer(int64_t layer) const {
  if (layer < 0 || layer >= num_hidden_layers || num_experts <= 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) {
    return false;
  }
  return decoder_sparse_step > 0 && (layer + 1) % decoder_sparse_step == 0;
}

absl::StatusOr<GenerationDefaults> GenerationDefaults::FromFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadWholeFile(path);
  if (absl::IsNotFound(text.status())) return GenerationDefaults();
  if (!text.ok()) return text.status();
  return FromJson(*text, path);
}

absl::StatusOr<GenerationDefaults> GenerationDefaults::FromJson(
    std::string_view text, const std::string& path_for_errors) {
  absl::StatusOr<json> parsed = ParseObject(text, path_for_errors);
  if (!parsed.ok()) return parsed.status();
  GenerationDefaults g;
  Fields f(*parsed, path_for_errors);
  try {
    auto as_float = [](std::optional<double> d) -> std::optional<float> {
      if (!d) return std::nullopt;
      return static_cast<float>(*d);
    };
    g.temperature = as_float(f.OptNumber("temperature"));
    g.top_p = as_float(f.OptNumber("top_p"));
    g.min_p = as_float(f.OptNumber("min_p"));
    g.repetition_penalty = as_float(f.OptNumber("repetition_penalty"));
    if (std::optional<int64_t> k = f.OptInt("top_k")) {
      if (*k < 0 || *k > std::numeric_limits<int32_t>::max()) {
        f.Fail(absl::StrCat("field 'top_k' out of range: ", *k));
      } else {
        g.top_k = static_cast<int32_t>(*k);
      }
    }
    g.do_sample = f.OptBool("do_sample");
    g.eos_token_ids = f.TokenIds("eos_token_id");
    g.bos_token_id = f.OptTokenId("bos_token_id");
    g.pad_token_id = f.OptTokenId("pad_token_id");
    g.max_new_tokens = f.OptInt("max_new_tokens");
    if (g.max_new_tokens) f.CheckAtLeast("max_new_tokens", *g.max_new_tokens, 0);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path_for_errors, ": ", e.what()));
  }
  if (!f.ok()) return f.status();
  return g;
}

}  // namespace moemesh
