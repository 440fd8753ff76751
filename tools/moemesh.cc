// moemesh: the engine's command-line tool. Prints one JSON object on stdout.
//
//   moemesh generate   --model=DIR (--prompt=TEXT | --input_ids=1,2,3) --max_new_tokens=N
//                      [--greedy] [--logits_out=FILE] [--experts_per_token=K]
//                      [--thinking_budget=N [--think_tokens=START,END]]
//                      [--compute_dtype=fp32|bf16] [--threads=T]
//                      (switch_transformers checkpoints: encoder-decoder, --greedy only)
//   moemesh perplexity --model=DIR --file=TEXT_FILE [--window=512] [--experts_per_token=K]
//   moemesh tokenize   --model=DIR --text=TEXT
//   moemesh serve      --model=DIR --port=P          (every role in this process)
//   moemesh cluster    --model=DIR --expert_workers=N [--attention_workers=M] --port=P   (one process per role)
// Every command that loads weights takes --load_format=auto|dummy and --num_layers=N
// (mesh/load_flags.h); with --load_format=dummy, generate --input_ids needs no tokenizer.json.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/config.h"
#include "engine/generate.h"
#include "engine/model.h"
#include "engine/ops/threading.h"
#include "engine/switch_model.h"
#include "engine/tokenizer.h"
#include "mesh/load_flags.h"
#include "router/router.h"
#include "router/router_flags.h"
#include "tools/commands.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, model, "models/pydoc-moe-17m", "Checkpoint directory (config.json, *.safetensors, tokenizer.json).");
ABSL_FLAG(int32_t, port, 50051, "serve, cluster: port of the public API (cluster: the others follow it).");
ABSL_FLAG(std::string, host, "127.0.0.1", "serve, cluster: address to listen on.");
ABSL_FLAG(std::string, prompt, "", "generate: prompt text.");
ABSL_FLAG(std::string, input_ids, "", "generate: prompt as comma-separated token ids (instead of --prompt).");
ABSL_FLAG(int64_t, max_new_tokens, 32, "generate: number of new tokens.");
ABSL_FLAG(bool, greedy, false, "generate: greedy decoding (otherwise --temperature/--top_p/--top_k/--seed).");
ABSL_FLAG(double, temperature, 0.8, "generate: sampling temperature when not --greedy.");
ABSL_FLAG(double, top_p, 0.95, "generate: nucleus sampling threshold when not --greedy.");
ABSL_FLAG(int32_t, top_k, 0, "generate: keep the k most likely tokens (0 = all) when not --greedy.");
ABSL_FLAG(uint64_t, seed, 0, "generate: random seed when not --greedy.");
ABSL_FLAG(bool, ignore_eos, false, "generate: keep going after the end-of-sequence token.");
ABSL_FLAG(std::string, logits_out, "", "generate: write the logits of every prompt position to FILE as a JSON list of rows.");
ABSL_FLAG(int32_t, thinking_budget, -1, "generate: reasoning tokens allowed after the last think-start token (see --think_tokens) before the think-end token is forced; -1 = no limit.");
ABSL_FLAG(int32_t, experts_per_token, 0, "Active experts per token (0 = the model's num_experts_per_tok).");
ABSL_FLAG(std::string, compute_dtype, "fp32", "Matrix-product compute type: fp32 or bf16.");
ABSL_FLAG(std::string, device, "cpu", "generate, perplexity, serve: where the attention stack, KV cache and experts run: cpu, cuda or cuda:N (CUDA needs a binary built with --config=cuda; embeddings stay on the host).");
ABSL_FLAG(int32_t, threads, 2, "Compute threads (cluster: per worker process).");
ABSL_FLAG(std::string, file, "", "perplexity: text file; documents separated by \"\\n<|endoftext|>\\n\".");
ABSL_FLAG(int64_t, window, 512, "perplexity: window of input tokens, scored independently.");
ABSL_FLAG(std::string, text, "", "tokenize: text to encode.");

