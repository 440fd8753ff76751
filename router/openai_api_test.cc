// The OpenAI API's JSON <-> the public messages (no server: tests/cluster_test.py drives the
// HTTP server against a running model).
#include "router/openai_api.h"

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace moemesh {
namespace openai {
namespace {

using json = nlohmann::json;

TEST(OpenAiApiTest, CompletionFieldsMapToTheRequest) {
  auto p = ParseRequest(Endpoint::kCompletions, R"({
      "model": "m", "prompt": "Hello", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
      "top_k": -1, "min_p": 0.1, "seed": 3, "stop": ["a", "b"], "presence_penalty": 0.5,
      "frequency_penalty": -0.5, "repetition_penalty": 1.1, "ignore_eos": true, "logprobs": 2,
      "stream": true, "stream_options": {"include_usage": true}, "experts_per_token": 2,
      "thinking_budget": 5, "n": 1, "echo": false, "response_format": {"type": "json_object"}})",
                        "m");
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->requests.size(), 1u);
  const auto& r = p->requests[0];
  EXPECT_EQ(r.text(), "Hello");
  const auto& s = r.sampling();
  EXPECT_EQ(s.max_tokens(), 7);
  EXPECT_FLOAT_EQ(s.temperature(), 0.5f);
  EXPECT_FLOAT_EQ(s.top_p(), 0.9f);
  EXPECT_TRUE(s.has_top_k());
  EXPECT_EQ(s.top_k(), 0);  // vLLM's -1: off
  EXPECT_FLOAT_EQ(s.min_p(), 0.1f);
  EXPECT_EQ(s.seed(), 3u);
  ASSERT_EQ(s.stop_size(), 2);
  EXPECT_EQ(s.stop(1), "b");
  EXPECT_FLOAT_EQ(s.presence_penalty(), 0.5f);
  EXPECT_FLOAT_EQ(s.frequency_penalty(), -0.5f);
  EXPECT_FLOAT_EQ(s.repetition_penalty(), 1.1f);
  EXPECT_TRUE(s.ignore_eos());
  EXPECT_EQ(s.logprobs(), 2);
  EXPECT_EQ(s.experts_per_token(), 2);
  EXPECT_EQ(s.thinking_budget(), 5);
  EXPECT_EQ(s.response_format(), moemesh::v1::RESPONSE_FORMAT_JSON_OBJECT);
  EXPECT_EQ(p->top_logprobs, 2);
  EXPECT_TRUE(p->stream);
  EXPECT_TRUE(p->include_usage);
}

TEST(OpenAiApiTest, DefaultsLeaveSamplingToTheModel) {
  auto p = ParseRequest(Endpoint::kCompletions, R"({"prompt": [5, 6, 7]})", "m");
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->requests[0].token_ids().ids_size(), 3);
  EXPECT_EQ(p->requests[0].token_ids().ids(2), 7);
  const auto& s = p->requests[0].sampling();
  EXPECT_EQ(s.max_tokens(), 16);  // OpenAI's completions default
  EXPECT_FALSE(s.has_temperature());
  EXPECT_FALSE(s.has_top_p());
  EXPECT_FALSE(s.has_logprobs());
  EXPECT_EQ(p->top_logprobs, -1);
  EXPECT_FALSE(p->stream);
  auto chat = ParseRequest(Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}]})",
                           "m");
  ASSERT_TRUE(chat.ok()) << chat.status();
  EXPECT_FALSE(chat->requests[0].sampling().has_max_tokens());  // chat: up to the context
}

