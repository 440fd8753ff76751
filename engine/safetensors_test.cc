#include "engine/safetensors.h"

#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "engine/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include <nlohmann/json.hpp>

namespace moemesh {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

// (Debian's Abseil is built with its own absl::string_view, so use std helpers.)
bool StartsWith(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool EndsWith(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}
bool Contains(std::string_view s, std::string_view p) { return s.find(p) != s.npos; }

const char* const kFamilies[] = {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe"};

std::string OracleDir(const std::string& family) { return "testdata/oracle/" + family; }

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  ASSERT_TRUE(out.good()) << path;
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// A fresh directory under the test temp dir.
std::string MakeTempDir() {
  std::string tmpl = testing::TempDir();
  if (tmpl.empty() || tmpl.back() != '/') tmpl += '/';
  tmpl += "safetensors_test_XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  char* d = mkdtemp(buf.data());
  EXPECT_NE(d, nullptr);
  return d ? std::string(d) : std::string("/tmp");
}

std::string U64LE(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A minimal safetensors writer: header JSON padded with spaces to a multiple of 8, then the
// data of each tensor back to back, in the order given.
struct RawTensor {
  std::string name;
  std::string dtype;  // safetensors spelling
  std::vector<int64_t> shape;
  std::string bytes;
};

std::string SerializeSafetensors(const std::vector<RawTensor>& tensors) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  size_t off = 0;
  for (const RawTensor& t : tensors) {
    header[t.name] = {
        {"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h += ' ';
  std::string out = U64LE(h.size()) + h;
  for (const RawTensor& t : tensors) out += t.bytes;
  return out;
}

RawTensor FromInfo(const TensorInfo& t) {
  return RawTensor{t.name, std::string(DTypeName(t.dtype)), t.shape,
                   std::string(static_cast<const char*>(t.data), t.nbytes)};
}

// ---------------------------------------------------------------------------------------------
// Real checkpoints.

TEST(SafetensorsFileTest, OracleCheckpointsMatchTensorIndex) {
  for (const char* family : kFamilies) {
    SCOPED_TRACE(family);
    json index = json::parse(ReadFileOrDie(OracleDir(family) + "/tensor_index.json"));
    auto f = SafetensorsFile::Open(OracleDir(family) + "/model.safetensors");
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ((*f)->tensors().size(), index.size());
    for (auto it = index.begin(); it != index.end(); ++it) {
      const TensorInfo* t = (*f)->Find(it.key());
      ASSERT_NE(t, nullptr) << it.key();
      EXPECT_EQ(t->name, it.key());
      EXPECT_EQ(t->shape, it.value()[0].get<std::vector<int64_t>>()) << it.key();
      EXPECT_EQ(DTypeName(t->dtype), it.value()[1].get<std::string>()) << it.key();
      EXPECT_EQ(static_cast<int64_t>(t->nbytes), t->numel() * 4) << it.key();
      EXPECT_NE(t->data, nullptr);
      EXPECT_EQ(t->file, OracleDir(family) + "/model.safetensors");
    }
    // Every tensor in the file is listed in the index.
    for (const TensorInfo& t : (*f)->tensors()) EXPECT_TRUE(index.contains(t.name)) << t.name;

    // The same through CheckpointReader, with exact shapes via Get.
    auto r = CheckpointReader::Open(OracleDir(family));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_FALSE((*r)->sharded());
    EXPECT_EQ((*r)->num_open_files(), 1u);
    EXPECT_EQ((*r)->Names().size(), index.size());
    for (auto it = index.begin(); it != index.end(); ++it) {
      auto t = (*r)->Get(it.key(), it.value()[0].get<std::vector<int64_t>>());
      EXPECT_TRUE(t.ok()) << t.status();
    }
  }
}

TEST(SafetensorsFileTest, OracleValuesAreFinite) {
  for (const char* family : kFamilies) {
    SCOPED_TRACE(family);
    auto f = SafetensorsFile::Open(OracleDir(family) + "/model.safetensors");
    ASSERT_TRUE(f.ok()) << f.status();
    for (const TensorInfo& t : (*f)->tensors()) {
      std::vector<float> v(t.numel());
      ToF32(t.data, t.dtype, v.size(), v.data());
      for (float x : v) ASSERT_TRUE(std::isfinite(x)) << t.name;
    }
  }
}

TEST(SafetensorsFileTest, PydocBf16Model) {
  auto r = CheckpointReader::Open("models/pydoc-moe-17m");
  ASSERT_TRUE(r.ok()) << r.status();
  auto emb = (*r)->Get("model.embed_tokens.weight", {8192, 256});
  ASSERT_TRUE(emb.ok()) << emb.status();
  EXPECT_EQ((*emb)->dtype, DType::kBF16);
  EXPECT_EQ((*emb)->nbytes, 8192u * 256u * 2u);
  std::vector<float> first(1024);
  ToF32((*emb)->data, DType::kBF16, first.size(), first.data());
  bool any_nonzero = false;
  for (float x : first) {
    EXPECT_TRUE(std::isfinite(x));
    any_nonzero |= (x != 0.0f);
  }
  EXPECT_TRUE(any_nonzero);
  // Tied embeddings: no separate lm_head.
  EXPECT_EQ((*r)->Find("lm_head.weight"), nullptr);
  // Every tensor is bf16; 6 layers x 16 experts x 3 matrices are present.
  int experts = 0;
  for (const std::string& name : (*r)->Names()) {
    EXPECT_EQ((*r)->Find(name)->dtype, DType::kBF16) << name;
    if (Contains(name, ".mlp.experts.")) ++experts;
  }
  EXPECT_EQ(experts, 6 * 16 * 3);
  auto gate = (*r)->Get("model.layers.5.mlp.experts.15.gate_proj.weight", {192, 256});
  EXPECT_TRUE(gate.ok()) << gate.status();
}

// ---------------------------------------------------------------------------------------------
// Sharded checkpoints.

class ShardedTest : public testing::Test {
 protected:
  static constexpr const char* kShardA = "model-00001-of-00002.safetensors";
  static constexpr const char* kShardB = "model-00002-of-00002.safetensors";

  void SetUp() override {
    auto f = SafetensorsFile::Open(OracleDir("qwen3_moe") + "/model.safetensors");
    ASSERT_TRUE(f.ok()) << f.status();
    original_ = *std::move(f);
    dir_ = MakeTempDir();
    // Shard A: globals and layer 0; shard B: layer 1. Write tensors in reverse name order so
    // that the byte layout differs from the original.
    std::vector<RawTensor> a, b;
    json weight_map = json::object();
    const auto& ts = original_->tensors();
    for (auto it = ts.rbegin(); it != ts.rend(); ++it) {
      bool layer1 = StartsWith(it->name, "model.layers.1.");
      (layer1 ? b : a).push_back(FromInfo(*it));
      weight_map[it->name] = layer1 ? kShardB : kShardA;
    }
    WriteFile(dir_ + "/" + kShardA, SerializeSafetensors(a));
    WriteFile(dir_ + "/" + kShardB, SerializeSafetensors(b));
    json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
    WriteFile(dir_ + "/model.safetensors.index.json", index.dump(2));
  }

  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::unique_ptr<SafetensorsFile> original_;
  std::string dir_;
};

TEST_F(ShardedTest, AllTensorsMatchSingleFile) {
  auto r = CheckpointReader::Open(dir_);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE((*r)->sharded());
  EXPECT_EQ((*r)->num_open_files(), 2u);
  EXPECT_EQ((*r)->dir(), dir_);
  std::vector<std::string> names = (*r)->Names();
  ASSERT_EQ(names.size(), original_->tensors().size());
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  for (const TensorInfo& want : original_->tensors()) {
    const TensorInfo* got = (*r)->Find(want.name);
    ASSERT_NE(got, nullptr) << want.name;
    EXPECT_EQ(got->shape, want.shape);
    EXPECT_EQ(got->dtype, want.dtype);
    ASSERT_EQ(got->nbytes, want.nbytes);
    EXPECT_EQ(std::memcmp(got->data, want.data, want.nbytes), 0) << want.name;
    EXPECT_NE(got->data, want.data);  // really from the shard
    const bool layer1 = StartsWith(want.name, "model.layers.1.");
    EXPECT_TRUE(EndsWith(got->file, layer1 ? kShardB : kShardA)) << got->file;
  }
}

TEST_F(ShardedTest, WantFilterOpensOnlyNeededShards) {
  auto only_layer1_experts = [](std::string_view name) {
    return StartsWith(name, "model.layers.1.mlp.experts.");
  };
  auto r = CheckpointReader::Open(dir_, only_layer1_experts);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ((*r)->num_open_files(), 1u);
  EXPECT_TRUE(EndsWith((*r)->open_files()[0], kShardB)) << (*r)->open_files()[0];
  std::vector<std::string> names = (*r)->Names();
  EXPECT_EQ(names.size(), 8u * 3u);
  for (const std::string& n : names) EXPECT_TRUE(only_layer1_experts(n)) << n;
  const TensorInfo* t = (*r)->Find("model.layers.1.mlp.experts.7.down_proj.weight");
  ASSERT_NE(t, nullptr);
  const TensorInfo* o = original_->Find("model.layers.1.mlp.experts.7.down_proj.weight");
  ASSERT_EQ(t->nbytes, o->nbytes);
  EXPECT_EQ(std::memcmp(t->data, o->data, o->nbytes), 0);
  // Unwanted names -- in the opened shard or in the unopened one -- are invisible.
  EXPECT_EQ((*r)->Find("model.layers.1.self_attn.q_proj.weight"), nullptr);
  EXPECT_EQ((*r)->Find("model.layers.1.mlp.gate.weight"), nullptr);
  EXPECT_EQ((*r)->Find("model.layers.0.mlp.experts.0.up_proj.weight"), nullptr);
  EXPECT_EQ((*r)->Find("model.embed_tokens.weight"), nullptr);
  auto g = (*r)->Get("model.embed_tokens.weight", {1000, 64});
  ASSERT_FALSE(g.ok());
  EXPECT_THAT(std::string(g.status().message()), HasSubstr("missing tensor"));
  EXPECT_THAT(std::string(g.status().message()), HasSubstr("filter"));

  // Layer 0 only: the other shard.
  auto r0 = CheckpointReader::Open(
      dir_, [](std::string_view n) { return StartsWith(n, "model.layers.0."); });
  ASSERT_TRUE(r0.ok()) << r0.status();
  ASSERT_EQ((*r0)->num_open_files(), 1u);
  EXPECT_TRUE(EndsWith((*r0)->open_files()[0], kShardA));

  // Nothing wanted: nothing opened.
  auto none = CheckpointReader::Open(dir_, [](std::string_view) { return false; });
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ((*none)->num_open_files(), 0u);
  EXPECT_TRUE((*none)->Names().empty());
}

TEST_F(ShardedTest, SingleFileWinsOverIndex) {
  const TensorInfo* norm = original_->Find("model.norm.weight");
  ASSERT_NE(norm, nullptr);
  WriteFile(dir_ + "/model.safetensors", SerializeSafetensors({FromInfo(*norm)}));
  auto r = CheckpointReader::Open(dir_);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE((*r)->sharded());
  EXPECT_EQ((*r)->num_open_files(), 1u);
  EXPECT_EQ((*r)->Names(), std::vector<std::string>{"model.norm.weight"});
}

TEST_F(ShardedTest, WantFilterOnSingleFile) {
  auto r = CheckpointReader::Open(OracleDir("mixtral"), [](std::string_view n) {
    return StartsWith(n, "model.layers.1.block_sparse_moe.experts.");
  });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->Names().size(), 4u * 3u);
  EXPECT_NE((*r)->Find("model.layers.1.block_sparse_moe.experts.3.w2.weight"), nullptr);
  EXPECT_EQ((*r)->Find("model.layers.1.block_sparse_moe.gate.weight"), nullptr);
}

TEST_F(ShardedTest, IndexNamesMissingShard) {
  ASSERT_EQ(::unlink((dir_ + "/" + kShardB).c_str()), 0);
  auto r = CheckpointReader::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  std::string msg(r.status().message());
  EXPECT_THAT(msg, HasSubstr(kShardB));
  EXPECT_THAT(msg, HasSubstr("model.safetensors.index.json"));
  // A filter that does not need the missing shard still opens.
  auto r0 = CheckpointReader::Open(
      dir_, [](std::string_view n) { return StartsWith(n, "model.layers.0."); });
  EXPECT_TRUE(r0.ok()) << r0.status();
}

TEST_F(ShardedTest, IndexListsTensorAbsentFromShard) {
  json index = json::parse(ReadFileOrDie(dir_ + "/model.safetensors.index.json"));
  index["weight_map"]["model.layers.9.ghost.weight"] = kShardA;
  WriteFile(dir_ + "/model.safetensors.index.json", index.dump());
  auto r = CheckpointReader::Open(dir_);
  ASSERT_FALSE(r.ok());
  std::string msg(r.status().message());
  EXPECT_THAT(msg, HasSubstr(kShardA));
  EXPECT_THAT(msg, HasSubstr("model.layers.9.ghost.weight"));
}

TEST_F(ShardedTest, IndexNotJson) {
  WriteFile(dir_ + "/model.safetensors.index.json", "{\"weight_map\": ");
  auto r = CheckpointReader::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("model.safetensors.index.json"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("not valid JSON"));

  WriteFile(dir_ + "/model.safetensors.index.json", "{\"metadata\": {}}");
  r = CheckpointReader::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("missing field 'weight_map'"));

  WriteFile(dir_ + "/model.safetensors.index.json",
            "{\"weight_map\": {\"x\": \"../../etc/passwd\"}}");
  r = CheckpointReader::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("outside the checkpoint directory"));
}

// ---------------------------------------------------------------------------------------------
// Malformed input: each error names the file and the problem.

class MalformedTest : public testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir(); }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // Writes `bytes` to <dir>/<name> and returns the open status's message (the open must fail).
  std::string OpenFails(const std::string& name, const std::string& bytes) {
    const std::string path = dir_ + "/" + name;
    WriteFile(path, bytes);
    auto f = SafetensorsFile::Open(path);
    EXPECT_FALSE(f.ok());
    if (f.ok()) return "";
    std::string msg(f.status().message());
    EXPECT_THAT(msg, HasSubstr(path));
    return msg;
  }

  static std::string OneF32(const std::string& name, const std::string& offsets,
                            const std::string& shape, size_t data_bytes) {
    std::string h = "{\"" + name + "\":{\"dtype\":\"F32\",\"shape\":" + shape +
                    ",\"data_offsets\":" + offsets + "}}";
    return U64LE(h.size()) + h + std::string(data_bytes, '\0');
  }

  std::string dir_;
};

TEST_F(MalformedTest, TruncatedShorterThan8Bytes) {
  std::string msg = OpenFails("short.safetensors", "abc");
  EXPECT_THAT(msg, HasSubstr("truncated"));
  msg = OpenFails("empty.safetensors", "");
  EXPECT_THAT(msg, HasSubstr("truncated"));
}

TEST_F(MalformedTest, HeaderLengthExceedsFile) {
  std::string msg = OpenFails("long.safetensors", U64LE(1000) + "{}");
  EXPECT_THAT(msg, HasSubstr("header length 1000 exceeds file size 10"));
  // 2^64 - 1 must not overflow the bounds check.
  msg = OpenFails("huge.safetensors", U64LE(~uint64_t{0}) + "{}");
  EXPECT_THAT(msg, HasSubstr("exceeds file size"));
}

TEST_F(MalformedTest, HeaderNotJson) {
  std::string h = "{\"x\": {\"dtype\": ";
  std::string msg = OpenFails("notjson.safetensors", U64LE(h.size()) + h);
  EXPECT_THAT(msg, HasSubstr("header is not valid JSON"));
  h = "[1, 2]";
  msg = OpenFails("array.safetensors", U64LE(h.size()) + h);
  EXPECT_THAT(msg, HasSubstr("not a JSON object"));
}

TEST_F(MalformedTest, UnknownDtype) {
  std::string h = "{\"x\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}}";
  std::string msg = OpenFails("i64.safetensors", U64LE(h.size()) + h + std::string(16, '\0'));
  EXPECT_THAT(msg, HasSubstr("unsupported dtype 'I64' for tensor 'x'"));
  h = "{\"y\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,16]}}";
  msg = OpenFails("q4.safetensors", U64LE(h.size()) + h + std::string(16, '\0'));
  EXPECT_THAT(msg, HasSubstr("unsupported dtype 'Q4' for tensor 'y'"));
}

TEST_F(MalformedTest, DataOffsetsPastEndOfFile) {
  std::string msg = OpenFails("past.safetensors", OneF32("x", "[0,400]", "[100]", 16));
  EXPECT_THAT(msg, HasSubstr("truncated: tensor 'x' needs bytes [0, 400) but data region has 16"));
}

TEST_F(MalformedTest, DataOffsetsInconsistentWithShape) {
  std::string msg = OpenFails("size.safetensors", OneF32("x", "[0,16]", "[3]", 16));
  EXPECT_THAT(msg, HasSubstr("tensor 'x'"));
  EXPECT_THAT(msg, HasSubstr("hold 16 bytes but shape [3] of F32 needs 12"));
  msg = OpenFails("order.safetensors", OneF32("x", "[16,0]", "[0]", 16));
  EXPECT_THAT(msg, HasSubstr("begin > end"));
  msg = OpenFails("neg.safetensors", OneF32("x", "[0,16]", "[-4]", 16));
  EXPECT_THAT(msg, HasSubstr("not a non-negative integer"));
  msg = OpenFails("ovf.safetensors",
                  OneF32("x", "[0,16]", "[4294967296, 4294967296, 4294967296]", 16));
  EXPECT_THAT(msg, HasSubstr("too large"));
  msg = OpenFails("nooff.safetensors", U64LE(36) + "{\"x\":{\"dtype\":\"F32\",\"shape\":[1]}}   ");
  EXPECT_THAT(msg, HasSubstr("data_offsets"));
}

TEST_F(MalformedTest, ValidSmallFileWithMetadataAndScalar) {
  // A scalar, an empty tensor and metadata; header padded with spaces.
  std::vector<RawTensor> ts = {
      {"s", "BF16", {}, std::string("\x80\x3f", 2)},  // 1.0 in bf16
      {"e", "F16", {0, 5}, ""},
      {"v", "F32", {2}, std::string("\0\0\x80\x3f\0\0\0\x40", 8)},  // 1, 2
  };
  const std::string path = dir_ + "/ok.safetensors";
  WriteFile(path, SerializeSafetensors(ts));
  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->tensors().size(), 3u);
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  const TensorInfo* s = (*f)->Find("s");
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->numel(), 1);
  EXPECT_EQ(BF16ToF32(*static_cast<const uint16_t*>(s->data)), 1.0f);
  const TensorInfo* e = (*f)->Find("e");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->numel(), 0);
  EXPECT_EQ(e->nbytes, 0u);
  const TensorInfo* v = (*f)->Find("v");
  ASSERT_NE(v, nullptr);
  float vals[2];
  ToF32(v->data, v->dtype, 2, vals);
  EXPECT_EQ(vals[0], 1.0f);
  EXPECT_EQ(vals[1], 2.0f);
  EXPECT_EQ((*f)->Find("missing"), nullptr);
}

