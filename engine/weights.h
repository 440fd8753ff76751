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

// Keeps buffers alive that Linear ops may point into (fused weights built at load time).
class WeightArena {
 public:
  uint8_t* Allocate(size_t bytes);

 private:
  std::vector<std::unique_ptr<uint8_t[]>> buffers_;
};

// A 1-D tensor of `n` elements as fp32 (norm weights, biases).
absl::StatusOr<std::vector<float>> LoadVector(const CheckpointReader& ckpt, const std::string& name,
                                              int64_t n);

// Rows of several [rows_i, in] matrices stacked into one [sum rows_i, in] Linear (fused q/k/v,
// fused gate/up), with optional stacked biases. All parts must share a dtype.
struct LinearPart {
  std::string weight;  // tensor name
  int64_t rows;
  std::string bias;    // "" = none
};
absl::StatusOr<ops::Linear> LoadFusedLinear(const CheckpointReader& ckpt,
                                            const std::vector<LinearPart>& parts, int64_t in,
                                            ComputeType ct, WeightArena* arena);

// One [out, in] weight, used in place where Linear allows.
absl::StatusOr<ops::Linear> LoadLinear(const CheckpointReader& ckpt, const std::string& name,
                                       int64_t out, int64_t in, ComputeType ct,
                                       const std::string& bias = "");

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_WEIGHTS_H_