TEST(OpenAiApiTest, SeveralPromptsAndChoices) {
  auto p = ParseRequest(Endpoint::kCompletions,
                        R"({"prompt": ["Hi", [3, 4]], "n": 3, "best_of": 3, "seed": 10,
                            "temperature": 0.7, "max_tokens": 5})",
                        "m");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->n, 3);
  ASSERT_EQ(p->requests.size(), 6u);
  for (int i = 0; i < 6; ++i) {
    const auto& r = p->requests[i];
    if (i < 3) {
      EXPECT_EQ(r.text(), "Hi") << i;
    } else {
      EXPECT_EQ(r.token_ids().ids_size(), 2) << i;
    }
    EXPECT_EQ(r.sampling().seed(), 10u + static_cast<uint64_t>(i % 3)) << i;
    EXPECT_FLOAT_EQ(r.sampling().temperature(), 0.7f);
    EXPECT_EQ(r.sampling().max_tokens(), 5);
  }
  // Token-id prompts, one of them; chat with n; no seed: each choice gets the router's.
  auto ids = ParseRequest(Endpoint::kCompletions, R"({"prompt": [[7], [8, 9]], "n": 2})", "m");
  ASSERT_TRUE(ids.ok()) << ids.status();
  ASSERT_EQ(ids->requests.size(), 4u);
  EXPECT_EQ(ids->requests[2].token_ids().ids(1), 9);
  EXPECT_FALSE(ids->requests[1].sampling().has_seed());
  auto chat = ParseRequest(Endpoint::kChat,
                           R"({"messages": [{"role": "user", "content": "x"}], "n": 2})", "m");
  ASSERT_TRUE(chat.ok()) << chat.status();
  ASSERT_EQ(chat->requests.size(), 2u);
  EXPECT_EQ(chat->requests[1].chat().messages(0).content(), "x");
}

TEST(OpenAiApiTest, ChatMessagesAndTextParts) {
  auto p = ParseRequest(Endpoint::kChat, R"({
      "messages": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                {"type": "text", "text": "there"}]}],
      "max_completion_tokens": 9, "logprobs": true, "top_logprobs": 3})",
                        "m");
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->requests[0].chat().messages_size(), 2);
  EXPECT_EQ(p->requests[0].chat().messages(0).role(), "system");
  EXPECT_EQ(p->requests[0].chat().messages(1).content(), "Hi there");
  EXPECT_EQ(p->requests[0].sampling().max_tokens(), 9);
  EXPECT_EQ(p->top_logprobs, 3);
  EXPECT_EQ(p->requests[0].sampling().logprobs(), 3);
  // logprobs: true alone reports the chosen tokens' (one top entry asked, none shown).
  auto lp = ParseRequest(Endpoint::kChat,
                         R"({"messages": [{"role": "user", "content": "x"}], "logprobs": true})",
                         "m");
  ASSERT_TRUE(lp.ok());
  EXPECT_EQ(lp->top_logprobs, 0);
  EXPECT_EQ(lp->requests[0].sampling().logprobs(), 1);
}

// The empty forms of unsupported fields that some clients always send pass.
TEST(OpenAiApiTest, EmptyToolFieldsPass) {
  auto p = ParseRequest(Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}],
      "tools": [], "tool_choice": "none", "functions": null, "user": "u1"})", "m");
  EXPECT_TRUE(p.ok()) << p.status();
  p = ParseRequest(Endpoint::kCompletions, R"({"prompt": "x", "suffix": ""})", "m");
  EXPECT_TRUE(p.ok()) << p.status();
}

TEST(OpenAiApiTest, TokenizeAndDetokenizeBodies) {
  auto t = ParseTokenize(R"({"model": "m", "prompt": "hi", "add_special_tokens": false})", "m");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->prompt, std::optional<std::string>("hi"));
  EXPECT_FALSE(t->add_special_tokens);
  t = ParseTokenize(R"({"messages": [{"role": "user", "content": "yo"}]})", "m");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE(t->prompt.has_value());
  ASSERT_EQ(t->chat.chat().messages_size(), 1);
  EXPECT_EQ(t->chat.chat().messages(0).content(), "yo");
  EXPECT_EQ(ParseTokenize(R"({"prompt": "x", "model": "n"})", "m").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_NE(ParseTokenize(R"({"prompt": 5})", "m").status().message().find("prompt"),
            std::string::npos);
  auto d = ParseDetokenize(R"({"tokens": [1, 2, 3]})", "m");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(*d, std::vector<int32_t>({1, 2, 3}));
  for (const char* bad : {R"({"tokens": "abc"})", R"({"tokens": [1.5]})", R"({})",
                          R"({"tokens": [99999999999]})"}) {
    EXPECT_NE(ParseDetokenize(bad, "m").status().message().find("tokens"), std::string::npos)
        << bad;
  }
}

