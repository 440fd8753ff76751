// Structured outputs: JSON Schema compilation (clear errors for what the subset lacks), the
// byte recognizer in schema mode against hand-written documents and refused bytes, and sampling
// under a schema checked by an independent parse of the text (json_constraint_test checks the
// token table in schema mode).
#include "engine/json_schema.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/json_constraint.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"

namespace moemesh {
namespace {

constexpr char kPerson[] = R"({
  "type": "object",
  "title": "person",
  "properties": {
    "name": {"type": "string", "description": "who", "maxLength": 6},
    "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"enum": ["a", "b", 1, 12]}, "minItems": 1,
             "maxItems": 2},
    "nick": {"type": ["string", "null"]},
    "ok": {"type": "boolean"}
  },
  "required": ["name", "age", "tags", "ok"],
  "additionalProperties": false
})";

std::shared_ptr<const JsonSchema> MustCompile(const std::string& text) {
  auto s = JsonSchema::Compile(text);
  EXPECT_TRUE(s.ok()) << s.status() << "\n" << text;
  return s.ok() ? *s : nullptr;
}

// Feeds `doc` byte by byte; true when every byte is accepted and the value is complete at the end
// (and not before).
::testing::AssertionResult Accepts(const JsonSchema& schema, const std::string& doc) {
  JsonState s(&schema);
  for (size_t i = 0; i < doc.size(); ++i) {
    if (s.Complete()) return ::testing::AssertionFailure() << "complete before byte " << i;
    if (!s.Feed(static_cast<uint8_t>(doc[i]))) {
      return ::testing::AssertionFailure() << "refused byte " << i << " ('" << doc[i] << "') of "
                                           << doc;
    }
  }
  if (!s.Complete()) return ::testing::AssertionFailure() << "incomplete: " << doc;
  return ::testing::AssertionSuccess();
}

// For each {prefix, byte}: the prefix is accepted and the byte after it refused.
void ExpectRefused(const JsonSchema& schema,
                   const std::vector<std::pair<std::string, char>>& cases) {
  for (const auto& [prefix, bad] : cases) {
    JsonState s(&schema);
    ASSERT_TRUE(s.FeedAll(prefix)) << prefix;
    EXPECT_FALSE(s.Feed(static_cast<uint8_t>(bad))) << prefix << " + '" << bad << "'";
  }
}

TEST(JsonSchemaTest, UnsupportedSchemasAreClearErrors) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{oops", "not JSON"},
      {R"({"type": "string"})", "root must be an object"},
      {R"({"type": ["object", "null"]})", "root must be an object"},
      {R"({"type": "object", "properties": {"a": {"type": "string", "pattern": "x+"}}})",
       "/properties/a: keyword 'pattern' is not supported"},
      {R"({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}})",
       "format \"email\" is not supported"},
      {R"({"type": "object", "properties": {"a": {"type": "text"}}})", "unknown type 'text'"},
      {R"({"type": "object", "properties": {"a": {}}, "required": ["b"]})",
       "required names 'b'"},
      {R"({"type": "object", "properties": {"a": {"anyOf": [{"type": "object"},
           {"type": "object", "properties": {}}]}}})",
       "told apart by their first byte"},
      {R"({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}},
           "$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"$ref": "#/$defs/x"}}})",
       "refer to each other"},
      {R"({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})",
       "names no definition"},
      {R"({"type": "object", "properties": {"a": {"$ref": "http://x/y"}}})", "not supported"},
      {R"({"type": "object", "properties": {"a": {"enum": []}}})", "non-empty"},
      {R"({"type": "object", "properties": {"a": {"items": [{}]}}})", "tuples"},
      {R"({"type": "object", "properties": {"a": {"minItems": 3, "maxItems": 2}}})",
       "minItems is more than maxItems"},
      {R"({"type": "object", "properties": {"a": {"type": "string", "maxLength": -1}}})",
       "maxLength must be an integer"},
      {R"({"type": "object", "properties": {"a": {"type": "number", "minimum": 0}}})",
       "minimum is supported on integers only"},
      {R"({"type": "object", "properties": {"a": {"type": "integer", "maximum": 100}}})",
       "integer bounds are supported as"},
      {R"({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
           "maximum": 1000}}})",
       "integer bounds are supported as"},
      {R"({"type": "object", "properties": {"a": {"type": "integer", "minimum": 5,
           "maximum": 1}}})",
       "no integer lies between"},
  };
  for (const auto& [schema, want] : cases) {
    auto s = JsonSchema::Compile(schema);
    ASSERT_FALSE(s.ok()) << schema;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.status().message().find(want), std::string::npos)
        << s.status() << " lacks '" << want << "'";
  }
  // Deep nesting is an error, not a stack overflow.
  std::string deep = R"({"type": "object", "properties": {"a": )";
  for (int i = 0; i < 100000; ++i) deep += R"({"items": )";
  deep += "{}" + std::string(100000, '}') + "}}";
  auto d = JsonSchema::Compile(deep);
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("nest deeper"), std::string::npos) << d.status();
  std::string many = R"({"type": "object", "properties": {"a": {"enum": [)";
  for (int i = 0; i <= JsonSchema::kMaxChoices; ++i) many += (i ? "," : "") + std::to_string(i);
  many += "]}}}";
  EXPECT_FALSE(JsonSchema::Compile(many).ok());
}

