#include "engine/config.h"

#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include <nlohmann/json.hpp>

namespace moemesh {
namespace {

using json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

json ReadJson(const std::string& path) { return json::parse(ReadFileOrDie(path)); }

std::string OracleConfig(const std::string& family) {
  return "testdata/oracle/" + family + "/config.json";
}

ModelConfig ParseOrDie(const json& j, const std::string& path = "test/config.json") {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(j.dump(), path);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : ModelConfig();
}

// Error message of a config that must not parse.
std::string ParseError(const json& j, const std::string& path = "test/config.json") {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(j.dump(), path);
  EXPECT_FALSE(c.ok());
  if (c.ok()) return "";
  std::string msg(c.status().message());
  EXPECT_THAT(msg, HasSubstr(path));
  return msg;
}

void ExpectSameConfig(const ModelConfig& a, const ModelConfig& b, bool compare_dtype = true) {
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.num_experts, b.num_experts);
  EXPECT_EQ(a.num_experts_per_tok, b.num_experts_per_tok);
  EXPECT_EQ(a.moe_intermediate_size, b.moe_intermediate_size);
  EXPECT_EQ(a.shared_expert_intermediate_size, b.shared_expert_intermediate_size);
  EXPECT_EQ(a.norm_topk_prob, b.norm_topk_prob);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.rope_type, b.rope_type);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.attention_bias, b.attention_bias);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.decoder_sparse_step, b.decoder_sparse_step);
  EXPECT_EQ(a.mlp_only_layers, b.mlp_only_layers);
  EXPECT_EQ(a.clip_qkv, b.clip_qkv);
  if (compare_dtype) {
    EXPECT_EQ(a.dtype, b.dtype);
  }
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
  EXPECT_EQ(a.pad_token_id, b.pad_token_id);
}

// Rewrites a transformers-5.x config.json in the 4.x spelling.
json To4x(json j) {
  if (j.contains("rope_parameters")) {
    j["rope_theta"] = j["rope_parameters"]["rope_theta"];
    j.erase("rope_parameters");
    j["rope_scaling"] = nullptr;
  }
  if (j.contains("num_local_experts") && j["model_type"] != "mixtral") {
    j["num_experts"] = j["num_local_experts"];
    j.erase("num_local_experts");
  }
  if (j.contains("dtype")) {
    j["torch_dtype"] = j["dtype"];
    j.erase("dtype");
  }
  j["transformers_version"] = "4.51.3";
  return j;
}

// ---------------------------------------------------------------------------------------------

TEST(ModelConfigTest, Qwen3Moe) {
  auto c = ModelConfig::FromFile(OracleConfig("qwen3_moe"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "qwen3_moe");
  EXPECT_EQ(c->path, OracleConfig("qwen3_moe"));
  EXPECT_EQ(c->hidden_size, 64);
  EXPECT_EQ(c->num_hidden_layers, 2);
  EXPECT_EQ(c->num_attention_heads, 4);
  EXPECT_EQ(c->num_key_value_heads, 2);
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->vocab_size, 1000);
  EXPECT_EQ(c->intermediate_size, 128);
  EXPECT_EQ(c->num_experts, 8);  // from num_local_experts (5.x)
  EXPECT_EQ(c->num_experts_per_tok, 2);
  EXPECT_EQ(c->moe_intermediate_size, 48);
  EXPECT_EQ(c->shared_expert_intermediate_size, 0);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c->rope_theta, 1e6);  // from rope_parameters (5.x)
  EXPECT_EQ(c->rope_type, "default");
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_EQ(c->max_position_embeddings, 512);
  EXPECT_EQ(c->decoder_sparse_step, 1);
  EXPECT_TRUE(c->mlp_only_layers.empty());
  EXPECT_FALSE(c->clip_qkv.has_value());
  EXPECT_EQ(c->dtype, DType::kF32);
  EXPECT_FALSE(c->bos_token_id.has_value());
  EXPECT_TRUE(c->eos_token_ids.empty());
  EXPECT_FALSE(c->pad_token_id.has_value());
  EXPECT_TRUE(c->IsMoeLayer(0));
  EXPECT_TRUE(c->IsMoeLayer(1));
  EXPECT_FALSE(c->IsMoeLayer(2));
}

