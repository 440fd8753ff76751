// CheckpointReader::OpenDummy (random weights from config.json alone) and the load options that
// use it: LoadOptions::load_format = kDummy and LoadOptions::num_layers.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "engine/arch.h"
#include "engine/config.h"
#include "engine/dtype.h"
#include "engine/model.h"
#include "engine/ops/threading.h"
#include "engine/safetensors.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moemesh {
namespace {

bool EndsWith(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}
bool Contains(std::string_view s, std::string_view p) { return s.find(p) != s.npos; }

ModelConfig ConfigOf(const std::string& dir) {
  auto cfg = ModelConfig::FromFile(dir + "/config.json");
  EXPECT_TRUE(cfg.ok()) << cfg.status();
  return cfg.ok() ? *cfg : ModelConfig();
}

std::unique_ptr<CheckpointReader> DummyOf(const ModelConfig& cfg, DType dt = DType::kBF16,
                                          uint64_t seed = 0,
                                          std::function<bool(std::string_view)> want = nullptr) {
  auto arch = ArchFor(cfg);
  EXPECT_TRUE(arch.ok()) << arch.status();
  auto r = CheckpointReader::OpenDummy(cfg, *arch, dt, seed, std::move(want));
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? std::move(*r) : nullptr;
}

std::vector<float> ValuesOf(const TensorInfo& t) {
  std::vector<float> v(t.numel());
  ToF32(t.data, t.dtype, v.size(), v.data());
  return v;
}

// A config.json of `src` with `edit` applied, alone in a new directory (no weights).
std::string ConfigOnlyDir(const std::string& src, const std::string& name,
                          const std::function<void(nlohmann::json*)>& edit = nullptr) {
  const std::string dir = ::testing::TempDir() + "/" + name;
  EXPECT_EQ(system(("rm -rf " + dir + " && mkdir -p " + dir).c_str()), 0);
  std::ifstream in(src + "/config.json");
  nlohmann::json cfg = nlohmann::json::parse(in);
  if (edit) edit(&cfg);
  std::ofstream(dir + "/config.json") << cfg.dump(2);
  return dir;
}

// ------------------------------------------------------------------------------------------
// The assertion that matters: a dummy reader has exactly the tensors of the real checkpoint.

class DummyMatchesRealTest : public ::testing::TestWithParam<std::string> {};

TEST_P(DummyMatchesRealTest, SameNamesAndShapes) {
  const std::string dir = GetParam();
  const ModelConfig cfg = ConfigOf(dir);
  auto real = CheckpointReader::Open(dir);
  ASSERT_TRUE(real.ok()) << real.status();
  auto dummy = DummyOf(cfg, cfg.dtype);
  ASSERT_NE(dummy, nullptr);
  EXPECT_TRUE(dummy->dummy());
  EXPECT_FALSE((*real)->dummy());
  EXPECT_EQ(dummy->num_open_files(), 0u);
  ASSERT_EQ(dummy->Names(), (*real)->Names()) << dir;
  for (const std::string& name : (*real)->Names()) {
    const TensorInfo* r = (*real)->Find(name);
    auto d = dummy->Get(name, r->shape);
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ((*d)->shape, r->shape) << name;
    EXPECT_EQ((*d)->nbytes, static_cast<size_t>(r->numel()) * DTypeSize(cfg.dtype)) << name;
    ASSERT_NE((*d)->data, nullptr) << name;
  }
  EXPECT_EQ(dummy->Find("model.layers.0.no_such_tensor.weight"), nullptr);
}

// The embedded model (qwen3_moe, per-head q/k norm, tied embeddings) and every oracle family:
// qwen2_moe (q/k/v biases, shared expert), olmoe (q/k norm over the whole projection),
// mixtral (block_sparse_moe w1/w2/w3 names), qwen3_moe.
INSTANTIATE_TEST_SUITE_P(Checkpoints, DummyMatchesRealTest,
                         ::testing::Values("models/pydoc-moe-17m", "testdata/oracle/qwen3_moe",
                                           "testdata/oracle/qwen2_moe", "testdata/oracle/olmoe",
                                           "testdata/oracle/mixtral"),
                         [](const auto& info) {
                           std::string n = info.param.substr(info.param.rfind('/') + 1);
                           for (char& c : n) c = std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
                           return n;
                         });

// Dense layers (mlp_only_layers) get mlp.gate/up/down of intermediate_size instead of experts.
TEST(DummyCheckpointTest, DenseLayersHaveMlpTensors) {
  ModelConfig cfg = ConfigOf("testdata/oracle/qwen3_moe");
  cfg.mlp_only_layers = {1};
  auto r = DummyOf(cfg);
  ASSERT_NE(r, nullptr);
  auto up = r->Get("model.layers.1.mlp.up_proj.weight", {cfg.intermediate_size, cfg.hidden_size});
  EXPECT_TRUE(up.ok()) << up.status();
  auto down = r->Get("model.layers.1.mlp.down_proj.weight", {cfg.hidden_size, cfg.intermediate_size});
  EXPECT_TRUE(down.ok()) << down.status();
  EXPECT_EQ(r->Find("model.layers.1.mlp.gate.weight"), nullptr);
  EXPECT_EQ(r->Find("model.layers.1.mlp.experts.0.up_proj.weight"), nullptr);
  EXPECT_NE(r->Find("model.layers.0.mlp.experts.0.up_proj.weight"), nullptr);
}

// LayerTensorsOf leaves the tensors a family lacks empty; ExpertTensorsOf names its experts.
TEST(LayerTensorsTest, OptionalTensorsAndExpertNames) {
  const ModelConfig qwen2 = ConfigOf("testdata/oracle/qwen2_moe");
  const LayerTensors q2 = LayerTensorsOf(qwen2, *ArchFor(qwen2), 1);
  EXPECT_EQ(q2.k_bias.name, "model.layers.1.self_attn.k_proj.bias");
  EXPECT_EQ(q2.q_norm.name, "");
  EXPECT_EQ(q2.o_bias.name, "");
  EXPECT_EQ(q2.mlp.down.name, "model.layers.1.mlp.shared_expert.down_proj.weight");
  EXPECT_EQ(q2.mlp.down.shape,
            (std::vector<int64_t>{qwen2.hidden_size, qwen2.shared_expert_intermediate_size}));
  EXPECT_EQ(q2.shared_expert_gate.shape, (std::vector<int64_t>{1, qwen2.hidden_size}));

  const ModelConfig olmoe = ConfigOf("testdata/oracle/olmoe");
  const LayerTensors ol = LayerTensorsOf(olmoe, *ArchFor(olmoe), 0);
  EXPECT_EQ(ol.k_norm.shape, (std::vector<int64_t>{olmoe.num_key_value_heads * olmoe.head_dim}));
  EXPECT_EQ(ol.mlp.gate.name, "");
  EXPECT_EQ(ol.shared_expert_gate.name, "");
  EXPECT_EQ(ol.q_bias.name, "");

  const ModelConfig mixtral = ConfigOf("testdata/oracle/mixtral");
  const ArchSpec mx = *ArchFor(mixtral);
  EXPECT_EQ(LayerTensorsOf(mixtral, mx, 1).router.name,
            "model.layers.1.block_sparse_moe.gate.weight");
  EXPECT_EQ(ExpertPrefix(mx, 1, 3), "model.layers.1.block_sparse_moe.experts.3.");
  const MlpTensors e = ExpertTensorsOf(mixtral, mx, 1, 3);
  EXPECT_EQ(e.gate.name, "model.layers.1.block_sparse_moe.experts.3.w1.weight");
  EXPECT_EQ(e.up.name, "model.layers.1.block_sparse_moe.experts.3.w3.weight");
  EXPECT_EQ(e.down.name, "model.layers.1.block_sparse_moe.experts.3.w2.weight");
  EXPECT_EQ(e.down.shape,
            (std::vector<int64_t>{mixtral.hidden_size, mixtral.moe_intermediate_size}));

  ModelConfig dense = ConfigOf("testdata/oracle/qwen3_moe");
  dense.mlp_only_layers = {1};
  const LayerTensors d = LayerTensorsOf(dense, *ArchFor(dense), 1);
  EXPECT_EQ(d.router.name, "");
  EXPECT_EQ(d.mlp.up.name, "model.layers.1.mlp.up_proj.weight");
  EXPECT_EQ(d.mlp.up.shape, (std::vector<int64_t>{dense.intermediate_size, dense.hidden_size}));
  EXPECT_EQ(d.All().size(), 2u + 4 + 2 + 3);  // norms, q/k/v/o, q/k norms, mlp
}

// The published Qwen3-30B-A3B config parses and its dummy checkpoint lists the 18,867 tensors
// of the real one (making none of them).
TEST(DummyCheckpointTest, Qwen3_30B_A3B_Config) {
  const ModelConfig cfg = ConfigOf("models/configs/qwen3-30b-a3b");
  EXPECT_EQ(cfg.model_type, "qwen3_moe");
  EXPECT_EQ(cfg.hidden_size, 2048);
  EXPECT_EQ(cfg.num_hidden_layers, 48);
  EXPECT_EQ(cfg.num_attention_heads, 32);
  EXPECT_EQ(cfg.num_key_value_heads, 4);
  EXPECT_EQ(cfg.head_dim, 128);
  EXPECT_EQ(cfg.num_experts, 128);
  EXPECT_EQ(cfg.num_experts_per_tok, 8);
  EXPECT_EQ(cfg.moe_intermediate_size, 768);
  EXPECT_EQ(cfg.vocab_size, 151936);
  EXPECT_EQ(cfg.max_position_embeddings, 40960);
  EXPECT_EQ(cfg.rope_theta, 1e6);
  EXPECT_EQ(cfg.dtype, DType::kBF16);
  EXPECT_TRUE(cfg.norm_topk_prob);
  EXPECT_FALSE(cfg.tie_word_embeddings);
  ASSERT_EQ(cfg.eos_token_ids, std::vector<int32_t>{151645});
  auto r = DummyOf(cfg);
  ASSERT_NE(r, nullptr);
  // Per layer: 2 norms, q/k/v/o, q_norm/k_norm, router, 128 x 3 expert matrices.
  EXPECT_EQ(r->Names().size(), 1u + 48u * (2 + 4 + 2 + 1 + 128 * 3) + 1 + 1);
  int64_t params = 0;
  for (const WeightSpec& w : CheckpointWeights(cfg, *ArchFor(cfg))) {
    int64_t n = 1;
    for (int64_t d : w.shape) n *= d;
    params += n;
  }
  EXPECT_EQ(params, 30532122624);  // 30.5B, as published
}

// ------------------------------------------------------------------------------------------
// Values

TEST(DummyCheckpointTest, SameSeedSameBytesOtherSeedOtherBytes) {
  const ModelConfig cfg = ConfigOf("models/pydoc-moe-17m");
  auto a = DummyOf(cfg, DType::kBF16, 7);
  auto b = DummyOf(cfg, DType::kBF16, 7);
  auto c = DummyOf(cfg, DType::kBF16, 8);
  // The same name under another `want` (another process's subset) gets the same bytes.
  const std::string name = "model.layers.3.mlp.experts.5.down_proj.weight";
  auto d = DummyOf(cfg, DType::kBF16, 7, [&](std::string_view n) { return n == name; });
  for (const std::string& n : {name, std::string("model.embed_tokens.weight"),
                               std::string("model.layers.0.self_attn.q_proj.weight")}) {
    const TensorInfo* ta = a->Find(n);
    const TensorInfo* tb = b->Find(n);
    const TensorInfo* tc = c->Find(n);
    ASSERT_TRUE(ta && tb && tc) << n;
    EXPECT_EQ(std::memcmp(ta->data, tb->data, ta->nbytes), 0) << n;
    EXPECT_NE(std::memcmp(ta->data, tc->data, ta->nbytes), 0) << n;
  }
  const TensorInfo* td = d->Find(name);
  ASSERT_NE(td, nullptr);
  EXPECT_EQ(std::memcmp(a->Find(name)->data, td->data, td->nbytes), 0);
  // Different tensors of the same shape differ.
  const TensorInfo* e0 = a->Find("model.layers.3.mlp.experts.4.down_proj.weight");
  EXPECT_NE(std::memcmp(e0->data, td->data, td->nbytes), 0);
  // Made once: the same pointer every time.
  EXPECT_EQ(a->Find(name), a->Find(name));
  EXPECT_EQ(a->Find(name)->data, a->Find(name)->data);
}

TEST(DummyCheckpointTest, NormsAreOneBiasesZeroMatricesScaledUniform) {
  const ModelConfig cfg = ConfigOf("testdata/oracle/qwen2_moe");
  auto r = DummyOf(cfg, DType::kF32);
  ASSERT_NE(r, nullptr);
  int norms = 0, biases = 0, matrices = 0;
  for (const std::string& name : r->Names()) {
    const TensorInfo* t = r->Find(name);
    ASSERT_NE(t, nullptr) << name;
    const std::vector<float> v = ValuesOf(*t);
    if (EndsWith(name, "norm.weight")) {
      ++norms;
      for (float x : v) ASSERT_EQ(x, 1.0f) << name;
    } else if (EndsWith(name, ".bias")) {
      ++biases;
      for (float x : v) ASSERT_EQ(x, 0.0f) << name;
    } else {
      ++matrices;
      const float a = name == "model.embed_tokens.weight"
                          ? 0.05f
                          : 1.0f / std::sqrt(static_cast<float>(t->shape.back()));
      double sum = 0, sq = 0;
      for (float x : v) {
        ASSERT_LE(std::abs(x), a) << name;
        sum += x;
        sq += static_cast<double>(x) * x;
      }
      const double n = static_cast<double>(v.size());
      // Uniform in [-a, a]: mean 0, variance a^2 / 3 (loose bounds: some tensors are small).
      if (n >= 1000) {
        EXPECT_LT(std::abs(sum / n), 0.1 * a) << name;
        EXPECT_NEAR(sq / n, a * a / 3.0, 0.1 * a * a) << name;
      }
    }
  }
  EXPECT_EQ(norms, 2 * 2 + 1);   // input/post norms of 2 layers, model.norm (no q/k norm)
  EXPECT_EQ(biases, 2 * 3);      // q/k/v biases of 2 layers
  EXPECT_GT(matrices, 0);
}

TEST(DummyCheckpointTest, QkNormsAndDTypes) {
  const ModelConfig cfg = ConfigOf("testdata/oracle/olmoe");
  auto f32 = DummyOf(cfg, DType::kF32, 3);
  auto bf16 = DummyOf(cfg, DType::kBF16, 3);
  auto f16 = DummyOf(cfg, DType::kF16, 3);
  const int64_t qd = cfg.num_attention_heads * cfg.head_dim;
  auto qn = bf16->Get("model.layers.1.self_attn.q_norm.weight", {qd});  // kFull: [heads * head_dim]
  ASSERT_TRUE(qn.ok()) << qn.status();
  for (float x : ValuesOf(**qn)) EXPECT_EQ(x, 1.0f);
  // The same values in every dtype, to the dtype's precision.
  const std::string name = "model.layers.0.mlp.experts.2.gate_proj.weight";
  const std::vector<float> a = ValuesOf(*f32->Find(name));
  const std::vector<float> b = ValuesOf(*bf16->Find(name));
  const std::vector<float> h = ValuesOf(*f16->Find(name));
  EXPECT_EQ(f16->Find(name)->dtype, DType::kF16);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_NEAR(b[i], a[i], std::abs(a[i]) / 128 + 1e-30) << i;
    ASSERT_NEAR(h[i], a[i], std::abs(a[i]) / 1024 + 6e-8) << i;
  }
}