TEST(JsonSchemaStateTest, AcceptsDocumentsOfTheSchema) {
  auto person = MustCompile(kPerson);
  ASSERT_NE(person, nullptr);
  for (const std::string doc : {
           std::string(R"({"name": "x", "age": -3, "tags": ["a"], "ok": true})"),
           std::string(R"({"name":"","age":0,"tags":[12,1],"nick":null,"ok":false})"),
           std::string("{\n  \"name\": \"\\u00e9\",\n  \"age\": 41,\n  \"tags\": [\"b\", 1],\n"
                       "  \"nick\": \"j\",\n  \"ok\": true\n}"),
       }) {
    EXPECT_TRUE(Accepts(*person, doc));
  }
  // Recursion through $ref, with anyOf of an object and null.
  auto list = MustCompile(R"({"$defs": {"node": {"type": "object", "properties": {
      "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
      "required": ["v", "next"]}}, "$ref": "#/$defs/node"})");
  ASSERT_NE(list, nullptr);
  EXPECT_TRUE(Accepts(*list, R"({"v": 1, "next": {"v": 2, "next": {"v": 3, "next": null}}})"));
  // An object without properties is any object; {} where additionalProperties is false.
  auto free = MustCompile(R"({"type": "object", "properties": {"meta": {"type": "object"},
      "any": {}, "none": {"type": "object", "additionalProperties": false}},
      "required": ["meta", "any", "none"]})");
  ASSERT_NE(free, nullptr);
  EXPECT_TRUE(Accepts(*free, R"({"meta": {"x": [1, {"y": null}]}, "any": [2.5e3], "none": {}})"));
  // additionalProperties as a schema without properties: a map whose values follow it.
  auto map = MustCompile(R"({"type": "object", "properties": {"counts": {"type": "object",
      "additionalProperties": {"type": "integer"}}}, "required": ["counts"]})");
  ASSERT_NE(map, nullptr);
  EXPECT_TRUE(Accepts(*map, R"({"counts": {"a": 1, "b c": -20}})"));
  EXPECT_TRUE(Accepts(*map, R"({"counts": {}})"));
  JsonState m(map.get());
  ASSERT_TRUE(m.FeedAll(R"({"counts": {"a": 1)"));
  EXPECT_FALSE(m.Feed('.'));  // integers
  JsonState m2(map.get());
  ASSERT_TRUE(m2.FeedAll(R"({"counts": {"a": )"));
  EXPECT_FALSE(m2.Feed('"'));
  // minLength / maxLength count characters: a multi-byte character or an escape (a surrogate
  // pair too) is one.
  auto code = MustCompile(R"({"properties": {"c": {"type": "string", "minLength": 2,
      "maxLength": 3}}, "required": ["c"]})");
  ASSERT_NE(code, nullptr);
  for (const std::string ok : {R"({"c": "ab"})", R"({"c": "abc"})",
                               "{\"c\": \"\xc3\xa9\xe6\xbc\xa2x\"}", R"({"c": "\n\t"})",
                               R"({"c": "\ud83d\ude00\u00e9"})"}) {
    EXPECT_TRUE(Accepts(*code, ok));
  }
  ExpectRefused(*code, {{R"({"c": "a)", '"'}, {R"({"c": "abc)", 'd'}, {R"({"c": "ab\n)", '\\'},
                         {"{\"c\": \"\xc3\xa9\xe6\xbc\xa2x", '\xc3'}});
  // Integer bounds: a small range becomes its values; minimum 0 or 1 alone drops the minus sign
  // (and for 1 a leading 0).
  auto ints = MustCompile(R"({"properties": {"stars": {"type": "integer", "minimum": 1,
      "maximum": 5}, "count": {"type": "integer", "minimum": 0}, "id": {"type": "integer",
      "exclusiveMinimum": 0}}, "required": ["stars", "count", "id"]})");
  ASSERT_NE(ints, nullptr);
  for (const std::string ok : {R"({"stars": 1, "count": 0, "id": 1})",
                               R"({"stars": 5, "count": 1234, "id": 90})"}) {
    EXPECT_TRUE(Accepts(*ints, ok));
  }
  ExpectRefused(*ints, {{R"({"stars": )", '6'}, {R"({"stars": )", '0'}, {R"({"stars": )", '-'},
                         {R"({"stars": 5)", '0'}, {R"({"stars": 3, "count": )", '-'},
                         {R"({"stars": 3, "count": 2, "id": )", '0'},
                         {R"({"stars": 3, "count": 2, "id": )", '-'}});
  // format uuid: 8-4-4-4-12 hex digits.
  auto uuid = MustCompile(R"({"properties": {"u": {"type": "string", "format": "uuid"}},
      "required": ["u"]})");
  ASSERT_NE(uuid, nullptr);
  EXPECT_TRUE(Accepts(*uuid, R"({"u": "123e4567-e89b-12d3-A456-426614174000"})"));
  ExpectRefused(*uuid, {{R"({"u": ")", 'g'}, {R"({"u": "123e4567)", '0'}, {R"({"u": "123e456)", '-'},
                         {R"({"u": "123e4567-e89b-12d3-a456-42661417400)", '"'},
                         {R"({"u": "123e4567-e89b-12d3-a456-426614174000)", '0'}, {R"({"u": ")", '\\'}});
  // format date and date-time: real days (leap years counted) and times, in UTC.
  auto when = MustCompile(R"({"properties": {"d": {"type": "string", "format": "date"},
      "t": {"type": "string", "format": "date-time"}}, "required": ["d", "t"]})");
  ASSERT_NE(when, nullptr);
  for (const std::string ok : {R"({"d": "2024-02-29", "t": "2000-02-29T23:59:59Z"})",
                               R"({"d": "1999-12-31", "t": "2023-04-30T00:00:00Z"})",
                               R"({"d": "2023-01-31", "t": "1970-01-01T19:05:07Z"})"}) {
    EXPECT_TRUE(Accepts(*when, ok));
  }
  ExpectRefused(*when, {{R"({"d": "2023-02-2)", '9'},   // not a leap year
                         {R"({"d": "1900-02-2)", '9'},   // nor is 1900
                         {R"({"d": "2024-02-)", '3'},
                         {R"({"d": "2024-04-3)", '1'},   // April has 30 days
                         {R"({"d": "2024-1)", '3'},
                         {R"({"d": "2024-0)", '0'},
                         {R"({"d": "2024-05-0)", '0'},
                         {R"({"d": "2024)", '/'},
                         {R"({"d": "2024-05-06)", 'T'},  // a date only
                         {R"({"d": "2024-05-06", "t": "2024-05-06T2)", '4'},
                         {R"({"d": "2024-05-06", "t": "2024-05-06T12:)", '6'},
                         {R"({"d": "2024-05-06", "t": "2024-05-06T12:00:00)", '+'}});
  // Keys and enum strings are written as JSON writes them (escaped).
  auto escaped = MustCompile(R"({"properties": {"a\"b": {"const": "c\nd"}}, "required": ["a\"b"]})");
  ASSERT_NE(escaped, nullptr);
  EXPECT_TRUE(Accepts(*escaped, R"({"a\"b": "c\nd"})"));
  // Optional properties may be left out, in order.
  auto optional = MustCompile(R"({"properties": {"a": {"type": "number"}, "b": {"type": "number"},
      "c": {"type": "number"}}, "required": ["c"]})");
  ASSERT_NE(optional, nullptr);
  for (const std::string doc : {R"({"c": 1})", R"({"a": 1.5, "c": 2})", R"({"b": 0, "c": 3e2})",
                                R"({"a": 1, "b": 2, "c": 3})"}) {
    EXPECT_TRUE(Accepts(*optional, doc));
  }
}