TEST(ModelConfigTest, Qwen2Moe) {
  auto c = ModelConfig::FromFile(OracleConfig("qwen2_moe"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "qwen2_moe");
  EXPECT_EQ(c->hidden_size, 64);
  EXPECT_EQ(c->num_attention_heads, 4);
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_EQ(c->head_dim, 16);  // absent -> hidden / heads
  EXPECT_EQ(c->num_experts, 8);
  EXPECT_EQ(c->num_experts_per_tok, 4);
  EXPECT_EQ(c->moe_intermediate_size, 32);
  EXPECT_EQ(c->shared_expert_intermediate_size, 96);
  EXPECT_FALSE(c->norm_topk_prob);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_TRUE(c->attention_bias);  // qkv_bias
  EXPECT_EQ(c->dtype, DType::kF32);
  EXPECT_TRUE(c->IsMoeLayer(0));
  EXPECT_TRUE(c->IsMoeLayer(1));
}

TEST(ModelConfigTest, Mixtral) {
  auto c = ModelConfig::FromFile(OracleConfig("mixtral"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "mixtral");
  EXPECT_EQ(c->head_dim, 16);  // null -> hidden / heads
  EXPECT_EQ(c->num_key_value_heads, 2);
  EXPECT_EQ(c->num_experts, 4);
  EXPECT_EQ(c->num_experts_per_tok, 2);
  EXPECT_EQ(c->intermediate_size, 128);
  EXPECT_EQ(c->moe_intermediate_size, 128);  // mixtral: intermediate_size
  EXPECT_EQ(c->shared_expert_intermediate_size, 0);
  EXPECT_TRUE(c->norm_topk_prob);  // always for mixtral
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2));  // eos as an int
  EXPECT_FALSE(c->pad_token_id.has_value());
  EXPECT_TRUE(c->IsMoeLayer(0));
  EXPECT_TRUE(c->IsMoeLayer(1));
}

TEST(ModelConfigTest, Olmoe) {
  auto c = ModelConfig::FromFile(OracleConfig("olmoe"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "olmoe");
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->num_experts, 8);
  EXPECT_EQ(c->num_experts_per_tok, 2);
  EXPECT_EQ(c->moe_intermediate_size, 32);  // olmoe: intermediate_size
  EXPECT_FALSE(c->norm_topk_prob);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_FALSE(c->clip_qkv.has_value());  // null
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->bos_token_id.has_value());
  EXPECT_THAT(c->eos_token_ids, ElementsAre(50279));
  EXPECT_EQ(c->pad_token_id, 1);
}

TEST(ModelConfigTest, PydocBf16) {
  auto c = ModelConfig::FromFile("models/pydoc-moe-17m/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "qwen3_moe");
  EXPECT_EQ(c->hidden_size, 256);
  EXPECT_EQ(c->num_hidden_layers, 6);
  EXPECT_EQ(c->num_attention_heads, 8);
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_EQ(c->vocab_size, 8192);
  EXPECT_EQ(c->num_experts, 16);
  EXPECT_EQ(c->num_experts_per_tok, 4);
  EXPECT_EQ(c->moe_intermediate_size, 192);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_DOUBLE_EQ(c->rope_theta, 1e6);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->max_position_embeddings, 1024);
  EXPECT_EQ(c->dtype, DType::kBF16);
  EXPECT_EQ(c->bos_token_id, 0);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(0));
  EXPECT_EQ(c->pad_token_id, 0);
  for (int l = 0; l < 6; ++l) EXPECT_TRUE(c->IsMoeLayer(l)) << l;
}

