#include "router/openai_api.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace moemesh {
namespace openai {
namespace {

using json = nlohmann::json;
using moemesh::v1::FinishReason;

absl::Status Bad(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("field '", field, "' ", why));
}

// An optional number field; InvalidArgument when present with another type.
absl::StatusOr<std::optional<double>> Number(const json& j, const char* field) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return std::optional<double>();
  if (!it->is_number()) return Bad(field, "must be a number");
  return std::optional<double>(it->get<double>());
}

// An optional integer field (a number with no fraction).
absl::StatusOr<std::optional<int64_t>> Integer(const json& j, const char* field) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return std::optional<int64_t>();
  if (!it->is_number_integer()) return Bad(field, "must be an integer");
  return std::optional<int64_t>(it->get<int64_t>());
}

absl::StatusOr<std::optional<bool>> Bool(const json& j, const char* field) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return std::optional<bool>();
  if (!it->is_boolean()) return Bad(field, "must be true or false");
  return std::optional<bool>(it->get<bool>());
}

// A message's content: a string, or text parts [{"type": "text", "text": ...}].
absl::StatusOr<std::string> Content(const json& content) {
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) return Bad("messages", "content must be a string or text parts");
  std::string text;
  for (const json& part : content) {
    if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
        !part["text"].is_string()) {
      return Bad("messages", "content parts must be {\"type\": \"text\", \"text\": ...}: only "
                             "text inputs are supported");
    }
    text += part["text"].get<std::string>();
  }
  return text;
}

std::string FinishName(FinishReason r) {
  switch (r) {
    case moemesh::v1::FINISH_REASON_STOP:
      return "stop";
    case moemesh::v1::FINISH_REASON_LENGTH:
      return "length";
    case moemesh::v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    default:
      return "";
  }
}

json Bytes(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(static_cast<int>(c));
  return b;
}

}  // namespace

// The body as a JSON object whose "model", if given, is the served one.
absl::StatusOr<json> ParseBody(std::string_view body, const std::string& served_model) {
  json j = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(
        "the request body is not valid JSON (RFC 8259: no NaN or Infinity, strings in UTF-8)");
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the request body must be a JSON object, not ", j.type_name()));
  }
  if (auto it = j.find("model"); it != j.end() && !it->is_null()) {
    if (!it->is_string()) return Bad("model", "must be a string");
    if (it->get<std::string>() != served_model) {
      return absl::NotFoundError(absl::StrCat("model '", it->get<std::string>(),
                                              "' is not served here; this server serves '",
                                              served_model, "'"));
    }
  }
  return j;
}

absl::StatusOr<TokenizeRequest> ParseTokenize(std::string_view body,
                                              const std::string& served_model) {
  auto j = ParseBody(body, served_model);
  if (!j.ok()) return j.status();
  TokenizeRequest out;
  if (j->contains("messages")) {
    auto chat = ParseRequest(Endpoint::kChat, body, served_model);
    if (!chat.ok()) return chat.status();
    out.chat = std::move(chat->requests[0]);
    return out;
  }
  auto it = j->find("prompt");
  if (it == j->end() || !it->is_string()) {
    return Bad("prompt", "is required: a string (or give chat 'messages')");
  }
  out.prompt = it->get<std::string>();
  auto add = Bool(*j, "add_special_tokens");
  if (!add.ok()) return add.status();
  out.add_special_tokens = add->value_or(true);
  return out;
}

absl::StatusOr<std::vector<int32_t>> ParseDetokenize(std::string_view body,
                                                     const std::string& served_model) {
  auto j = ParseBody(body, served_model);
  if (!j.ok()) return j.status();
  auto it = j->find("tokens");
  if (it == j->end() || !it->is_array()) return Bad("tokens", "is required: a list of token ids");
  std::vector<int32_t> ids;
  for (const json& t : *it) {
    if (!t.is_number_integer() || t.get<int64_t>() < INT32_MIN || t.get<int64_t>() > INT32_MAX) {
      return Bad("tokens", "must hold token ids (integers)");
    }
    ids.push_back(t.get<int32_t>());
  }
  return ids;
}