namespace moemesh {
namespace {

int Fail(const absl::Status& st) {
  nlohmann::json j;
  j["error"] = std::string(st.message());
  std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  std::cerr << "moemesh: " << st.message() << std::endl;
  return 1;
}

void Print(const nlohmann::json& j) {
  std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer() {
  return Tokenizer::FromFile(absl::GetFlag(FLAGS_model) + "/tokenizer.json");
}

// --compute_dtype, --load_format, --num_layers.
absl::StatusOr<LoadOptions> ModelLoadOptions() {
  LoadOptions opt;
  const std::string dt = absl::GetFlag(FLAGS_compute_dtype);
  if (dt == "bf16") {
    opt.compute = ComputeType::kBF16;
  } else if (dt != "fp32") {
    return absl::InvalidArgumentError(absl::StrCat("--compute_dtype must be fp32 or bf16, not '", dt, "'"));
  }
  auto device = ParseDevice(absl::GetFlag(FLAGS_device));
  if (!device.ok()) return device.status();
  auto described = DescribeDevice(*device);
  if (!described.ok()) return described.status();
  opt.device = *device;
  absl::Status st = LoadOptionsFromFlags(&opt);
  if (!st.ok()) return st;
  return opt;
}

absl::StatusOr<std::unique_ptr<Model>> LoadModel(const LoadOptions& opt) {
  ops::SetNumThreads(absl::GetFlag(FLAGS_threads));
  return Model::Load(absl::GetFlag(FLAGS_model), opt);
}

// --input_ids, or --prompt encoded with `tok` (which may be null only with --input_ids).
absl::StatusOr<std::vector<int32_t>> PromptIds(const Tokenizer* tok) {
  std::vector<int32_t> prompt;
  if (!absl::GetFlag(FLAGS_input_ids).empty()) {
    for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_input_ids), ',', absl::SkipWhitespace())) {
      int32_t id;
      if (!absl::SimpleAtoi(s, &id)) return absl::InvalidArgumentError(absl::StrCat("--input_ids: '", s, "' is not an integer"));
      prompt.push_back(id);
    }
  } else if (!absl::GetFlag(FLAGS_prompt).empty()) {
    prompt = tok->Encode(absl::GetFlag(FLAGS_prompt), /*add_special_tokens=*/true);
  } else {
    return absl::InvalidArgumentError("give --prompt=TEXT or --input_ids=1,2,3");
  }
  return prompt;
}

// model_type of DIR/config.json ("" when it cannot be read: the caller's loader reports that).
std::string ModelType(const std::string& dir) {
  std::ifstream in(dir + "/config.json");
  if (!in) return "";
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("model_type") || !j["model_type"].is_string()) return "";
  return j["model_type"].get<std::string>();
}

// Whether flag `name` has a value other than its default.
bool FlagChanged(const char* name) {
  const absl::CommandLineFlag* f = absl::FindCommandLineFlag(name);
  return f != nullptr && f->CurrentValue() != f->DefaultValue();
}