// The config's implied shapes are exactly the shapes in the checkpoints.
TEST(ModelConfigTest, ImpliedShapesMatchTensorIndex) {
  for (const char* family : {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe"}) {
    SCOPED_TRACE(family);
    auto c = ModelConfig::FromFile(OracleConfig(family));
    ASSERT_TRUE(c.ok()) << c.status();
    json index = ReadJson(std::string("testdata/oracle/") + family + "/tensor_index.json");
    auto shape_of = [&](const std::string& name) -> std::vector<int64_t> {
      if (!index.contains(name)) {
        ADD_FAILURE() << "no tensor " << name;
        return {};
      }
      return index[name][0].get<std::vector<int64_t>>();
    };
    const bool mixtral = c->model_type == "mixtral";
    const int64_t H = c->hidden_size, D = c->head_dim;
    EXPECT_EQ(shape_of("model.embed_tokens.weight"), (std::vector<int64_t>{c->vocab_size, H}));
    EXPECT_EQ(index.contains("lm_head.weight"), !c->tie_word_embeddings);
    for (int64_t l = 0; l < c->num_hidden_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      EXPECT_EQ(shape_of(p + "self_attn.q_proj.weight"),
                (std::vector<int64_t>{c->num_attention_heads * D, H}));
      EXPECT_EQ(shape_of(p + "self_attn.k_proj.weight"),
                (std::vector<int64_t>{c->num_key_value_heads * D, H}));
      EXPECT_EQ(shape_of(p + "self_attn.o_proj.weight"),
                (std::vector<int64_t>{H, c->num_attention_heads * D}));
      EXPECT_EQ(index.contains(p + "self_attn.q_proj.bias"), c->attention_bias);
      ASSERT_TRUE(c->IsMoeLayer(l));
      const std::string moe = p + (mixtral ? "block_sparse_moe." : "mlp.");
      EXPECT_EQ(shape_of(moe + "gate.weight"), (std::vector<int64_t>{c->num_experts, H}));
      for (int64_t e = 0; e < c->num_experts; ++e) {
        const std::string ep = moe + "experts." + std::to_string(e) + ".";
        EXPECT_EQ(shape_of(ep + (mixtral ? "w1.weight" : "gate_proj.weight")),
                  (std::vector<int64_t>{c->moe_intermediate_size, H}));
        EXPECT_EQ(shape_of(ep + (mixtral ? "w2.weight" : "down_proj.weight")),
                  (std::vector<int64_t>{H, c->moe_intermediate_size}));
      }
      EXPECT_FALSE(index.contains(moe + "experts." + std::to_string(c->num_experts) +
                                  (mixtral ? ".w1.weight" : ".gate_proj.weight")));
      if (c->shared_expert_intermediate_size > 0) {
        EXPECT_EQ(shape_of(p + "mlp.shared_expert.gate_proj.weight"),
                  (std::vector<int64_t>{c->shared_expert_intermediate_size, H}));
      }
    }
  }
}

// transformers 4.x spelling: rope_theta at the top level, num_experts, torch_dtype.
TEST(ModelConfigTest, Transformers4xSpellingGivesSameValues) {
  for (const char* family : {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe"}) {
    SCOPED_TRACE(family);
    json j5 = ReadJson(OracleConfig(family));
    json j4 = To4x(j5);
    EXPECT_FALSE(j4.contains("rope_parameters"));
    EXPECT_FALSE(j4.contains("dtype"));
    ExpectSameConfig(ParseOrDie(j4), ParseOrDie(j5));
  }
  // The qwen3_moe case in full, as the brief spells it: num_experts, bf16.
  json j5 = ReadJson(OracleConfig("qwen3_moe"));
  json j4 = To4x(j5);
  ASSERT_TRUE(j4.contains("num_experts"));
  ASSERT_FALSE(j4.contains("num_local_experts"));
  j4["torch_dtype"] = "bfloat16";
  ModelConfig c4 = ParseOrDie(j4);
  ModelConfig c5 = ParseOrDie(j5);
  ExpectSameConfig(c4, c5, /*compare_dtype=*/false);
  EXPECT_EQ(c4.dtype, DType::kBF16);
  EXPECT_EQ(c4.num_experts, 8);
  EXPECT_DOUBLE_EQ(c4.rope_theta, 1e6);

  // "dtype" wins over "torch_dtype"; both spellings of float16 work; torch. prefix too.
  j4["dtype"] = "float16";
  EXPECT_EQ(ParseOrDie(j4).dtype, DType::kF16);
  j4.erase("dtype");
  j4["torch_dtype"] = "torch.bfloat16";
  EXPECT_EQ(ParseOrDie(j4).dtype, DType::kBF16);
  j4.erase("torch_dtype");
  EXPECT_EQ(ParseOrDie(j4).dtype, DType::kF32);  // default
  j4["torch_dtype"] = "int8";
  EXPECT_THAT(ParseError(j4), HasSubstr("field 'torch_dtype' has unsupported value 'int8'"));

  // A 4.x qwen2_moe without qkv_bias has biases (transformers 4.x always used them).
  json q2 = To4x(ReadJson(OracleConfig("qwen2_moe")));
  q2.erase("qkv_bias");
  EXPECT_TRUE(ParseOrDie(q2).attention_bias);
  q2["qkv_bias"] = false;
  EXPECT_FALSE(ParseOrDie(q2).attention_bias);
}

TEST(ModelConfigTest, DefaultsWhenAbsent) {
  json j = ReadJson(OracleConfig("qwen3_moe"));
  for (const char* k :
       {"rope_parameters", "tie_word_embeddings", "norm_topk_prob", "attention_bias", "dtype",
        "head_dim", "num_key_value_heads", "decoder_sparse_step", "mlp_only_layers", "eos_token_id",
        "rms_norm_eps", "max_position_embeddings"}) {
    j.erase(k);
  }
  ModelConfig c = ParseOrDie(j);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.dtype, DType::kF32);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.num_key_value_heads, 4);  // = num_attention_heads
  EXPECT_EQ(c.decoder_sparse_step, 1);
  EXPECT_TRUE(c.eos_token_ids.empty());
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.max_position_embeddings, 32768);

  // Mixtral ignores norm_topk_prob (always renormalises).
  json m = ReadJson(OracleConfig("mixtral"));
  m["norm_topk_prob"] = false;
  EXPECT_TRUE(ParseOrDie(m).norm_topk_prob);
}