TEST(JsonSchemaStateTest, RefusesEachByteTheSchemaDoesNotAllow) {
  auto person = MustCompile(kPerson);
  ASSERT_NE(person, nullptr);
  const std::string head = R"({"name": "x", "age": 7, "tags": )";
  // {accepted prefix, the byte refused after it}
  const std::vector<std::pair<std::string, char>> cases = {
      {"", '['},
      {"{", '}'},                               // name is required
      {"{\"", 'a'},                             // the first key is "name"
      {R"({"name": "x", ")", 'n'},              // then "age": nick comes later
      {R"({"name": "x", "age": 1)", '.'},       // an integer
      {R"({"name": "x", "age": 1)", 'e'},
      {R"({"name": "x", "age": )", '"'},        // not a string
      {head, '{'},                              // an array
      {head + "[", ']'},                        // minItems 1
      {head + "[\"a\", \"b\"", ','},            // maxItems 2
      {head + "[\"", 'c'},                      // enum
      {head + "[12", '3'},
      {head + "[1", '}'},
      {head + "[\"a\"], \"nick\": ", 't'},      // a string or null
      {head + "[\"a\"]", '}'},                  // ok is required
      {head + "[\"a\"], \"ok\": true", ','},    // no key after the last
      {head + "[\"a\"], \"ok\": true}", ' '},   // nothing after the root
  };
  ExpectRefused(*person, cases);
  // Enum values that are prefixes of others: 1 ends at the byte after it.
  for (const std::string tail : {"[1]", "[12]", "[1, 12]", "[12, 1]"}) {
    EXPECT_TRUE(Accepts(*person, head + tail + R"(, "ok": true})")) << tail;
  }
  // Plain JSON mode is unchanged by the schema's rules.
  JsonState plain;
  EXPECT_TRUE(plain.FeedAll(R"({"age": 1.5e3, "tags": []})"));
  EXPECT_TRUE(plain.Complete());
}