TEST(OpenAiApiTest, LogitBiasAndMinTokens) {
  auto p = ParseRequest(Endpoint::kCompletions,
                        R"({"prompt": "x", "logit_bias": {"50": -100, "7": 2.5}, "min_tokens": 3})",
                        "m");
  ASSERT_TRUE(p.ok()) << p.status();
  const moemesh::v1::SamplingParams& s = p->requests[0].sampling();
  EXPECT_EQ(s.logit_bias().size(), 2u);
  EXPECT_EQ(s.logit_bias().at(50), -100.0f);
  EXPECT_EQ(s.logit_bias().at(7), 2.5f);
  EXPECT_EQ(s.min_tokens(), 3);
  EXPECT_EQ(p->requests[0].priority(), 0);
  auto urgent = ParseRequest(Endpoint::kCompletions, R"({"prompt": "x", "n": 2, "priority": -5})",
                             "m");
  ASSERT_TRUE(urgent.ok()) << urgent.status();
  for (const auto& r : urgent->requests) EXPECT_EQ(r.priority(), -5);
  EXPECT_FALSE(ParseRequest(Endpoint::kCompletions, R"({"prompt": "x", "priority": "high"})", "m").ok());
  for (const char* bad : {R"({"prompt": "x", "logit_bias": {"abc": 1}})",
                          R"({"prompt": "x", "logit_bias": {"5": "high"}})",
                          R"({"prompt": "x", "logit_bias": [5]})"}) {
    auto b = ParseRequest(Endpoint::kCompletions, bad, "m");
    ASSERT_FALSE(b.ok()) << bad;
    EXPECT_NE(b.status().message().find("logit_bias"), std::string::npos) << b.status();
  }
}

// response_format json_schema: the schema goes to the request as JSON text with its keys in
// the order they were sent (the order properties are generated in), not sorted.
TEST(OpenAiApiTest, JsonSchemaKeepsItsKeyOrder) {
  auto p = ParseRequest(Endpoint::kChat, R"({"messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "t", "strict": true,
      "schema": {"type": "object", "properties": {"zeta": {"type": "integer"},
      "alpha": {"type": "string"}}, "required": ["zeta", "alpha"]}}}})", "m");
  ASSERT_TRUE(p.ok()) << p.status();
  const moemesh::v1::SamplingParams& s = p->requests[0].sampling();
  EXPECT_EQ(s.response_format(), moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA);
  EXPECT_EQ(s.json_schema(),
            R"({"type":"object","properties":{"zeta":{"type":"integer"},"alpha":{"type":"string"}},)"
            R"("required":["zeta","alpha"]})");
}