TEST(ModelConfigTest, HeadDimNullOrAbsent) {
  json j = ReadJson(OracleConfig("qwen3_moe"));
  j["hidden_size"] = 96;
  j["head_dim"] = nullptr;
  EXPECT_EQ(ParseOrDie(j).head_dim, 24);
  j.erase("head_dim");
  EXPECT_EQ(ParseOrDie(j).head_dim, 24);
  j["head_dim"] = 40;  // explicit head_dim need not divide hidden_size (qwen3 style)
  EXPECT_EQ(ParseOrDie(j).head_dim, 40);
  j.erase("head_dim");
  j["hidden_size"] = 66;
  EXPECT_THAT(ParseError(j), HasSubstr("not a multiple of 'num_attention_heads'"));
}

TEST(ModelConfigTest, EosTokenIdForms) {
  json j = ReadJson(OracleConfig("mixtral"));
  j["eos_token_id"] = 7;
  EXPECT_THAT(ParseOrDie(j).eos_token_ids, ElementsAre(7));
  j["eos_token_id"] = {151645, 151643};
  EXPECT_THAT(ParseOrDie(j).eos_token_ids, ElementsAre(151645, 151643));
  j["eos_token_id"] = json::array();
  EXPECT_TRUE(ParseOrDie(j).eos_token_ids.empty());
  j["eos_token_id"] = nullptr;
  EXPECT_TRUE(ParseOrDie(j).eos_token_ids.empty());
  j["eos_token_id"] = "2";
  EXPECT_THAT(ParseError(j),
              HasSubstr("field 'eos_token_id' must be an integer, a list of integers, or null"));
  j["eos_token_id"] = {1, "x"};
  EXPECT_THAT(ParseError(j), HasSubstr("field 'eos_token_id'"));
  j["eos_token_id"] = -1;
  EXPECT_THAT(ParseError(j), HasSubstr("field 'eos_token_id'"));
  j["eos_token_id"] = 2;
  j["bos_token_id"] = 1.5;
  EXPECT_THAT(ParseError(j), HasSubstr("field 'bos_token_id' must be a token id"));
}

