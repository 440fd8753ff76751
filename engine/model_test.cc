// The engine against Hugging Face transformers' outputs (testdata/oracle, models/pydoc-moe-17m).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <tuple>
#include <vector>

#include "engine/argmax.h"
#include "engine/generate.h"
#include "engine/model.h"
#include "engine/ops/threading.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moemesh {
namespace {

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  return nlohmann::json::parse(in);
}

// Every test runs on each device: "cpu" always; "cuda:0" reports itself skipped in a binary
// built without --config=cuda or on a machine without a GPU.
LoadOptions OnDevice(const std::string& device) {
  LoadOptions o;
  o.device = *ParseDevice(device);
  return o;
}

// Options of a reference run: `tokens` greedy tokens, with the prompt's logits.
GenerateOptions GreedyRun(size_t tokens) {
  GenerateOptions opt;
  opt.max_new_tokens = static_cast<int64_t>(tokens);
  opt.prompt_logits = true;
  return opt;
}

#define SKIP_WITHOUT_DEVICE(device)                                   \
  do {                                                                \
    auto _d = DescribeDevice(*ParseDevice(device));                   \
    if (!_d.ok()) GTEST_SKIP() << device << ": " << _d.status();      \
  } while (0)

class OracleTest : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

// fp32: logits within 1e-4 at every prompt position; 16 greedy ids through the KV cache identical.
TEST_P(OracleTest, LogitsAndGreedyMatchTransformers) {
  const auto& [family, device] = GetParam();
  SKIP_WITHOUT_DEVICE(device);
  const std::string dir = "testdata/oracle/" + family;
  ops::SetNumThreads(2);
  auto model = Model::Load(dir, OnDevice(device));
  ASSERT_TRUE(model.ok()) << model.status();
  const int64_t vocab = (*model)->config().vocab_size;
  nlohmann::json ref = ReadJson(dir + "/reference.json");
  ASSERT_FALSE(ref.empty());
  for (const auto& c : ref) {
    const std::vector<int32_t> prompt = c["input_ids"].get<std::vector<int32_t>>();
    const std::vector<int32_t> greedy = c["greedy"].get<std::vector<int32_t>>();
    const GenerateOptions opt = GreedyRun(greedy.size());
    auto r = Generate(**model, prompt, opt);
    ASSERT_TRUE(r.ok()) << r.status();
    const auto& rows = c["logits"];
    ASSERT_EQ(rows.size(), prompt.size());
    double max_err = 0;
    for (size_t p = 0; p < prompt.size(); ++p) {
      ASSERT_EQ(static_cast<int64_t>(rows[p].size()), vocab);
      for (int64_t v = 0; v < vocab; ++v) {
        max_err = std::max(max_err, std::abs(rows[p][v].get<double>() - r->prompt_logits[p * vocab + v]));
      }
    }
    EXPECT_LT(max_err, 1e-4) << family << " on " << device << ", prompt of " << prompt.size()
                             << " tokens";
    EXPECT_EQ(r->ids, greedy) << family << " on " << device;
  }
}

std::string ParamName(const std::string& device) {
  return device == "cpu" ? "cpu" : "cuda";
}

INSTANTIATE_TEST_SUITE_P(Families, OracleTest,
                         ::testing::Combine(::testing::Values("qwen3_moe", "qwen2_moe", "mixtral",
                                                              "olmoe"),
                                            ::testing::Values("cpu", "cuda:0")),
                         [](const auto& info) {
                           return std::get<0>(info.param) + "_" +
                                  ParamName(std::get<1>(info.param));
                         });

class PydocModelTest : public ::testing::TestWithParam<std::string> {};

