// Tests of the tokenizer against the outputs of Hugging Face `tokenizers`:
// the reference files under testdata/oracle/ and models/pydoc-moe-17m/, plus a
// few id lists (marked below) computed by `tokenizers` 0.23 itself. No
// expected value here comes from this implementation. Run from the
// repository root.
#include "engine/tokenizer.h"

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace moemesh {
namespace {

using json = nlohmann::json;

constexpr char kByteLevelPath[] = "testdata/oracle/tokenizer.json";
constexpr char kByteLevelCasesPath[] = "testdata/oracle/tokenizer_cases.json";
constexpr char kSpPath[] =
    "testdata/oracle/tokenizer_sentencepiece/tokenizer.json";
constexpr char kSpCasesPath[] =
    "testdata/oracle/tokenizer_sentencepiece/tokenizer_cases.json";
constexpr char kPydocPath[] = "models/pydoc-moe-17m/tokenizer.json";
constexpr char kHeldoutPath[] = "models/pydoc-moe-17m/heldout.txt";
constexpr char kHeldoutIdsPath[] = "models/pydoc-moe-17m/heldout_ids.json";
constexpr char kReplacement[] = "\xEF\xBF\xBD";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path
                         << " (run the test from the repository root)";
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

json ReadJson(const std::string& path) { return json::parse(ReadFile(path)); }

std::unique_ptr<Tokenizer> Load(const std::string& path) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromFile(path);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

std::unique_ptr<Tokenizer> LoadJson(const json& j) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromJson(j.dump());
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

std::vector<int32_t> Ids(const json& j) {
  return j.get<std::vector<int32_t>>();
}

// Checks a byte-level tokenizer against testdata/oracle/tokenizer_cases.json.
void ExpectByteLevelCases(const Tokenizer& tok) {
  const json cases = ReadJson(kByteLevelCasesPath);
  ASSERT_FALSE(cases.empty());
  for (const json& c : cases) {
    const std::string text = c["text"].get<std::string>();
    const std::vector<int32_t> ids = Ids(c["ids"]);
    EXPECT_EQ(tok.Encode(text, /*add_special_tokens=*/true), ids) << text;
    // The ByteLevel post-processor adds no tokens.
    EXPECT_EQ(tok.Encode(text, /*add_special_tokens=*/false), ids) << text;
    EXPECT_EQ(tok.Decode(ids, /*skip_special_tokens=*/true),
              c["decoded"].get<std::string>())
        << text;
  }
}

TEST(TokenizerTest, ByteLevelOracleCases) {
  std::unique_ptr<Tokenizer> tok = Load(kByteLevelPath);
  ASSERT_NE(tok, nullptr);
  ExpectByteLevelCases(*tok);
  EXPECT_FALSE(tok->bos_id().has_value());
}

TEST(TokenizerTest, SentencePieceOracleCases) {
  std::unique_ptr<Tokenizer> tok = Load(kSpPath);
  ASSERT_NE(tok, nullptr);
  const json cases = ReadJson(kSpCasesPath);
  ASSERT_FALSE(cases.empty());
  for (const json& c : cases) {
    const std::string text = c["text"].get<std::string>();
    EXPECT_EQ(tok->Encode(text, true), Ids(c["ids"])) << text;
    EXPECT_EQ(tok->Encode(text, false), Ids(c["ids_no_special"])) << text;
    EXPECT_EQ(tok->Decode(Ids(c["ids"]), true), c["decoded"].get<std::string>())
        << text;
  }
}

TEST(TokenizerTest, HeldoutMatchesTransformersIds) {
  std::unique_ptr<Tokenizer> tok = Load(kPydocPath);
  ASSERT_NE(tok, nullptr);
  const std::string text = ReadFile(kHeldoutPath);
  const std::vector<int32_t> expected = Ids(ReadJson(kHeldoutIdsPath));
  ASSERT_EQ(expected.size(), 33734u);
  const std::string sep = "\n<|endoftext|>\n";
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = EncodeDocuments(*tok, text, sep, 0);
  int docs = 0;
  for (size_t p = text.find(sep); p != std::string::npos; p = text.find(sep, p + 1)) ++docs;
  ++docs;
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  EXPECT_EQ(docs, 10);
  ASSERT_EQ(ids.size(), expected.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    ASSERT_EQ(ids[i], expected[i]) << "first difference at position " << i;
  }
  std::printf("heldout: %zu bytes -> %zu ids in %.3f s\n", text.size(),
              ids.size(), secs);
  // The file's documents decode back to themselves.
  const size_t first_end = text.find(sep);
  const std::string doc0 = text.substr(0, first_end);
  EXPECT_EQ(tok->Decode(tok->Encode(doc0, false)), doc0);
}

TEST(TokenizerTest, LargeInputIsFast) {
  // The 8192-vocab model on ~150 KB, as one Encode call (the heldout file
  // plus its beginning again, special-token separators included).
  std::unique_ptr<Tokenizer> tok = Load(kPydocPath);
  ASSERT_NE(tok, nullptr);
  std::string text = ReadFile(kHeldoutPath);
  text += text.substr(0, 30000);
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok->Encode(text, false);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  std::printf("encode: %zu bytes -> %zu ids in %.3f s\n", text.size(),
              ids.size(), secs);
  EXPECT_GT(ids.size(), 33734u);
}

TEST(TokenizerTest, SentencePieceLongTextWithoutPreTokenizer) {
  // No pre-tokenizer: ~150 KB of text is one BPE word, which must still be
  // fast, and decode back to the text.
  std::unique_ptr<Tokenizer> tok = Load(kSpPath);
  ASSERT_NE(tok, nullptr);
  std::string text;
  while (text.size() < 150000) text += "the Licensor shall not be liable ";
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok->Encode(text, false);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();

  EXPECT_EQ(tok->Decode(ids), text);
}

TEST(TokenizerTest, SpecialTokensInTextAreSplitOut) {
  for (const char* path : {kByteLevelPath, kPydocPath}) {
    std::unique_ptr<Tokenizer> tok = Load(path);
    ASSERT_NE(tok, nullptr);
    const std::optional<int32_t> start = tok->TokenToId("<|im_start|>");
    const std::optional<int32_t> end = tok->TokenToId("<|im_end|>");
    const std::optional<int32_t> eot = tok->TokenToId("<|endoftext|>");
    // Ids as the file's added_tokens give them.
    ASSERT_EQ(start, 1);
    ASSERT_EQ(end, 2);
    ASSERT_EQ(eot, 0);
    const std::vector<int32_t> inner = tok->Encode("user\nhi", false);
    std::vector<int32_t> expected = {1};
    expected.insert(expected.end(), inner.begin(), inner.end());
    expected.push_back(2);
    EXPECT_EQ(tok->Encode("<|im_start|>user\nhi<|im_end|>"), expected) << path;
    EXPECT_EQ(tok->Encode("<|im_start|><|im_end|><|endoftext|>"),
              (std::vector<int32_t>{1, 2, 0}));
    EXPECT_TRUE(tok->IsSpecial(0));
    EXPECT_TRUE(tok->IsSpecial(1));
    EXPECT_FALSE(tok->IsSpecial(100));
    EXPECT_EQ(tok->Decode(expected, /*skip_special_tokens=*/false),
              "<|im_start|>user\nhi<|im_end|>");
    EXPECT_EQ(tok->Decode(expected, /*skip_special_tokens=*/true), "user\nhi");
  }
  // The oracle: "<|im_start|>user\nhi<|im_end|>" -> [1, 87, 528, 201, 74, 75,
  // 2].
  std::unique_ptr<Tokenizer> tok = Load(kByteLevelPath);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Encode("<|im_start|>user\nhi<|im_end|>"),
            (std::vector<int32_t>{1, 87, 528, 201, 74, 75, 2}));
}

TEST(TokenizerTest, VocabularyQueries) {
  std::unique_ptr<Tokenizer> tok = Load(kPydocPath);
  ASSERT_NE(tok, nullptr);
  const json file = ReadJson(kPydocPath);
  int32_t max_id = -1;
  for (const auto& [token, id] : file["model"]["vocab"].items()) {
    max_id = std::max(max_id, id.get<int32_t>());
    ASSERT_EQ(tok->TokenToId(token), id.get<int32_t>()) << token;
  }
  for (const json& a : file["added_tokens"]) {
    max_id = std::max(max_id, a["id"].get<int32_t>());
    EXPECT_EQ(tok->IdToToken(a["id"].get<int32_t>()), a["content"]);
  }
  EXPECT_EQ(tok->vocab_size(), max_id + 1);
  EXPECT_EQ(tok->vocab_size(), 8192);  // README: vocabulary 8192.
  EXPECT_EQ(tok->IdToToken(-1), "");
  EXPECT_EQ(tok->IdToToken(tok->vocab_size()), "");
  EXPECT_FALSE(tok->TokenToId("no such token at all").has_value());
  EXPECT_FALSE(tok->IsSpecial(-5));
  EXPECT_FALSE(tok->IsSpecial(1 << 30));
  EXPECT_FALSE(tok->bos_id().has_value());
  // Out-of-range ids are ignored by Decode.
  EXPECT_EQ(tok->Decode({-1, 1 << 30}), "");

  std::unique_ptr<Tokenizer> sp = Load(kSpPath);
  ASSERT_NE(sp, nullptr);
  EXPECT_EQ(sp->bos_id(), 1);  // TemplateProcessing puts <s> (id 1) first.
  EXPECT_EQ(sp->TokenToId("<s>"), 1);
  EXPECT_EQ(sp->TokenToId("<0x41>"), 3 + 0x41);  // README: ids 3..258.
  EXPECT_EQ(sp->IdToToken(3), "<0x00>");
  EXPECT_EQ(sp->IdToToken(258), "<0xFF>");
  EXPECT_TRUE(sp->IsSpecial(0));
  EXPECT_TRUE(sp->IsSpecial(2));
  EXPECT_FALSE(sp->IsSpecial(3));
}

// Decoding every prefix of an id list, as the streaming router does: the
// result is a prefix of the full text followed by U+FFFD only where the
// prefix ends inside a character.
void ExpectPrefixDecodes(const Tokenizer& tok, const std::vector<int32_t>& ids,
                         bool one_replacement_per_char) {
  const std::string full = tok.Decode(ids);
  ASSERT_EQ(full.find(kReplacement), std::string::npos);
  int partial = 0;
  for (size_t n = 0; n <= ids.size(); ++n) {
    std::string got =
        tok.Decode(std::vector<int32_t>(ids.begin(), ids.begin() + n));
    int replacements = 0;
    while (got.size() >= 3 &&
           got.compare(got.size() - 3, 3, kReplacement) == 0) {
      got.resize(got.size() - 3);
      ++replacements;
    }
    EXPECT_EQ(full.compare(0, got.size(), got), 0)
        << "prefix " << n << " decodes to '" << got << "'";
    if (replacements > 0) ++partial;
    if (one_replacement_per_char) {
      EXPECT_LE(replacements, 1) << n;
    }
  }
  EXPECT_GT(partial, 0) << "no prefix ended mid-character";
}

TEST(TokenizerTest, StreamingDecodeOfPartialCharacters) {
  const json bl_cases = ReadJson(kByteLevelCasesPath);
  std::unique_ptr<Tokenizer> bl = Load(kByteLevelPath);
  ASSERT_NE(bl, nullptr);
  // "Unicode: café naïve 東京 😀 — “quotes”": byte-level tokens split
  // characters; from_utf8_lossy gives one U+FFFD for a truncated character.
  ExpectPrefixDecodes(*bl, Ids(bl_cases[3]["ids"]), true);

  const json sp_cases = ReadJson(kSpCasesPath);
  std::unique_ptr<Tokenizer> sp = Load(kSpPath);
  ASSERT_NE(sp, nullptr);
  // Byte-fallback tokens: `tokenizers`' ByteFallback decoder gives one U+FFFD
  // per byte of an incomplete sequence.
  ExpectPrefixDecodes(*sp, Ids(sp_cases[3]["ids"]), false);
  const int32_t e6 = *sp->TokenToId("<0xE6>");
  const int32_t x9d = *sp->TokenToId("<0x9D>");
  const int32_t xb1 = *sp->TokenToId("<0xB1>");
  EXPECT_EQ(sp->Decode({e6, x9d, xb1}), "東");
  EXPECT_EQ(sp->Decode({e6, x9d}), std::string(kReplacement) + kReplacement);
  EXPECT_EQ(sp->Decode({e6}), kReplacement);
}

TEST(TokenizerTest, ByteLevelDecodeOfTruncatedCharacters) {
  std::unique_ptr<Tokenizer> bl = Load(kByteLevelPath);
  ASSERT_NE(bl, nullptr);
  // 東 is E6 9D B1. In the GPT-2 byte-to-character mapping byte 0xE6 is 'æ'
  // (U+00E6), 0xB1 is '±' (U+00B1) and 0x9D is 'Ŀ' (U+013F, the 31st of the
  // unprintable bytes 0x7F..0xA0 moved to U+0121 + k).
  const std::optional<int32_t> e6 = bl->TokenToId("æ");
  const std::optional<int32_t> x9d = bl->TokenToId("Ŀ");
  const std::optional<int32_t> xb1 = bl->TokenToId("±");
  ASSERT_TRUE(e6 && x9d && xb1);
  EXPECT_EQ(bl->Decode({*e6, *x9d, *xb1}), "東");
  EXPECT_EQ(bl->Decode({*e6, *x9d}), kReplacement);
  EXPECT_EQ(bl->Decode({*e6}), kReplacement);
  EXPECT_EQ(bl->Decode({*x9d, *e6}), std::string(kReplacement) + kReplacement);
}

TEST(TokenizerTest, MergesAsStringsAndNfcNormalizer) {
  // Same tokenizer with merges written as "a b" strings (the older format)
  // and an NFC normalizer (as Qwen files have): same oracle results.
  json j = ReadJson(kByteLevelPath);
  json merges = json::array();
  for (const json& m : j["model"]["merges"]) {
    merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
  }
  j["model"]["merges"] = merges;
  j["normalizer"] = {{"type", "NFC"}};
  std::unique_ptr<Tokenizer> tok = LoadJson(j);
  ASSERT_NE(tok, nullptr);
  ExpectByteLevelCases(*tok);
}

// The Qwen2/Qwen3 layout: NFC, then Sequence[Split(regex, Isolated),
// ByteLevel(use_regex false)], on the vocabulary and merges of `path`.
json SplitLayout(const std::string& path, const std::string& regex) {
  json j = ReadJson(path);
  j["normalizer"] = {{"type", "NFC"}};
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers",
                         {{{"type", "Split"},
                           {"pattern", {{"Regex", regex}}},
                           {"behavior", "Isolated"},
                           {"invert", false}},
                          {{"type", "ByteLevel"},
                           {"add_prefix_space", false},
                           {"trim_offsets", false},
                           {"use_regex", false}}}}};
  return j;
}