TEST(ModelConfigTest, MissingFieldAndWrongType) {
  const std::string path = "some/dir/config.json";
  json base = ReadJson(OracleConfig("qwen3_moe"));

  json j = base;
  j.erase("hidden_size");
  EXPECT_THAT(ParseError(j, path), HasSubstr(path + ": missing field 'hidden_size'"));

  j = base;
  j.erase("model_type");
  EXPECT_THAT(ParseError(j, path), HasSubstr("missing field 'model_type'"));

  j = base;
  j.erase("moe_intermediate_size");
  EXPECT_THAT(ParseError(j, path), HasSubstr("missing field 'moe_intermediate_size'"));

  j = base;
  j.erase("num_local_experts");
  EXPECT_THAT(ParseError(j, path), HasSubstr("missing field 'num_experts'"));

  j = base;
  j["hidden_size"] = "64";
  EXPECT_THAT(ParseError(j, path), HasSubstr(path + ": field 'hidden_size' must be an integer"));
  j["hidden_size"] = 64.5;
  EXPECT_THAT(ParseError(j, path), HasSubstr("field 'hidden_size' must be an integer"));
  j["hidden_size"] = nullptr;
  EXPECT_THAT(ParseError(j, path), HasSubstr("field 'hidden_size' must be an integer"));

  j = base;
  j["tie_word_embeddings"] = 1;
  EXPECT_THAT(ParseError(j, path), HasSubstr("field 'tie_word_embeddings' must be a boolean"));

  j = base;
  j["rms_norm_eps"] = "1e-6";
  EXPECT_THAT(ParseError(j, path), HasSubstr("field 'rms_norm_eps' must be a number"));

  j = base;
  j["rope_parameters"]["rope_theta"] = "big";
  EXPECT_THAT(ParseError(j, path),
              HasSubstr("field 'rope_parameters.rope_theta' must be a number"));

  j = base;
  j["mlp_only_layers"] = {0, "1"};
  EXPECT_THAT(ParseError(j, path), HasSubstr("field 'mlp_only_layers' must be a list"));

  j = base;
  j["num_experts"] = 4;  // disagrees with num_local_experts = 8
  EXPECT_THAT(ParseError(j, path), HasSubstr("disagree"));

  j = base;
  j["rope_theta"] = 10000.0;  // disagrees with rope_parameters.rope_theta = 1e6
  EXPECT_THAT(ParseError(j, path), HasSubstr("disagree"));

  j = base;
  j["num_experts_per_tok"] = 9;
  EXPECT_THAT(ParseError(j, path), HasSubstr("exceeds the number of experts"));

  j = base;
  j["num_key_value_heads"] = 3;
  EXPECT_THAT(ParseError(j, path), HasSubstr("not a multiple of 'num_key_value_heads'"));

  j = base;
  j["hidden_size"] = 0;
  EXPECT_THAT(ParseError(j, path), HasSubstr("field 'hidden_size' must be >= 1"));

  EXPECT_THAT(std::string(ModelConfig::FromJson("{\"a\": ", path).status().message()),
              HasSubstr(path + ": not valid JSON"));
  EXPECT_THAT(std::string(ModelConfig::FromJson("[1]", path).status().message()),
              HasSubstr("not a JSON object"));
}

