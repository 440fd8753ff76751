// JSON mode: the byte recognizer against hand-written documents (accepted whole, complete only at
// the end; each bad byte refused where it occurs), the token table against feeding every token
// of the embedded model's vocabulary by itself, and sampling under the constraint.
#include "engine/json_constraint.h"

#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/json_schema.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"

namespace moemesh {
namespace {

const std::vector<std::string>& GoodDocs() {
  static const std::vector<std::string> docs = {
      "{}",
      "{\"a\":1}",
      "{\"a\": [1, -2.5e+3, 0, 0.25, 7E-2, true, false, null, \"x\\n\\u00e9\\\"\"], "
      "\"b\": {\"c\": {}, \"d\": []}}",
      "{ \"k\" : \"\xc3\xa9\xe6\xbc\xa2\" }",
      "{\n    \"name\": \"os\",\n    \"items\": [\n        {\"x\": -0}\n    ]\n}",
      " {\"tab\":\n\t\t\"\\t\\/\\b\\f\\r\"}",
      "{\"pair\": \"\\ud83d\\ude00 \\uD7FF \\uE000 \xf0\x9f\x99\x82 \xf4\x8f\xbf\xbf\"}",
  };
  return docs;
}

TEST(JsonStateTest, AcceptsObjectsAndIsCompleteOnlyAtTheEnd) {
  for (const std::string& doc : GoodDocs()) {
    JsonState s;
    for (size_t i = 0; i < doc.size(); ++i) {
      EXPECT_FALSE(s.Complete()) << doc << " at " << i;
      ASSERT_TRUE(s.Feed(static_cast<uint8_t>(doc[i]))) << doc << " at " << i;
    }
    EXPECT_TRUE(s.Complete()) << doc;
    EXPECT_FALSE(s.Feed(' ')) << "nothing may follow: " << doc;
    EXPECT_FALSE(s.Feed('{'));
  }
}

TEST(JsonStateTest, RefusesEachBadByteWhereItOccurs) {
  // {accepted prefix, the byte refused after it}
  const std::vector<std::pair<std::string, char>> cases = {
      {"", '['},                  // the top level is an object
      {"", '"'},
      {"{", ','},
      {"{", '1'},                 // keys are strings
      {"{\"a\"", '1'},            // missing colon
      {"{\"a\":0", '1'},          // no leading zeros
      {"{\"a\":1.", '}'},         // a fraction needs digits
      {"{\"a\":1.5", '.'},
      {"{\"a\":1e", '}'},
      {"{\"a\":1e5", 'e'},
      {"{\"a\":-", '}'},
      {"{\"a\":tru", ' '},
      {"{\"a\":nul", 'L'},
      {"{\"a\":\"", '\x01'},      // control characters must be escaped
      {"{\"a\":\"\\", 'q'},
      {"{\"a\":\"\\u12", 'G'},
      {"{\"a\":1,", '}'},         // no trailing comma
      {"{\"a\":[1,", ']'},
      {"{\"a\":1", ']'},          // mismatched close
      {"{\"a\":[1", '}'},
      {"{\"a\":", '}'},
      {"{}", 'x'},
      {" ", ' '},                 // whitespace: one space,
      {"{\"a\": ", '\n'},
      {"{\"a\":\n", '\n'},           // or one newline
      {"{\"a\":\n" + std::string(JsonState::kMaxIndent, ' '), ' '},  // and bounded indentation
      {"{", '\r'},
      {"{\"a\":1" + std::string(JsonState::kMaxNumberBytes - 1, '0'), '0'},
      // Strings are valid UTF-8: no stray continuation byte, no unfinished, overlong or
      // surrogate sequence, nothing past U+10FFFF; \u surrogates only as high-low pairs.
      {"{\"a\":\"", '\x80'},
      {"{\"a\":\"", '\xc0'},
      {"{\"a\":\"", '\xf5'},
      {"{\"a\":\"\xc3", '"'},
      {"{\"a\":\"\xe0", '\x80'},
      {"{\"a\":\"\xed", '\xa0'},
      {"{\"a\":\"\xf4", '\x90'},
      {"{\"a\":\"\xe6\xbc", 'x'},
      {"{\"\xc3", '"'},
      {"{\"a\":\"\\ud83d", '"'},
      {"{\"a\":\"\\ud83d\\", 'n'},
      {"{\"a\":\"\\ud83d\\u", '0'},
      {"{\"a\":\"\\ud83d\\ud", '8'},
      {"{\"a\":\"\\ud", 'e'},
  };
  for (const auto& [prefix, bad] : cases) {
    JsonState s;
    ASSERT_TRUE(s.FeedAll(prefix)) << prefix;
    EXPECT_FALSE(s.Feed(static_cast<uint8_t>(bad))) << prefix << " + '" << bad << "'";
  }
  // Nesting deeper than kMaxDepth.
  JsonState deep;
  std::string open = "{\"a\":";
  for (int i = 1; i < JsonState::kMaxDepth; ++i) open += "[";
  ASSERT_TRUE(deep.FeedAll(open));
  EXPECT_FALSE(deep.Feed('['));
  EXPECT_TRUE(deep.Feed('1'));  // a refused byte leaves the state as it was
  // A refused byte changes nothing: the document goes on as if it had not been offered.
  JsonState s;
  ASSERT_TRUE(s.FeedAll("{\"a\":1"));
  EXPECT_FALSE(s.Feed(':'));
  EXPECT_TRUE(s.FeedAll("2}"));
  EXPECT_TRUE(s.Complete());
}

TEST(TokenBytesTest, ConcatenatedTokensGiveTheText) {
  auto tok = Tokenizer::FromFile("models/pydoc-moe-17m/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  for (const std::string text : {std::string("{\"key\": [1, 2.5]}\n  def f(x):"),
                                 std::string("caf\xc3\xa9 \xe6\xbc\xa2\xe5\xad\x97 \xf0\x9f\x99\x82")}) {
    std::string joined;
    for (int32_t id : (*tok)->Encode(text, false)) joined += (*tok)->TokenBytes(id);
    EXPECT_EQ(joined, text);
  }
  int special = 0;
  for (int32_t id = 0; id < (*tok)->vocab_size(); ++id) {
    if ((*tok)->IsSpecial(id)) {
      EXPECT_EQ((*tok)->TokenBytes(id), "") << id;
      ++special;
    }
  }
  EXPECT_GT(special, 0);
  EXPECT_EQ((*tok)->TokenBytes(-1), "");
  // A sentencepiece-style tokenizer (Metaspace + byte fallback): spaces come back, and byte
  // tokens give their byte.
  auto sp = Tokenizer::FromFile("testdata/oracle/tokenizer_sentencepiece/tokenizer.json");
  ASSERT_TRUE(sp.ok()) << sp.status();
  const std::string text = "a b \xe2\x9c\x93";
  std::string joined;
  for (int32_t id : (*sp)->Encode(text, false)) joined += (*sp)->TokenBytes(id);
  EXPECT_TRUE(joined == text || joined == " " + text) << joined;
}

// Every prefix of the good documents, and of one document under a JSON Schema: the table's one
// pass finds exactly the tokens whose bytes the state accepts one by one.
TEST(TokenTableTest, AcceptedEqualsFeedingEveryToken) {
  auto tok = Tokenizer::FromFile("models/pydoc-moe-17m/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::vector<std::string> bytes = (*tok)->AllTokenBytes();
  const TokenTable table(bytes);
  auto schema = JsonSchema::Compile(R"({"type": "object", "properties": {
      "name": {"type": "string", "maxLength": 3}, "age": {"type": "integer"},
      "tags": {"type": "array", "items": {"enum": ["a", "b", 1, 12]}, "maxItems": 2},
      "nick": {"type": ["string", "null"]}, "ok": {"type": "boolean"}},
      "required": ["name", "age", "tags", "ok"]})");
  ASSERT_TRUE(schema.ok()) << schema.status();
  std::vector<std::pair<std::string, const JsonSchema*>> docs;
  for (const std::string& doc : GoodDocs()) docs.emplace_back(doc, nullptr);
  docs.emplace_back(R"({"name": "os", "age": 12, "tags": [12, "b"], "nick": null, "ok": true})",
                    schema->get());
  int checked = 0;
  for (const auto& [doc, sch] : docs) {
    JsonState s(sch);
    for (size_t i = 0; i <= doc.size(); ++i) {
      std::vector<uint8_t> got(bytes.size(), 0);
      table.Accepted(s, &got);
      size_t n = 0;
      for (size_t id = 0; id < bytes.size(); ++id) {
        JsonState t = s;
        const bool want = !bytes[id].empty() && t.FeedAll(bytes[id]);
        ASSERT_EQ(got[id] != 0, want) << "token " << id << " '" << bytes[id] << "' after '"
                                      << doc.substr(0, i) << "'";
        n += want;
      }
      if (!s.Complete()) EXPECT_GT(n, 0u) << doc.substr(0, i);
      ++checked;
      if (i < doc.size()) ASSERT_TRUE(s.Feed(static_cast<uint8_t>(doc[i])));
    }
    EXPECT_TRUE(s.Complete()) << doc;
  }
  EXPECT_GT(checked, 220);
}