TEST(OpenAiApiTest, BadRequestsNameTheField) {
  struct Case {
    Endpoint e;
    const char* body;
    absl::StatusCode code;
    const char* word;
  };
  const Case cases[] = {
      {Endpoint::kCompletions, "not json", absl::StatusCode::kInvalidArgument, "not valid JSON"},
      {Endpoint::kCompletions, R"({"prompt": "x", "temperature": NaN})",
       absl::StatusCode::kInvalidArgument, "not valid JSON (RFC 8259: no NaN"},
      {Endpoint::kChat,
       R"({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function",
           "function": {"name": "f", "parameters": {}}}]})",
       absl::StatusCode::kInvalidArgument, "'tools' is not supported"},
      {Endpoint::kChat,
       R"({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"})",
       absl::StatusCode::kInvalidArgument, "tool_choice"},
      {Endpoint::kCompletions, R"({"prompt": "x", "suffix": "end"})",
       absl::StatusCode::kInvalidArgument, "suffix"},
      {Endpoint::kCompletions, R"({"prompt": "x", "response_format": {"type": "json_schema"}})",
       absl::StatusCode::kInvalidArgument, "json_schema needs"},
      {Endpoint::kCompletions,
       R"({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}})",
       absl::StatusCode::kInvalidArgument, "json_schema needs"},
      {Endpoint::kCompletions, R"({"prompt": "x", "response_format": {"type": "grammar"}})",
       absl::StatusCode::kInvalidArgument, "json_schema"},
      {Endpoint::kCompletions, "[1]", absl::StatusCode::kInvalidArgument,
       "must be a JSON object, not array"},
      {Endpoint::kCompletions, "{}", absl::StatusCode::kInvalidArgument, "prompt"},
      {Endpoint::kCompletions, R"({"prompt": ["a", 5]})", absl::StatusCode::kInvalidArgument,
       "prompt"},
      {Endpoint::kCompletions, R"({"prompt": []})", absl::StatusCode::kInvalidArgument, "prompt"},
      {Endpoint::kCompletions, R"({"prompt": [[1, 2], []]})", absl::StatusCode::kInvalidArgument,
       "prompt"},
      {Endpoint::kCompletions, R"({"prompt": [1, 4294967297]})",
       absl::StatusCode::kInvalidArgument, "out of range"},
      {Endpoint::kCompletions, R"({"prompt": "x", "n": 0})", absl::StatusCode::kInvalidArgument,
       "'n'"},
      {Endpoint::kCompletions, R"({"prompt": ["a", "b", "c"], "n": 50})",
       absl::StatusCode::kInvalidArgument, "150 choices"},
      {Endpoint::kCompletions, R"({"prompt": "x", "n": 2, "best_of": 3})",
       absl::StatusCode::kInvalidArgument, "best_of"},
      {Endpoint::kCompletions, R"({"prompt": "x", "model": "other"})",
       absl::StatusCode::kNotFound, "serves 'm'"},
      {Endpoint::kCompletions, R"({"prompt": "x", "temperature": "hot"})",
       absl::StatusCode::kInvalidArgument, "temperature"},
      {Endpoint::kCompletions, R"({"prompt": "x", "max_tokens": 0})",
       absl::StatusCode::kInvalidArgument, "max_tokens"},
      {Endpoint::kCompletions, R"({"prompt": "x", "max_tokens": 1.5})",
       absl::StatusCode::kInvalidArgument, "max_tokens"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "echo": true})",
       absl::StatusCode::kInvalidArgument, "echo"},
      {Endpoint::kCompletions, R"({"prompt": "x", "echo": false, "max_tokens": 0})",
       absl::StatusCode::kInvalidArgument, "max_tokens"},
      {Endpoint::kChat,
       R"({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}})",
       absl::StatusCode::kInvalidArgument, "json_schema"},
      {Endpoint::kCompletions, R"({"prompt": "x", "response_format": "json"})",
       absl::StatusCode::kInvalidArgument, "response_format"},
      {Endpoint::kCompletions, R"({"prompt": "x", "stop": 5})",
       absl::StatusCode::kInvalidArgument, "stop"},
      {Endpoint::kCompletions, R"({"prompt": "x", "logprobs": 21})",
       absl::StatusCode::kInvalidArgument, "logprobs"},
      {Endpoint::kCompletions, R"({"prompt": "x", "experts_per_token": 4294967297})",
       absl::StatusCode::kInvalidArgument, "experts_per_token"},
      {Endpoint::kChat, R"({"messages": []})", absl::StatusCode::kInvalidArgument, "messages"},
      {Endpoint::kChat, R"({"messages": [{"content": "x"}]})", absl::StatusCode::kInvalidArgument,
       "role"},
      {Endpoint::kChat,
       R"({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})",
       absl::StatusCode::kInvalidArgument, "only text"},
      {Endpoint::kChat, R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})",
       absl::StatusCode::kInvalidArgument, "top_logprobs"},
  };
  for (const Case& c : cases) {
    auto p = ParseRequest(c.e, c.body, "m");
    EXPECT_EQ(p.status().code(), c.code) << c.body;
    EXPECT_NE(p.status().message().find(c.word), std::string::npos)
        << c.body << ": " << p.status().message();
  }
  EXPECT_EQ(HttpStatus(absl::InvalidArgumentError("x")), 400);
  EXPECT_EQ(HttpStatus(absl::NotFoundError("x")), 404);
  EXPECT_EQ(HttpStatus(absl::ResourceExhaustedError("x")), 429);
  EXPECT_EQ(HttpStatus(absl::UnavailableError("x")), 503);
  EXPECT_EQ(HttpStatus(absl::InternalError("x")), 500);
  const json e = ErrorBody(absl::ResourceExhaustedError("queue full"));
  EXPECT_EQ(e["error"]["message"], "queue full");
  EXPECT_EQ(e["error"]["type"], "rate_limit_error");
}

