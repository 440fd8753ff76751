// The greedy choice over one row of logits, shared by the sampler and the attention stacks'
// ForwardArgMax (whose CUDA kernel reproduces it exactly).
#ifndef MOEMESH_ENGINE_ARGMAX_H_
#define MOEMESH_ENGINE_ARGMAX_H_

#include <cstdint>

namespace moemesh {

// Index of the largest value (lowest index on ties), as torch.argmax. NaNs are passed over,
// except that a NaN first value gives 0 (nothing compares greater than it).
inline int32_t ArgMax(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (x[i] > x[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

}  // namespace moemesh

#endif  // MOEMESH_ENGINE_ARGMAX_H_