// Sampling from random logits over the real vocabulary under the constraint: the text so far is
// always a JSON prefix the recognizer accepts, reported logprobs are finite, and once an end
// token is drawn the object is complete. With the object complete only end tokens remain.
TEST(JsonConstraintTest, SampledTokensAlwaysKeepTheTextJson) {
  auto tok = Tokenizer::FromFile("models/pydoc-moe-17m/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const TokenTable table((*tok)->AllTokenBytes());
  const int64_t vocab = (*tok)->vocab_size();
  const int32_t end = 0;  // any id serves as the end token here
  std::mt19937 rng(7);
  std::normal_distribution<float> noise(0.0f, 3.0f);
  int completed = 0;
  for (int run = 0; run < 12; ++run) {
    SamplingConfig c;
    c.temperature = 1.0f;
    c.seed = run;
    c.logprobs = 3;
    Sampler sampler(c);
    sampler.Constrain(std::make_unique<JsonConstraint>(&table, std::vector<int32_t>{end}));
    std::string text;
    std::vector<int32_t> generated;
    for (int step = 0; step < 300; ++step) {
      std::vector<float> logits(vocab);
      for (float& l : logits) l = noise(rng);
      // Favour closing brackets a little so that some runs finish.
      for (int32_t id = 0; id < vocab; ++id) {
        if (table.bytes(id) == "}" || table.bytes(id) == "]") logits[id] += 4.0f;
      }
      TokenChoice t = sampler.Sample(logits.data(), vocab, {}, generated);
      ASSERT_TRUE(std::isfinite(t.logprob));
      for (const auto& [id, lp] : t.top) ASSERT_TRUE(std::isfinite(lp));
      generated.push_back(t.id);
      if (t.id == end) {
        JsonState s;
        ASSERT_TRUE(s.FeedAll(text));
        EXPECT_TRUE(s.Complete()) << text;
        // An independent parser agrees (valid UTF-8 included).
        EXPECT_TRUE(nlohmann::json::accept(text)) << text;
        ++completed;
        break;
      }
      text += table.bytes(t.id);
      JsonState s;
      ASSERT_TRUE(s.FeedAll(text)) << text;
    }
  }
  EXPECT_GT(completed, 0);
  // Complete: only the end tokens stay.
  JsonConstraint done(&table, {3, 5});
  for (char c : std::string("{}")) {
    for (int32_t id = 0; id < vocab; ++id) {
      if (table.bytes(id) == std::string(1, c)) {
        done.Advance(id);
        break;
      }
    }
  }
  ASSERT_TRUE(done.Complete());
  std::vector<float> logits(vocab, 1.0f);
  done.Mask(logits.data(), vocab);
  for (int32_t id = 0; id < vocab; ++id) {
    EXPECT_EQ(std::isinf(logits[id]), id != 3 && id != 5) << id;
  }
}

}  // namespace
}  // namespace moemesh