constexpr char kGpt2Regex[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr char kQwenRegex[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr char kLlama3Regex[] =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

TEST(TokenizerTest, SplitWithGpt2RegexEqualsByteLevelRegex) {
  std::unique_ptr<Tokenizer> tok =
      LoadJson(SplitLayout(kByteLevelPath, kGpt2Regex));
  ASSERT_NE(tok, nullptr);
  ExpectByteLevelCases(*tok);
}

struct HfCase {
  std::string text;
  std::vector<int32_t> ids;
  std::string decoded;
};

void ExpectHfCases(const Tokenizer& tok, const std::vector<HfCase>& cases) {
  for (const HfCase& c : cases) {
    EXPECT_EQ(tok.Encode(c.text), c.ids) << c.text;
    EXPECT_EQ(tok.Decode(c.ids), c.decoded) << c.text;
  }
}

// Expected ids and decoded text in the next two tests were computed by Hugging
// Face `tokenizers` 0.23.2 (its npm package) on SplitLayout(kPydocPath, regex):
// encode(text, add_special_tokens=true) and decode(ids, skip_special=true).
// The last case is decomposed (NFD) text, which the NFC normalizer composes.
TEST(TokenizerTest, QwenRegexMatchesHuggingFace) {
  std::unique_ptr<Tokenizer> tok =
      LoadJson(SplitLayout(kPydocPath, kQwenRegex));
  ASSERT_NE(tok, nullptr);
  const std::vector<HfCase> cases = {
      {"DON'T shout, it'S fine; we'RE here, THEY'LL go, I'Ve seen, you'D know, "
       "I'M ok",
       {38, 592,  9,    54,  546,  513, 14,   384, 9,    53, 7375, 29,  1051,
        9,  485,  2313, 14,  7868, 59,  9,    791, 1821, 14, 366,  9,   56,
        71, 5099, 14,   442, 9,    38,  2483, 14,  366,  9,  47,   282, 77},
       "DON'T shout, it'S fine; we'RE here, THEY'LL go, I'Ve seen, you'D know, "
       "I'M ok"},
      {"x'sy '\xC5\xBF 'S 'LL",
       {90, 608, 91, 508, 132, 126, 508, 53, 508, 791},
       "x'sy '\xC5\xBF 'S 'LL"},
      {"(foo) [bar] {baz} \"quoted\" #hash @at",
       {10, 1447, 11, 683, 2272, 63, 812, 6316, 95, 450, 5711, 4, 709, 2333,
        1652, 269},
       "(foo) [bar] {baz} \"quoted\" #hash @at"},
      {"\tfoo  bar\t\tbaz",
       {200, 1447, 223, 4812, 200, 200, 6316},
       "\tfoo  bar\t\tbaz"},
      {"12345 67.89 1,000,000 v2.0",
       {19, 20, 21, 22, 23, 223, 24, 25, 16,  26, 27, 223, 19,
        14, 18, 18, 18, 14, 18,  18, 18, 376, 20, 16, 18},
       "12345 67.89 1,000,000 v2.0"},
      {"line one\n\nline two  \n  \n\tindented\r\n\r\nend.\n\n",
       {1142, 715, 461, 1142, 1100, 259, 287, 201, 200, 544, 311, 278, 204, 201,
        204, 201, 504, 16, 461},
       "line one\n\nline two  \n  \n\tindented\r\n\r\nend.\n\n"},
      {"x  \n  y   ", {90, 259, 201, 223, 428, 533}, "x  \n  y   "},
      {"Hello!!!\n\nWorld???\r\n",
       {6243, 3, 3, 3, 461, 57, 3702, 33, 33, 33, 204, 201},
       "Hello!!!\n\nWorld???\r\n"},
      {"na\xC3\xAFve caf\xC3\xA9 \xE6\x9D\xB1\xE4\xBA\xAC \xF0\x9F\x98\x80 "
       "\xE2\x80\x94 \xE2\x80\x9Cquotes\xE2\x80\x9D "
       "\xC3\x80\xC3\x89\xC3\x8E\xC3\xB5\xC3\xBC",
       {80,  67,  130, 110, 372, 271, 1413, 130, 105,  223,  165, 254,  112,
        163, 121, 108, 223, 175, 256, 249,  225, 1856, 2167, 398, 2386, 2109,
        223, 130, 225, 130, 234, 130, 239,  130, 116,  130,  123},
       "na\xC3\xAFve caf\xC3\xA9 \xE6\x9D\xB1\xE4\xBA\xAC \xF0\x9F\x98\x80 "
       "\xE2\x80\x94 \xE2\x80\x9Cquotes\xE2\x80\x9D "
       "\xC3\x80\xC3\x89\xC3\x8E\xC3\xB5\xC3\xBC"},
      {"<|im_start|>system\nYou are a "
       "helper.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
       {1, 2067, 201, 1266, 397, 264, 6940, 16, 2, 201, 1, 2044, 201, 4494, 2,
        201},
       "system\nYou are a helper.\nuser\nhi\n"},
      {"def f(x):\n    return x**2  # square\n",
       {825, 280, 10, 90, 1309, 201, 533, 539, 1114, 629, 20, 223, 709, 6483,
        566, 201},
       "def f(x):\n    return x**2  # square\n"},
      {"\xE2\x85\xAB \xC2\xB2 \xC2\xBD \xD9\xA3\xDB\xB4 \xC7\x85ungla",
       {161, 230, 107, 223, 129, 113, 223, 129, 124, 223, 152,
        99,  154, 115, 223, 134, 230, 317, 73,  78,  67},
       "\xE2\x85\xAB \xC2\xB2 \xC2\xBD \xD9\xA3\xDB\xB4 \xC7\x85ungla"},
      {"cafe\xCC\x81 nai\xCC\x88ve A\xCC\x8A \xE2\x84\xAB "
       "\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8 q\xCC\xA3\xCC\x87 "
       "s\xCC\x87\xCC\xA3",
       {69,  1413, 130, 105, 301, 67,   130, 110, 372, 223, 130, 230, 223, 130,
        230, 223,  169, 111, 226, 3448, 139, 99,  139, 232, 223, 160, 120, 105},
       "caf\xC3\xA9 na\xC3\xAFve \xC3\x85 \xC3\x85 \xEA\xB0\x81 "
       "q\xCC\xA3\xCC\x87 \xE1\xB9\xA9"},
  };
  ExpectHfCases(*tok, cases);
}

TEST(TokenizerTest, Llama3RegexMatchesHuggingFace) {
  std::unique_ptr<Tokenizer> tok =
      LoadJson(SplitLayout(kPydocPath, kLlama3Regex));
  ASSERT_NE(tok, nullptr);
  const std::vector<HfCase> cases = {
      {"DON'T shout, it'S fine; we'RE here, THEY'LL go, I'Ve seen, you'D know, "
       "I'M ok",
       {38, 592,  9,    54,  546,  513, 14,   384, 9,    53, 7375, 29,  1051,
        9,  485,  2313, 14,  7868, 59,  9,    791, 1821, 14, 366,  9,   56,
        71, 5099, 14,   442, 9,    38,  2483, 14,  366,  9,  47,   282, 77},
       "DON'T shout, it'S fine; we'RE here, THEY'LL go, I'Ve seen, you'D know, "
       "I'M ok"},
      {"x'sy '\xC5\xBF 'S 'LL",
       {90, 608, 91, 508, 132, 126, 508, 53, 508, 791},
       "x'sy '\xC5\xBF 'S 'LL"},
      {"(foo) [bar] {baz} \"quoted\" #hash @at",
       {10, 1447, 11, 683, 2272, 63, 812, 6316, 95, 450, 5711, 4, 709, 2333,
        1652, 269},
       "(foo) [bar] {baz} \"quoted\" #hash @at"},
      {"\tfoo  bar\t\tbaz",
       {200, 1447, 223, 4812, 200, 200, 6316},
       "\tfoo  bar\t\tbaz"},
      {"12345 67.89 1,000,000 v2.0",
       {6080, 2826, 223, 2650, 16, 3037, 223, 19, 14, 2267, 14, 2267, 376, 20,
        16, 18},
       "12345 67.89 1,000,000 v2.0"},
      {"line one\n\nline two  \n  \n\tindented\r\n\r\nend.\n\n",
       {1142, 715, 461, 1142, 1100, 259, 287, 201, 200, 544, 311, 278, 204, 201,
        204, 201, 504, 16, 461},
       "line one\n\nline two  \n  \n\tindented\r\n\r\nend.\n\n"},
      {"x  \n  y   ", {90, 259, 201, 223, 428, 533}, "x  \n  y   "},
      {"Hello!!!\n\nWorld???\r\n",
       {6243, 3, 3, 3, 461, 57, 3702, 33, 33, 33, 204, 201},
       "Hello!!!\n\nWorld???\r\n"},
      {"na\xC3\xAFve caf\xC3\xA9 \xE6\x9D\xB1\xE4\xBA\xAC \xF0\x9F\x98\x80 "
       "\xE2\x80\x94 \xE2\x80\x9Cquotes\xE2\x80\x9D "
       "\xC3\x80\xC3\x89\xC3\x8E\xC3\xB5\xC3\xBC",
       {80,  67,  130, 110, 372, 271, 1413, 130, 105,  223,  165, 254,  112,
        163, 121, 108, 223, 175, 256, 249,  225, 1856, 2167, 398, 2386, 2109,
        223, 130, 225, 130, 234, 130, 239,  130, 116,  130,  123},
       "na\xC3\xAFve caf\xC3\xA9 \xE6\x9D\xB1\xE4\xBA\xAC \xF0\x9F\x98\x80 "
       "\xE2\x80\x94 \xE2\x80\x9Cquotes\xE2\x80\x9D "
       "\xC3\x80\xC3\x89\xC3\x8E\xC3\xB5\xC3\xBC"},
      {"<|im_start|>system\nYou are a "
       "helper.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
       {1, 2067, 201, 1266, 397, 264, 6940, 16, 2, 201, 1, 2044, 201, 4494, 2,
        201},
       "system\nYou are a helper.\nuser\nhi\n"},
      {"def f(x):\n    return x**2  # square\n",
       {825, 280, 10, 90, 1309, 201, 533, 539, 1114, 629, 20, 223, 709, 6483,
        566, 201},
       "def f(x):\n    return x**2  # square\n"},
      {"\xE2\x85\xAB \xC2\xB2 \xC2\xBD \xD9\xA3\xDB\xB4 \xC7\x85ungla",
       {161, 230, 107, 223, 129, 113, 223, 129, 124, 223, 152,
        99,  154, 115, 223, 134, 230, 317, 73,  78,  67},
       "\xE2\x85\xAB \xC2\xB2 \xC2\xBD \xD9\xA3\xDB\xB4 \xC7\x85ungla"},
      {"cafe\xCC\x81 nai\xCC\x88ve A\xCC\x8A \xE2\x84\xAB "
       "\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8 q\xCC\xA3\xCC\x87 "
       "s\xCC\x87\xCC\xA3",
       {69,  1413, 130, 105, 301, 67,   130, 110, 372, 223, 130, 230, 223, 130,
        230, 223,  169, 111, 226, 3448, 139, 99,  139, 232, 223, 160, 120, 105},
       "caf\xC3\xA9 na\xC3\xAFve \xC3\x85 \xC3\x85 \xEA\xB0\x81 "
       "q\xCC\xA3\xCC\x87 \xE1\xB9\xA9"},
  };
  ExpectHfCases(*tok, cases);
}

TEST(TokenizerTest, NfcComposesDecomposedInput) {
  // The oracle case "Unicode: café naïve 東京 😀 — “quotes”", with é and ï
  // written decomposed (e + U+0301, i + U+0308): under an NFC normalizer it
  // must encode to the oracle's ids for the composed text.
  json j = ReadJson(kByteLevelPath);
  j["normalizer"] = {{"type", "NFC"}};
  std::unique_ptr<Tokenizer> tok = LoadJson(j);
  ASSERT_NE(tok, nullptr);
  const json c = ReadJson(kByteLevelCasesPath)[3];
  const std::string composed = c["text"].get<std::string>();
  ASSERT_EQ(composed.substr(0, 9), "Unicode: ");
  std::string decomposed = composed;
  const auto replace = [&](const std::string& from, const std::string& to) {
    const size_t at = decomposed.find(from);
    ASSERT_NE(at, std::string::npos);
    decomposed.replace(at, from.size(), to);
  };
  replace("\xC3\xA9", "e\xCC\x81");  // é -> e + COMBINING ACUTE ACCENT
  replace("\xC3\xAF", "i\xCC\x88");  // ï -> i + COMBINING DIAERESIS
  ASSERT_NE(decomposed, composed);
  EXPECT_EQ(tok->Encode(decomposed), Ids(c["ids"]));
  EXPECT_EQ(tok->Encode(composed), Ids(c["ids"]));
}

TEST(TokenizerTest, UnsupportedRegexIsRejected) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> t =
      Tokenizer::FromJson(SplitLayout(kByteLevelPath, R"(\w+|\s+)").dump());
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("regex"), std::string::npos)
      << t.status();
}

