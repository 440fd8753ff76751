// Dense projection y = x W^T (+ bias) with W in PyTorch nn.Linear layout [out, in].
#ifndef MOEMESH_ENGINE_OPS_LINEAR_H_
#define MOEMESH_ENGINE_OPS_LINEAR_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/dtype.h"

namespace moemesh {

// Arithmetic used by matrix products. kF32 reproduces fp32 PyTorch; kBF16 rounds both
// operands to bf16 and accumulates in fp32. kInt8 (quantised experts, --quantize_experts=int8)
// stores W as int8 with one scale per output row (s_n = max_k |W[n,k]| / 127, q = W / s_n
// rounded to nearest even), quantises each row of x per group of 64 consecutive inputs on the
// fly (s_g = max |x| over the group / 127, q = x * (127 / max) rounded to nearest even; a group
// of zeros has s_g = 0), forms each group's dot product exactly in int32 (AVX-512 VNNI), and
// sums the groups in fp32: y[n] = s_n * sum_g s_g * dot_g(qx, qW[n]) (+ bias). kInt4
// (--quantize_experts=int4) stores W as 4-bit integers in [-7, 7] with one scale per output row
// and group of 64 inputs (s_ng = max |W[n, group]| / 7), quantises x as kInt8 does, and computes
// y[n] = sum_g (s_ng * s_g) * dot_g(qx, qW[n]) (+ bias).
enum class ComputeType { kF32, kBF16, kInt8, kInt4 };

// "fp32" / "bf16" / "int8" / "int4" for logs and JSON.
const char* ComputeTypeName(ComputeType ct);

namespace ops {

// A weight W of shape [out, in] prepared for y = x W^T (+ bias).
//
// Create() copies W into a blocked layout shared by the hand-written small-batch kernels and
// oneDNN's matmul, so `w` may be released once Create() returns. Storage: kBF16 compute keeps
// bf16 (F32/F16 weights rounded to bf16); kF32 compute keeps fp32, except that BF16 weights
// stay bf16 and are widened to fp32 inside the kernels, which is exact (results are those of
// fp32 weights) and halves the memory traffic; kInt8 keeps int8 (a quarter of fp32, half of
// bf16), kInt4 4-bit values plus a 4-byte scale per 64 (4.5 bits a weight), and both run the
// hand-written kernels for every m (a row's result does not depend on m or
// on the thread count). Movable, not copyable. Forward() is const and thread-safe.
//
// Forward() uses hand-written AVX-512 kernels for m <= small_m_limit() (no per-call setup:
// the latency that matters for single-stream decode) and oneDNN above. It uses up to
// NumThreads() threads (threading.h's worker pool), but small products run on the calling
// thread, and calls from inside a ParallelRun (or OpenMP) region run single-threaded.
class Linear {
 public:
  static absl::StatusOr<Linear> Create(const void* w, DType wtype, int64_t out, int64_t in,
                                       ComputeType ct, const float* bias = nullptr);

  Linear();
  Linear(Linear&&) noexcept;
  Linear& operator=(Linear&&) noexcept;
  Linear(const Linear&) = delete;
  Linear& operator=(const Linear&) = delete;
  ~Linear();

  // x: [m, in] fp32 row-major, y: [m, out] fp32 row-major; x and y must not overlap.
  // kBF16: x is rounded to bf16 (nearest even), products accumulate in fp32.
  void Forward(const float* x, int64_t m, float* y) const;

  // Computes part `part` of `num_parts` of y's columns (split in 64-column blocks; some parts
  // may be empty), on the calling thread with the small-batch kernels: for callers that run
  // their own parallel region over a decode step (an OpenMP fork/join costs microseconds).
  // Results equal Forward()'s small-kernel results.
  void ForwardPart(const float* x, int64_t m, float* y, int part, int num_parts) const;

  int64_t in() const;
  int64_t out() const;
  ComputeType compute() const;

  // Bytes of packed weights held.
  int64_t weight_bytes() const;

  // Estimated single-threaded time of Forward() for batch size m (ns; the thread-count model
  // of linear_cpu.cc), and the threads Forward() would use for it from outside a parallel
  // region. Callers that run several products side by side (experts) use these to decide.
  double EstimatedNs(int64_t m) const;
  int ThreadsFor(int64_t m) const;

  // For tests and benchmarks: which implementation runs for batch size m.
  enum class Path { kAuto, kSmall, kOneDnn };
  // Forces one implementation (kAuto: pick by m). Not thread-safe against Forward().
  void set_path_for_testing(Path p);
  // Largest m that uses the hand-written kernels under kAuto.
  int64_t small_m_limit() const;
  // oneDNN's implementation name for batch size m ("" when oneDNN is unavailable).
  std::string onednn_impl_for_testing(int64_t m) const;

 private:
  struct Impl;
  explicit Linear(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ops
}  // namespace moemesh

#endif  // MOEMESH_ENGINE_OPS_LINEAR_H_
