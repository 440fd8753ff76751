// Loading weights from a checkpoint into compute-ready form (Linear ops, fp32 vectors).
#ifndef MOEMESH_ENGINE_WEIGHTS_H_
#define MOEMESH_ENGINE_WEIGHTS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/ops/linear.h"
#include "engine/safetensors.h"

namespace moemesh {

// A 1-D tensor of `n` elements as fp32 (norm weights, biases).
absl::StatusOr<std::vector<float>> LoadVector(const CheckpointReader& ckpt, const std::string& name,
                                              int64_t n);

// Rows of several [rows_i, in] matrices stacked into one [sum rows_i, in] Linear (fused q/k/v,
// fused gate/up), with optional stacked biases. All parts must share a dtype. The stacked copy is
// temporary: Linear::Create packs its own copy of the weights.
struct LinearPart {
  std::string weight;  // tensor name
  int64_t rows;
  std::string bias;    // "" = none
};
absl::StatusOr<ops::Linear> LoadFusedLinear(const CheckpointReader& ckpt,
                                            const std::vector<LinearPart>& parts, int64_t in,
                                            ComputeType ct);

// One [out, in] weight.
absl::StatusOr<ops::Linear> LoadLinear(const CheckpointReader& ckpt, const std::string& name,
                                       int64_t out, int64_t in, ComputeType ct,
                                       const std::string& bias = "");

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_WEIGHTS_H_