moemesh::v1::GenerateResponse Response(const std::string& text, std::vector<int> ids,
                                       moemesh::v1::FinishReason finish = {}) {
  moemesh::v1::GenerateResponse r;
  r.set_text(text);
  for (int id : ids) {
    r.add_ids(id);
    auto* lp = r.add_logprobs();
    lp->mutable_chosen()->set_id(id);
    lp->mutable_chosen()->set_text(absl::StrCat("t", id));
    lp->mutable_chosen()->set_logprob(-0.5f * id);
    for (int k = 0; k < 3; ++k) {
      auto* top = lp->add_top();
      top->set_id(k);
      top->set_text(absl::StrCat("t", k));
      top->set_logprob(-1.0f * k);
    }
  }
  if (finish != moemesh::v1::FINISH_REASON_UNSPECIFIED) {
    r.set_finish_reason(finish);
    r.set_prompt_tokens(4);
    r.set_completion_tokens(3);
  }
  return r;
}

TEST(OpenAiApiTest, CompletionResponseAndChunks) {
  ResponseBuilder b(Endpoint::kCompletions, "cmpl-1", "m", 100, /*top_logprobs=*/2);
  const json c1 = b.Chunk(Response("Hel", {1, 2}));
  EXPECT_EQ(c1["object"], "text_completion");
  EXPECT_EQ(c1["choices"][0]["text"], "Hel");
  EXPECT_TRUE(c1["choices"][0]["finish_reason"].is_null());
  EXPECT_EQ(c1["choices"][0]["logprobs"]["tokens"], json({"t1", "t2"}));
  EXPECT_EQ(c1["choices"][0]["logprobs"]["text_offset"], json({0, 2}));
  EXPECT_EQ(c1["choices"][0]["logprobs"]["top_logprobs"][0].size(), 2u);  // trimmed to 2
  const json c2 = b.Chunk(Response("lo", {3}, moemesh::v1::FINISH_REASON_LENGTH));
  EXPECT_EQ(c2["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(c2["choices"][0]["logprobs"]["text_offset"], json({4}));
  const json f = b.Final();
  EXPECT_EQ(f["id"], "cmpl-1");
  EXPECT_EQ(f["model"], "m");
  EXPECT_EQ(f["created"], 100);
  EXPECT_EQ(f["choices"][0]["text"], "Hello");
  EXPECT_EQ(f["choices"][0]["logprobs"]["token_logprobs"], json({-0.5, -1.0, -1.5}));
  EXPECT_EQ(f["choices"][0]["logprobs"]["text_offset"], json({0, 2, 4}));
  EXPECT_EQ(f["usage"], json({{"prompt_tokens", 4}, {"completion_tokens", 3},
                              {"total_tokens", 7}}));
  EXPECT_EQ(b.UsageChunk()["usage"]["total_tokens"], 7);
  EXPECT_TRUE(b.UsageChunk()["choices"].empty());
}

TEST(OpenAiApiTest, ChatResponseAndChunks) {
  ResponseBuilder b(Endpoint::kChat, "chatcmpl-2", "m", 5, /*top_logprobs=*/-1);
  EXPECT_EQ(b.RoleChunk()["choices"][0]["delta"]["role"], "assistant");
  const json c = b.Chunk(Response("Hi", {7}));
  EXPECT_EQ(c["object"], "chat.completion.chunk");
  EXPECT_EQ(c["choices"][0]["delta"]["content"], "Hi");
  EXPECT_TRUE(c["choices"][0]["logprobs"].is_null());
  const json end = b.Chunk(Response("", {}, moemesh::v1::FINISH_REASON_STOP));
  EXPECT_TRUE(end["choices"][0]["delta"].empty());
  EXPECT_EQ(end["choices"][0]["finish_reason"], "stop");
  const json f = b.Final();
  EXPECT_EQ(f["object"], "chat.completion");
  EXPECT_EQ(f["choices"][0]["message"], json({{"role", "assistant"}, {"content", "Hi"}}));
  EXPECT_EQ(f["choices"][0]["finish_reason"], "stop");

  ResponseBuilder lp(Endpoint::kChat, "chatcmpl-3", "m", 5, /*top_logprobs=*/1);
  lp.Add(Response("A", {2}, moemesh::v1::FINISH_REASON_STOP));
  const json content = lp.Final()["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 1u);
  EXPECT_EQ(content[0]["token"], "t2");
  EXPECT_EQ(content[0]["logprob"], -1.0);
  EXPECT_EQ(content[0]["bytes"], json({'t', '2'}));
  EXPECT_EQ(content[0]["top_logprobs"].size(), 1u);
}

TEST(OpenAiApiTest, EchoPutsThePromptFirst) {
  auto p = ParseRequest(Endpoint::kCompletions,
                        R"({"prompt": [5, 6], "echo": true, "logprobs": 1, "max_tokens": 0})", "m");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(p->echo);
  EXPECT_TRUE(p->prompt_only);
  EXPECT_EQ(p->requests[0].sampling().max_tokens(), 1);  // computed, then hidden
  EXPECT_EQ(p->requests[0].sampling().prompt_logprobs(), 1);
  auto plain = ParseRequest(Endpoint::kCompletions, R"({"prompt": "a", "echo": true})", "m");
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(plain->requests[0].sampling().has_prompt_logprobs());  // no logprobs asked

  // The first response carries the prompt's scores (first unscored) before its own token's.
  auto first = Response("lo", {3});
  for (int id : {1, 2}) {
    auto* e = first.add_prompt_logprobs();
    e->mutable_chosen()->set_id(id);
    e->mutable_chosen()->set_text(absl::StrCat("t", id));
    e->mutable_chosen()->set_logprob(id == 1 ? 0.0f : -2.0f);
    if (id == 2) {
      auto* t = e->add_top();
      t->set_text("t9");
      t->set_logprob(-0.1f);
    }
  }
  ResponseBuilder b(Endpoint::kCompletions, "cmpl-1", "m", 1, /*top_logprobs=*/1);
  b.Echo("t1t2", /*prompt_only=*/false);
  const json c = b.Chunk(first);
  EXPECT_EQ(c["choices"][0]["text"], "t1t2lo");
  const json lp = c["choices"][0]["logprobs"];
  EXPECT_EQ(lp["tokens"], json({"t1", "t2", "t3"}));
  EXPECT_TRUE(lp["token_logprobs"][0].is_null());
  EXPECT_TRUE(lp["top_logprobs"][0].is_null());
  EXPECT_EQ(lp["token_logprobs"][1], -2.0);
  EXPECT_EQ(lp["top_logprobs"][1], json({{"t9", -0.1f}}));
  EXPECT_EQ(lp["text_offset"], json({0, 2, 4}));
  // A later response is not echoed again.
  EXPECT_EQ(b.Chunk(Response("!", {4}))["choices"][0]["text"], "!");
  // max_tokens 0: the generated token is hidden, the usage counts none.
  ResponseBuilder only(Endpoint::kCompletions, "cmpl-2", "m", 1, /*top_logprobs=*/1);
  only.Echo("t1t2", /*prompt_only=*/true);
  only.Add(first);
  only.Add(Response("", {}, moemesh::v1::FINISH_REASON_LENGTH));
  const json f = only.Final();
  EXPECT_EQ(f["choices"][0]["text"], "t1t2");
  EXPECT_EQ(f["choices"][0]["logprobs"]["tokens"], json({"t1", "t2"}));
  EXPECT_EQ(f["usage"]["completion_tokens"], 0);
}

TEST(OpenAiApiTest, SeveralChoicesMakeOneResponse) {
  // Two prompts x two choices: indexes in order, each prompt's tokens counted once.
  std::vector<ResponseBuilder> b;
  for (int i = 0; i < 4; ++i) b.emplace_back(Endpoint::kCompletions, "cmpl-9", "m", 1, -1, i);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(b[i].Chunk(Response(absl::StrCat("c", i), {1}))["choices"][0]["index"], i);
    moemesh::v1::GenerateResponse end = Response("", {}, moemesh::v1::FINISH_REASON_LENGTH);
    end.set_prompt_tokens(i < 2 ? 4 : 6);
    end.set_completion_tokens(i + 1);
    b[i].Add(end);
  }
  const json f = Final(b, /*n=*/2);
  ASSERT_EQ(f["choices"].size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(f["choices"][i]["index"], i);
    EXPECT_EQ(f["choices"][i]["text"], absl::StrCat("c", i));
  }
  EXPECT_EQ(f["id"], "cmpl-9");
  EXPECT_EQ(f["usage"], json({{"prompt_tokens", 10}, {"completion_tokens", 10},
                              {"total_tokens", 20}}));
  EXPECT_EQ(UsageChunk(b, 2)["usage"]["prompt_tokens"], 10);
  ResponseBuilder chat(Endpoint::kChat, "chatcmpl-1", "m", 1, -1, 3);
  EXPECT_EQ(chat.RoleChunk()["choices"][0]["index"], 3);
}

}  // namespace
}  // namespace openai
}  // namespace moemesh