// The embedded model: 40 greedy tokens for each of six prompts, fp32 compute over bf16 weights.
TEST_P(PydocModelTest, GreedyMatchesTransformers) {
  const std::string device = GetParam();
  SKIP_WITHOUT_DEVICE(device);
  const std::string dir = "models/pydoc-moe-17m";
  ops::SetNumThreads(2);
  auto model = Model::Load(dir, OnDevice(device));
  ASSERT_TRUE(model.ok()) << model.status();
  const int64_t vocab = (*model)->config().vocab_size;
  nlohmann::json ref = ReadJson(dir + "/reference.json");
  ASSERT_EQ(ref["prompts"].size(), 6u);
  for (const auto& c : ref["prompts"]) {
    const std::vector<int32_t> prompt = c["input_ids"].get<std::vector<int32_t>>();
    const std::vector<int32_t> greedy = c["greedy"].get<std::vector<int32_t>>();
    const GenerateOptions opt = GreedyRun(greedy.size());
    auto r = Generate(**model, prompt, opt);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->ids, greedy) << c["prompt"] << " on " << device;
    const auto& last = c["last_logits"];
    ASSERT_EQ(static_cast<int64_t>(last.size()), vocab);
    const float* ours = r->prompt_logits.data() + (prompt.size() - 1) * vocab;
    double max_err = 0;
    for (int64_t v = 0; v < vocab; ++v) max_err = std::max(max_err, std::abs(last[v].get<double>() - ours[v]));
    // Trained weights with logits of magnitude ~12: agreement to ~1e-4 relative (the issue's
    // bar for this model is identical greedy ids, checked above).
    EXPECT_LT(max_err, 2e-3) << c["prompt"];
  }
}

// Fewer or more active experts than trained changes the output (the override is really applied).
TEST_P(PydocModelTest, ExpertsPerTokenOverrideChangesLogits) {
  const std::string device = GetParam();
  SKIP_WITHOUT_DEVICE(device);
  auto model = Model::Load("models/pydoc-moe-17m", OnDevice(device));
  ASSERT_TRUE(model.ok()) << model.status();
  std::vector<int32_t> prompt = {16, 201, 496, 21, 17};
  GenerateOptions opt;
  opt.max_new_tokens = 1;
  opt.prompt_logits = true;
  auto base = Generate(**model, prompt, opt);
  opt.experts_per_token = 1;
  auto one = Generate(**model, prompt, opt);
  opt.experts_per_token = 16;
  auto all = Generate(**model, prompt, opt);
  ASSERT_TRUE(base.ok() && one.ok() && all.ok());
  EXPECT_NE(base->prompt_logits, one->prompt_logits);
  EXPECT_NE(base->prompt_logits, all->prompt_logits);
  opt.experts_per_token = 17;
  auto too_many = Generate(**model, prompt, opt);
  EXPECT_EQ(too_many.status().code(), absl::StatusCode::kInvalidArgument);
}