TEST(ModelConfigTest, MissingFile) {
  auto c = ModelConfig::FromFile("testdata/no_such_dir/config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("testdata/no_such_dir/config.json"));
}

TEST(ModelConfigTest, IsMoeLayerRule) {
  json j = ReadJson(OracleConfig("qwen2_moe"));
  j["num_hidden_layers"] = 6;
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  ModelConfig c = ParseOrDie(j);
  // (layer + 1) % 2 == 0 -> 1, 3, 5; minus mlp_only_layers {3}.
  std::vector<int> moe;
  for (int l = 0; l < 6; ++l) {
    if (c.IsMoeLayer(l)) moe.push_back(l);
  }
  EXPECT_THAT(moe, ElementsAre(1, 5));
  EXPECT_FALSE(c.IsMoeLayer(-1));
  EXPECT_FALSE(c.IsMoeLayer(6));

  j["decoder_sparse_step"] = 0;
  EXPECT_THAT(ParseError(j), HasSubstr("field 'decoder_sparse_step' must be >= 1"));
  j["decoder_sparse_step"] = 1;
  j["mlp_only_layers"] = {6};
  EXPECT_THAT(ParseError(j), HasSubstr("'mlp_only_layers' names layer 6"));

  // Mixtral and OLMoE have no such fields: every layer is sparse.
  json m = ReadJson(OracleConfig("mixtral"));
  m["decoder_sparse_step"] = 2;
  m["mlp_only_layers"] = {0};
  ModelConfig mc = ParseOrDie(m);
  EXPECT_TRUE(mc.IsMoeLayer(0));
  EXPECT_TRUE(mc.IsMoeLayer(1));
}

TEST(ModelConfigTest, RopeTypeAndClipQkv) {
  json j = ReadJson(OracleConfig("qwen3_moe"));
  j["rope_parameters"]["rope_type"] = "yarn";
  EXPECT_EQ(ParseOrDie(j).rope_type, "yarn");
  json j4 = To4x(ReadJson(OracleConfig("qwen3_moe")));
  j4["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  EXPECT_EQ(ParseOrDie(j4).rope_type, "linear");

  json o = ReadJson(OracleConfig("olmoe"));
  o["clip_qkv"] = 8;
  EXPECT_EQ(ParseOrDie(o).clip_qkv, 8.0);
  o["clip_qkv"] = "8";
  EXPECT_THAT(ParseError(o), HasSubstr("field 'clip_qkv' must be a number"));
}

// ---------------------------------------------------------------------------------------------

TEST(GenerationDefaultsTest, OracleFiles) {
  auto g = GenerationDefaults::FromFile("testdata/oracle/mixtral/generation_config.json");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->bos_token_id, 1);
  EXPECT_THAT(g->eos_token_ids, ElementsAre(2));
  EXPECT_FALSE(g->pad_token_id.has_value());
  EXPECT_FALSE(g->temperature.has_value());
  EXPECT_FALSE(g->do_sample.has_value());

  g = GenerationDefaults::FromFile("testdata/oracle/qwen3_moe/generation_config.json");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_FALSE(g->bos_token_id.has_value());
  EXPECT_TRUE(g->eos_token_ids.empty());

  g = GenerationDefaults::FromFile("testdata/oracle/olmoe/generation_config.json");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_THAT(g->eos_token_ids, ElementsAre(50279));
  EXPECT_EQ(g->pad_token_id, 1);

  g = GenerationDefaults::FromFile("models/pydoc-moe-17m/generation_config.json");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_THAT(g->eos_token_ids, ElementsAre(0));
}

TEST(GenerationDefaultsTest, MissingFileGivesDefaults) {
  auto g = GenerationDefaults::FromFile("testdata/no_such_dir/generation_config.json");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_FALSE(g->temperature || g->top_p || g->min_p || g->repetition_penalty || g->top_k ||
               g->do_sample || g->bos_token_id || g->pad_token_id || g->max_new_tokens);
  EXPECT_TRUE(g->eos_token_ids.empty());
}

TEST(GenerationDefaultsTest, AllFields) {
  const std::string text = R"({
    "temperature": 0.7, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1,
    "top_k": 20, "do_sample": true, "eos_token_id": [151645, 151643],
    "bos_token_id": 151643, "pad_token_id": null, "max_new_tokens": 256,
    "transformers_version": "4.51.0"})";
  auto g = GenerationDefaults::FromJson(text, "gen.json");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_FLOAT_EQ(*g->temperature, 0.7f);
  EXPECT_FLOAT_EQ(*g->top_p, 0.8f);
  EXPECT_FLOAT_EQ(*g->min_p, 0.05f);
  EXPECT_FLOAT_EQ(*g->repetition_penalty, 1.0f);
  EXPECT_EQ(g->top_k, 20);
  EXPECT_EQ(g->do_sample, true);
  EXPECT_THAT(g->eos_token_ids, ElementsAre(151645, 151643));
  EXPECT_EQ(g->bos_token_id, 151643);
  EXPECT_FALSE(g->pad_token_id.has_value());
  EXPECT_EQ(g->max_new_tokens, 256);
}

TEST(GenerationDefaultsTest, Errors) {
  auto g = GenerationDefaults::FromJson(R"({"temperature": "hot"})", "gen.json");
  ASSERT_FALSE(g.ok());
  EXPECT_THAT(std::string(g.status().message()),
              HasSubstr("gen.json: field 'temperature' must be a number"));
  g = GenerationDefaults::FromJson(R"({"top_k": 2.5})", "gen.json");
  ASSERT_FALSE(g.ok());
  EXPECT_THAT(std::string(g.status().message()), HasSubstr("field 'top_k' must be an integer"));
  g = GenerationDefaults::FromJson(R"({"do_sample": "yes"})", "gen.json");
  ASSERT_FALSE(g.ok());
  EXPECT_THAT(std::string(g.status().message()), HasSubstr("field 'do_sample' must be a boolean"));
  g = GenerationDefaults::FromJson("{", "gen.json");
  ASSERT_FALSE(g.ok());
  EXPECT_THAT(std::string(g.status().message()), HasSubstr("gen.json: not valid JSON"));
}

// The encoder-decoder oracle is refused by name, pointing at the one command that runs it.
TEST(ModelConfigTest, SwitchTransformersIsRefusedWithWhereItRuns) {
  auto c = ModelConfig::FromFile("testdata/oracle/switch/config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()),
              ::testing::AllOf(::testing::HasSubstr("switch_transformers"),
                               ::testing::HasSubstr("moemesh generate")));
}

}  // namespace
}  // namespace moemesh