absl::StatusOr<ParsedRequest> ParseRequest(Endpoint endpoint, std::string_view body,
                                           const std::string& served_model) {
  auto parsed = ParseBody(body, served_model);
  if (!parsed.ok()) return parsed.status();
  const json& j = *parsed;
  ParsedRequest out;
  // The fields every choice shares; the prompts go into `prompts` (one entry for chat).
  moemesh::v1::GenerateRequest req;
  std::vector<moemesh::v1::GenerateRequest> prompts;
  moemesh::v1::SamplingParams* s = req.mutable_sampling();
  // Fields whose meaning this server does not implement are refused rather than ignored (a
  // client that sends tools expects tool calls); their empty forms pass.
  for (const char* field : {"tools", "functions"}) {
    if (auto it = j.find(field); it != j.end() && !it->is_null() && !it->empty()) {
      return Bad(field, "is not supported (no tool calling); use response_format json_schema "
                        "for structured answers");
    }
  }
  for (const char* field : {"tool_choice", "function_call"}) {
    if (auto it = j.find(field); it != j.end() && !it->is_null() &&
        !(it->is_string() && (*it == "none" || *it == "auto"))) {
      return Bad(field, "is not supported (no tool calling)");
    }
  }
  if (auto it = j.find("suffix"); it != j.end() && !it->is_null() &&
      !(it->is_string() && it->get<std::string>().empty())) {
    return Bad("suffix", "is not supported (no fill-in-the-middle)");
  }
  if (endpoint == Endpoint::kCompletions) {
    auto it = j.find("prompt");
    if (it == j.end()) return Bad("prompt", "is required");
    // One prompt: a string or token ids. Several: an array of those.
    auto one = [&](const json& p) -> absl::Status {
      moemesh::v1::GenerateRequest g;
      if (p.is_string()) {
        g.set_text(p.get<std::string>());
      } else if (p.is_array() && !p.empty()) {
        for (const json& id : p) {
          if (!id.is_number_integer()) {
            return Bad("prompt", "must be a string, token ids, or an array of either");
          }
          const int64_t v = id.get<int64_t>();
          if (v < INT32_MIN || v > INT32_MAX) return Bad("prompt", "holds an id out of range");
          g.mutable_token_ids()->add_ids(static_cast<int32_t>(v));
        }
      } else {
        return Bad("prompt", "must be a string, token ids, or an array of either (none empty)");
      }
      prompts.push_back(std::move(g));
      return absl::OkStatus();
    };
    if (it->is_array() && !it->empty() && ((*it)[0].is_string() || (*it)[0].is_array())) {
      for (const json& p : *it) {
        if (p.is_number()) return Bad("prompt", "mixes token ids and prompts");
        if (absl::Status st = one(p); !st.ok()) return st;
      }
    } else if (absl::Status st = one(*it); !st.ok()) {
      return st;
    }
    s->set_max_tokens(16);  // OpenAI's default for completions
  } else {
    auto it = j.find("messages");
    if (it == j.end() || !it->is_array() || it->empty()) {
      return Bad("messages", "must be a non-empty array of {role, content}");
    }
    for (const json& m : *it) {
      if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) {
        return Bad("messages", "entries need a string 'role'");
      }
      auto content = Content(m.value("content", json("")));
      if (!content.ok()) return content.status();
      if (prompts.empty()) prompts.emplace_back();
      auto* cm = prompts[0].mutable_chat()->add_messages();
      cm->set_role(m["role"].get<std::string>());
      cm->set_content(*content);
    }
  }
  auto echo = Bool(j, "echo");
  if (!echo.ok()) return echo.status();
  out.echo = echo->value_or(false);
  if (out.echo && endpoint == Endpoint::kChat) return Bad("echo", "is for completions only");
  for (const char* field : {"max_tokens", "max_completion_tokens"}) {
    auto v = Integer(j, field);
    if (!v.ok()) return v.status();
    if (v->has_value()) {
      // 0 with echo: the prompt alone (scored with logprobs); one token is computed and dropped.
      if (**v == 0 && out.echo) {
        out.prompt_only = true;
        s->set_max_tokens(1);
        continue;
      }
      if (**v < 1) return Bad(field, out.echo ? "must be >= 0" : "must be >= 1");
      s->set_max_tokens(static_cast<int32_t>(std::min<int64_t>(**v, 1 << 30)));
    }
  }
  struct FloatField {
    const char* name;
    void (moemesh::v1::SamplingParams::*set)(float);
  };
  for (const FloatField& f : {FloatField{"temperature", &moemesh::v1::SamplingParams::set_temperature},
                              FloatField{"top_p", &moemesh::v1::SamplingParams::set_top_p},
                              FloatField{"min_p", &moemesh::v1::SamplingParams::set_min_p},
                              FloatField{"presence_penalty",
                                         &moemesh::v1::SamplingParams::set_presence_penalty},
                              FloatField{"frequency_penalty",
                                         &moemesh::v1::SamplingParams::set_frequency_penalty},
                              FloatField{"repetition_penalty",
                                         &moemesh::v1::SamplingParams::set_repetition_penalty}}) {
    auto v = Number(j, f.name);
    if (!v.ok()) return v.status();
    if (v->has_value()) (s->*f.set)(static_cast<float>(**v));
  }
  struct IntField {
    const char* name;
    void (moemesh::v1::SamplingParams::*set)(int32_t);
  };
  for (const IntField& f : {IntField{"top_k", &moemesh::v1::SamplingParams::set_top_k},
                            IntField{"experts_per_token",
                                     &moemesh::v1::SamplingParams::set_experts_per_token},
                            IntField{"thinking_budget",
                                     &moemesh::v1::SamplingParams::set_thinking_budget},
                            IntField{"min_tokens", &moemesh::v1::SamplingParams::set_min_tokens}}) {
    auto v = Integer(j, f.name);
    if (!v.ok()) return v.status();
    if (v->has_value()) {
      if (**v < INT32_MIN || **v > INT32_MAX) return Bad(f.name, "is out of range");
      (s->*f.set)(static_cast<int32_t>(**v));
    }
  }
  if (s->has_top_k() && s->top_k() == -1) s->set_top_k(0);  // vLLM's "off"
  auto seed = Integer(j, "seed");
  if (!seed.ok()) return seed.status();
  if (seed->has_value()) s->set_seed(static_cast<uint64_t>(**seed));
  auto ignore_eos = Bool(j, "ignore_eos");
  if (!ignore_eos.ok()) return ignore_eos.status();
  if (ignore_eos->has_value()) s->set_ignore_eos(**ignore_eos);
  // {"50256": -100, ...}: token ids (as strings, JSON keys) to biases.
  if (auto it = j.find("logit_bias"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) return Bad("logit_bias", "must be an object of token id -> bias");
    for (const auto& [key, bias] : it->items()) {
      int32_t id = 0;
      if (!absl::SimpleAtoi(key, &id)) {
        return Bad("logit_bias", "has key '" + key + "', not a token id");
      }
      if (!bias.is_number()) return Bad("logit_bias", "has a bias that is not a number");
      (*s->mutable_logit_bias())[id] = bias.get<float>();
    }
  }
  if (auto it = j.find("stop"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      s->add_stop(it->get<std::string>());
    } else if (it->is_array()) {
      for (const json& x : *it) {
        if (!x.is_string()) return Bad("stop", "must be a string or an array of strings");
        s->add_stop(x.get<std::string>());
      }
    } else {
      return Bad("stop", "must be a string or an array of strings");
    }
  }
  auto n = Integer(j, "n");
  if (!n.ok()) return n.status();
  if (n->has_value() && (**n < 1 || **n > kMaxChoices)) {
    return Bad("n", absl::StrCat("must be in [1, ", kMaxChoices, "]"));
  }
  out.n = static_cast<int>(n->value_or(1));
  if (static_cast<int64_t>(prompts.size()) * out.n > kMaxChoices) {
    return Bad("n", absl::StrCat("times the ", prompts.size(), " prompts asks for ",
                                 prompts.size() * out.n, " choices; at most ", kMaxChoices));
  }
  auto best_of = Integer(j, "best_of");
  if (!best_of.ok()) return best_of.status();
  if (best_of->has_value() && **best_of != out.n) {
    return Bad("best_of", "must equal n: choices are not ranked");
  }
  // Log-probabilities: completions `logprobs: N`; chat `logprobs: true` + `top_logprobs: N`.
  if (endpoint == Endpoint::kCompletions) {
    auto lp = Integer(j, "logprobs");
    if (!lp.ok()) return lp.status();
    if (lp->has_value()) {
      if (**lp < 0 || **lp > 20) return Bad("logprobs", "must be in [0, 20]");
      out.top_logprobs = static_cast<int>(**lp);
    }
  } else {
    auto lp = Bool(j, "logprobs");
    if (!lp.ok()) return lp.status();
    auto top = Integer(j, "top_logprobs");
    if (!top.ok()) return top.status();
    if (top->has_value() && (**top < 0 || **top > 20)) return Bad("top_logprobs", "must be in [0, 20]");
    if (top->has_value() && !lp->value_or(false)) {
      return Bad("top_logprobs", "needs 'logprobs': true");
    }
    if (lp->value_or(false)) out.top_logprobs = static_cast<int>(top->value_or(0));
  }
  // The chosen token's logprob comes with at least one top entry; the builder trims.
  if (out.top_logprobs >= 0) s->set_logprobs(std::max(out.top_logprobs, 1));
  // Echo with logprobs scores the prompt's tokens too.
  if (out.echo && out.top_logprobs >= 0) s->set_prompt_logprobs(out.top_logprobs);
  if (auto it = j.find("response_format"); it != j.end() && !it->is_null()) {
    const std::string type =
        it->is_object() && it->contains("type") && (*it)["type"].is_string()
            ? (*it)["type"].get<std::string>()
            : "";
    if (type == "json_object") {
      s->set_response_format(moemesh::v1::RESPONSE_FORMAT_JSON_OBJECT);
    } else if (type == "json_schema") {
      // {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}
      auto js = it->find("json_schema");
      if (js == it->end() || !js->is_object() || !js->contains("schema") ||
          !(*js)["schema"].is_object()) {
        return Bad("response_format",
                   "json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}");
      }
      s->set_response_format(moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA);
      // Again from the body with the keys in their order (json sorts them): the order of
      // properties is the order they are generated in.
      const auto ordered = nlohmann::ordered_json::parse(body.begin(), body.end(), nullptr, false);
      s->set_json_schema(ordered["response_format"]["json_schema"]["schema"].dump());
    } else if (type != "text") {
      return Bad("response_format",
                 type.empty() ? "must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                                "{\"type\": \"json_schema\", ...}"
                              : "type '" + type + "' is not supported: text, json_object or "
                                                  "json_schema");
    }
  }
  auto priority = Integer(j, "priority");
  if (!priority.ok()) return priority.status();
  if (priority->has_value()) {
    if (**priority < INT32_MIN || **priority > INT32_MAX) return Bad("priority", "is out of range");
    req.set_priority(static_cast<int32_t>(**priority));
  }
  auto stream = Bool(j, "stream");
  if (!stream.ok()) return stream.status();
  out.stream = stream->value_or(false);
  if (auto it = j.find("stream_options"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) return Bad("stream_options", "must be an object");
    auto usage = Bool(*it, "include_usage");
    if (!usage.ok()) return usage.status();
    out.include_usage = usage->value_or(false);
  }
  for (const moemesh::v1::GenerateRequest& p : prompts) {
    for (int i = 0; i < out.n; ++i) {
      moemesh::v1::GenerateRequest g = req;
      g.MergeFrom(p);
      if (s->has_seed()) g.mutable_sampling()->set_seed(s->seed() + static_cast<uint64_t>(i));
      out.requests.push_back(std::move(g));
    }
  }
  return out;
}

