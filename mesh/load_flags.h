// Command-line flags that choose how weights are loaded, shared by every binary that loads a
// model (moemesh, moemesh_bench and the service binaries): --load_format, --num_layers,
// --cuda_graphs, --cuda_pdl, --cuda_deep_loads, --kv_cache_dtype, --quantize_experts and
// --quantize_attention.
#ifndef MOEMESH_MESH_LOAD_FLAGS_H_
#define MOEMESH_MESH_LOAD_FLAGS_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/model.h"

namespace moemesh {

// Sets opt->load_format, num_layers, cuda_graphs, cuda_pdl, cuda_deep_loads, kv_dtype,
// expert_quant and attention_quant from the flags (other fields are left alone).
// InvalidArgument, naming the flag, for a --load_format other than auto/dummy, a negative
// --num_layers (a count above the model's is refused when config.json is read), a
// --kv_cache_dtype other than fp32/bf16/int8 or a --quantize_experts or --quantize_attention
// other than none/int8/int4.
absl::Status LoadOptionsFromFlags(LoadOptions* opt);

// The same flags as arguments for a child process ("--load_format=dummy", "--num_layers=4",
// "--cuda_graphs"): empty when they have their defaults.
std::vector<std::string> LoadFlagsForChild();

}  // namespace moemesh

#endif  // MOEMESH_MESH_LOAD_FLAGS_H_