// Sampling from random logits over the real vocabulary under the schema: every text that ends
// with the end token parses (nlohmann) as a document the schema describes.
TEST(JsonSchemaConstraintTest, SampledDocumentsFollowTheSchema) {
  auto tok = Tokenizer::FromFile("models/pydoc-moe-17m/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const TokenTable table((*tok)->AllTokenBytes());
  const int64_t vocab = (*tok)->vocab_size();
  auto person = MustCompile(kPerson);
  ASSERT_NE(person, nullptr);
  const int32_t end = 0;
  std::mt19937 rng(11);
  std::normal_distribution<float> noise(0.0f, 2.0f);
  int completed = 0;
  for (int run = 0; run < 16; ++run) {
    SamplingConfig c;
    c.temperature = 1.0f;
    c.seed = run;
    Sampler sampler(c);
    sampler.Constrain(std::make_unique<JsonConstraint>(&table, std::vector<int32_t>{end}, person));
    std::string text;
    std::vector<int32_t> generated;
    for (int step = 0; step < 200; ++step) {
      std::vector<float> logits(vocab);
      for (float& l : logits) l = noise(rng);
      // Favour tokens that end strings and containers so that runs finish.
      for (int32_t id = 0; id < vocab; ++id) {
        const std::string& b = table.bytes(id);
        if (b.find_first_of("\"]}") != std::string::npos) logits[id] += 6.0f;
      }
      logits[end] += 6.0f;
      const int32_t id = sampler.Sample(logits.data(), vocab, {}, generated).id;
      generated.push_back(id);
      if (id == end) break;
      text += table.bytes(id);
    }
    if (generated.back() != end) continue;
    ++completed;
    const nlohmann::ordered_json j = nlohmann::ordered_json::parse(text, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << text;
    ASSERT_TRUE(j.is_object()) << text;
    std::vector<std::string> keys;
    for (const auto& [k, v] : j.items()) keys.push_back(k);
    const bool nick = j.contains("nick");
    EXPECT_EQ(keys, nick ? std::vector<std::string>({"name", "age", "tags", "nick", "ok"})
                         : std::vector<std::string>({"name", "age", "tags", "ok"}))
        << text;
    ASSERT_TRUE(j["name"].is_string()) << text;
    const std::string name = j["name"].get<std::string>();
    EXPECT_LE(std::count_if(name.begin(), name.end(),
                            [](char ch) { return (static_cast<uint8_t>(ch) & 0xC0) != 0x80; }),
              6)
        << text;
    // An integer (one past int64 parses as a float with no fraction).
    ASSERT_TRUE(j["age"].is_number()) << text;
    EXPECT_EQ(std::floor(j["age"].get<double>()), j["age"].get<double>()) << text;
    ASSERT_TRUE(j["tags"].is_array()) << text;
    EXPECT_GE(j["tags"].size(), 1u);
    EXPECT_LE(j["tags"].size(), 2u);
    for (const auto& t : j["tags"]) {
      EXPECT_TRUE(t == "a" || t == "b" || t == 1 || t == 12) << text;
    }
    if (nick) EXPECT_TRUE(j["nick"].is_string() || j["nick"].is_null()) << text;
    EXPECT_TRUE(j["ok"].is_boolean()) << text;
  }
  EXPECT_GT(completed, 4);
}

}  // namespace
}  // namespace moemesh