int HttpStatus(const absl::Status& st) {
  switch (st.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
      return 400;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    case absl::StatusCode::kUnimplemented:
      return 501;
    default:
      return 500;
  }
}

json ErrorBody(const absl::Status& st) {
  const int code = HttpStatus(st);
  const char* type = code == 400 || code == 404 ? "invalid_request_error"
                     : code == 429             ? "rate_limit_error"
                                               : "server_error";
  return json{{"error",
               {{"message", std::string(st.message())},
                {"type", type},
                {"param", nullptr},
                {"code", absl::StatusCodeToString(st.code())}}}};
}

ResponseBuilder::ResponseBuilder(Endpoint endpoint, std::string id, std::string model,
                                 int64_t created, int top_logprobs, int index)
    : endpoint_(endpoint),
      id_(std::move(id)),
      model_(std::move(model)),
      created_(created),
      top_logprobs_(top_logprobs),
      index_(index) {
  if (top_logprobs_ >= 0) {
    logprobs_ = endpoint_ == Endpoint::kChat
                    ? json{{"content", json::array()}}
                    : json{{"tokens", json::array()},
                           {"token_logprobs", json::array()},
                           {"top_logprobs", json::array()},
                           {"text_offset", json::array()}};
  }
}

json ResponseBuilder::Envelope(bool chunk) const {
  const char* object = endpoint_ == Endpoint::kChat
                           ? (chunk ? "chat.completion.chunk" : "chat.completion")
                           : "text_completion";
  return json{{"id", id_}, {"object", object}, {"created", created_}, {"model", model_}};
}