TEST_F(MalformedTest, MissingTensorViaGet) {
  auto r = CheckpointReader::Open(OracleDir("qwen3_moe"));
  ASSERT_TRUE(r.ok()) << r.status();
  auto t = (*r)->Get("model.layers.7.mlp.gate.weight", {8, 64});
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  std::string msg(t.status().message());
  EXPECT_THAT(msg, HasSubstr(OracleDir("qwen3_moe")));
  EXPECT_THAT(msg, HasSubstr("missing tensor 'model.layers.7.mlp.gate.weight'"));
}

TEST_F(MalformedTest, ShapeMismatchViaGet) {
  auto r = CheckpointReader::Open(OracleDir("qwen3_moe"));
  ASSERT_TRUE(r.ok()) << r.status();
  auto t = (*r)->Get("model.layers.0.self_attn.k_proj.weight", {64, 64});
  ASSERT_FALSE(t.ok());
  std::string msg(t.status().message());
  EXPECT_THAT(msg, HasSubstr("testdata/oracle/qwen3_moe/model.safetensors"));
  EXPECT_THAT(msg, HasSubstr("tensor 'model.layers.0.self_attn.k_proj.weight' has shape "
                             "[32, 64], config.json implies [64, 64]"));
}

TEST_F(MalformedTest, MissingFileAndDirectory) {
  const std::string path = dir_ + "/nope.safetensors";
  auto f = SafetensorsFile::Open(path);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(f.status().message()), HasSubstr(path));

  const std::string missing_dir = dir_ + "/no_such_checkpoint";
  auto r = CheckpointReader::Open(missing_dir);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(missing_dir));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("does not exist"));

  // A directory with no checkpoint in it.
  r = CheckpointReader::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(dir_));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("model.safetensors"));

  // A directory passed as a file.
  f = SafetensorsFile::Open(dir_);
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("not a regular file"));
}

TEST_F(MalformedTest, CorruptSingleFileInCheckpointDir) {
  WriteFile(dir_ + "/model.safetensors", "abc");
  auto r = CheckpointReader::Open(dir_);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(dir_ + "/model.safetensors"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("truncated"));
}

}  // namespace
}  // namespace moemesh
