// moemesh_client: command-line client of the public API (moemesh.v1.Generation over gRPC).
//
//   moemesh_client [generate] [--addr=127.0.0.1:50051] [--max_tokens=64] [--temperature=T]
//                  [--top_p=P] [--top_k=K] [--seed=S] [--stop=A,B] [--chat] [--experts_per_token=K]
//                  [--thinking_budget=N] [--json_object] [--json_schema=SCHEMA|@FILE]
//                  [--min_tokens=N] [--logit_bias=ID:BIAS,...] [--priority=P]
//                  [--logprobs=N] [--prompt_logprobs=N] [--json] [--timeout=SECONDS]
//                  (--prompt=TEXT | PROMPT)
//   moemesh_client tokenize TEXT            (or --prompt=TEXT): token ids, comma-separated
//   moemesh_client detokenize 1,2,3
//   moemesh_client info                     ModelInfo as JSON
//
// generate streams the text deltas to stdout as they arrive, then a newline and on stderr
//   [finish=stop|length|cancelled prompt_tokens=N completion_tokens=M tok/s=X]
// Sampling fields are only set when their flag is given (proto3 `optional`); --max_tokens defaults
// to 64 (0 = unset: the server's default). On a gRPC error: "error: <STATUS_CODE>: <details>" on
// stderr and exit status 1 (130 after Ctrl-C, which cancels the call).
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/types/optional.h"
#include "protos/generation.grpc.pb.h"

ABSL_FLAG(std::string, addr, "127.0.0.1:50051", "Server address (host:port).");
ABSL_FLAG(std::string, prompt, "", "generate/tokenize: the text (instead of the positional PROMPT).");
ABSL_FLAG(int32_t, max_tokens, 64, "New tokens (0 = unset: the server's default).");
ABSL_FLAG(absl::optional<float>, temperature, absl::nullopt, "Sampling temperature (0 = greedy); unset: model default.");
ABSL_FLAG(absl::optional<float>, top_p, absl::nullopt, "Nucleus sampling threshold in (0, 1].");
ABSL_FLAG(absl::optional<int32_t>, top_k, absl::nullopt, "Keep the k most likely tokens (0 = off).");
ABSL_FLAG(absl::optional<float>, min_p, absl::nullopt, "Min-p threshold in [0, 1].");
ABSL_FLAG(absl::optional<float>, repetition_penalty, absl::nullopt, "Repetition penalty (> 0, 1 = off).");
ABSL_FLAG(absl::optional<uint64_t>, seed, absl::nullopt, "Random seed.");
ABSL_FLAG(std::string, stop, "", "Stop strings, comma-separated.");
ABSL_FLAG(absl::optional<int32_t>, min_tokens, absl::nullopt, "Tokens generated before an end token or a stop string may end the answer.");
ABSL_FLAG(std::string, logit_bias, "", "ID:BIAS,... : add BIAS (-100..100) to token ID's logit before each draw.");
ABSL_FLAG(bool, ignore_eos, false, "Keep going after the end-of-sequence token (only sent when true).");
ABSL_FLAG(absl::optional<int32_t>, experts_per_token, absl::nullopt, "Override of the active experts per token.");
ABSL_FLAG(absl::optional<int32_t>, thinking_budget, absl::nullopt, "Reasoning tokens allowed after <think> before </think> is forced (the server's --think_tokens names the markers).");
ABSL_FLAG(absl::optional<int32_t>, logprobs, absl::nullopt, "Top-N logprobs per token (0..20), printed on stderr.");
ABSL_FLAG(absl::optional<int32_t>, prompt_logprobs, absl::nullopt, "Also score the prompt's tokens, with top-N (0..20), printed on stderr.");
ABSL_FLAG(bool, json_object, false, "response_format JSON_OBJECT: the answer is one JSON object.");
ABSL_FLAG(std::string, json_schema, "", "response_format JSON_SCHEMA: the answer is one JSON object this JSON Schema describes (the schema's text, or @FILE).");
ABSL_FLAG(bool, chat, false, "Send the prompt as one user chat message.");
ABSL_FLAG(std::string, system, "", "With --chat: a system message sent first.");
ABSL_FLAG(std::string, request_id, "", "Request id (echoed in the server's logs).");
ABSL_FLAG(int32_t, priority, 0, "Scheduling priority: lower is admitted first.");
ABSL_FLAG(bool, json, false, "Print one JSON object per response instead of the text.");
ABSL_FLAG(double, timeout, 0, "Deadline in seconds (0 = none).");
ABSL_FLAG(bool, add_special_tokens, false, "tokenize: add the model's special tokens.");
ABSL_FLAG(bool, skip_special_tokens, false, "detokenize: drop special tokens.");