json ResponseBuilder::Logprobs(const moemesh::v1::GenerateResponse& r,
                               int64_t* text_offset) {
  if (top_logprobs_ < 0) return nullptr;
  if (endpoint_ == Endpoint::kChat) {
    json content = json::array();
    for (const auto& t : r.logprobs()) {
      json top = json::array();
      for (int i = 0; i < t.top_size() && i < top_logprobs_; ++i) {
        top.push_back({{"token", t.top(i).text()},
                       {"logprob", t.top(i).logprob()},
                       {"bytes", Bytes(t.top(i).text())}});
      }
      content.push_back({{"token", t.chosen().text()},
                         {"logprob", t.chosen().logprob()},
                         {"bytes", Bytes(t.chosen().text())},
                         {"top_logprobs", top}});
    }
    return json{{"content", content}};
  }
  json lp{{"tokens", json::array()},
          {"token_logprobs", json::array()},
          {"top_logprobs", json::array()},
          {"text_offset", json::array()}};
  for (const auto& t : r.logprobs()) {
    lp["tokens"].push_back(t.chosen().text());
    if (unscored_first_) {  // an echoed prompt's first token: nothing predicts it
      unscored_first_ = false;
      lp["token_logprobs"].push_back(nullptr);
      lp["top_logprobs"].push_back(nullptr);
    } else {
      lp["token_logprobs"].push_back(t.chosen().logprob());
      json top = json::object();
      for (int i = 0; i < t.top_size() && i < top_logprobs_; ++i) {
        top[t.top(i).text()] = t.top(i).logprob();
      }
      lp["top_logprobs"].push_back(top);
    }
    lp["text_offset"].push_back(*text_offset);
    *text_offset += static_cast<int64_t>(t.chosen().text().size());
  }
  return lp;
}

