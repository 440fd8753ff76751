#include "mesh/load_flags.h"

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"

ABSL_FLAG(std::string, load_format, "auto",
          "auto: the checkpoint's safetensors; dummy: random weights made at load time from "
          "config.json alone, for benchmarks");
ABSL_FLAG(int64_t, num_layers, 0,
          "Use only the first N layers (0 = all); with --load_format=dummy, for benchmarks");
ABSL_FLAG(bool, cuda_graphs, false,
          "With --device=cuda and experts in the same process on the same GPU: replay decode "
          "steps from CUDA graphs (one per batch shape) instead of launching every kernel from "
          "the host");
ABSL_FLAG(bool, cuda_pdl, false,
          "With --device=cuda (Hopper GPUs): launch each decode step's kernels with programmatic "
          "dependent launch, so a kernel's blocks start, and a product's weights are fetched, "
          "while the kernel before it finishes; works with or without --cuda_graphs. Same "
          "outputs");
ABSL_FLAG(bool, cuda_deep_loads, false,
          "With --device=cuda and bf16 weights: the small-batch products (decode steps) issue "
          "several steps of weight loads before using them (2 to 4 per lane instead of what the "
          "compiler overlaps), in the one-row kernel's plain products and the batched-decode "
          "multi-output kernel. Same outputs; off until timed on a GPU");

ABSL_FLAG(std::string, kv_cache_dtype, "fp32",
          "KV cache element type: fp32 (exact), bf16 (half the memory and the bytes attention "
          "reads) or int8 (a quarter, plus a scale per row of head_dim values; CPU attention "
          "only)");

ABSL_FLAG(std::string, quantize_experts, "none",
          "Routed experts' weights on CPU expert shards: none (--compute_dtype's arithmetic), "
          "int8 (int8 weights with a scale per output row, activations quantised per group of "
          "64 on the fly: half the memory and bytes read of bf16) or int4 (4-bit weights with a "
          "scale per row and group of 64: 4.5 bits a weight); CPU only");

ABSL_FLAG(std::string, quantize_attention, "none",
          "The attention worker's matrices (q/k/v/o, dense and shared-expert MLPs, the LM head; "
          "routers stay fp32): none, int8 or int4, as --quantize_experts; CPU only");

namespace moemesh {

absl::Status LoadOptionsFromFlags(LoadOptions* opt) {
  auto format = ParseLoadFormat(absl::GetFlag(FLAGS_load_format));
  if (!format.ok()) return format.status();
  const int64_t n = absl::GetFlag(FLAGS_num_layers);
  if (n < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--num_layers must be >= 0, not ", n));
  }
  opt->load_format = *format;
  opt->num_layers = n;
  opt->cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  opt->cuda_pdl = absl::GetFlag(FLAGS_cuda_pdl);
  opt->cuda_deep_loads = absl::GetFlag(FLAGS_cuda_deep_loads);
  auto kv = ParseKvDType(absl::GetFlag(FLAGS_kv_cache_dtype));
  if (!kv.ok()) return kv.status();
  opt->kv_dtype = *kv;
  auto quant = ParseWeightQuant(absl::GetFlag(FLAGS_quantize_experts), "--quantize_experts");
  if (!quant.ok()) return quant.status();
  opt->expert_quant = *quant;
  auto aquant =
      ParseWeightQuant(absl::GetFlag(FLAGS_quantize_attention), "--quantize_attention");
  if (!aquant.ok()) return aquant.status();
  opt->attention_quant = *aquant;
  return absl::OkStatus();
}

std::vector<std::string> LoadFlagsForChild() {
  std::vector<std::string> args;
  if (absl::GetFlag(FLAGS_load_format) != "auto") {
    args.push_back("--load_format=" + absl::GetFlag(FLAGS_load_format));
  }
  if (absl::GetFlag(FLAGS_num_layers) != 0) {
    args.push_back(absl::StrCat("--num_layers=", absl::GetFlag(FLAGS_num_layers)));
  }
  if (absl::GetFlag(FLAGS_cuda_graphs)) args.push_back("--cuda_graphs");
  if (absl::GetFlag(FLAGS_cuda_pdl)) args.push_back("--cuda_pdl");
  if (absl::GetFlag(FLAGS_cuda_deep_loads)) args.push_back("--cuda_deep_loads");
  if (absl::GetFlag(FLAGS_kv_cache_dtype) != "fp32") {
    args.push_back("--kv_cache_dtype=" + absl::GetFlag(FLAGS_kv_cache_dtype));
  }
  if (absl::GetFlag(FLAGS_quantize_experts) != "none") {
    args.push_back("--quantize_experts=" + absl::GetFlag(FLAGS_quantize_experts));
  }
  if (absl::GetFlag(FLAGS_quantize_attention) != "none") {
    args.push_back("--quantize_attention=" + absl::GetFlag(FLAGS_quantize_attention));
  }
  return args;
}

}  // namespace moemesh