// StepArgMax gives each logits row's argmax (the CUDA stack takes it on the GPU): a batch with
// a prompt-scoring entry (a row per token) and a plain one, then a decode step of both.
TEST_P(PydocModelTest, StepArgMaxIsTheArgMaxOfEveryLogitsRow) {
  const std::string device = GetParam();
  SKIP_WITHOUT_DEVICE(device);
  auto model = Model::Load("models/pydoc-moe-17m", OnDevice(device));
  ASSERT_TRUE(model.ok()) << model.status();
  const int64_t V = (*model)->config().vocab_size;
  auto with_logits = (*model)->NewCache(64), with_ids = (*model)->NewCache(64);
  std::vector<SeqStep> batch(2);
  batch[0].seq_id = 1;
  batch[0].tokens = {16, 201, 496, 21, 17};
  batch[0].all_logits = true;
  batch[1].seq_id = 2;
  batch[1].tokens = {300, 12, 7};
  for (int step = 0; step < 3; ++step) {
    std::vector<float> logits;
    std::vector<int32_t> ids;
    ASSERT_TRUE((*model)->Step(batch, with_logits.get(), &logits).ok());
    ASSERT_TRUE((*model)->StepArgMax(batch, with_ids.get(), &ids).ok());
    const size_t rows = step == 0 ? 6 : 2;
    ASSERT_EQ(logits.size(), rows * V);
    ASSERT_EQ(ids.size(), rows) << "step " << step;
    for (size_t r = 0; r < rows; ++r) {
      EXPECT_EQ(ids[r], ArgMax(&logits[r * V], V)) << "step " << step << " row " << r;
    }
    // Next: each entry's greedy token, decoded plainly.
    for (size_t b = 0; b < 2; ++b) {
      batch[b].start_pos += static_cast<int64_t>(batch[b].tokens.size());
      batch[b].tokens = {ids[b == 0 ? rows - 2 : rows - 1]};
      batch[b].all_logits = false;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, PydocModelTest, ::testing::Values("cpu", "cuda:0"),
                         [](const auto& info) { return ParamName(info.param); });

// Writes a copy of `src` (a checkpoint dir with model.safetensors) to `dst` with
// attention_bias = true in its config and fp32 biases for every layer's q/k/v/o projections:
// zero, except o_proj.bias of layer 0, which is `o_bias0` everywhere.
void WriteWithAttentionBiases(const std::string& src, const std::string& dst, float o_bias0) {
  ASSERT_EQ(system(("mkdir -p " + dst).c_str()), 0);
  nlohmann::json cfg = ReadJson(src + "/config.json");
  cfg["attention_bias"] = true;
  std::ofstream(dst + "/config.json") << cfg.dump();
  std::ifstream in(src + "/model.safetensors", std::ios::binary);
  uint64_t hlen = 0;
  in.read(reinterpret_cast<char*>(&hlen), 8);
  std::string header(hlen, '\0');
  in.read(header.data(), static_cast<std::streamsize>(hlen));
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  nlohmann::json h = nlohmann::json::parse(header);
  const int64_t H = cfg["hidden_size"];
  const int64_t D = cfg.value("head_dim", nlohmann::json()).is_number()
                        ? cfg["head_dim"].get<int64_t>()
                        : H / cfg["num_attention_heads"].get<int64_t>();
  const int64_t qd = cfg["num_attention_heads"].get<int64_t>() * D;
  const int64_t kvd = cfg["num_key_value_heads"].get<int64_t>() * D;
  for (int64_t l = 0; l < cfg["num_hidden_layers"].get<int64_t>(); ++l) {
    for (const auto& [proj, n] : std::vector<std::pair<std::string, int64_t>>{
             {"q_proj", qd}, {"k_proj", kvd}, {"v_proj", kvd}, {"o_proj", H}}) {
      std::vector<float> b(n, l == 0 && proj == "o_proj" ? o_bias0 : 0.0f);
      const size_t begin = data.size();
      data.append(reinterpret_cast<const char*>(b.data()), b.size() * sizeof(float));
      h["model.layers." + std::to_string(l) + ".self_attn." + proj + ".bias"] = {
          {"dtype", "F32"}, {"shape", {n}}, {"data_offsets", {begin, data.size()}}};
    }
  }
  std::string out_header = h.dump();
  uint64_t out_len = out_header.size();
  std::ofstream out(dst + "/model.safetensors", std::ios::binary);
  out.write(reinterpret_cast<const char*>(&out_len), 8);
  out << out_header << data;
}

// attention_bias = true (Qwen3-MoE and OLMoE put biases on q, k, v AND o): zero biases give the
// oracle's logits, and a bias on o_proj alone changes them (it is loaded and applied).
class AttentionBiasTest : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(AttentionBiasTest, OProjBiasIsApplied) {
  const auto& [family, device] = GetParam();
  SKIP_WITHOUT_DEVICE(device);
  const std::string src = "testdata/oracle/" + family;
  const std::string zero = ::testing::TempDir() + "/bias_zero_" + family;
  const std::string nonzero = ::testing::TempDir() + "/bias_o_" + family;
  WriteWithAttentionBiases(src, zero, 0.0f);
  WriteWithAttentionBiases(src, nonzero, 0.25f);
  std::vector<int32_t> prompt = ReadJson(src + "/reference.json")[0]["input_ids"];
  GenerateOptions opt;
  opt.max_new_tokens = 1;
  opt.prompt_logits = true;
  std::vector<std::vector<float>> logits;
  for (const std::string& dir : {src, zero, nonzero}) {
    auto model = Model::Load(dir, OnDevice(device));
    ASSERT_TRUE(model.ok()) << dir << ": " << model.status();
    auto r = Generate(**model, prompt, opt);
    ASSERT_TRUE(r.ok()) << r.status();
    logits.push_back(r->prompt_logits);
  }
  ASSERT_EQ(logits[0].size(), logits[1].size());
  double zero_diff = 0, o_diff = 0;
  for (size_t i = 0; i < logits[0].size(); ++i) {
    zero_diff = std::max(zero_diff, static_cast<double>(std::abs(logits[0][i] - logits[1][i])));
    o_diff = std::max(o_diff, static_cast<double>(std::abs(logits[0][i] - logits[2][i])));
  }
  EXPECT_LT(zero_diff, 1e-5);
  EXPECT_GT(o_diff, 1e-2);
}

INSTANTIATE_TEST_SUITE_P(Families, AttentionBiasTest,
                         ::testing::Combine(::testing::Values("qwen3_moe", "olmoe"),
                                            ::testing::Values("cpu", "cuda:0")),
                         [](const auto& info) {
                           return std::get<0>(info.param) + "_" +
                                  ParamName(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace moemesh

namespace moemesh {
namespace {

// A checkpoint of a family the engine does not run is refused by name, not misread.
TEST(ModelLoadTest, UnsupportedModelTypeIsAClearError) {
  const std::string dir = ::testing::TempDir() + "/llama_ckpt";
  ASSERT_EQ(system(("mkdir -p " + dir).c_str()), 0);
  std::ifstream in("testdata/oracle/mixtral/config.json");
  nlohmann::json cfg = nlohmann::json::parse(in);
  cfg["model_type"] = "llama";
  std::ofstream(dir + "/config.json") << cfg.dump();
  std::ifstream src("testdata/oracle/mixtral/model.safetensors", std::ios::binary);
  std::ofstream(dir + "/model.safetensors", std::ios::binary) << src.rdbuf();
  auto model = Model::Load(dir, LoadOptions{});
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(model.status().message().find("unsupported model_type 'llama'"), std::string::npos)
      << model.status();
  EXPECT_NE(model.status().message().find(dir), std::string::npos) << model.status();
}

}  // namespace
}  // namespace moemesh

namespace moemesh {
namespace {

// Experts big enough for ExpertShard::RunExperts to run them on separate threads (dummy
// weights, 6 MiB per expert) give the same logits, bit for bit, as one thread: a 3-token prefill
// (at most 3 rows per expert: on separate threads), an 8-token one (up to 8 rows: Linear's own
// split) and decode (one row).
TEST(ExpertThreadsTest, SameResultsAsOneThread) {
  const std::string dir = ::testing::TempDir() + "/wide_experts";
  ASSERT_EQ(system(("mkdir -p " + dir).c_str()), 0);
  std::ifstream in("testdata/oracle/qwen3_moe/config.json");
  nlohmann::json cfg = nlohmann::json::parse(in);
  cfg["hidden_size"] = 1024;
  cfg["moe_intermediate_size"] = 1024;
  cfg["num_experts_per_tok"] = 4;
  cfg["dtype"] = "bfloat16";
  std::ofstream(dir + "/config.json") << cfg.dump();
  for (ComputeType ct : {ComputeType::kBF16, ComputeType::kF32}) {
    LoadOptions opt;
    opt.compute = ct;
    opt.load_format = LoadOptions::LoadFormat::kDummy;
    auto model = Model::Load(dir, opt);
    ASSERT_TRUE(model.ok()) << model.status();
    for (const std::vector<int32_t>& prompt :
         {std::vector<int32_t>{5, 17, 300}, std::vector<int32_t>{5, 17, 300, 42, 9, 77, 123, 8}}) {
      GenerateOptions g;
      g.max_new_tokens = 4;
      g.prompt_logits = true;
      ops::SetNumThreads(1);
      auto one = Generate(**model, prompt, g);
      ops::SetNumThreads(2);
      auto two = Generate(**model, prompt, g);
      ASSERT_TRUE(one.ok() && two.ok());
      EXPECT_EQ(one->prompt_logits, two->prompt_logits);
      EXPECT_EQ(one->ids, two->ids);
    }
  }
}

// A bf16 KV cache (--kv_cache_dtype=bf16) on the embedded model: the logits move (the bf16 path
// really runs) but stay within 2e-2 of the fp32 cache's, and the greedy ids of all six reference
// prompts are still transformers'.
TEST(KvCacheDTypeTest, Bf16CacheStaysCloseAndKeepsTheGreedyIds) {
  const std::string dir = "models/pydoc-moe-17m";
  ops::SetNumThreads(2);
  LoadOptions f32, b16;
  b16.kv_dtype = KvDType::kBF16;
  auto exact = Model::Load(dir, f32);
  auto half = Model::Load(dir, b16);
  ASSERT_TRUE(exact.ok() && half.ok());
  nlohmann::json ref = ReadJson(dir + "/reference.json");
  double max_diff = 0;
  for (const auto& c : ref["prompts"]) {
    const std::vector<int32_t> prompt = c["input_ids"].get<std::vector<int32_t>>();
    const std::vector<int32_t> greedy = c["greedy"].get<std::vector<int32_t>>();
    const GenerateOptions opt = GreedyRun(greedy.size());
    auto a = Generate(**exact, prompt, opt);
    auto b = Generate(**half, prompt, opt);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(b->ids, greedy) << c["prompt"];
    ASSERT_EQ(a->prompt_logits.size(), b->prompt_logits.size());
    for (size_t i = 0; i < a->prompt_logits.size(); ++i) {
      max_diff = std::max(max_diff, std::abs(static_cast<double>(a->prompt_logits[i]) -
                                             b->prompt_logits[i]));
    }
  }
  EXPECT_GT(max_diff, 0.0);
  EXPECT_LT(max_diff, 2e-2);
  auto cache = (*half)->NewCache(64);
  EXPECT_EQ(cache->dtype(), KvDType::kBF16);
}

// A bf16 KV cache on the GPU rounds the rows as the CPU's does: over the oracle families'
// reference prompts, the prompt logits of a cuda:0 model with a bf16 cache stay within 1e-4 of
// the CPU's with a bf16 cache (the attention sums in another order), differ from the GPU's with
// an fp32 cache (the bf16 path ran) and the greedy ids through the cache are the CPU's.
TEST(KvCacheDTypeTest, Bf16CacheOnTheGpuIsTheCpusBf16Cache) {
  SKIP_WITHOUT_DEVICE("cuda:0");
  ops::SetNumThreads(2);
  for (const std::string family : {"qwen3_moe", "mixtral"}) {
    const std::string dir = "testdata/oracle/" + family;
    LoadOptions cpu16, gpu16 = OnDevice("cuda:0"), gpu32 = OnDevice("cuda:0");
    cpu16.kv_dtype = gpu16.kv_dtype = KvDType::kBF16;
    auto a = Model::Load(dir, cpu16), b = Model::Load(dir, gpu16), c = Model::Load(dir, gpu32);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok()) << b.status();
    EXPECT_EQ((*b)->NewCache(64)->dtype(), KvDType::kBF16);
    nlohmann::json ref = ReadJson(dir + "/reference.json");
    double to_cpu16 = 0, to_gpu32 = 0;
    for (const auto& p : ref.is_array() ? ref : ref["prompts"]) {
      const std::vector<int32_t> prompt = p["input_ids"].get<std::vector<int32_t>>();
      const GenerateOptions opt = GreedyRun(8);
      auto ra = Generate(**a, prompt, opt), rb = Generate(**b, prompt, opt),
           rc = Generate(**c, prompt, opt);
      ASSERT_TRUE(ra.ok() && rb.ok() && rc.ok()) << rb.status();
      EXPECT_EQ(rb->ids, ra->ids) << family;
      ASSERT_EQ(rb->prompt_logits.size(), ra->prompt_logits.size());
      for (size_t i = 0; i < rb->prompt_logits.size(); ++i) {
        to_cpu16 = std::max(to_cpu16, std::abs(double(rb->prompt_logits[i]) - ra->prompt_logits[i]));
        to_gpu32 = std::max(to_gpu32, std::abs(double(rb->prompt_logits[i]) - rc->prompt_logits[i]));
      }
    }
    std::printf("bf16 KV cache on cuda:0, %s: max |logit - cpu bf16 cache| %.2e, - cuda fp32 "
                "cache %.2e\n", family.c_str(), to_cpu16, to_gpu32);
    EXPECT_LT(to_cpu16, 1e-4) << family;
    EXPECT_GT(to_gpu32, to_cpu16) << family;
  }
  LoadOptions int8 = OnDevice("cuda:0");
  int8.kv_dtype = KvDType::kInt8;
  EXPECT_EQ(Model::Load("testdata/oracle/qwen3_moe", int8).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// How often a model's argmax is transformers': over an oracle family's reference prompts (with
// the largest |logit error| there), and teacher-forced on the embedded model (each reference
// prompt followed by transformers' 40 greedy tokens in one pass; each of those 6 x 40 positions
// agrees when its argmax is transformers' next token: a greedy run would diverge for good at its
// first near-tie).
struct ArgmaxAgreement {
  int positions = 0, agree = 0;
  double max_err = 0;
};

ArgmaxAgreement OracleArgmax(const Model& model, const std::string& dir) {
  const int64_t vocab = model.config().vocab_size;
  ArgmaxAgreement a;
  const nlohmann::json ref = ReadJson(dir + "/reference.json");
  for (const auto& c : ref) {
    const std::vector<int32_t> prompt = c["input_ids"].get<std::vector<int32_t>>();
    auto r = Generate(model, prompt, GreedyRun(1));
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return a;
    for (size_t p = 0; p < prompt.size(); ++p) {
      const std::vector<float> want = c["logits"][p].get<std::vector<float>>();
      const float* got = r->prompt_logits.data() + p * vocab;
      for (int64_t v = 0; v < vocab; ++v) {
        a.max_err = std::max(a.max_err, std::abs(static_cast<double>(want[v]) - got[v]));
      }
      ++a.positions;
      a.agree += std::max_element(want.begin(), want.end()) - want.begin() ==
                 std::max_element(got, got + vocab) - got;
    }
  }
  return a;
}

ArgmaxAgreement TeacherForcedArgmax(const Model& model) {
  const int64_t vocab = model.config().vocab_size;
  ArgmaxAgreement a;
  const nlohmann::json ref = ReadJson("models/pydoc-moe-17m/reference.json");
  for (const auto& c : ref["prompts"]) {
    std::vector<int32_t> seq = c["input_ids"].get<std::vector<int32_t>>();
    const size_t n_prompt = seq.size();
    const std::vector<int32_t> greedy = c["greedy"].get<std::vector<int32_t>>();
    seq.insert(seq.end(), greedy.begin(), greedy.end());
    auto r = Generate(model, seq, GreedyRun(1));
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return a;
    for (size_t p = n_prompt - 1; p + 1 < seq.size(); ++p) {
      const float* row = r->prompt_logits.data() + p * vocab;
      ++a.positions;
      a.agree += std::max_element(row, row + vocab) - row == seq[p + 1];
    }
  }
  return a;
}

// An int8 KV cache (--kv_cache_dtype=int8): a row of head_dim values in steps of 1/127 of its
// largest moves the logits ~30x more than bf16 (0.32 at most on the embedded model's prompts),
// enough to tip a greedy run at a near-tie, so the argmax is compared: at almost every position
// of the oracle prompts it is transformers', and teacher-forced on the embedded model
// (measured: 39, 39, 40, 39 of 40; 239 of 240).
TEST(KvCacheDTypeTest, Int8CacheKeepsTransformersArgmax) {
  ops::SetNumThreads(2);
  LoadOptions q;
  q.kv_dtype = KvDType::kInt8;
  for (const std::string family : {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe"}) {
    auto model = Model::Load("testdata/oracle/" + family, q);
    ASSERT_TRUE(model.ok()) << model.status();
    EXPECT_EQ((*model)->NewCache(64)->dtype(), KvDType::kInt8);
    const ArgmaxAgreement a = OracleArgmax(**model, "testdata/oracle/" + family);
    std::printf("int8 KV cache, %s: argmax agrees at %d of %d positions, max |logit error| "
                "%.4f\n", family.c_str(), a.agree, a.positions, a.max_err);
    EXPECT_GT(a.max_err, 1e-4) << family;  // the int8 path ran
    EXPECT_GE(a.agree, a.positions * 95 / 100) << family;
  }
  auto model = Model::Load("models/pydoc-moe-17m", q);
  ASSERT_TRUE(model.ok()) << model.status();
  const ArgmaxAgreement a = TeacherForcedArgmax(**model);
  std::printf("int8 KV cache, embedded model: argmax is transformers' greedy token at %d of %d "
              "teacher-forced positions\n", a.agree, a.positions);
  EXPECT_EQ(a.positions, 6 * 40);
  EXPECT_GE(a.agree, a.positions * 97 / 100);
}

// int8 and int4 experts (--quantize_experts) against transformers' fp32 outputs. Quantisation moves
// the logits, so the oracle's 1e-4 does not apply (the oracle README: compare the argmax and
// report the error): the argmax must agree with transformers' at almost every position, and the
// logits must have moved (the int8 kernels really ran). Greedy runs are not compared token for
// token: the embedded model's third reference prompt starts at a near-tie (transformers' top two
// logits 5.9915 / 5.9835) that int8 experts tip the other way.
// Parameters: the quantisation, and whether the attention stack's matrices (--quantize_attention)
// are quantised too, not only the experts (--quantize_experts).
class QuantisedExpertsTest
    : public ::testing::TestWithParam<std::tuple<LoadOptions::WeightQuant, bool>> {};

TEST_P(QuantisedExpertsTest, ArgmaxAgreesWithTransformers) {
  ops::SetNumThreads(2);
  const auto [quant, attention_too] = GetParam();
  LoadOptions q;
  q.expert_quant = quant;
  if (attention_too) q.attention_quant = quant;
  const std::string name = std::string(ComputeTypeName(q.expert_compute())) +
                           (attention_too ? " experts and attention" : " experts");
  const bool int8 = quant == LoadOptions::WeightQuant::kInt8;
  // Argmax agreement required, in percent of the oracle positions and of the embedded model's
  // teacher-forced positions. Measured, experts only: int8 39, 39, 39, 40 of 40 and 239 of 240;
  // int4 (steps of 1/7 of a group's largest weight, ~10x int8's logit error on these
  // random-weight oracles) 36, 39, 34, 39 and 235. With the attention stack too: int8 39, 38, 39, 39 and
  // 239; int4 25, 27, 25, 29 of 40 (these checkpoints' weights are uniform noise scaled x3: 4-bit
  // attention moves their logits by up to 1.0) but 233 of 240 on the trained embedded model.
  const int min_agree = int8 ? 95 : attention_too ? 55 : 80;
  const int min_forced = int8 ? 97 : 95;
  for (const std::string family : {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe"}) {
    auto model = Model::Load("testdata/oracle/" + family, q);
    ASSERT_TRUE(model.ok()) << model.status();
    const ArgmaxAgreement a = OracleArgmax(**model, "testdata/oracle/" + family);
    std::printf("%s, %s: argmax agrees at %d of %d positions, max |logit error| %.4f\n",
                name.c_str(), family.c_str(), a.agree, a.positions, a.max_err);
    EXPECT_GT(a.max_err, 1e-4) << family;
    EXPECT_GE(a.agree, a.positions * min_agree / 100) << family;
  }
  auto model = Model::Load("models/pydoc-moe-17m", q);
  ASSERT_TRUE(model.ok()) << model.status();
  const ArgmaxAgreement a = TeacherForcedArgmax(**model);
  std::printf("%s, embedded model: argmax is transformers' greedy token at %d of %d "
              "teacher-forced positions\n", name.c_str(), a.agree, a.positions);
  EXPECT_EQ(a.positions, 6 * 40);
  EXPECT_GE(a.agree, a.positions * min_forced / 100);
}

TEST(WeightQuantTest, ParseWeightQuant) {
  EXPECT_EQ(*ParseWeightQuant("none", "--quantize_experts"), LoadOptions::WeightQuant::kNone);
  EXPECT_EQ(*ParseWeightQuant("int8", "--quantize_experts"), LoadOptions::WeightQuant::kInt8);
  EXPECT_EQ(*ParseWeightQuant("int4", "--quantize_experts"), LoadOptions::WeightQuant::kInt4);
  auto bad = ParseWeightQuant("fp8", "--quantize_experts");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("--quantize_experts"), std::string::npos) << bad.status();
  // Only the routed experts change: the rest keeps `compute`.
  LoadOptions o{ComputeType::kBF16};
  EXPECT_EQ(o.expert_compute(), ComputeType::kBF16);
  o.expert_quant = LoadOptions::WeightQuant::kInt4;
  EXPECT_EQ(o.expert_compute(), ComputeType::kInt4);
  EXPECT_EQ(o.compute, ComputeType::kBF16);
}

INSTANTIATE_TEST_SUITE_P(Types, QuantisedExpertsTest,
                         ::testing::Combine(::testing::Values(LoadOptions::WeightQuant::kInt8,
                                                              LoadOptions::WeightQuant::kInt4),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) ==
                                                      LoadOptions::WeightQuant::kInt8
                                                  ? "int8"
                                                  : "int4") +
                                  (std::get<1>(info.param) ? "_all" : "_experts");
                         });


}  // namespace
}  // namespace moemesh