json ResponseBuilder::Choice(const std::string& text, const json& logprobs, FinishReason reason,
                             bool delta) const {
  json c{{"index", index_}, {"logprobs", logprobs}};
  const std::string finish = FinishName(reason);
  c["finish_reason"] = finish.empty() ? json(nullptr) : json(finish);
  if (endpoint_ == Endpoint::kCompletions) {
    c["text"] = text;
  } else if (delta) {
    c["delta"] = text.empty() ? json::object() : json{{"content", text}};
  } else {
    c["message"] = {{"role", "assistant"}, {"content", text}};
  }
  return c;
}

json ResponseBuilder::Usage() const {
  return {{"prompt_tokens", prompt_tokens_},
          {"completion_tokens", completion_tokens_},
          {"total_tokens", prompt_tokens_ + completion_tokens_}};
}

void ResponseBuilder::Echo(std::string prompt_text, bool prompt_only) {
  echo_pending_ = true;
  echo_text_ = std::move(prompt_text);
  prompt_only_ = prompt_only;
}

const moemesh::v1::GenerateResponse& ResponseBuilder::Shown(
    const moemesh::v1::GenerateResponse& r, moemesh::v1::GenerateResponse* scratch) {
  if (!prompt_only_ && !echo_pending_) return r;  // shown as it is (no copy)
  moemesh::v1::GenerateResponse& v = *scratch;
  v = r;
  if (prompt_only_) {  // max_tokens 0: the token computed is not shown
    v.clear_ids();
    v.clear_text();
    v.clear_logprobs();
    v.set_completion_tokens(0);
  }
  if (echo_pending_) {
    echo_pending_ = false;
    v.set_text(echo_text_ + v.text());
    if (top_logprobs_ >= 0 && r.prompt_logprobs_size() > 0) {
      v.clear_logprobs();
      for (const auto& e : r.prompt_logprobs()) *v.add_logprobs() = e;
      if (!prompt_only_) {
        for (const auto& e : r.logprobs()) *v.add_logprobs() = e;
      }
      unscored_first_ = true;
    }
  }
  return v;
}