// generate for switch_transformers (encoder-decoder): SwitchTransformersModel::Greedy in process,
// fp32 on the CPU. Flags it cannot honour are refused, by name.
int RunGenerateSwitch() {
  if (!absl::GetFlag(FLAGS_greedy)) {
    return Fail(absl::InvalidArgumentError(
        "switch_transformers models decode greedily only: pass --greedy"));
  }
  if (absl::GetFlag(FLAGS_device) != "cpu") {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        "--device=", absl::GetFlag(FLAGS_device), ": switch_transformers models run on the cpu only")));
  }
  for (const char* name : {"temperature", "top_p", "top_k", "seed", "ignore_eos", "logits_out",
                           "experts_per_token", "compute_dtype", "quantize_experts", "load_format",
                           "num_layers", "kv_cache_dtype", "cuda_graphs", "cuda_pdl",
                           "cuda_deep_loads", "thinking_budget"}) {
    if (FlagChanged(name)) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
          "--", name, " is not supported for switch_transformers models (greedy fp32 decoding "
          "on the cpu only)")));
    }
  }
  auto tok = LoadTokenizer();
  if (!tok.ok()) return Fail(tok.status());
  auto prompt = PromptIds(tok->get());
  if (!prompt.ok()) return Fail(prompt.status());
  auto model = SwitchTransformersModel::Load(absl::GetFlag(FLAGS_model));
  if (!model.ok()) return Fail(model.status());
  auto ids = (*model)->Greedy(*prompt, absl::GetFlag(FLAGS_max_new_tokens));
  if (!ids.ok()) return Fail(ids.status());
  ids->erase(ids->begin());  // decoder_start_token_id
  nlohmann::json j;
  j["ids"] = *ids;
  j["text"] = (*tok)->Decode(*ids, /*skip_special_tokens=*/true);
  j["prompt_tokens"] = prompt->size();
  Print(j);
  return 0;
}

int RunGenerate() {
  if (ModelType(absl::GetFlag(FLAGS_model)) == "switch_transformers") return RunGenerateSwitch();
  auto load = ModelLoadOptions();
  if (!load.ok()) return Fail(load.status());
  // Dummy weights may come from a directory with only config.json: token ids need no tokenizer.
  auto tok = LoadTokenizer();
  const bool no_tokenizer = !tok.ok() && absl::IsNotFound(tok.status()) &&
                            load->load_format == LoadOptions::LoadFormat::kDummy &&
                            !absl::GetFlag(FLAGS_input_ids).empty();
  if (!tok.ok() && !no_tokenizer) return Fail(tok.status());
  auto ids = PromptIds(no_tokenizer ? nullptr : tok->get());
  if (!ids.ok()) return Fail(ids.status());
  const std::vector<int32_t>& prompt = *ids;
  auto model = LoadModel(*load);
  if (!model.ok()) return Fail(model.status());
  GenerateOptions opt;
  opt.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  opt.experts_per_token = absl::GetFlag(FLAGS_experts_per_token);
  opt.prompt_logits = !absl::GetFlag(FLAGS_logits_out).empty();
  if (!absl::GetFlag(FLAGS_greedy)) {
    opt.sampling.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
    opt.sampling.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
    opt.sampling.top_k = absl::GetFlag(FLAGS_top_k);
    opt.sampling.seed = absl::GetFlag(FLAGS_seed);
  }
  if (absl::GetFlag(FLAGS_thinking_budget) >= 0) {
    if (no_tokenizer) {
      return Fail(absl::InvalidArgumentError("--thinking_budget needs the model's tokenizer.json"));
    }
    auto think = ThinkTokenIds(**tok, (*model)->config(), absl::GetFlag(FLAGS_think_tokens));
    if (!think.ok()) return Fail(think.status());
    if (think->second < 0) {
      return Fail(absl::InvalidArgumentError(
          "--thinking_budget: the model's tokenizer has no <think> and </think> tokens "
          "(--think_tokens names other markers)"));
    }
    opt.sampling.thinking_budget = absl::GetFlag(FLAGS_thinking_budget);
    opt.sampling.think_start_id = think->first;
    opt.sampling.think_end_id = think->second;
  }
  if (!absl::GetFlag(FLAGS_ignore_eos)) opt.stop_token_ids = (*model)->config().eos_token_ids;
  auto r = Generate(**model, prompt, opt);
  if (!r.ok()) return Fail(r.status());
  if (opt.prompt_logits) {
    const int64_t vocab = (*model)->config().vocab_size;
    std::ofstream out(absl::GetFlag(FLAGS_logits_out));
    out << "[";
    char buf[32];
    for (size_t p = 0; p < prompt.size(); ++p) {
      out << (p ? ",\n[" : "[");
      for (int64_t v = 0; v < vocab; ++v) {
        std::snprintf(buf, sizeof(buf), "%.9g", r->prompt_logits[p * vocab + v]);
        out << (v ? "," : "") << buf;
      }
      out << "]";
    }
    out << "]\n";
    if (!out) return Fail(absl::InternalError("could not write " + absl::GetFlag(FLAGS_logits_out)));
  }
  nlohmann::json j;
  j["ids"] = r->ids;
  if (!no_tokenizer) j["text"] = (*tok)->Decode(r->ids, /*skip_special_tokens=*/true);
  j["prompt_tokens"] = prompt.size();
  j["prefill_tok_s"] = r->prefill_seconds > 0 ? prompt.size() / r->prefill_seconds : 0.0;
  j["decode_tok_s"] = r->ids.size() > 1 && r->decode_seconds > 0 ? (r->ids.size() - 1) / r->decode_seconds : 0.0;
  Print(j);
  return 0;
}

