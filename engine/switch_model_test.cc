// SwitchTransformersModel against Hugging Face transformers' outputs (testdata/oracle/switch).
#include "engine/switch_model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moemesh {
namespace {

const char kDir[] = "testdata/oracle/switch";

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  return nlohmann::json::parse(in);
}

class SwitchModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto m = SwitchTransformersModel::Load(kDir);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = m->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }
  static SwitchTransformersModel* model_;
};
SwitchTransformersModel* SwitchModelTest::model_ = nullptr;

TEST_F(SwitchModelTest, ConfigMatchesCheckpoint) {
  const SwitchConfig& c = model_->config();
  EXPECT_EQ(c.vocab_size, 1000);
  EXPECT_EQ(c.d_model, 64);
  EXPECT_EQ(c.num_experts, 4);
  EXPECT_EQ(c.decoder_start_token_id, 0);
  EXPECT_EQ(c.eos_token_id, 1);
  // Step 2: block 1 of each stack holds the router (tensor_index.json).
  EXPECT_FALSE(c.EncoderBlockSparse(0));
  EXPECT_TRUE(c.EncoderBlockSparse(1));
  EXPECT_FALSE(c.DecoderBlockSparse(0));
  EXPECT_TRUE(c.DecoderBlockSparse(1));
}

TEST_F(SwitchModelTest, LogitsMatchReference) {
  const nlohmann::json ref = ReadJson(std::string(kDir) + "/reference.json");
  ASSERT_FALSE(ref.empty());
  const int64_t vocab = model_->config().vocab_size;
  for (size_t p = 0; p < ref.size(); ++p) {
    const std::vector<int32_t> input_ids = ref[p]["input_ids"];
    const std::vector<int32_t> decoder_ids = ref[p]["decoder_input_ids"];
    const nlohmann::json& want = ref[p]["logits"];
    auto enc = model_->Encode(input_ids);
    ASSERT_TRUE(enc.ok()) << enc.status();
    ASSERT_EQ(enc->size(), input_ids.size() * model_->config().d_model);
    auto logits = model_->DecoderLogits(*enc, input_ids.size(), decoder_ids);
    ASSERT_TRUE(logits.ok()) << logits.status();
    ASSERT_EQ(want.size(), decoder_ids.size());
    ASSERT_EQ(logits->size(), decoder_ids.size() * vocab);
    double max_err = 0;
    for (size_t i = 0; i < decoder_ids.size(); ++i) {
      ASSERT_EQ(static_cast<int64_t>(want[i].size()), vocab);
      double row_err = 0;
      int64_t worst = 0;
      for (int64_t v = 0; v < vocab; ++v) {
        const double err = std::abs((*logits)[i * vocab + v] - want[i][v].get<double>());
        if (err > row_err) row_err = err, worst = v;
      }
      EXPECT_LE(row_err, 1e-4) << "prompt " << p << " position " << i << " vocab " << worst
                               << ": got " << (*logits)[i * vocab + worst] << ", want "
                               << want[i][worst].get<double>();
      max_err = std::max(max_err, row_err);
    }
    std::printf("prompt %zu: %zu decoder positions, max |logit error| %.3g\n", p,
                decoder_ids.size(), max_err);
  }
}

TEST_F(SwitchModelTest, GreedyMatchesReference) {
  const nlohmann::json ref = ReadJson(std::string(kDir) + "/reference.json");
  for (size_t p = 0; p < ref.size(); ++p) {
    const std::vector<int32_t> input_ids = ref[p]["input_ids"];
    const std::vector<int32_t> want = ref[p]["greedy"];
    auto got = model_->Greedy(input_ids, 16);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, want) << "prompt " << p;
  }
}

TEST_F(SwitchModelTest, RejectsBadInputs) {
  const int32_t vocab = static_cast<int32_t>(model_->config().vocab_size);
  auto enc = model_->Encode({5, vocab, 7});
  EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument) << enc.status();
  EXPECT_NE(enc.status().message().find("outside the vocabulary"), std::string::npos);
  EXPECT_EQ(model_->Encode({-1}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model_->Encode({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model_->Greedy({5, vocab}, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model_->Greedy({5}, -1).status().code(), absl::StatusCode::kInvalidArgument);

  auto good = model_->Encode({5, 6});
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(model_->DecoderLogits(*good, 2, {0, vocab}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model_->DecoderLogits(*good, 2, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model_->DecoderLogits(*good, 3, {0}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SwitchConfigTest, RefusesOtherModelTypes) {
  auto c = SwitchConfig::FromFile("testdata/oracle/qwen3_moe/config.json");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_NE(c.status().message().find("qwen3_moe"), std::string::npos) << c.status();
}

// A copy of the oracle's config.json in a fresh directory under TEST_TMPDIR, with `edit` applied.
std::string WriteConfig(const std::string& name, void (*edit)(nlohmann::json*)) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp != nullptr ? tmp : "/tmp") + "/" + name;
  std::string cmd = "mkdir -p '" + dir + "'";
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  nlohmann::json c = ReadJson(std::string(kDir) + "/config.json");
  edit(&c);
  std::ofstream(dir + "/config.json") << c.dump();
  return dir;
}

TEST(SwitchConfigTest, RefusesOtherActivations) {
  const std::string dir =
      WriteConfig("gelu", [](nlohmann::json* c) { (*c)["dense_act_fn"] = "gelu_new"; });
  auto c = SwitchConfig::FromFile(dir + "/config.json");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_NE(c.status().message().find("gelu_new"), std::string::npos) << c.status();
}

TEST(SwitchConfigTest, MissingFieldIsInvalidArgument) {
  const std::string dir = WriteConfig("no_d_model", [](nlohmann::json* c) { c->erase("d_model"); });
  auto c = SwitchConfig::FromFile(dir + "/config.json");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_NE(c.status().message().find("d_model"), std::string::npos) << c.status();
}

TEST(SwitchConfigTest, MissingFilesAreNotFound) {
  // config.json alone: no model.safetensors.
  const std::string dir = WriteConfig("config_only", [](nlohmann::json*) {});
  EXPECT_EQ(SwitchTransformersModel::Load(dir).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(SwitchConfig::FromFile("testdata/oracle/no_such_dir/config.json").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(SwitchTransformersModel::Load("testdata/oracle/no_such_dir").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(SwitchConfigTest, MissingTensorIsNotFound) {
  // Three encoder layers, but the checkpoint has two: encoder.block.2 is missing.
  const std::string dir = WriteConfig("three_layers", [](nlohmann::json* c) { (*c)["num_layers"] = 3; });
  char cwd[4096];
  ASSERT_NE(getcwd(cwd, sizeof(cwd)), nullptr);
  const std::string src = std::string(cwd) + "/" + kDir + "/model.safetensors";
  const std::string cmd = "ln -sf '" + src + "' '" + dir + "/model.safetensors'";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  auto m = SwitchTransformersModel::Load(dir);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound) << m.status();
  EXPECT_NE(m.status().message().find("encoder.block.2."), std::string::npos) << m.status();
}

}  // namespace
}  // namespace moemesh
