// The public API's SamplingParams <-> the engine's SamplingConfig.
#ifndef MOEMESH_MESH_SAMPLING_PARAMS_H_
#define MOEMESH_MESH_SAMPLING_PARAMS_H_

#include "engine/config.h"
#include "engine/sampler.h"
#include "protos/generation.pb.h"

namespace moemesh {

// Unset fields keep SamplingConfig's defaults (greedy, no filters, no penalties).
SamplingConfig ToSamplingConfig(const moemesh::v1::SamplingParams& p);

// Fills the request's unset sampling fields from generation_config.json: sampled decoding with
// its temperature / top_p / top_k / min_p when it says do_sample, else greedy; its
// repetition_penalty always.
moemesh::v1::SamplingParams ResolveDefaults(const moemesh::v1::SamplingParams& p,
                                            const GenerationDefaults& d);

}  // namespace moemesh

#endif  // MOEMESH_MESH_SAMPLING_PARAMS_H_