void ResponseBuilder::Add(const moemesh::v1::GenerateResponse& r) {
  moemesh::v1::GenerateResponse scratch;
  const moemesh::v1::GenerateResponse& v = Shown(r, &scratch);
  Accumulate(v, Logprobs(v, &text_offset_));
}

void ResponseBuilder::Accumulate(const moemesh::v1::GenerateResponse& r, const json& lp) {
  text_ += r.text();
  if (top_logprobs_ >= 0) {
    for (auto& [key, values] : lp.items()) {
      for (const json& v : values) logprobs_[key].push_back(v);
    }
  }
  if (r.finish_reason() != moemesh::v1::FINISH_REASON_UNSPECIFIED) {
    finish_ = r.finish_reason();
    prompt_tokens_ = r.prompt_tokens();
    completion_tokens_ = r.completion_tokens();
  }
}

json ResponseBuilder::Chunk(const moemesh::v1::GenerateResponse& r) {
  moemesh::v1::GenerateResponse scratch;
  const moemesh::v1::GenerateResponse& v = Shown(r, &scratch);
  const json lp = Logprobs(v, &text_offset_);
  Accumulate(v, lp);
  json out = Envelope(/*chunk=*/true);
  out["choices"] = json::array({Choice(v.text(), lp, v.finish_reason(), /*delta=*/true)});
  return out;
}

json ResponseBuilder::RoleChunk() const {
  json out = Envelope(/*chunk=*/true);
  json c{{"index", index_},
         {"delta", {{"role", "assistant"}, {"content", ""}}},
         {"logprobs", nullptr},
         {"finish_reason", nullptr}};
  out["choices"] = json::array({c});
  return out;
}

json ResponseBuilder::UsageChunk() const {
  json out = Envelope(/*chunk=*/true);
  out["choices"] = json::array();
  out["usage"] = Usage();
  return out;
}

json ResponseBuilder::FinalChoice() const {
  return Choice(text_, top_logprobs_ >= 0 ? logprobs_ : json(nullptr), finish_, /*delta=*/false);
}

json ResponseBuilder::Final() const {
  json out = Envelope(/*chunk=*/false);
  out["choices"] = json::array({FinalChoice()});
  out["usage"] = Usage();
  return out;
}

namespace {

json UsageOf(const std::vector<ResponseBuilder>& choices, int n) {
  int64_t prompt = 0, completion = 0;
  for (size_t i = 0; i < choices.size(); ++i) {
    if (i % static_cast<size_t>(n) == 0) prompt += choices[i].prompt_tokens();
    completion += choices[i].completion_tokens();
  }
  return {{"prompt_tokens", prompt},
          {"completion_tokens", completion},
          {"total_tokens", prompt + completion}};
}

}  // namespace

json Final(const std::vector<ResponseBuilder>& choices, int n) {
  json out = choices.at(0).Final();
  out["choices"] = json::array();
  for (const ResponseBuilder& b : choices) out["choices"].push_back(b.FinalChoice());
  out["usage"] = UsageOf(choices, n);
  return out;
}

json UsageChunk(const std::vector<ResponseBuilder>& choices, int n) {
  json out = choices.at(0).UsageChunk();
  out["usage"] = UsageOf(choices, n);
  return out;
}

}  // namespace openai
}  // namespace moemesh