int RunPerplexity() {
  auto load = ModelLoadOptions();
  if (!load.ok()) return Fail(load.status());
  auto tok = LoadTokenizer();
  if (!tok.ok()) return Fail(tok.status());
  std::ifstream in(absl::GetFlag(FLAGS_file), std::ios::binary);
  if (!in) return Fail(absl::NotFoundError("cannot read --file=" + absl::GetFlag(FLAGS_file)));
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  // Each document encoded on its own, followed by the end-of-text id (as the reference does).
  auto eot = (*tok)->TokenToId("<|endoftext|>");
  if (!eot.has_value()) return Fail(absl::InvalidArgumentError("the tokenizer has no <|endoftext|> token"));
  const std::vector<int32_t> ids = EncodeDocuments(**tok, text, "\n<|endoftext|>\n", *eot);
  auto model = LoadModel(*load);
  if (!model.ok()) return Fail(model.status());
  auto r = Perplexity(**model, ids, absl::GetFlag(FLAGS_window), absl::GetFlag(FLAGS_experts_per_token));
  if (!r.ok()) return Fail(r.status());
  nlohmann::json j;
  j["tokens"] = r->tokens;
  j["nll"] = r->nll;
  j["ppl"] = r->ppl;
  Print(j);
  return 0;
}

int RunTokenize() {
  auto tok = LoadTokenizer();
  if (!tok.ok()) return Fail(tok.status());
  nlohmann::json j;
  j["ids"] = (*tok)->Encode(absl::GetFlag(FLAGS_text), /*add_special_tokens=*/true);
  Print(j);
  return 0;
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "moemesh generate|perplexity|tokenize --model=DIR [flags]\n"
      "  generate   --prompt=TEXT | --input_ids=1,2,3 [--max_new_tokens=N] [--greedy] [--logits_out=FILE]\n"
      "  perplexity --file=TEXT_FILE [--window=512]\n"
      "  tokenize   --text=TEXT\n"
      "  serve      [--port=50051]                  every role in this process\n"
      "  cluster    [--expert_workers=2] [--attention_workers=1] [--port=50051]   one process per role on loopback\n"
      "Weights: [--load_format=auto|dummy] [--num_layers=N] [--compute_dtype=fp32|bf16]\n"
      "         [--quantize_experts=none|int8|int4] [--quantize_attention=none|int8|int4]\n"
      "         [--kv_cache_dtype=fp32|bf16|int8]\n"
      "Prints one JSON object on stdout.");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  const std::string cmd = args.size() > 1 ? args[1] : "";
  if (cmd == "generate") return moemesh::RunGenerate();
  if (cmd == "perplexity") return moemesh::RunPerplexity();
  if (cmd == "tokenize") return moemesh::RunTokenize();
  if (cmd == "serve") return moemesh::RunServe();
  if (cmd == "cluster") return moemesh::RunCluster(argv[0]);
  std::cerr << absl::ProgramUsageMessage() << "\n(try --help)" << std::endl;
  return 2;
}
