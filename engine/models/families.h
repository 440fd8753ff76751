// One function per model family; engine/arch.cc dispatches on config.json's model_type.
#ifndef MOEMESH_ENGINE_MODELS_FAMILIES_H_
#define MOEMESH_ENGINE_MODELS_FAMILIES_H_

#include "engine/arch.h"
#include "engine/config.h"

namespace moemesh {

ArchSpec Qwen3MoeArch(const ModelConfig& cfg);
ArchSpec Qwen2MoeArch(const ModelConfig& cfg);
ArchSpec MixtralArch(const ModelConfig& cfg);
ArchSpec OlmoeArch(const ModelConfig& cfg);

// The Hugging Face naming most families share (model.layers.{L}.mlp.experts.{E}.gate_proj ...).
ArchSpec StandardMoeNames();

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_MODELS_FAMILIES_H_