TEST(DummyCheckpointTest, WantFiltersLikeOpen) {
  const ModelConfig cfg = ConfigOf("models/pydoc-moe-17m");
  auto all = DummyOf(cfg);
  auto experts = DummyOf(cfg, DType::kBF16, 0,
                         [](std::string_view n) { return Contains(n, ".experts."); });
  ASSERT_TRUE(all && experts);
  EXPECT_EQ(experts->Names().size(), 6u * 16 * 3);
  for (const std::string& n : experts->Names()) EXPECT_TRUE(Contains(n, ".experts.")) << n;
  EXPECT_EQ(experts->Find("model.embed_tokens.weight"), nullptr);
  auto missing = experts->Get("model.embed_tokens.weight", {cfg.vocab_size, cfg.hidden_size});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(std::string(missing.status().message()), "not selected")) << missing.status();
  auto bad = all->Get("model.embed_tokens.weight", {cfg.vocab_size, cfg.hidden_size + 1});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(std::string(bad.status().message()), "has shape [8192, 256]")) << bad.status();
}

TEST(DummyCheckpointTest, ConcurrentFindsMakeEachTensorOnce) {
  const ModelConfig cfg = ConfigOf("models/pydoc-moe-17m");
  auto r = DummyOf(cfg);
  const std::vector<std::string> names = r->Names();
  std::vector<std::vector<const TensorInfo*>> seen(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (const std::string& n : names) seen[t].push_back(r->Find(n));
    });
  }
  for (auto& th : threads) th.join();
  for (size_t i = 0; i < names.size(); ++i) {
    ASSERT_NE(seen[0][i], nullptr);
    for (int t = 1; t < 4; ++t) {
      EXPECT_EQ(seen[t][i], seen[0][i]);
      EXPECT_EQ(seen[t][i]->data, seen[0][i]->data);
    }
  }
}