TEST(TokenizerTest, MalformedFilesGiveErrors) {
  {
    absl::StatusOr<std::unique_ptr<Tokenizer>> t =
        Tokenizer::FromJson("{ this is not json");
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("JSON"), std::string::npos)
        << t.status();
  }
  {
    json j = ReadJson(kByteLevelPath);
    j["model"]["type"] = "Unigram";
    absl::StatusOr<std::unique_ptr<Tokenizer>> t =
        Tokenizer::FromJson(j.dump());
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("Unigram"), std::string::npos)
        << t.status();
  }
  {
    json j = ReadJson(kByteLevelPath);
    j["model"].erase("vocab");
    absl::StatusOr<std::unique_ptr<Tokenizer>> t =
        Tokenizer::FromJson(j.dump());
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("vocab"), std::string::npos)
        << t.status();
  }
  {
    json j = ReadJson(kByteLevelPath);
    j["model"]["vocab"]["Ġt"] = "not a number";
    absl::StatusOr<std::unique_ptr<Tokenizer>> t =
        Tokenizer::FromJson(j.dump());
    ASSERT_FALSE(t.ok());
  }
  {
    json j = ReadJson(kByteLevelPath);
    j["model"]["merges"].push_back({"no-such-token", "Ġ"});
    absl::StatusOr<std::unique_ptr<Tokenizer>> t =
        Tokenizer::FromJson(j.dump());
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("merge"), std::string::npos)
        << t.status();
  }
  {
    json j = ReadJson(kByteLevelPath);
    j["decoder"] = {{"type", "WordPiece"}};
    absl::StatusOr<std::unique_ptr<Tokenizer>> t =
        Tokenizer::FromJson(j.dump());
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find("WordPiece"), std::string::npos)
        << t.status();
  }
  {
    const std::string path = "testdata/oracle/no_such_dir/tokenizer.json";
    absl::StatusOr<std::unique_ptr<Tokenizer>> t = Tokenizer::FromFile(path);
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
    EXPECT_NE(t.status().message().find(path), std::string::npos) << t.status();
  }
}

TEST(TokenizerTest, ConcurrentUseFromThreads) {
  std::unique_ptr<Tokenizer> tok = Load(kByteLevelPath);
  ASSERT_NE(tok, nullptr);
  const json cases = ReadJson(kByteLevelCasesPath);
  std::vector<std::thread> threads;
  std::vector<int> failures(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 50; ++rep) {
        for (const json& c : cases) {
          if (tok->Encode(c["text"].get<std::string>()) != Ids(c["ids"])) {
            ++failures[t];
          }
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (int f : failures) EXPECT_EQ(f, 0);
}

}  // namespace
}  // namespace moemesh
