// The OpenAI-compatible HTTP API's JSON, translated to and from the public gRPC messages: the
// bodies of POST /v1/completions and /v1/chat/completions become a GenerateRequest, and a
// request's GenerateResponses become the OpenAI response object or its streamed chunks. No I/O
// (http_server.h serves it).
#ifndef MOEMESH_ROUTER_OPENAI_API_H_
#define MOEMESH_ROUTER_OPENAI_API_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "protos/generation.pb.h"

namespace moemesh {
namespace openai {

enum class Endpoint { kCompletions, kChat };

// Most choices one HTTP request may ask for (prompts x n).
constexpr int kMaxChoices = 128;

struct ParsedRequest {
  // One GenerateRequest per choice, in the order of the answer's choice indexes: prompt p's n
  // samples are choices p * n ... p * n + n - 1. With a seed and n > 1, sample j of a prompt
  // has seed + j; without one each gets the router's random seed.
  std::vector<moemesh::v1::GenerateRequest> requests;
  int n = 1;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage: a last chunk with the usage
  // Log-probabilities to report: -1 none; completions: top-n (`logprobs`); chat: `top_logprobs`
  // (with `logprobs: true`).
  int top_logprobs = -1;
  // Completions `echo`: the answer starts with the prompt (and, with logprobs, its tokens'
  // scores, the first one's null); with max_tokens 0 (prompt_only) it is the prompt alone.
  bool echo = false;
  bool prompt_only = false;
};

// Parses a request body. Fields (OpenAI's, plus vLLM's extensions top_k, min_p,
// repetition_penalty, ignore_eos, and ours experts_per_token, thinking_budget): model (must be
// `served_model` when given), prompt (completions: a string, an array of token ids, or an array
// of either for several prompts), messages (chat: role + content, a string or text parts),
// max_tokens (completions default 16, as OpenAI's; chat: max_completion_tokens too, default up
// to the context), temperature, top_p, seed, stop (string or array), presence_penalty,
// frequency_penalty, logprobs / top_logprobs, n (choices per prompt; prompts x n at most
// kMaxChoices), best_of (equal to n only), echo (completions; max_tokens may then be 0),
// response_format ({"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
// "json_schema": {"schema": {...}}}), stream, stream_options. Unset sampling fields keep the model's
// generation_config defaults, as the gRPC API does. InvalidArgument naming the field otherwise;
// NotFound for another model.
absl::StatusOr<ParsedRequest> ParseRequest(Endpoint endpoint, std::string_view body,
                                           const std::string& served_model);

// POST /tokenize (vLLM's): {"prompt": TEXT, "add_special_tokens": true} or {"messages": [...]}
// (chat, rendered as /v1/chat/completions renders it, in `chat`); "model" optional.
struct TokenizeRequest {
  std::optional<std::string> prompt;
  bool add_special_tokens = true;
  moemesh::v1::GenerateRequest chat;  // without a prompt
};
absl::StatusOr<TokenizeRequest> ParseTokenize(std::string_view body,
                                              const std::string& served_model);
// POST /detokenize (vLLM's): {"tokens": [ids]}; the ids (their range is the caller's to check).
absl::StatusOr<std::vector<int32_t>> ParseDetokenize(std::string_view body,
                                                     const std::string& served_model);

// HTTP status of an error (400 invalid argument, 404 not found, 429 resource exhausted, 503
// unavailable, 504 deadline exceeded, 500 otherwise) and its OpenAI error object.
int HttpStatus(const absl::Status& st);
nlohmann::json ErrorBody(const absl::Status& st);

// Turns one request's GenerateResponses into OpenAI objects.
class ResponseBuilder {
 public:
  // `index`: the choice this builder's responses are (0 unless the request asked for several).
  ResponseBuilder(Endpoint endpoint, std::string id, std::string model, int64_t created,
                  int top_logprobs, int index = 0);
  // Completions echo: the first response shown starts with `prompt_text` (and its
  // prompt_logprobs ahead of its logprobs); `prompt_only` (max_tokens 0) hides the generated
  // token. Call before the first Chunk/Add.
  void Echo(std::string prompt_text, bool prompt_only);
  // The chunk for one response (streaming); also accumulates it for Final().
  nlohmann::json Chunk(const moemesh::v1::GenerateResponse& r);
  // Streaming chat: the first chunk, with the assistant role and no content.
  nlohmann::json RoleChunk() const;
  // The usage chunk of stream_options.include_usage (no choices).
  nlohmann::json UsageChunk() const;
  // The whole response (non-streaming), after every response was given to Add or Chunk.
  void Add(const moemesh::v1::GenerateResponse& r);
  nlohmann::json Final() const;
  // Final()'s choice object alone, and its token counts.
  nlohmann::json FinalChoice() const;
  int32_t prompt_tokens() const { return prompt_tokens_; }
  int32_t completion_tokens() const { return completion_tokens_; }

 private:
  nlohmann::json Choice(const std::string& text, const nlohmann::json& logprobs,
                        moemesh::v1::FinishReason reason, bool delta) const;
  // r's logprobs in the endpoint's format (an echoed prompt's first entry as null).
  nlohmann::json Logprobs(const moemesh::v1::GenerateResponse& r, int64_t* text_offset);
  // r as the client sees it: with the echo applied to the first, without a prompt_only token;
  // r itself when neither applies, else *scratch rewritten.
  const moemesh::v1::GenerateResponse& Shown(const moemesh::v1::GenerateResponse& r,
                                             moemesh::v1::GenerateResponse* scratch);
  // Adds r's text, its logprobs `lp` (Logprobs of r) and, when final, its finish and usage.
  void Accumulate(const moemesh::v1::GenerateResponse& r, const nlohmann::json& lp);
  nlohmann::json Usage() const;
  nlohmann::json Envelope(bool chunk) const;

  const Endpoint endpoint_;
  const std::string id_, model_;
  const int64_t created_;
  const int top_logprobs_;
  const int index_;
  std::string text_;
  nlohmann::json logprobs_;  // accumulated, for Final()
  int64_t text_offset_ = 0;  // completions logprobs: offset of the next token's text
  moemesh::v1::FinishReason finish_ = moemesh::v1::FINISH_REASON_UNSPECIFIED;
  int32_t prompt_tokens_ = 0, completion_tokens_ = 0;
  bool echo_pending_ = false, prompt_only_ = false, unscored_first_ = false;
  std::string echo_text_;
};

// Several choices' builders, in index order, `n` per prompt (a prompt's tokens count once in the
// usage): the whole response, and the usage chunk of a stream.
nlohmann::json Final(const std::vector<ResponseBuilder>& choices, int n);
nlohmann::json UsageChunk(const std::vector<ResponseBuilder>& choices, int n);

}  // namespace openai
}  // namespace moemesh

#endif  // MOEMESH_ROUTER_OPENAI_API_H_