TEST(DummyCheckpointTest, ReleasedValuesAreMadeAgainTheSame) {
  const ModelConfig cfg = ConfigOf("models/pydoc-moe-17m");
  auto r = DummyOf(cfg);
  const std::string up = "model.layers.1.mlp.experts.3.up_proj.weight";
  const std::string other = "model.layers.10.self_attn.q_proj.weight";  // absent: 6 layers
  const TensorInfo* t = r->Find(up);
  const TensorInfo* keep = r->Find("model.layers.2.input_layernorm.weight");
  ASSERT_TRUE(t && keep);
  EXPECT_EQ(r->Find(other), nullptr);
  const std::vector<float> before = ValuesOf(*t);
  r->ReleaseDummyValues("model.layers.1.");
  EXPECT_EQ(t->data, nullptr);        // released
  EXPECT_NE(keep->data, nullptr);     // other layers untouched
  const TensorInfo* again = r->Find(up);
  EXPECT_EQ(again, t);
  ASSERT_NE(again->data, nullptr);
  EXPECT_EQ(ValuesOf(*again), before);
  // File readers: a no-op.
  auto real = CheckpointReader::Open("models/pydoc-moe-17m");
  ASSERT_TRUE(real.ok());
  const TensorInfo* rt = (*real)->Find(up);
  (*real)->ReleaseDummyValues("model.");
  EXPECT_NE(rt->data, nullptr);
}