namespace moemesh {
namespace {

using v1::Generation;

std::atomic<bool> g_interrupted{false};

extern "C" void OnSigint(int) { g_interrupted.store(true); }

void Out(const std::string& s) {
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fflush(stdout);
}

int Usage(const std::string& msg) {
  std::fprintf(stderr, "moemesh_client: %s\n", msg.c_str());
  std::fprintf(stderr, "usage: moemesh_client [generate] [flags] PROMPT | tokenize TEXT | detokenize 1,2,3 | info\n");
  return 2;
}

int RpcError(const grpc::Status& st) {
  static const char* const kNames[] = {
      "OK",          "CANCELLED",        "UNKNOWN",           "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED", "NOT_FOUND",   "ALREADY_EXISTS",    "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",  "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",       "UNAVAILABLE",       "DATA_LOSS",
      "UNAUTHENTICATED"};
  const int code = static_cast<int>(st.error_code());
  const std::string name = (code >= 0 && code <= 16) ? kNames[code] : absl::StrCat(code);
  std::fprintf(stderr, "error: %s: %s\n", name.c_str(), st.error_message().c_str());
  return 1;
}

std::string ToJson(const google::protobuf::Message& m, bool defaults = false) {
  google::protobuf::util::JsonPrintOptions opt;
  opt.preserve_proto_field_names = true;
  opt.always_print_primitive_fields = defaults;
  std::string out;
  auto st = google::protobuf::util::MessageToJsonString(m, &out, opt);
  if (!st.ok()) return absl::StrCat("{\"error\": \"", std::string(st.message()), "\"}");
  return out;
}

void SetDeadline(grpc::ClientContext* ctx) {
  const double t = absl::GetFlag(FLAGS_timeout);
  if (t > 0) {
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::microseconds(static_cast<int64_t>(t * 1e6)));
  }
}

v1::GenerateRequest BuildRequest(const std::string& prompt) {
  v1::GenerateRequest req;
  if (absl::GetFlag(FLAGS_chat)) {
    auto* chat = req.mutable_chat();
    if (!absl::GetFlag(FLAGS_system).empty()) {
      auto* m = chat->add_messages();
      m->set_role("system");
      m->set_content(absl::GetFlag(FLAGS_system));
    }
    auto* m = chat->add_messages();
    m->set_role("user");
    m->set_content(prompt);
  } else {
    req.set_text(prompt);
  }
  v1::SamplingParams* s = req.mutable_sampling();
  if (absl::GetFlag(FLAGS_max_tokens) > 0) s->set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  if (auto v = absl::GetFlag(FLAGS_temperature)) s->set_temperature(*v);
  if (auto v = absl::GetFlag(FLAGS_top_p)) s->set_top_p(*v);
  if (auto v = absl::GetFlag(FLAGS_top_k)) s->set_top_k(*v);
  if (auto v = absl::GetFlag(FLAGS_min_p)) s->set_min_p(*v);
  if (auto v = absl::GetFlag(FLAGS_repetition_penalty)) s->set_repetition_penalty(*v);
  if (auto v = absl::GetFlag(FLAGS_seed)) s->set_seed(*v);
  if (auto v = absl::GetFlag(FLAGS_experts_per_token)) s->set_experts_per_token(*v);
  if (auto v = absl::GetFlag(FLAGS_thinking_budget)) s->set_thinking_budget(*v);
  if (auto v = absl::GetFlag(FLAGS_min_tokens)) s->set_min_tokens(*v);
  for (absl::string_view item : absl::StrSplit(absl::GetFlag(FLAGS_logit_bias), ',', absl::SkipEmpty())) {
    const std::vector<absl::string_view> kv = absl::StrSplit(item, absl::MaxSplits(':', 1));
    int32_t id = 0;
    float bias = 0;
    if (kv.size() != 2 || !absl::SimpleAtoi(kv[0], &id) || !absl::SimpleAtof(kv[1], &bias)) {
      std::fprintf(stderr, "error: --logit_bias takes ID:BIAS,..., got '%s'\n",
                   std::string(item).c_str());
      std::exit(2);
    }
    (*s->mutable_logit_bias())[id] = bias;
  }
  if (auto v = absl::GetFlag(FLAGS_logprobs)) s->set_logprobs(*v);
  if (auto v = absl::GetFlag(FLAGS_prompt_logprobs)) s->set_prompt_logprobs(*v);
  if (absl::GetFlag(FLAGS_ignore_eos)) s->set_ignore_eos(true);
  if (absl::GetFlag(FLAGS_json_object)) {
    s->set_response_format(moemesh::v1::RESPONSE_FORMAT_JSON_OBJECT);
  }
  if (std::string schema = absl::GetFlag(FLAGS_json_schema); !schema.empty()) {
    if (schema[0] == '@') {
      std::ifstream f(schema.substr(1));
      if (!f) {
        std::fprintf(stderr, "error: cannot read --json_schema file %s\n", schema.c_str() + 1);
        std::exit(2);
      }
      schema.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    }
    s->set_response_format(moemesh::v1::RESPONSE_FORMAT_JSON_SCHEMA);
    s->set_json_schema(schema);
  }
  const std::string stop = absl::GetFlag(FLAGS_stop);
  if (!stop.empty()) {
    for (absl::string_view part : absl::StrSplit(stop, ',')) {
      if (!part.empty()) s->add_stop(std::string(part));
    }
  }
  if (!absl::GetFlag(FLAGS_request_id).empty()) req.set_request_id(absl::GetFlag(FLAGS_request_id));
  req.set_priority(absl::GetFlag(FLAGS_priority));
  return req;
}

const char* FinishName(v1::FinishReason r) {
  switch (r) {
    case v1::FINISH_REASON_STOP: return "stop";
    case v1::FINISH_REASON_LENGTH: return "length";
    case v1::FINISH_REASON_CANCELLED: return "cancelled";
    default: return "unspecified";
  }
}

int RunGenerate(Generation::Stub* stub, const std::string& prompt) {
  const bool json = absl::GetFlag(FLAGS_json);
  const v1::GenerateRequest req = BuildRequest(prompt);
  grpc::ClientContext ctx;
  SetDeadline(&ctx);

  // Ctrl-C: the handler only sets a flag; this watcher cancels the call (TryCancel is not
  // async-signal-safe).
  std::atomic<bool> done{false};
  std::signal(SIGINT, OnSigint);
  std::thread watcher([&] {
    while (!done.load()) {
      if (g_interrupted.load()) {
        ctx.TryCancel();
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });

  const auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader(stub->Generate(&ctx, req));
  v1::GenerateResponse resp;
  v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
  int64_t prompt_tokens = 0, completion_tokens = 0, counted = 0;
  std::vector<v1::TokenLogprobs> logprobs, prompt_logprobs;
  bool printed = false;
  while (reader->Read(&resp)) {
    counted += resp.ids_size();
    if (json) {
      Out(ToJson(resp) + "\n");
    } else if (!resp.text().empty()) {
      Out(resp.text());
      printed = true;
    }
    for (const auto& lp : resp.logprobs()) logprobs.push_back(lp);
    for (const auto& lp : resp.prompt_logprobs()) prompt_logprobs.push_back(lp);
    if (resp.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) finish = resp.finish_reason();
    if (resp.prompt_tokens() != 0) prompt_tokens = resp.prompt_tokens();
    if (resp.completion_tokens() != 0) completion_tokens = resp.completion_tokens();
  }
  const grpc::Status st = reader->Finish();
  done.store(true);
  watcher.join();
  std::signal(SIGINT, SIG_DFL);
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const bool interrupted = g_interrupted.load();
  if (!st.ok() && !interrupted) {
    if (printed) Out("\n");
    return RpcError(st);
  }
  if (interrupted) finish = v1::FINISH_REASON_CANCELLED;
  if (completion_tokens == 0) completion_tokens = counted;
  if (!json) Out("\n");
  if (!json) {
    auto print = [](const std::vector<v1::TokenLogprobs>& entries) {
      for (const auto& lp : entries) {
        std::string top;
        for (const auto& t : lp.top()) absl::StrAppendFormat(&top, " '%s':%.3f", t.text(), t.logprob());
        std::fprintf(stderr, "  '%s' id=%d logprob=%.4f  top:%s\n", lp.chosen().text().c_str(),
                     lp.chosen().id(), lp.chosen().logprob(), top.c_str());
      }
    };
    if (!prompt_logprobs.empty()) {
      std::fprintf(stderr, "prompt:\n");
      print(prompt_logprobs);
      if (!logprobs.empty()) std::fprintf(stderr, "generated:\n");
    }
    print(logprobs);
  }
  const double tps = elapsed > 0 ? completion_tokens / elapsed : 0.0;
  std::fprintf(stderr, "[finish=%s prompt_tokens=%lld completion_tokens=%lld tok/s=%.1f]\n",
               FinishName(finish), static_cast<long long>(prompt_tokens),
               static_cast<long long>(completion_tokens), tps);
  std::fflush(stderr);
  return interrupted ? 130 : 0;
}

int RunTokenize(Generation::Stub* stub, const std::string& text) {
  v1::TokenizeRequest req;
  req.set_text(text);
  req.set_add_special_tokens(absl::GetFlag(FLAGS_add_special_tokens));
  v1::TokenizeResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  const grpc::Status st = stub->Tokenize(&ctx, req, &resp);
  if (!st.ok()) return RpcError(st);
  if (absl::GetFlag(FLAGS_json)) {
    Out(ToJson(resp) + "\n");
  } else {
    Out(absl::StrJoin(resp.ids(), ",") + "\n");
  }
  return 0;
}

int RunDetokenize(Generation::Stub* stub, const std::vector<std::string>& args) {
  v1::DetokenizeRequest req;
  for (const std::string& arg : args) {
    for (absl::string_view part : absl::StrSplit(arg, absl::ByAnyChar(", "), absl::SkipEmpty())) {
      int32_t id;
      if (!absl::SimpleAtoi(part, &id)) {
        return Usage(absl::StrCat("detokenize: not a token id: '", std::string(part), "'"));
      }
      req.add_ids(id);
    }
  }
  if (req.ids_size() == 0) return Usage("detokenize: missing IDS (e.g. 1,2,3)");
  req.set_skip_special_tokens(absl::GetFlag(FLAGS_skip_special_tokens));
  v1::DetokenizeResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  const grpc::Status st = stub->Detokenize(&ctx, req, &resp);
  if (!st.ok()) return RpcError(st);
  Out((absl::GetFlag(FLAGS_json) ? ToJson(resp) : resp.text()) + "\n");
  return 0;
}

int RunInfo(Generation::Stub* stub) {
  v1::ModelInfo resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  const grpc::Status st = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &resp);
  if (!st.ok()) return RpcError(st);
  Out(ToJson(resp, /*defaults=*/true) + "\n");
  return 0;
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "MoE Mesh client.\n"
      "  moemesh_client [generate] [flags] (--prompt=TEXT | PROMPT)\n"
      "  moemesh_client tokenize TEXT | detokenize 1,2,3 | info");
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  std::vector<std::string> pos(rest.begin() + 1, rest.end());
  std::string cmd = "generate";
  if (!pos.empty() && (pos[0] == "generate" || pos[0] == "tokenize" || pos[0] == "detokenize" ||
                       pos[0] == "info")) {
    cmd = pos[0];
    pos.erase(pos.begin());
  }
  const std::string flag_prompt = absl::GetFlag(FLAGS_prompt);
  std::string text;
  if (cmd == "generate" || cmd == "tokenize") {
    if (!flag_prompt.empty() && !pos.empty()) {
      return Usage("give the text either as --prompt or as a positional argument, not both");
    }
    text = flag_prompt.empty() ? absl::StrJoin(pos, " ") : flag_prompt;
    if (text.empty() && pos.empty()) return Usage(absl::StrCat(cmd, ": missing PROMPT"));
  } else if (cmd == "info" && !pos.empty()) {
    return Usage("info takes no arguments");
  }
  if (!absl::GetFlag(FLAGS_system).empty() && !absl::GetFlag(FLAGS_chat)) {
    return Usage("--system needs --chat");
  }

  auto channel = grpc::CreateChannel(absl::GetFlag(FLAGS_addr), grpc::InsecureChannelCredentials());
  std::unique_ptr<Generation::Stub> stub = Generation::NewStub(channel);
  if (cmd == "generate") return RunGenerate(stub.get(), text);
  if (cmd == "tokenize") return RunTokenize(stub.get(), text);
  if (cmd == "detokenize") return RunDetokenize(stub.get(), pos);
  return RunInfo(stub.get());
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) { return moemesh::Main(argc, argv); }