TEST(DummyCheckpointTest, RejectsEmptyConfig) {
  ModelConfig cfg = ConfigOf("models/pydoc-moe-17m");
  const ArchSpec arch = *ArchFor(cfg);
  cfg.hidden_size = 0;
  auto r = CheckpointReader::OpenDummy(cfg, arch);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(std::string(r.status().message()), "hidden_size")) << r.status();
}

// ------------------------------------------------------------------------------------------
// Model::Load with LoadOptions::load_format = kDummy and num_layers

std::vector<float> LastLogits(const Model& m, const std::vector<int32_t>& prompt) {
  auto cache = m.NewCache(64);
  std::vector<float> logits;
  SeqStep s;
  s.seq_id = 1;
  s.tokens = prompt;
  absl::Status st = m.Step({s}, cache.get(), &logits);
  EXPECT_TRUE(st.ok()) << st;
  return logits;
}

void ExpectFiniteAndSpread(const std::vector<float>& logits, int64_t vocab) {
  ASSERT_EQ(static_cast<int64_t>(logits.size()), vocab);
  float lo = logits[0], hi = logits[0];
  for (float x : logits) {
    ASSERT_TRUE(std::isfinite(x));
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  EXPECT_GT(hi - lo, 1e-3f);  // not constant
  EXPECT_LT(hi - lo, 1e3f);   // activations stayed O(1)
}

// Only config.json is read: the directory holds nothing else.
TEST(DummyModelTest, LoadsFromConfigAloneAndStepsToFiniteLogits) {
  ops::SetNumThreads(2);
  for (const std::string& src : {std::string("models/pydoc-moe-17m"),
                                 std::string("testdata/oracle/qwen2_moe"),
                                 std::string("testdata/oracle/olmoe")}) {
    const std::string dir = ConfigOnlyDir(src, "dummy_" + src.substr(src.rfind('/') + 1));
    for (ComputeType ct : {ComputeType::kF32, ComputeType::kBF16}) {
      LoadOptions opt;
      opt.compute = ct;
      opt.load_format = LoadOptions::LoadFormat::kDummy;
      auto m = Model::Load(dir, opt);
      ASSERT_TRUE(m.ok()) << src << ": " << m.status();
      ExpectFiniteAndSpread(LastLogits(**m, {1, 2, 3, 4, 5}), (*m)->config().vocab_size);
    }
    // The real loader has nothing to read there.
    EXPECT_FALSE(Model::Load(dir, LoadOptions{}).ok());
  }
}

// Dense (mlp_only) layers and a deep stack: 48 layers of dummy weights keep logits O(1).
TEST(DummyModelTest, DenseLayersAndDepth) {
  const std::string dir =
      ConfigOnlyDir("testdata/oracle/qwen3_moe", "dummy_deep", [](nlohmann::json* c) {
        (*c)["num_hidden_layers"] = 48;
        (*c)["mlp_only_layers"] = {0, 47};
      });
  LoadOptions opt;
  opt.load_format = LoadOptions::LoadFormat::kDummy;
  auto m = Model::Load(dir, opt);
  ASSERT_TRUE(m.ok()) << m.status();
  ExpectFiniteAndSpread(LastLogits(**m, {7, 8, 9}), (*m)->config().vocab_size);
}

TEST(DummyModelTest, NumLayers) {
  const std::string dir = "models/pydoc-moe-17m";
  LoadOptions opt;
  opt.num_layers = 2;
  auto real2 = Model::Load(dir, opt);  // also for real checkpoints
  ASSERT_TRUE(real2.ok()) << real2.status();
  EXPECT_EQ((*real2)->config().num_hidden_layers, 2);
  opt.load_format = LoadOptions::LoadFormat::kDummy;
  auto dummy2 = Model::Load(dir, opt);
  ASSERT_TRUE(dummy2.ok()) << dummy2.status();
  EXPECT_EQ((*dummy2)->config().num_hidden_layers, 2);
  ExpectFiniteAndSpread(LastLogits(**dummy2, {3, 4}), 8192);
  opt.num_layers = 6;  // all of them
  EXPECT_TRUE(Model::Load(dir, opt).ok());
  for (int64_t bad : {int64_t{7}, int64_t{-1}}) {
    opt.num_layers = bad;
    auto m = Model::Load(dir, opt);
    ASSERT_FALSE(m.ok()) << bad;
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(Contains(std::string(m.status().message()), "--num_layers must be in [1, 6]")) << m.status();
  }
  // The dummy checkpoint of a truncated config has only those layers.
  ModelConfig cfg = ConfigOf(dir);
  LoadOptions three;
  three.num_layers = 3;
  ASSERT_TRUE(ApplyNumLayers(three, &cfg).ok());
  auto r = DummyOf(cfg);
  EXPECT_NE(r->Find("model.layers.2.input_layernorm.weight"), nullptr);
  EXPECT_EQ(r->Find("model.layers.3.input_layernorm.weight"), nullptr);
}

TEST(DummyModelTest, ParseLoadFormat) {
  EXPECT_EQ(*ParseLoadFormat("auto"), LoadOptions::LoadFormat::kAuto);
  EXPECT_EQ(*ParseLoadFormat("dummy"), LoadOptions::LoadFormat::kDummy);
  auto bad = ParseLoadFormat("safetensors");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(std::string(bad.status().message()), "auto or dummy")) << bad.status();
}

}  // namespace
}  // namespace moemesh
